//! Evaluating with the EMA weights: swap and copy into the parameters, on the GPU.

use super::*;

impl GpuEma {
    /// Records an exchange of every parameter with its shadow, on the GPU in one pass:
    /// evaluate with the EMA weights, then call it again to get the raw weights (and the
    /// shadows) back **bit for bit** (bits are moved, not added and subtracted as Keras'
    /// `SwapEMAWeights` does). While swapped, updates are refused with [`Error::Swapped`]: a
    /// training step would average the shadows into themselves. Tensors with f16/bf16
    /// parameters cannot be swapped ([`Error::HalfPrecision`]: an f32 shadow does not fit).
    pub fn record_swap(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if let Some(name) = self.half_tensor() {
            return Err(Error::HalfPrecision {
                name: name.to_string(),
                what: "swaps",
            });
        }
        self.record_pass(encoder, Op::Swap, [1.0; MAX_EMAS])?;
        self.swapped = !self.swapped;
        Ok(())
    }

    /// [`record_swap`](Self::record_swap), submitted on the queue.
    pub fn swap(&mut self) -> Result<wgpu::SubmissionIndex> {
        let device = self.device.clone();
        let index = crate::readback::scoped(&device, || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wgpu-ema swap"),
            });
            self.record_swap(&mut encoder)?;
            Ok(self.queue.submit(Some(encoder.finish())))
        })??;
        self.alive.check(&self.device)?;
        Ok(index)
    }

    /// True between two swaps: the parameters hold the EMA weights.
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Records `param = shadow` for every tensor (TensorFlow's `variables_to_restore` on the
    /// GPU, diffusers' `copy_to`): the raw parameters are overwritten; keep them with
    /// [`record_swap`](Self::record_swap) instead if training goes on. Into f16/bf16
    /// parameters the f32 shadows are rounded to nearest, ties to even (done by hand in the
    /// shader: WGSL leaves its own conversions' rounding to the implementation).
    pub fn record_copy_to_params(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        self.record_pass(encoder, Op::ToParams, [1.0; MAX_EMAS])
    }
}
