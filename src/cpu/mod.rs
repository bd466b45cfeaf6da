//! The same update on host slices: a fast f32 path, TensorFlow's f32 arithmetic, and the f64
//! reference that the tests check the GPU against.
//!
//! The fast path is memory-bound (12 bytes per element); it splits large tensors across all
//! cores and keeps the hot loop in plain `+` and `*`, which the compiler vectorizes.
//! (`f32::mul_add` without an FMA target feature becomes a libm call per element.)

use crate::error::{Error, Result};
use crate::schedule::{Action, Numerics, Policy, Schedule, Stepper};
use crate::tensors::{HostTensors, TensorSpec};

mod kernels;
mod reference;
use kernels::check_len;
pub use kernels::{ema_step, ema_step_f64, ema_step_kahan, ema_step_tf};
pub use reference::ReferenceEma;

/// Shadows kept on the host: the CPU twin of [`GpuEma`](crate::GpuEma), with the same
/// schedules, numerics, names and step counter.
///
/// ```
/// use wgpu_ema::{cpu::CpuEma, Numerics, Schedule, TensorSpec};
/// let mut ema = CpuEma::new(Schedule::tf(0.999), Numerics::Exact).unwrap();
/// ema.track(TensorSpec::new("bias", [2]), &[1.0, 2.0]).unwrap();
/// ema.update(&[&[3.0, 2.0]]).unwrap(); // update 1: decay min(0.999, 2/11)
/// let b = ema.shadow("bias").unwrap();
/// assert!((b[0] - (1.0 + 9.0 / 11.0 * 2.0)).abs() < 1e-6);
/// ```
#[derive(Clone, Debug)]
pub struct CpuEma {
    stepper: Stepper,
    specs: Vec<TensorSpec>,
    shadows: Vec<Vec<f32>>,
    /// Kahan compensation terms, one per shadow; empty when not compensated.
    comps: Vec<Vec<f32>>,
    compensated: bool,
    /// Per tensor: its shadow follows its parameter exactly (selected to be copied).
    follow: Vec<bool>,
    /// The selection as checkpoints record it.
    selection: String,
    /// BEMA's anchors `theta_0`, one per shadow; empty unless the schedule is BEMA.
    anchors: Vec<Vec<f32>>,
}

impl CpuEma {
    /// An EMA tracking nothing yet. Fails on an invalid schedule.
    pub fn new(schedule: Schedule, numerics: Numerics) -> Result<Self> {
        Ok(Self {
            stepper: Stepper::new(schedule, numerics, Policy::default(), 0)?,
            specs: Vec::new(),
            shadows: Vec::new(),
            comps: Vec::new(),
            compensated: false,
            follow: Vec::new(),
            selection: String::new(),
            anchors: Vec::new(),
        })
    }

    fn is_bema(&self) -> bool {
        self.stepper.schedule().as_bema().is_some()
    }

    /// Tracks a tensor; its shadow starts equal to `values`.
    pub fn track(&mut self, spec: TensorSpec, values: &[f32]) -> Result<()> {
        if self.specs.iter().any(|s| s.name == spec.name) {
            return Err(Error::DuplicateName { name: spec.name });
        }
        crate::names::check_names(
            self.specs
                .iter()
                .map(|s| s.name.as_str())
                .chain([spec.name.as_str()]),
            1,
            self.compensated,
        )?;
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                expected: spec.numel(),
                got: values.len() as u64,
                name: spec.name,
            });
        }
        self.specs.push(spec);
        self.follow.push(false);
        self.shadows.push(values.to_vec());
        if self.is_bema() {
            self.anchors.push(values.to_vec());
        }
        if self.compensated {
            self.comps.push(vec![0.0; values.len()]);
        }
        Ok(())
    }

    /// Compensated shadows (Kahan summation), as
    /// [`GpuEmaBuilder::compensated`](crate::GpuEmaBuilder::compensated). Turning it on starts
    /// every term at zero; refused with [`Numerics::TensorFlow`].
    pub fn set_compensated(&mut self, yes: bool) -> Result<()> {
        if yes && self.stepper.numerics() == Numerics::TensorFlow {
            return Err(Error::InvalidConfig(
                "compensated shadows use Numerics::Exact".into(),
            ));
        }
        if yes && self.is_bema() {
            return Err(Error::InvalidConfig("a BEMA EMA is not compensated".into()));
        }
        self.compensated = yes;
        self.comps = if yes {
            self.shadows.iter().map(|s| vec![0.0; s.len()]).collect()
        } else {
            Vec::new()
        };
        Ok(())
    }

    /// The compensation term of `name`, for a compensated EMA.
    pub fn compensation(&self, name: &str) -> Result<Option<&[f32]>> {
        let i = self.index(name)?;
        Ok(self.comps.get(i).map(Vec::as_slice))
    }

    /// Sets when updates happen (delayed start, interval); see [`Policy`].
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        self.stepper.set_policy(policy)
    }

    /// The tracked tensors, in tracking order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.stepper.schedule()
    }

    /// Changes the schedule from the next update on, keeping the shadows and the counter: a
    /// decay lowered or raised mid-run (the web demo's slider does this). Checkpoints record
    /// the schedule in force when they are written. An invalid schedule is an error and changes
    /// nothing.
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<()> {
        self.stepper.set_schedule(schedule)
    }

    /// The numerics.
    pub fn numerics(&self) -> Numerics {
        self.stepper.numerics()
    }

    /// The step counter: calls so far, skipped and copying ones included (the `n` of the
    /// last call; see [`schedule`](crate::schedule)'s "What `n` counts").
    pub fn num_updates(&self) -> u64 {
        self.stepper.num_updates()
    }

    /// Sets the step counter (after restoring a checkpoint, say): the next
    /// [`update`](Self::update) uses `n + 1`.
    pub fn set_num_updates(&mut self, n: u64) {
        self.stepper.set_num_updates(n);
    }

    /// One update with the internal counter: one slice per tracked tensor, in tracking order.
    pub fn update(&mut self, params: &[&[f32]]) -> Result<()> {
        let n = self.stepper.next();
        self.update_at(n, params)
    }

    /// One update as update number `n` (the caller's global step). A policy that writes the
    /// EMA back into the parameters at `n` needs [`update_at_mut`](Self::update_at_mut): here
    /// it is an error, before anything changes.
    pub fn update_at(&mut self, n: u64, params: &[&[f32]]) -> Result<()> {
        if self.stepper.policy().writes_back(n) {
            return Err(Error::InvalidConfig(format!(
                "the policy writes the EMA into the parameters at update {n} \
                 (write_back_every = {}): call update_mut / update_at_mut, which may write them",
                self.stepper.policy().write_back_every
            )));
        }
        self.apply(n, params)
    }

    /// [`update`](Self::update) that may write into the parameters: after every
    /// `write_back_every`-th update of the [`Policy`], the shadows are copied into `params`
    /// (Switch EMA).
    pub fn update_mut(&mut self, params: &mut [&mut [f32]]) -> Result<()> {
        let n = self.stepper.next();
        self.update_at_mut(n, params)
    }

    /// [`update_at`](Self::update_at) that may write into the parameters (see
    /// [`update_mut`](Self::update_mut)).
    pub fn update_at_mut(&mut self, n: u64, params: &mut [&mut [f32]]) -> Result<()> {
        let views: Vec<&[f32]> = params.iter().map(|p| &**p).collect();
        self.apply(n, &views)?;
        if self.stepper.policy().writes_back(n) {
            for (p, s) in params.iter_mut().zip(&self.shadows) {
                p.copy_from_slice(s);
            }
        }
        Ok(())
    }

    /// Applies a [`Selection`](crate::select::Selection) to the tensors tracked so far, as
    /// [`GpuEmaBuilder::select`](crate::GpuEmaBuilder::select) does at build: excluded
    /// tensors are dropped, copied ones take their parameters' values exactly on every update.
    /// Errors (nothing changes): a pattern that matches no tracked tensor, a tensor both
    /// copied and excluded, a second selection.
    pub fn select(&mut self, selection: &crate::select::Selection) -> Result<()> {
        use crate::select::Mode;
        if !self.selection.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "this EMA already has a selection ({}): select once, after tracking",
                self.selection
            )));
        }
        let modes = selection.resolve(self.specs.iter().map(|s| s.name.as_str()))?;
        self.selection = crate::select::describe(
            self.specs
                .iter()
                .map(|s| s.name.as_str())
                .zip(modes.iter().copied()),
        );
        let kept: Vec<bool> = modes.iter().map(|&m| m != Mode::Exclude).collect();
        retain_where(&mut self.specs, &kept);
        retain_where(&mut self.shadows, &kept);
        if self.is_bema() {
            retain_where(&mut self.anchors, &kept);
        }
        if self.compensated {
            retain_where(&mut self.comps, &kept);
        }
        self.follow = modes
            .iter()
            .filter(|&&m| m != Mode::Exclude)
            .map(|&m| m == Mode::Copy)
            .collect();
        Ok(())
    }

    /// The update of call `n` into the shadows.
    fn apply(&mut self, n: u64, params: &[&[f32]]) -> Result<()> {
        if params.len() != self.specs.len() {
            return Err(Error::TensorCountMismatch {
                expected: self.specs.len(),
                got: params.len(),
            });
        }
        for (spec, p) in self.specs.iter().zip(params) {
            check_len(&spec.name, spec.numel() as usize, p.len())?;
        }
        // What alpha's rounding to f32 dropped, for compensated shadows (computed before the
        // counter moves: an error changes nothing).
        let alpha_lo = if self.compensated {
            self.stepper.alpha_lo(n)?
        } else {
            0.0
        };
        let action = self.stepper.advance_to(n)?;
        // A tensor selected to be copied takes its parameter on every update, as on a copy.
        let act = |i: usize| match action {
            Action::Update(_) if self.follow.get(i).copied().unwrap_or(false) => Action::Copy,
            a => a,
        };
        if self.compensated {
            for (i, ((s, c), p)) in self
                .shadows
                .iter_mut()
                .zip(&mut self.comps)
                .zip(params)
                .enumerate()
            {
                match act(i) {
                    Action::Skip => {}
                    Action::Copy => {
                        s.copy_from_slice(p);
                        c.fill(0.0);
                    }
                    Action::Update(alpha) => ema_step_kahan(s, c, p, alpha, alpha_lo)?,
                }
            }
            return Ok(());
        }
        for (i, (s, p)) in self.shadows.iter_mut().zip(params).enumerate() {
            // A copy (burn-in, restart) takes BEMA's anchor too; a followed tensor's update
            // (also a copy) leaves it: its weights are its parameter anyway.
            if let (Action::Copy, Some(z)) = (action, self.anchors.get_mut(i)) {
                z.copy_from_slice(p);
            }
            match (act(i), self.stepper.numerics()) {
                (Action::Skip, _) => {}
                (Action::Copy, _) => s.copy_from_slice(p),
                (Action::Update(alpha), Numerics::Exact) => ema_step(s, p, alpha)?,
                (Action::Update(alpha), Numerics::TensorFlow) => ema_step_tf(s, p, alpha)?,
            }
        }
        Ok(())
    }

    /// The shadow of `name`.
    pub fn shadow(&self, name: &str) -> Result<&[f32]> {
        let i = self.index(name)?;
        Ok(&self.shadows[i])
    }

    /// Overwrites the shadow of `name` (restoring a checkpoint).
    pub fn set_shadow(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let i = self.index(name)?;
        check_len(name, self.shadows[i].len(), values.len())?;
        self.shadows[i].copy_from_slice(values);
        if let Some(c) = self.comps.get_mut(i) {
            c.fill(0.0);
        }
        Ok(())
    }

    /// BEMA's anchor `theta_0` of `name`, for a BEMA EMA.
    pub fn anchor(&self, name: &str) -> Result<Option<&[f32]>> {
        let i = self.index(name)?;
        Ok(self.anchors.get(i).map(Vec::as_slice))
    }

    /// BEMA's weights `EMA_t + alpha_t (theta_t - theta_0)` for the parameters `params` (one
    /// slice per tracked tensor, in tracking order; pass those of the last update), with
    /// `alpha_t` of the last update ([`Bema`](crate::schedule::Bema)), computed in f32 as the
    /// GPU does. A tensor selected to be copied has its parameter as its weights. An error
    /// unless the schedule is BEMA.
    pub fn bema_weights(&self, params: &[&[f32]]) -> Result<HostTensors> {
        let Some(a) = self.stepper.bias_weight() else {
            return Err(Error::InvalidConfig(format!(
                "BEMA's weights asked of an EMA whose schedule is {}",
                self.stepper.schedule().describe()
            )));
        };
        if params.len() != self.specs.len() {
            return Err(Error::TensorCountMismatch {
                expected: self.specs.len(),
                got: params.len(),
            });
        }
        let a = a as f32;
        let mut out = Vec::with_capacity(params.len());
        for (i, (spec, p)) in self.specs.iter().zip(params).enumerate() {
            check_len(&spec.name, spec.numel() as usize, p.len())?;
            let w: Vec<f32> = if self.follow.get(i).copied().unwrap_or(false) {
                p.to_vec()
            } else {
                self.shadows[i]
                    .iter()
                    .zip(self.anchors[i].iter())
                    .zip(p.iter())
                    .map(|((&s, &z), &p)| s + a * (p - z))
                    .collect()
            };
            out.push((spec.clone(), w));
        }
        Ok(HostTensors::from_parts(out))
    }

    /// All shadows, by name.
    pub fn shadows(&self) -> HostTensors {
        HostTensors::from_parts(
            self.specs
                .iter()
                .cloned()
                .zip(self.shadows.iter().cloned())
                .collect(),
        )
    }

    /// Restores shadows and the step counter from a training checkpoint (all checked before
    /// anything changes).
    pub fn restore(&mut self, checkpoint: &crate::checkpoint::Checkpoint) -> Result<()> {
        self.restore_with(checkpoint, crate::checkpoint::RestoreOptions::default())
    }

    /// [`restore`](Self::restore) with options: non-finite values, another configuration.
    pub fn restore_with(
        &mut self,
        checkpoint: &crate::checkpoint::Checkpoint,
        opts: crate::checkpoint::RestoreOptions,
    ) -> Result<()> {
        let config = crate::checkpoint::Config::of(&self.stepper, &[], &self.selection);
        let set = checkpoint.restore_set(&self.specs, self.compensated, &config, opts)?;
        for (i, values) in set.shadows.iter().enumerate() {
            self.shadows[i].copy_from_slice(values);
            // The old compensation term belongs to the old shadow.
            if let Some(c) = self.comps.get_mut(i) {
                c.fill(0.0);
            }
        }
        for (i, values) in set.comps.iter().flatten().enumerate() {
            self.comps[i].copy_from_slice(values);
        }
        for (i, values) in set.anchors.iter().flatten().enumerate() {
            self.anchors[i].copy_from_slice(values);
        }
        self.stepper.set_num_updates(set.num_updates);
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize> {
        crate::tensors::index_of(&self.specs, name)
    }
}

impl crate::checkpoint::EmaState for CpuEma {
    fn specs(&self) -> Vec<TensorSpec> {
        self.specs.clone()
    }
    fn num_updates(&self) -> u64 {
        self.stepper.num_updates()
    }
    fn schedule(&self) -> Schedule {
        self.stepper.schedule()
    }
    fn numerics(&self) -> Numerics {
        self.stepper.numerics()
    }
    fn policy(&self) -> Policy {
        self.stepper.policy()
    }
    fn selection(&self) -> String {
        self.selection.clone()
    }
    fn read_shadow(&self, i: usize) -> Result<Vec<f32>> {
        self.shadows
            .get(i)
            .cloned()
            .ok_or_else(|| Error::UnknownName {
                name: format!("tensor number {i} (the EMA tracks {})", self.shadows.len()),
            })
    }
    fn compensated(&self) -> bool {
        self.compensated
    }
    fn read_compensation(&self, i: usize) -> Result<Option<Vec<f32>>> {
        Ok(self.comps.get(i).cloned())
    }
    fn read_anchor(&self, i: usize) -> Result<Option<Vec<f32>>> {
        Ok(self.anchors.get(i).cloned())
    }
    /// The CPU EMA does not hold the parameters: pass them to
    /// [`save_training`](crate::checkpoint::save_training).
    fn read_param(&self, _i: usize) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
}

/// Keeps the elements of `v` whose flag in `keep` is set.
fn retain_where<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| flags.next().copied().unwrap_or(true));
}

#[cfg(test)]
mod tests {
    use super::kernels::PARALLEL_MIN;
    use super::*;

    #[test]
    fn fast_path_matches_tf_form_bitwise_and_parallel_split() {
        // Large enough to take the parallel path.
        let n = PARALLEL_MIN * 3 + 17;
        let p: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let mut a: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 * 1e-3).collect();
        let mut b = a.clone();
        let mut serial = a.clone();
        ema_step(&mut a, &p, 0.013).unwrap();
        ema_step_tf(&mut b, &p, 0.013).unwrap();
        for (s, &pp) in serial.iter_mut().zip(&p) {
            *s += 0.013 * (pp - *s);
        }
        assert_eq!(a, b);
        assert_eq!(a, serial);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut s = vec![0.5f32; 3];
        assert!(matches!(
            ema_step(&mut s, &[1.0; 4], 0.1),
            Err(Error::LengthMismatch { .. })
        ));
        let mut ema = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
        ema.track(TensorSpec::new("w", [3]), &[1.0, 2.0, 3.0])
            .unwrap();
        assert!(matches!(
            ema.track(TensorSpec::new("w", [1]), &[1.0]),
            Err(Error::DuplicateName { .. })
        ));
        assert!(matches!(
            ema.update(&[&[1.0, 2.0]]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            ema.update(&[]),
            Err(Error::TensorCountMismatch { .. })
        ));
        assert_eq!(ema.num_updates(), 0, "a refused update does not count");
        assert!(matches!(ema.shadow("nope"), Err(Error::UnknownName { .. })));
    }
}
