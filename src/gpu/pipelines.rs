//! Shader module, layouts and pipelines, made once per [`GpuEma`](crate::GpuEma).

use crate::layout::Kind;
use crate::schedule::Numerics;

/// The WGSL of the update, as shipped in `shaders/ema.wgsl`.
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
    /// True for the operations that write the parameters.
    pub fn writes_params(self) -> bool {
        matches!(self, Op::Swap | Op::ToParams)
    }
}

#[derive(Debug)]
pub(crate) struct Pipelines {
    /// Parameters read-only, shadows read-write.
    pub segment_layout: wgpu::BindGroupLayout,
    /// Both read-write (swap, copy into the parameters).
    pub segment_layout_rw: wgpu::BindGroupLayout,
    pub ring_layout: Option<wgpu::BindGroupLayout>,
    update: [wgpu::ComputePipeline; 2],
    init: [wgpu::ComputePipeline; 2],
    swap: [wgpu::ComputePipeline; 2],
    to_params: [wgpu::ComputePipeline; 2],
    /// f16 then bf16 parameters (plain updates and copies only).
    update_half: [wgpu::ComputePipeline; 2],
    init_half: [wgpu::ComputePipeline; 2],
    to_params_half: [wgpu::ComputePipeline; 2],
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Pipelines {
    /// Builds everything; `immediates` picks how `alpha` arrives (immediates or a ring).
    /// `kahan`: updates and copies also bind the compensation terms (binding 2).
    /// `emas` > 1: updates and copies bind that many shadows (bindings 1 to 4).
    pub fn new(
        device: &wgpu::Device,
        immediates: bool,
        numerics: Numerics,
        kahan: bool,
        emas: usize,
    ) -> Self {
        let multi = emas > 1;
        let source = if immediates {
            EMA_WGSL.to_string()
        } else {
            EMA_WGSL.replace(IMMEDIATE_DECL, RING_DECL)
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("wgpu-ema shaders/ema.wgsl"),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let segment_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wgpu-ema segment"),
            entries: &[
                storage_entry(0, true),
                storage_entry(1, false),
                storage_entry(2, false),
                storage_entry(3, false),
                storage_entry(4, false),
            ][..if multi {
                5
            } else if kahan {
                3
            } else {
                2
            }],
        });
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
        let segment_layout_rw = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wgpu-ema segment (params read-write)"),
            entries: &[storage_entry(0, false), storage_entry(1, false)],
        });
        let pipeline_layout = |segments: &wgpu::BindGroupLayout| {
            let layouts: Vec<Option<&wgpu::BindGroupLayout>> = match &ring_layout {
                Some(r) => vec![Some(segments), Some(r)],
                None => vec![Some(segments)],
            };
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("wgpu-ema"),
                bind_group_layouts: &layouts,
                immediate_size: if immediates { STEP_BYTES as u32 } else { 0 },
            })
        };
        let layout = pipeline_layout(&segment_layout);
        let layout_rw = pipeline_layout(&segment_layout_rw);
        let tf_form = if numerics == Numerics::TensorFlow {
            1.0
        } else {
            0.0
        };
        let tf = [("TF_FORM", tf_form), ("K", emas.clamp(2, MAX_EMAS) as f64)];
        let make_with = |entry: &str, layout: &wgpu::PipelineLayout| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    // Every entry point gets both overrides; those it does not use are ignored.
                    constants: &tf,
                    ..Default::default()
                },
                cache: None,
            })
        };
        let make = |entry: &str| make_with(entry, &layout);
        let make_rw = |entry: &str| make_with(entry, &layout_rw);
        Self {
            update: if multi {
                [make("update_multi_vec4"), make("update_multi_scalar")]
            } else if kahan {
                [make("update_kahan_vec4"), make("update_kahan_scalar")]
            } else {
                [make("update_vec4"), make("update_scalar")]
            },
            init: if multi {
                [make("copy_multi_vec4"), make("copy_multi_scalar")]
            } else if kahan {
                [make("copy_kahan_vec4"), make("copy_kahan_scalar")]
            } else {
                [make("copy_vec4"), make("copy_scalar")]
            },
            update_half: [make("update_f16"), make("update_bf16")],
            init_half: [make("copy_f16"), make("copy_bf16")],
            to_params_half: [make_rw("to_params_f16"), make_rw("to_params_bf16")],
            swap: [make_rw("swap_vec4"), make_rw("swap_scalar")],
            to_params: [make_rw("to_params_vec4"), make_rw("to_params_scalar")],
            segment_layout,
            segment_layout_rw,
            ring_layout,
        }
    }

    pub fn get(&self, op: Op, kind: Kind) -> &wgpu::ComputePipeline {
        let i = match kind {
            Kind::Vec4 => 0,
            Kind::Scalar => 1,
            Kind::F16 | Kind::BF16 => {
                let h = usize::from(kind == Kind::BF16);
                // Swaps refuse 16-bit tensors before recording anything.
                return match op {
                    Op::Update => &self.update_half[h],
                    Op::ToParams => &self.to_params_half[h],
                    Op::Init | Op::Swap => &self.init_half[h],
                };
            }
        };
        match op {
            Op::Update => &self.update[i],
            Op::Init => &self.init[i],
            Op::Swap => &self.swap[i],
            Op::ToParams => &self.to_params[i],
        }
    }
}
