//! Reference optimizers for the fused-epilogue rows, shared by the benches: SGD, SGD with
//! momentum and AdamW (`benches/optimizers.wgsl`) over one tensor of an arena, each built as
//! is (the EMA then runs as a separate pass) and with `GpuEma::epilogue` fused in.

use wgpu_ema::{wgpu, Epilogue, FusedStep, ParamArena};

/// (entry point, bytes per element of the optimizer alone); entry points ending in `4` take
/// four elements per invocation and call `ema_epilogue4`.
pub const OPTIMIZERS: [(&str, u64); 6] = [
    ("sgd", 12),
    ("momentum", 20),
    ("adamw", 28),
    ("sgd4", 12),
    ("momentum4", 20),
    ("adamw4", 28),
];

/// Elements per invocation of an entry point of [`OPTIMIZERS`].
fn width(entry: &str) -> u64 {
    if entry.ends_with('4') {
        4
    } else {
        1
    }
}

/// The optimizers' pipelines, plain and fused, and their one bind group.
pub struct Optimizers {
    group0: wgpu::BindGroup,
    /// Per entry of [`OPTIMIZERS`]: (plain, fused, workgroups).
    pipelines: Vec<(wgpu::ComputePipeline, wgpu::ComputePipeline, (u32, u32))>,
    _buffers: Vec<wgpu::Buffer>,
}

impl Optimizers {
    /// Over tensor `p` (tensor 0 of the EMA that made `epilogue`) of `arena`, `n` elements.
    pub fn new(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        arena: &ParamArena,
        epilogue: &Epilogue,
        n: u64,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let storage_buffer = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: n.max(4) * 4,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (g, m, v) = (
            storage_buffer("grad"),
            storage_buffer("m"),
            storage_buffer("v"),
        );
        let grads: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
        queue.write_buffer(&g, 0, bytemuck::cast_slice(&grads));
        let hyper = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hyper"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // lr, beta1, beta2, eps, weight decay, bias corrections at t = 10.
        let hyper_values = [1e-3f32, 0.9, 0.999, 1e-8, 0.01, 1.535, 100.5, 0.0];
        queue.write_buffer(&hyper, 0, bytemuck::cast_slice(&hyper_values));
        let entry = |binding, ty| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let rw = wgpu::BufferBindingType::Storage { read_only: false };
        let layout0 = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("optimizer"),
            entries: &[
                entry(0, rw),
                entry(1, wgpu::BufferBindingType::Storage { read_only: true }),
                entry(2, rw),
                entry(3, rw),
                entry(4, wgpu::BufferBindingType::Uniform),
            ],
        });
        let group0 = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("optimizer"),
            layout: &layout0,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(arena.binding("p")?),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: g.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: m.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: v.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: hyper.as_entire_binding(),
                },
            ],
        });
        let base = include_str!("../optimizers.wgsl");
        let make = |name: &str, fused: bool| {
            let source = if fused {
                // Only `name`'s placeholder becomes the call; the others' entry points are
                // not compiled into this pipeline.
                let call = if width(name) == 4 {
                    "ema_epilogue4(0u, e, x);"
                } else {
                    "ema_epilogue(0u, i, x);"
                };
                let at = base.find(&format!("fn {name}(")).unwrap_or(0);
                let (head, tail) = base.split_at(at);
                format!(
                    "{}{}\n{}",
                    head.replace("//EMA", ""),
                    tail.replacen("//EMA", call, 1).replace("//EMA", ""),
                    epilogue.source()
                )
            } else {
                base.to_string()
            };
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            let layouts: Vec<Option<&wgpu::BindGroupLayout>> = if fused {
                vec![Some(&layout0), Some(epilogue.layout())]
            } else {
                vec![Some(&layout0)]
            };
            let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(name),
                bind_group_layouts: &layouts,
                immediate_size: 0,
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(name),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let workgroups = |name: &str| {
            let groups = n.div_ceil(256 * width(name)).max(1);
            let x = groups.min(65_535);
            (x as u32, groups.div_ceil(x) as u32)
        };
        let pipelines = OPTIMIZERS
            .iter()
            .map(|(name, _)| (make(name, false), make(name, true), workgroups(name)))
            .collect();
        Ok(Self {
            group0,
            pipelines,
            _buffers: vec![g, m, v, hyper],
        })
    }

    /// Records optimizer `which` (an index of [`OPTIMIZERS`]): plain, or fused with `step`.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, which: usize, step: Option<&FusedStep>) {
        let (plain, fused, (x, y)) = &self.pipelines[which];
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(if step.is_some() { fused } else { plain });
        pass.set_bind_group(0, &self.group0, &[]);
        if let Some(s) = step {
            s.set_on(&mut pass);
        }
        pass.dispatch_workgroups(*x, *y, 1);
    }
}
