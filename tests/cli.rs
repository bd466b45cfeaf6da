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

    let one = std::fs::read_dir(&snaps)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
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
