//! The one readback helper: copy ranges of GPU buffers into a MAP_READ staging buffer, map
//! it, copy the bytes out.

use crate::error::{Error, Result};

/// A range of a GPU buffer to read: `len` f32 elements from byte `offset`.
pub(crate) struct Range<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub len: u64,
}

/// A submitted copy whose staging buffer is being mapped.
pub(crate) struct Pending {
    staging: wgpu::Buffer,
    /// Bytes asked for (the staging buffer is at least 4).
    total: u64,
    /// What [`wait`](Self::wait) polls for (the web waits on the browser instead).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    index: wgpu::SubmissionIndex,
    receiver: futures_intrusive::channel::shared::OneshotReceiver<
        std::result::Result<(), wgpu::BufferAsyncError>,
    >,
    /// On the web: the error scopes around the copy, popped at once and awaited with the
    /// mapping, so that a failed copy is an error, not a buffer of zeros.
    #[cfg(target_arch = "wasm32")]
    caught: Caught,
}

/// Popped error scopes, still to resolve.
#[cfg(target_arch = "wasm32")]
type Caught = Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>>;

/// Runs `f`, which creates or submits GPU work, catching the errors the device reports for it
/// (a lost or destroyed device, no memory) as [`Error::Device`] instead of wgpu's default
/// handler, which panics.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> Result<T> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let out = f();
    // On native targets the scopes resolve at once.
    let errors = [
        pollster::block_on(memory.pop()),
        pollster::block_on(validation.pop()),
    ];
    match errors.into_iter().flatten().next() {
        Some(e) => Err(Error::Device(e.to_string())),
        None => Ok(out),
    }
}

/// On the web an error scope resolves only as a promise, and nothing may block on one. Work
/// that returns at once (building, recording, submitting steps) pushes no scopes (a popped and
/// dropped scope would swallow the error): its errors reach the device's uncaptured-error
/// handler, which in a browser logs them to the console and which
/// `Device::on_uncaptured_error` replaces. Readbacks, which are awaited anyway, do catch theirs
/// (see `start`).
#[cfg(target_arch = "wasm32")]
pub(crate) fn scoped<T>(_device: &wgpu::Device, f: impl FnOnce() -> T) -> Result<T> {
    Ok(f())
}

/// Records the copies into a fresh encoder, submits it and starts mapping. Steps recorded
/// afterwards do not delay the mapping, and the copy sees exactly the steps submitted before.
pub(crate) fn start(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    ranges: &[Range<'_>],
) -> Result<Pending> {
    #[cfg(not(target_arch = "wasm32"))]
    return scoped(device, || start_unchecked(device, queue, ranges));
    // A pop takes effect at once and only its result is a promise: it is awaited with the
    // mapping, which is asynchronous anyway.
    #[cfg(target_arch = "wasm32")]
    {
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut pending = start_unchecked(device, queue, ranges);
        pending.caught = vec![Box::pin(memory.pop()), Box::pin(validation.pop())];
        Ok(pending)
    }
}

fn start_unchecked(device: &wgpu::Device, queue: &wgpu::Queue, ranges: &[Range<'_>]) -> Pending {
    let total: u64 = ranges.iter().map(|r| r.len * 4).sum();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-ema readback"),
        size: total.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("wgpu-ema readback"),
    });
    let mut at = 0;
    for r in ranges {
        if r.len > 0 {
            encoder.copy_buffer_to_buffer(r.buffer, r.offset, &staging, at, r.len * 4);
        }
        at += r.len * 4;
    }
    let index = queue.submit(Some(encoder.finish()));
    let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        // The receiver may be gone if the caller dropped the future; nothing to do then.
        let _ = sender.send(r);
    });
    Pending {
        staging,
        total,
        index,
        receiver,
        #[cfg(target_arch = "wasm32")]
        caught: Vec::new(),
    }
}

impl Pending {
    /// Waits for the copy (only for it: later submissions are not waited on) and returns the
    /// elements of every range, in order. Not on the web, where nothing may block: there the
    /// browser resolves [`finish`](Self::finish) by itself.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wait(self, device: &wgpu::Device) -> Result<Vec<f32>> {
        device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.index.clone()),
                timeout: None,
            })
            .map_err(|e| Error::Readback(e.to_string()))?;
        pollster::block_on(self.finish())
    }

    /// Awaits the mapping. On native targets something must poll the device meanwhile (see
    /// [`GpuEma::read_shadows`](crate::GpuEma::read_shadows)); in a browser nothing need.
    pub async fn finish(self) -> Result<Vec<f32>> {
        #[cfg(target_arch = "wasm32")]
        for scope in self.caught {
            if let Some(e) = scope.await {
                return Err(Error::Device(e.to_string()));
            }
        }
        match self.receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Readback(e.to_string())),
            None => return Err(Error::Readback("the map callback was dropped".into())),
        }
        let out = {
            let view = self
                .staging
                .get_mapped_range(..)
                .map_err(|e| Error::Readback(e.to_string()))?;
            bytemuck::pod_collect_to_vec::<u8, f32>(&view[..self.total as usize])
        };
        self.staging.unmap();
        Ok(out)
    }
}
