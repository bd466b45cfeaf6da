//! The fused epilogue: an optimizer shader of the test's own (SGD over an arena, one dispatch
//! per tensor) run twice from the same start with the same gradients, once followed by the
//! separate pass (`record_update`) and once calling `ema_epilogue` with each new value
//! (`fused_step`). The EMA's state must be the same bit for bit after every step, for each
//! schedule, policy, numerics, several EMAs, compensation, a selection and BEMA.

use crate::common::{gpu, random};
use wgpu_ema::schedule::{Bema, Policy};
use wgpu_ema::select::Selection;
use wgpu_ema::{
    wgpu, Error, GpuContext, GpuEma, GpuEmaBuilder, Numerics, ParamArena, Schedule, TensorSpec,
};

/// The caller's optimizer; `//FUSED` (`//FUSED4` in `sgd4`) becomes the epilogue's call in
/// the fused variant.
const OPTIMIZER: &str = "
struct Meta { tensor: u32, offset: u32, count: u32, pad: u32 }
@group(0) @binding(0) var<storage, read_write> params: array<f32>;
@group(0) @binding(1) var<storage, read> grads: array<f32>;
@group(0) @binding(2) var<uniform> info: Meta;

@compute @workgroup_size(64)
fn sgd(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= info.count {
        return;
    }
    let i = info.offset + e;
    let p = params[i] - 0.05 * grads[i];
    params[i] = p;
    //FUSED
}

// Four elements per invocation, for `ema_epilogue4`: lanes past the tensor's end are not
// the tensor's (not written), and get NaN, which the EMA must ignore.
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
    //FUSED4
}
";

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w", [37, 3]),
        TensorSpec::new("b", [5]),
        TensorSpec::new("s", [1]),
        TensorSpec::new("big", [1029]),
    ]
}

/// One training run: the arena, the gradients' buffer, the optimizer's pipeline and bind
/// groups (one per tensor), and the EMA.
struct Run {
    arena: ParamArena,
    grads: wgpu::Buffer,
    pipeline: wgpu::ComputePipeline,
    groups: Vec<(wgpu::BindGroup, u32)>,
    ema: GpuEma,
    fused: bool,
}

fn optimizer_layout(ctx: &GpuContext) -> wgpu::BindGroupLayout {
    let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    ctx.device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("test optimizer"),
            entries: &[
                storage(0, false),
                storage(1, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
            ],
        })
}

/// The call the fused variant makes (an untracked tensor, left out by a selection, has no
/// EMA tensor number: the optimizer does not call the epilogue for it).
const CALL: &str = "if info.tensor != 0xffffffffu { ema_epilogue(info.tensor, e, p); }";
/// The same with four elements per call (run by `sgd4`).
const CALL4: &str = "if info.tensor != 0xffffffffu { ema_epilogue4(info.tensor, e, p); }";

/// A run from the seeded start: separate when `call` is `None`, else fused with `call` in the
/// optimizer.
fn start(
    ctx: &GpuContext,
    schedule: Schedule,
    configure: &dyn Fn(GpuEmaBuilder<'_>) -> GpuEmaBuilder<'_>,
    call: Option<&str>,
) -> Run {
    let fused = call.is_some();
    // Four elements per invocation where the call is the four-element form.
    let wide = call.is_some_and(|c| c.contains("ema_epilogue4"));
    let (entry, per_group) = if wide { ("sgd4", 256) } else { ("sgd", 64) };
    let specs = specs();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    for (i, s) in specs.iter().enumerate() {
        arena
            .write(
                &ctx.queue,
                &s.name,
                &random(50 + i as u64, s.numel() as usize),
            )
            .unwrap();
    }
    let mut ema = configure(GpuEma::builder(schedule))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let layout0 = optimizer_layout(ctx);
    let (source, layouts) = if fused {
        let epi = ema.epilogue(1).unwrap();
        (
            format!(
                "{}\n{}",
                OPTIMIZER.replace(
                    if wide { "//FUSED4" } else { "//FUSED\n" },
                    &format!("{}\n", call.unwrap_or_default())
                ),
                epi.source()
            ),
            vec![Some(layout0.clone()), Some(epi.layout().clone())],
        )
    } else {
        (OPTIMIZER.to_string(), vec![Some(layout0.clone())])
    };
    let layouts: Vec<Option<&wgpu::BindGroupLayout>> = layouts.iter().map(Option::as_ref).collect();
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("test optimizer"),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
    let pl = ctx
        .device
        .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &layouts,
            immediate_size: 0,
        });
    let pipeline = ctx
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("test optimizer"),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
    let grads = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("grads"),
        size: arena.size(),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    // The EMA's tensor numbers are its specs' order (a selection may drop some).
    let tracked: Vec<String> = ema.specs().iter().map(|s| s.name.clone()).collect();
    let groups = specs
        .iter()
        .map(|s| {
            let t = tracked.iter().position(|n| *n == s.name);
            let meta = [
                t.map_or(u32::MAX, |t| t as u32),
                (arena.offset(&s.name).unwrap() / 4) as u32,
                s.numel() as u32,
                0,
            ];
            let ubuf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            ctx.queue
                .write_buffer(&ubuf, 0, bytemuck::cast_slice(&meta));
            let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
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
            (bg, (s.numel() as u32).div_ceil(per_group))
        })
        .collect();
    Run {
        arena,
        grads,
        pipeline,
        groups,
        ema,
        fused,
    }
}

impl Run {
    /// One optimizer step with the EMA, separate or fused; gradients seeded by `n`.
    fn step(&mut self, ctx: &GpuContext, n: u64) {
        let words = (self.arena.size() / 4) as usize;
        ctx.queue.write_buffer(
            &self.grads,
            0,
            bytemuck::cast_slice(&random(n * 7 + 1, words)),
        );
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let fused = self.fused.then(|| self.ema.fused_step().unwrap());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            if let Some(f) = &fused {
                f.set_on(&mut pass);
            }
            for (bg, groups) in &self.groups {
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(*groups, 1, 1);
            }
        }
        if !self.fused {
            self.ema.record_update(&mut enc).unwrap();
        }
        ctx.queue.submit(Some(enc.finish()));
    }

    /// Everything the EMA keeps, as bits: each EMA's shadows, and BEMA's weights.
    fn state(&mut self) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        for k in 0..self.ema.ema_count() {
            for (_, v) in self.ema.read_ema_blocking(k).unwrap().iter() {
                out.push(v.iter().map(|x| x.to_bits()).collect());
            }
        }
        if self.ema.bema_bias_weight().is_some() {
            for (_, v) in self.ema.read_bema_blocking().unwrap().iter() {
                out.push(v.iter().map(|x| x.to_bits()).collect());
            }
        }
        let snap = self.ema.snapshot(false).unwrap();
        for i in 0..self.ema.specs().len() {
            use wgpu_ema::checkpoint::EmaState;
            if let Some(c) = snap.read_compensation(i).unwrap() {
                out.push(c.iter().map(|x| x.to_bits()).collect());
            }
            if let Some(a) = snap.read_anchor(i).unwrap() {
                out.push(a.iter().map(|x| x.to_bits()).collect());
            }
        }
        out
    }
}

#[test]
fn the_fused_epilogue_is_the_separate_pass_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let policy = Policy {
        update_after_step: 3,
        update_every: 2,
        write_back_every: 0,
    };
    let restarting = Bema {
        restart_every: 5,
        ..Bema::default()
    };
    type Configure = Box<dyn Fn(GpuEmaBuilder<'_>) -> GpuEmaBuilder<'_>>;
    let tf = Schedule::tf(0.99);
    let options: Vec<(&str, Schedule, Configure)> = vec![
        (
            "tf(0.99), a burn-in and every 2nd step",
            tf,
            Box::new(move |b| b.policy(policy)),
        ),
        (
            "TensorFlow's numerics",
            Schedule::constant(0.9),
            Box::new(|b| b.numerics(Numerics::TensorFlow)),
        ),
        (
            "compensated",
            Schedule::constant(0.999),
            Box::new(|b| b.compensated(true)),
        ),
        (
            "three EMAs",
            tf,
            Box::new(|b| {
                b.extra_ema(Schedule::power(7.0))
                    .extra_ema(Schedule::constant(0.5))
            }),
        ),
        (
            "a selection",
            tf,
            Box::new(|b| b.select(Selection::new().copy("b").exclude("s"))),
        ),
        (
            "BEMA with restarts",
            Schedule::bema(restarting),
            Box::new(|b| {
                b.policy(Policy {
                    update_after_step: 2,
                    ..Policy::default()
                })
            }),
        ),
    ];
    let calls = [("one element per call", CALL), ("four per call", CALL4)];
    for ((what, schedule, configure), (form, call)) in
        options.iter().flat_map(|o| calls.map(|c| (o, c)))
    {
        let what = format!("{what}, {form}");
        let mut separate = start(ctx, *schedule, configure.as_ref(), None);
        let mut fused = start(ctx, *schedule, configure.as_ref(), Some(call));
        for n in 1..=13 {
            separate.step(ctx, n);
            fused.step(ctx, n);
            assert_eq!(
                separate
                    .arena
                    .read_blocking(&ctx.device, &ctx.queue)
                    .unwrap(),
                fused.arena.read_blocking(&ctx.device, &ctx.queue).unwrap(),
                "{what}: the optimizers diverged at step {n}"
            );
            let (a, b) = (separate.state(), fused.state());
            assert!(!a.is_empty());
            assert_eq!(a, b, "{what}: the EMA differs after step {n}");
        }
        fused.ema.check_epilogue().unwrap();
    }
}

#[test]
fn fused_misuse_is_an_error() {
    let Some(ctx) = gpu() else { return };
    fn same(b: GpuEmaBuilder<'_>) -> GpuEmaBuilder<'_> {
        b
    }
    let tf = Schedule::tf(0.99);
    let mut run = start(ctx, tf, &same, Some(CALL));
    run.step(ctx, 1);
    // The same update both ways would average twice.
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    assert!(matches!(
        run.ema.record_update_at(&mut enc, 1),
        Err(Error::InvalidConfig(_))
    ));
    run.ema.record_update_at(&mut enc, 2).unwrap();
    assert!(matches!(
        run.ema.fused_step_at(2),
        Err(Error::InvalidConfig(_))
    ));
    drop(enc);
    // Another group for the same EMA, and an epilogue where the policy writes back.
    assert!(matches!(run.ema.epilogue(2), Err(Error::InvalidConfig(_))));
    let arena = ParamArena::new(&ctx.device, specs()).unwrap();
    let mut wb = GpuEma::builder(Schedule::constant(0.9))
        .policy(Policy {
            write_back_every: 3,
            ..Policy::default()
        })
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(matches!(wb.epilogue(1), Err(Error::InvalidConfig(_))));
    // An EMA of nothing but empty tensors has no shadows to bind.
    let empty = ParamArena::new(&ctx.device, [TensorSpec::new("e", [0])]).unwrap();
    let mut nothing = GpuEma::builder(Schedule::constant(0.9))
        .track_arena(&empty)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(matches!(nothing.epilogue(1), Err(Error::InvalidConfig(_))));
    assert!(matches!(wb.fused_step(), Err(Error::InvalidConfig(_))));
    // A caller passing a tensor number, or an element, past what is tracked: those calls
    // write nothing, and the check says so (once).
    for call in [
        "ema_epilogue(info.tensor + 4u, e, p);",
        "ema_epilogue(info.tensor, e + info.count, p);",
        "ema_epilogue4(info.tensor, e + 4u * info.count, p);",
        "ema_epilogue4(info.tensor, e + 1u, p);",
    ] {
        let mut bad = start(ctx, tf, &same, Some(call));
        let before = bad.ema.read_shadows_blocking().unwrap();
        bad.ema.check_epilogue().unwrap();
        bad.step(ctx, 1);
        assert_eq!(bad.ema.read_shadows_blocking().unwrap(), before, "{call}");
        assert!(
            matches!(bad.ema.check_epilogue(), Err(Error::InvalidConfig(_))),
            "{call}"
        );
        bad.ema.check_epilogue().unwrap();
    }
}
