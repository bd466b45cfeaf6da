//! Several EMAs of the same parameters in one pass: each equals its own single-EMA pass bit
//! for bit, on arenas and on user buffers at odd offsets, with a delayed start.

use crate::common::{buffer_with, gpu, random, write};
use wgpu_ema::schedule::Policy;
use wgpu_ema::{Error, GpuEma, ParamArena, Schedule, TensorSpec};

fn schedules() -> Vec<Schedule> {
    vec![
        Schedule::tf(0.999),
        Schedule::constant(0.9999),
        Schedule::power_sigma_rel(0.10).unwrap(),
        Schedule::warmup(1.0, 0.75, 0.99),
    ]
}

#[test]
fn k_emas_in_one_pass_equal_k_separate_passes() {
    let Some(ctx) = gpu() else { return };
    for k in [2, 3, 4] {
        for policy in [
            Policy::default(),
            Policy {
                update_after_step: 3,
                update_every: 2,
                write_back_every: 0,
            },
        ] {
            let n_user = 1029;
            let specs = vec![TensorSpec::new("a", [17, 3]), TensorSpec::new("b", [4])];
            let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
            let user = buffer_with(ctx, &random(5, n_user), 12);
            let write_all = |seed: u64| {
                for (i, s) in specs.iter().enumerate() {
                    arena
                        .write(
                            &ctx.queue,
                            &s.name,
                            &random(seed * 7 + i as u64, s.numel() as usize),
                        )
                        .unwrap();
                }
                write(ctx, &user, 12, &random(seed * 7 + 5, n_user));
            };
            write_all(0);
            let sched = schedules();
            let mut multi = sched[1..k]
                .iter()
                .fold(GpuEma::builder(sched[0]).policy(policy), |b, s| {
                    b.extra_ema(*s)
                })
                .track_arena(&arena)
                .track_buffer(TensorSpec::new("u", [n_user]), &user, 12)
                .build(&ctx.device, &ctx.queue)
                .unwrap();
            assert_eq!(multi.ema_count(), k);
            let mut singles: Vec<GpuEma> = sched[..k]
                .iter()
                .map(|s| {
                    GpuEma::builder(*s)
                        .policy(policy)
                        .track_arena(&arena)
                        .track_buffer(TensorSpec::new("u", [n_user]), &user, 12)
                        .build(&ctx.device, &ctx.queue)
                        .unwrap()
                })
                .collect();
            for step in 1..=12 {
                write_all(step);
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                multi.record_update(&mut enc).unwrap();
                for s in &mut singles {
                    s.record_update(&mut enc).unwrap();
                }
                ctx.queue.submit(Some(enc.finish()));
            }
            for (j, single) in singles.iter().enumerate() {
                let want = single.read_shadows_blocking().unwrap();
                let got = multi.read_ema_blocking(j).unwrap();
                assert_eq!(got.len(), want.len(), "K={k} EMA {j}: tensors read back");
                for ((spec, a), (_, b)) in got.iter().zip(want.iter()) {
                    assert_eq!(a.len(), b.len(), "K={k} EMA {j} `{}`: length", spec.name);
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| crate::common::ulps(*x, *y))
                        .max()
                        .unwrap_or(0);
                    assert_eq!(
                        worst, 0,
                        "K={k} EMA {j} {policy:?} tensor {}: {worst} ulps",
                        spec.name
                    );
                }
            }
            assert_eq!(
                multi.read_ema_blocking(0).unwrap(),
                multi.read_shadows_blocking().unwrap()
            );
            assert!(multi.read_ema_blocking(k).is_err());
        }
    }
}

#[test]
fn too_many_or_compensated_multi_emas_are_refused() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 8), 0);
    let five = schedules()
        .into_iter()
        .chain([Schedule::constant(0.5)])
        .skip(1)
        .fold(GpuEma::builder(Schedule::constant(0.9)), |b, s| {
            b.extra_ema(s)
        });
    let e = five
        .track_buffer(TensorSpec::new("w", [8]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    let e = GpuEma::builder(Schedule::constant(0.9))
        .extra_ema(Schedule::constant(0.99))
        .compensated(true)
        .track_buffer(TensorSpec::new("w", [8]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    let e = GpuEma::builder(Schedule::constant(0.9))
        .extra_ema(Schedule::constant(f64::NAN))
        .track_buffer(TensorSpec::new("w", [8]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidDecay { .. }), "{e}");
}

#[test]
fn every_ema_is_checkpointed_and_resumed() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let n = 301;
    let build = |buf: &wgpu_ema::wgpu::Buffer| {
        GpuEma::builder(Schedule::tf(0.999))
            .extra_ema(Schedule::constant(0.99))
            .extra_ema(Schedule::power(6.94))
            .track_buffer(TensorSpec::new("w", [n]), buf, 0)
            .build(&ctx.device, &ctx.queue)
            .unwrap()
    };
    let (b1, b2) = (
        buffer_with(ctx, &random(0, n), 0),
        buffer_with(ctx, &random(0, n), 0),
    );
    let (mut straight, mut first) = (build(&b1), build(&b2));
    for step in 1..=10 {
        for (ema, b) in [(&mut straight, &b1), (&mut first, &b2)] {
            write(ctx, b, 0, &random(step, n));
            ema.update().unwrap();
        }
    }
    let path = dir.path().join("multi.safetensors");
    let mut params = wgpu_ema::HostTensors::new();
    params
        .insert(TensorSpec::new("w", [n]), random(10, n))
        .unwrap();
    wgpu_ema::checkpoint::save_training(
        &path,
        &first.snapshot(false).unwrap(),
        Some(&params),
        &Default::default(),
    )
    .unwrap();
    let ck = wgpu_ema::checkpoint::Checkpoint::load(&path).unwrap();
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(
        names,
        [
            "w",
            "w/ExponentialMovingAverage",
            "w/ExponentialMovingAverage_1",
            "w/ExponentialMovingAverage_2"
        ]
    );
    assert_eq!(
        ck.metadata()["extra_schedules"],
        "constant(decay=0.99); power(gamma=6.94)"
    );
    let b3 = buffer_with(ctx, &random(10, n), 0);
    let mut resumed = build(&b3);
    resumed.restore(&ck).unwrap();
    for step in 11..=20 {
        for (ema, b) in [(&mut straight, &b1), (&mut resumed, &b3)] {
            write(ctx, b, 0, &random(step, n));
            ema.update().unwrap();
        }
    }
    for k in 0..3 {
        assert_eq!(
            resumed.read_ema_blocking(k).unwrap(),
            straight.read_ema_blocking(k).unwrap(),
            "EMA {k}"
        );
    }
    // A checkpoint without the further EMAs cannot resume this EMA.
    let single = dir.path().join("single.safetensors");
    let one = GpuEma::builder(Schedule::tf(0.999))
        .track_buffer(TensorSpec::new("w", [n]), &b3, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    wgpu_ema::checkpoint::save_training(
        &single,
        &one.snapshot(false).unwrap(),
        Some(&params),
        &Default::default(),
    )
    .unwrap();
    let e = resumed
        .restore(&wgpu_ema::checkpoint::Checkpoint::load(&single).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w/ExponentialMovingAverage_1") && e.contains("missing"),
        "{e}"
    );
}
