//! Where things are bound: moving a tracked tensor's parameters to another buffer
//! ([`GpuEma::rebind`]), and a shadow's binding for the caller's own shaders.

use std::num::NonZeroU64;

use super::*;

impl GpuEma {
    /// Points tracked tensor `name` at another buffer and offset (frameworks such as burn hand
    /// out a new one after each optimizer step). Arena tensors cannot be rebound.
    ///
    /// Cheap: the tensor's rows of the chunk table are rewritten on the host and uploaded at
    /// the next record; a buffer that one of the step's dispatches already binds (or has a
    /// free slot for) creates no GPU resource, and sets of buffers seen before reuse their
    /// bind groups. The rows reach the GPU with `queue.write_buffer`, that is at the next
    /// submit on the queue: every step of one submit reads the bindings current at that
    /// submit, so rebind between submits, not between two steps recorded for the same one.
    /// Overlaps with other tracked tensors are checked when the next pass is recorded
    /// ([`Error::Overlap`]), not here: a framework moving every tensor may pass through one.
    pub fn rebind(&mut self, name: &str, buffer: &wgpu::Buffer, byte_offset: u64) -> Result<()> {
        if self.swapped.is_some() {
            return Err(Error::Swapped);
        }
        let i = self.index(name)?;
        let t = &self.tensors[i];
        if t.in_arena {
            return Err(Error::NotRebindable {
                name: name.to_string(),
            });
        }
        let dtype = self.placed(i).1.dtype;
        bindings::validate_binding(&t.spec, buffer, byte_offset, dtype)?;
        let now = self.placed(i).1;
        if now.buffer == *buffer && now.offset == byte_offset {
            return Ok(());
        }
        if now.buffer != *buffer {
            super::device::check_same_device(&self.device, name, buffer)?;
        }
        self.moved = true;
        let binding = param_binding(buffer, byte_offset, dtype);
        self.work
            .rebind(&self.device, &self.pipes, &self.store, i, binding);
        Ok(())
    }

    /// A binding of the shadow of `name`, for your own shaders (evaluating with the EMA
    /// weights on the GPU without copying them, or a target network's forward pass reading
    /// them every step). Every shadow is one contiguous run starting at a storage-aligned
    /// offset, except those of tensors larger than one storage binding
    /// ([`Error::NotContiguous`]). The buffer and the offset are the same for the EMA's whole
    /// life (restores, swaps and rebinds of the parameters write into them, never move them):
    /// a bind group made once stays valid.
    pub fn shadow_binding(&self, name: &str) -> Result<wgpu::BufferBinding<'_>> {
        match self.placed(self.index(name)?).0 {
            [] => Err(Error::EmptyTensor {
                name: name.to_string(),
            }),
            [p] => Ok(wgpu::BufferBinding {
                buffer: &self.shadow_buffers()[p.buffer],
                offset: p.offset,
                size: NonZeroU64::new(p.len * 4),
            }),
            pieces => Err(Error::NotContiguous {
                name: name.to_string(),
                pieces: pieces.len(),
            }),
        }
    }
}
