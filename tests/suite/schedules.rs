//! Every schedule, with a delayed start and an update interval, on the GPU against the f64
//! reference fed the same alphas.

use crate::common::{assert_close, buffer_with, gpu, random, write};
use wgpu_ema::cpu::{CpuEma, ReferenceEma};
use wgpu_ema::schedule::Policy;
use wgpu_ema::{GpuEma, Numerics, Schedule, TensorSpec};

fn schedules() -> Vec<Schedule> {
    vec![
        Schedule::constant(0.9),
        Schedule::tf(0.999),
        Schedule::diffusers(0.9999, 0.2),
        Schedule::warmup(1.0, 2.0 / 3.0, 0.9999),
        Schedule::Warmup {
            inv_gamma: 3.0,
            power: 0.75,
            min_decay: 0.1,
            max_decay: 0.99,
        },
        Schedule::power(6.94),
        Schedule::power_sigma_rel(0.05).unwrap(),
        Schedule::half_life(20.0, 3.0),
    ]
}

#[test]
fn every_schedule_and_policy_matches_the_reference_on_the_gpu() {
    let Some(ctx) = gpu() else { return };
    let n = 1027;
    for schedule in schedules() {
        for policy in [
            Policy::default(),
            Policy {
                update_after_step: 5,
                update_every: 3,
            },
        ] {
            let p0 = random(1, n);
            let buf = buffer_with(ctx, &p0, 0);
            let mut ema = GpuEma::builder(schedule)
                .policy(policy)
                .track_buffer(TensorSpec::new("w", [n]), &buf, 0)
                .build(&ctx.device, &ctx.queue)
                .unwrap();
            let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
            reference.set_policy(policy).unwrap();
            let mut cpu = CpuEma::new(schedule, Numerics::Exact).unwrap();
            cpu.set_policy(policy).unwrap();
            cpu.track(TensorSpec::new("w", [n]), &p0).unwrap();
            let steps = 30u64;
            for step in 1..=steps {
                let p = random(100 + step, n);
                write(ctx, &buf, 0, &p);
                ema.update().unwrap();
                reference.update(&[&p]).unwrap();
                cpu.update(&[&p]).unwrap();
                if step <= policy.update_after_step {
                    assert_eq!(
                        ema.read_shadow_blocking("w").unwrap(),
                        p,
                        "{schedule:?}: copies are exact"
                    );
                }
            }
            let what = format!("{schedule:?} {policy:?}");
            // As in `update`: 16 epsilon, about 10 times the worst rounding measured.
            let tol = 16.0 * f32::EPSILON as f64;
            assert_close(
                &what,
                &ema.read_shadow_blocking("w").unwrap(),
                &reference.shadows()[0],
                tol,
            );
            assert_close(
                &what,
                cpu.shadow("w").unwrap(),
                &reference.shadows()[0],
                tol,
            );
        }
    }
}

#[test]
fn invalid_policies_and_schedules_are_refused() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 4), 0);
    let build = |s: Schedule, p: Policy| {
        GpuEma::builder(s)
            .policy(p)
            .track_buffer(TensorSpec::new("w", [4]), &buf, 0)
            .build(&ctx.device, &ctx.queue)
    };
    assert!(build(
        Schedule::constant(0.5),
        Policy {
            update_after_step: 0,
            update_every: 0
        }
    )
    .is_err());
    assert!(build(Schedule::power(-1.0), Policy::default()).is_err());
    assert!(build(Schedule::half_life(f64::NAN, 1.0), Policy::default()).is_err());
    assert!(build(
        Schedule::Warmup {
            inv_gamma: 1.0,
            power: 0.5,
            min_decay: 0.9,
            max_decay: 0.5
        },
        Policy::default()
    )
    .is_err());
    assert!(build(Schedule::diffusers(0.99, 1.5), Policy::default()).is_err());
}
