//! f16 and bf16 parameters with f32 shadows, on every adapter (no SHADER_F16 needed), against
//! the f64 reference fed the same decoded values.

use crate::common::{assert_close, gpu, half_buffer};
use half::{bf16, f16};
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{Error, GpuEma, Numerics, ParamDtype, Schedule, TensorSpec};

/// Seeded values as 16-bit bit patterns, and the f32 values they decode to.
fn halves(dtype: ParamDtype, seed: u64, n: usize) -> (Vec<u16>, Vec<f32>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let f: Vec<f32> = (0..n).map(|_| rng.f32() * 4.0 - 2.0).collect();
    match dtype {
        ParamDtype::F16 => f
            .iter()
            .map(|&x| (f16::from_f32(x).to_bits(), f16::from_f32(x).to_f32()))
            .unzip(),
        ParamDtype::BF16 => f
            .iter()
            .map(|&x| (bf16::from_f32(x).to_bits(), bf16::from_f32(x).to_f32()))
            .unzip(),
        ParamDtype::F32 => unreachable!("16-bit dtypes only"),
    }
}

#[test]
fn f16_and_bf16_params_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    let schedule = Schedule::tf(0.99);
    for dtype in [ParamDtype::F16, ParamDtype::BF16] {
        for n in [1usize, 2, 3, 4, 257, 1025] {
            for offset in [0u64, 4, 260] {
                let (bits0, p0) = halves(dtype, n as u64, n);
                let buf = half_buffer(ctx, &bits0, offset);
                let mut ema = GpuEma::builder(schedule)
                    .track_buffer_as(TensorSpec::new("h", [n]), &buf, offset, dtype)
                    .build(&ctx.device, &ctx.queue)
                    .unwrap();
                assert_eq!(
                    ema.read_shadow_blocking("h").unwrap(),
                    p0,
                    "{dtype:?} n={n}: shadows start at the decoded params"
                );
                let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
                for step in 1..=5u64 {
                    let (mut bits, p) = halves(dtype, 100 * step + n as u64, n);
                    if n % 2 == 1 {
                        bits.push(0xFFFF); // writes are whole words; keep the NaN neighbour
                    }
                    ctx.queue
                        .write_buffer(&buf, offset, bytemuck::cast_slice(&bits));
                    ema.update().unwrap();
                    reference.update(&[&p]).unwrap();
                }
                let what = format!("{dtype:?} n={n} offset={offset}");
                assert_close(
                    &what,
                    &ema.read_shadow_blocking("h").unwrap(),
                    &reference.shadows()[0],
                    20.0 * f32::EPSILON as f64,
                );
            }
        }
    }
}

#[test]
fn an_f32_shadow_of_bf16_params_moves_where_a_bf16_shadow_would_not() {
    let Some(ctx) = gpu() else { return };
    let one = bf16::from_f32(1.0).to_bits();
    let buf = half_buffer(ctx, &[one; 4], 0);
    let mut ema = GpuEma::builder(Schedule::constant(0.999))
        .track_buffer_as(TensorSpec::new("b", [4]), &buf, 0, ParamDtype::BF16)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let target = bf16::from_f32(1.5);
    ctx.queue
        .write_buffer(&buf, 0, bytemuck::cast_slice(&[target.to_bits(); 4]));
    ema.update().unwrap();
    let s = ema.read_shadow_blocking("b").unwrap()[0];
    // The f32 shadow moved by alpha * (p - s) = 5e-4, less than half of bf16's ulp at 1.0
    // (2^-8): a bf16 shadow would have rounded back to 1.0 and never moved.
    assert!((s - 1.0005).abs() < 1e-6, "f32 shadow {s}");
}

#[test]
fn half_tensors_refuse_what_they_do_not_support() {
    let Some(ctx) = gpu() else { return };
    let (bits, _) = halves(ParamDtype::F16, 1, 6);
    let buf = half_buffer(ctx, &bits, 0);
    let e = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer_as(TensorSpec::new("h", [6]), &buf, 2, ParamDtype::F16)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::Misaligned { .. }), "{e}");
    let e = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer_as(
            TensorSpec::new("h", [6]),
            &buf,
            buf.size() - 8,
            ParamDtype::F16,
        )
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e}");
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer_as(TensorSpec::new("h", [6]), &buf, 0, ParamDtype::F16)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(matches!(ema.swap(), Err(Error::HalfPrecision { .. })));
    assert!(matches!(
        ema.snapshot(true),
        Err(Error::HalfPrecision { .. })
    ));
    assert!(ema.snapshot(false).is_ok());
    // Rebinding keeps the dtype and its checks.
    assert!(matches!(
        ema.rebind("h", &buf, 6),
        Err(Error::Misaligned { .. })
    ));
    ema.rebind("h", &buf, 4).unwrap();
}

/// Values that exercise rounding: ties, subnormals, overflow, infinities, signed zero.
fn edge_values(dtype: ParamDtype) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-30,
        -3e38,
        0.1,
        1.0 / 3.0,
    ];
    match dtype {
        ParamDtype::F16 => v.extend([
            1.0 + 2f32.powi(-11),       // tie between 1 and the next f16: to even (1)
            1.0 + 3.0 * 2f32.powi(-11), // tie: to even (1 + 2^-9)
            65504.0,                    // the largest f16
            65519.0,                    // just below the overflow tie
            65520.0,                    // the tie: to infinity
            2f32.powi(-24),
            2f32.powi(-25),
            3.0 * 2f32.powi(-26),
            1.5 * 2f32.powi(-24),
            6.1e-5,
            5.9e-8,
        ]),
        _ => v.extend([
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            3.3895314e38,
            1e-39,
        ]),
    }
    let mut rng = fastrand::Rng::with_seed(9);
    v.extend((0..1000).map(|_| (rng.f32() - 0.5) * 2f32.powi(rng.i32(-30..20))));
    v
}

#[test]
fn copying_shadows_into_half_params_rounds_to_nearest_even() {
    let Some(ctx) = gpu() else { return };
    for dtype in [ParamDtype::F16, ParamDtype::BF16] {
        let values = edge_values(dtype);
        let n = values.len() + 1; // odd: the last word's high half belongs to someone else
        for offset in [0u64, 260] {
            // Poisoned, not zeroed: an element the copy skips keeps 0xA5A5, which no value
            // here rounds to (zeros would pass for the +0.0 among them).
            let buf = half_buffer(ctx, &vec![0xA5A5u16; n], offset);
            let mut ema = GpuEma::builder(Schedule::constant(0.5))
                .track_buffer_as(TensorSpec::new("h", [n]), &buf, offset, dtype)
                .build(&ctx.device, &ctx.queue)
                .unwrap();
            let mut shadow = values.clone();
            shadow.push(f32::NAN);
            ema.write_shadow("h", &shadow).unwrap();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            ema.record_copy_to_params(&mut enc).unwrap();
            ctx.queue.submit(Some(enc.finish()));
            let words = crate::common::read_words(ctx, &buf);
            let halves: Vec<u16> = words
                .iter()
                .flat_map(|w| [*w as u16, (*w >> 16) as u16])
                .collect();
            let start = (offset / 2) as usize;
            assert!(
                halves[..start].iter().all(|&h| h == 0xFFFF),
                "{dtype:?}: bytes before the tensor kept"
            );
            assert_eq!(
                halves[start + n],
                0xFFFF,
                "{dtype:?}: the neighbour in the last word is kept"
            );
            for (i, &x) in shadow.iter().enumerate() {
                let got = halves[start + i];
                if x.is_nan() {
                    let nan = match dtype {
                        ParamDtype::F16 => f16::from_bits(got).is_nan(),
                        _ => bf16::from_bits(got).is_nan(),
                    };
                    assert!(nan, "{dtype:?}: NaN stays NaN, got {got:#06x}");
                    continue;
                }
                let want = match dtype {
                    ParamDtype::F16 => f16::from_f32(x).to_bits(),
                    _ => bf16::from_f32(x).to_bits(),
                };
                assert_eq!(got, want, "{dtype:?} element {i}: {x:e} -> {got:#06x}, round-to-nearest-even gives {want:#06x}");
            }
        }
    }
}
