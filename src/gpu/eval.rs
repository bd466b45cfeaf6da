//! Evaluating with the averaged weights: swaps and copies into the parameters of the EMA's
//! shadows or of BEMA's corrected weights, and reading BEMA's weights back.

use super::*;

impl GpuEma {
    /// Records an exchange of every parameter with its shadow, on the GPU in one pass:
    /// evaluate with the EMA weights, then call it again to get the raw weights (and the
    /// shadows) back **bit for bit** (bits are moved, not added and subtracted as Keras'
    /// `SwapEMAWeights` does). While swapped, updates are refused with [`Error::Swapped`]: a
    /// training step would average the shadows into themselves. Tensors with f16/bf16
    /// parameters cannot be swapped ([`Error::HalfPrecision`]: an f32 shadow does not fit).
    /// After [`record_swap_bema`](Self::record_swap_bema), this swaps BEMA's weights back.
    pub fn record_swap(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        let target = self.swapped.unwrap_or(Target::Ema);
        self.record_exchange(encoder, target)
    }

    fn record_exchange(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        target: Target,
    ) -> Result<()> {
        if let Some(name) = self.half_tensor() {
            return Err(Error::HalfPrecision {
                name: name.to_string(),
                what: "swaps",
            });
        }
        self.record_pass_for(encoder, Op::Swap, StepValues::new([1.0; MAX_EMAS]), target)?;
        self.swapped = match self.swapped {
            Some(_) => None,
            None => Some(target),
        };
        Ok(())
    }

    /// [`record_swap`](Self::record_swap), submitted on the queue.
    pub fn swap(&mut self) -> Result<wgpu::SubmissionIndex> {
        self.submit_with("wgpu-ema swap", |ema, encoder| ema.record_swap(encoder))
    }

    /// Records `f` into a new encoder and submits it, with the device checks of
    /// [`update`](Self::update).
    fn submit_with(
        &mut self,
        label: &str,
        f: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<wgpu::SubmissionIndex> {
        let device = self.device.clone();
        let index = crate::readback::scoped(&device, || {
            let mut encoder = device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            f(self, &mut encoder)?;
            Ok(self.queue.submit(Some(encoder.finish())))
        })??;
        self.alive.check(&self.device)?;
        Ok(index)
    }

    /// True between two swaps: the parameters hold the EMA weights.
    pub fn is_swapped(&self) -> bool {
        self.swapped.is_some()
    }

    /// Records `param = shadow` for every tensor (TensorFlow's `variables_to_restore` on the
    /// GPU, diffusers' `copy_to`): the raw parameters are overwritten; keep them with
    /// [`record_swap`](Self::record_swap) instead if training goes on. Into f16/bf16
    /// parameters the f32 shadows are rounded to nearest, ties to even (done by hand in the
    /// shader: WGSL leaves its own conversions' rounding to the implementation).
    pub fn record_copy_to_params(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        self.not_swapped()?;
        self.record_pass(encoder, Op::ToParams, [1.0; MAX_EMAS])
    }

    /// BEMA's correction weight `alpha_t` for weights asked for now (`t` of the last update:
    /// see [`Bema`](crate::schedule::Bema)); `None` unless the schedule is BEMA.
    pub fn bema_bias_weight(&self) -> Option<f64> {
        self.stepper.bias_weight()
    }

    /// Records the computation of BEMA's weights, `EMA + alpha_t (param - theta_0)`, from the
    /// parameters as they are when it runs, into the EMA's own buffer for them.
    fn record_bema_fill(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        let Some(a) = self.stepper.bias_weight() else {
            return Err(Error::InvalidConfig(format!(
                "BEMA's weights asked of an EMA whose schedule is {}: build it with \
                 Schedule::Bema",
                self.stepper.schedule().describe()
            )));
        };
        let mut values = [1.0f32; MAX_EMAS];
        values[0] = a as f32;
        self.record_pass(encoder, Op::Bema, values)
    }

    /// Records BEMA's weights (`EMA_t + alpha_t (theta_t - theta_0)`, from the parameters as
    /// they are when it runs) and their exchange with the parameters: evaluate with BEMA's
    /// weights, then [`record_swap`](Self::record_swap) (or this again) gives the raw
    /// parameters back bit for bit. The EMA and `theta_0` are not touched. Needs a
    /// [`Schedule::Bema`] EMA; f16/bf16 parameters are refused as by `record_swap`.
    pub fn record_swap_bema(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.swapped.is_some() {
            return self.record_swap(encoder);
        }
        if let Some(name) = self.half_tensor() {
            return Err(Error::HalfPrecision {
                name: name.to_string(),
                what: "swaps",
            });
        }
        self.record_bema_fill(encoder)?;
        self.record_exchange(encoder, Target::Bema)
    }

    /// [`record_swap_bema`](Self::record_swap_bema), submitted on the queue.
    pub fn swap_bema(&mut self) -> Result<wgpu::SubmissionIndex> {
        self.submit_with("wgpu-ema swap (BEMA)", |ema, encoder| {
            ema.record_swap_bema(encoder)
        })
    }

    /// Records `param = EMA_t + alpha_t (param - theta_0)` for every tensor: BEMA's weights
    /// copied into the parameters (rounded to nearest even into f16/bf16 ones), which are
    /// overwritten. Needs a [`Schedule::Bema`] EMA.
    pub fn record_copy_bema_to_params(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<()> {
        self.not_swapped()?;
        self.record_bema_fill(encoder)?;
        self.record_pass_for(
            encoder,
            Op::ToParams,
            StepValues::new([1.0; MAX_EMAS]),
            Target::Bema,
        )
    }

    /// Computes BEMA's weights on the GPU from the parameters as they are now and reads them
    /// back, blocking, by tensor name. Not on the web: use [`read_bema`](Self::read_bema)
    /// there.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_bema_blocking(&mut self) -> Result<HostTensors> {
        self.not_swapped()?;
        self.submit_with("wgpu-ema BEMA weights", |ema, encoder| {
            ema.record_bema_fill(encoder)
        })?;
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let ranges = self.ranges(&self.store.bema_out, &all);
        let flat = readback::start(&self.device, &self.queue, &ranges)?.wait(&self.device)?;
        Ok(arena::split(&self.specs(), &flat))
    }

    /// Computes BEMA's weights on the GPU from the parameters as they are now and reads them
    /// back asynchronously (see [`read_shadows`](Self::read_shadows) for who polls).
    pub fn read_bema(&mut self) -> impl std::future::Future<Output = Result<HostTensors>> + use<> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let pending = self
            .not_swapped()
            .and_then(|()| {
                self.submit_with("wgpu-ema BEMA weights", |ema, encoder| {
                    ema.record_bema_fill(encoder)
                })
            })
            .and_then(|_| {
                readback::start(
                    &self.device,
                    &self.queue,
                    &self.ranges(&self.store.bema_out, &all),
                )
            });
        let specs = self.specs();
        async move {
            let flat = pending?.finish().await?;
            Ok(arena::split(&specs, &flat))
        }
    }
}
