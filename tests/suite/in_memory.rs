//! Checkpoints as bytes in memory (how a browser page saves and loads them), asynchronous
//! readback of snapshots, and a schedule changed mid-run: on the native GPU and CPU paths, the
//! same code the web target runs.

use std::collections::HashMap;

use crate::common::{assert_close, assert_shadows_close, gpu, random};
use wgpu_ema::checkpoint::{self, Checkpoint, Entry};
use wgpu_ema::cpu::{CpuEma, ReferenceEma};
use wgpu_ema::{wgpu, GpuEma, HostTensors, Numerics, ParamArena, ParamDtype, Schedule, TensorSpec};

/// Odd sizes, a scalar and an empty tensor.
fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("dense/kernel", [37, 13]),
        TensorSpec::new("dense/bias", [13]),
        TensorSpec::new("scale", []),
        TensorSpec::new("empty", [0, 4]),
        TensorSpec::new("embed", [1031]),
    ]
}

fn values(seed: u64) -> Vec<Vec<f32>> {
    specs()
        .iter()
        .enumerate()
        .map(|(i, s)| random(seed * 31 + i as u64, s.numel() as usize))
        .collect()
}

fn cpu_ema(steps: u64) -> CpuEma {
    let mut ema = CpuEma::new(Schedule::tf(0.99), Numerics::Exact).expect("schedule");
    for (s, v) in specs().iter().zip(values(1)) {
        ema.track(s.clone(), &v).expect("track");
    }
    for step in 0..steps {
        let p = values(100 + step);
        let refs: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        ema.update(&refs).expect("update");
    }
    ema
}

/// The same file: equal header length, equal metadata (a JSON object, whose key order is not
/// part of the format), and the tensor data byte for byte.
fn same_file(a: &[u8], b: &[u8]) {
    let n = u64::from_le_bytes(a[..8].try_into().expect("8")) as usize;
    assert_eq!(a.len(), b.len(), "file sizes");
    assert_eq!(&a[..8], &b[..8], "header sizes");
    let header = |x: &[u8]| -> serde_json::Value {
        serde_json::from_slice(&x[8..8 + n]).expect("header is JSON")
    };
    assert_eq!(header(a), header(b), "headers");
    assert!(a[8 + n..] == b[8 + n..], "tensor data differs");
}

#[test]
fn checkpoint_bytes_match_the_file_and_load_back() {
    let ema = cpu_ema(7);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut momentum = HostTensors::new();
    momentum
        .insert(TensorSpec::new("dense/bias/Momentum", [13]), random(9, 13))
        .expect("insert");
    let mut params = HostTensors::new();
    for (s, v) in specs().iter().zip(values(106)) {
        params.insert(s.clone(), v).expect("insert");
    }

    let bytes = checkpoint::training_bytes(&ema, Some(&params), &momentum).expect("bytes");
    let path = dir.path().join("t.safetensors");
    checkpoint::save_training(&path, &ema, Some(&params), &momentum).expect("save");
    same_file(&bytes, &std::fs::read(&path).expect("read"));

    let export = checkpoint::export_ema_bytes(&ema).expect("export bytes");
    let path = dir.path().join("e.safetensors");
    checkpoint::export_ema(&path, &ema).expect("export");
    same_file(&export, &std::fs::read(&path).expect("read"));

    // Back from memory: verified, every shadow bit for bit, the counter restored.
    let ck = Checkpoint::from_bytes(bytes).expect("from_bytes");
    assert!(ck.verified());
    assert_eq!(ck.path(), std::path::Path::new(checkpoint::IN_MEMORY));
    let mut back = CpuEma::new(Schedule::tf(0.99), Numerics::Exact).expect("schedule");
    for s in specs() {
        back.track(s.clone(), &vec![f32::NAN; s.numel() as usize])
            .expect("track");
    }
    back.restore(&ck).expect("restore");
    assert_eq!(back.num_updates(), 7);
    for s in specs() {
        let (a, b) = (
            ema.shadow(&s.name).expect("a"),
            back.shadow(&s.name).expect("b"),
        );
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            s.name
        );
    }
    let ck = Checkpoint::from_bytes(export).expect("export from_bytes");
    assert_eq!(
        ck.get("scale").expect("scale").1,
        ema.shadow("scale").expect("s")
    );
}

#[test]
fn half_precision_bytes_round_to_nearest_even() {
    let v = random(3, 257);
    let bytes = checkpoint::safetensors_bytes(
        vec![Entry::from_slice("v", &[257], &v)],
        &HashMap::new(),
        ParamDtype::BF16,
    )
    .expect("bytes");
    // 8-byte length, header, then 2 bytes per element.
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    assert_eq!(bytes.len(), 8 + n + 2 * 257);
    // Each value is the nearest bf16, ties to even (the `half` crate's rounding), little-endian.
    for (i, (&x, pair)) in v.iter().zip(bytes[8 + n..].chunks_exact(2)).enumerate() {
        let stored = u16::from_le_bytes([pair[0], pair[1]]);
        assert_eq!(
            stored,
            half::bf16::from_f32(x).to_bits(),
            "element {i} ({x})"
        );
    }
    // Our loader reads f32 checkpoints only, and says so.
    let err = Checkpoint::from_bytes(bytes).expect_err("bf16 is not a checkpoint dtype");
    assert!(err.to_string().contains("BF16"), "{err}");
}

#[test]
fn corrupt_bytes_are_errors_never_panics() {
    let good = checkpoint::training_bytes(&cpu_ema(3), None, &HostTensors::new());
    // Without params the state has none: an error naming the missing parameter.
    let err = good.expect_err("CpuEma holds no raw parameters");
    assert!(err.to_string().contains("raw parameter"), "{err}");

    let good = checkpoint::export_ema_bytes(&cpu_ema(3)).expect("export");
    for bad in [Vec::new(), vec![0u8; 7], good[..good.len() - 1].to_vec(), {
        let mut b = good.clone();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b
    }] {
        assert!(Checkpoint::from_bytes(bad).is_err());
    }
    // A flipped bit in the data is caught by the checksums.
    let mut flipped = good.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x10;
    let err = Checkpoint::from_bytes(flipped).expect_err("checksum");
    assert!(err.to_string().contains("checksum"), "{err}");
    // Seeded random damage anywhere: an error, or (damage to the header's padding) a
    // checkpoint with exactly the good one's tensors and metadata; never a panic.
    let reference = Checkpoint::from_bytes(good.clone()).expect("the good bytes load");
    let mut rng = fastrand::Rng::with_seed(77);
    let mut refused = 0;
    for _ in 0..500 {
        let mut b = good.clone();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(..b.len());
            b[i] = rng.u8(..);
        }
        if rng.bool() {
            b.truncate(rng.usize(..b.len()));
        }
        match Checkpoint::from_bytes(b) {
            Err(_) => refused += 1,
            Ok(c) => {
                assert_eq!(c.metadata(), reference.metadata());
                assert_eq!(
                    c.names().collect::<Vec<_>>(),
                    reference.names().collect::<Vec<_>>()
                );
                for name in reference.names() {
                    assert_eq!(
                        c.get(name),
                        reference.get(name),
                        "`{name}` changed silently"
                    );
                }
            }
        }
    }
    assert!(refused > 400, "only {refused} of 500 damaged files refused");
}

#[test]
fn schedule_changed_mid_run_matches_the_reference_on_cpu_and_gpu() {
    let init = values(1);
    let refs: Vec<&[f32]> = init.iter().map(Vec::as_slice).collect();
    let first = Schedule::tf(0.999);
    let second = Schedule::constant(0.9);
    let mut reference = ReferenceEma::new(first, Numerics::Exact, &refs).expect("reference");
    let mut cpu = CpuEma::new(first, Numerics::Exact).expect("cpu");
    for (s, v) in specs().iter().zip(&init) {
        cpu.track(s.clone(), v).expect("track");
    }
    // An invalid schedule is refused and changes nothing.
    assert!(cpu.set_schedule(Schedule::constant(1.5)).is_err());
    assert_eq!(cpu.schedule(), first);

    let ctx = gpu();
    let arena = ctx.map(|ctx| {
        let arena = ParamArena::new(&ctx.device, specs()).expect("arena");
        for (s, v) in specs().iter().zip(&init) {
            arena.write(&ctx.queue, &s.name, v).expect("write");
        }
        arena
    });
    let mut ema = match (ctx, &arena) {
        (Some(ctx), Some(a)) => Some(
            GpuEma::builder(first)
                .track_arena(a)
                .build(&ctx.device, &ctx.queue)
                .expect("build"),
        ),
        _ => None,
    };
    for step in 0..12u64 {
        if step == 5 {
            reference.set_schedule(second).expect("reference schedule");
            cpu.set_schedule(second).expect("cpu schedule");
            if let Some(ema) = &mut ema {
                assert!(ema.set_schedule(Schedule::tf(-1.0)).is_err());
                ema.set_schedule(second).expect("gpu schedule");
            }
        }
        let p = values(200 + step);
        let refs: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        reference.update(&refs).expect("reference update");
        cpu.update(&refs).expect("cpu update");
        if let (Some(ctx), Some(a), Some(ema)) = (ctx, &arena, &mut ema) {
            for (s, v) in specs().iter().zip(&p) {
                a.write(&ctx.queue, &s.name, v).expect("write");
            }
            ema.update().expect("gpu update");
        }
    }
    // Constant 0.9 from step 6 on: 1 - 0.9 weight on the newest params is visible.
    for (i, s) in specs().iter().enumerate() {
        let want = &reference.shadows()[i];
        assert_close(&s.name, cpu.shadow(&s.name).expect("cpu"), want, 1e-6);
    }
    if let Some(ema) = &ema {
        assert_eq!(ema.schedule(), second);
        let got = ema.read_shadows_blocking().expect("read");
        assert_shadows_close(&got, &specs(), &reference, 1e-6);
    }
}

#[test]
fn snapshot_into_host_feeds_checkpoint_bytes() {
    let Some(ctx) = gpu() else { return };
    let arena = ParamArena::new(&ctx.device, specs()).expect("arena");
    for (s, v) in specs().iter().zip(values(1)) {
        arena.write(&ctx.queue, &s.name, &v).expect("write");
    }
    let mut ema = GpuEma::builder(Schedule::tf(0.99))
        .extra_ema(Schedule::constant(0.5))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .expect("build");
    for step in 0..6u64 {
        for (s, v) in specs().iter().zip(values(300 + step)) {
            arena.write(&ctx.queue, &s.name, &v).expect("write");
        }
        ema.update().expect("update");
    }
    let wait = || {
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
    };
    // The asynchronous reads, driven by polling as a native caller must.
    let shadows = ema.read_shadows();
    let extra = ema.read_ema(1);
    let params = arena.read(&ctx.device, &ctx.queue);
    let snapshot = ema.snapshot(true).expect("snapshot").into_host();
    // A step after the snapshot must not show in it.
    for (s, v) in specs().iter().zip(values(999)) {
        arena.write(&ctx.queue, &s.name, &v).expect("write");
    }
    ema.update().expect("update after the snapshot");
    wait();
    let shadows = pollster::block_on(shadows).expect("shadows");
    let extra = pollster::block_on(extra).expect("extra");
    let params = pollster::block_on(params).expect("params");
    let snapshot = pollster::block_on(snapshot).expect("into_host");
    assert!(snapshot.is_on_host());
    assert!(ema.read_ema(7).await_is_error());

    let bytes = checkpoint::training_bytes(&snapshot, None, &HostTensors::new()).expect("bytes");
    let ck = Checkpoint::from_bytes(bytes).expect("load");
    assert_eq!(ck.num_updates().expect("n"), 6);
    for s in specs() {
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        let got = ck.get(&s.shadow_name()).expect("shadow").1;
        assert!(
            same(got, shadows.try_get(&s.name).expect("s")),
            "{}",
            s.name
        );
        let got = ck
            .get(&checkpoint::ema_shadow_name(&s.name, 1))
            .expect("ema 1")
            .1;
        assert!(same(got, extra.try_get(&s.name).expect("e")), "{}", s.name);
        let got = ck.get(&s.name).expect("param").1;
        assert!(same(got, params.try_get(&s.name).expect("p")), "{}", s.name);
        assert_eq!(got.len() as u64, s.numel());
    }
}

/// A future that fails before it needs the GPU resolves to its error at once.
trait AwaitIsError {
    fn await_is_error(self) -> bool;
}

impl<F: std::future::Future<Output = wgpu_ema::Result<HostTensors>>> AwaitIsError for F {
    fn await_is_error(self) -> bool {
        pollster::block_on(self).is_err()
    }
}
