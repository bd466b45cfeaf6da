//! The EMA fused into the caller's optimizer: the epilogue's WGSL and bind group layout
//! ([`Epilogue`]), and per step the counter advanced and the step's values written to a
//! uniform ring slot ([`FusedStep`]), instead of recording a separate pass.

use std::num::NonZeroU64;

use super::*;
use crate::shader::fused::{self, FusedRole, FusedShape, ROW_WORDS};
use crate::shader::STEP_BYTES;

/// Ring slots per uniform buffer (a used-up ring is replaced, never rewritten).
const RING_SLOTS: usize = 1024;

/// The fused epilogue of a [`GpuEma`]: WGSL to append to your optimizer's shader source, and
/// the layout of the bind group it declares (in the group you chose), for your pipeline
/// layout. Made by [`GpuEma::epilogue`].
///
/// In your shader, after computing a parameter's new value `p` (as you store it: rounded to
/// the parameter's dtype), call `ema_epilogue(tensor, element, p)`: `tensor` is the tracked
/// tensor's number in [`GpuEma::specs`]' order, `element` its element index. Each element of
/// every tracked tensor must be passed exactly once per step. An optimizer that takes four
/// elements per invocation calls `ema_epilogue4(tensor, element, p4)` instead, `element` a
/// multiple of 4 and `p4` the four new values (past the tensor's end they are ignored); one
/// entry point uses one form. Per step, take the values with [`GpuEma::fused_step`] and set
/// its bind group before dispatching.
#[derive(Debug, Clone)]
pub struct Epilogue {
    source: String,
    layout: wgpu::BindGroupLayout,
    group: u32,
}

impl Epilogue {
    /// The WGSL to append to your shader's source (declarations, `fn ema_epilogue` and
    /// `fn ema_epilogue4`, `fn ema_value` and `fn ema_value4`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The bind group layout of the epilogue's group, for your pipeline layout's slot
    /// [`group`](Self::group).
    pub fn layout(&self) -> &wgpu::BindGroupLayout {
        &self.layout
    }

    /// The bind group index the declarations use.
    pub fn group(&self) -> u32 {
        self.group
    }
}

/// One step of the fused EMA: the bind group and dynamic offset to set on your pass before the
/// dispatch that calls `ema_epilogue`. Made by [`GpuEma::fused_step`].
#[derive(Debug, Clone)]
pub struct FusedStep {
    bind_group: wgpu::BindGroup,
    offset: u32,
    group: u32,
    action: Action,
}

impl FusedStep {
    /// Sets the epilogue's bind group (with this step's dynamic offset) on `pass`.
    pub fn set_on(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_bind_group(self.group, &self.bind_group, &[self.offset]);
    }

    /// The bind group (set it with [`dynamic_offset`](Self::dynamic_offset)).
    pub fn bind_group(&self) -> &wgpu::BindGroup {
        &self.bind_group
    }

    /// The dynamic offset of this step's values in the ring.
    pub fn dynamic_offset(&self) -> u32 {
        self.offset
    }

    /// What this step does to the shadows: [`Action::Skip`] leaves them (the epilogue returns
    /// at once), [`Action::Copy`] copies, [`Action::Update`] averages.
    pub fn action(&self) -> Action {
        self.action
    }
}

/// What [`GpuEma`] keeps for its epilogue.
#[derive(Debug)]
pub(super) struct FusedState {
    layout: wgpu::BindGroupLayout,
    table: wgpu::Buffer,
    ring: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    stride: u64,
    next: usize,
    group: u32,
    source: String,
}

impl GpuEma {
    fn fused_shape(&self) -> FusedShape {
        FusedShape {
            emas: self.ema_count(),
            compensated: self.is_compensated(),
            bema: !self.store.anchor.is_empty(),
            tf_form: self.numerics() == Numerics::TensorFlow,
        }
    }

    fn fused_bind_group(
        &self,
        layout: &wgpu::BindGroupLayout,
        table: &wgpu::Buffer,
        ring: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = fused::entries(&self.fused_shape())
            .into_iter()
            .map(|role| wgpu::BindGroupEntry {
                binding: role.binding(),
                resource: match role {
                    FusedRole::Table => table.as_entire_binding(),
                    FusedRole::Step => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: ring,
                        offset: 0,
                        size: NonZeroU64::new(STEP_BYTES),
                    }),
                    FusedRole::Shadow(k) => self.store.shadows[k][0].as_entire_binding(),
                    FusedRole::Comp => self.store.comp[0].as_entire_binding(),
                    FusedRole::Anchor => self.store.anchor[0].as_entire_binding(),
                },
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("wgpu-ema fused epilogue"),
            layout,
            entries: &entries,
        })
    }

    fn fused_ring(&self, stride: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-ema fused step ring"),
            size: stride * RING_SLOTS as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// The fused epilogue, its bindings in bind group `group` of your pipeline: append
    /// [`Epilogue::source`] to your optimizer's WGSL, put [`Epilogue::layout`] at `group` in
    /// your pipeline layout, call `ema_epilogue(tensor, element, new_value)` for every
    /// element, and per step set [`fused_step`](Self::fused_step)'s bind group instead of
    /// recording [`record_update`](Self::record_update). Bit for bit the separate pass's
    /// result, for every schedule, policy, numerics, several EMAs, compensation, BEMA and a
    /// selection; the EMA reads no parameter, so a step moves 8 bytes per element instead of
    /// 12.
    ///
    /// Errors: a [`Policy`] with `write_back_every > 0` (the write-back is a pass after yours:
    /// use the separate pass), and shadows larger than one storage binding (the epilogue binds
    /// one buffer per set of shadows). Asked again, it returns the same epilogue (`group` must
    /// then be the same).
    pub fn epilogue(&mut self, group: u32) -> Result<Epilogue> {
        if self.stepper.policy().write_back_every > 0 {
            return Err(Error::InvalidConfig(
                "the fused epilogue cannot write the EMA back into the parameters \
                 (write_back_every > 0): that is a pass after the optimizer's; use record_update"
                    .into(),
            ));
        }
        if let Some(f) = &self.fused {
            if f.group != group {
                return Err(Error::InvalidConfig(format!(
                    "this EMA's epilogue was made for bind group {}, not {group}",
                    f.group
                )));
            }
            return Ok(Epilogue {
                source: f.source.clone(),
                layout: f.layout.clone(),
                group,
            });
        }
        if self.store.shadows.iter().any(Vec::is_empty) {
            return Err(Error::InvalidConfig(
                "the fused epilogue needs shadows to bind: this EMA tracks no elements".into(),
            ));
        }
        // One row per tensor: where its shadow starts (all in shadow buffer 0, one piece).
        let mut rows: Vec<u32> = Vec::with_capacity((self.tensors.len() + 1) * ROW_WORDS);
        rows.extend([self.tensors.len() as u32, 0, 0, 0]);
        for i in 0..self.tensors.len() {
            let (pieces, binding) = self.placed(i);
            let (at, len) = match pieces {
                [] => (0, 0),
                [p] if p.buffer == 0 => (p.offset / 4, p.len),
                _ => {
                    return Err(Error::InvalidConfig(format!(
                        "the fused epilogue binds one buffer of shadows; `{}`'s lie past the first \
                         storage binding: use record_update",
                        self.tensors[i].spec.name
                    )))
                }
            };
            let (at, len) = (u32::try_from(at), u32::try_from(len));
            let (Ok(at), Ok(len)) = (at, len) else {
                return Err(Error::InvalidConfig(format!(
                    "`{}` is too large for the fused epilogue's 32-bit indices",
                    self.tensors[i].spec.name
                )));
            };
            rows.extend([at, len, u32::from(binding.follow), 0]);
        }
        let shape = self.fused_shape();
        let layout_entries: Vec<wgpu::BindGroupLayoutEntry> = fused::entries(&shape)
            .into_iter()
            .map(|role| wgpu::BindGroupLayoutEntry {
                binding: role.binding(),
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match role {
                    FusedRole::Step => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: NonZeroU64::new(STEP_BYTES),
                    },
                    _ => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("wgpu-ema fused epilogue"),
                entries: &layout_entries,
            });
        let table = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-ema fused tensor table"),
            size: (rows.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.queue
            .write_buffer(&table, 0, bytemuck::cast_slice(&rows));
        let stride = crate::plan::align_up(
            STEP_BYTES,
            u64::from(self.device.limits().min_uniform_buffer_offset_alignment),
        );
        let ring = self.fused_ring(stride);
        let bind_group = self.fused_bind_group(&layout, &table, &ring);
        let source = fused::source(&shape, group);
        self.fused = Some(Box::new(FusedState {
            layout: layout.clone(),
            table,
            ring,
            bind_group,
            stride,
            next: 0,
            group,
            source: source.clone(),
        }));
        Ok(Epilogue {
            source,
            layout,
            group,
        })
    }

    /// One fused step, as update number `num_updates() + 1`: advances the counter as
    /// [`record_update`](Self::record_update) would and writes the step's values (what to do,
    /// each EMA's alpha) into a fresh slot of the epilogue's uniform ring. Set the returned
    /// bind group on the pass that dispatches your optimizer, in the same submit order as the
    /// step's other work; any number of steps may be recorded before one submit.
    ///
    /// Errors: no [`epilogue`](Self::epilogue) made yet, the parameters swapped, or update
    /// `n` already applied by a separate pass (a fused step and a separate step for the same
    /// update would average twice).
    pub fn fused_step(&mut self) -> Result<FusedStep> {
        let n = self.stepper.next();
        self.fused_step_at(n)
    }

    /// [`fused_step`](Self::fused_step) as update number `n` (the caller's global step).
    pub fn fused_step_at(&mut self, n: u64) -> Result<FusedStep> {
        self.not_swapped()?;
        if self.fused.is_none() {
            return Err(Error::InvalidConfig(
                "no fused epilogue: call GpuEma::epilogue(group) and build your pipeline with it first"
                    .into(),
            ));
        }
        if self.last_pass == Some(n) {
            return Err(Error::InvalidConfig(format!(
                "update {n} was already applied by a separate pass (record_update); a fused step \
                 for it would average twice"
            )));
        }
        let (action, values) = self.advance(n)?;
        self.last_fused = Some(n);
        let Some(f) = self.fused.as_deref() else {
            return Err(Error::InvalidConfig("no fused epilogue".into()));
        };
        let (stride, mut next) = (f.stride, f.next);
        if next >= RING_SLOTS {
            // A slot is written once (see record_pass): a used-up ring is replaced.
            let ring = self.fused_ring(stride);
            let bind_group = self.fused_bind_group(&f.layout, &f.table, &ring);
            if let Some(f) = self.fused.as_deref_mut() {
                f.ring = ring;
                f.bind_group = bind_group;
            }
            next = 0;
        }
        let Some(f) = self.fused.as_deref_mut() else {
            return Err(Error::InvalidConfig("no fused epilogue".into()));
        };
        let offset = next as u64 * stride;
        f.next = next + 1;
        self.queue
            .write_buffer(&f.ring, offset, bytemuck::bytes_of(&values));
        Ok(FusedStep {
            bind_group: f.bind_group.clone(),
            offset: offset as u32,
            group: f.group,
            action,
        })
    }

    /// Reads the epilogue's fault word back, blocking: [`Error::InvalidConfig`] if a call to
    /// `ema_epilogue` since the epilogue was made (or since the last check) passed a tensor
    /// number or an element past what this EMA tracks, or a call to `ema_epilogue4` an
    /// element that is not a multiple of 4 (that call changed nothing). Not on the web.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn check_epilogue(&self) -> Result<()> {
        let Some(f) = self.fused.as_deref() else {
            return Ok(());
        };
        let words = readback::start(
            &self.device,
            &self.queue,
            &[readback::Range {
                buffer: &f.table,
                offset: 0,
                len: ROW_WORDS as u64,
            }],
        )?
        .wait(&self.device)?;
        if words.get(1).is_some_and(|w| w.to_bits() != 0) {
            self.queue.write_buffer(&f.table, 4, &0u32.to_le_bytes());
            return Err(Error::InvalidConfig(format!(
                "ema_epilogue was called with a tensor number or element past what this EMA \
                 tracks ({} tensors), or ema_epilogue4 with an element not a multiple of 4; \
                 those calls changed nothing",
                self.tensors.len()
            )));
        }
        Ok(())
    }
}
