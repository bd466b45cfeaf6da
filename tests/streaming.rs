//! Loading reads a checkpoint once into memory (read through the file, never mapped, so that a
//! file truncated meanwhile is an error and not a fault), verifies it there, and restores
//! from that copy one tensor at a time: the host's anonymous memory grows by the file's size
//! at load and by nothing more at restore. 256 MiB of tensors by default;
//! `WGPU_EMA_STREAM_MIB=1024` for the guide's 1 GiB figure. (Its own test binary: no other
//! test allocates meanwhile.)

use wgpu_ema::checkpoint::{self, Checkpoint, Entry};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{Numerics, Schedule, TensorSpec};

/// Anonymous resident memory of this process, in MiB (Linux), or `None` elsewhere.
/// Element `j` of tensor `i`: values that differ along a tensor and between tensors, so that
/// an offset or a repeated chunk shows.
fn value(i: usize, j: usize) -> f32 {
    ((i * 7919 + j * 31) % 65_521) as f32 - 0.5
}

fn anon_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[test]
fn loading_takes_one_copy_of_a_large_checkpoint_and_restoring_none() {
    let mib: usize = std::env::var("WGPU_EMA_STREAM_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let tensors = 8;
    let per = mib * (1 << 20) / 4 / tensors;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let specs: Vec<TensorSpec> = (0..tensors)
        .map(|i| TensorSpec::new(format!("t{i}"), [per]))
        .collect();
    // Written one tensor at a time (each produced when the writer reaches it).
    let entries: Vec<Entry> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| Entry {
            name: s.shadow_name(),
            shape: s.shape.clone(),
            produce: Box::new(move || Ok((0..per).map(|j| value(i, j)).collect())),
        })
        .collect();
    let meta = std::collections::HashMap::from([(
        checkpoint::META_NUM_UPDATES.to_string(),
        "5".to_string(),
    )]);
    checkpoint::write_safetensors(&path, entries, &meta).unwrap();
    let mut ema = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
    for s in &specs {
        ema.track(s.clone(), &vec![0.0; per]).unwrap();
    }

    // Linux always has /proc/self/status: there, its absence is a failure, not a skip.
    let before = anon_mib();
    if cfg!(target_os = "linux") {
        assert!(before.is_some(), "no /proc/self/status on Linux");
    }
    let Some(before) = before else {
        eprintln!("SKIPPED: no /proc/self/status");
        return;
    };
    let ck = Checkpoint::load(&path).unwrap();
    assert!(ck.verified());
    let loaded = anon_mib().unwrap();
    ema.restore(&ck).unwrap();
    let restored = anon_mib().unwrap();
    eprintln!(
        "{mib} MiB checkpoint: anonymous memory +{:.1} MiB after load, +{:.1} MiB after restore",
        loaded - before,
        restored - before
    );
    let file_mib = std::fs::metadata(&path).unwrap().len() as f64 / (1 << 20) as f64;
    assert!(
        loaded - before < file_mib + 16.0,
        "load took more than one copy of the {file_mib:.0} MiB file: +{:.1} MiB",
        loaded - before
    );
    assert!(
        restored - loaded < 16.0,
        "restore copied the data again: +{:.1} MiB",
        restored - loaded
    );
    for (i, s) in specs.iter().enumerate() {
        let v = ema.shadow(&s.name).unwrap();
        assert_eq!(v.len(), per);
        if let Some(j) = (0..per).find(|&j| v[j] != value(i, j)) {
            panic!(
                "`{}` element {j}: {} restored, {} saved",
                s.name,
                v[j],
                value(i, j)
            );
        }
    }
}
