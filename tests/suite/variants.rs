//! The EMA variants beyond plain averaging: Switch EMA (the EMA written back into the
//! parameters every w updates), checked against an f64 EMA written in the test, on the GPU
//! and the CPU path.

use crate::common::{gpu, random};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::Policy;
use wgpu_ema::{Error, GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

/// The f64 EMA of a training run whose parameters take a step `delta(t)` from where they are.
/// A write-back sets the parameters to the EMA under test's own shadows (asserted equal to
/// them bit for bit), so that both runs go on from the same values; the shadows are compared
/// with the f64 EMA within a tolerance.
struct Switched {
    shadow: Vec<f64>,
    param: Vec<f32>,
}

impl Switched {
    fn step(&mut self, delta: &[f32], decay: f64) {
        for (p, d) in self.param.iter_mut().zip(delta) {
            *p += d;
        }
        for (s, p) in self.shadow.iter_mut().zip(&self.param) {
            *s += (1.0 - decay) * (f64::from(*p) - *s);
        }
    }
}

const DECAY: f64 = 0.75;

fn policy() -> Policy {
    Policy {
        update_after_step: 2,
        update_every: 2,
        write_back_every: 3,
    }
}

/// Steps 1..=16: copies at 1, 2; updates at 4, 6, 8, ...; write-backs at 8 and 14.
#[test]
fn switch_ema_writes_the_ema_back_every_w_updates_on_the_gpu() {
    let Some(ctx) = gpu() else { return };
    let specs = vec![TensorSpec::new("w", [37, 3]), TensorSpec::new("b", [5])];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let start: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| random(i as u64 + 1, s.numel() as usize))
        .collect();
    for (s, v) in specs.iter().zip(&start) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let mut ema = GpuEma::builder(Schedule::constant(DECAY))
        .policy(policy())
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut refs: Vec<Switched> = start
        .iter()
        .map(|v| Switched {
            shadow: v.iter().map(|&x| f64::from(x)).collect(),
            param: v.clone(),
        })
        .collect();
    let mut wrote_back = 0;
    for n in 1..=16u64 {
        // The optimizer's step from wherever the parameters are now (written back or not).
        let now = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
        for (i, (s, r)) in specs.iter().zip(&mut refs).enumerate() {
            let delta: Vec<f32> = random(100 * n + i as u64, s.numel() as usize)
                .iter()
                .map(|d| d * 0.1)
                .collect();
            assert_eq!(
                now.try_get(&s.name).unwrap(),
                r.param.as_slice(),
                "`{}` before step {n}",
                s.name
            );
            let stepped: Vec<f32> = r.param.iter().zip(&delta).map(|(p, d)| p + d).collect();
            arena.write(&ctx.queue, &s.name, &stepped).unwrap();
            match policy()
                .action(&Schedule::constant(DECAY), n, Numerics::Exact)
                .unwrap()
            {
                wgpu_ema::schedule::Action::Update(_) => r.step(&delta, DECAY),
                wgpu_ema::schedule::Action::Copy => {
                    r.param = stepped.clone();
                    r.shadow = stepped.iter().map(|&x| f64::from(x)).collect();
                }
                wgpu_ema::schedule::Action::Skip => r.param = stepped.clone(),
            }
        }
        ema.update().unwrap();
        if policy().writes_back(n) {
            wrote_back += 1;
            // The parameters are the EMA now, bit for bit.
            let params = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
            let shadows = ema.read_shadows_blocking().unwrap();
            for (s, r) in specs.iter().zip(&mut refs) {
                let p = params.try_get(&s.name).unwrap();
                assert_eq!(p, shadows.try_get(&s.name).unwrap(), "step {n}");
                crate::common::assert_close(&s.name, p, &r.shadow, 1e-6);
                r.param = p.to_vec();
            }
        }
    }
    assert_eq!(wrote_back, 2);
    let shadows = ema.read_shadows_blocking().unwrap();
    for (s, r) in specs.iter().zip(&refs) {
        crate::common::assert_close(&s.name, shadows.try_get(&s.name).unwrap(), &r.shadow, 1e-6);
    }
}

#[test]
fn switch_ema_on_the_cpu_path_and_its_refusal_without_mutable_parameters() {
    let mut ema = CpuEma::new(Schedule::constant(DECAY), Numerics::Exact).unwrap();
    let start = random(3, 11);
    ema.track(TensorSpec::new("w", [11]), &start).unwrap();
    ema.set_policy(policy()).unwrap();
    let mut r = Switched {
        shadow: start.iter().map(|&x| f64::from(x)).collect(),
        param: start.clone(),
    };
    let mut param = start.clone();
    for n in 1..=16u64 {
        let delta: Vec<f32> = random(200 + n, 11).iter().map(|d| d * 0.1).collect();
        for (p, d) in param.iter_mut().zip(&delta) {
            *p += d;
        }
        if policy().writes_back(n) {
            // Not without a way to write the parameters: refused, and nothing changed.
            let before = ema.shadow("w").unwrap().to_vec();
            let e = ema.update(&[&param]).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
            assert_eq!(ema.shadow("w").unwrap(), before.as_slice());
            assert_eq!(ema.num_updates(), n - 1);
        }
        ema.update_mut(&mut [&mut param]).unwrap();
        match policy()
            .action(&Schedule::constant(DECAY), n, Numerics::Exact)
            .unwrap()
        {
            wgpu_ema::schedule::Action::Update(_) => r.step(&delta, DECAY),
            wgpu_ema::schedule::Action::Copy => {
                r.param = param.clone();
                r.shadow = param.iter().map(|&x| f64::from(x)).collect();
            }
            wgpu_ema::schedule::Action::Skip => r.param = param.clone(),
        }
        if policy().writes_back(n) {
            assert_eq!(param.as_slice(), ema.shadow("w").unwrap(), "step {n}");
            crate::common::assert_close("w", &param, &r.shadow, 1e-6);
            r.param = param.clone();
        }
        assert_eq!(param, r.param, "step {n}");
    }
    crate::common::assert_close("w", ema.shadow("w").unwrap(), &r.shadow, 1e-6);
}
