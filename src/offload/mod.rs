//! Offloaded shadows: the EMA of parameters that live on the GPU, kept in host memory and fed
//! by samples streamed through a bounded ring of staging buffers ([`OffloadedEma`]).
//!
//! Here: the EMA, its build and its recording (`mod.rs`), cutting tensors into chunks and what a
//! chunk's next sample does (`chunks`), the host side: shadows, the ring's state, the worker
//! (`host`), and what waits: blocking on native targets (`blocking`), async on the web (`web`).

#[cfg(not(target_arch = "wasm32"))]
mod blocking;
mod chunks;
mod host;
#[cfg(target_arch = "wasm32")]
mod web;

use std::collections::HashMap;
#[cfg(not(target_arch = "wasm32"))]
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::checkpoint::EmaState;
use crate::error::{Error, Result};
use crate::gpu::Resolved;
use crate::schedule::{Action, Numerics, Policy, Schedule, Stepper};
use crate::shader::MAX_EMAS;
use crate::tensors::{HostTensors, ParamDtype, TensorSpec};
use chunks::{Chunk, Gap};
#[cfg(not(target_arch = "wasm32"))]
use host::Message;
use host::{Kind, Layout, Mapped, Shadows, Shared, Slot};

/// Where a tracked tensor's parameters are now.
#[derive(Debug)]
struct Source {
    buffer: wgpu::Buffer,
    offset: u64,
    dtype: ParamDtype,
    /// In a [`ParamArena`](crate::ParamArena): stays where the arena put it.
    in_arena: bool,
}

/// How an [`OffloadedEma`] streams parameters to the host: the staging ring's size and shape.
///
/// ```
/// use wgpu_ema::Offload;
/// // 64 MiB of staging in 8 slots of 8 MiB; at most 4 slots' worth of parameters per step.
/// let offload = Offload::new(64 << 20).slots(8).per_step(4);
/// assert_eq!(offload.slot_bytes(), 8 << 20);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offload {
    ring_bytes: u64,
    slots: usize,
    per_step: Option<usize>,
}

impl Offload {
    /// A ring of `ring_bytes` of staging memory on the GPU, in 4 slots: all the GPU memory the
    /// offloaded EMA allocates, whatever the model's size.
    pub fn new(ring_bytes: u64) -> Self {
        Self {
            ring_bytes,
            slots: 4,
            per_step: None,
        }
    }

    /// Slots in the ring (default 4). Each holds one chunk of parameters on its way to the
    /// host; more slots let more samples be in flight while the host catches up.
    pub fn slots(mut self, slots: usize) -> Self {
        self.slots = slots;
        self
    }

    /// At most this many chunks sampled per update (default: half the slots, at least one),
    /// so that the ring holds the samples of two steps: one being copied, one on the host.
    pub fn per_step(mut self, chunks: usize) -> Self {
        self.per_step = Some(chunks);
        self
    }

    /// Bytes of one slot: the ring's bytes over the slots, in whole 4-byte words.
    pub fn slot_bytes(&self) -> u64 {
        match self.slots {
            0 => 0,
            s => self.ring_bytes / s as u64 / 4 * 4,
        }
    }
}

/// What the ring has done, for users to see whether the host keeps up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadStats {
    /// Chunk samples recorded by updates (the copies that build, settle and swap make are
    /// not counted).
    pub samples: u64,
    /// Chunks due at an update but not sampled because every slot was busy (the host behind):
    /// their next sample folds in the longer gap.
    pub skipped: u64,
    /// Samples recorded and not yet applied on the host.
    pub in_flight: usize,
    /// The chunks the tensors were cut into.
    pub chunks: usize,
    /// Slots in the ring.
    pub slots: usize,
    /// Bytes of GPU memory the ring holds: all the offloaded EMA allocates on the GPU.
    pub gpu_bytes: u64,
}

/// Exponential moving averages of GPU parameters, with the shadows in host memory.
///
/// For models whose shadows do not fit beside them on the GPU. Each update records, into the
/// caller's encoder, copies of some parameters into a ring of staging buffers; once the GPU has
/// done them, the buffers are mapped and a worker thread folds them into the host shadows with
/// the CPU fast path ([`cpu::ema_step`](crate::cpu::ema_step), all cores). Recording never
/// waits for the host. Build one with [`GpuEmaBuilder::build_offloaded`](crate::GpuEmaBuilder::build_offloaded).
///
/// # The rule
/// The tensors are cut into chunks of at most one slot each; an update samples the next
/// [`per_step`](Offload::per_step) chunks in rotation. A chunk sampled at call `n` whose last
/// sample was at call `m` takes the update of the whole gap `(m, n]` with the value sampled at
/// `n`: the decays of the gap's updates multiplied (`decay^k` for a constant schedule), or a
/// copy if the gap holds one. So each element's shadow is exactly the EMA of the values sampled
/// for it, each weighted by the calls it stands for; a chunk sampled at every update follows
/// the on-GPU EMA bit for bit. When every slot is busy (the host behind), due chunks are
/// skipped and counted ([`stats`](Self::stats)); their next sample folds in the longer gap.
///
/// [`settle`](Self::settle) brings every shadow to the current call (it samples, blocking,
/// each chunk not sampled since): reads and checkpoints need it, and call it themselves where
/// they can.
///
/// ```no_run
/// use wgpu_ema::{GpuContext, GpuEma, Offload, ParamArena, Schedule, TensorSpec};
/// # fn main() -> wgpu_ema::Result<()> {
/// let ctx = GpuContext::new()?;
/// let params = ParamArena::new(&ctx.device, [TensorSpec::new("w", [1 << 20])])?;
/// let mut ema = GpuEma::builder(Schedule::tf(0.999))
///     .track_arena(&params)
///     .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 20))?; // 1 MiB of staging
/// for _ in 0..100 {
///     let mut encoder = ctx.device.create_command_encoder(&Default::default());
///     // ... the optimizer's pass ...
///     ema.record_update(&mut encoder)?;
///     ctx.queue.submit(Some(encoder.finish()));
/// }
/// let shadows = ema.read_shadows()?; // settles first
/// println!("{:?}, {:?}", &shadows.try_get("w")?[..4], ema.stats());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct OffloadedEma {
    device: wgpu::Device,
    queue: wgpu::Queue,
    stepper: Stepper,
    extra: Vec<Schedule>,
    compensated: bool,
    specs: Vec<TensorSpec>,
    names: HashMap<String, usize>,
    selection: String,
    sources: Vec<Source>,
    layout: Arc<Layout>,
    shared: Arc<Shared>,
    /// To the worker thread, and the thread itself.
    #[cfg(not(target_arch = "wasm32"))]
    tx: Sender<Message>,
    #[cfg(not(target_arch = "wasm32"))]
    worker: Option<std::thread::JoinHandle<()>>,
    /// On the web the map callbacks apply the samples themselves, through this.
    #[cfg(target_arch = "wasm32")]
    folder: Arc<std::sync::Mutex<host::Folder>>,
    /// Per chunk: the calls since its last sample.
    gaps: Vec<Gap>,
    /// Per chunk: samples recorded so far (the worker applies them in this order).
    seq: Vec<u64>,
    /// The chunk the next update samples first.
    next_chunk: usize,
    per_step: usize,
    samples: u64,
    skipped: u64,
    swapped: bool,
    ring_bytes: u64,
}

#[cfg(not(target_arch = "wasm32"))]
impl Drop for OffloadedEma {
    /// Stops the worker and waits for it, so that the ring is freed with the EMA.
    fn drop(&mut self) {
        let _ = self.shared.set_paused(false);
        let _ = self.tx.send(Message::Stop);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl OffloadedEma {
    /// Builds it from a resolved configuration and copies every parameter into its shadow
    /// (blocking, through the ring).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn new(
        r: Resolved,
        extra: Vec<Schedule>,
        compensated: bool,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offload: Offload,
    ) -> Result<Self> {
        let mut ema = Self::assemble(r, extra, compensated, device, queue, offload)?;
        // Shadows := parameters: every chunk's first sample is a copy.
        ema.settle()?;
        Ok(ema)
    }

    /// Checks the configuration, cuts the chunks, allocates the ring and starts the worker
    /// (on native targets); every chunk's first sample will be a copy.
    pub(crate) fn assemble(
        r: Resolved,
        extra: Vec<Schedule>,
        compensated: bool,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offload: Offload,
    ) -> Result<Self> {
        if r.bema {
            return Err(Error::InvalidConfig(
                "BEMA is not offloaded: its weights need the parameters beside the shadows".into(),
            ));
        }
        if r.stepper.policy().write_back_every > 0 {
            return Err(Error::InvalidConfig(
                "offloaded shadows cannot be written back into the parameters at updates \
                 (write_back_every > 0): that would stall the step on an upload"
                    .into(),
            ));
        }
        if offload.slots == 0 || offload.per_step == Some(0) {
            return Err(Error::InvalidConfig(
                "an offload ring needs at least one slot, and one chunk per step".into(),
            ));
        }
        for (spec, b, _) in &r.all {
            if b.dtype != ParamDtype::F32 && compensated {
                return Err(Error::HalfPrecision {
                    name: spec.name.clone(),
                    what: "compensated shadows",
                });
            }
            if !b.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                return Err(Error::MissingUsage {
                    name: spec.name.clone(),
                    needed: wgpu::BufferUsages::COPY_SRC,
                    have: b.buffer.usage(),
                });
            }
        }
        let sizes: Vec<(u64, u64)> = r
            .all
            .iter()
            .map(|(s, b, _)| (s.numel(), b.dtype.size()))
            .collect();
        // A slot is one buffer: never past the device's largest.
        let slot_bytes = offload
            .slot_bytes()
            .min(device.limits().max_buffer_size / 4 * 4);
        let chunks = chunks::cut(&sizes, slot_bytes).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "an offload ring of {} bytes in {} slots: a slot must hold at least one 4-byte \
                 word (one f32 parameter, two f16/bf16)",
                offload.ring_bytes, offload.slots
            ))
        })?;
        let slot_size = chunks.iter().map(|c| c.bytes).max().unwrap_or(0);
        let slot_count = if chunks.is_empty() { 0 } else { offload.slots };
        let slots: Vec<wgpu::Buffer> = (0..slot_count)
            .map(|_| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgpu-ema offload staging"),
                    size: slot_size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let emas = 1 + extra.len();
        let shadows = Shadows {
            emas: (0..emas)
                .map(|_| sizes.iter().map(|&(n, _)| vec![0.0; n as usize]).collect())
                .collect(),
            comps: if compensated {
                sizes.iter().map(|&(n, _)| vec![0.0; n as usize]).collect()
            } else {
                Vec::new()
            },
        };
        let mut specs = Vec::with_capacity(r.all.len());
        let mut sources = Vec::with_capacity(r.all.len());
        let mut kinds = Vec::with_capacity(r.all.len());
        for (spec, b, in_arena) in r.all {
            specs.push(spec);
            kinds.push(Kind {
                dtype: b.dtype,
                follow: b.follow,
            });
            sources.push(Source {
                buffer: b.buffer,
                offset: b.offset,
                dtype: b.dtype,
                in_arena,
            });
        }
        let chunk_count = chunks.len();
        // On the web wgpu's handles are not `Send` (one thread, no worker): the `Arc` is only
        // shared with the map callbacks there.
        #[allow(clippy::arc_with_non_send_sync)]
        let layout = Arc::new(Layout {
            chunks,
            kinds,
            slots,
            numerics: r.stepper.numerics(),
        });
        let shared = Arc::new(Shared::default());
        shared.progress()?.slots = vec![Slot::Free; slot_count];
        *shared.shadows()? = shadows;
        #[cfg(not(target_arch = "wasm32"))]
        let (tx, rx) = std::sync::mpsc::channel();
        #[cfg(not(target_arch = "wasm32"))]
        let worker = {
            let (layout, shared) = (layout.clone(), shared.clone());
            std::thread::Builder::new()
                .name("wgpu-ema offload".into())
                .spawn(move || host::run(layout, shared, rx))
                .map_err(|e| {
                    Error::InvalidConfig(format!("cannot start the offload worker: {e}"))
                })?
        };
        let per_step = offload
            .per_step
            .unwrap_or((offload.slots / 2).max(1))
            .min(offload.slots);
        Ok(Self {
            device: device.clone(),
            queue: queue.clone(),
            stepper: r.stepper,
            extra,
            compensated,
            specs,
            names: r.names,
            selection: r.selection,
            sources,
            layout,
            shared,
            #[cfg(not(target_arch = "wasm32"))]
            tx,
            #[cfg(not(target_arch = "wasm32"))]
            worker: Some(worker),
            #[cfg(target_arch = "wasm32")]
            folder: Arc::new(std::sync::Mutex::new(host::Folder::new(chunk_count))),
            gaps: vec![Gap::copying(); chunk_count],
            seq: vec![0; chunk_count],
            next_chunk: 0,
            per_step,
            samples: 0,
            skipped: 0,
            swapped: false,
            ring_bytes: slot_size * slot_count as u64,
        })
    }

    /// Records one update into the caller's encoder, as update number `num_updates() + 1`.
    /// Never waits: samples whose slot is busy are skipped (see the type's docs).
    ///
    /// A slot stays busy until the encoder is submitted and its copies have run; an encoder
    /// dropped unsubmitted gives its samples back to their chunks' next samples.
    pub fn record_update(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        let n = self.stepper.next();
        self.record_update_at(encoder, n)
    }

    /// Records one update as update number `n` (the caller's global step; see
    /// [`GpuEma::record_update_at`](crate::GpuEma::record_update_at)).
    pub fn record_update_at(&mut self, encoder: &mut wgpu::CommandEncoder, n: u64) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        self.check()?;
        // Hands finished maps to the worker without waiting (native devices run callbacks
        // only when polled).
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.reclaim()?;
        let (action, alphas, exact, lo) = self.advance(n)?;
        if action == Action::Skip {
            return Ok(());
        }
        for gap in &mut self.gaps {
            gap.fold(action, alphas, exact, lo);
        }
        let count = self.gaps.len();
        let want = self.per_step.min(count);
        let free = self.free_slots()?;
        let mut taken = 0;
        for &slot in free.iter().take(want) {
            let c = self.next_chunk;
            self.next_chunk = (c + 1) % count;
            if self.record_sample(encoder, c, slot)? {
                taken += 1;
            }
        }
        self.samples += taken as u64;
        self.skipped += (want - taken) as u64;
        Ok(())
    }

    /// Records one update and submits it on the queue. Never waits for the host.
    pub fn update(&mut self) -> Result<wgpu::SubmissionIndex> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgpu-ema offloaded update"),
            });
        self.record_update(&mut encoder)?;
        Ok(self.queue.submit(Some(encoder.finish())))
    }

    /// One more call: its action, every EMA's f32 alpha (EMA 0's in the action too), the f64
    /// alphas they round, and EMA 0's low part for compensated shadows. The counter moves only
    /// when all of them could be computed.
    #[allow(clippy::type_complexity)]
    fn advance(&mut self, n: u64) -> Result<(Action, [f32; MAX_EMAS], [f64; MAX_EMAS], f32)> {
        let k = n.saturating_sub(self.stepper.policy().update_after_step);
        let numerics = self.stepper.numerics();
        // Each schedule evaluated once: the f32 alpha (what the on-GPU pass uses) and its low
        // part, before the counter moves (an invalid schedule moves nothing).
        let mut alphas = [1.0f32; MAX_EMAS];
        let mut exact = [1.0f64; MAX_EMAS];
        let mut lo0 = 0.0f32;
        for (j, s) in std::iter::once(self.stepper.schedule())
            .chain(self.extra.iter().copied())
            .enumerate()
        {
            let (hi, lo) = s.alpha_split(k, numerics)?;
            alphas[j] = hi;
            exact[j] = f64::from(hi) + f64::from(lo);
            if j == 0 && self.compensated {
                lo0 = lo;
            }
        }
        let action = self.stepper.advance_to(n)?;
        Ok((action, alphas, exact, lo0))
    }

    /// The first failure of a map or of the worker, as an error.
    fn check(&self) -> Result<()> {
        match &self.shared.progress()?.error {
            Some(e) => Err(Error::Device(e.clone())),
            None => Ok(()),
        }
    }

    /// Puts the samples of encoders dropped unsubmitted back into their chunks' gaps.
    fn reclaim(&mut self) -> Result<()> {
        let lost = std::mem::take(&mut self.shared.progress()?.lost);
        for (c, sample) in lost {
            if let Some(g) = self.gaps.get_mut(c) {
                g.restore(sample);
            }
        }
        Ok(())
    }

    /// The slots free now.
    fn free_slots(&self) -> Result<Vec<usize>> {
        let p = self.shared.progress()?;
        Ok((0..p.slots.len())
            .filter(|&s| p.slots[s] == Slot::Free)
            .collect())
    }

    /// Records chunk `c`'s sample into `slot`: its copies, and the map that hands it to the
    /// worker once the encoder's work is done, with what the chunk's gap folds into (nothing is
    /// recorded, and `false` returned, when the gap is empty).
    fn record_sample(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        c: usize,
        slot: usize,
    ) -> Result<bool> {
        let Some(sample) = self.gaps[c].take() else {
            return Ok(false);
        };
        let chunk: &Chunk = &self.layout.chunks[c];
        let buffer = &self.layout.slots[slot];
        copy_chunk(&self.sources, encoder, chunk, buffer);
        if let Some(b) = self.shared.progress()?.slots.get_mut(slot) {
            *b = Slot::Recorded;
        }
        let seq = self.seq[c];
        self.seq[c] += 1;
        let pending = Pending {
            payload: Some((slot, c, seq, sample)),
            shared: self.shared.clone(),
            #[cfg(not(target_arch = "wasm32"))]
            tx: self.tx.clone(),
            #[cfg(target_arch = "wasm32")]
            folder: self.folder.clone(),
            #[cfg(target_arch = "wasm32")]
            layout: self.layout.clone(),
        };
        encoder.map_buffer_on_submit(buffer, wgpu::MapMode::Read, 0..chunk.bytes, move |result| {
            pending.mapped(result.map_err(|e| e.to_string()));
        });
        Ok(true)
    }

    /// True when nothing is in flight and every chunk has been sampled at the last update.
    pub fn is_settled(&self) -> bool {
        self.is_idle() && self.gaps.iter().all(Gap::is_empty)
    }

    /// True when every slot is free: no sample recorded and not yet applied.
    fn is_idle(&self) -> bool {
        self.shared
            .progress()
            .map(|p| p.slots.iter().all(|&s| s == Slot::Free))
            .unwrap_or(false)
    }

    fn ensure_settled(&self) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        if !self.is_settled() {
            return Err(Error::InvalidConfig(
                "the offloaded shadows are not settled: call OffloadedEma::settle() before \
                 reading or saving them"
                    .into(),
            ));
        }
        Ok(())
    }

    /// EMA `k`'s shadows as the host holds them now (callers settle first).
    fn host_shadows(&self, k: usize) -> Result<HostTensors> {
        let shadows = self.shared.shadows()?;
        let ema = shadows.emas.get(k).ok_or_else(|| Error::UnknownName {
            name: format!("EMA number {k} (the EMA keeps {})", shadows.emas.len()),
        })?;
        Ok(HostTensors::from_parts(
            self.specs
                .iter()
                .cloned()
                .zip(ema.iter().cloned())
                .collect(),
        ))
    }

    /// The counters of the ring: samples taken and skipped, samples in flight, its shape.
    pub fn stats(&self) -> OffloadStats {
        let in_flight = self
            .shared
            .progress()
            .map(|p| p.slots.iter().filter(|&&s| s != Slot::Free).count())
            .unwrap_or(0);
        OffloadStats {
            samples: self.samples,
            skipped: self.skipped,
            in_flight,
            chunks: self.gaps.len(),
            slots: self.layout.slots.len(),
            gpu_bytes: self.ring_bytes,
        }
    }

    /// Restores shadows and the step counter from a training checkpoint (as
    /// [`GpuEma::restore`](crate::GpuEma::restore); files of either are the same). Every chunk
    /// is then current at the checkpoint's counter.
    pub fn restore(&mut self, checkpoint: &crate::checkpoint::Checkpoint) -> Result<()> {
        self.restore_with(checkpoint, crate::checkpoint::RestoreOptions::default())
    }

    /// [`restore`](Self::restore) with options: non-finite values, another configuration.
    pub fn restore_with(
        &mut self,
        checkpoint: &crate::checkpoint::Checkpoint,
        opts: crate::checkpoint::RestoreOptions,
    ) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        // Samples in flight belong to the run being replaced: let them land first (and refuse
        // while an encoder holding one is unsubmitted: it would land on the restored shadows).
        #[cfg(not(target_arch = "wasm32"))]
        self.drain_all()?;
        #[cfg(target_arch = "wasm32")]
        if !self.is_idle() {
            return Err(Error::InvalidConfig(
                "samples are in flight: await settle_async() before restoring".into(),
            ));
        }
        let config = crate::checkpoint::Config::of(&self.stepper, &self.extra, &self.selection);
        let set = checkpoint.restore_set(&self.specs, self.compensated, &config, opts)?;
        let mut shadows = self.shared.shadows()?;
        let Shadows { emas, comps } = &mut *shadows;
        for (i, values) in set.shadows.iter().enumerate() {
            emas[0][i].copy_from_slice(values);
            if let Some(c) = comps.get_mut(i) {
                c.fill(0.0);
            }
        }
        for (i, values) in set.comps.iter().flatten().enumerate() {
            comps[i].copy_from_slice(values);
        }
        for (k, ema) in set.extras.iter().enumerate() {
            for (i, values) in ema.iter().enumerate() {
                emas[k + 1][i].copy_from_slice(values);
            }
        }
        drop(shadows);
        // Samples of dropped encoders belong to the run being replaced too.
        self.shared.progress()?.lost.clear();
        self.gaps.fill(Gap::empty());
        self.stepper.set_num_updates(set.num_updates);
        Ok(())
    }

    /// Points tensor `name` at new parameters (a framework that moved them): `buffer` from
    /// `byte_offset`, checked as at build (usages `STORAGE` and `COPY_SRC`, alignment, bounds,
    /// the EMA's device, no overlap with another tensor). Arena tensors stay where they are.
    pub fn rebind(&mut self, name: &str, buffer: &wgpu::Buffer, byte_offset: u64) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        let i = self.index(name)?;
        let spec = &self.specs[i];
        let src = &self.sources[i];
        if src.in_arena {
            return Err(Error::NotRebindable {
                name: name.to_string(),
            });
        }
        crate::gpu::validate_binding(spec, buffer, byte_offset, src.dtype)?;
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::MissingUsage {
                name: name.to_string(),
                needed: wgpu::BufferUsages::COPY_SRC,
                have: buffer.usage(),
            });
        }
        crate::gpu::check_same_device(&self.device, name, buffer)?;
        let others = self
            .specs
            .iter()
            .zip(&self.sources)
            .enumerate()
            .map(|(j, (s, b))| {
                if j == i {
                    (s, buffer, byte_offset, b.dtype)
                } else {
                    (s, &b.buffer, b.offset, b.dtype)
                }
            });
        crate::gpu::check_overlaps(others)?;
        let src = &mut self.sources[i];
        src.buffer = buffer.clone();
        src.offset = byte_offset;
        Ok(())
    }

    /// True between two [`swap`](Self::swap)s.
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// The tracked tensors, in order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.specs.clone()
    }

    /// The schedule (of EMA 0).
    pub fn schedule(&self) -> Schedule {
        self.stepper.schedule()
    }

    /// Changes the schedule from the next update on (see
    /// [`GpuEma::set_schedule`](crate::GpuEma::set_schedule)); gaps already folded keep the
    /// decays of the calls they covered.
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<()> {
        self.stepper.set_schedule(schedule)
    }

    /// The numerics.
    pub fn numerics(&self) -> Numerics {
        self.stepper.numerics()
    }

    /// When updates happen.
    pub fn update_policy(&self) -> Policy {
        self.stepper.policy()
    }

    /// The step counter: calls so far (see [`GpuEma::num_updates`](crate::GpuEma::num_updates)).
    pub fn num_updates(&self) -> u64 {
        self.stepper.num_updates()
    }

    /// How many EMAs are kept.
    pub fn ema_count(&self) -> usize {
        1 + self.extra.len()
    }

    /// True when the shadows carry Kahan compensation terms.
    pub fn is_compensated(&self) -> bool {
        self.compensated
    }

    /// The tensors copied and left out, as checkpoints record it.
    pub fn selection(&self) -> &str {
        &self.selection
    }

    /// The index of the tensor named `name`.
    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownName {
                name: name.to_string(),
            })
    }

    /// Pauses the worker while the guard lives: samples wait, slots stay busy, and updates
    /// skip. For tests of a host that falls behind; do not settle or read while holding it.
    #[doc(hidden)]
    pub fn hold_host(&self) -> HostHold {
        let _ = self.shared.set_paused(true);
        HostHold(self.shared.clone())
    }

    /// Copies of the host values `f` picks, after checking the EMA is settled.
    fn host_values(
        &self,
        f: impl FnOnce(&Shadows) -> Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>> {
        self.ensure_settled()?;
        Ok(f(&*self.shared.shadows()?))
    }
}

/// A recorded sample, carried by its slot's map callback. The callback hands it on
/// ([`mapped`](Self::mapped)); if wgpu drops the callback unrun (its encoder dropped
/// unsubmitted), `Drop` frees the slot, gives the sample back to its chunk's gap (the recording
/// thread folds it into the chunk's next sample) and tells the folder to skip its number, so
/// that the chunk's later samples go on.
struct Pending {
    /// (slot, chunk, sample number, sample), until handed on.
    payload: Option<(usize, usize, u64, chunks::Sample)>,
    shared: Arc<Shared>,
    #[cfg(not(target_arch = "wasm32"))]
    tx: Sender<Message>,
    #[cfg(target_arch = "wasm32")]
    folder: Arc<std::sync::Mutex<host::Folder>>,
    #[cfg(target_arch = "wasm32")]
    layout: Arc<Layout>,
}

impl Pending {
    /// The slot's map completed (or failed): on native targets this runs inside whoever polls
    /// the device, so it hands the slot to the worker and computes nothing; on the web it runs
    /// on the page's one thread, between tasks, and applies the sample now.
    fn mapped(mut self, result: std::result::Result<(), String>) {
        let Some((slot, chunk, seq, sample)) = self.payload.take() else {
            return;
        };
        let Ok(mut p) = self.shared.progress.lock() else {
            return;
        };
        if let Some(s) = p.slots.get_mut(slot) {
            *s = Slot::Mapped;
        }
        let message = Mapped {
            slot,
            chunk,
            seq,
            sample,
            result,
        };
        #[cfg(not(target_arch = "wasm32"))]
        if self.tx.send(Message::Mapped(message)).is_err() {
            p.error
                .get_or_insert_with(|| "the offload worker has stopped".into());
        }
        #[cfg(target_arch = "wasm32")]
        {
            drop(p);
            if let Ok(mut f) = self.folder.lock() {
                f.deliver(&self.layout, &self.shared, message);
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some((slot, chunk, seq, sample)) = self.payload.take() else {
            return;
        };
        if let Ok(mut p) = self.shared.progress.lock() {
            if let Some(s) = p.slots.get_mut(slot) {
                *s = Slot::Free;
            }
            p.lost.push((chunk, sample));
        }
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.tx.send(Message::Abandoned { chunk, seq });
        #[cfg(target_arch = "wasm32")]
        if let Ok(mut f) = self.folder.lock() {
            f.abandon(&self.layout, &self.shared, chunk, seq);
        }
    }
}

/// Records the copies of `chunk`'s pieces from the parameters into the staging `buffer`.
fn copy_chunk(
    sources: &[Source],
    encoder: &mut wgpu::CommandEncoder,
    chunk: &Chunk,
    buffer: &wgpu::Buffer,
) {
    for piece in &chunk.pieces {
        let src = &sources[piece.tensor];
        encoder.copy_buffer_to_buffer(
            &src.buffer,
            src.offset + piece.start * src.dtype.size(),
            buffer,
            piece.stage,
            piece.bytes,
        );
    }
}

/// The worker paused ([`OffloadedEma::hold_host`]) until dropped.
#[doc(hidden)]
#[derive(Debug)]
pub struct HostHold(Arc<Shared>);

impl Drop for HostHold {
    fn drop(&mut self) {
        let _ = self.0.set_paused(false);
    }
}

/// Checkpoints read the host shadows directly (no GPU round trip); the EMA must be settled
/// ([`OffloadedEma::settle`]). Parameters are read back through the ring.
impl EmaState for OffloadedEma {
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
        self.read_ema_shadow(0, i)
    }
    fn ema_count(&self) -> usize {
        1 + self.extra.len()
    }
    fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        match k {
            0 => Some(self.stepper.schedule()),
            _ => self.extra.get(k - 1).copied(),
        }
    }
    fn read_ema_shadow(&self, k: usize, i: usize) -> Result<Vec<f32>> {
        self.host_values(|s| s.emas.get(k)?.get(i).cloned())?
            .ok_or_else(|| Error::UnknownName {
                name: format!("tensor number {i} of EMA {k}"),
            })
    }
    fn compensated(&self) -> bool {
        self.compensated
    }
    fn read_compensation(&self, i: usize) -> Result<Option<Vec<f32>>> {
        self.host_values(|s| s.comps.get(i).cloned())
    }
    fn read_param(&self, i: usize) -> Result<Option<Vec<f32>>> {
        #[cfg(not(target_arch = "wasm32"))]
        return self.read_param_blocking(i).map(Some);
        // Nothing may block on the web: the parameters are the caller's to pass.
        #[cfg(target_arch = "wasm32")]
        {
            let _ = i;
            Ok(None)
        }
    }
}
