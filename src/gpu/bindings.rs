//! Bind group layouts and bind groups, made from the shader contract's binding table
//! (`crate::shader::entries`), and the checks of a buffer the caller hands in.

use std::num::NonZeroU64;

use crate::error::{Error, Result};
use crate::plan::ROW_BYTES;
use crate::shader::{entries, Entry, Family, Role, Shape};
use crate::tensors::{ParamDtype, TensorSpec};

/// The bind group layout of `family`.
pub(crate) fn layout(
    device: &wgpu::Device,
    family: Family,
    shape: &Shape,
) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = entries(family, shape)
        .iter()
        .map(|b| wgpu::BindGroupLayoutEntry {
            binding: b.role.binding(),
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: !b.writable,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(match family {
            Family::Read => "wgpu-ema dispatch",
            Family::Write => "wgpu-ema dispatch (params read-write)",
        }),
        entries: &entries,
    })
}

/// A parameter slot's binding: a window of a buffer, or free.
pub(crate) type Slot = crate::plan::Slot<wgpu::Buffer>;

/// The buffers a dispatch binds besides the parameters.
#[derive(Debug)]
pub(crate) struct Store {
    /// `shadows[k][b]`: shadow buffer `b` of EMA `k`.
    pub shadows: Vec<Vec<wgpu::Buffer>>,
    /// Compensation terms, laid out as EMA 0's shadows; empty when not compensated.
    pub comp: Vec<wgpu::Buffer>,
    /// BEMA's anchor `theta_0` and its weights, laid out as the shadows; empty but for BEMA.
    pub anchor: Vec<wgpu::Buffer>,
    pub bema_out: Vec<wgpu::Buffer>,
    /// Bound to unused read-only bindings (all of them: read-only ranges may alias).
    pub placeholder_read: wgpu::Buffer,
    /// Bound to unused read-write bindings: binding `b` gets 16 bytes at
    /// `b * placeholder_align`, so no two writable bindings of a dispatch overlap.
    pub placeholder_write: wgpu::Buffer,
    pub placeholder_align: u64,
}

impl Store {
    fn unused_writable(&self, binding: u32) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.placeholder_write,
            offset: u64::from(binding) * self.placeholder_align,
            size: NonZeroU64::new(16),
        })
    }
}

/// What the passes that write the parameters (swap, copy) exchange with them: EMA 0's
/// shadows, or BEMA's weights (bound in the shadows' place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Ema,
    Bema,
}

/// What a dispatch's bind group depends on.
pub(crate) struct Place<'a> {
    /// Parameter bindings of the layout (the pipelines' slot count).
    pub tier: usize,
    pub shadow_buffer: usize,
    pub slots: &'a [Slot],
    pub table_offset: u64,
    pub rows: usize,
    /// What a writing family binds in the shadows' place.
    pub target: Target,
}

/// The bind group of one dispatch for `family`, with `layout` (the family's layout for the
/// dispatch's tier).
pub(crate) fn bind_group<'s>(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    store: &'s Store,
    shape: &Shape,
    family: Family,
    table: &wgpu::Buffer,
    d: &Place<'_>,
) -> wgpu::BindGroup {
    let per_buffer = |set: &'s [wgpu::Buffer], binding: u32| match set.get(d.shadow_buffer) {
        Some(b) => b.as_entire_binding(),
        None => store.unused_writable(binding),
    };
    let shape = Shape {
        slots: d.tier,
        ..*shape
    };
    let table_entries = entries(family, &shape);
    let group: Vec<wgpu::BindGroupEntry<'_>> = table_entries
        .iter()
        .map(|b| {
            let resource = match b.role {
                Role::Table => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: table,
                    offset: d.table_offset,
                    size: NonZeroU64::new(d.rows as u64 * ROW_BYTES),
                }),
                Role::Shadow(0) if family == Family::Write && d.target == Target::Bema => {
                    per_buffer(&store.bema_out, b.role.binding())
                }
                Role::Shadow(k) => match store.shadows.get(k) {
                    Some(s) => s[d.shadow_buffer].as_entire_binding(),
                    None => store.unused_writable(b.role.binding()),
                },
                Role::Comp => per_buffer(&store.comp, b.role.binding()),
                Role::Anchor => per_buffer(&store.anchor, b.role.binding()),
                Role::BemaOut => per_buffer(&store.bema_out, b.role.binding()),
                Role::Param(i) => match d.slots.get(i).and_then(Option::as_ref) {
                    Some((buffer, w)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: w.offset,
                        size: NonZeroU64::new(w.size),
                    }),
                    None if b.writable => store.unused_writable(b.role.binding()),
                    None => store.placeholder_read.as_entire_binding(),
                },
            };
            wgpu::BindGroupEntry {
                binding: b.role.binding(),
                resource,
            }
        })
        .collect();
    debug_assert_eq!(
        writable_alias(&table_entries, &group),
        None,
        "a writable binding overlaps another binding of its buffer (WebGPU refuses this)"
    );
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("wgpu-ema dispatch"),
        layout,
        entries: &group,
    })
}

/// Checks a tensor the caller hands in: a storage buffer, a 4-byte-aligned offset, and the
/// whole tensor (its last u32 word, for 16-bit dtypes) inside the buffer.
pub(crate) fn validate_binding(
    spec: &TensorSpec,
    buffer: &wgpu::Buffer,
    offset: u64,
    dtype: ParamDtype,
) -> Result<()> {
    let usage = buffer.usage();
    if !usage.contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::MissingUsage {
            name: spec.name.clone(),
            needed: wgpu::BufferUsages::STORAGE,
            have: usage,
        });
    }
    if !offset.is_multiple_of(4) {
        return Err(Error::Misaligned {
            name: spec.name.clone(),
            offset,
        });
    }
    // 16-bit parameters are read as whole u32 words: the last word must be in the buffer.
    let end = spec
        .try_numel()
        .and_then(|n| n.checked_mul(dtype.size()))
        .map(|b| b.next_multiple_of(4))
        .and_then(|b| b.checked_add(offset))
        .unwrap_or(u64::MAX);
    if end > buffer.size() {
        return Err(Error::OutOfBounds {
            name: spec.name.clone(),
            offset,
            end,
            buffer_size: buffer.size(),
        });
    }
    Ok(())
}

/// WebGPU's rule, which wgpu's native backends do not check: within one dispatch, a writable
/// storage binding may not overlap any other binding of the same buffer. Returns the first two
/// binding numbers that break it. Checked in debug builds, so that the native tests catch what
/// a browser would refuse.
fn writable_alias(table: &[Entry], entries: &[wgpu::BindGroupEntry<'_>]) -> Option<(u32, u32)> {
    let ranges: Vec<(u32, &wgpu::Buffer, u64, u64, bool)> = table
        .iter()
        .zip(entries)
        .filter_map(|(b, e)| match &e.resource {
            wgpu::BindingResource::Buffer(bb) => {
                let size = bb
                    .size
                    .map_or(bb.buffer.size() - bb.offset, NonZeroU64::get);
                Some((
                    b.role.binding(),
                    bb.buffer,
                    bb.offset,
                    bb.offset + size,
                    b.writable,
                ))
            }
            _ => None,
        })
        .collect();
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if (a.4 || b.4) && a.1 == b.1 && a.2 < b.3 && b.2 < a.3 {
                return Some((a.0, b.0));
            }
        }
    }
    None
}
