//! The EMA variants beyond plain averaging: Switch EMA (the EMA written back into the
//! parameters every w updates), checked against an f64 EMA written in the test, on the GPU
//! and the CPU path.

use crate::common::{gpu, random};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::Policy;
use wgpu_ema::{wgpu, Error, GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

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

/// The model of the selection tests: averaged weights, running statistics (one of them bf16,
/// in a user buffer at an odd offset), and a counter that is left out.
fn selection() -> wgpu_ema::select::Selection {
    wgpu_ema::select::Selection::new()
        .copy("*.running_*")
        .exclude("*.num_batches")
}

const SELECTED: &str = "copy=bn.running_mean,bn.running_var;exclude=bn.num_batches";

/// Copied tensors take their parameters exactly on every update (in every EMA), averaged ones
/// follow the f64 EMA, excluded ones are not tracked; checkpoints record the selection and a
/// restore into another one is refused.
#[test]
fn selected_tensors_are_copied_or_left_out_on_the_gpu() {
    use half::bf16;
    use wgpu_ema::checkpoint::{self, Checkpoint};
    use wgpu_ema::{HostTensors, ParamDtype};
    let Some(ctx) = gpu() else { return };
    let arena_specs = vec![
        TensorSpec::new("conv.w", [37, 3]),
        TensorSpec::new("bn.running_mean", [5]),
        TensorSpec::new("bn.num_batches", [1]),
    ];
    let arena = ParamArena::new(&ctx.device, arena_specs.clone()).unwrap();
    // bf16 running variance, 13 elements at byte 4 of its own buffer, NaN around it.
    let var_n = 13usize;
    let var_bits = |seed: u64| -> (Vec<u16>, Vec<f32>) {
        random(seed, var_n)
            .iter()
            .map(|&x| (bf16::from_f32(x).to_bits(), bf16::from_f32(x).to_f32()))
            .unzip()
    };
    let var_buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let write_var = |bits: &[u16]| {
        let mut all = vec![0xFFFFu16; 2];
        all.extend_from_slice(bits);
        all.resize(32, 0xFFFF);
        ctx.queue
            .write_buffer(&var_buf, 0, bytemuck::cast_slice(&all));
    };
    let write_all = |seed: u64| -> Vec<Vec<f32>> {
        let mut values = Vec::new();
        for (i, s) in arena_specs.iter().enumerate() {
            let v = random(seed * 10 + i as u64, s.numel() as usize);
            arena.write(&ctx.queue, &s.name, &v).unwrap();
            values.push(v);
        }
        let (bits, decoded) = var_bits(seed * 10 + 7);
        write_var(&bits);
        values.push(decoded);
        values
    };
    let build = |sel: wgpu_ema::select::Selection| {
        GpuEma::builder(Schedule::constant(DECAY))
            .extra_ema(Schedule::constant(0.5))
            .select(sel)
            .track_arena(&arena)
            .track_buffer_as(
                TensorSpec::new("bn.running_var", [var_n]),
                &var_buf,
                4,
                ParamDtype::BF16,
            )
            .build(&ctx.device, &ctx.queue)
    };
    let mut values = write_all(1);
    let mut ema = build(selection()).unwrap();
    let names: Vec<String> = ema.specs().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["conv.w", "bn.running_mean", "bn.running_var"]);
    assert_eq!(ema.selection(), SELECTED);
    // f64 EMAs of the averaged tensor, for both schedules.
    let mut refs: Vec<Vec<f64>> = vec![values[0].iter().map(|&x| f64::from(x)).collect(); 2];
    for step in 2..=6u64 {
        values = write_all(step);
        ema.update().unwrap();
        for (r, decay) in refs.iter_mut().zip([DECAY, 0.5]) {
            for (s, &p) in r.iter_mut().zip(&values[0]) {
                *s += (1.0 - decay) * (f64::from(p) - *s);
            }
        }
        for (k, r) in refs.iter().enumerate() {
            let got = ema.read_ema_blocking(k).unwrap();
            assert_eq!(
                got.try_get("bn.running_mean").unwrap(),
                values[1].as_slice(),
                "EMA {k} step {step}"
            );
            assert_eq!(
                got.try_get("bn.running_var").unwrap(),
                values[3].as_slice(),
                "EMA {k} step {step}"
            );
            crate::common::assert_close("conv.w", got.try_get("conv.w").unwrap(), r, 1e-6);
            assert!(got.try_get("bn.num_batches").is_err());
        }
    }
    // The checkpoint records the selection; the same selection restores, another is refused.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sel.safetensors");
    let mut params = HostTensors::new();
    for (name, v) in [
        ("conv.w", &values[0]),
        ("bn.running_mean", &values[1]),
        ("bn.running_var", &values[3]),
    ] {
        let spec = ema.specs().into_iter().find(|s| s.name == name).unwrap();
        params.insert(spec, v.clone()).unwrap();
    }
    checkpoint::save_training(
        &path,
        &ema.snapshot(false).unwrap(),
        Some(&params),
        &HostTensors::new(),
    )
    .unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.metadata()[checkpoint::META_SELECTION], SELECTED);
    assert!(ck.get("bn.num_batches/ExponentialMovingAverage").is_none());
    let mut same = build(selection()).unwrap();
    same.restore(&ck).unwrap();
    assert_eq!(
        same.read_shadows_blocking()
            .unwrap()
            .try_get("conv.w")
            .unwrap(),
        ema.read_shadows_blocking()
            .unwrap()
            .try_get("conv.w")
            .unwrap()
    );
    let mut other = build(wgpu_ema::select::Selection::new().exclude("*.num_batches")).unwrap();
    let e = other.restore(&ck).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Config, None);
    assert!(e.to_string().contains("selection"), "{e}");
    // Bad selections are errors at build.
    for (sel, needle) in [
        (
            wgpu_ema::select::Selection::new().copy("*.runing_*"),
            "matches none",
        ),
        (
            wgpu_ema::select::Selection::new()
                .copy("bn.*")
                .exclude("*.num_batches"),
            "both copied",
        ),
        (
            wgpu_ema::select::Selection::new().exclude("[bad"),
            "pattern",
        ),
    ] {
        let e = build(sel).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig(m) if m.contains(needle)),
            "{e}"
        );
    }
}

/// The same selection on the CPU path, compensated: copied tensors exact, averaged ones the
/// f64 EMA, the metadata as the GPU's.
#[test]
fn selected_tensors_on_the_cpu_path() {
    let mut ema = CpuEma::new(Schedule::constant(DECAY), Numerics::Exact).unwrap();
    ema.set_compensated(true).unwrap();
    let specs = [
        TensorSpec::new("conv.w", [7]),
        TensorSpec::new("bn.running_mean", [3]),
        TensorSpec::new("bn.num_batches", [1]),
        TensorSpec::new("bn.running_var", [3]),
    ];
    for (i, s) in specs.iter().enumerate() {
        ema.track(s.clone(), &random(i as u64, s.numel() as usize))
            .unwrap();
    }
    assert!(ema
        .select(&wgpu_ema::select::Selection::new().copy("*.runnin_*"))
        .is_err());
    assert_eq!(ema.specs().len(), 4, "a refused selection changes nothing");
    ema.select(&selection()).unwrap();
    let names: Vec<&str> = ema.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["conv.w", "bn.running_mean", "bn.running_var"]);
    let mut r: Vec<f64> = random(0, 7).iter().map(|&x| f64::from(x)).collect();
    for step in 1..=5u64 {
        let p: Vec<Vec<f32>> = [7usize, 3, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| random(100 * step + i as u64, n))
            .collect();
        ema.update(&[&p[0], &p[1], &p[2]]).unwrap();
        for (s, &x) in r.iter_mut().zip(&p[0]) {
            *s += (1.0 - DECAY) * (f64::from(x) - *s);
        }
        assert_eq!(ema.shadow("bn.running_mean").unwrap(), p[1].as_slice());
        assert_eq!(ema.shadow("bn.running_var").unwrap(), p[2].as_slice());
        assert_eq!(
            ema.compensation("bn.running_var").unwrap().unwrap(),
            [0.0; 3]
        );
    }
    crate::common::assert_close("conv.w", ema.shadow("conv.w").unwrap(), &r, 1e-6);
    use wgpu_ema::checkpoint::EmaState;
    assert_eq!(ema.selection(), SELECTED);
}

/// A target network: soft updates `target = (1 - tau) target + tau online` every step
/// (Stable-Baselines3's polyak_update, written out in f64 here) and a hard update (an exact
/// copy) every 4th step; the target's shadow binding never moves.
#[test]
fn target_networks_soft_and_hard_updates() {
    let Some(ctx) = gpu() else { return };
    let tau = 0.05;
    let specs = vec![TensorSpec::new("q.w", [17, 5]), TensorSpec::new("q.b", [5])];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let online = |step: u64| -> Vec<Vec<f32>> {
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| random(1000 * step + i as u64, s.numel() as usize))
            .collect()
    };
    let start = online(0);
    for (s, v) in specs.iter().zip(&start) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let mut ema = GpuEma::builder(Schedule::polyak(tau).unwrap())
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let binding = |ema: &GpuEma| {
        let b = ema.shadow_binding("q.w").unwrap();
        (b.buffer.clone(), b.offset, b.size)
    };
    let bound = binding(&ema);
    let mut target: Vec<Vec<f64>> = start
        .iter()
        .map(|v| v.iter().map(|&x| f64::from(x)).collect())
        .collect();
    for step in 1..=9u64 {
        let now = online(step);
        for (s, v) in specs.iter().zip(&now) {
            arena.write(&ctx.queue, &s.name, v).unwrap();
        }
        if step % 4 == 0 {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            ema.record_reset(&mut enc).unwrap();
            ctx.queue.submit(Some(enc.finish()));
            for (t, v) in target.iter_mut().zip(&now) {
                *t = v.iter().map(|&x| f64::from(x)).collect();
            }
            let got = ema.read_shadows_blocking().unwrap();
            for (s, v) in specs.iter().zip(&now) {
                assert_eq!(
                    got.try_get(&s.name).unwrap(),
                    v.as_slice(),
                    "hard update {step}"
                );
            }
        } else {
            ema.update().unwrap();
            for (t, v) in target.iter_mut().zip(&now) {
                for (t, &x) in t.iter_mut().zip(v) {
                    *t = (1.0 - tau) * *t + tau * f64::from(x);
                }
            }
        }
    }
    let got = ema.read_shadows_blocking().unwrap();
    for (s, t) in specs.iter().zip(&target) {
        crate::common::assert_close(&s.name, got.try_get(&s.name).unwrap(), t, 1e-6);
    }
    assert!(binding(&ema) == bound, "the target's binding moved");
}
