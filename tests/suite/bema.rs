//! BEMA (Block & Zhang 2025, arXiv 2508.00180): the EMA with its anchor `theta_0` and the
//! bias-corrected weights, checked against an f64 BEMA written here from the paper's
//! equations, on the GPU (both backends in CI) and the CPU path; swaps and copies exact;
//! checkpoints resume bit for bit; bad input refused.

use crate::common::{
    assert_checkpoint_kind, assert_close, buffer_with, gpu, half_buffer, random, read_words,
    PaperBema,
};
use wgpu_ema::checkpoint::{self, Checkpoint, RestoreOptions};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::{Bema, Policy};
use wgpu_ema::select::Selection;
use wgpu_ema::{
    wgpu, CheckpointErrorKind, Error, GpuContext, GpuEma, HostTensors, Numerics, ParamDtype,
    Schedule, TensorSpec,
};

/// TRL's defaults, a burn-in of 3 and updates every 2nd call.
fn trl_like() -> (Bema, Policy) {
    (
        Bema::default(),
        Policy {
            update_after_step: 3,
            update_every: 2,
            write_back_every: 0,
        },
    )
}

/// Other powers, a lag below 1, restarts every 5 calls, updates on every call.
fn restarting() -> (Bema, Policy) {
    (
        Bema {
            ema_power: 0.7,
            bias_power: 0.4,
            lag: 0.5,
            multiplier: 0.5,
            min_ema_multiplier: 0.0,
            restart_every: 5,
        },
        Policy::default(),
    )
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w", [37, 3]),
        TensorSpec::new("b", [5]),
        TensorSpec::new("s", [1]),
        TensorSpec::new("big", [1029]),
    ]
}

/// Byte offsets of each tensor in its own buffer (odd element offsets).
const OFFSETS: [u64; 4] = [12, 0, 260, 4];

/// The parameters after call `n`: a seeded random walk from a seeded start.
fn walk(specs: &[TensorSpec], n: u64) -> Vec<Vec<f32>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let len = s.numel() as usize;
            let mut v = random(1000 + i as u64, len);
            for step in 1..=n {
                for (x, d) in v.iter_mut().zip(random(step * 31 + i as u64, len)) {
                    *x += 0.1 * d;
                }
            }
            v
        })
        .collect()
}

struct Run {
    bufs: Vec<wgpu::Buffer>,
    ema: GpuEma,
}

fn build(ctx: &GpuContext, b: Bema, policy: Policy, at: u64) -> Run {
    let specs = specs();
    let start = walk(&specs, at);
    let bufs: Vec<wgpu::Buffer> = start
        .iter()
        .zip(OFFSETS)
        .map(|(v, off)| buffer_with(ctx, v, off))
        .collect();
    let mut builder = GpuEma::builder(Schedule::bema(b)).policy(policy);
    for ((s, buf), off) in specs.iter().zip(&bufs).zip(OFFSETS) {
        builder = builder.track_buffer(s.clone(), buf, off);
    }
    let ema = builder.build(&ctx.device, &ctx.queue).unwrap();
    Run { bufs, ema }
}

impl Run {
    fn step(&mut self, ctx: &GpuContext, n: u64) -> Vec<Vec<f32>> {
        let theta = walk(&specs(), n);
        for ((buf, v), off) in self.bufs.iter().zip(&theta).zip(OFFSETS) {
            crate::common::write(ctx, buf, off, v);
        }
        self.ema.update().unwrap();
        theta
    }

    /// Each tensor's parameters as the buffers hold them, and the NaN words around them.
    fn params(&self, ctx: &GpuContext) -> Vec<Vec<u32>> {
        self.bufs.iter().map(|b| read_words(ctx, b)).collect()
    }
}

/// Each tensor of `got`, in tracking order, against the f64 values `want` (same order).
fn check(what: &str, got: &HostTensors, want: &[Vec<f64>], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: tensors");
    for ((s, values), w) in got.iter().zip(want) {
        assert_close(&format!("{what} `{}`", s.name), values, w, rel);
    }
}

#[test]
fn bema_matches_the_papers_equations_on_the_gpu() {
    let Some(ctx) = gpu() else { return };
    for (b, policy) in [trl_like(), restarting()] {
        let mut run = build(ctx, b, policy, 0);
        let mut paper = PaperBema::new(&b, &policy, &walk(&specs(), 0));
        let mut checked = 0;
        for n in 1..=21u64 {
            let theta = run.step(ctx, n);
            paper.call(n, &theta);
            if n % 3 != 0 && n != 4 {
                continue;
            }
            let before = run.params(ctx);
            let weights = run.ema.read_bema_blocking().unwrap();
            check(
                &format!("{b:?} call {n}: weights"),
                &weights,
                &paper.weights(&theta),
                2e-5,
            );
            let shadows = run.ema.read_shadows_blocking().unwrap();
            check(&format!("{b:?} call {n}: EMA"), &shadows, &paper.ema, 2e-5);
            assert_eq!(
                run.params(ctx),
                before,
                "reading the weights left the parameters"
            );
            checked += 1;
        }
        assert_eq!(checked, 8);
        // The weights differ from the EMA (the correction is there), past the burn-in.
        let w = run.ema.read_bema_blocking().unwrap();
        let s = run.ema.read_shadows_blocking().unwrap();
        assert_ne!(w.try_get("w").unwrap(), s.try_get("w").unwrap());
    }
}

#[test]
fn the_cpu_path_matches_the_paper_and_the_gpu() {
    for (b, policy) in [trl_like(), restarting()] {
        let specs = specs();
        let mut ema = CpuEma::new(Schedule::bema(b), Numerics::Exact).unwrap();
        ema.set_policy(policy).unwrap();
        let start = walk(&specs, 0);
        for (s, v) in specs.iter().zip(&start) {
            ema.track(s.clone(), v).unwrap();
        }
        let mut paper = PaperBema::new(&b, &policy, &start);
        for n in 1..=21u64 {
            let theta = walk(&specs, n);
            let views: Vec<&[f32]> = theta.iter().map(Vec::as_slice).collect();
            ema.update(&views).unwrap();
            paper.call(n, &theta);
            let w = ema.bema_weights(&views).unwrap();
            check(
                &format!("CPU call {n}: weights"),
                &w,
                &paper.weights(&theta),
                2e-5,
            );
            if paper.copied {
                // Right after a copy the anchor is the parameters, bit for bit.
                for (s, p) in specs.iter().zip(&theta) {
                    assert_eq!(ema.anchor(&s.name).unwrap().unwrap(), p.as_slice());
                }
            }
        }
        let Some(ctx) = gpu() else { continue };
        let mut run = build(ctx, b, policy, 0);
        for n in 1..=21u64 {
            run.step(ctx, n);
        }
        let theta = walk(&specs, 21);
        let views: Vec<&[f32]> = theta.iter().map(Vec::as_slice).collect();
        let cpu = ema.bema_weights(&views).unwrap();
        let gpu_w = run.ema.read_bema_blocking().unwrap();
        for s in &specs {
            let want: Vec<f64> = cpu
                .try_get(&s.name)
                .unwrap()
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            assert_close(&s.name, gpu_w.try_get(&s.name).unwrap(), &want, 1e-6);
        }
    }
}

#[test]
fn swapping_bema_weights_in_and_out_is_exact() {
    let Some(ctx) = gpu() else { return };
    let (b, policy) = trl_like();
    let mut run = build(ctx, b, policy, 0);
    for n in 1..=9 {
        run.step(ctx, n);
    }
    let raw = run.params(ctx);
    let weights = run.ema.read_bema_blocking().unwrap();
    let shadows = run.ema.read_shadows_blocking().unwrap();
    run.ema.swap_bema().unwrap();
    assert!(run.ema.is_swapped());
    for (((s, words), off), raw) in specs().iter().zip(run.params(ctx)).zip(OFFSETS).zip(&raw) {
        let at = (off / 4) as usize;
        let n = s.numel() as usize;
        let want: Vec<u32> = weights
            .try_get(&s.name)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            &words[at..at + n],
            want.as_slice(),
            "`{}` swapped in",
            s.name
        );
        assert_eq!(words[..at], raw[..at], "before `{}`", s.name);
        assert_eq!(words[at + n..], raw[at + n..], "after `{}`", s.name);
    }
    assert!(matches!(run.ema.update(), Err(Error::Swapped)));
    assert!(matches!(run.ema.read_bema_blocking(), Err(Error::Swapped)));
    run.ema.swap().unwrap();
    assert!(!run.ema.is_swapped());
    assert_eq!(
        run.params(ctx),
        raw,
        "the raw parameters are back, bit for bit"
    );
    assert_eq!(run.ema.read_shadows_blocking().unwrap(), shadows);
    // A second round gives the same weights: the EMA and the anchor were not touched.
    run.ema.swap_bema().unwrap();
    run.ema.swap_bema().unwrap();
    assert_eq!(run.params(ctx), raw);
    assert_eq!(run.ema.read_bema_blocking().unwrap(), weights);
}

#[test]
fn bema_of_16_bit_parameters_and_its_copy_into_them() {
    use half::{bf16, f16};
    let Some(ctx) = gpu() else { return };
    let (b, policy) = trl_like();
    for dtype in [ParamDtype::F16, ParamDtype::BF16] {
        let encode = |v: &[f32]| -> (Vec<u16>, Vec<f32>) {
            v.iter()
                .map(|&x| match dtype {
                    ParamDtype::F16 => (f16::from_f32(x).to_bits(), f16::from_f32(x).to_f32()),
                    _ => (bf16::from_f32(x).to_bits(), bf16::from_f32(x).to_f32()),
                })
                .unzip()
        };
        let n = 301usize; // odd: the last word's high half is a neighbour's
        let (bits, start) = encode(&random(7, n));
        let buf = half_buffer(ctx, &bits, 4);
        let spec = TensorSpec::new("h", [n]);
        let mut ema = GpuEma::builder(Schedule::bema(b))
            .policy(policy)
            .track_buffer_as(spec.clone(), &buf, 4, dtype)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        let mut paper = PaperBema::new(&b, &policy, &[start]);
        let mut theta = Vec::new();
        for step in 1..=9u64 {
            let (bits, decoded) = encode(&walk(std::slice::from_ref(&spec), step)[0]);
            ctx.queue
                .write_buffer(&buf, 4, bytemuck::cast_slice(&bits[..n - 1]));
            // The odd last element shares its word with a 0xFFFF neighbour.
            let last = u32::from(bits[n - 1]) | 0xFFFF_0000;
            ctx.queue
                .write_buffer(&buf, 4 + (n as u64 - 1) * 2, &last.to_le_bytes());
            ema.update().unwrap();
            paper.call(step, std::slice::from_ref(&decoded));
            theta = vec![decoded];
        }
        let weights = ema.read_bema_blocking().unwrap();
        let w = weights.try_get("h").unwrap().to_vec();
        assert_close("16-bit BEMA", &w, &paper.weights(&theta)[0], 2e-5);
        assert!(matches!(ema.swap_bema(), Err(Error::HalfPrecision { .. })));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_copy_bema_to_params(&mut enc).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        let words = read_words(ctx, &buf);
        let halves: Vec<u16> = bytemuck::cast_slice(&words).to_vec();
        let (want, _) = encode(&w);
        assert_eq!(
            &halves[2..2 + n],
            want.as_slice(),
            "{dtype:?}: rounded to nearest even"
        );
        assert!(halves[..2]
            .iter()
            .chain(&halves[2 + n..])
            .all(|&h| h == 0xFFFF));
    }
}

#[test]
fn a_checkpoint_resumes_bema_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bema.safetensors");
    for (b, policy) in [trl_like(), restarting()] {
        let mut first = build(ctx, b, policy, 0);
        for n in 1..=9 {
            first.step(ctx, n);
        }
        let snap = first.ema.snapshot(true).unwrap();
        checkpoint::save_training(&path, &snap, None, &HostTensors::new()).unwrap();
        let ck = Checkpoint::load(&path).unwrap();
        // The anchor is stored, exactly: for TRL-like runs, the parameters of the burn-in's
        // last call (3); for restarting ones, of the last restart (5).
        let anchored = walk(&specs(), if b.restart_every > 0 { 5 } else { 3 });
        for (s, v) in specs().iter().zip(&anchored) {
            let (_, stored) = ck.get(&wgpu_ema::names::anchor_name(&s.name)).unwrap();
            assert_eq!(stored, v.as_slice(), "`{}`'s theta_0", s.name);
        }
        let mut second = build(ctx, b, policy, 9);
        second.ema.restore(&ck).unwrap();
        assert_eq!(second.ema.num_updates(), 9);
        for n in 10..=17 {
            first.step(ctx, n);
            second.step(ctx, n);
            assert_eq!(
                first.ema.read_bema_blocking().unwrap(),
                second.ema.read_bema_blocking().unwrap(),
                "call {n}"
            );
        }
        assert_eq!(
            first.ema.read_shadows_blocking().unwrap(),
            second.ema.read_shadows_blocking().unwrap()
        );

        // Another BEMA, or no BEMA, is refused; a file without anchors cannot resume BEMA.
        let other = Bema {
            bias_power: 0.3,
            ..b
        };
        let mut wrong = build(ctx, other, policy, 9);
        let e = wrong.ema.restore(&ck).unwrap_err();
        assert_checkpoint_kind(&e, CheckpointErrorKind::Config, None);
        let mut plain = GpuEma::builder(Schedule::constant(0.9));
        for ((s, buf), off) in specs().iter().zip(&wrong.bufs).zip(OFFSETS) {
            plain = plain.track_buffer(s.clone(), buf, off);
        }
        let mut plain = plain.build(&ctx.device, &ctx.queue).unwrap();
        let e = plain.restore(&ck).unwrap_err();
        assert_checkpoint_kind(&e, CheckpointErrorKind::Config, None);
        let mut cpu_plain = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
        for (s, v) in specs().iter().zip(walk(&specs(), 0)) {
            cpu_plain.track(s.clone(), &v).unwrap();
        }
        let no_anchor = dir.path().join("plain.safetensors");
        checkpoint::save_training(
            &no_anchor,
            &cpu_plain,
            Some(&{
                let mut p = HostTensors::new();
                for (s, v) in specs().into_iter().zip(walk(&specs(), 0)) {
                    p.insert(s, v).unwrap();
                }
                p
            }),
            &HostTensors::new(),
        )
        .unwrap();
        let e = wrong
            .ema
            .restore_with(
                &Checkpoint::load(&no_anchor).unwrap(),
                RestoreOptions {
                    allow_config_mismatch: true,
                    ..RestoreOptions::default()
                },
            )
            .unwrap_err();
        assert_checkpoint_kind(
            &e,
            CheckpointErrorKind::MissingTensor,
            Some("w/ExponentialMovingAverage/Theta0"),
        );
    }
}

#[test]
fn a_copied_tensor_has_its_parameter_as_weights() {
    let Some(ctx) = gpu() else { return };
    let (b, policy) = trl_like();
    let specs = specs();
    let start = walk(&specs, 0);
    let bufs: Vec<wgpu::Buffer> = start
        .iter()
        .zip(OFFSETS)
        .map(|(v, off)| buffer_with(ctx, v, off))
        .collect();
    let mut builder = GpuEma::builder(Schedule::bema(b))
        .policy(policy)
        .select(Selection::new().copy("b").exclude("s"));
    for ((s, buf), off) in specs.iter().zip(&bufs).zip(OFFSETS) {
        builder = builder.track_buffer(s.clone(), buf, off);
    }
    let mut ema = builder.build(&ctx.device, &ctx.queue).unwrap();
    let mut theta = start;
    for n in 1..=8 {
        theta = walk(&specs, n);
        for ((buf, v), off) in bufs.iter().zip(&theta).zip(OFFSETS) {
            crate::common::write(ctx, buf, off, v);
        }
        ema.update().unwrap();
    }
    let w = ema.read_bema_blocking().unwrap();
    assert_eq!(w.try_get("b").unwrap(), theta[1].as_slice());
    assert!(w.try_get("s").is_err(), "an excluded tensor has no weights");
    assert_ne!(w.try_get("w").unwrap(), theta[0].as_slice());
}

#[test]
fn bad_bema_configurations_are_errors() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 8), 0);
    let spec = TensorSpec::new("w", [8]);
    let bema = Schedule::bema(Bema::default());
    let build = |b: wgpu_ema::GpuEmaBuilder<'_>| {
        b.track_buffer(spec.clone(), &buf, 0)
            .build(&ctx.device, &ctx.queue)
    };
    let out_of_range = Schedule::bema(Bema {
        lag: 0.2,
        multiplier: 0.1,
        ..Bema::default()
    });
    assert!(matches!(
        build(GpuEma::builder(out_of_range)),
        Err(Error::InvalidSchedule(_))
    ));
    assert!(matches!(
        build(GpuEma::builder(Schedule::bema(Bema {
            ema_power: -1.0,
            ..Bema::default()
        }))),
        Err(Error::InvalidSchedule(_))
    ));
    for b in [
        GpuEma::builder(bema).compensated(true),
        GpuEma::builder(bema).extra_ema(Schedule::constant(0.9)),
        GpuEma::builder(Schedule::constant(0.9)).extra_ema(bema),
        GpuEma::builder(bema).policy(Policy {
            write_back_every: 2,
            ..Policy::default()
        }),
    ] {
        assert!(matches!(build(b), Err(Error::InvalidConfig(_))));
    }
    let mut plain = build(GpuEma::builder(Schedule::constant(0.9))).unwrap();
    assert!(matches!(
        plain.read_bema_blocking(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(plain.swap_bema(), Err(Error::InvalidConfig(_))));
    assert!(!plain.is_swapped(), "a refused swap changes nothing");
    assert!(plain.bema_bias_weight().is_none());
    assert!(matches!(
        plain.set_schedule(bema),
        Err(Error::InvalidConfig(_))
    ));
    let mut ema = build(GpuEma::builder(bema)).unwrap();
    assert!(matches!(
        ema.set_schedule(Schedule::constant(0.9)),
        Err(Error::InvalidConfig(_))
    ));
    ema.set_schedule(Schedule::bema(Bema {
        ema_power: 0.6,
        ..Bema::default()
    }))
    .unwrap();
    let mut cpu = CpuEma::new(bema, Numerics::Exact).unwrap();
    cpu.track(spec.clone(), &random(1, 8)).unwrap();
    assert!(matches!(
        cpu.set_compensated(true),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        cpu.bema_weights(&[]),
        Err(Error::TensorCountMismatch { .. })
    ));
}

/// The CPU path saves BEMA in both formats (safetensors and TensorFlow's) and resumes from
/// each bit for bit: the anchor travels with the shadows.
#[test]
fn cpu_bema_resumes_from_safetensors_and_tensorflow_files() {
    let dir = tempfile::tempdir().unwrap();
    let (b, policy) = restarting();
    let specs = specs();
    let make = || {
        let mut ema = CpuEma::new(Schedule::bema(b), Numerics::Exact).unwrap();
        ema.set_policy(policy).unwrap();
        for (s, v) in specs.iter().zip(walk(&specs, 0)) {
            ema.track(s.clone(), &v).unwrap();
        }
        ema
    };
    let step = |ema: &mut CpuEma, n: u64| {
        let theta = walk(&specs, n);
        let views: Vec<&[f32]> = theta.iter().map(Vec::as_slice).collect();
        ema.update(&views).unwrap();
        ema.bema_weights(&views).unwrap()
    };
    let mut first = make();
    for n in 1..=7 {
        step(&mut first, n);
    }
    let params = {
        let mut p = HostTensors::new();
        for (s, v) in specs.iter().zip(walk(&specs, 7)) {
            p.insert(s.clone(), v).unwrap();
        }
        p
    };
    let file = dir.path().join("cpu.safetensors");
    checkpoint::save_training(&file, &first, Some(&params), &HostTensors::new()).unwrap();
    let prefix = dir.path().join("tf-ckpt");
    checkpoint::save_tf(&prefix, &first, Some(&params), &HostTensors::new()).unwrap();
    for path in [file, prefix] {
        let ck = Checkpoint::load(&path).unwrap();
        let mut a = first.clone();
        let mut resumed = make();
        resumed.restore(&ck).unwrap();
        for s in &specs {
            assert_eq!(
                resumed.anchor(&s.name).unwrap(),
                a.anchor(&s.name).unwrap(),
                "{}: `{}`'s theta_0",
                path.display(),
                s.name
            );
        }
        for n in 8..=13 {
            assert_eq!(step(&mut a, n), step(&mut resumed, n), "call {n}");
        }
    }
}

/// TRL's own `BEMACallback` as the reference (`tests/data/trl_bema.json`, made by
/// `tests/data/make_bema_fixture.py` with TRL installed): the same trajectory replayed through
/// our BEMA, configured as the fixture's `ours` maps TRL's parameters, gives TRL's weights at
/// every step TRL updated them, on the GPU and the CPU path. A `t` off by the burn-in, a
/// weight evaluated one update late, or the anchor taken at the wrong step shows as an error
/// of the order of the correction, far above float32 rounding (torch computes the EMA as
/// `(1 - beta) ema + beta theta`, we as `ema + beta (theta - ema)`).
#[test]
fn trl_bema_callback_weights_are_replayed() {
    use serde_json::Value;
    let fixture: Value =
        serde_json::from_str(include_str!("../data/trl_bema.json")).expect("the TRL fixture");
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let ours = &case["ours"];
        let num = |k: &str| ours[k].as_f64().unwrap_or_else(|| panic!("{name}: `{k}`"));
        let b = Bema {
            ema_power: num("ema_power"),
            bias_power: num("bias_power"),
            lag: num("lag"),
            multiplier: num("multiplier"),
            min_ema_multiplier: num("min_ema_multiplier"),
            restart_every: 0,
        };
        let policy = Policy {
            update_after_step: num("update_after_step") as u64,
            update_every: num("update_every") as u64,
            write_back_every: 0,
        };
        let specs: Vec<TensorSpec> = ["w", "b"]
            .iter()
            .map(|k| {
                let shape: Vec<usize> = case["shapes"][k]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_u64().expect("dim") as usize)
                    .collect();
                TensorSpec::new(*k, shape)
            })
            .collect();
        let values = |v: &Value| -> Vec<Vec<f32>> {
            ["w", "b"]
                .iter()
                .map(|k| {
                    v[k].as_array()
                        .expect("values")
                        .iter()
                        .map(|x| x.as_f64().expect("a number") as f32)
                        .collect()
                })
                .collect()
        };
        let params: Vec<Vec<Vec<f32>>> = case["params"]
            .as_array()
            .expect("params")
            .iter()
            .map(values)
            .collect();
        let weights = case["weights"].as_object().expect("weights");
        assert!(
            weights.len() >= 8,
            "{name}: TRL updated {} times",
            weights.len()
        );

        let mut cpu = CpuEma::new(Schedule::bema(b), Numerics::Exact).unwrap();
        cpu.set_policy(policy).unwrap();
        for (s, v) in specs.iter().zip(&params[0]) {
            cpu.track(s.clone(), v).unwrap();
        }
        let gpu_run = gpu().map(|ctx| {
            let bufs: Vec<wgpu::Buffer> =
                params[0].iter().map(|v| buffer_with(ctx, v, 4)).collect();
            let mut builder = GpuEma::builder(Schedule::bema(b)).policy(policy);
            for (s, buf) in specs.iter().zip(&bufs) {
                builder = builder.track_buffer(s.clone(), buf, 4);
            }
            (ctx, bufs, builder.build(&ctx.device, &ctx.queue).unwrap())
        });
        let mut gpu_run = gpu_run;
        let mut compared = 0;
        for (step, theta) in params.iter().enumerate().skip(1) {
            let views: Vec<&[f32]> = theta.iter().map(Vec::as_slice).collect();
            cpu.update(&views).unwrap();
            if let Some((ctx, bufs, ema)) = gpu_run.as_mut() {
                for (buf, v) in bufs.iter().zip(theta) {
                    crate::common::write(ctx, buf, 4, v);
                }
                ema.update().unwrap();
            }
            let Some(want) = weights.get(&step.to_string()) else {
                continue;
            };
            let want: Vec<Vec<f64>> = values(want)
                .into_iter()
                .map(|v| v.into_iter().map(f64::from).collect())
                .collect();
            let got = cpu.bema_weights(&views).unwrap();
            check(&format!("{name}, step {step}, CPU"), &got, &want, 1e-5);
            if let Some((_, _, ema)) = gpu_run.as_mut() {
                let got = ema.read_bema_blocking().unwrap();
                check(&format!("{name}, step {step}, GPU"), &got, &want, 1e-5);
            }
            compared += 1;
        }
        assert_eq!(compared, weights.len(), "{name}");
    }
}
