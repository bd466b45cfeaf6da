//! Large sizes: a 16.7-million-element tensor at an odd offset, and one element past the
//! 128 MiB storage binding that Mesa's lavapipe and llvmpipe allow. (A dispatch past 65,535
//! workgroups in one dimension needs more than 256 MiB of shadows in one binding, beyond
//! these drivers: `layout`'s unit tests check the 2-D split.)

mod common;

use common::{assert_close, buffer_with, gpu, random, write};
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

const TOL: f64 = 4.0 * f32::EPSILON as f64;

#[test]
fn a_large_tensor_at_an_odd_offset() {
    let Some(ctx) = gpu() else { return };
    // 65,535 * 256 + 1 elements at offset 4: 4,096 workgroups of 1,024 items, the last item
    // padded.
    let n = 65_535 * 256 + 1;
    let schedule = Schedule::constant(0.7);
    let p0 = random(11, n);
    let buf = buffer_with(ctx, &p0, 4);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("big", [n]), &buf, 4)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
    for step in 0..2 {
        let p = random(20 + step, n);
        write(ctx, &buf, 4, &p);
        ema.update().unwrap();
        reference.update(&[&p]).unwrap();
    }
    let got = ema.read_shadow_blocking("big").unwrap();
    assert_close(
        "16.7 million elements at offset 4",
        &got,
        &reference.shadows()[0],
        2.0 * TOL,
    );
}

#[test]
fn one_past_the_storage_binding_limit() {
    let Some(ctx) = gpu() else { return };
    let limit = ctx.device.limits().max_storage_buffer_binding_size;
    if limit > 256 << 20 {
        eprintln!("SKIPPED: binding limit {limit} bytes is too large to exceed in a test");
        return;
    }
    let n = (limit / 4) as usize + 1;
    let schedule = Schedule::tf(0.9);
    // An arena with a small tensor first, so the big one's chunks do not start at 0.
    let specs = [TensorSpec::new("small", [3]), TensorSpec::new("big", [n])];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let init = [random(1, 3), random(2, n)];
    for (s, v) in specs.iter().zip(&init) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(ema.dispatches_per_step(), 2, "split into two bindings");
    let mut reference =
        ReferenceEma::new(schedule, Numerics::Exact, &[&init[0], &init[1]]).unwrap();
    let p = [random(3, 3), random(4, n)];
    for (s, v) in specs.iter().zip(&p) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    ema.update().unwrap();
    reference.update(&[&p[0], &p[1]]).unwrap();
    let got = ema.read_shadows_blocking().unwrap();
    assert_close(
        "small",
        got.try_get("small").unwrap(),
        &reference.shadows()[0],
        TOL,
    );
    assert_close(
        "big",
        got.try_get("big").unwrap(),
        &reference.shadows()[1],
        TOL,
    );

    // The same tensor in a user buffer at an odd offset: read through overlapping windows.
    let buf = buffer_with(ctx, &init[1], 8);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("big", [n]), &buf, 8)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(ema.dispatches_per_step() >= 2);
    write(ctx, &buf, 8, &p[1]);
    ema.update().unwrap();
    assert_close(
        "big, user buffer",
        &ema.read_shadow_blocking("big").unwrap(),
        &reference.shadows()[1],
        TOL,
    );
}
