//! What waits, on the web: nothing may block the page's one thread, so the waits are futures
//! resolved by the map callbacks the browser runs between tasks (which apply the samples
//! themselves). The native counterparts, blocking, are in `blocking.rs`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;

/// Resolves when every slot is free (every submitted sample applied), or at the first failure.
/// A slot recorded into an encoder that is never submitted keeps it pending.
struct Idle<'a>(&'a Shared);

impl Future for Idle<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut p = match self.0.progress() {
            Ok(p) => p,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Some(e) = &p.error {
            return Poll::Ready(Err(Error::Device(e.clone())));
        }
        if p.slots.iter().all(|&s| s == Slot::Free) {
            return Poll::Ready(Ok(()));
        }
        // Stored under the same lock the callbacks take to free a slot: no wake-up is lost.
        p.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

impl OffloadedEma {
    /// [`GpuEmaBuilder::build_offloaded`](crate::GpuEmaBuilder::build_offloaded) on the web:
    /// resolves once every parameter has been copied into its shadow.
    pub(crate) async fn new_async(
        r: Resolved,
        extra: Vec<Schedule>,
        compensated: bool,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        offload: Offload,
    ) -> Result<Self> {
        let mut ema = Self::assemble(r, extra, compensated, device, queue, offload)?;
        ema.settle_async().await?;
        Ok(ema)
    }

    /// Waits until every submitted sample has been applied on the host (the web's
    /// `catch_up`). Every encoder that recorded an update must have been submitted.
    pub async fn catch_up_async(&self) -> Result<()> {
        Idle(&self.shared).await
    }

    /// Brings every shadow to the current call (the web's `settle`): waits for the samples in
    /// flight, then samples each stale chunk, a ring's worth per submit.
    pub async fn settle_async(&mut self) -> Result<()> {
        if self.swapped {
            return Err(Error::Swapped);
        }
        loop {
            Idle(&self.shared).await?;
            self.reclaim()?;
            let stale: Vec<usize> = (0..self.gaps.len())
                .filter(|&c| !self.gaps[c].is_empty())
                .collect();
            if stale.is_empty() {
                return Ok(());
            }
            let mut encoder = self.device.create_command_encoder(&Default::default());
            for (&c, slot) in stale.iter().zip(self.free_slots()?) {
                self.record_sample(&mut encoder, c, slot)?;
            }
            self.queue.submit(Some(encoder.finish()));
        }
    }

    /// Settles, then returns EMA 0's shadows from host memory.
    pub async fn read_shadows_async(&mut self) -> Result<HostTensors> {
        self.read_ema_async(0).await
    }

    /// Settles, then returns EMA `k`'s shadows from host memory.
    pub async fn read_ema_async(&mut self, k: usize) -> Result<HostTensors> {
        self.settle_async().await?;
        self.host_shadows(k)
    }
}
