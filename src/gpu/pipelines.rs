//! Shader modules, layouts and pipelines, made once per [`GpuEma`](crate::GpuEma) and slot
//! count, from the sources and tables of the shader contract (`crate::shader`).

use super::bindings;
use crate::schedule::Numerics;
use crate::shader::{self, Family, Op, Shape, StepSource, STEP_BYTES};

/// The pipelines of one slot count (a tier: see `plan::tiers`).
#[derive(Debug)]
struct Tier {
    layout_read: wgpu::BindGroupLayout,
    layout_write: wgpu::BindGroupLayout,
    /// One per op, in [`Op::ALL`]'s order; `None` for an op the shape has not (BEMA's).
    pipelines: Vec<Option<wgpu::ComputePipeline>>,
}

#[derive(Debug)]
pub(crate) struct Pipelines {
    device: wgpu::Device,
    immediates: bool,
    numerics: Numerics,
    shape: Shape,
    pub ring_layout: Option<wgpu::BindGroupLayout>,
    /// (slots, pipelines made on first use).
    tiers: Vec<(usize, std::sync::OnceLock<Tier>)>,
}

impl Pipelines {
    /// Prepares the pipelines of `shape` (made on first use, per slot count); `immediates`
    /// picks how `alpha` arrives (immediates or a ring).
    pub fn new(
        device: &wgpu::Device,
        immediates: bool,
        numerics: Numerics,
        shape: &Shape,
        tiers: &[usize],
    ) -> Self {
        let ring_layout = (!immediates).then(|| {
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("wgpu-ema step ring"),
                entries: &[wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: wgpu::BufferSize::new(STEP_BYTES),
                    },
                    count: None,
                }],
            })
        });
        Self {
            device: device.clone(),
            immediates,
            numerics,
            shape: *shape,
            ring_layout,
            tiers: tiers
                .iter()
                .map(|&c| (c, std::sync::OnceLock::new()))
                .collect(),
        }
    }

    fn tier(&self, slots: usize) -> &Tier {
        let i = self
            .tiers
            .iter()
            .position(|(c, _)| *c == slots)
            .unwrap_or(self.tiers.len() - 1);
        let (count, cell) = &self.tiers[i];
        cell.get_or_init(|| self.make(*count))
    }

    fn make(&self, slots: usize) -> Tier {
        let device = &self.device;
        let shape = Shape {
            slots,
            ..self.shape
        };
        let step = if self.immediates {
            StepSource::Immediate
        } else {
            StepSource::Ring
        };
        let source = shader::source(&shape, step);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("wgpu-ema (shaders/ema.wgsl)"),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let layout_read = bindings::layout(device, Family::Read, &shape);
        let layout_write = bindings::layout(device, Family::Write, &shape);
        let pipeline_layout = |group0: &wgpu::BindGroupLayout| {
            let layouts: Vec<Option<&wgpu::BindGroupLayout>> = match &self.ring_layout {
                Some(r) => vec![Some(group0), Some(r)],
                None => vec![Some(group0)],
            };
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("wgpu-ema"),
                bind_group_layouts: &layouts,
                immediate_size: if self.immediates {
                    STEP_BYTES as u32
                } else {
                    0
                },
            })
        };
        let read = pipeline_layout(&layout_read);
        let write = pipeline_layout(&layout_write);
        let constants = shader::overrides(&shape, self.numerics == Numerics::TensorFlow);
        let make = |entry: &str, layout: &wgpu::PipelineLayout| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    // Every entry point gets both overrides; those it does not use are ignored.
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            })
        };
        let pipelines = Op::ALL
            .iter()
            .map(|op| {
                let layout = match op.family() {
                    Family::Read => &read,
                    Family::Write => &write,
                };
                op.applies(&shape).then(|| make(op.entry_point(), layout))
            })
            .collect();
        Tier {
            pipelines,
            layout_read,
            layout_write,
        }
    }

    /// The pipeline of `op` for dispatches of `slots` parameter bindings; `None` for an op
    /// this EMA's shape has not.
    pub fn get(&self, op: Op, slots: usize) -> Option<&wgpu::ComputePipeline> {
        let t = self.tier(slots);
        let i = Op::ALL.iter().position(|&o| o == op)?;
        t.pipelines[i].as_ref()
    }

    /// The bind group layout of `family` for dispatches of `slots` parameter bindings.
    pub fn layout(&self, family: Family, slots: usize) -> &wgpu::BindGroupLayout {
        let t = self.tier(slots);
        match family {
            Family::Read => &t.layout_read,
            Family::Write => &t.layout_write,
        }
    }
}
