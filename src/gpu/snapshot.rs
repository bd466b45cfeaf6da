//! A consistent copy of shadows (and parameters) taken on the GPU in one submit, read back
//! one tensor at a time: what feeds a checkpoint without stalling training or holding the
//! whole model in host memory.

use super::GpuEma;
use crate::checkpoint::EmaState;
use crate::error::{Error, Result};
use crate::readback;
use crate::schedule::{Numerics, Policy, Schedule};
use crate::tensors::TensorSpec;

/// Where a snapshot's values are: still on the GPU, or read back.
#[derive(Debug)]
enum Data {
    Gpu {
        device: wgpu::Device,
        queue: wgpu::Queue,
        buffer: wgpu::Buffer,
    },
    /// The buffer's contents, in f32 elements.
    Host(Vec<f32>),
}

/// Shadows and parameters as they were after the steps submitted before
/// [`GpuEma::snapshot`], held in one device-local buffer.
///
/// Training may go on meanwhile: later steps do not change the snapshot, and reading it waits
/// only for the snapshot's own copy. Each [`EmaState::read_shadow`] reads back one tensor, so
/// saving a checkpoint needs host memory for one tensor at a time.
///
/// On the web, where reads cannot block, [`into_host`](Snapshot::into_host) reads the whole
/// snapshot back asynchronously first; the host copy then feeds
/// [`checkpoint::training_bytes`](crate::checkpoint::training_bytes) and
/// [`checkpoint::export_ema_bytes`](crate::checkpoint::export_ema_bytes).
#[derive(Debug)]
pub struct Snapshot {
    data: Data,
    specs: Vec<TensorSpec>,
    shadow_at: Vec<u64>,
    comp_at: Vec<Option<u64>>,
    /// BEMA's anchors, for a BEMA EMA.
    anchor_at: Vec<Option<u64>>,
    /// `extra_at[k - 1][i]`: tensor `i` of EMA `k`.
    extra_at: Vec<Vec<u64>>,
    extra_schedules: Vec<Schedule>,
    selection: String,
    param_at: Vec<Option<u64>>,
    num_updates: u64,
    schedule: Schedule,
    numerics: Numerics,
    policy: Policy,
}

impl GpuEma {
    /// Copies every shadow, and with `with_params` every parameter, into a snapshot buffer in
    /// one submit. Parameters in user buffers need `BufferUsages::COPY_SRC` for that
    /// ([`Error::MissingUsage`] otherwise; the arena has it).
    pub fn snapshot(&self, with_params: bool) -> Result<Snapshot> {
        self.not_swapped()?;
        if let (true, Some(name)) = (with_params, self.half_tensor()) {
            return Err(Error::HalfPrecision {
                name: name.to_string(),
                what: "snapshots with parameters (take it without, and pass the parameters)",
            });
        }
        let mut at = 0u64;
        let mut shadow_at = Vec::new();
        let mut param_at = Vec::new();
        let mut comp_at = Vec::new();
        for t in &self.tensors {
            shadow_at.push(at);
            at += t.spec.numel() * 4;
        }
        let mut extra_at = Vec::new();
        for _ in &self.extra {
            let mut v = Vec::new();
            for t in &self.tensors {
                v.push(at);
                at += t.spec.numel() * 4;
            }
            extra_at.push(v);
        }
        for t in &self.tensors {
            if self.is_compensated() {
                comp_at.push(Some(at));
                at += t.spec.numel() * 4;
            } else {
                comp_at.push(None);
            }
        }
        let mut anchor_at = Vec::new();
        for t in &self.tensors {
            if self.store.anchor.is_empty() {
                anchor_at.push(None);
            } else {
                anchor_at.push(Some(at));
                at += t.spec.numel() * 4;
            }
        }
        for (i, t) in self.tensors.iter().enumerate() {
            if with_params {
                let usage = self.placed(i).1.buffer.usage();
                if !usage.contains(wgpu::BufferUsages::COPY_SRC) {
                    return Err(Error::MissingUsage {
                        name: t.spec.name.clone(),
                        needed: wgpu::BufferUsages::COPY_SRC,
                        have: usage,
                    });
                }
                param_at.push(Some(at));
                at += t.spec.numel() * 4;
            } else {
                param_at.push(None);
            }
        }
        let max = self.device.limits().max_buffer_size;
        if at > max {
            return Err(Error::TooLarge {
                what: "checkpoint snapshot".into(),
                bytes: at.into(),
                limit: max,
            });
        }
        // A lost or destroyed device is an error, not wgpu's panicking default handler.
        let buffer = crate::readback::scoped(&self.device, || {
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-ema snapshot"),
                size: at.max(4),
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("wgpu-ema snapshot"),
                });
            for (i, t) in self.tensors.iter().enumerate() {
                let (pieces, binding) = self.placed(i);
                let sources = [
                    (&self.store.shadows[0], Some(shadow_at[i])),
                    (&self.store.comp, comp_at[i]),
                    (&self.store.anchor, anchor_at[i]),
                ]
                .into_iter()
                .chain(
                    self.store.shadows[1..]
                        .iter()
                        .zip(&extra_at)
                        .map(|(b, at)| (b, Some(at[i]))),
                );
                for (buffers, start) in sources {
                    let Some(mut dst) = start else { continue };
                    for p in pieces {
                        enc.copy_buffer_to_buffer(
                            &buffers[p.buffer],
                            p.offset,
                            &buffer,
                            dst,
                            p.len * 4,
                        );
                        dst += p.len * 4;
                    }
                }
                let n = t.spec.numel();
                if let (Some(dst), true) = (param_at[i], n > 0) {
                    enc.copy_buffer_to_buffer(&binding.buffer, binding.offset, &buffer, dst, n * 4);
                }
            }
            self.queue.submit(Some(enc.finish()));
            buffer
        })?;
        // A snapshot of a lost device would only fail later, when read back.
        self.alive.check(&self.device)?;
        Ok(Snapshot {
            data: Data::Gpu {
                device: self.device.clone(),
                queue: self.queue.clone(),
                buffer,
            },
            specs: self.specs(),
            shadow_at,
            comp_at,
            anchor_at,
            extra_at,
            extra_schedules: self.extra.clone(),
            param_at,
            num_updates: self.num_updates(),
            schedule: self.schedule(),
            numerics: self.numerics(),
            policy: self.update_policy(),
            selection: self.selection.clone(),
        })
    }
}

impl Snapshot {
    /// Tensor `i`'s element count, or an error for an index past the tensors.
    fn numel(&self, i: usize) -> Result<u64> {
        self.specs
            .get(i)
            .map(TensorSpec::numel)
            .ok_or_else(|| Error::UnknownName {
                name: format!(
                    "tensor number {i} (the snapshot holds {})",
                    self.specs.len()
                ),
            })
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<f32>> {
        match &self.data {
            Data::Host(all) => {
                let start = (offset / 4) as usize;
                all.get(start..start + len as usize)
                    .map(<[f32]>::to_vec)
                    .ok_or_else(|| Error::Readback("a range past the snapshot's end".into()))
            }
            #[cfg(not(target_arch = "wasm32"))]
            Data::Gpu {
                device,
                queue,
                buffer,
            } => {
                let range = readback::Range {
                    buffer,
                    offset,
                    len,
                };
                readback::start(device, queue, &[range])?.wait(device)
            }
            #[cfg(target_arch = "wasm32")]
            Data::Gpu { .. } => Err(Error::Readback(
                "on the web a snapshot is read with `Snapshot::into_host().await` first: \
                 reads there cannot block"
                    .into(),
            )),
        }
    }

    /// Reads the whole snapshot back in one asynchronous copy, submitted at once, and resolves
    /// to the snapshot held in host memory (at once for one already there). This is how a
    /// checkpoint is taken on the web, where the per-tensor reads of [`EmaState`] cannot
    /// block. On native targets something must poll the device while the future is pending
    /// (`device.poll(wgpu::PollType::wait_indefinitely())`, or a polling thread).
    pub fn into_host(self) -> impl std::future::Future<Output = Result<Snapshot>> {
        let pending = match &self.data {
            Data::Host(_) => None,
            Data::Gpu {
                device,
                queue,
                buffer,
            } => {
                let range = readback::Range {
                    buffer,
                    offset: 0,
                    len: buffer.size() / 4,
                };
                Some(readback::start(device, queue, &[range]))
            }
        };
        async move {
            let Some(pending) = pending else {
                return Ok(self);
            };
            let all = pending?.finish().await?;
            Ok(Snapshot {
                data: Data::Host(all),
                ..self
            })
        }
    }

    /// True once the values are in host memory ([`into_host`](Self::into_host)).
    pub fn is_on_host(&self) -> bool {
        matches!(self.data, Data::Host(_))
    }
}

impl EmaState for Snapshot {
    fn specs(&self) -> Vec<TensorSpec> {
        self.specs.clone()
    }
    fn num_updates(&self) -> u64 {
        self.num_updates
    }
    fn schedule(&self) -> Schedule {
        self.schedule
    }
    fn numerics(&self) -> Numerics {
        self.numerics
    }
    fn policy(&self) -> Policy {
        self.policy
    }
    fn selection(&self) -> String {
        self.selection.clone()
    }
    fn read_shadow(&self, i: usize) -> Result<Vec<f32>> {
        let n = self.numel(i)?;
        self.read(self.shadow_at[i], n)
    }
    fn ema_count(&self) -> usize {
        1 + self.extra_at.len()
    }
    fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        match k {
            0 => Some(self.schedule),
            _ => self.extra_schedules.get(k - 1).copied(),
        }
    }
    fn read_ema_shadow(&self, k: usize, i: usize) -> Result<Vec<f32>> {
        let at = self
            .extra_at
            .get(k.wrapping_sub(1))
            .ok_or_else(|| Error::UnknownName {
                name: format!("EMA number {k}"),
            })?;
        let n = self.numel(i)?;
        self.read(at[i], n)
    }
    fn compensated(&self) -> bool {
        self.comp_at.iter().any(Option::is_some)
    }
    fn read_compensation(&self, i: usize) -> Result<Option<Vec<f32>>> {
        let n = self.numel(i)?;
        match self.comp_at[i] {
            Some(at) => self.read(at, n).map(Some),
            None => Ok(None),
        }
    }
    fn read_anchor(&self, i: usize) -> Result<Option<Vec<f32>>> {
        let n = self.numel(i)?;
        match self.anchor_at[i] {
            Some(at) => self.read(at, n).map(Some),
            None => Ok(None),
        }
    }
    fn read_param(&self, i: usize) -> Result<Option<Vec<f32>>> {
        let n = self.numel(i)?;
        match self.param_at[i] {
            Some(at) => self.read(at, n).map(Some),
            None => Ok(None),
        }
    }
}
