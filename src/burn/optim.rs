//! [`EmaOptim`]: an EMA that rides inside any burn optimizer, for burn-train's `Learner`.
//!
//! burn 0.22's `Learner` takes its concrete `ModuleOptimizer`, built from any per-parameter
//! [`Optimizer`]; it gives no hook after the step that sees the module, and the wgpu device
//! and queue behind a burn device are not reachable from it. So the EMA lives where the
//! `Learner` can carry it: in the per-parameter optimizer state, next to the inner optimizer's.
//! Each step runs the inner step, then `shadow += alpha * (param - shadow)` with burn's tensor
//! ops (one fused kernel per parameter on burn's wgpu backend), on the parameter's own device;
//! the shadows and the step counter are saved and restored with the optimizer's record by the
//! `Learner`'s checkpointer, and move with the state under multi-device training.

use ::burn::optim::{join_path, LearningRate, Optimizer, RecordState, StateSink, StateSource};
use ::burn::tensor::{DType, Device, FloatDType, Tensor};

use crate::error::{Error, Result};
use crate::schedule::{Action, Numerics, Policy, Schedule, Stepper};

use crate::names::{comp_leaf, shadow_leaf, ANCHOR_LEAF, COUNTER_LEAF, INNER_PREFIX as INNER};

/// The most EMAs one optimizer keeps (as [`GpuEmaBuilder::extra_ema`](crate::GpuEmaBuilder::extra_ema)).
pub const MAX_EMAS: usize = 4;

/// Any burn [`Optimizer`] plus exponential moving averages of the parameters it optimizes.
///
/// Convert it into burn's `ModuleOptimizer` (`.into()`) and hand that to the `Learner` in
/// place of `AdamConfig::new().init()`:
///
/// ```no_run
/// use burn::optim::{AdamConfig, ModuleOptimizer};
/// use wgpu_ema::burn::EmaOptim;
/// use wgpu_ema::Schedule;
/// # fn main() -> wgpu_ema::Result<()> {
/// let optim: ModuleOptimizer = EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.999))?.into();
/// // Learner::new(model, optim, 1e-3) ...
/// # let _ = optim; Ok(()) }
/// ```
///
/// Semantics are [`GpuEma`](crate::GpuEma)'s: shadows start equal to the parameters (their
/// values before the first step), update `n` uses the schedule's decay at `n`, the
/// [`Policy`] delays and spaces the updates, several EMAs share the counter. Shadows are f32
/// whatever the parameters' dtype.
///
/// With a [`Schedule::Bema`] as the first schedule, each parameter's state also keeps BEMA's
/// anchor `theta_0` (saved as `"{param_id}.ema_theta0"`); read the corrected weights with
/// [`EmaWeights::bema_module`](super::EmaWeights::bema_module).
#[derive(Clone, Debug)]
pub struct EmaOptim<O> {
    inner: O,
    schedules: Vec<Schedule>,
    numerics: Numerics,
    policy: Policy,
    compensated: bool,
    /// The shadows follow the parameter exactly (a tensor selected to be copied).
    follow: bool,
}

/// Every float parameter of `module` as (module path, id), paths as [`BurnEma`](super::BurnEma)
/// names them.
fn float_params<M: ::burn::module::Module>(module: &M) -> Vec<(String, ::burn::module::ParamId)> {
    struct Ids {
        path: super::PathStack,
        found: Vec<(String, ::burn::module::ParamId)>,
    }
    impl ::burn::module::ModuleVisitor for Ids {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &::burn::module::Param<Tensor<D>>) {
            self.found.push((self.path.name(), param.id));
        }
    }
    let mut v = Ids {
        path: super::PathStack::default(),
        found: Vec::new(),
    };
    module.visit(&mut v);
    v.found
}

impl<O: Optimizer + Clone + 'static> EmaOptim<O> {
    /// burn's `ModuleOptimizer` for `module` with a [`Selection`](crate::select::Selection)
    /// over its module paths (`layers.0.weight`, as [`BurnEma`](super::BurnEma) names them):
    /// averaged parameters get this optimizer, copied ones (running statistics) this
    /// optimizer with shadows that take the parameter's value exactly on every update, and
    /// excluded ones the inner optimizer alone (no EMA state at all). Done with burn's own
    /// parameter groups (`ModuleOptimizer::with_group` over `ParamGroup::from_ids`), since an
    /// optimizer's step is not told which parameter it steps; the ids are the module's, so
    /// build it from the module the `Learner` trains. Read the EMA with
    /// [`EmaWeights::select`](super::EmaWeights::select) and the same selection.
    ///
    /// Errors as [`Selection::resolve`](crate::select::Selection::resolve): a pattern that
    /// matches no parameter, a parameter both copied and excluded.
    pub fn with_selection<M: ::burn::module::Module>(
        self,
        module: &M,
        selection: &crate::select::Selection,
    ) -> Result<::burn::optim::ModuleOptimizer> {
        use crate::select::Mode;
        use ::burn::module::ParamGroup;
        let params = float_params(module);
        let modes = selection.resolve(params.iter().map(|(p, _)| p.as_str()))?;
        let ids = |want: Mode| -> Vec<::burn::module::ParamId> {
            params
                .iter()
                .zip(&modes)
                .filter(|(_, &m)| m == want)
                .map(|((_, id), _)| *id)
                .collect()
        };
        let (copied, excluded) = (ids(Mode::Copy), ids(Mode::Exclude));
        let inner = self.inner.clone();
        let follower = Self {
            follow: true,
            ..self.clone()
        };
        let mut optim: ::burn::optim::ModuleOptimizer = self.into();
        if !copied.is_empty() {
            optim = optim.with_group(ParamGroup::from_ids(copied), follower, None);
        }
        if !excluded.is_empty() {
            optim = optim.with_group(ParamGroup::from_ids(excluded), inner, None);
        }
        Ok(optim)
    }
}

impl<O: Optimizer> EmaOptim<O> {
    /// `inner` with one EMA of `schedule` (validated).
    pub fn new(inner: O, schedule: Schedule) -> Result<Self> {
        Stepper::new(schedule, Numerics::default(), Policy::default(), 0)?;
        Ok(Self {
            inner,
            schedules: vec![schedule],
            numerics: Numerics::default(),
            policy: Policy::default(),
            compensated: false,
            follow: false,
        })
    }

    /// Kahan-compensated shadows (as [`GpuEmaBuilder::compensated`](crate::GpuEmaBuilder::compensated)):
    /// each EMA keeps a compensation term, saved as `"{param_id}.ema_comp"`, that carries the
    /// rounding error of every update into the next, so decays close to 1 do not lose the small
    /// updates to f32 rounding. Costs one more tensor per parameter and EMA.
    pub fn compensated(mut self, yes: bool) -> Self {
        self.compensated = yes;
        self
    }

    /// One more EMA with its own schedule (up to [`MAX_EMAS`] in all), saved as
    /// `"{param_id}.ema_{k}"`.
    pub fn extra_ema(mut self, schedule: Schedule) -> Result<Self> {
        schedule.validate()?;
        if schedule.as_bema().is_some() {
            return Err(Error::InvalidConfig(
                "BEMA is the first EMA's schedule only: give it to EmaOptim::new".into(),
            ));
        }
        if self.schedules.len() >= MAX_EMAS {
            return Err(Error::InvalidConfig(format!(
                "at most {MAX_EMAS} EMAs per optimizer"
            )));
        }
        self.schedules.push(schedule);
        Ok(self)
    }

    /// The update policy (validated).
    pub fn policy(mut self, policy: Policy) -> Result<Self> {
        // The pair is checked as the step counter checks it (BEMA writes nothing back).
        Stepper::new(self.schedules[0], self.numerics, policy, 0)?;
        self.policy = policy;
        Ok(self)
    }

    /// The numerics ([`Numerics::Exact`] by default).
    pub fn numerics(mut self, numerics: Numerics) -> Self {
        self.numerics = numerics;
        self
    }

    /// The schedules, EMA 0 first.
    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    /// The inner optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

/// One parameter's state: the inner optimizer's, the shadows, and the step counter.
#[derive(Clone)]
pub struct EmaOptimState<S, const D: usize> {
    inner: Option<S>,
    shadows: Vec<Tensor<D>>,
    /// One per shadow when compensated, else empty.
    comps: Vec<Tensor<D>>,
    /// BEMA's anchor, for a BEMA first schedule.
    anchor: Option<Tensor<D>>,
    num_updates: u64,
}

impl<S, const D: usize> EmaOptimState<S, D> {
    /// BEMA's anchor `theta_0`, for a BEMA first schedule.
    pub fn anchor(&self) -> Option<&Tensor<D>> {
        self.anchor.as_ref()
    }

    /// Optimizer steps this parameter has seen.
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }

    /// EMA `k`'s shadow.
    pub fn shadow(&self, k: usize) -> Option<&Tensor<D>> {
        self.shadows.get(k)
    }
}

fn as_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

impl<O: Optimizer> Optimizer for EmaOptim<O> {
    type State<const D: usize> = EmaOptimState<O::State<D>, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        // A first step (or a record without shadows for this parameter): shadows start as the
        // parameter before the step, as `GpuEma::build` copies them.
        let k = self.schedules.len();
        let comps_wanted = if self.compensated { k } else { 0 };
        let bema = self.schedules[0].as_bema().is_some();
        let (inner_state, mut shadows, mut comps, mut anchor, n) = match state {
            Some(s)
                if s.shadows.len() == k
                    && s.comps.len() == comps_wanted
                    && s.anchor.is_some() == bema
                    && s.shadows.iter().all(|t| t.shape() == tensor.shape()) =>
            {
                (s.inner, s.shadows, s.comps, s.anchor, s.num_updates)
            }
            other => {
                let start = as_f32(tensor.clone().detach());
                let zeros = start.zeros_like();
                (
                    other.and_then(|s| s.inner),
                    vec![start.clone(); k],
                    vec![zeros; comps_wanted],
                    bema.then_some(start),
                    0,
                )
            }
        };
        let (param, inner_state) = self.inner.step(lr, tensor, grad, inner_state);
        let n = n + 1;
        let p = as_f32(param.clone().detach());
        // The one step counter of the crate decides what call `n` does and every EMA's alpha.
        // Schedules and policy were validated when the optimizer was built; an error skips.
        // At most MAX_EMAS schedules (extra_ema refuses more): no allocation per parameter.
        let mut alphas = [1.0f32; MAX_EMAS];
        let action = Stepper::new(self.schedules[0], self.numerics, self.policy, n - 1)
            .and_then(|mut s| s.advance_all(n, &self.schedules[1..], &mut alphas))
            .unwrap_or(Action::Skip);
        // A copied parameter's shadows take its value on every update (not its anchor).
        let action = match action {
            Action::Update(_) if self.follow => Action::Copy,
            a => a,
        };
        if let Action::Update(alpha) = action {
            alphas[0] = alpha;
        }
        // A copy (burn-in, BEMA's restarts, a copied parameter's update) takes BEMA's anchor
        // too: a copied parameter's BEMA weights are then its value, exactly.
        if let (Action::Copy, Some(a)) = (action, anchor.as_mut()) {
            *a = p.clone();
        }
        for (i, (shadow, &alpha)) in shadows.iter_mut().zip(&alphas).enumerate() {
            match action {
                Action::Update(_) => {
                    let s = shadow.clone();
                    if let Some(c) = comps.get_mut(i) {
                        // Kahan: y = alpha (p - s) - c; t = s + y; c = (t - s) - y; s = t.
                        let y = (p.clone() - s.clone()).mul_scalar(alpha) - c.clone();
                        let t = s.clone() + y.clone();
                        // `(t - s) - y` is 0 in exact arithmetic, and the fused kernel's
                        // compiler folds it so (on Mesa: the error stayed the uncompensated
                        // one, 9.2e-6, in `tests/burn_learner.rs`; a multiply by 1 was folded
                        // too). Scaling by 2 and back is exact in binary floating point and
                        // keeps the term: 5.9e-8 there.
                        *c = (t.clone().mul_scalar(2.0) - s.mul_scalar(2.0) - y.mul_scalar(2.0))
                            .mul_scalar(0.5);
                        *shadow = t;
                    } else {
                        *shadow = match self.numerics {
                            Numerics::Exact => s.clone() + (p.clone() - s).mul_scalar(alpha),
                            Numerics::TensorFlow => s.clone() - (s - p.clone()).mul_scalar(alpha),
                        };
                    }
                }
                Action::Copy => {
                    *shadow = p.clone();
                    if let Some(c) = comps.get_mut(i) {
                        *c = p.zeros_like();
                    }
                }
                Action::Skip => {}
            }
        }
        // Switch EMA: every `write_back_every`-th update, training continues from the first
        // EMA's weights (in the parameter's own dtype).
        let param = match (action, shadows.first()) {
            (Action::Update(_), Some(back)) if self.policy.writes_back(n) => {
                if param.dtype() == back.dtype() {
                    back.clone()
                } else {
                    back.clone().cast(FloatDType::from(param.dtype()))
                }
            }
            _ => param,
        };
        (
            param,
            Some(EmaOptimState {
                inner: inner_state,
                shadows,
                comps,
                anchor,
                num_updates: n,
            }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        EmaOptimState {
            inner: state.inner.map(|s| O::to_device(s, device)),
            shadows: state
                .shadows
                .into_iter()
                .map(|t| t.to_device(device))
                .collect(),
            comps: state
                .comps
                .into_iter()
                .map(|t| t.to_device(device))
                .collect(),
            anchor: state.anchor.map(|t| t.to_device(device)),
            num_updates: state.num_updates,
        }
    }
}

impl<S: RecordState + Clone, const D: usize> RecordState for EmaOptimState<S, D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        if let Some(inner) = &self.inner {
            inner.state_flatten(&join_path(prefix, INNER), out);
        }
        for (k, t) in self.shadows.iter().enumerate() {
            out.push_tensor(prefix, &shadow_leaf(k), t.clone().into_data());
        }
        for (k, t) in self.comps.iter().enumerate() {
            out.push_tensor(prefix, &comp_leaf(k), t.clone().into_data());
        }
        if let Some(a) = &self.anchor {
            out.push_tensor(prefix, ANCHOR_LEAF, a.clone().into_data());
        }
        out.push_scalar(
            prefix,
            COUNTER_LEAF,
            ::burn_pack::Scalar::UInt(self.num_updates),
        );
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let inner_prefix = join_path(prefix, INNER);
        let inner = if src.has_under(&inner_prefix) {
            Some(S::state_unflatten(&inner_prefix, src, device)?)
        } else {
            None
        };
        let num_updates = match src.take_scalar(prefix, COUNTER_LEAF)? {
            ::burn_pack::Scalar::UInt(n) => n,
            _ => return None,
        };
        let mut shadows = Vec::new();
        while let Some(data) = src.take_tensor(prefix, &shadow_leaf(shadows.len())) {
            shadows.push(Tensor::<D>::from_data(data, device));
        }
        let mut comps = Vec::new();
        while let Some(data) = src.take_tensor(prefix, &comp_leaf(comps.len())) {
            comps.push(Tensor::<D>::from_data(data, device));
        }
        let anchor = src
            .take_tensor(prefix, ANCHOR_LEAF)
            .map(|data| Tensor::<D>::from_data(data, device));
        Some(Self {
            inner,
            shadows,
            comps,
            anchor,
            num_updates,
        })
    }
}
