//! What waits for the device and the host (native targets): draining the ring, settling,
//! reads, swaps, copies into the parameters and parameter reads, each blocking the calling
//! thread until done. The web's counterparts are in `web.rs`.

use super::*;

impl OffloadedEma {
    /// Waits for every submitted sample to be applied on the host.
    ///
    /// Once the queue is idle, a submitted sample's map callback has run or is running on
    /// whichever thread polled the device: a slot still `Recorded` a while after that
    /// belongs to an encoder never submitted, which is not waited for.
    pub(super) fn drain(&self) -> Result<()> {
        const UNSUBMITTED: std::time::Duration = std::time::Duration::from_secs(2);
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
            let recorded = p.slots.contains(&Slot::Recorded);
            if !mapped && !recorded {
                return Ok(());
            }
            if mapped {
                only_recorded_since = None;
            } else if only_recorded_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                > UNSUBMITTED
            {
                return Ok(());
            }
            let wait = std::time::Duration::from_millis(1);
            drop(self.shared.changed.wait_timeout(p, wait));
        }
    }

    /// Waits until every sample submitted so far is applied on the host (blocking), sampling
    /// nothing more: for a loop that wants no sample skipped, at the cost of waiting for the
    /// host each step.
    pub fn catch_up(&self) -> Result<()> {
        self.check()?;
        self.drain()
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
            self.drain()?;
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
        self.drain()?;
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
            self.drain()?;
        } else {
            self.settle()?;
        }
        let slots = self.free_slots()?;
        if slots.is_empty() && !self.layout.chunks.is_empty() {
            return Err(Error::InvalidConfig(
                "every offload slot is busy with an unsubmitted encoder's sample".into(),
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
            let (tx, rx) = std::sync::mpsc::channel();
            for (&c, &slot) in batch.iter().zip(&slots) {
                let tx = tx.clone();
                let bytes = self.layout.chunks[c].bytes;
                self.layout.slots[slot]
                    .slice(0..bytes)
                    .map_async(wgpu::MapMode::Read, move |r| {
                        let _ = tx.send(r.map_err(|e| e.to_string()));
                    });
            }
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Device(e.to_string()))?;
            for _ in batch {
                rx.recv()
                    .map_err(|e| Error::Device(e.to_string()))?
                    .map_err(Error::Device)?;
            }
            let mut shadows = self.shared.shadows()?;
            let mut scratch = Vec::new();
            for (&c, &slot) in batch.iter().zip(&slots) {
                let chunk = &self.layout.chunks[c];
                let buffer = &self.layout.slots[slot];
                {
                    let view = buffer
                        .slice(0..chunk.bytes)
                        .get_mapped_range()
                        .map_err(|e| Error::Readback(e.to_string()))?;
                    for piece in &chunk.pieces {
                        let src = &self.sources[piece.tensor];
                        let p = host::params(&view, piece, src.dtype, &mut scratch);
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
                buffer.unmap();
            }
            drop(shadows);
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
            let read = (|| {
                let slice = buffer.slice(0..piece.bytes);
                let (send, recv) = std::sync::mpsc::channel();
                slice.map_async(wgpu::MapMode::Read, move |r| {
                    let _ = send.send(r);
                });
                self.device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Device(e.to_string()))?;
                recv.recv()
                    .map_err(|e| Error::Readback(e.to_string()))?
                    .map_err(|e| Error::Readback(e.to_string()))?;
                let view = slice
                    .get_mapped_range()
                    .map_err(|e| Error::Readback(e.to_string()))?;
                let n = piece.len as usize;
                match src.dtype {
                    ParamDtype::F32 => out.extend(
                        view.chunks_exact(4)
                            .take(n)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    ),
                    ParamDtype::F16 => out.extend(
                        view.chunks_exact(2)
                            .take(n)
                            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                    ),
                    ParamDtype::BF16 => out.extend(
                        view.chunks_exact(2)
                            .take(n)
                            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                    ),
                }
                drop(view);
                buffer.unmap();
                Ok(())
            })();
            if let Some(b) = self.shared.progress()?.slots.get_mut(slot) {
                *b = Slot::Free;
            }
            read?;
        }
        Ok(out)
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
