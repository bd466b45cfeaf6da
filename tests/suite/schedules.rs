//! Every schedule, with a delayed start and an update interval, on the GPU and the CPU path
//! against an f64 EMA whose decays and policy are written out here from the formulas, not
//! taken from `wgpu_ema::schedule` (which the crate's own f64 reference shares).

use crate::common::{assert_close, buffer_with, gpu, random, write};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::Policy;
use wgpu_ema::{GpuEma, Numerics, Schedule, TensorSpec};

/// The decay of update `k` (counted from the policy's start, 1-based), from each schedule's
/// formula as the guide states it.
fn closed_form_decay(s: &Schedule, k: u64) -> f64 {
    let k = k as f64;
    match *s {
        Schedule::Constant { decay } => decay,
        Schedule::NumUpdates { decay } => decay.min((1.0 + k) / (10.0 + k)),
        Schedule::Diffusers { decay, min_decay } => {
            // diffusers' step = k - 1; decay 0 while it is <= 0.
            let j = k - 1.0;
            if j <= 0.0 {
                0.0
            } else {
                decay.min((1.0 + j) / (10.0 + j)).max(min_decay)
            }
        }
        Schedule::Warmup {
            inv_gamma,
            power,
            min_decay,
            max_decay,
        } => (1.0 - (1.0 + k / inv_gamma).powf(-power)).clamp(min_decay, max_decay),
        Schedule::Power { gamma } => (1.0 - 1.0 / k).powf(1.0 + gamma),
        Schedule::HalfLife {
            half_life,
            update_interval,
        } => 0.5f64.powf(update_interval / half_life),
        ref other => panic!("no closed form for {other:?}"),
    }
}

/// An f64 EMA driven by the policy as the guide states it: call `n` copies while
/// `n <= update_after_step`; after that, with `k = n - update_after_step`, it updates when
/// `k` is a multiple of `update_every`, with `alpha = 1 - decay(k)` rounded once to f32 (as
/// `Numerics::Exact` hands it to the update), and otherwise does nothing.
struct ClosedFormEma {
    schedule: Schedule,
    policy: Policy,
    n: u64,
    shadow: Vec<f64>,
}

impl ClosedFormEma {
    fn new(schedule: Schedule, policy: Policy, init: &[f32]) -> Self {
        Self {
            schedule,
            policy,
            n: 0,
            shadow: init.iter().map(|&x| x as f64).collect(),
        }
    }

    fn update(&mut self, p: &[f32]) {
        self.n += 1;
        if self.n <= self.policy.update_after_step {
            self.shadow = p.iter().map(|&x| x as f64).collect();
            return;
        }
        let k = self.n - self.policy.update_after_step;
        if !k.is_multiple_of(self.policy.update_every) {
            return;
        }
        let alpha = (1.0 - closed_form_decay(&self.schedule, k)) as f32 as f64;
        for (s, &x) in self.shadow.iter_mut().zip(p) {
            *s += alpha * (x as f64 - *s);
        }
    }
}

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
                write_back_every: 0,
            },
        ] {
            let p0 = random(1, n);
            let buf = buffer_with(ctx, &p0, 0);
            let mut ema = GpuEma::builder(schedule)
                .policy(policy)
                .track_buffer(TensorSpec::new("w", [n]), &buf, 0)
                .build(&ctx.device, &ctx.queue)
                .unwrap();
            let mut reference = ClosedFormEma::new(schedule, policy, &p0);
            let mut cpu = CpuEma::new(schedule, Numerics::Exact).unwrap();
            cpu.set_policy(policy).unwrap();
            cpu.track(TensorSpec::new("w", [n]), &p0).unwrap();
            let steps = 30u64;
            for step in 1..=steps {
                let p = random(100 + step, n);
                write(ctx, &buf, 0, &p);
                ema.update().unwrap();
                reference.update(&p);
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
                &reference.shadow,
                tol,
            );
            assert_close(&what, cpu.shadow("w").unwrap(), &reference.shadow, tol);
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
            update_every: 0,
            write_back_every: 0,
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
