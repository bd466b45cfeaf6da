//! The fused epilogue in the browser: an SGD shader of the page's own that calls
//! `ema_epilogue` with each new value (or `ema_epilogue4` with four), against the same SGD
//! followed by the separate pass, from the same start with the same gradients; the EMAs must
//! agree bit for bit (plain and compensated), on WebGPU's uniform-ring path.

use serde_json::{json, Value};
use wgpu_ema::checkpoint::EmaState;
use wgpu_ema::{wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

use crate::Error;

const SGD: &str = "
struct Info { tensor: u32, offset: u32, count: u32, pad: u32 }
@group(0) @binding(0) var<storage, read_write> params: array<f32>;
@group(0) @binding(1) var<storage, read> grads: array<f32>;
@group(0) @binding(2) var<uniform> info: Info;

@compute @workgroup_size(64)
fn sgd(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= info.count {
        return;
    }
    let i = info.offset + e;
    let p = params[i] - 0.05 * grads[i];
    params[i] = p;
    //EMA
}

// Four elements per invocation, for `ema_epilogue4` (lanes past the tensor get NaN, which
// the EMA ignores).
@compute @workgroup_size(64)
fn sgd4(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = 4u * id.x;
    if e >= info.count {
        return;
    }
    let i = info.offset + e;
    var p = vec4<f32>(bitcast<f32>(0x7fc00000u | info.pad)); // NaN, not a constant (Tint refuses NaN constants)
    for (var k = 0u; k < 4u; k++) {
        if e + k < info.count {
            let x = params[i + k] - 0.05 * grads[i + k];
            params[i + k] = x;
            p[k] = x;
        }
    }
    //EMA4
}
";

fn specs() -> Vec<TensorSpec> {
    vec![TensorSpec::new("a", [1001]), TensorSpec::new("b", [37])]
}

/// One training run: its arena, EMA, pipeline and per-tensor bind groups.
struct Run {
    arena: ParamArena,
    ema: GpuEma,
    pipeline: wgpu::ComputePipeline,
    groups: Vec<(wgpu::BindGroup, u32)>,
    fused: bool,
}

fn start(
    ctx: &GpuContext,
    schedule: Schedule,
    compensated: bool,
    fused: bool,
    wide: bool,
    init: &[Vec<f32>],
    grads: &wgpu::Buffer,
) -> Result<Run, Error> {
    let device = &ctx.device;
    let arena = ParamArena::new(device, specs())?;
    for (s, v) in specs().iter().zip(init) {
        arena.write(&ctx.queue, &s.name, v)?;
    }
    let mut ema = GpuEma::builder(schedule)
        .compensated(compensated)
        .track_arena(&arena)
        .build(device, &ctx.queue)?;
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
    let layout0 = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("sgd"),
        entries: &[
            entry(0, wgpu::BufferBindingType::Storage { read_only: false }),
            entry(1, wgpu::BufferBindingType::Storage { read_only: true }),
            entry(2, wgpu::BufferBindingType::Uniform),
        ],
    });
    let (source, epilogue_layout) = if fused {
        let epi = ema.epilogue(1)?;
        (
            format!(
                "{}\n{}",
                SGD.replace("//EMA4", "ema_epilogue4(info.tensor, e, p);")
                    .replace("//EMA\n", "ema_epilogue(info.tensor, e, p);\n"),
                epi.source()
            ),
            Some(epi.layout().clone()),
        )
    } else {
        (SGD.to_string(), None)
    };
    let mut layouts = vec![Some(&layout0)];
    layouts.extend(epilogue_layout.as_ref().map(Some));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("sgd"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("sgd"),
        bind_group_layouts: &layouts,
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("sgd"),
        layout: Some(&layout),
        module: &module,
        entry_point: Some(if wide { "sgd4" } else { "sgd" }),
        compilation_options: Default::default(),
        cache: None,
    });
    let mut groups = Vec::new();
    for (t, s) in specs().iter().enumerate() {
        let info = [
            t as u32,
            (arena.offset(&s.name)? / 4) as u32,
            s.numel() as u32,
            0,
        ];
        let ubuf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("sgd info"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue
            .write_buffer(&ubuf, 0, bytemuck::cast_slice(&info));
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("sgd"),
            layout: &layout0,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: arena.buffer().as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: grads.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: ubuf.as_entire_binding(),
                },
            ],
        });
        let per_group = if wide { 256 } else { 64 };
        groups.push((bg, (s.numel() as u32).div_ceil(per_group)));
    }
    Ok(Run {
        arena,
        ema,
        pipeline,
        groups,
        fused,
    })
}

impl Run {
    fn record(&mut self, encoder: &mut wgpu::CommandEncoder) -> Result<(), Error> {
        let step = if self.fused {
            Some(self.ema.fused_step()?)
        } else {
            None
        };
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            if let Some(s) = &step {
                s.set_on(&mut pass);
            }
            for (bg, n) in &self.groups {
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(*n, 1, 1);
            }
        }
        if !self.fused {
            self.ema.record_update(encoder)?;
        }
        Ok(())
    }

    /// Shadows and compensation terms, as bits.
    async fn state(&self) -> Result<Vec<u32>, Error> {
        let snapshot = self.ema.snapshot(false)?.into_host().await?;
        let mut out = Vec::new();
        for i in 0..specs().len() {
            out.extend(snapshot.read_shadow(i)?.iter().map(|x| x.to_bits()));
            if let Some(c) = snapshot.read_compensation(i)? {
                out.extend(c.iter().map(|x| x.to_bits()));
            }
        }
        Ok(out)
    }
}

/// `steps` SGD steps each way, plain and compensated; `fused_pass` when every EMA agrees bit
/// for bit (and the parameters too: the optimizers are the same).
pub async fn run(ctx: &GpuContext, steps: u32) -> Result<Value, Error> {
    let mut rng = fastrand::Rng::with_seed(23);
    let init: Vec<Vec<f32>> = specs()
        .iter()
        .map(|s| (0..s.numel()).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect();
    let mut same = true;
    let mut differing = Vec::new();
    for (schedule, compensated, wide) in [
        (Schedule::tf(0.99), false, false),
        (Schedule::constant(0.999), true, false),
        (Schedule::tf(0.99), false, true),
        (Schedule::constant(0.999), true, true),
    ] {
        // One gradient buffer laid out as the arenas (the same specs give the same layout).
        let probe = ParamArena::new(&ctx.device, specs())?;
        let grads = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("grads"),
            size: probe.size(),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut separate = start(ctx, schedule, compensated, false, wide, &init, &grads)?;
        let mut fused = start(ctx, schedule, compensated, true, wide, &init, &grads)?;
        for _ in 0..steps {
            let g: Vec<f32> = (0..probe.size() / 4).map(|_| rng.f32() - 0.5).collect();
            ctx.queue.write_buffer(&grads, 0, bytemuck::cast_slice(&g));
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            separate.record(&mut encoder)?;
            fused.record(&mut encoder)?;
            ctx.queue.submit(Some(encoder.finish()));
        }
        let (a, b) = (separate.state().await?, fused.state().await?);
        let pa = separate.arena.read(&ctx.device, &ctx.queue).await?;
        let pb = fused.arena.read(&ctx.device, &ctx.queue).await?;
        if a != b || pa != pb {
            same = false;
            differing.push(format!(
                "{}, {} per call",
                if compensated { "compensated" } else { "plain" },
                if wide { 4 } else { 1 }
            ));
        }
    }
    Ok(json!({
        "fused_steps": steps,
        "fused_differing": differing,
        "fused_pass": same,
    }))
}
