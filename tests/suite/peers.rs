//! The peers' own EMA code as the reference: `tests/data/peer_ema.json` holds the shadows that
//! diffusers' `EMAModel`, timm's `ModelEmaV3`, ema-pytorch's `EMA` and `KarrasEMA` and EDM2's
//! `PowerFunctionEMA` computed call by call (made by `tests/data/make_peer_fixtures.py` with
//! those packages installed), and the configuration of ours that the docs map each to. Ours
//! replays the same parameters and must give the same shadows at every compared call: which
//! call is the first average, which calls copy or skip, and which decay each update uses.
//!
//! The reference is the peers' output, not our schedule code: a decay off by one step, a
//! copy where the peer averages, or a skipped call shows as a difference of the order of the
//! update itself, far above the float32 rounding allowed here (torch's `lerp` rounds
//! differently from our update, a few ulps over 30 calls).

use serde_json::Value;
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::Policy;
use wgpu_ema::{GpuEma, Numerics, Schedule, TensorSpec};

use crate::common::{assert_close, buffer_with, gpu, write};

/// Relative to max(1, |peer|): float32 rounding over 30 calls, far below any schedule error.
const TOL: f64 = 1e-5;

struct Case {
    name: String,
    schedule: Schedule,
    policy: Policy,
    start: u64,
    build_from: usize,
    compare_from: usize,
    params: Vec<Vec<f32>>,
    shadows: Vec<Vec<f32>>,
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}"))
}

fn floats(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("a list")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let data: Value = serde_json::from_str(include_str!("../data/peer_ema.json")).unwrap();
    let list = data["cases"].as_array().expect("cases");
    assert!(list.len() >= 12, "the fixture lost cases: {}", list.len());
    list.iter()
        .map(|c| {
            let o = &c["ours"];
            let schedule = match o["schedule"].as_str().expect("schedule") {
                "diffusers" => Schedule::diffusers(f(o, "decay"), f(o, "min_decay")),
                "warmup" => Schedule::Warmup {
                    inv_gamma: f(o, "inv_gamma"),
                    power: f(o, "power"),
                    min_decay: f(o, "min_decay"),
                    max_decay: f(o, "max_decay"),
                },
                "constant" => Schedule::constant(f(o, "decay")),
                "power_sigma_rel" => Schedule::power_sigma_rel(f(o, "sigma_rel")).unwrap(),
                other => panic!("unknown schedule {other}"),
            };
            let params = floats(&c["params"]);
            let shadows = floats(&c["shadows"]);
            assert_eq!(params.len(), shadows.len() + 1);
            Case {
                name: c["name"].as_str().expect("name").to_string(),
                schedule,
                policy: Policy {
                    update_after_step: u(o, "update_after_step"),
                    update_every: u(o, "update_every"),
                    write_back_every: 0,
                },
                start: u(o, "start"),
                build_from: u(o, "build_from") as usize,
                compare_from: u(o, "compare_from") as usize,
                params,
                shadows,
            }
        })
        .collect()
}

fn compare(case: &Case, path: &str, call: usize, got: &[f32]) {
    let want: Vec<f64> = case.shadows[call - 1].iter().map(|&w| w as f64).collect();
    let what = format!(
        "{} ({path}), call {call}: ours against the peer's",
        case.name
    );
    assert_close(&what, got, &want, TOL);
}

#[test]
fn the_cpu_path_gives_the_peers_shadows_call_by_call() {
    for case in cases() {
        let mut ema = CpuEma::new(case.schedule, Numerics::Exact).unwrap();
        ema.set_policy(case.policy).unwrap();
        ema.track(TensorSpec::new("w", [4]), &case.params[case.build_from])
            .unwrap();
        ema.set_num_updates(case.start);
        let mut compared = 0;
        for call in case.build_from + 1..case.params.len() {
            ema.update(&[&case.params[call]]).unwrap();
            if call >= case.compare_from {
                compare(&case, "CPU", call, ema.shadow("w").unwrap());
                compared += 1;
            }
        }
        assert!(compared >= 20, "{}: {compared} calls compared", case.name);
    }
}

#[test]
fn the_gpu_gives_the_peers_shadows_call_by_call() {
    let Some(ctx) = gpu() else { return };
    for case in cases() {
        let buf = buffer_with(ctx, &case.params[case.build_from], 0);
        let mut ema = GpuEma::builder(case.schedule)
            .policy(case.policy)
            .num_updates(case.start)
            .track_buffer(TensorSpec::new("w", [4]), &buf, 0)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        for call in case.build_from + 1..case.params.len() {
            write(ctx, &buf, 0, &case.params[call]);
            ema.update().unwrap();
            if call >= case.compare_from {
                compare(&case, "GPU", call, &ema.read_shadow_blocking("w").unwrap());
            }
        }
    }
}
