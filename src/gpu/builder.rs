//! Configuring and building a [`GpuEma`]: validation, shadow placement, pipelines, the
//! initial copy.

use std::num::NonZeroU64;

use super::bindings;
use super::*;
use crate::plan::{self, ItemMap, Plan};
use crate::select::Mode;
use crate::shader::{self, Shape, STEP_BYTES};

/// The most parameter bindings one dispatch selects between (the `switch` in the shader
/// grows with it).
const MAX_SLOTS: usize = 256;

/// A configuration checked and its tensors resolved, before anything exists on the GPU.
pub(crate) struct Resolved {
    pub stepper: Stepper,
    /// EMAs kept (1 + the extra ones).
    pub emas: usize,
    /// The schedule is BEMA.
    pub bema: bool,
    /// Every tracked tensor: spec, where its parameters are, and whether the arena holds it.
    pub all: Vec<(TensorSpec, ParamBinding<wgpu::Buffer>, bool)>,
    pub names: HashMap<String, usize>,
    /// The selection as checkpoints record it.
    pub selection: String,
}

/// How the update spreads a step's elements over the shader's invocations
/// ([`GpuEmaBuilder::tiling`]). Every choice computes the same bits; they differ in speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tiling {
    /// [`Tiling::Software`] on adapters wgpu reports as `DeviceType::Cpu` (lavapipe,
    /// llvmpipe, SwiftShader through Vulkan; in a browser, a WebGPU fallback adapter such as
    /// Chromium's SwiftShader), [`Tiling::Gpu`] elsewhere.
    #[default]
    Auto,
    /// 16 elements per invocation; at each of its 4 steps, neighbouring invocations take
    /// neighbouring elements (coalesced loads), and large tensors get many workgroups.
    Gpu,
    /// 128 elements per invocation; each 4 neighbouring invocations take one contiguous
    /// block. A CPU runs a workgroup on one core a few invocations at a time: this pays the
    /// shader's per-invocation set-up over more elements and keeps each core's reads
    /// sequential.
    Software,
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
    param_slots: Option<usize>,
    tiling: Tiling,
    prefer_immediates: bool,
    arena: Option<&'a ParamArena>,
    buffers: Vec<(TensorSpec, ParamBinding<wgpu::Buffer>)>,
    selection: crate::select::Selection,
}

impl<'a> GpuEmaBuilder<'a> {
    pub(super) fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            numerics: Numerics::Exact,
            policy: Policy::default(),
            compensated: false,
            extra_emas: Vec::new(),
            num_updates: 0,
            ring_slots: 1024,
            param_slots: None,
            tiling: Tiling::Auto,
            prefer_immediates: true,
            arena: None,
            buffers: Vec::new(),
            selection: crate::select::Selection::new(),
        }
    }

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

    /// Which tracked tensors are copied (their shadows take the parameters' values exactly on
    /// every update: running statistics) or left out (not tracked at all), by name patterns;
    /// every other tensor is averaged. Applied at [`build`](Self::build), over the arena's
    /// tensors and the buffers' alike; a pattern that matches nothing, or a tensor both copied
    /// and excluded, is an error there. Checkpoints record the selection, and a restore into an
    /// EMA of another selection is refused.
    ///
    /// ```no_run
    /// # fn demo(ctx: &wgpu_ema::GpuContext, arena: &wgpu_ema::ParamArena) -> wgpu_ema::Result<()> {
    /// use wgpu_ema::{select::Selection, GpuEma, Schedule};
    /// let ema = GpuEma::builder(Schedule::constant(0.999))
    ///     .select(Selection::new().copy("*.running_*").exclude("*.num_batches_tracked"))
    ///     .track_arena(arena)
    ///     .build(&ctx.device, &ctx.queue)?;
    /// # let _ = ema; Ok(()) }
    /// ```
    pub fn select(mut self, selection: crate::select::Selection) -> Self {
        self.selection = selection;
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

    /// The step counter's starting value (calls already made): the first call
    /// recorded with the internal counter is number `n + 1`.
    pub fn num_updates(mut self, n: u64) -> Self {
        self.num_updates = n;
        self
    }

    /// Slots of the uniform ring used where the device lacks `Features::IMMEDIATES`
    /// (default 1024). Each step takes the next slot; a used-up ring is replaced by a fresh one
    /// (one small buffer per `slots` steps), never rewritten, so any number of steps may be
    /// recorded between submits.
    pub fn ring_slots(mut self, slots: usize) -> Self {
        self.ring_slots = slots.max(1);
        self
    }

    /// At most this many distinct parameter buffers (or windows of buffers larger than one
    /// binding) per dispatch: a step is one dispatch per shadow buffer and group of this many.
    /// Clamped to what the device binds: `max_storage_buffers_per_shader_stage` less the EMA's
    /// own bindings (chunk table, shadows, compensation), and 256.
    ///
    /// Default: that maximum on GPUs; 1 on software devices (`DeviceType::Cpu`: lavapipe,
    /// llvmpipe), which run a divergent `switch` case by case, so that reading 29 buffers in
    /// one dispatch costs them several times 29 dispatches.
    pub fn param_slots(mut self, slots: usize) -> Self {
        self.param_slots = Some(slots);
        self
    }

    /// How a step's elements are spread over the shader's invocations ([`Tiling::Auto`] by
    /// default: chosen by the adapter's device type). Results are the same bits either way;
    /// only speed differs.
    pub fn tiling(mut self, tiling: Tiling) -> Self {
        self.tiling = tiling;
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
    pub fn track_buffer(self, spec: TensorSpec, buffer: &wgpu::Buffer, byte_offset: u64) -> Self {
        self.track_buffer_as(spec, buffer, byte_offset, ParamDtype::F32)
    }

    /// Tracks a tensor of f16 or bf16 parameters (or f32: [`track_buffer`](Self::track_buffer))
    /// in the caller's `buffer` from `byte_offset`, a multiple of 4 for every dtype (so that
    /// the shader reads whole u32 words; the buffer must hold the word containing the last
    /// element). Shadows are f32. Such tensors take plain updates and copies (no
    /// compensation, no several EMAs in one pass); swaps and copies into the parameters are
    /// refused with [`Error::HalfPrecision`].
    pub fn track_buffer_as(
        mut self,
        spec: TensorSpec,
        buffer: &wgpu::Buffer,
        byte_offset: u64,
        dtype: ParamDtype,
    ) -> Self {
        self.buffers
            .push((spec, param_binding(buffer, byte_offset, dtype)));
        self
    }

    /// Validates the configuration and resolves the tracked tensors (the arena's first, the
    /// selection applied), creating nothing: the part of building shared by [`build`] and
    /// [`build_offloaded`].
    ///
    /// [`build`]: Self::build
    /// [`build_offloaded`]: Self::build_offloaded
    fn resolve(&self, device: &wgpu::Device) -> Result<Resolved> {
        for s in &self.extra_emas {
            s.validate()?;
        }
        let emas = 1 + self.extra_emas.len();
        if emas > MAX_EMAS {
            return Err(Error::InvalidConfig(format!(
                "{emas} EMAs asked for; one pass updates at most {MAX_EMAS}"
            )));
        }
        let bema = self.schedule.as_bema().is_some();
        if bema && (emas > 1 || self.compensated) {
            return Err(Error::InvalidConfig(
                "a BEMA EMA is one EMA, not compensated (its anchor and weights sit beside \
                 one set of shadows)"
                    .into(),
            ));
        }
        if self.extra_emas.iter().any(|s| s.as_bema().is_some()) {
            return Err(Error::InvalidConfig(
                "BEMA is the first EMA's schedule only: give it to GpuEma::builder".into(),
            ));
        }
        if emas > 1 && self.compensated {
            return Err(Error::InvalidConfig(
                "several EMAs in one pass cannot also be compensated".into(),
            ));
        }
        if self.compensated && self.numerics == Numerics::TensorFlow {
            return Err(Error::InvalidConfig(
                "compensated shadows use Numerics::Exact; TensorFlow's mode replays its own rounding"
                    .into(),
            ));
        }
        let stepper = Stepper::new(self.schedule, self.numerics, self.policy, self.num_updates)?;
        // Every tensor as (spec, binding, in arena): the arena's first.
        let mut all: Vec<(TensorSpec, ParamBinding<wgpu::Buffer>, bool)> = Vec::new();
        if let Some(a) = self.arena {
            for (spec, &offset) in a.specs().iter().zip(a.offsets()) {
                let binding = param_binding(a.buffer(), offset, ParamDtype::F32);
                all.push((spec.clone(), binding, true));
            }
        }
        for (spec, b) in self.buffers.iter().cloned() {
            bindings::validate_binding(&spec, &b.buffer, b.offset, b.dtype)?;
            all.push((spec, b, false));
        }
        // The selection: excluded tensors leave, copied ones follow their parameters.
        let modes = self
            .selection
            .resolve(all.iter().map(|(s, ..)| s.name.as_str()))?;
        let selection = crate::select::describe(
            all.iter()
                .map(|(s, ..)| s.name.as_str())
                .zip(modes.iter().copied()),
        );
        let all: Vec<_> = all
            .into_iter()
            .zip(modes)
            .filter_map(|((spec, mut b, in_arena), mode)| match mode {
                Mode::Exclude => None,
                Mode::Copy => {
                    b.follow = true;
                    Some((spec, b, in_arena))
                }
                Mode::Average => Some((spec, b, in_arena)),
            })
            .collect();
        let mut names = HashMap::with_capacity(all.len());
        for (i, (spec, ..)) in all.iter().enumerate() {
            if names.insert(spec.name.clone(), i).is_some() {
                return Err(Error::DuplicateName {
                    name: spec.name.clone(),
                });
            }
        }
        // Another device's buffer is an error here, not a panic inside wgpu later (once per
        // buffer: many tensors share one).
        let mut checked: Vec<&wgpu::Buffer> = Vec::new();
        for (spec, b, _) in &all {
            if !checked.contains(&&b.buffer) {
                super::device::check_same_device(device, &spec.name, &b.buffer)?;
                checked.push(&b.buffer);
            }
        }
        crate::names::check_names(
            all.iter().map(|(s, ..)| s.name.as_str()),
            emas,
            self.compensated,
        )?;
        super::overlaps::check(
            all.iter()
                .map(|(spec, b, _)| (spec, &b.buffer, b.offset, b.dtype)),
        )?;
        Ok(Resolved {
            stepper,
            emas,
            bema,
            all,
            names,
            selection,
        })
    }

    /// Allocates the shadows, sets them equal to the parameters on the GPU (one pass,
    /// submitted on `queue`; no host round trip) and returns the EMA.
    ///
    /// Fails, creating nothing on the GPU, on an invalid schedule, duplicate names, a buffer
    /// without `STORAGE`, an offset that is not a multiple of 4, or a range past a buffer's end.
    pub fn build(self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<GpuEma> {
        let Resolved {
            stepper,
            emas,
            bema,
            all,
            names,
            selection,
        } = self.resolve(device)?;
        let lim = plan_limits(device);

        // Shadows: each tensor's one run (pieces only past one binding), packed into buffers
        // of one binding each; compensation terms and further EMAs mirror that layout.
        let numels: Vec<u64> = all.iter().map(|(s, ..)| s.numel()).collect();
        let (pieces, buffer_sizes) =
            plan::place_shadows(&numels, &lim).ok_or_else(|| Error::TooLarge {
                what: "shadows".into(),
                bytes: numels.iter().map(|&n| u128::from(n) * 4).sum(),
                limit: lim.max_buffer,
            })?;
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
        let mut shadows = vec![make_buffers("wgpu-ema shadows")];
        for _ in &self.extra_emas {
            shadows.push(make_buffers("wgpu-ema shadows (further EMA)"));
        }
        let comp = if self.compensated {
            make_buffers("wgpu-ema compensation")
        } else {
            Vec::new()
        };
        let (anchor, bema_out) = if bema {
            (
                make_buffers("wgpu-ema BEMA anchor"),
                make_buffers("wgpu-ema BEMA weights"),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let placeholder = |label: &str, size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        // Unused read-write bindings each get a window of their own (WebGPU refuses two
        // writable bindings of overlapping ranges in one dispatch; read-only ones may share).
        let placeholder_align = u64::from(device.limits().min_storage_buffer_offset_alignment);
        let write_windows = shader::FIRST_PARAM as u64 + MAX_SLOTS as u64;
        let store = Store {
            shadows,
            comp,
            anchor,
            bema_out,
            placeholder_read: placeholder("wgpu-ema unused binding (read)", 16),
            placeholder_write: placeholder(
                "wgpu-ema unused binding (read-write)",
                write_windows * placeholder_align + 16,
            ),
            placeholder_align,
        };

        let immediates = self.prefer_immediates
            && device.features().contains(wgpu::Features::IMMEDIATES)
            && u64::from(device.limits().max_immediate_size) >= STEP_BYTES;
        let software = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let map = match self.tiling {
            Tiling::Gpu => ItemMap::GPU,
            Tiling::Software => ItemMap::SOFTWARE,
            Tiling::Auto if software => ItemMap::SOFTWARE,
            Tiling::Auto => ItemMap::GPU,
        };
        let mut shape = Shape {
            emas,
            compensated: self.compensated,
            bema,
            slots: 0,
            map,
        };
        let storage = device.limits().max_storage_buffers_per_shader_stage as usize;
        let max = storage
            .saturating_sub(shader::fixed_bindings(&shape))
            .clamp(1, MAX_SLOTS);
        shape.slots = match self.param_slots {
            Some(n) => n.clamp(1, max),
            None if software => 1,
            None => max,
        };
        let mut tensors = Vec::with_capacity(all.len());
        let mut placed = Vec::with_capacity(all.len());
        for ((spec, binding, in_arena), pieces) in all.into_iter().zip(pieces) {
            tensors.push(Tracked { spec, in_arena });
            placed.push((pieces, binding));
        }
        let plan = Plan::new(lim, shape.slots, placed);
        let pipes = Pipelines::new(device, immediates, self.numerics, &shape, plan.tiers());
        let step = match &pipes.ring_layout {
            None => StepChannel::Immediates,
            Some(ring_layout) => {
                let stride = plan::align_up(
                    STEP_BYTES,
                    u64::from(device.limits().min_uniform_buffer_offset_alignment),
                );
                let (buffer, bind_group) = new_ring(device, ring_layout, stride, self.ring_slots);
                StepChannel::Ring {
                    buffer,
                    bind_group,
                    stride,
                    slots: self.ring_slots,
                    next: 0,
                }
            }
        };

        let work = Dispatches::new(device, &pipes, &store, shape, plan);
        let mut ema = GpuEma {
            device: device.clone(),
            queue: queue.clone(),
            stepper,
            pipes,
            step,
            tensors,
            names,
            extra: self.extra_emas,
            store,
            work,
            arena: self.arena.cloned(),
            swapped: None,
            moved: false,
            alive: super::device::Liveness::new(device),
            selection,
            fused: None,
            last_pass: None,
            last_fused: None,
        };
        // shadows := params, on the GPU.
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("wgpu-ema init"),
        });
        ema.record_pass(&mut encoder, Op::Init, [1.0; MAX_EMAS])?;
        queue.submit(Some(encoder.finish()));
        Ok(ema)
    }
    /// Builds an EMA whose shadows live in host memory ([`OffloadedEma`]), fed through a
    /// ring of staging buffers of `offload`'s size: all the GPU memory it allocates. Every
    /// parameter is copied into its shadow before it returns (blocking, through the ring).
    ///
    /// Everything the builder configures applies, except what an offloaded EMA cannot honour,
    /// refused here: a BEMA schedule, `write_back_every > 0`, compensation of f16/bf16
    /// parameters, a slot smaller than one 4-byte word. The parameters' buffers need
    /// `COPY_SRC` (the arena has it). On the web, where nothing blocks, `build_offloaded_async`
    /// (wasm32 only).
    ///
    /// [`OffloadedEma`]: crate::OffloadedEma
    #[cfg(not(target_arch = "wasm32"))]
    pub fn build_offloaded(
        self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offload: crate::Offload,
    ) -> Result<crate::OffloadedEma> {
        let resolved = self.resolve(device)?;
        crate::offload::OffloadedEma::new(
            resolved,
            self.extra_emas,
            self.compensated,
            device,
            queue,
            offload,
        )
    }

    /// [`build_offloaded`](Self::build_offloaded) on the web: resolves once every parameter
    /// has been copied into its shadow (the browser runs the copies' map callbacks).
    #[cfg(target_arch = "wasm32")]
    pub async fn build_offloaded_async(
        self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offload: crate::Offload,
    ) -> Result<crate::OffloadedEma> {
        let resolved = self.resolve(device)?;
        crate::offload::OffloadedEma::new_async(
            resolved,
            self.extra_emas,
            self.compensated,
            device,
            queue,
            offload,
        )
        .await
    }
}

/// A uniform ring of `slots` per-step values, `stride` bytes apart, and its bind group.
pub(super) fn new_ring(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    stride: u64,
    slots: usize,
) -> (wgpu::Buffer, wgpu::BindGroup) {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-ema step ring"),
        size: stride * slots as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("wgpu-ema step ring"),
        layout,
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &buffer,
                offset: 0,
                size: NonZeroU64::new(STEP_BYTES),
            }),
        }],
    });
    (buffer, bind_group)
}
