//! The EMA on the GPU: [`GpuEma`], built by [`GpuEmaBuilder`].
//!
//! Internals: shadows live in crate-owned buffers. Each step is one compute pass; the work is
//! cut into *segments* (see `layout`), each a bind group made once, so a step only writes the
//! step's `alpha` (an immediate, or a slot of a uniform ring), sets bind groups and
//! dispatches: no GPU resource is created and nothing waits for the host.

mod arena;
mod builder;
mod eval;
mod io;
mod pipelines;
mod snapshot;

pub use arena::ParamArena;
pub use builder::GpuEmaBuilder;
pub use pipelines::EMA_WGSL;
pub use snapshot::Snapshot;

use std::num::NonZeroU64;

use crate::cpu::Stepper;
use crate::error::{Error, Result};
use crate::layout::{self, Kind, Piece, PlanLimits, SegmentPlan};
use crate::readback;
use crate::schedule::{Action, Numerics, Policy, Schedule};
use crate::tensors::{HostTensors, ParamDtype, TensorSpec};
use pipelines::{Op, Pipelines, MAX_EMAS, STEP_BYTES};

/// How many (buffer, offset) bindings per tensor [`GpuEma::rebind`] keeps bind groups for.
const REBIND_CACHE: usize = 8;

/// A bind group and the workgroups it dispatches.
#[derive(Debug)]
struct Segment {
    bind_group: wgpu::BindGroup,
    kind: Kind,
    groups: (u32, u32),
}

#[derive(Debug)]
enum Source {
    /// In the arena, at this byte offset.
    Arena,
    /// In a user buffer at a byte offset; segments are this tensor's own.
    Buffer {
        buffer: wgpu::Buffer,
        offset: u64,
        dtype: ParamDtype,
        segments: Vec<Segment>,
        /// Segments for bindings seen before, most recent last.
        cache: Vec<(wgpu::Buffer, u64, Vec<Segment>)>,
    },
}

#[derive(Debug)]
struct Tracked {
    spec: TensorSpec,
    source: Source,
    /// Where the shadow lives: one piece, or for user buffers a vec4 body and a tail of
    /// `numel % 4` elements, each starting at a storage-aligned offset.
    pieces: Vec<Piece>,
}

#[derive(Debug)]
enum StepValues {
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
/// The device and queue are the caller's (clones of the handles are kept).
#[derive(Debug)]
pub struct GpuEma {
    device: wgpu::Device,
    queue: wgpu::Queue,
    stepper: Stepper,
    lim: PlanLimits,
    pipes: Pipelines,
    step: StepValues,
    tensors: Vec<Tracked>,
    shadow_buffers: Vec<wgpu::Buffer>,
    /// Kahan compensation terms, laid out as `shadow_buffers`; empty when not compensated.
    comp_buffers: Vec<wgpu::Buffer>,
    /// Further EMAs updated in the same pass: schedule and shadows (laid out as
    /// `shadow_buffers`).
    extra: Vec<(Schedule, Vec<wgpu::Buffer>)>,
    /// Bound to the shader's unused EMA slots.
    placeholder: wgpu::Buffer,
    arena: Option<ParamArena>,
    arena_segments: Vec<Segment>,
    rw_segments: Option<Vec<Segment>>,
    swapped: bool,
}

impl GpuEma {
    /// Starts configuring an EMA with this schedule.
    pub fn builder<'a>(schedule: Schedule) -> GpuEmaBuilder<'a> {
        GpuEmaBuilder::new(schedule)
    }

    fn make_segments(
        &self,
        params: &wgpu::Buffer,
        shadow_index: usize,
        plans: &[SegmentPlan],
        rw: bool,
    ) -> Vec<Segment> {
        let shadows = &self.shadow_buffers[shadow_index];
        let multi = !rw && !self.extra.is_empty();
        // Updates and copies of a compensated EMA bind the compensation terms too.
        let comp = if rw {
            None
        } else {
            self.comp_buffers.get(shadow_index)
        };
        let layout = if rw {
            &self.pipes.segment_layout_rw
        } else {
            &self.pipes.segment_layout
        };
        plans
            .iter()
            .map(|p| {
                let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("wgpu-ema segment"),
                    layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: params,
                                offset: p.param_offset,
                                size: NonZeroU64::new(p.param_size),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: shadows,
                                offset: p.shadow_offset,
                                size: NonZeroU64::new(p.count * 4),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: self.slot_binding(comp, 0, shadow_index, p),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: self.slot_binding(None, 1, shadow_index, p),
                        },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: self.slot_binding(None, 2, shadow_index, p),
                        },
                    ][..if multi {
                        5
                    } else if comp.is_some() {
                        3
                    } else {
                        2
                    }],
                });
                Segment {
                    bind_group,
                    kind: p.kind,
                    groups: p.groups(),
                }
            })
            .collect()
    }

    /// Binding 2 + `extra` of a segment: the compensation terms (`comp`), or the shadows of
    /// further EMA number `extra`, or the placeholder where that EMA does not exist.
    fn slot_binding<'s>(
        &'s self,
        comp: Option<&'s wgpu::Buffer>,
        extra: usize,
        shadow_index: usize,
        p: &SegmentPlan,
    ) -> wgpu::BindingResource<'s> {
        let buffer = comp.or_else(|| self.extra.get(extra).map(|(_, b)| &b[shadow_index]));
        match buffer {
            Some(buffer) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: p.shadow_offset,
                size: NonZeroU64::new(p.count * 4),
            }),
            None => self.placeholder.as_entire_binding(),
        }
    }

    fn tensor_segments(
        &self,
        pieces: &[Piece],
        params: &wgpu::Buffer,
        offset: u64,
        dtype: ParamDtype,
        rw: bool,
    ) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut done = 0;
        for piece in pieces {
            let at = offset + done * dtype.size();
            let plans = match dtype {
                ParamDtype::F32 => layout::plan_run(at, piece.offset, piece.len, true, &self.lim),
                ParamDtype::F16 => {
                    layout::plan_run_half(at, piece.offset, piece.len, Kind::F16, &self.lim)
                }
                ParamDtype::BF16 => {
                    layout::plan_run_half(at, piece.offset, piece.len, Kind::BF16, &self.lim)
                }
            };
            out.extend(self.make_segments(params, piece.buffer, &plans, rw));
            done += piece.len;
        }
        out
    }

    /// The first tracked tensor with 16-bit parameters, which swaps and copies into the
    /// parameters do not support.
    fn half_tensor(&self) -> Option<&str> {
        self.tensors.iter().find_map(|t| match &t.source {
            Source::Buffer { dtype, .. } if *dtype != ParamDtype::F32 => Some(t.spec.name.as_str()),
            _ => None,
        })
    }

    /// Makes the segments with the parameters bound read-write, on the first swap or copy
    /// into the parameters; they are kept until a rebind.
    fn ensure_rw_segments(&mut self) {
        if self.rw_segments.is_some() {
            return;
        }
        let mut all = Vec::new();
        if let Some(a) = &self.arena {
            let plans = layout::plan_run(0, 0, a.size() / 4, true, &self.lim);
            all.extend(self.make_segments(a.buffer(), 0, &plans, true));
        }
        for t in &self.tensors {
            if let Source::Buffer {
                buffer,
                offset,
                dtype,
                ..
            } = &t.source
            {
                all.extend(self.tensor_segments(&t.pieces, buffer, *offset, *dtype, true));
            }
        }
        self.rw_segments = Some(all);
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.arena_segments
            .iter()
            .chain(self.tensors.iter().flat_map(|t| match &t.source {
                Source::Arena => &[][..],
                Source::Buffer { segments, .. } => segments.as_slice(),
            }))
    }

    /// Records one pass of `op`; `alphas` (one per EMA) are used by `Op::Update` only.
    fn record_pass(&mut self, encoder: &mut wgpu::CommandEncoder, op: Op, alphas: [f32; MAX_EMAS]) {
        if op.writes_params() {
            self.ensure_rw_segments();
        }
        let bytes = pipelines::step_bytes(alphas);
        let ring_offset = match &mut self.step {
            StepValues::Immediates => None,
            StepValues::Ring {
                buffer,
                stride,
                slots,
                next,
                ..
            } => {
                let off = (*next % *slots) as u64 * *stride;
                *next = (*next + 1) % *slots;
                self.queue.write_buffer(buffer, off, &bytes);
                Some(off as u32)
            }
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(match op {
                Op::Update => "wgpu-ema update",
                Op::Init => "wgpu-ema init",
                Op::Swap => "wgpu-ema swap",
                Op::ToParams => "wgpu-ema shadows to params",
            }),
            timestamp_writes: None,
        });
        for kind in [Kind::Vec4, Kind::Scalar, Kind::F16, Kind::BF16] {
            // Either the read-write segments or the update ones; chained so that a step
            // allocates nothing on the host either.
            let rw = op.writes_params();
            let segs = (self.rw_segments.iter().flatten().filter(|_| rw))
                .chain(self.segments().filter(|_| !rw));
            let mut segs = segs.filter(|s| s.kind == kind).peekable();
            if segs.peek().is_none() {
                continue;
            }
            pass.set_pipeline(self.pipes.get(op, kind));
            match (&self.step, ring_offset) {
                (StepValues::Ring { bind_group, .. }, Some(off)) => {
                    pass.set_bind_group(1, bind_group, &[off]);
                }
                _ => pass.set_immediates(0, &bytes),
            }
            for s in segs {
                pass.set_bind_group(0, &s.bind_group, &[]);
                pass.dispatch_workgroups(s.groups.0, s.groups.1, 1);
            }
        }
    }

    /// Records one update into the caller's encoder, as update number `num_updates() + 1`.
    ///
    /// Several steps may be recorded into one encoder before one submit: each gets its own
    /// `alpha` (an immediate recorded in the pass, or on devices without
    /// `Features::IMMEDIATES` its own uniform ring slot; at most
    /// [`ring_slots`](GpuEmaBuilder::ring_slots) steps between two submits then).
    pub fn record_update(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        let n = self.stepper.num_updates.saturating_add(1);
        self.record_update_at(encoder, n)
    }

    /// Records one update as update number `n`: the caller's global step, as TensorFlow reads
    /// its `num_updates` variable. The internal counter becomes `n`.
    ///
    /// Under a [`Policy`], a call before `update_after_step` records the exact copy
    /// `shadow = param`, and a call between two updates of `update_every` records nothing.
    pub fn record_update_at(&mut self, encoder: &mut wgpu::CommandEncoder, n: u64) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        // Every EMA's alpha first, so that an invalid schedule changes nothing.
        let k = n.saturating_sub(self.stepper.policy.update_after_step);
        let mut alphas = [1.0f32; MAX_EMAS];
        for (slot, (schedule, _)) in alphas[1..].iter_mut().zip(&self.extra) {
            *slot = schedule.alpha(k, self.stepper.numerics)?;
        }
        match self.stepper.advance_to(n)? {
            Action::Skip => {}
            Action::Copy => self.record_pass(encoder, Op::Init, [1.0; MAX_EMAS]),
            Action::Update(alpha) => {
                alphas[0] = alpha;
                self.record_pass(encoder, Op::Update, alphas)
            }
        }
        Ok(())
    }

    /// Records `steps` updates (numbers `num_updates() + 1 ..= num_updates() + steps`) into
    /// one encoder. On the uniform-ring path, more steps than ring slots is
    /// [`Error::RingFull`].
    pub fn record_updates(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        steps: usize,
    ) -> Result<()> {
        if let StepValues::Ring { slots, .. } = self.step {
            if steps > slots {
                return Err(Error::RingFull { steps, slots });
            }
        }
        for _ in 0..steps {
            self.record_update(encoder)?;
        }
        Ok(())
    }

    /// Records one update and submits it on the queue.
    pub fn update(&mut self) -> Result<wgpu::SubmissionIndex> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgpu-ema update"),
            });
        self.record_update(&mut encoder)?;
        Ok(self.queue.submit(Some(encoder.finish())))
    }

    /// Records `shadow = param` for every tensor (restarts the averages from the current
    /// parameters) into the caller's encoder. The step counter is unchanged.
    pub fn record_reset(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        self.record_pass(encoder, Op::Init, [1.0; MAX_EMAS]);
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.tensors
            .iter()
            .position(|t| t.spec.name == name)
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
        self.stepper.schedule
    }

    /// The numerics.
    pub fn numerics(&self) -> Numerics {
        self.stepper.numerics
    }

    /// When updates happen.
    pub fn update_policy(&self) -> Policy {
        self.stepper.policy
    }

    /// Updates applied so far: the `n` of the last update recorded.
    pub fn num_updates(&self) -> u64 {
        self.stepper.num_updates
    }

    /// Sets the step counter (after restoring a checkpoint): the next update is `n + 1`.
    pub fn set_num_updates(&mut self, n: u64) {
        self.stepper.num_updates = n;
    }

    /// True when `alpha` reaches the shader as an immediate, false on the uniform ring.
    pub fn uses_immediates(&self) -> bool {
        matches!(self.step, StepValues::Immediates)
    }

    /// The parameter arena, when one is tracked.
    pub fn arena(&self) -> Option<&ParamArena> {
        self.arena.as_ref()
    }

    /// Compute dispatches recorded per step (one per binding-sized segment).
    pub fn dispatches_per_step(&self) -> usize {
        self.segments().count()
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
