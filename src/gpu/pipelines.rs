//! Shader module, layouts and pipelines, made once per [`GpuEma`](crate::GpuEma).

use super::bindings::{self, Family, Shape};
use crate::schedule::Numerics;

/// The WGSL of the update, as shipped in `shaders/ema.wgsl` (the host appends the declarations
/// of the parameter bindings and the `switch` that picks one; see `src/gpu/bindings.rs`).
pub const EMA_WGSL: &str = include_str!("../../shaders/ema.wgsl");

const IMMEDIATE_DECL: &str = "var<immediate> step: Step;";
const RING_DECL: &str = "@group(1) @binding(0) var<uniform> step: Step;";

/// Bytes of the per-step values (`struct Step` in the shader).
pub(crate) const STEP_BYTES: u64 = 32;

/// The most EMAs one pass updates (`K` in the shader).
pub(crate) const MAX_EMAS: usize = 4;

/// The per-step values as the shader sees them: the first EMA's `alpha`, `one` = 1.0 (see
/// the compensated update in `shaders/ema.wgsl`), then every EMA's alpha.
pub(crate) fn step_bytes(alphas: [f32; MAX_EMAS]) -> [u8; STEP_BYTES as usize] {
    let [a, b, c, d] = alphas;
    bytemuck::cast([a, 1.0f32, 0.0, 0.0, a, b, c, d])
}

/// Which operation a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `shadow = ema(shadow, param, alpha)`.
    Update,
    /// `shadow = param`.
    Init,
    /// Exchange `param` and `shadow` (parameters bound read-write).
    Swap,
    /// `param = shadow` (parameters bound read-write).
    ToParams,
}

impl Op {
    /// The bindings this op's pass uses.
    pub fn family(self) -> Family {
        match self {
            Op::Update | Op::Init => Family::Read,
            Op::Swap | Op::ToParams => Family::Write,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Op::Update => "wgpu-ema update",
            Op::Init => "wgpu-ema init",
            Op::Swap => "wgpu-ema swap",
            Op::ToParams => "wgpu-ema shadows to params",
        }
    }
}

/// The pipelines of one slot count (a tier: see `plan::tiers`).
#[derive(Debug)]
struct Tier {
    layout_read: wgpu::BindGroupLayout,
    layout_write: wgpu::BindGroupLayout,
    update: wgpu::ComputePipeline,
    init: wgpu::ComputePipeline,
    swap: wgpu::ComputePipeline,
    to_params: wgpu::ComputePipeline,
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
        let mut source = if self.immediates {
            EMA_WGSL.to_string()
        } else {
            EMA_WGSL.replace(IMMEDIATE_DECL, RING_DECL)
        };
        source.push_str(&bindings::param_wgsl(slots));
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("wgpu-ema shaders/ema.wgsl"),
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
        let tf_form = if self.numerics == Numerics::TensorFlow {
            1.0
        } else {
            0.0
        };
        let constants = [
            ("TF_FORM", tf_form),
            ("K", shape.emas.clamp(2, MAX_EMAS) as f64),
        ];
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
        let (update, init) = if shape.emas > 1 {
            ("update_multi", "init_multi")
        } else if shape.compensated {
            ("update_kahan", "init_kahan")
        } else {
            ("update", "init")
        };
        Tier {
            update: make(update, &read),
            init: make(init, &read),
            swap: make("swap", &write),
            to_params: make("to_params", &write),
            layout_read,
            layout_write,
        }
    }

    /// The pipeline of `op` for dispatches of `slots` parameter bindings.
    pub fn get(&self, op: Op, slots: usize) -> &wgpu::ComputePipeline {
        let t = self.tier(slots);
        match op {
            Op::Update => &t.update,
            Op::Init => &t.init,
            Op::Swap => &t.swap,
            Op::ToParams => &t.to_params,
        }
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
