//! Evaluation with the EMA weights: swap (exact, twice restores both sides bit for bit) and
//! copy into the parameters, on arenas and on user buffers at odd offsets.

use crate::common::{buffer_with, gpu, random, write};
use wgpu_ema::{wgpu, Error, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

fn read_buffer(ctx: &GpuContext, buf: &wgpu::Buffer, offset: u64, n: usize) -> Vec<f32> {
    // Track the range in a throwaway EMA: its shadows start as a copy of the range.
    let ema = GpuEma::builder(Schedule::constant(0.5))
        .track_buffer(TensorSpec::new("x", [n]), buf, offset)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.read_shadow_blocking("x").unwrap()
}

#[test]
fn swap_twice_restores_both_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let specs = vec![TensorSpec::new("a", [5, 7]), TensorSpec::new("b", [3])];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let n_user = 1029;
    let user = buffer_with(ctx, &random(9, n_user), 8);
    for (i, s) in specs.iter().enumerate() {
        arena
            .write(&ctx.queue, &s.name, &random(i as u64, s.numel() as usize))
            .unwrap();
    }
    let mut ema = GpuEma::builder(Schedule::constant(0.7))
        .track_arena(&arena)
        .track_buffer(TensorSpec::new("user", [n_user]), &user, 8)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    for step in 0..3 {
        for (i, s) in specs.iter().enumerate() {
            arena
                .write(
                    &ctx.queue,
                    &s.name,
                    &random(10 * step + i as u64 + 50, s.numel() as usize),
                )
                .unwrap();
        }
        write(ctx, &user, 8, &random(77 + step, n_user));
        ema.update().unwrap();
    }
    let params_before = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    let user_before = read_buffer(ctx, &user, 8, n_user);
    let shadows_before = ema.read_shadows_blocking().unwrap();

    ema.swap().unwrap();
    assert!(ema.is_swapped());
    let params_swapped = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    for s in &specs {
        assert_eq!(
            params_swapped.try_get(&s.name).unwrap(),
            shadows_before.try_get(&s.name).unwrap()
        );
    }
    assert_eq!(
        read_buffer(ctx, &user, 8, n_user),
        shadows_before.try_get("user").unwrap()
    );
    let shadows_swapped = ema.read_shadows_blocking().unwrap();
    assert_eq!(
        shadows_swapped.try_get("a").unwrap(),
        params_before.try_get("a").unwrap()
    );
    assert_eq!(shadows_swapped.try_get("user").unwrap(), user_before);

    // Training while swapped is refused.
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    assert!(matches!(ema.record_update(&mut enc), Err(Error::Swapped)));
    assert!(matches!(
        ema.record_copy_to_params(&mut enc),
        Err(Error::Swapped)
    ));
    assert!(matches!(ema.rebind("user", &user, 8), Err(Error::Swapped)));
    assert_eq!(ema.num_updates(), 3, "a refused update does not count");

    ema.swap().unwrap();
    assert!(!ema.is_swapped());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let params_after = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    for s in &specs {
        assert_eq!(
            bits(params_after.try_get(&s.name).unwrap()),
            bits(params_before.try_get(&s.name).unwrap())
        );
    }
    assert_eq!(
        bits(&read_buffer(ctx, &user, 8, n_user)),
        bits(&user_before)
    );
    assert_eq!(ema.read_shadows_blocking().unwrap(), shadows_before);
    ema.update().unwrap();
}

#[test]
fn copy_to_params_loads_the_ema_weights() {
    let Some(ctx) = gpu() else { return };
    let n = 257;
    let user = buffer_with(ctx, &random(1, n), 4);
    let mut ema = GpuEma::builder(Schedule::constant(0.5))
        .track_buffer(TensorSpec::new("w", [n]), &user, 4)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    write(ctx, &user, 4, &random(2, n));
    ema.update().unwrap();
    let shadows = ema.read_shadow_blocking("w").unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_copy_to_params(&mut enc).unwrap();
    ctx.queue.submit(Some(enc.finish()));
    assert_eq!(read_buffer(ctx, &user, 4, n), shadows);
    // Neighbours of the range are untouched (NaN sentinels stay NaN).
    let around = read_buffer(ctx, &user, 0, 1);
    assert!(around[0].is_nan());
}
