//! The EMA on the GPU: [`GpuEma`], built by [`GpuEmaBuilder`].
//!
//! The executor of the plan (`crate::plan`): shadows live in crate-owned buffers; each step
//! is one compute pass over the plan's dispatches, each with a bind group made once, so a step
//! only writes the step's `alpha` (an immediate, or a slot of a uniform ring), sets bind groups
//! and dispatches: no GPU resource is created and nothing waits for the host.
//!
//! Here: the EMA and its step (`mod.rs`), building it (`builder`), evaluation (`eval`:
//! swaps, copies), values between host and GPU (`transfer`), where things are bound
//! (`placement`), snapshots for checkpoints (`snapshot`), the parameter arena (`arena`), the
//! overlap check (`overlaps`), and the wgpu objects of the plan and the shader contract
//! (`dispatch`, `bindings`, `pipelines`).

mod arena;
mod bindings;
mod builder;
mod device;
mod dispatch;
mod eval;
mod fused;
mod overlaps;
mod pipelines;
mod placement;
mod snapshot;
mod transfer;

pub use arena::ParamArena;
pub(crate) use builder::Resolved;
pub use builder::{GpuEmaBuilder, Tiling};
pub use fused::{Epilogue, FusedStep};
pub use snapshot::Snapshot;
pub(crate) use {
    bindings::validate_binding, device::check_same_device, overlaps::check as check_overlaps,
};

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::plan::{ParamBinding, Piece, PlanLimits};
use crate::readback;
use crate::schedule::Stepper;
use crate::schedule::{Action, Numerics, Policy, Schedule};
use crate::shader::{Family, Op, StepValues, MAX_EMAS};
use crate::tensors::{HostTensors, ParamDtype, TensorSpec};
use bindings::{Store, Target};
use dispatch::Dispatches;
use pipelines::Pipelines;

/// A tracked tensor. Where its parameters and its shadow are is the plan's
/// ([`GpuEma::placed`]).
#[derive(Debug)]
struct Tracked {
    spec: TensorSpec,
    /// Arena tensors stay where the arena put them.
    in_arena: bool,
}

/// The device limits the planner works with.
pub(crate) fn plan_limits(device: &wgpu::Device) -> PlanLimits {
    let l = device.limits();
    PlanLimits::new(
        u64::from(l.min_storage_buffer_offset_alignment),
        l.max_storage_buffer_binding_size,
        l.max_buffer_size,
    )
}

/// `buffer` and `offset` as the planner sees a tensor's parameters.
fn param_binding(
    buffer: &wgpu::Buffer,
    offset: u64,
    dtype: ParamDtype,
) -> ParamBinding<wgpu::Buffer> {
    ParamBinding {
        buffer: buffer.clone(),
        buffer_size: buffer.size(),
        offset,
        dtype,
        follow: false,
    }
}

/// How the per-step values reach the shader: immediates, or a uniform ring (see `record_pass`).
#[derive(Debug)]
enum StepChannel {
    Immediates,
    Ring {
        buffer: wgpu::Buffer,
        bind_group: wgpu::BindGroup,
        stride: u64,
        slots: usize,
        next: usize,
    },
}

/// Exponential moving averages of parameters that live in GPU buffers.
///
/// Each step: `shadow = shadow + alpha * (param - shadow)` over every tracked element in one
/// compute pass, `alpha = 1 - decay(n)` computed on the host. Record it into your own
/// encoder after your optimizer's pass ([`record_update`](Self::record_update)), or let the
/// EMA submit it ([`update`](Self::update)).
///
/// A step is one dispatch per shadow buffer (one binding's worth of shadows: 128 MiB on
/// Mesa) and group of up to [`param_slots`](Self::param_slots) distinct parameter buffers,
/// whatever the number of tensors: a chunk table on the GPU says where each tensor is.
///
/// The device and queue are the caller's (clones of the handles are kept).
#[derive(Debug)]
pub struct GpuEma {
    device: wgpu::Device,
    queue: wgpu::Queue,
    stepper: Stepper,
    pipes: Pipelines,
    step: StepChannel,
    tensors: Vec<Tracked>,
    names: HashMap<String, usize>,
    /// Schedules of EMA 1, 2, ...; their shadows are `store.shadows[1..]`.
    extra: Vec<Schedule>,
    store: Store,
    work: Dispatches,
    arena: Option<ParamArena>,
    /// Between two swaps: what the parameters were exchanged with.
    swapped: Option<Target>,
    /// A tensor was rebound since the last check for overlaps (checked when a pass is
    /// recorded: a framework moving every tensor may pass through overlaps on the way).
    moved: bool,
    /// Whether the device is still there, checked after each submission.
    alive: device::Liveness,
    /// The tensors copied and left out, as checkpoints record it (`select::describe`).
    selection: String,
    /// The fused epilogue, once asked for.
    fused: Option<Box<fused::FusedState>>,
    /// The last update number applied by a separate pass, and by the fused epilogue: the
    /// same update both ways would average twice.
    last_pass: Option<u64>,
    last_fused: Option<u64>,
}

impl GpuEma {
    /// Starts configuring an EMA with this schedule.
    pub fn builder<'a>(schedule: Schedule) -> GpuEmaBuilder<'a> {
        GpuEmaBuilder::new(schedule)
    }

    /// [`Error::Swapped`] while the parameters hold the EMA weights.
    fn not_swapped(&self) -> Result<()> {
        if self.swapped.is_some() {
            return Err(Error::Swapped);
        }
        Ok(())
    }

    /// EMA 0's shadow buffers.
    fn shadow_buffers(&self) -> &[wgpu::Buffer] {
        &self.store.shadows[0]
    }

    /// Tensor `i`'s shadow pieces (one, or several past one storage binding) and where its
    /// parameters are now.
    fn placed(&self, i: usize) -> (&[Piece], &ParamBinding<wgpu::Buffer>) {
        self.work.plan().tensor(i)
    }

    /// The first tracked tensor with 16-bit parameters, which swaps do not support.
    fn half_tensor(&self) -> Option<&str> {
        (0..self.tensors.len())
            .find(|&i| self.placed(i).1.dtype != ParamDtype::F32)
            .map(|i| self.tensors[i].spec.name.as_str())
    }

    /// Records one pass of `op`; `alphas` (one per EMA) are used by `Op::Update` only (and
    /// `alphas[0]` by `Op::Bema`, as BEMA's correction weight).
    fn record_pass(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        op: Op,
        alphas: [f32; MAX_EMAS],
    ) -> Result<()> {
        self.record_pass_for(encoder, op, StepValues::new(alphas), Target::Ema)
    }

    /// [`record_pass`](Self::record_pass); an op writing the parameters exchanges them with
    /// `target`.
    fn record_pass_for(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        op: Op,
        values: StepValues,
        target: Target,
    ) -> Result<()> {
        // Every op the EMA records exists in its shape; this keeps a slip from panicking.
        let Some(_) = self.pipes.get(op, self.work.slots()) else {
            return Err(Error::InvalidConfig(format!(
                "this EMA has no `{}` pass",
                op.entry_point()
            )));
        };
        if self.moved {
            overlaps::check(self.tensors.iter().enumerate().map(|(i, t)| {
                let b = self.placed(i).1;
                (&t.spec, &b.buffer, b.offset, b.dtype)
            }))?;
            self.moved = false;
        }
        self.work.flush(&self.queue);
        let family = op.family();
        if family == Family::Write {
            self.work
                .ensure_write(&self.device, &self.pipes, &self.store, target);
        }
        let bytes = bytemuck::bytes_of(&values);
        let ring_offset = match &mut self.step {
            StepChannel::Immediates => None,
            StepChannel::Ring {
                buffer,
                bind_group,
                stride,
                slots,
                next,
            } => {
                // A slot is written once: `write_buffer` lands at the next submit, before that
                // submit's commands, so rewriting a slot could change a step recorded but not
                // yet submitted. A used-up ring is replaced; the old one lives on while
                // recorded commands use it.
                if *next >= *slots {
                    if let Some(layout) = &self.pipes.ring_layout {
                        (*buffer, *bind_group) =
                            builder::new_ring(&self.device, layout, *stride, *slots);
                    }
                    *next = 0;
                }
                let off = *next as u64 * *stride;
                *next += 1;
                self.queue.write_buffer(buffer, off, bytes);
                Some(off as u32)
            }
        };
        if self.work.len() == 0 {
            return Ok(());
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(op.label()),
            timestamp_writes: None,
        });
        let mut tier = None;
        for (group, slots, (x, y), aligned) in self.work.each(family, target) {
            // An update of rows that all start on 16 bytes loads whole vec4s, where the EMA's
            // shape has that entry point.
            let op = match op {
                Op::Update if aligned && self.pipes.get(Op::UpdateAligned, slots).is_some() => {
                    Op::UpdateAligned
                }
                other => other,
            };
            // Dispatches of different slot counts (or entry points) run different pipelines;
            // immediates and the ring's bind group are set again after each pipeline change.
            if tier != Some((slots, op)) {
                tier = Some((slots, op));
                // Every tier has the same ops (checked above for this one), so this is an error
                // only if the tables disagree.
                let Some(pipeline) = self.pipes.get(op, slots) else {
                    return Err(Error::InvalidConfig(format!(
                        "no `{}` pipeline for {slots} parameter bindings",
                        op.entry_point()
                    )));
                };
                pass.set_pipeline(pipeline);
                match (&self.step, ring_offset) {
                    (StepChannel::Ring { bind_group, .. }, Some(off)) => {
                        pass.set_bind_group(1, bind_group, &[off]);
                    }
                    _ => pass.set_immediates(0, bytes),
                }
            }
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        Ok(())
    }

    /// Records one update into the caller's encoder, as update number `num_updates() + 1`.
    ///
    /// Several steps may be recorded into one encoder before one submit: each gets its own
    /// `alpha` (an immediate recorded in the pass, or on devices without
    /// `Features::IMMEDIATES` a uniform ring slot of its own, never rewritten).
    pub fn record_update(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        let n = self.stepper.next();
        self.record_update_at(encoder, n)
    }

    /// Records one update as update number `n`: the caller's global step, as TensorFlow reads
    /// its `num_updates` variable. The internal counter becomes `n`.
    ///
    /// Under a [`Policy`], a call before `update_after_step` records the exact copy
    /// `shadow = param`, a call between two updates of `update_every` records nothing, and
    /// every `write_back_every`-th update is followed by the copy `param = shadow` of the first
    /// EMA (rounded to nearest even into f16/bf16 parameters), in the same encoder.
    pub fn record_update_at(&mut self, encoder: &mut wgpu::CommandEncoder, n: u64) -> Result<()> {
        if self.swapped.is_some() {
            return Err(Error::Swapped);
        }
        if self.last_fused == Some(n) {
            return Err(Error::InvalidConfig(format!(
                "update {n} was already applied by the fused epilogue (fused_step); a separate \
                 pass for it would average twice"
            )));
        }
        let (action, values) = self.advance(n)?;
        self.last_pass = Some(n);
        match action {
            Action::Skip => {}
            Action::Copy => self.record_pass(encoder, Op::Init, [1.0; MAX_EMAS])?,
            Action::Update(_) => {
                self.record_pass_for(encoder, Op::Update, values, Target::Ema)?;
                // Switch EMA: training continues from the averaged weights.
                if self.stepper.policy().writes_back(n) {
                    self.record_pass(encoder, Op::ToParams, [1.0; MAX_EMAS])?;
                }
            }
        }
        Ok(())
    }

    /// Moves the counter to call `n`: what it does, and the step's values for the shader
    /// (every EMA's alpha, the low half of EMA 0's for compensated shadows, and the mode the
    /// fused epilogue reads). Shared by the separate pass and the fused step.
    fn advance(&mut self, n: u64) -> Result<(Action, StepValues)> {
        let mut alphas = [1.0f32; MAX_EMAS];
        // What alpha's rounding dropped, for compensated shadows (before the counter moves).
        let alpha_lo = if self.is_compensated() {
            self.stepper.alpha_lo(n)?
        } else {
            0.0
        };
        let action = self.stepper.advance_all(n, &self.extra, &mut alphas)?;
        let mode = match action {
            Action::Skip => crate::shader::MODE_SKIP,
            Action::Copy => crate::shader::MODE_COPY,
            Action::Update(alpha) => {
                alphas[0] = alpha;
                crate::shader::MODE_UPDATE
            }
        };
        let values = StepValues {
            alpha_lo,
            mode,
            ..StepValues::new(alphas)
        };
        Ok((action, values))
    }

    /// Records `steps` updates (numbers `num_updates() + 1 ..= num_updates() + steps`) into
    /// one encoder.
    pub fn record_updates(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        steps: usize,
    ) -> Result<()> {
        for _ in 0..steps {
            self.record_update(encoder)?;
        }
        Ok(())
    }

    /// Records one update and submits it on the queue.
    /// A lost or destroyed device is [`Error::Device`].
    pub fn update(&mut self) -> Result<wgpu::SubmissionIndex> {
        let device = self.device.clone();
        let index = readback::scoped(&device, || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgpu-ema update"),
            });
            self.record_update(&mut encoder)?;
            Ok(self.queue.submit(Some(encoder.finish())))
        })??;
        self.alive.check(&self.device)?;
        Ok(index)
    }

    /// [`Error::Device`] if the device is known to be destroyed or lost (wgpu drops work on
    /// such a device without an error): for callers that submit [`record_update`]'s work
    /// themselves and want to know, after their submit.
    ///
    /// [`record_update`]: Self::record_update
    pub fn check_device(&self) -> Result<()> {
        self.alive.check(&self.device)
    }

    /// Records `shadow = param` for every tensor (restarts the averages from the current
    /// parameters) into the caller's encoder. The step counter is unchanged.
    pub fn record_reset(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.swapped.is_some() {
            return Err(Error::Swapped);
        }
        self.record_pass(encoder, Op::Init, [1.0; MAX_EMAS])
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownName {
                name: name.to_string(),
            })
    }

    /// The tracked tensors, in order (the arena's first).
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|t| t.spec.clone()).collect()
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

    /// The tensors copied and left out (`copy=a,b;exclude=c`, as checkpoints record it;
    /// empty when every tensor is averaged). See [`GpuEmaBuilder::select`].
    pub fn selection(&self) -> &str {
        &self.selection
    }

    /// When updates happen.
    pub fn update_policy(&self) -> Policy {
        self.stepper.policy()
    }

    /// The step counter: calls so far, skipped and copying ones included (the `n` of the
    /// last call recorded; see [`schedule`](crate::schedule)'s "What `n` counts").
    pub fn num_updates(&self) -> u64 {
        self.stepper.num_updates()
    }

    /// Sets the step counter (after restoring a checkpoint): the next update is `n + 1`.
    pub fn set_num_updates(&mut self, n: u64) {
        self.stepper.set_num_updates(n);
    }

    /// How many EMAs one pass updates (1 + the [`extra_ema`](GpuEmaBuilder::extra_ema)s).
    pub fn ema_count(&self) -> usize {
        1 + self.extra.len()
    }

    /// The schedule of EMA `k` (0: the builder's).
    pub fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        match k {
            0 => Some(self.stepper.schedule()),
            _ => self.extra.get(k - 1).copied(),
        }
    }

    /// True when the shadows carry Kahan compensation terms
    /// ([`GpuEmaBuilder::compensated`]).
    pub fn is_compensated(&self) -> bool {
        !self.store.comp.is_empty()
    }

    /// True when `alpha` reaches the shader as an immediate, false on the uniform ring.
    pub fn uses_immediates(&self) -> bool {
        matches!(self.step, StepChannel::Immediates)
    }

    /// The parameter arena, when one is tracked.
    pub fn arena(&self) -> Option<&ParamArena> {
        self.arena.as_ref()
    }

    /// Compute dispatches recorded per step: one per shadow buffer (a binding's worth of
    /// shadows) and group of up to [`param_slots`](Self::param_slots) distinct parameter
    /// buffers (windows of one binding, for buffers larger than that). Zero when every
    /// tracked tensor is empty.
    pub fn dispatches_per_step(&self) -> usize {
        self.work.len()
    }

    /// How many parameter buffers one dispatch reads: the device's
    /// `max_storage_buffers_per_shader_stage` less the EMA's own bindings (chunk table,
    /// shadows, compensation), at most 256.
    pub fn param_slots(&self) -> usize {
        self.work.slots()
    }

    /// The device this EMA records for.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue [`update`](Self::update) submits on.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
}
