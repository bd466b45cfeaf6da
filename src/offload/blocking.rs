//! What waits for the device and the host (native targets): draining the ring, settling,
//! reads, swaps, copies into the parameters and parameter reads, each blocking the calling
//! thread until done. The web's counterparts are in `web.rs`.

use super::*;

impl OffloadedEma {
    /// Waits for every submitted sample to be applied on the host; returns how many slots hold
    /// samples of encoders not submitted (those are not waited for).
    ///
    /// Once the queue is idle, a submitted sample's map callback has run or is running on
    /// whichever thread polled the device: a slot still `Recorded` a moment after that belongs
    /// to an encoder not submitted (yet).
    pub(super) fn drain(&self) -> Result<usize> {
        const UNSUBMITTED: std::time::Duration = std::time::Duration::from_millis(500);
        let mut only_recorded_since = None;
        loop {
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Device(e.to_string()))?;
            let p = self.shared.progress()?;
            if let Some(e) = &p.error {
                return Err(Error::Device(e.clone()));
            }
            let mapped = p.slots.contains(&Slot::Mapped);
            let recorded = p.slots.iter().filter(|&&s| s == Slot::Recorded).count();
            if !mapped && recorded == 0 {
                return Ok(0);
            }
            if mapped {
                only_recorded_since = None;
            } else if only_recorded_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                > UNSUBMITTED
            {
                return Ok(recorded);
            }
            let wait = std::time::Duration::from_millis(1);
            drop(self.shared.changed.wait_timeout(p, wait));
        }
    }

    /// [`drain`](Self::drain), then an error if an encoder holding a recorded update was not
    /// submitted: what follows (a read, a save, a swap, a restore) would not see its sample.
    pub(super) fn drain_all(&self) -> Result<()> {
        match self.drain()? {
            0 => Ok(()),
            n => Err(Error::InvalidConfig(format!(
                "{n} recorded offloaded update sample(s) are in an encoder not yet submitted: \
                 submit (or drop) the encoders that recorded updates first"
            ))),
        }
    }

    /// Waits until every sample submitted so far is applied on the host (blocking), sampling
    /// nothing more: for a loop that wants no sample skipped, at the cost of waiting for the
    /// host each step. Samples in encoders not yet submitted are not waited for.
    pub fn catch_up(&self) -> Result<()> {
        self.check()?;
        self.drain().map(|_| ())
    }

    /// Samples every chunk of `list` with its gap, as many at a time as there are free slots,
    /// blocking until all are applied.
    fn sweep(&mut self, list: &[usize]) -> Result<()> {
        let mut rest = list.iter().copied().peekable();
        while rest.peek().is_some() {
            let free = self.free_slots()?;
            if free.is_empty() {
                return Err(Error::InvalidConfig(
                    "every offload slot holds a sample recorded into an encoder that was never \
                     submitted: submit the encoders that recorded updates"
                        .into(),
                ));
            }
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("wgpu-ema offload sweep"),
                });
            let mut slots = free.into_iter().peekable();
            while let (Some(&slot), Some(c)) = (slots.peek(), rest.peek().copied()) {
                rest.next();
                if self.record_sample(&mut encoder, c, slot)? {
                    slots.next();
                }
            }
            self.queue.submit(Some(encoder.finish()));
            self.drain_all()?;
        }
        Ok(())
    }

    /// Brings every shadow to the current call, blocking: waits for the samples in flight,
    /// then samples each chunk not sampled at the last update (with its gap, as the rotation
    /// would have). Afterwards the host shadows are the EMA at [`num_updates`](Self::num_updates)
    /// and can be read or saved. Taking it changes the run as one more sample would (no more:
    /// a model of one chunk sampled at every update is settled already).
    pub fn settle(&mut self) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        self.drain_all()?;
        self.reclaim()?;
        let stale: Vec<usize> = (0..self.gaps.len())
            .filter(|&c| !self.gaps[c].is_empty())
            .collect();
        self.sweep(&stale)
    }

    /// Settles ([`settle`](Self::settle)) and returns EMA 0's shadows, from host memory.
    pub fn read_shadows(&mut self) -> Result<HostTensors> {
        self.read_ema(0)
    }

    /// Settles and returns EMA `k`'s shadows (0: the builder's schedule).
    pub fn read_ema(&mut self, k: usize) -> Result<HostTensors> {
        self.settle()?;
        self.host_shadows(k)
    }

    /// Exchanges the parameters and EMA 0's shadows, exactly, chunk by chunk through the ring
    /// (blocking): call it before evaluating and again after, as
    /// [`GpuEma::swap`](crate::GpuEma::swap). Updates are refused in between. Settles first.
    /// Parameter buffers need `COPY_DST`; f16/bf16 parameters are refused.
    pub fn swap(&mut self) -> Result<()> {
        self.all_f32("swaps")?;
        if self.swapped {
            self.drain_all()?;
        } else {
            self.settle()?;
        }
        let slots = self.free_slots()?;
        if slots.len() != self.layout.slots.len() {
            return Err(Error::InvalidConfig(
                "an offload slot is busy with an unsubmitted encoder's sample".into(),
            ));
        }
        let chunks: Vec<usize> = (0..self.layout.chunks.len()).collect();
        // A ring's worth at a time: copy the parameters out, map, write the shadows in their
        // place (they land at the batch's submit, after the copies ran), keep the parameters.
        for batch in chunks.chunks(slots.len().max(1)) {
            let mut encoder = self.device.create_command_encoder(&Default::default());
            for (&c, &slot) in batch.iter().zip(&slots) {
                let chunk = &self.layout.chunks[c];
                copy_chunk(&self.sources, &mut encoder, chunk, &self.layout.slots[slot]);
            }
            self.queue.submit(Some(encoder.finish()));
            let maps: Vec<(usize, u64)> = batch
                .iter()
                .zip(&slots)
                .map(|(&c, &slot)| (slot, self.layout.chunks[c].bytes))
                .collect();
            let exchanged = self.with_mapped(&maps, |views| {
                let mut shadows = self.shared.shadows()?;
                let mut scratch = Vec::new();
                for (&c, view) in batch.iter().zip(views) {
                    for piece in &self.layout.chunks[c].pieces {
                        let src = &self.sources[piece.tensor];
                        let p = host::params(view, piece, src.dtype, &mut scratch);
                        let range = piece.start as usize..(piece.start + piece.len) as usize;
                        let s = &mut shadows.emas[0][piece.tensor][range];
                        self.queue.write_buffer(
                            &src.buffer,
                            src.offset + piece.start * 4,
                            bytemuck::cast_slice(s),
                        );
                        s.copy_from_slice(p);
                    }
                }
                Ok(())
            });
            if let Err(e) = exchanged {
                // Some chunks may be exchanged and others not: nothing after this is sound.
                self.shared.progress()?.error.get_or_insert_with(|| {
                    format!(
                        "a swap failed midway ({e}); parameters and shadows are partly exchanged"
                    )
                });
                return Err(e);
            }
            self.queue.submit(None);
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(e.to_string()))?;
        self.swapped = !self.swapped;
        Ok(())
    }

    /// Writes EMA 0's shadows into the parameters (settled first), chunk by chunk, blocking
    /// after each ring's worth so that staging stays bounded. Parameter buffers need
    /// `COPY_DST`; f16/bf16 parameters are refused.
    pub fn copy_to_params(&mut self) -> Result<()> {
        self.all_f32("copies into the parameters")?;
        self.settle()?;
        let budget = self.ring_bytes.max(4);
        let mut staged = 0;
        let shadows = self.shared.shadows()?;
        for chunk in &self.layout.chunks {
            for piece in &chunk.pieces {
                let src = &self.sources[piece.tensor];
                let s = &shadows.emas[0][piece.tensor]
                    [piece.start as usize..(piece.start + piece.len) as usize];
                self.queue.write_buffer(
                    &src.buffer,
                    src.offset + piece.start * 4,
                    bytemuck::cast_slice(s),
                );
            }
            staged += chunk.bytes;
            if staged >= budget {
                self.queue.submit(None);
                self.device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Device(e.to_string()))?;
                staged = 0;
            }
        }
        drop(shadows);
        self.queue.submit(None);
        Ok(())
    }

    /// Reads tensor `i`'s parameters back through a free slot, blocking, widened to f32.
    pub(super) fn read_param_blocking(&self, i: usize) -> Result<Vec<f32>> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        let spec = self.specs.get(i).ok_or_else(|| Error::UnknownName {
            name: format!("tensor number {i}"),
        })?;
        let src = &self.sources[i];
        let mut out = Vec::with_capacity(spec.numel() as usize);
        let pieces = self
            .layout
            .chunks
            .iter()
            .flat_map(|c| c.pieces.iter())
            .filter(|p| p.tensor == i);
        for piece in pieces {
            let slot = {
                let mut p = self.shared.progress()?;
                let Some(slot) = p.slots.iter().position(|&s| s == Slot::Free) else {
                    return Err(Error::InvalidConfig(
                        "no free offload slot to read parameters through: settle first".into(),
                    ));
                };
                p.slots[slot] = Slot::Recorded;
                slot
            };
            let buffer = &self.layout.slots[slot];
            let mut encoder = self.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(
                &src.buffer,
                src.offset + piece.start * src.dtype.size(),
                buffer,
                0,
                piece.bytes,
            );
            self.queue.submit(Some(encoder.finish()));
            let mut scratch = Vec::new();
            let read = self.with_mapped(&[(slot, piece.bytes)], |views| {
                let alone = piece.at_start();
                out.extend_from_slice(host::params(views[0], &alone, src.dtype, &mut scratch));
                Ok(())
            });
            if let Some(b) = self.shared.progress()?.slots.get_mut(slot) {
                *b = Slot::Free;
            }
            read?;
        }
        Ok(out)
    }

    /// Maps the first `bytes` of each `(slot, bytes)` (copies into them submitted), waits, and
    /// runs `f` on the mapped bytes; every slot that mapped is unmapped afterwards, whatever
    /// happened.
    fn with_mapped(
        &self,
        maps: &[(usize, u64)],
        f: impl FnOnce(&[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, &(slot, bytes)) in maps.iter().enumerate() {
            let tx = tx.clone();
            self.layout.slots[slot]
                .slice(0..bytes)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send((i, r.map_err(|e| e.to_string())));
                });
        }
        drop(tx);
        let polled = self
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Device(e.to_string()));
        let mut mapped = vec![Err("the map did not complete".to_string()); maps.len()];
        for (i, r) in rx.iter().take(maps.len()) {
            mapped[i] = r;
        }
        let outcome = polled.and_then(|()| {
            let mut views = Vec::with_capacity(maps.len());
            for (&(slot, bytes), r) in maps.iter().zip(&mapped) {
                r.clone().map_err(Error::Readback)?;
                let view = self.layout.slots[slot]
                    .slice(0..bytes)
                    .get_mapped_range()
                    .map_err(|e| Error::Readback(e.to_string()))?;
                views.push(view);
            }
            let bytes: Vec<&[u8]> = views.iter().map(|v| &v[..]).collect();
            f(&bytes)
        });
        for (&(slot, _), r) in maps.iter().zip(&mapped) {
            if r.is_ok() {
                self.layout.slots[slot].unmap();
            }
        }
        outcome
    }

    /// Tensor `name`'s parameters, read back through the ring (blocking), widened to f32.
    pub fn read_param(&self, name: &str) -> Result<Vec<f32>> {
        self.read_param_blocking(self.index(name)?)
    }

    /// [`Error::HalfPrecision`] for the first tensor of f16/bf16 parameters, which swaps and
    /// copies into the parameters do not support.
    fn all_f32(&self, what: &'static str) -> Result<()> {
        for (spec, s) in self.specs.iter().zip(&self.sources) {
            if s.dtype != ParamDtype::F32 {
                return Err(Error::HalfPrecision {
                    name: spec.name.clone(),
                    what,
                });
            }
            if !s.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(Error::MissingUsage {
                    name: spec.name.clone(),
                    needed: wgpu::BufferUsages::COPY_DST,
                    have: s.buffer.usage(),
                });
            }
        }
        Ok(())
    }
}
