//! The `wgpu-ema` command, run as a user would (needs `--features cli`).

mod common;

use std::process::Command;

use common::Seeded;
use wgpu_ema::checkpoint::Checkpoint;
use wgpu_ema::posthoc::Recorder;
use wgpu_ema::TensorSpec;

fn wgpu_ema(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wgpu-ema"))
        .args(args)
        .output()
        .expect("run wgpu-ema");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn posthoc_snapshots_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let snaps = dir.path().join("snaps");
    let specs = vec![TensorSpec::new("w", [5, 3]), TensorSpec::new("b", [5])];
    let mut rec = Recorder::open(&snaps, 0).unwrap();
    for t in [100, 200, 300] {
        rec.write(&Seeded {
            specs: specs.clone(),
            t,
        })
        .unwrap();
    }
    let s = snaps.to_str().unwrap();

    let (ok, out, err) = wgpu_ema(&["snapshots", s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("3 snapshots") && out.contains("0.0500") && out.contains("0.1000"),
        "{out}"
    );

    let (ok, out, err) = wgpu_ema(&["posthoc", s, "--sigma-rel", "0.08", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("6 terms"), "{out}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "dry run wrote nothing"
    );

    let target = dir.path().join("ema-{sigma}.safetensors");
    let (ok, out, err) = wgpu_ema(&[
        "posthoc",
        s,
        "--sigma-rel",
        "0.08",
        "0.12",
        "--step",
        "200",
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("at step 200: 4 terms"), "{out}");
    for sigma in ["0.08", "0.12"] {
        let path = dir.path().join(format!("ema-{sigma}.safetensors"));
        let c = Checkpoint::load(&path).unwrap();
        assert!(c.verified());
        assert_eq!(c.names().collect::<Vec<_>>(), ["b", "w"]);
        assert_eq!(c.metadata()["posthoc_t"], "200");
        let (ok, out, err) = wgpu_ema(&["inspect", path.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(
            out.contains("w  F32 [5, 3]") && out.contains(&format!("posthoc_sigma_rel: {sigma}")),
            "{out}"
        );
    }

    let one = snaps.join("phema-000000-0000000100.safetensors");
    let (ok, out, err) = wgpu_ema(&["inspect", one.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("EMA 0 shadows: 2 tensors") && out.contains("EMA 1 shadows: 2 tensors"),
        "{out}"
    );

    // Bad input: an error line and a failing exit status, nothing written.
    for args in [
        vec!["posthoc", s, "--sigma-rel", "0.3"],
        vec!["posthoc", s, "--sigma-rel", "0.08", "--step", "50"],
        vec![
            "posthoc",
            dir.path().to_str().unwrap(),
            "--sigma-rel",
            "0.08",
        ],
        vec!["inspect", "/nonexistent.safetensors"],
    ] {
        let (ok, _, err) = wgpu_ema(&args);
        assert!(!ok && err.starts_with("error: "), "{args:?}: {err}");
    }
}

/// A set recorded in `dir`, snapshots at `steps`.
fn record(dir: &std::path::Path, steps: &[u64]) {
    let specs = vec![TensorSpec::new("w", [5, 3]), TensorSpec::new("b", [5])];
    let mut rec = Recorder::open(dir, 0).unwrap();
    for &t in steps {
        rec.write(&Seeded {
            specs: specs.clone(),
            t,
        })
        .unwrap();
    }
}

fn snapshot(dir: &std::path::Path, index: u64, t: u64) -> std::path::PathBuf {
    dir.join(format!("phema-{index:06}-{t:010}.safetensors"))
}

/// Sets that are not one recording are refused, naming the files; `--step` must be a
/// snapshot's; `-o` cannot land in the set.
#[test]
fn posthoc_sets_of_other_runs_gaps_and_bad_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    record(&a, &[100, 200, 300]);
    record(&b, &[100, 200, 300]);
    let s = a.to_str().unwrap();
    let fails = |args: &[&str], needles: &[&str]| {
        let (ok, _, err) = wgpu_ema(args);
        assert!(!ok, "{args:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
        }
    };
    let good = std::fs::read(snapshot(&a, 1, 200)).unwrap();

    // Another run's snapshot under the same name: same parameters, profiles and step.
    std::fs::copy(snapshot(&b, 1, 200), snapshot(&a, 1, 200)).unwrap();
    fails(&["snapshots", s], &["of run"]);
    fails(
        &["posthoc", s, "--sigma-rel", "0.08", "--dry-run"],
        &["of run"],
    );
    std::fs::write(snapshot(&a, 1, 200), &good).unwrap();

    // A snapshot renamed into another's place.
    std::fs::rename(snapshot(&a, 2, 300), snapshot(&a, 3, 400)).unwrap();
    fails(&["snapshots", s], &["renamed or copied"]);
    std::fs::rename(snapshot(&a, 3, 400), snapshot(&a, 2, 300)).unwrap();

    // A deleted snapshot: a gap, refused unless accepted, and then listed.
    std::fs::rename(snapshot(&a, 1, 200), dir.path().join("aside")).unwrap();
    fails(
        &["posthoc", s, "--sigma-rel", "0.08", "--dry-run"],
        &["missing", "1"],
    );
    let (ok, out, err) = wgpu_ema(&[
        "posthoc",
        s,
        "--sigma-rel",
        "0.08",
        "--dry-run",
        "--allow-gaps",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("number(s) 1 missing") && out.contains("4 terms"),
        "{out}{err}"
    );
    std::fs::rename(dir.path().join("aside"), snapshot(&a, 1, 200)).unwrap();

    // --step between snapshots, or past the last: an error naming the nearest.
    fails(
        &["posthoc", s, "--sigma-rel", "0.08", "--step", "250"],
        &["200", "300"],
    );
    fails(
        &["posthoc", s, "--sigma-rel", "0.08", "--step", "3000"],
        &["300"],
    );

    // -o onto a snapshot of the set, or a snapshot's name in its folder: nothing written.
    for out in [snapshot(&a, 1, 200), snapshot(&a, 3, 400)] {
        fails(
            &[
                "posthoc",
                s,
                "--sigma-rel",
                "0.08",
                "-o",
                out.to_str().unwrap(),
            ],
            &["refusing"],
        );
    }
    assert_eq!(std::fs::read(snapshot(&a, 1, 200)).unwrap(), good);
    assert!(!snapshot(&a, 3, 400).exists());
    let (ok, _, err) = wgpu_ema(&["snapshots", s]);
    assert!(ok, "{err}");
}

/// `inspect` takes a folder or TensorFlow's state file for the latest checkpoint; other
/// inputs say what was expected; a file without checksums needs `--allow-unverified`.
#[test]
fn inspect_resolves_folders_and_refuses_unverified_files() {
    use wgpu_ema::cpu::CpuEma;
    use wgpu_ema::{HostTensors, Numerics, Schedule};
    let dir = tempfile::tempdir().unwrap();
    let mut ema = CpuEma::new(Schedule::tf(0.99), Numerics::TensorFlow).unwrap();
    ema.track(TensorSpec::new("w", [3]), &[1.0, 2.0, 3.0])
        .unwrap();
    let mut params = HostTensors::new();
    params
        .insert(TensorSpec::new("w", [3]), vec![1.0, 2.0, 3.0])
        .unwrap();
    for step in [10, 20] {
        ema.set_num_updates(step);
        wgpu_ema::checkpoint::save_tf(
            dir.path().join(format!("ckpt-{step}")),
            &ema,
            Some(&params),
            &HostTensors::new(),
        )
        .unwrap();
    }
    let state = dir.path().join("checkpoint");
    for path in [dir.path(), state.as_path()] {
        let (ok, out, err) = wgpu_ema(&["inspect", path.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(
            out.contains("ckpt-20") && out.contains("num_updates: 20"),
            "{out}"
        );
    }
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "a text file, not a checkpoint at all").unwrap();
    for (path, needle) in [(&empty, "expected"), (&text, "expected")] {
        let (ok, _, err) = wgpu_ema(&["inspect", path.to_str().unwrap()]);
        assert!(!ok && err.contains(needle), "{err}");
    }
    let other = dir.path().join("other.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    safetensors::serialize_to_file([("x", view)], None, &other).unwrap();
    let (ok, _, err) = wgpu_ema(&["inspect", other.to_str().unwrap()]);
    assert!(!ok && err.contains("--allow-unverified"), "{err}");
    let (ok, out, err) = wgpu_ema(&["inspect", other.to_str().unwrap(), "--allow-unverified"]);
    assert!(ok && out.contains("UNVERIFIED"), "{out}{err}");
}

/// `wgpu-ema consolidate` and `reshard` on a ranked checkpoint (two ranks, CPU EMAs): the
/// consolidated file holds each global tensor whole, the resharded folder opens with the same
/// values, and a folder without an index is an error naming what it expected.
#[test]
fn consolidate_and_reshard_a_ranked_checkpoint() {
    use wgpu_ema::checkpoint::ranks::{commit_ranks, save_rank, RankPlan, RankedCheckpoint};
    use wgpu_ema::cpu::CpuEma;
    use wgpu_ema::{HostTensors, Numerics, Schedule};
    let dir = tempfile::tempdir().unwrap();
    let ranks_dir = dir.path().join("ranks");
    let model = [TensorSpec::new("w", [9, 4]), TensorSpec::new("b", [9])];
    let global: Vec<Vec<f32>> = model
        .iter()
        .enumerate()
        .map(|(i, s)| common::random(40 + i as u64, s.numel() as usize))
        .collect();
    for r in 0..2 {
        let plan = RankPlan::even(&model, r, 2).unwrap();
        let mut ema = CpuEma::new(Schedule::tf(0.9), Numerics::Exact).unwrap();
        let mut params = HostTensors::new();
        for p in plan.pieces() {
            let g = model.iter().position(|s| s.name == p.global).unwrap();
            let v = global[g][p.start as usize..(p.start + p.len) as usize].to_vec();
            ema.track(TensorSpec::new(p.global.clone(), [p.len as usize]), &v)
                .unwrap();
            params
                .insert(TensorSpec::new(p.global.clone(), [p.len as usize]), v)
                .unwrap();
        }
        save_rank(
            &ranks_dir,
            &ema,
            Some(&params),
            &HostTensors::new(),
            &plan,
            1,
        )
        .unwrap();
    }
    commit_ranks(&ranks_dir, 1, 2, std::time::Duration::ZERO).unwrap();
    let r = ranks_dir.to_str().unwrap();

    let whole = dir.path().join("whole.safetensors");
    let (ok, out, err) = wgpu_ema(&["consolidate", r, "-o", whole.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("save 1 of 2 ranks"), "{out}");
    let ck = Checkpoint::load(&whole).unwrap();
    for (s, v) in model.iter().zip(&global) {
        let (shape, got) = ck
            .get(&format!("{}/ExponentialMovingAverage", s.name))
            .unwrap();
        assert_eq!(shape, s.shape.as_slice());
        assert_eq!(got, v.as_slice(), "{}", s.name);
    }

    let three = dir.path().join("three");
    let (ok, out, err) = wgpu_ema(&["reshard", r, "--ranks", "3", "-o", three.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("into 3"), "{out}");
    let again = RankedCheckpoint::open(&three).unwrap();
    assert_eq!(again.ranks(), 3);
    assert_eq!(again.read("w").unwrap(), global[0]);

    let (ok, _, err) = wgpu_ema(&["consolidate", dir.path().to_str().unwrap(), "-o", "x"]);
    assert!(!ok && err.contains("wgpu-ema-ranks.json"), "{err}");
}
