//! Values between the host and the GPU: reading shadows back, writing shadows, compensation
//! terms and parameters, and restoring a checkpoint.

use super::*;

impl GpuEma {
    /// The index of `name`, after checking that `len` values fit its shape.
    fn index_with_len(&self, name: &str, len: usize) -> Result<usize> {
        let i = self.index(name)?;
        let spec = &self.tensors[i].spec;
        if len as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: spec.numel(),
                got: len as u64,
            });
        }
        Ok(i)
    }

    pub(super) fn ranges<'s>(
        &'s self,
        buffers: &'s [wgpu::Buffer],
        which: &[usize],
    ) -> Vec<readback::Range<'s>> {
        which
            .iter()
            .flat_map(|&i| self.placed(i).0.iter())
            .map(|p| readback::Range {
                buffer: &buffers[p.buffer],
                offset: p.offset,
                len: p.len,
            })
            .collect()
    }

    fn start_read(&self, which: &[usize]) -> Result<readback::Pending> {
        readback::start(
            &self.device,
            &self.queue,
            &self.ranges(self.shadow_buffers(), which),
        )
    }

    fn ema_buffers(&self, k: usize) -> Result<&[wgpu::Buffer]> {
        self.store
            .shadows
            .get(k)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::UnknownName {
                name: format!("EMA number {k} (there are {})", self.ema_count()),
            })
    }

    /// Reads every shadow of EMA `k` back, blocking (`k = 0` is
    /// [`read_shadows_blocking`](Self::read_shadows_blocking)). Not on the web: use
    /// [`read_ema`](Self::read_ema) there.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_ema_blocking(&self, k: usize) -> Result<HostTensors> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let ranges = self.ranges(self.ema_buffers(k)?, &all);
        let flat = readback::start(&self.device, &self.queue, &ranges)?.wait(&self.device)?;
        Ok(arena::split(&self.specs(), &flat))
    }

    /// Reads every shadow of EMA `k` back, asynchronously (see [`read_shadows`](Self::read_shadows)).
    pub fn read_ema(
        &self,
        k: usize,
    ) -> impl std::future::Future<Output = Result<HostTensors>> + use<> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let pending = self
            .ema_buffers(k)
            .and_then(|b| readback::start(&self.device, &self.queue, &self.ranges(b, &all)));
        let specs = self.specs();
        async move {
            let flat = pending?.finish().await?;
            Ok(arena::split(&specs, &flat))
        }
    }

    /// Overwrites the shadow of `name` in EMA `k` (restoring a checkpoint).
    pub fn write_ema_shadow(&mut self, k: usize, name: &str, values: &[f32]) -> Result<()> {
        self.not_swapped()?;
        if k == 0 {
            return self.write_shadow(name, values);
        }
        let i = self.index_with_len(name, values.len())?;
        self.write_pieces(self.ema_buffers(k)?, i, values);
        Ok(())
    }

    /// Reads every shadow back, blocking until the steps submitted so far have run (not
    /// those submitted later). Names are the parameters' names. Not on the web, where nothing
    /// may block: use [`read_shadows`](Self::read_shadows) there.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_shadows_blocking(&self) -> Result<HostTensors> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let flat = self.start_read(&all)?.wait(&self.device)?;
        Ok(arena::split(&self.specs(), &flat))
    }

    /// Reads the shadow of `name` back, blocking. Not on the web.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_shadow_blocking(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.index(name)?;
        self.start_read(&[i])?.wait(&self.device)
    }

    /// Reads every shadow back, asynchronously: the copy is submitted at once and the future
    /// resolves once the GPU has run it. In a browser (WebGPU) it resolves by itself: this is
    /// the readback to use there. On native targets something must poll the device meanwhile
    /// (`device.poll(wgpu::PollType::Poll)` in your loop, or a thread waiting);
    /// [`read_shadows_blocking`](Self::read_shadows_blocking) does it for you.
    pub fn read_shadows(&self) -> impl std::future::Future<Output = Result<HostTensors>> + use<> {
        let all: Vec<usize> = (0..self.tensors.len()).collect();
        let pending = self.start_read(&all);
        let specs = self.specs();
        async move {
            let flat = pending?.finish().await?;
            Ok(arena::split(&specs, &flat))
        }
    }

    /// Overwrites the shadow of `name` from the host (restoring a checkpoint); lands at the
    /// next submit on the queue, before that submit's commands.
    pub fn write_shadow(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.not_swapped()?;
        let i = self.index_with_len(name, values.len())?;
        self.write_pieces(self.shadow_buffers(), i, values);
        // The old compensation term belongs to the old shadow.
        if self.is_compensated() {
            let zeros = vec![0.0f32; values.len()];
            self.write_pieces(&self.store.comp, i, &zeros);
        }
        Ok(())
    }

    fn write_pieces(&self, buffers: &[wgpu::Buffer], i: usize, values: &[f32]) {
        let mut at = 0usize;
        for p in self.placed(i).0 {
            let part = &values[at..at + p.len as usize];
            self.queue
                .write_buffer(&buffers[p.buffer], p.offset, bytemuck::cast_slice(part));
            at += p.len as usize;
        }
    }

    /// Overwrites the compensation term of `name` (restoring a checkpoint of a compensated
    /// EMA; call after [`write_shadow`](Self::write_shadow), which zeroes it).
    pub fn write_compensation(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.not_swapped()?;
        let i = self.index(name)?;
        let spec = &self.tensors[i].spec;
        if !self.is_compensated() {
            return Err(Error::NotCompensated {
                name: spec.name.clone(),
            });
        }
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                name: spec.name.clone(),
                expected: spec.numel(),
                got: values.len() as u64,
            });
        }
        self.write_pieces(&self.store.comp, i, values);
        Ok(())
    }

    /// Restores shadows and the step counter from a training checkpoint, so the next updates
    /// continue exactly as if training had never stopped. Every tracked tensor's shadow (and
    /// for BEMA its anchor `theta_0`) must be present with its shape, and no shadow of an untracked tensor may be; the checkpoint's
    /// schedule, numerics, policy and further EMAs must be this EMA's, and its values finite
    /// ([`restore_with`](Self::restore_with) relaxes the last two). All is checked before
    /// anything is written. Parameters are restored with [`write_params`](Self::write_params)
    /// (`checkpoint.params_for(&ema.specs())`).
    pub fn restore(&mut self, checkpoint: &crate::checkpoint::Checkpoint) -> Result<()> {
        self.restore_with(checkpoint, crate::checkpoint::RestoreOptions::default())
    }

    /// [`restore`](Self::restore) with options: non-finite values, another configuration.
    pub fn restore_with(
        &mut self,
        checkpoint: &crate::checkpoint::Checkpoint,
        opts: crate::checkpoint::RestoreOptions,
    ) -> Result<()> {
        self.not_swapped()?;
        let specs = self.specs();
        // Everything borrowed from the loaded file and checked first; then written
        // one tensor at a time, flushing the queue's staging every 64 MiB, so host memory
        // stays near one tensor whatever the model's size.
        let config = crate::checkpoint::Config::of(&self.stepper, &self.extra, &self.selection);
        let set = checkpoint.restore_set(&specs, self.is_compensated(), &config, opts)?;
        let mut staged = 0usize;
        let mut flush = |ema: &Self, bytes: usize| {
            staged += bytes;
            if staged >= 64 << 20 {
                ema.queue.submit(None);
                staged = 0;
            }
        };
        for (spec, values) in specs.iter().zip(&set.shadows) {
            self.write_shadow(&spec.name, values)?;
            flush(self, values.len() * 4);
        }
        for (spec, values) in specs.iter().zip(set.comps.iter().flatten()) {
            self.write_compensation(&spec.name, values)?;
            flush(self, values.len() * 4);
        }
        for (k, ema) in set.extras.iter().enumerate() {
            for (spec, values) in specs.iter().zip(ema) {
                self.write_ema_shadow(k + 1, &spec.name, values)?;
                flush(self, values.len() * 4);
            }
        }
        for (i, values) in set.anchors.iter().flatten().enumerate() {
            self.write_pieces(&self.store.anchor, i, values);
            flush(self, values.len() * 4);
        }
        self.stepper.set_num_updates(set.num_updates);
        Ok(())
    }

    /// Writes parameter values from the host into the tracked parameters (the arena, or user
    /// buffers, which then need `BufferUsages::COPY_DST`). Every name and length is checked
    /// before anything is written. Lands at the next submit on the queue.
    pub fn write_params(&self, params: &HostTensors) -> Result<()> {
        self.not_swapped()?;
        let mut writes = Vec::new();
        for (spec, values) in params.iter() {
            let i = self.index(&spec.name)?;
            let numel = self.tensors[i].spec.numel();
            if values.len() as u64 != numel {
                return Err(Error::LengthMismatch {
                    name: spec.name.clone(),
                    expected: numel,
                    got: values.len() as u64,
                });
            }
            let b = self.placed(i).1;
            if b.dtype != ParamDtype::F32 {
                return Err(Error::HalfPrecision {
                    name: spec.name.clone(),
                    what: "write_params",
                });
            }
            let (buffer, offset) = (&b.buffer, b.offset);
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
}
