//! TensorFlow 2.21's own shadows (tests/data/tf_ema_public.json, made by
//! `tf.train.ExponentialMovingAverage` on seeded trajectories): the TensorFlow-compatible mode
//! reproduces them bit for bit on the CPU, and within 1 ulp per step on the GPU.

use serde_json::Value;
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{wgpu, GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

struct Case {
    name: String,
    schedule: Schedule,
    n0: u64,
    specs: Vec<TensorSpec>,
    /// params[k][t]: tensor t at step k (step 0: initial values).
    params: Vec<Vec<Vec<f32>>>,
    shadows: Vec<Vec<Vec<f32>>>,
}

fn flatten(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        Value::Number(n) => out.push(n.as_f64().expect("number") as f32),
        other => panic!("unexpected {other}"),
    }
}

fn cases() -> Vec<Case> {
    let text = include_str!("../data/tf_ema_public.json");
    let root: Value = serde_json::from_str(text).expect("fixture parses");
    root["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let order: Vec<String> = c["order"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            let specs = order
                .iter()
                .map(|n| {
                    let shape: Vec<usize> = c["shapes"][n]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect();
                    TensorSpec::new(n.clone(), shape)
                })
                .collect();
            let steps = |key: &str| -> Vec<Vec<Vec<f32>>> {
                c[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|step| {
                        order
                            .iter()
                            .map(|n| {
                                let mut v = Vec::new();
                                flatten(&step[n], &mut v);
                                v
                            })
                            .collect()
                    })
                    .collect()
            };
            let decay = c["decay"].as_f64().unwrap();
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                schedule: if c["num_updates"].as_bool().unwrap() {
                    Schedule::tf(decay)
                } else {
                    Schedule::constant(decay)
                },
                n0: c["first_num_updates"].as_u64().unwrap(),
                specs,
                params: steps("params"),
                shadows: steps("shadows"),
            }
        })
        .collect()
}

#[test]
fn cpu_tensorflow_mode_is_bit_exact() {
    for case in cases() {
        let mut ema = CpuEma::new(case.schedule, Numerics::TensorFlow).unwrap();
        for (spec, v) in case.specs.iter().zip(&case.params[0]) {
            ema.track(spec.clone(), v).unwrap();
        }
        ema.set_num_updates(case.n0);
        for k in 1..case.params.len() {
            let p: Vec<&[f32]> = case.params[k].iter().map(|v| v.as_slice()).collect();
            ema.update(&p).unwrap();
            for (t, spec) in case.specs.iter().enumerate() {
                let got = ema.shadow(&spec.name).unwrap();
                let want = &case.shadows[k][t];
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{} `{}`: length",
                    case.name,
                    spec.name
                );
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{} step {k} {}[{i}]: {g} vs TF {w}",
                        case.name,
                        spec.name
                    );
                }
            }
        }
    }
}

#[test]
fn exact_mode_differs_from_tensorflow_by_the_alpha_rounding_only() {
    // The default mode computes alpha in f64: over 20 steps at 0.999 it stays within f32
    // rounding of TensorFlow's shadows.
    let case = &cases()[0];
    let mut ema = CpuEma::new(case.schedule, Numerics::Exact).unwrap();
    for (spec, v) in case.specs.iter().zip(&case.params[0]) {
        ema.track(spec.clone(), v).unwrap();
    }
    for k in 1..case.params.len() {
        let p: Vec<&[f32]> = case.params[k].iter().map(|v| v.as_slice()).collect();
        ema.update(&p).unwrap();
    }
    let last = case.shadows.last().unwrap();
    for (t, spec) in case.specs.iter().enumerate() {
        for (g, w) in ema.shadow(&spec.name).unwrap().iter().zip(&last[t]) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}

#[test]
fn gpu_tensorflow_mode_is_within_one_ulp_per_step() {
    let Some(ctx) = crate::common::gpu() else {
        return;
    };
    for case in cases() {
        let arena = ParamArena::new(&ctx.device, case.specs.clone()).unwrap();
        for (spec, v) in case.specs.iter().zip(&case.params[0]) {
            arena.write(&ctx.queue, &spec.name, v).unwrap();
        }
        let mut ema = GpuEma::builder(case.schedule)
            .numerics(Numerics::TensorFlow)
            .num_updates(case.n0)
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        let mut worst = 0;
        for k in 1..case.params.len() {
            for (spec, v) in case.specs.iter().zip(&case.params[k]) {
                arena.write(&ctx.queue, &spec.name, v).unwrap();
            }
            ema.update().unwrap();
            let got = ema.read_shadows_blocking().unwrap();
            for (t, spec) in case.specs.iter().enumerate() {
                let values = got.try_get(&spec.name).unwrap();
                assert_eq!(
                    values.len(),
                    case.shadows[k][t].len(),
                    "`{}`: length",
                    spec.name
                );
                for (i, (g, w)) in values.iter().zip(&case.shadows[k][t]).enumerate() {
                    let u = crate::common::ulps(*g, *w);
                    assert!(
                        u <= k as u64,
                        "{} step {k} {}[{i}]: {g} vs TF {w} ({u} ulps)",
                        case.name,
                        spec.name
                    );
                    worst = worst.max(u);
                }
            }
        }
        eprintln!(
            "{}: worst {worst} ulps from TensorFlow on {}",
            case.name,
            ctx.describe()
        );
        // Mesa's drivers do not fuse the multiply-add: TensorFlow's own bits, as the guide
        // says. (A GPU that fuses may differ by an ulp per step: the bound above.)
        if ctx.adapter.get_info().device_type == wgpu::DeviceType::Cpu {
            assert_eq!(worst, 0, "{}: TensorFlow's shadows bit for bit", case.name);
        }
    }
}
