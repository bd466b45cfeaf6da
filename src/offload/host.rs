//! The host side of offloaded shadows: the shadows themselves, the staging ring's state, and
//! the worker thread that folds each mapped sample into the shadows.
//!
//! A sample travels: copies into a free slot, recorded in the caller's encoder; the slot
//! mapped when that encoder's work is done (`map_buffer_on_submit`); the map callback hands it
//! to the worker (it must not compute: it runs inside whoever polls the device); the worker
//! updates the shadows with the CPU fast path, unmaps the slot and frees it. Samples of one
//! chunk are applied in the order they were recorded, whatever order their maps complete in.

use std::collections::HashMap;
#[cfg(not(target_arch = "wasm32"))]
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::chunks::{Chunk, Piece, Sample};
use crate::cpu::{ema_step, ema_step_kahan, ema_step_tf};
use crate::error::{Error, Result};
use crate::schedule::Numerics;
use crate::tensors::ParamDtype;

/// What the host needs to know of a tracked tensor's parameters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kind {
    pub dtype: ParamDtype,
    /// Selected to be copied: its shadow takes the parameter's value on every update.
    pub follow: bool,
}

/// What does not change after build, shared with the worker.
#[derive(Debug)]
pub(crate) struct Layout {
    pub chunks: Vec<Chunk>,
    pub kinds: Vec<Kind>,
    /// The staging ring (`MAP_READ | COPY_DST`).
    pub slots: Vec<wgpu::Buffer>,
    pub numerics: Numerics,
}

/// The shadows in host memory: `emas[k][i]` is tensor `i`'s shadow in EMA `k`.
#[derive(Debug, Default)]
pub(crate) struct Shadows {
    pub emas: Vec<Vec<Vec<f32>>>,
    /// Kahan terms of EMA 0, one per tensor; empty unless compensated.
    pub comps: Vec<Vec<f32>>,
}

/// A slot whose map completed (or failed), on its way to be applied.
#[derive(Debug)]
pub(crate) struct Mapped {
    pub slot: usize,
    pub chunk: usize,
    /// The chunk's sample number, in recording order.
    pub seq: u64,
    pub sample: Sample,
    pub result: std::result::Result<(), String>,
}

/// What the worker thread receives.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub(crate) enum Message {
    Mapped(Mapped),
    /// Sample `seq` of `chunk` will never come (its encoder was dropped unsubmitted).
    Abandoned {
        chunk: usize,
        seq: u64,
    },
    /// The EMA was dropped.
    Stop,
}

/// Where a staging slot is in a sample's travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Free for the next sample.
    Free,
    /// Copies recorded into it; its map completes once the encoder is submitted and done.
    Recorded,
    /// Mapped (its callback ran), waiting for the worker or being applied.
    Mapped,
}

/// The ring's state, shared by the recording thread, the map callbacks and the worker.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub slots: Vec<Slot>,
    /// Samples applied so far.
    pub applied: u64,
    /// The first failure (a map refused by a lost device, a worker that panicked).
    pub error: Option<String>,
    /// The worker waits while set (tests hold the host back with it).
    pub paused: bool,
    /// Woken when a sample has been applied or abandoned (async waits for the ring to drain).
    pub wakers: Vec<std::task::Waker>,
    /// Samples taken from their chunk's gap whose encoder was dropped unsubmitted: the
    /// recording thread puts them back into the gaps.
    pub lost: Vec<(usize, Sample)>,
}

/// State shared across threads: the shadows and the ring's progress, with a condition
/// variable signalled whenever a sample is applied.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub shadows: Mutex<Shadows>,
    pub progress: Mutex<Progress>,
    pub changed: Condvar,
}

/// A poisoned lock means the worker panicked while holding it: the shadows may be half updated.
fn poisoned() -> Error {
    Error::Device("the offload worker stopped while updating the shadows".into())
}

impl Shared {
    pub fn shadows(&self) -> Result<MutexGuard<'_, Shadows>> {
        self.shadows.lock().map_err(|_| poisoned())
    }

    pub fn progress(&self) -> Result<MutexGuard<'_, Progress>> {
        self.progress.lock().map_err(|_| poisoned())
    }

    /// Waits while the worker is paused.
    #[cfg(not(target_arch = "wasm32"))]
    fn wait_unpaused(&self) -> Result<()> {
        let mut p = self.progress()?;
        while p.paused {
            p = self.changed.wait(p).map_err(|_| poisoned())?;
        }
        Ok(())
    }

    /// Pauses or resumes the worker.
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        self.progress()?.paused = paused;
        self.changed.notify_all();
        Ok(())
    }
}

/// Applies mapped samples, per chunk in recording order: on native targets inside the worker
/// thread, on the web inside the map callbacks (the page's one thread).
#[derive(Debug)]
pub(crate) struct Folder {
    /// Per chunk: the sample number applied next.
    expected: Vec<u64>,
    /// Samples mapped ahead of an earlier one of their chunk (`None`: abandoned, skip it).
    waiting: HashMap<(usize, u64), Option<Mapped>>,
    scratch: Vec<f32>,
}

impl Folder {
    pub fn new(chunks: usize) -> Self {
        Self {
            expected: vec![0; chunks],
            waiting: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Takes a mapped slot; applies it and every sample it unblocks. `false` when the shared
    /// state is gone (a poisoned lock): the caller stops.
    pub fn deliver(&mut self, layout: &Layout, shared: &Shared, msg: Mapped) -> bool {
        let (chunk, seq) = (msg.chunk, msg.seq);
        self.take(layout, shared, chunk, seq, Some(msg))
    }

    /// Sample `seq` of `chunk` will never come: the samples after it go on.
    pub fn abandon(&mut self, layout: &Layout, shared: &Shared, chunk: usize, seq: u64) -> bool {
        self.take(layout, shared, chunk, seq, None)
    }

    fn take(
        &mut self,
        layout: &Layout,
        shared: &Shared,
        chunk: usize,
        seq: u64,
        msg: Option<Mapped>,
    ) -> bool {
        let Some(&first) = self.expected.get(chunk) else {
            return false;
        };
        self.waiting.insert((chunk, seq), msg);
        let mut next_seq = first;
        while let Some(next) = self.waiting.remove(&(chunk, next_seq)) {
            next_seq += 1;
            let outcome = match next {
                Some(m) => handle(layout, shared, m, &mut self.scratch),
                None => Ok(()),
            };
            let Ok(mut p) = shared.progress.lock() else {
                return false;
            };
            if let Err(e) = outcome {
                p.error.get_or_insert(e);
            }
            p.applied += 1;
            let wakers = std::mem::take(&mut p.wakers);
            drop(p);
            shared.changed.notify_all();
            wakers.into_iter().for_each(std::task::Waker::wake);
        }
        if let Some(e) = self.expected.get_mut(chunk) {
            *e = next_seq;
        }
        true
    }
}

/// The worker's loop: hands each mapped (or abandoned) slot to a [`Folder`] until
/// [`Message::Stop`] or every sender is gone; waits while paused ([`Shared::set_paused`]). A
/// panic while applying a sample is recorded as the EMA's error, so that waits end.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn run(
    layout: Arc<Layout>,
    shared: Arc<Shared>,
    rx: std::sync::mpsc::Receiver<Message>,
) {
    let mut folder = Folder::new(layout.chunks.len());
    let fail = |why: &str| {
        if let Ok(mut p) = shared.progress.lock() {
            p.error.get_or_insert_with(|| why.to_string());
        }
        shared.changed.notify_all();
    };
    while let Ok(msg) = rx.recv() {
        if shared.wait_unpaused().is_err() {
            return fail("the offload worker's state is poisoned");
        }
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match msg {
            Message::Mapped(m) => folder.deliver(&layout, &shared, m),
            Message::Abandoned { chunk, seq } => folder.abandon(&layout, &shared, chunk, seq),
            Message::Stop => false,
        }));
        match delivered {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => return fail("the offload worker panicked while applying a sample"),
        }
    }
}

/// One mapped slot: applied, unmapped and freed.
fn handle(
    layout: &Layout,
    shared: &Shared,
    msg: Mapped,
    scratch: &mut Vec<f32>,
) -> std::result::Result<(), String> {
    let Mapped {
        slot,
        chunk,
        sample,
        result,
        ..
    } = msg;
    let free = |shared: &Shared| {
        if let Ok(mut p) = shared.progress.lock() {
            if let Some(b) = p.slots.get_mut(slot) {
                *b = Slot::Free;
            }
        }
    };
    if let Err(e) = result {
        free(shared);
        return Err(format!("mapping a staging slot failed: {e}"));
    }
    let (Some(buffer), Some(chunk)) = (layout.slots.get(slot), layout.chunks.get(chunk)) else {
        return Err(format!("no slot {slot} or chunk {chunk}"));
    };
    let outcome = {
        let view = buffer.slice(0..chunk.bytes).get_mapped_range();
        match (view, shared.shadows.lock()) {
            (Err(e), _) => Err(format!("reading a mapped staging slot: {e}")),
            (Ok(view), Ok(mut shadows)) => {
                for piece in &chunk.pieces {
                    apply(layout, &mut shadows, piece, &view, sample, scratch);
                }
                Ok(())
            }
            (_, Err(_)) => Err("the host shadows' lock is poisoned".to_string()),
        }
    };
    buffer.unmap();
    free(shared);
    outcome
}

/// The parameters of `piece` as f32: the staged words read in place where aligned, else
/// copied (or widened from f16/bf16) into `scratch`.
pub(crate) fn params<'a>(
    staged: &'a [u8],
    piece: &Piece,
    dtype: ParamDtype,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let at = piece.stage as usize;
    let n = piece.len as usize;
    scratch.clear();
    match dtype {
        ParamDtype::F32 => {
            let raw = &staged[at..at + 4 * n];
            if let Ok(p) = bytemuck::try_cast_slice(raw) {
                return p;
            }
            scratch.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        ParamDtype::F16 => scratch.extend(
            staged[at..at + 2 * n]
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        ParamDtype::BF16 => scratch.extend(
            staged[at..at + 2 * n]
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    scratch
}

/// One piece of a mapped slot folded into the shadows. Lengths agree by construction: the
/// chunk cut the piece out of the tensor.
fn apply(
    layout: &Layout,
    shadows: &mut Shadows,
    piece: &Piece,
    staged: &[u8],
    sample: Sample,
    scratch: &mut Vec<f32>,
) {
    let kind = layout.kinds[piece.tensor];
    let p = params(staged, piece, kind.dtype, scratch);
    let range = piece.start as usize..(piece.start + piece.len) as usize;
    let t = piece.tensor;
    let Shadows { emas, comps } = shadows;
    let sample = match sample {
        Sample::Update { .. } if kind.follow => Sample::Copy,
        s => s,
    };
    match sample {
        Sample::Copy => {
            for ema in emas.iter_mut() {
                ema[t][range.clone()].copy_from_slice(p);
            }
            if let Some(c) = comps.get_mut(t) {
                c[range].fill(0.0);
            }
        }
        // Lengths are equal by construction, so the kernels' length checks cannot fail.
        Sample::Update { alphas, lo } => {
            if let Some(c) = comps.get_mut(t) {
                let _ = ema_step_kahan(
                    &mut emas[0][t][range.clone()],
                    &mut c[range],
                    p,
                    alphas[0],
                    lo,
                );
                return;
            }
            for (ema, &alpha) in emas.iter_mut().zip(&alphas) {
                let s = &mut ema[t][range.clone()];
                let _ = match layout.numerics {
                    Numerics::Exact => ema_step(s, p, alpha),
                    Numerics::TensorFlow => ema_step_tf(s, p, alpha),
                };
            }
        }
    }
}
