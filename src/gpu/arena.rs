//! A parameter arena: one crate-allocated buffer holding many named tensors, the fast path.

use std::num::NonZeroU64;

use crate::error::{Error, Result};
use crate::plan::align_up;
use crate::readback;
use crate::tensors::{HostTensors, TensorSpec};

/// Many named f32 tensors in one storage buffer that the training code reads and writes.
///
/// Every tensor starts at a multiple of the device's `min_storage_buffer_offset_alignment`
/// (and of 16 bytes), so a training shader can bind each one on its own
/// ([`ParamArena::binding`]); the EMA updates the whole arena with `vec4<f32>` loads in one
/// dispatch per `max_storage_buffer_binding_size` chunk.
///
/// ```no_run
/// # fn main() -> wgpu_ema::Result<()> {
/// use wgpu_ema::{GpuContext, ParamArena, TensorSpec};
/// let ctx = GpuContext::new()?;
/// let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [4, 3]), TensorSpec::new("b", [3])])?;
/// arena.write(&ctx.queue, "b", &[0.1, 0.2, 0.3])?;
/// let b = arena.binding("b")?; // bind this in your optimizer's shader
/// # let _ = b; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ParamArena {
    buffer: wgpu::Buffer,
    specs: Vec<TensorSpec>,
    offsets: Vec<u64>,
    size: u64,
}

impl ParamArena {
    /// Allocates an arena for `specs` on `device`, zero-filled. Fails on duplicate names or an
    /// arena larger than the device's `max_buffer_size`.
    pub fn new(device: &wgpu::Device, specs: impl IntoIterator<Item = TensorSpec>) -> Result<Self> {
        let lim = super::plan_limits(device);
        let specs: Vec<TensorSpec> = specs.into_iter().collect();
        let mut offsets = Vec::with_capacity(specs.len());
        let mut at = 0u64;
        for (i, s) in specs.iter().enumerate() {
            if specs[..i].iter().any(|o| o.name == s.name) {
                return Err(Error::DuplicateName {
                    name: s.name.clone(),
                });
            }
            offsets.push(at);
            let end = u128::from(s.numel()) * 4 + u128::from(at);
            if end > u128::from(lim.max_buffer) {
                return Err(Error::TooLarge {
                    what: format!("parameter arena (at tensor `{}`)", s.name),
                    bytes: end,
                    limit: lim.max_buffer,
                });
            }
            // Fits u64: at most max_buffer.
            let end = end as u64;
            at = align_up(end, lim.align);
        }
        let size = at.max(lim.align);
        if size > lim.max_buffer {
            return Err(Error::TooLarge {
                what: "parameter arena".into(),
                bytes: size.into(),
                limit: lim.max_buffer,
            });
        }
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-ema parameter arena"),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Ok(Self {
            buffer,
            specs,
            offsets,
            size,
        })
    }

    /// The buffer (usage `STORAGE | COPY_DST | COPY_SRC`).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The tensors, in order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The arena's size in bytes (padded).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    fn index(&self, name: &str) -> Result<usize> {
        crate::tensors::index_of(&self.specs, name)
    }

    /// The byte offset of tensor `name`.
    pub fn offset(&self, name: &str) -> Result<u64> {
        Ok(self.offsets[self.index(name)?])
    }

    /// A binding of exactly tensor `name`, for the training code's bind groups. A tensor with
    /// no elements gets a 4-byte binding (WebGPU forbids empty ones).
    pub fn binding(&self, name: &str) -> Result<wgpu::BufferBinding<'_>> {
        let i = self.index(name)?;
        let bytes = (self.specs[i].numel() * 4).max(4);
        Ok(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offsets[i],
            size: NonZeroU64::new(bytes),
        })
    }

    /// Writes `values` into tensor `name` (lands at the next submit on `queue`).
    pub fn write(&self, queue: &wgpu::Queue, name: &str, values: &[f32]) -> Result<()> {
        let i = self.index(name)?;
        let spec = &self.specs[i];
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: spec.numel(),
                got: values.len() as u64,
            });
        }
        if !values.is_empty() {
            queue.write_buffer(&self.buffer, self.offsets[i], bytemuck::cast_slice(values));
        }
        Ok(())
    }

    fn ranges(&self) -> Vec<readback::Range<'_>> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(s, &offset)| readback::Range {
                buffer: &self.buffer,
                offset,
                len: s.numel(),
            })
            .collect()
    }

    /// Reads every tensor back (blocking; waits only for work submitted so far). Not on the
    /// web: use [`read`](Self::read) there.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_blocking(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<HostTensors> {
        let flat = readback::start(device, queue, &self.ranges())?.wait(device)?;
        Ok(split(&self.specs, &flat))
    }

    /// Reads every tensor back, asynchronously: the copy is submitted at once, and sees the
    /// work submitted before it. In a browser the future resolves by itself; on native
    /// targets something must poll the device meanwhile.
    pub fn read(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
    ) -> impl std::future::Future<Output = Result<HostTensors>> + use<> {
        let pending = readback::start(device, queue, &self.ranges());
        let specs = self.specs.clone();
        async move {
            let flat = pending?.finish().await?;
            Ok(split(&specs, &flat))
        }
    }
}

/// Cuts a flat readback into named tensors.
pub(crate) fn split(specs: &[TensorSpec], flat: &[f32]) -> HostTensors {
    let mut at = 0usize;
    let mut parts = Vec::with_capacity(specs.len());
    for s in specs {
        let n = s.numel() as usize;
        parts.push((s.clone(), flat[at..at + n].to_vec()));
        at += n;
    }
    HostTensors::from_parts(parts)
}
