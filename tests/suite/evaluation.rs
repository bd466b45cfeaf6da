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

/// Words outside every tensor hold a sentinel no computation produces (not NaN: a NaN written
/// over NaN would not show). The shadows' padding lanes start as the first sentinel (the
/// initial copy reads them); the buffer's gaps are then set to a second one, so a pass that
/// writes a lane past a tensor's end writes the first over the second and shows.
const SENTINEL_AT_BUILD: u32 = 0x5EED_5EED;
const SENTINEL: u32 = 0x0BAD_F00D;

/// Tensors of `dtype` with 1 to 9 elements at word offsets in one buffer, a gap of 1 to 3
/// words between them: (name, element count, byte offset), and the buffer's size in words.
fn gapped_layout(dtype: wgpu_ema::ParamDtype) -> (Vec<(String, usize, u64)>, usize) {
    let mut at = 1usize; // words
    let mut out = Vec::new();
    for (i, n) in [1usize, 2, 3, 5, 6, 7, 9].into_iter().enumerate() {
        out.push((format!("t{i}"), n, (at * 4) as u64));
        at += (n * dtype.size() as usize).div_ceil(4) + 1 + i % 3;
    }
    (out, at + 2)
}

/// The buffer's words outside the tensors (a 16-bit tensor's last word belongs to it whole,
/// but its unused half must keep its bits: checked as `half_words`).
fn gap_words(
    layout: &[(String, usize, u64)],
    dtype: wgpu_ema::ParamDtype,
    words: usize,
) -> (Vec<usize>, Vec<usize>) {
    let mut inside = vec![false; words];
    let mut half_words = Vec::new();
    for (_, n, off) in layout {
        let first = (*off / 4) as usize;
        let bytes = n * dtype.size() as usize;
        for w in inside.iter_mut().skip(first).take(bytes.div_ceil(4)) {
            *w = true;
        }
        if !bytes.is_multiple_of(4) {
            half_words.push(first + bytes / 4);
        }
    }
    let gaps = (0..words).filter(|&w| !inside[w]).collect();
    (gaps, half_words)
}

#[test]
fn no_pass_writes_outside_a_tensor() {
    use wgpu_ema::ParamDtype;
    let Some(ctx) = gpu() else { return };
    for dtype in [ParamDtype::F32, ParamDtype::F16, ParamDtype::BF16] {
        let (layout, words) = gapped_layout(dtype);
        let (gaps, half_words) = gap_words(&layout, dtype, words);
        let mut init = vec![SENTINEL_AT_BUILD; words];
        // Tensor bits: random values of the dtype (f32 bits, or two 16-bit values per word
        // whose unused upper half keeps the sentinel's upper half).
        let mut rng = fastrand::Rng::with_seed(17);
        for (_, n, off) in &layout {
            let first = (*off / 4) as usize;
            match dtype {
                ParamDtype::F32 => {
                    for w in 0..*n {
                        init[first + w] = (rng.f32() - 0.5).to_bits();
                    }
                }
                _ => {
                    for e in 0..*n {
                        let v = rng.f32() - 0.5;
                        let h = match dtype {
                            ParamDtype::F16 => half::f16::from_f32(v).to_bits(),
                            _ => half::bf16::from_f32(v).to_bits(),
                        };
                        let w = &mut init[first + e / 2];
                        let shift = 16 * (e % 2);
                        *w = (*w & !(0xffff << shift)) | (u32::from(h) << shift);
                    }
                }
            }
        }
        let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gapped params"),
            size: (words * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&init));
        let mut builder = GpuEma::builder(Schedule::constant(0.5));
        for (name, n, off) in &layout {
            builder =
                builder.track_buffer_as(TensorSpec::new(name.as_str(), [*n]), &buf, *off, dtype);
        }
        let mut ema = builder.build(&ctx.device, &ctx.queue).unwrap();
        // The gaps now get the second sentinel; the halves past 16-bit tensors keep the first.
        let mut now = init.clone();
        for &w in &gaps {
            now[w] = SENTINEL;
        }
        ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&now));
        let check = |what: &str| {
            let got = crate::common::read_words(ctx, &buf);
            for &w in &gaps {
                assert_eq!(
                    got[w], SENTINEL,
                    "{dtype:?} {what}: gap word {w} overwritten"
                );
            }
            for &w in &half_words {
                assert_eq!(
                    got[w] >> 16,
                    SENTINEL_AT_BUILD >> 16,
                    "{dtype:?} {what}: the unused half of word {w} overwritten"
                );
            }
        };
        for _ in 0..3 {
            ema.update().unwrap();
        }
        check("update");
        if dtype == ParamDtype::F32 {
            ema.swap().unwrap();
            check("swap");
            ema.swap().unwrap();
            check("swap back");
        }
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_copy_to_params(&mut enc).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        check("copy to params");
    }
}
