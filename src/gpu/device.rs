//! What the EMA asks of the device it was built on: that a buffer handed in is that device's,
//! and that the device is still there.
//!
//! wgpu gives neither directly. A buffer names no device, and work on a destroyed or lost
//! device is dropped without an error ("surfaced via the device-lost callback", of which a
//! device has one, the caller's to set). So: a buffer is tried in a bind group of this device
//! inside an error scope (wgpu reports another device's buffer there), and a tiny buffer is
//! kept mapping in the background: on a lost device a map fails at once, which the next
//! submitting call turns into [`Error::Device`].

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Refuses `buffer` (tracked tensor `name`'s) unless it belongs to `device`, before any of the
/// EMA's work binds it (where wgpu's default handler would panic).
///
/// A buffer of another device of the same `wgpu::Instance` is a validation error in the scope.
/// One of another `Instance` is unknown to this one's registry, where wgpu-core panics on the
/// lookup: that panic is caught here and becomes the same error. (Its id could also name a
/// buffer of this instance, which nothing in wgpu lets a library tell apart: make buffers and
/// EMA on one instance.)
pub(crate) fn check_same_device(
    device: &wgpu::Device,
    name: &str,
    buffer: &wgpu::Buffer,
) -> Result<()> {
    let probe = || {
        crate::readback::scoped(device, || {
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("wgpu-ema device check"),
                entries: &[wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: true },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }],
            });
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("wgpu-ema device check"),
                layout: &layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: 0,
                        size: NonZeroU64::new(4),
                    }),
                }],
            })
        })
    };
    let tried =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe)).unwrap_or_else(|_| {
            Err(Error::Device(
                "a buffer of another wgpu instance (wgpu-core panicked looking it up)".into(),
            ))
        });
    match tried {
        Ok(_) => Ok(()),
        Err(Error::Device(detail)) => Err(Error::OtherDevice {
            name: name.to_string(),
            detail,
        }),
        Err(e) => Err(e),
    }
}

const IDLE: u8 = 0;
const PENDING: u8 = 1;
const MAPPED: u8 = 2;
const FAILED: u8 = 3;

/// A 4-byte buffer kept mapping in the background: a map on a destroyed or lost device fails
/// at once, a map on a live one completes at the next poll. Costs one non-blocking poll per
/// check and no GPU work.
#[derive(Debug)]
pub(super) struct Liveness {
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
}

impl Liveness {
    pub(super) fn new(device: &wgpu::Device) -> Self {
        Self {
            buffer: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-ema liveness"),
                size: 4,
                usage: wgpu::BufferUsages::MAP_READ,
                mapped_at_creation: false,
            }),
            state: Arc::new(AtomicU8::new(IDLE)),
        }
    }

    /// After work was submitted: [`Error::Device`] once the device is known to be destroyed or
    /// lost (from this call's map, or an earlier one's).
    pub(super) fn check(&self, device: &wgpu::Device) -> Result<()> {
        if self.state.load(Ordering::Acquire) == PENDING {
            // Runs the callbacks of whatever completed, without waiting.
            let _ = device.poll(wgpu::PollType::Poll);
        }
        // A destroyed device refuses the unmap as a validation error: caught, it says the
        // same as a failed map.
        let rearmed = crate::readback::scoped(device, || {
            if self
                .state
                .compare_exchange(MAPPED, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.buffer.unmap();
            }
            if self
                .state
                .compare_exchange(IDLE, PENDING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let state = self.state.clone();
                self.buffer.map_async(wgpu::MapMode::Read, .., move |r| {
                    state.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
                });
            }
        });
        if rearmed.is_err() {
            self.state.store(FAILED, Ordering::Release);
        }
        if self.state.load(Ordering::Acquire) == FAILED {
            return Err(Error::Device(
                "the device was destroyed or lost: the work was dropped".into(),
            ));
        }
        Ok(())
    }
}
