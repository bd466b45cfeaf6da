//! The GPU update against the f64 reference: sizes, offsets, arena and user buffers, both
//! numerics, both ways of passing `alpha`, several steps per encoder, rebinding, readback.

use crate::common::{assert_close, assert_shadows_close, buffer_with, gpu, random, write};
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{wgpu, GpuContext, GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

/// f32 rounding per step, with room for a fused multiply-add on the GPU.
/// Relative to max(1, |f64|). Rounding does not accumulate step over step (each step's error
/// is scaled by the decay at the next): the worst measured on lavapipe and llvmpipe, over
/// every test of this suite, is 1.8e-7 (1.5 epsilon). 16 epsilon leaves room for fused
/// multiply-adds on real GPUs and fails any update that is off.
const TOL: f64 = 16.0 * f32::EPSILON as f64;

/// Tracks one tensor of `n` elements at `offset` in a user buffer, runs `steps` updates with
/// fresh parameters each step, and compares with the reference.
fn run_user_buffer(
    ctx: &GpuContext,
    n: usize,
    offset: u64,
    steps: usize,
    numerics: Numerics,
    immediates: bool,
) {
    let schedule = Schedule::tf(0.99);
    let p0 = random(n as u64 + offset, n);
    let buf = buffer_with(ctx, &p0, offset);
    let mut ema = GpuEma::builder(schedule)
        .numerics(numerics)
        .prefer_immediates(immediates)
        .track_buffer(TensorSpec::new("t", [n]), &buf, offset)
        .build(&ctx.device, &ctx.queue)
        .expect("build");
    // The path asked for is the path taken: immediates wherever the device has them (Mesa's
    // Vulkan and GL drivers do), the ring otherwise.
    let device_has = ctx.device.features().contains(wgpu::Features::IMMEDIATES);
    assert_eq!(ema.uses_immediates(), immediates && device_has);
    if std::env::var("WGPU_EMA_REQUIRE_ADAPTER").as_deref() == Ok("1") {
        // CI's drivers have immediates: both paths are tested there, not the ring twice.
        assert!(device_has, "the device lacks Features::IMMEDIATES");
    }
    let mut reference = ReferenceEma::new(schedule, numerics, &[&p0]).unwrap();
    for step in 0..steps {
        let p = random(1000 + step as u64, n);
        write(ctx, &buf, offset, &p);
        ema.update().expect("update");
        reference.update(&[&p]).unwrap();
    }
    let got = ema.read_shadow_blocking("t").unwrap();
    let what = format!("n={n} offset={offset} {numerics:?} immediates={immediates}");
    assert_close(&what, &got, &reference.shadows()[0], TOL);
}

#[test]
fn odd_sizes_and_offsets_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    for n in [1, 2, 3, 4, 5, 255, 256, 257, 1023, 1024, 1025, 4099] {
        for offset in [0, 4, 8, 16, 260] {
            run_user_buffer(ctx, n, offset, 3, Numerics::Exact, true);
        }
    }
}

#[test]
fn both_numerics_and_the_uniform_ring() {
    let Some(ctx) = gpu() else { return };
    for numerics in [Numerics::Exact, Numerics::TensorFlow] {
        for immediates in [true, false] {
            run_user_buffer(ctx, 1029, 4, 20, numerics, immediates);
            run_user_buffer(ctx, 4096, 0, 20, numerics, immediates);
        }
    }
}

#[test]
fn the_ring_is_used_when_immediates_are_refused() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 8), 0);
    let ema = GpuEma::builder(Schedule::constant(0.9))
        .prefer_immediates(false)
        .track_buffer(TensorSpec::new("t", [8]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(!ema.uses_immediates());
}

/// A model of many tensors with odd sizes, in an arena and as separate user buffers.
fn model() -> Vec<TensorSpec> {
    [
        ("embed", vec![37, 13]),
        ("l0.weight", vec![13, 29]),
        ("l0.bias", vec![29]),
        ("l1.weight", vec![29, 1]),
        ("l1.bias", vec![]),
        ("norm.scale", vec![3]),
        ("l2.weight", vec![257, 5]),
        ("l2.bias", vec![5]),
    ]
    .into_iter()
    .map(|(n, s)| TensorSpec::new(n, s))
    .collect()
}

#[test]
fn a_model_in_an_arena_matches_the_reference_over_many_steps() {
    let Some(ctx) = gpu() else { return };
    let specs = model();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let init: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| random(i as u64, s.numel() as usize))
        .collect();
    for (s, v) in specs.iter().zip(&init) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let schedule = Schedule::tf(0.999);
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(
        ema.dispatches_per_step(),
        1,
        "a small arena is one dispatch"
    );
    let slices: Vec<&[f32]> = init.iter().map(|v| v.as_slice()).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &slices).unwrap();
    let steps = 150;
    let mut last = Vec::new();
    for step in 0..steps {
        let params: Vec<Vec<f32>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| random((step * 100 + i) as u64 + 7, s.numel() as usize))
            .collect();
        for (s, v) in specs.iter().zip(&params) {
            arena.write(&ctx.queue, &s.name, v).unwrap();
        }
        ema.update().unwrap();
        let slices: Vec<&[f32]> = params.iter().map(|v| v.as_slice()).collect();
        reference.update(&slices).unwrap();
        last = params;
    }
    assert_eq!(ema.num_updates(), steps as u64);
    let shadows = ema.read_shadows_blocking().unwrap();
    assert_shadows_close(&shadows, &specs, &reference, TOL);
    // The parameters read back are the last written, every tensor, bit for bit.
    let p = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    for (s, v) in specs.iter().zip(&last) {
        assert_eq!(p.try_get(&s.name).unwrap(), v.as_slice(), "`{}`", s.name);
    }
}

#[test]
fn a_model_in_user_buffers_matches_the_arena_bitwise() {
    let Some(ctx) = gpu() else { return };
    let specs = model();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    // User buffers: all tensors in one buffer, packed at 4-byte offsets (odd alignments).
    let mut offsets = Vec::new();
    let mut at = 4u64;
    for s in &specs {
        offsets.push(at);
        at += s.numel() * 4 + 4;
    }
    let user = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("packed"),
        size: at,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let write_all = |seed: u64| {
        for (i, s) in specs.iter().enumerate() {
            let v = random(seed * 31 + i as u64, s.numel() as usize);
            arena.write(&ctx.queue, &s.name, &v).unwrap();
            write(ctx, &user, offsets[i], &v);
        }
    };
    write_all(0);
    let schedule = Schedule::tf(0.99);
    let mut a = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut b = specs
        .iter()
        .zip(&offsets)
        .fold(GpuEma::builder(schedule), |bld, (s, &o)| {
            bld.track_buffer(s.clone(), &user, o)
        })
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    for step in 1..=30 {
        write_all(step);
        a.update().unwrap();
        b.update().unwrap();
    }
    let sa = a.read_shadows_blocking().unwrap();
    let sb = b.read_shadows_blocking().unwrap();
    for s in &specs {
        let (x, y) = (sa.try_get(&s.name).unwrap(), sb.try_get(&s.name).unwrap());
        // The same expression per element wherever the tensor lives: bit for bit.
        assert_eq!(x.len(), y.len());
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            assert!(
                crate::common::ulps(*p, *q) == 0,
                "{} element {i}: arena {p} vs user buffer {q}",
                s.name
            );
        }
    }
}

#[test]
fn init_writes_every_shadow_element() {
    let Some(ctx) = gpu() else { return };
    let n = 1031;
    let p = random(5, n);
    let buf = buffer_with(ctx, &p, 12);
    let mut ema = GpuEma::builder(Schedule::constant(0.5))
        .track_buffer(TensorSpec::new("t", [n]), &buf, 12)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(
        ema.read_shadow_blocking("t").unwrap(),
        p,
        "shadows start equal to params"
    );
    // Poison, then reset on the GPU: every element must be rewritten.
    ema.write_shadow("t", &vec![f32::NAN; n]).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_reset(&mut enc).unwrap();
    ctx.queue.submit(Some(enc.finish()));
    assert_eq!(ema.read_shadow_blocking("t").unwrap(), p);
}

#[test]
fn several_steps_in_one_encoder_equal_separate_submits() {
    let Some(ctx) = gpu() else { return };
    for immediates in [true, false] {
        let n = 777;
        let p = random(9, n);
        let buf1 = buffer_with(ctx, &p, 0);
        let buf2 = buffer_with(ctx, &p, 0);
        let build = |buf| {
            GpuEma::builder(Schedule::tf(0.9999))
                .prefer_immediates(immediates)
                .ring_slots(8)
                .track_buffer(TensorSpec::new("t", [n]), buf, 0)
                .build(&ctx.device, &ctx.queue)
                .unwrap()
        };
        let (mut one, mut many) = (build(&buf1), build(&buf2));
        // Params change between steps on the GPU: a copy recorded between the updates.
        let src = buffer_with(ctx, &random(10, n), 0);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for _ in 0..5 {
            one.record_update(&mut enc).unwrap();
        }
        enc.copy_buffer_to_buffer(&src, 0, &buf1, 0, (n * 4) as u64);
        one.record_updates(&mut enc, 3).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        for i in 0..8 {
            if i == 5 {
                let mut e = ctx.device.create_command_encoder(&Default::default());
                e.copy_buffer_to_buffer(&src, 0, &buf2, 0, (n * 4) as u64);
                ctx.queue.submit(Some(e.finish()));
            }
            many.update().unwrap();
        }
        let (a, b) = (
            one.read_shadow_blocking("t").unwrap(),
            many.read_shadow_blocking("t").unwrap(),
        );
        assert_eq!(a, b, "immediates={immediates}");
        assert_ne!(a, p, "the shadows moved");
        // More steps in one encoder than the ring has slots (and single record_update calls,
        // which once wrapped around silently): still what separate submits give.
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        one.record_updates(&mut enc, 11).unwrap();
        for _ in 0..9 {
            one.record_update(&mut enc).unwrap();
        }
        ctx.queue.submit(Some(enc.finish()));
        for _ in 0..20 {
            many.update().unwrap();
        }
        assert_eq!(
            one.read_shadow_blocking("t").unwrap(),
            many.read_shadow_blocking("t").unwrap(),
            "immediates={immediates}, 20 steps in one encoder on an 8-slot ring"
        );
    }
}

// (That a rebind into a window already bound makes no new bind group is the planner's unit
// test `a_rebind_into_a_bound_window_patches_one_row`: a GPU test cannot see it.)
#[test]
fn rebinding_follows_the_new_buffer() {
    let Some(ctx) = gpu() else { return };
    let n = 300;
    let schedule = Schedule::constant(0.75);
    let p0 = random(1, n);
    let a = buffer_with(ctx, &p0, 0);
    let b = buffer_with(ctx, &random(2, n), 36);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("w", [n]), &a, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
    for step in 0..6u64 {
        let p = random(100 + step, n);
        // Alternate buffers and offsets as a framework's allocator would.
        let (buf, off) = if step % 2 == 0 { (&b, 36) } else { (&a, 0) };
        write(ctx, buf, off, &p);
        ema.rebind("w", buf, off).unwrap();
        ema.update().unwrap();
        reference.update(&[&p]).unwrap();
    }
    assert_close(
        "rebind",
        &ema.read_shadow_blocking("w").unwrap(),
        &reference.shadows()[0],
        TOL,
    );
}

#[test]
fn readback_sees_submitted_steps_only() {
    let Some(ctx) = gpu() else { return };
    let n = 64;
    let p = random(3, n);
    let buf = buffer_with(ctx, &p, 0);
    let mut ema = GpuEma::builder(Schedule::constant(0.5))
        .track_buffer(TensorSpec::new("t", [n]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    write(ctx, &buf, 0, &random(4, n));
    ema.update().unwrap();
    let after_one = ema.read_shadow_blocking("t").unwrap();
    // A step recorded but not yet submitted does not show, and does not block the read.
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_update(&mut enc).unwrap();
    assert_eq!(ema.read_shadow_blocking("t").unwrap(), after_one);
    ctx.queue.submit(Some(enc.finish()));
    assert_ne!(ema.read_shadow_blocking("t").unwrap(), after_one);
    // The async read, with a thread polling the device.
    let fut = ema.read_shadows();
    let device = ctx.device.clone();
    let poller = std::thread::spawn(move || device.poll(wgpu::PollType::wait_indefinitely()));
    let all = pollster::block_on(fut).unwrap();
    poller.join().unwrap().unwrap();
    assert_eq!(
        all.try_get("t").unwrap(),
        ema.read_shadow_blocking("t").unwrap()
    );
}

#[test]
fn caller_global_step_drives_the_decay() {
    let Some(ctx) = gpu() else { return };
    let n = 16;
    let p0 = random(8, n);
    let buf = buffer_with(ctx, &p0, 0);
    let schedule = Schedule::tf(0.9999);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("t", [n]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
    for step in [100u64, 200, 5000] {
        let p = random(step, n);
        write(ctx, &buf, 0, &p);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_update_at(&mut enc, step).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        reference.update_at(step, &[&p]).unwrap();
    }
    assert_eq!(ema.num_updates(), 5000);
    assert_close(
        "global step",
        &ema.read_shadow_blocking("t").unwrap(),
        &reference.shadows()[0],
        TOL,
    );
}

/// The GPU and the CPU's f32 path compute `s + alpha * (p - s)` in f32 alike: on Mesa's
/// drivers (which do not fuse it) bit for bit, as the guide says; on a GPU that fuses the
/// multiply-add, within an ulp per step.
#[test]
fn the_gpu_equals_the_cpu_f32_path() {
    let Some(ctx) = gpu() else { return };
    let software = ctx.adapter.get_info().device_type == wgpu::DeviceType::Cpu;
    let schedule = Schedule::tf(0.99);
    let sizes = [1usize, 5, 64, 1031];
    let specs: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), [n]))
        .collect();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let mut cpu = wgpu_ema::cpu::CpuEma::new(schedule, Numerics::Exact).unwrap();
    for (i, s) in specs.iter().enumerate() {
        let v = random(500 + i as u64, sizes[i]);
        arena.write(&ctx.queue, &s.name, &v).unwrap();
        cpu.track(s.clone(), &v).unwrap();
    }
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let steps = 40;
    for step in 0..steps {
        let params: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random(1000 + step * 10 + i as u64, n))
            .collect();
        for (s, v) in specs.iter().zip(&params) {
            arena.write(&ctx.queue, &s.name, v).unwrap();
        }
        ema.update().unwrap();
        let slices: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
        cpu.update(&slices).unwrap();
    }
    let got = ema.read_shadows_blocking().unwrap();
    let allowed = if software { 0 } else { steps };
    for s in &specs {
        let (g, c) = (got.try_get(&s.name).unwrap(), cpu.shadow(&s.name).unwrap());
        assert_eq!(g.len(), c.len());
        let worst = g
            .iter()
            .zip(c)
            .map(|(a, b)| crate::common::ulps(*a, *b))
            .max()
            .unwrap_or(0);
        assert!(
            worst <= allowed,
            "`{}`: {worst} ulps from the CPU path",
            s.name
        );
    }
}

/// The vec4 load path (`update_aligned`) and the cases that must not take it: a tensor whose
/// last item would lie past the end of its buffer (the buffer exactly as large as the tensor,
/// `n % 4 != 0`), one at an offset that is not a multiple of 16 bytes, and an aligned one, all
/// tracked by one EMA, against the f64 reference over several steps. Note: lavapipe and
/// llvmpipe return the buffer's real bytes for a vec4 read past a binding's end, so this test
/// cannot catch a plan that wrongly sends the first case down the vec4 path (a browser would
/// clamp the read); the planner's unit test
/// `the_vec4_path_needs_f32_rows_on_16_bytes_with_their_last_item_inside` does.
#[test]
fn the_vec4_path_and_where_it_must_not_be_taken() {
    let Some(ctx) = gpu() else { return };
    let exact = |data: &[f32]| {
        let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("exactly the tensor"),
            size: (data.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        write(ctx, &buf, 0, data);
        buf
    };
    let cases: [(usize, u64, bool); 4] = [
        (37, 0, true),
        (1030, 0, true),
        (37, 4, false),
        (1029, 16, false),
    ];
    let start: Vec<Vec<f32>> = cases
        .iter()
        .enumerate()
        .map(|(i, &(n, ..))| random(500 + i as u64, n))
        .collect();
    let bufs: Vec<wgpu::Buffer> = cases
        .iter()
        .zip(&start)
        .map(|(&(_, offset, exact_size), v)| {
            if exact_size {
                exact(v)
            } else {
                buffer_with(ctx, v, offset)
            }
        })
        .collect();
    let specs: Vec<TensorSpec> = cases
        .iter()
        .enumerate()
        .map(|(i, &(n, ..))| TensorSpec::new(format!("t{i}"), [n]))
        .collect();
    let schedule = Schedule::constant(0.75);
    let mut builder = GpuEma::builder(schedule);
    for ((s, b), &(_, offset, _)) in specs.iter().zip(&bufs).zip(&cases) {
        builder = builder.track_buffer(s.clone(), b, offset);
    }
    let mut ema = builder.build(&ctx.device, &ctx.queue).unwrap();
    let views: Vec<&[f32]> = start.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &views).unwrap();
    for step in 1..=5u64 {
        let now: Vec<Vec<f32>> = start
            .iter()
            .enumerate()
            .map(|(i, v)| random(600 + 10 * step + i as u64, v.len()))
            .collect();
        for ((b, v), &(_, offset, _)) in bufs.iter().zip(&now).zip(&cases) {
            write(ctx, b, offset, v);
        }
        ema.update().unwrap();
        let views: Vec<&[f32]> = now.iter().map(Vec::as_slice).collect();
        reference.update(&views).unwrap();
    }
    assert_shadows_close(
        &ema.read_shadows_blocking().unwrap(),
        &specs,
        &reference,
        TOL,
    );
}
