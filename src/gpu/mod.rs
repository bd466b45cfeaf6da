//! The EMA on the GPU: [`GpuEma`], built by [`GpuEmaBuilder`].
//!
//! Internals: shadows live in crate-owned buffers. Each step is one compute pass; the work is
//! cut into *segments* (see `layout`), each a bind group made once, so a step only writes the
//! step's `alpha` (an immediate, or a slot of a uniform ring), sets bind groups and
//! dispatches: no GPU resource is created and nothing waits for the host.

mod arena;
mod pipelines;
mod snapshot;

pub use arena::ParamArena;
pub use pipelines::EMA_WGSL;
pub use snapshot::Snapshot;

use std::num::NonZeroU64;

use crate::cpu::Stepper;
use crate::error::{Error, Result};
use crate::layout::{self, Kind, Piece, PlanLimits, SegmentPlan};
use crate::readback;
use crate::schedule::{Action, Numerics, Policy, Schedule};
use crate::tensors::{HostTensors, TensorSpec};
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

/// Configures a [`GpuEma`]: schedule, numerics, and the tensors to track.
///
/// ```no_run
/// # fn main() -> wgpu_ema::Result<()> {
/// use wgpu_ema::{GpuContext, GpuEma, Numerics, Schedule, TensorSpec};
/// let ctx = GpuContext::new()?;
/// # let weight_buf: wgpu::Buffer = unimplemented!();
/// let ema = GpuEma::builder(Schedule::tf(0.9999))
///     .numerics(Numerics::TensorFlow)
///     .track_buffer(TensorSpec::new("weight", [2, 1]), &weight_buf, 0)
///     .build(&ctx.device, &ctx.queue)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GpuEmaBuilder<'a> {
    schedule: Schedule,
    numerics: Numerics,
    policy: Policy,
    compensated: bool,
    extra_emas: Vec<Schedule>,
    num_updates: u64,
    ring_slots: usize,
    prefer_immediates: bool,
    arena: Option<&'a ParamArena>,
    buffers: Vec<(TensorSpec, &'a wgpu::Buffer, u64)>,
}

impl<'a> GpuEmaBuilder<'a> {
    /// The arithmetic ([`Numerics::Exact`] by default).
    pub fn numerics(mut self, numerics: Numerics) -> Self {
        self.numerics = numerics;
        self
    }

    /// When updates happen: a delayed start and an interval ([`Policy`]; default: every call
    /// updates).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Compensated shadows (Kahan summation) for decays close to 1: beside each f32 shadow an
    /// f32 term keeps what the last addition rounded off, so rounding errors stop
    /// accumulating. Costs 4 bytes of memory and 8 bytes of traffic more per element per step
    /// (20 instead of 12). Uses [`Numerics::Exact`]'s form; refused with
    /// [`Numerics::TensorFlow`], whose point is TensorFlow's own rounding.
    pub fn compensated(mut self, yes: bool) -> Self {
        self.compensated = yes;
        self
    }

    /// Keeps one more EMA of the same parameters with its own schedule, updated in the same
    /// pass: each parameter is read once for all of them, so K EMAs move `4 + 8K` bytes per
    /// element per step instead of `12K` for K separate passes. Up to 4 EMAs in all (the
    /// builder's schedule is EMA 0). They share the numerics, the [`Policy`] and the step
    /// counter; read EMA `k` with [`GpuEma::read_ema_blocking`]. Not combined with
    /// [`compensated`](Self::compensated). Swaps and copies into the parameters use EMA 0.
    pub fn extra_ema(mut self, schedule: Schedule) -> Self {
        self.extra_emas.push(schedule);
        self
    }

    /// The step counter's starting value (updates already applied): the first update
    /// recorded with the internal counter is number `n + 1`.
    pub fn num_updates(mut self, n: u64) -> Self {
        self.num_updates = n;
        self
    }

    /// Slots of the uniform ring used where the device lacks `Features::IMMEDIATES`
    /// (default 1024): at most this many steps may be recorded between two submits.
    pub fn ring_slots(mut self, slots: usize) -> Self {
        self.ring_slots = slots.max(1);
        self
    }

    /// Use immediates when the device has them (the default); `false` forces the uniform
    /// ring, as on a device without `Features::IMMEDIATES`.
    pub fn prefer_immediates(mut self, yes: bool) -> Self {
        self.prefer_immediates = yes;
        self
    }

    /// Tracks every tensor of a [`ParamArena`]: the fast path.
    pub fn track_arena(mut self, arena: &'a ParamArena) -> Self {
        self.arena = Some(arena);
        self
    }

    /// Tracks a tensor living in the caller's `buffer` from `byte_offset` (a multiple of 4),
    /// used in place. The buffer needs `BufferUsages::STORAGE`.
    pub fn track_buffer(
        mut self,
        spec: TensorSpec,
        buffer: &'a wgpu::Buffer,
        byte_offset: u64,
    ) -> Self {
        self.buffers.push((spec, buffer, byte_offset));
        self
    }

    /// Allocates the shadows, sets them equal to the parameters on the GPU (one pass,
    /// submitted on `queue`; no host round trip) and returns the EMA.
    ///
    /// Fails, creating nothing on the GPU, on an invalid schedule, duplicate names, a buffer
    /// without `STORAGE`, an offset that is not a multiple of 4, or a range past a buffer's end.
    pub fn build(self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<GpuEma> {
        self.policy.validate()?;
        for s in &self.extra_emas {
            s.validate()?;
        }
        let emas = 1 + self.extra_emas.len();
        if emas > MAX_EMAS {
            return Err(Error::InvalidSchedule(format!(
                "{emas} EMAs asked for; one pass updates at most {MAX_EMAS}"
            )));
        }
        if emas > 1 && self.compensated {
            return Err(Error::InvalidSchedule(
                "several EMAs in one pass cannot also be compensated".into(),
            ));
        }
        if self.compensated && self.numerics == Numerics::TensorFlow {
            return Err(Error::InvalidSchedule(
                "compensated shadows use Numerics::Exact; TensorFlow's mode replays its own rounding"
                    .into(),
            ));
        }
        let stepper = Stepper {
            num_updates: self.num_updates,
            policy: self.policy,
            ..Stepper::new(self.schedule, self.numerics)?
        };
        let lim = PlanLimits::from_device(&device.limits());
        let mut names: Vec<&str> = Vec::new();
        let arena_specs = self.arena.map_or(&[][..], |a| a.specs());
        for name in arena_specs
            .iter()
            .chain(self.buffers.iter().map(|(s, _, _)| s))
            .map(|s| s.name.as_str())
        {
            if names.contains(&name) {
                return Err(Error::DuplicateName { name: name.into() });
            }
            names.push(name);
        }
        for (spec, buffer, offset) in &self.buffers {
            validate_binding(spec, buffer, *offset)?;
        }

        // Shadow placement: the arena's shadows mirror it in one buffer (index 0); each user
        // tensor gets a body and a tail region, packed into further buffers.
        let mut regions = Vec::new();
        for (spec, _, _) in &self.buffers {
            let n = spec.numel();
            regions.push((n - n % 4) * 4);
            regions.push((n % 4) * 4);
        }
        let (places, sizes) =
            layout::pack(&regions, lim.align, lim.max_buffer).map_err(|i| Error::TooLarge {
                what: format!("shadow of tensor `{}`", self.buffers[i / 2].0.name),
                bytes: regions[i],
                limit: lim.max_buffer,
            })?;
        let mut buffer_sizes = Vec::new();
        let first_user_buffer = usize::from(self.arena.is_some());
        if let Some(a) = self.arena {
            buffer_sizes.push(a.size());
        }
        buffer_sizes.extend(sizes);
        let make_buffers = |label: &str| -> Vec<wgpu::Buffer> {
            buffer_sizes
                .iter()
                .map(|&size| {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size,
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_SRC
                            | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                })
                .collect()
        };
        let shadow_buffers = make_buffers("wgpu-ema shadows");
        // The compensation terms mirror the shadows' layout, buffer for buffer.
        let comp_buffers = if self.compensated {
            make_buffers("wgpu-ema compensation")
        } else {
            Vec::new()
        };
        // Further EMAs mirror it too, plus a placeholder for the shader's unused slots.
        let extra_shadows: Vec<Vec<wgpu::Buffer>> = self
            .extra_emas
            .iter()
            .map(|_| make_buffers("wgpu-ema shadows (further EMA)"))
            .collect();
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-ema unused EMA slot"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });

        let immediates = self.prefer_immediates
            && device.features().contains(wgpu::Features::IMMEDIATES)
            && u64::from(device.limits().max_immediate_size) >= STEP_BYTES;
        let pipes = Pipelines::new(device, immediates, self.numerics, self.compensated, emas);
        let step = match &pipes.ring_layout {
            None => StepValues::Immediates,
            Some(ring_layout) => {
                let stride = layout::align_up(
                    STEP_BYTES,
                    u64::from(device.limits().min_uniform_buffer_offset_alignment),
                );
                let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgpu-ema step ring"),
                    size: stride * self.ring_slots as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("wgpu-ema step ring"),
                    layout: ring_layout,
                    entries: &[wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &buffer,
                            offset: 0,
                            size: NonZeroU64::new(STEP_BYTES),
                        }),
                    }],
                });
                StepValues::Ring {
                    buffer,
                    bind_group,
                    stride,
                    slots: self.ring_slots,
                    next: 0,
                }
            }
        };

        let mut ema = GpuEma {
            device: device.clone(),
            queue: queue.clone(),
            stepper,
            lim,
            pipes,
            step,
            tensors: Vec::new(),
            shadow_buffers,
            comp_buffers,
            extra: self.extra_emas.into_iter().zip(extra_shadows).collect(),
            placeholder,
            arena: None,
            arena_segments: Vec::new(),
            rw_segments: None,
            swapped: false,
        };
        if let Some(a) = self.arena {
            let plans = layout::plan_run(0, 0, a.size() / 4, true, &lim);
            ema.arena_segments = ema.make_segments(a.buffer(), 0, &plans, false);
            for (spec, &offset) in a.specs().iter().zip(a.offsets()) {
                ema.tensors.push(Tracked {
                    spec: spec.clone(),
                    source: Source::Arena,
                    pieces: vec![Piece {
                        buffer: 0,
                        offset,
                        len: spec.numel(),
                    }],
                });
            }
            ema.arena = Some(a.clone());
        }
        for (i, (spec, buffer, offset)) in self.buffers.into_iter().enumerate() {
            let n = spec.numel();
            let piece = |k: usize, len: u64| {
                let (b, off) = places[2 * i + k];
                Piece {
                    buffer: first_user_buffer + b,
                    offset: off,
                    len,
                }
            };
            let pieces: Vec<Piece> = [piece(0, n - n % 4), piece(1, n % 4)]
                .into_iter()
                .filter(|p| p.len > 0)
                .collect();
            let segments = ema.tensor_segments(&pieces, buffer, offset, false);
            ema.tensors.push(Tracked {
                spec,
                source: Source::Buffer {
                    buffer: buffer.clone(),
                    offset,
                    segments,
                    cache: Vec::new(),
                },
                pieces,
            });
        }
        // shadows := params, on the GPU.
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("wgpu-ema init"),
        });
        ema.record_pass(&mut encoder, Op::Init, [1.0; MAX_EMAS]);
        queue.submit(Some(encoder.finish()));
        Ok(ema)
    }
}

fn validate_binding(spec: &TensorSpec, buffer: &wgpu::Buffer, offset: u64) -> Result<()> {
    let usage = buffer.usage();
    if !usage.contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::MissingUsage {
            name: spec.name.clone(),
            needed: wgpu::BufferUsages::STORAGE,
            have: usage,
        });
    }
    if !offset.is_multiple_of(4) {
        return Err(Error::Misaligned {
            name: spec.name.clone(),
            offset,
        });
    }
    let end = spec
        .numel()
        .checked_mul(4)
        .and_then(|b| b.checked_add(offset))
        .unwrap_or(u64::MAX);
    if end > buffer.size() {
        return Err(Error::OutOfBounds {
            name: spec.name.clone(),
            offset,
            end,
            buffer_size: buffer.size(),
        });
    }
    Ok(())
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
        GpuEmaBuilder {
            schedule,
            numerics: Numerics::Exact,
            policy: Policy::default(),
            compensated: false,
            extra_emas: Vec::new(),
            num_updates: 0,
            ring_slots: 1024,
            prefer_immediates: true,
            arena: None,
            buffers: Vec::new(),
        }
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
        rw: bool,
    ) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut done = 0;
        for piece in pieces {
            let plans =
                layout::plan_run(offset + done * 4, piece.offset, piece.len, true, &self.lim);
            out.extend(self.make_segments(params, piece.buffer, &plans, rw));
            done += piece.len;
        }
        out
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
            if let Source::Buffer { buffer, offset, .. } = &t.source {
                all.extend(self.tensor_segments(&t.pieces, buffer, *offset, true));
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
        for kind in [Kind::Vec4, Kind::Scalar] {
            let segs: Box<dyn Iterator<Item = &Segment>> = if op.writes_params() {
                Box::new(self.rw_segments.iter().flatten())
            } else {
                Box::new(self.segments())
            };
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

    /// Records an exchange of every parameter with its shadow, on the GPU in one pass:
    /// evaluate with the EMA weights, then call it again to get the raw weights (and the
    /// shadows) back **bit for bit** (bits are moved, not added and subtracted as Keras'
    /// `SwapEMAWeights` does). While swapped, updates are refused with [`Error::Swapped`]: a
    /// training step would average the shadows into themselves.
    pub fn record_swap(&mut self, encoder: &mut wgpu::CommandEncoder) {
        self.record_pass(encoder, Op::Swap, [1.0; MAX_EMAS]);
        self.swapped = !self.swapped;
    }

    /// [`record_swap`](Self::record_swap), submitted on the queue.
    pub fn swap(&mut self) -> wgpu::SubmissionIndex {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgpu-ema swap"),
            });
        self.record_swap(&mut encoder);
        self.queue.submit(Some(encoder.finish()))
    }

    /// True between two swaps: the parameters hold the EMA weights.
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Records `param = shadow` for every tensor (TensorFlow's `variables_to_restore` on the
    /// GPU, diffusers' `copy_to`): the raw parameters are overwritten; keep them with
    /// [`record_swap`](Self::record_swap) instead if training goes on.
    pub fn record_copy_to_params(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        self.record_pass(encoder, Op::ToParams, [1.0; MAX_EMAS]);
        Ok(())
    }

    /// Points tracked tensor `name` at another buffer and offset (frameworks such as burn hand
    /// out a new one after each optimizer step). Bind groups are cached for the last few
    /// (buffer, offset) pairs of each tensor, so alternating between buffers creates nothing.
    /// Arena tensors cannot be rebound.
    pub fn rebind(&mut self, name: &str, buffer: &wgpu::Buffer, byte_offset: u64) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        let i = self.index(name)?;
        validate_binding(&self.tensors[i].spec, buffer, byte_offset)?;
        let t = &self.tensors[i];
        let Source::Buffer {
            buffer: cur_buf,
            offset: cur_off,
            cache,
            ..
        } = &t.source
        else {
            return Err(Error::NotRebindable {
                name: name.to_string(),
            });
        };
        if cur_buf == buffer && *cur_off == byte_offset {
            return Ok(());
        }
        let hit = cache
            .iter()
            .position(|(b, o, _)| b == buffer && *o == byte_offset);
        let new_segments = match hit {
            Some(_) => None,
            None => Some(self.tensor_segments(&t.pieces, buffer, byte_offset, false)),
        };
        let Source::Buffer {
            buffer: cur_buf,
            offset: cur_off,
            segments,
            cache,
        } = &mut self.tensors[i].source
        else {
            unreachable!("checked above");
        };
        let incoming = match (hit, new_segments) {
            (Some(h), _) => cache.remove(h).2,
            (None, Some(s)) => s,
            (None, None) => Vec::new(),
        };
        let old = std::mem::replace(segments, incoming);
        let old_buf = std::mem::replace(cur_buf, buffer.clone());
        cache.push((old_buf, *cur_off, old));
        if cache.len() > REBIND_CACHE {
            cache.remove(0);
        }
        *cur_off = byte_offset;
        self.rw_segments = None;
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

    fn ranges<'s>(
        &'s self,
        buffers: &'s [wgpu::Buffer],
        which: &[usize],
    ) -> Vec<readback::Range<'s>> {
        which
            .iter()
            .flat_map(|&i| self.tensors[i].pieces.iter())
            .map(|p| readback::Range {
                buffer: &buffers[p.buffer],
                offset: p.offset,
                len: p.len,
            })
            .collect()
    }

    fn start_read(&self, which: &[usize]) -> readback::Pending {
        readback::start(
            &self.device,
            &self.queue,
            &self.ranges(&self.shadow_buffers, which),
        )
    }

    /// How many EMAs one pass updates (1 + the [`extra_ema`](GpuEmaBuilder::extra_ema)s).
    pub fn ema_count(&self) -> usize {
        1 + self.extra.len()
    }

    /// The schedule of EMA `k` (0: the builder's).
    pub fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        match k {
            0 => Some(self.stepper.schedule),
            _ => self.extra.get(k - 1).map(|(s, _)| *s),
        }
    }

    fn ema_buffers(&self, k: usize) -> Result<&[wgpu::Buffer]> {
        match k {
            0 => Ok(&self.shadow_buffers),
            _ => self
                .extra
                .get(k - 1)
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| Error::UnknownName {
                    name: format!("EMA number {k} (there are {})", self.ema_count()),
                }),
        }
    }

    /// Reads every shadow of EMA `k` back, blocking (`k = 0` is
    /// [`read_shadows_blocking`](Self::read_shadows_blocking)).
    pub fn read_ema_blocking(&self, k: usize) -> Result<HostTensors> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let ranges = self.ranges(self.ema_buffers(k)?, &all);
        let flat = readback::start(&self.device, &self.queue, &ranges).wait(&self.device)?;
        Ok(arena::split(&self.specs(), &flat))
    }

    /// Overwrites the shadow of `name` in EMA `k` (restoring a checkpoint).
    pub fn write_ema_shadow(&mut self, k: usize, name: &str, values: &[f32]) -> Result<()> {
        if k == 0 {
            return self.write_shadow(name, values);
        }
        let i = self.index(name)?;
        let spec = &self.tensors[i].spec;
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: spec.numel(),
                got: values.len() as u64,
            });
        }
        self.write_pieces(self.ema_buffers(k)?, i, values);
        Ok(())
    }

    /// Reads every shadow back, blocking until the steps submitted so far have run (not
    /// those submitted later). Names are the parameters' names.
    pub fn read_shadows_blocking(&self) -> Result<HostTensors> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let flat = self.start_read(&all).wait(&self.device)?;
        Ok(arena::split(&self.specs(), &flat))
    }

    /// Reads the shadow of `name` back, blocking.
    pub fn read_shadow_blocking(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.index(name)?;
        self.start_read(&[i]).wait(&self.device)
    }

    /// Reads every shadow back, asynchronously: the copy is submitted at once and the future
    /// resolves once the GPU has run it. On native targets something must poll the device
    /// meanwhile (`device.poll(wgpu::PollType::Poll)` in your loop, or a thread waiting);
    /// [`read_shadows_blocking`](Self::read_shadows_blocking) does it for you.
    pub fn read_shadows(&self) -> impl std::future::Future<Output = Result<HostTensors>> + use<> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let pending = self.start_read(&all);
        let specs = self.specs();
        async move {
            let flat = pending.finish().await?;
            Ok(arena::split(&specs, &flat))
        }
    }

    /// Overwrites the shadow of `name` from the host (restoring a checkpoint); lands at the
    /// next submit on the queue, before that submit's commands.
    pub fn write_shadow(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let i = self.index(name)?;
        let spec = &self.tensors[i].spec;
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: spec.numel(),
                got: values.len() as u64,
            });
        }
        self.write_pieces(&self.shadow_buffers, i, values);
        // The old compensation term belongs to the old shadow.
        if !self.comp_buffers.is_empty() {
            let zeros = vec![0.0f32; values.len()];
            self.write_pieces(&self.comp_buffers, i, &zeros);
        }
        Ok(())
    }

    fn write_pieces(&self, buffers: &[wgpu::Buffer], i: usize, values: &[f32]) {
        let mut at = 0usize;
        for p in &self.tensors[i].pieces {
            let part = &values[at..at + p.len as usize];
            self.queue
                .write_buffer(&buffers[p.buffer], p.offset, bytemuck::cast_slice(part));
            at += p.len as usize;
        }
    }

    /// True when the shadows carry Kahan compensation terms
    /// ([`GpuEmaBuilder::compensated`]).
    pub fn is_compensated(&self) -> bool {
        !self.comp_buffers.is_empty()
    }

    /// Overwrites the compensation term of `name` (restoring a checkpoint of a compensated
    /// EMA; call after [`write_shadow`](Self::write_shadow), which zeroes it).
    pub fn write_compensation(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let i = self.index(name)?;
        let spec = &self.tensors[i].spec;
        if values.len() as u64 != spec.numel() || self.comp_buffers.is_empty() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: if self.comp_buffers.is_empty() {
                    0
                } else {
                    spec.numel()
                },
                got: values.len() as u64,
            });
        }
        self.write_pieces(&self.comp_buffers, i, values);
        Ok(())
    }

    /// Restores shadows and the step counter from a training checkpoint, so the next updates
    /// continue exactly as if training had never stopped. Every tracked tensor's shadow must be
    /// present with its shape, and no shadow of an untracked tensor may be; all is checked
    /// before anything is written. Parameters are restored with
    /// [`write_params`](Self::write_params) (`checkpoint.params_for(&ema.specs())`).
    pub fn restore(&mut self, checkpoint: &crate::checkpoint::Checkpoint) -> Result<()> {
        let shadows = checkpoint.shadows_for(&self.specs())?;
        let n = checkpoint.num_updates()?;
        let comps = if self.is_compensated() {
            checkpoint.compensation_for(&self.specs())?
        } else {
            None
        };
        for (spec, values) in shadows.iter() {
            self.write_shadow(&spec.name, values)?;
        }
        for (spec, values) in comps.iter().flat_map(|c| c.iter()) {
            self.write_compensation(&spec.name, values)?;
        }
        self.stepper.num_updates = n;
        Ok(())
    }

    /// Writes parameter values from the host into the tracked parameters (the arena, or user
    /// buffers, which then need `BufferUsages::COPY_DST`). Every name and length is checked
    /// before anything is written. Lands at the next submit on the queue.
    pub fn write_params(&self, params: &HostTensors) -> Result<()> {
        let mut writes = Vec::new();
        for (spec, values) in params.iter() {
            let t = &self.tensors[self.index(&spec.name)?];
            if values.len() as u64 != t.spec.numel() {
                return Err(Error::LengthMismatch {
                    name: spec.name.clone(),
                    expected: t.spec.numel(),
                    got: values.len() as u64,
                });
            }
            let (buffer, offset) = match &t.source {
                Source::Arena => {
                    let arena = self.arena.as_ref().expect("arena tensors imply an arena");
                    (arena.buffer(), t.pieces[0].offset)
                }
                Source::Buffer { buffer, offset, .. } => (buffer, *offset),
            };
            if !buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(Error::MissingUsage {
                    name: spec.name.clone(),
                    needed: wgpu::BufferUsages::COPY_DST,
                    have: buffer.usage(),
                });
            }
            writes.push((buffer, offset, values));
        }
        for (buffer, offset, values) in writes {
            if !values.is_empty() {
                self.queue
                    .write_buffer(buffer, offset, bytemuck::cast_slice(values));
            }
        }
        Ok(())
    }

    /// A binding of the shadow of `name`, for your own shaders (evaluating with the EMA
    /// weights on the GPU without copying them). Available when the shadow is one contiguous
    /// run: arena tensors, and user-buffer tensors whose element count is below 4 or a
    /// multiple of 4 (others keep their last `n % 4` elements apart, for the vec4 kernel).
    pub fn shadow_binding(&self, name: &str) -> Result<wgpu::BufferBinding<'_>> {
        let t = &self.tensors[self.index(name)?];
        match t.pieces.as_slice() {
            [] => Err(Error::LengthMismatch {
                name: name.to_string(),
                expected: 1,
                got: 0,
            }),
            [p] => Ok(wgpu::BufferBinding {
                buffer: &self.shadow_buffers[p.buffer],
                offset: p.offset,
                size: NonZeroU64::new(p.len * 4),
            }),
            _ => Err(Error::NotContiguous {
                name: name.to_string(),
            }),
        }
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
