//! Checkpoints: TensorFlow's names, resume that continues bitwise, export, shards, atomic
//! saves, and every kind of bad input.

use std::collections::HashMap;

use crate::common::{gpu, random};
use wgpu_ema::checkpoint::{self, Checkpoint, EmaState, Entry};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{
    CheckpointErrorKind, Error, GpuEma, HostTensors, Numerics, ParamArena, Schedule, TensorSpec,
};

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("weight", [2, 1]),
        TensorSpec::new("bias", []),
        TensorSpec::new("embed", [7, 3]),
    ]
}

fn params_at(step: u64) -> HostTensors {
    let mut h = HostTensors::new();
    for (i, s) in specs().into_iter().enumerate() {
        let n = s.numel() as usize;
        h.insert(s, random(step * 10 + i as u64, n)).unwrap();
    }
    h
}

fn momentum() -> HostTensors {
    let mut h = HostTensors::new();
    h.insert(TensorSpec::new("weight/Momentum", [2, 1]), vec![0.5, -0.5])
        .unwrap();
    h.insert(TensorSpec::new("bias/Momentum", []), vec![0.25])
        .unwrap();
    h
}

fn cpu_ema(steps: std::ops::RangeInclusive<u64>, ema: &mut CpuEma) {
    for s in steps {
        let p = params_at(s);
        ema.update(&p.slices()).unwrap();
    }
}

fn new_cpu() -> CpuEma {
    let mut ema = CpuEma::new(Schedule::tf(0.9999), Numerics::Exact).unwrap();
    let p0 = params_at(0);
    for (s, v) in p0.iter() {
        ema.track(s.clone(), v).unwrap();
    }
    ema
}

#[test]
fn training_checkpoint_has_tensorflow_names_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut ema = new_cpu();
    cpu_ema(1..=5, &mut ema);
    checkpoint::save_training(&path, &ema, Some(&params_at(5)), &momentum()).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(
        names,
        [
            "bias",
            "bias/ExponentialMovingAverage",
            "bias/Momentum",
            "embed",
            "embed/ExponentialMovingAverage",
            "weight",
            "weight/ExponentialMovingAverage",
            "weight/Momentum"
        ]
    );
    assert_eq!(ck.num_updates().unwrap(), 5);
    assert_eq!(ck.metadata()["schedule"], "num_updates(decay=0.9999)");
    assert_eq!(ck.metadata()["numerics"], "exact");
    assert_eq!(ck.metadata()["wgpu_ema_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ck.get("bias").unwrap().0, &[] as &[usize]);
    assert_eq!(
        ck.get("weight/ExponentialMovingAverage").unwrap().1,
        ema.shadow("weight").unwrap()
    );
    assert_eq!(
        ck.get("embed").unwrap().1,
        params_at(5).get("embed").unwrap()
    );
    assert_eq!(
        checkpoint::variables_to_restore(&specs())[0],
        (
            "weight".to_string(),
            "weight/ExponentialMovingAverage".to_string()
        )
    );
}

#[test]
fn cpu_resume_continues_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mid.safetensors");
    let mut straight = new_cpu();
    cpu_ema(1..=20, &mut straight);
    let mut first = new_cpu();
    cpu_ema(1..=10, &mut first);
    checkpoint::save_training(&path, &first, Some(&params_at(10)), &HostTensors::new()).unwrap();
    drop(first);
    let ck = Checkpoint::load(&path).unwrap();
    let mut resumed = CpuEma::new(Schedule::tf(0.9999), Numerics::Exact).unwrap();
    for (s, v) in ck.params_for(&specs()).unwrap().iter() {
        resumed.track(s.clone(), v).unwrap();
    }
    resumed.restore(&ck).unwrap();
    assert_eq!(resumed.num_updates(), 10);
    cpu_ema(11..=20, &mut resumed);
    assert_eq!(resumed.shadows(), straight.shadows());
}

#[test]
fn gpu_resume_continues_bitwise_and_export_has_plain_names() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = |steps: std::ops::RangeInclusive<u64>, ema: &mut GpuEma, arena: &ParamArena| {
        for s in steps {
            for (spec, v) in params_at(s).iter() {
                arena.write(&ctx.queue, &spec.name, v).unwrap();
            }
            ema.update().unwrap();
        }
    };
    let build = |n0: u64| {
        let arena = ParamArena::new(&ctx.device, specs()).unwrap();
        for (spec, v) in params_at(n0).iter() {
            arena.write(&ctx.queue, &spec.name, v).unwrap();
        }
        let ema = GpuEma::builder(Schedule::tf(0.9999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        (arena, ema)
    };
    let (a0, mut straight) = build(0);
    run(1..=20, &mut straight, &a0);
    let (a1, mut first) = build(0);
    run(1..=10, &mut first, &a1);
    let path = dir.path().join("gpu.safetensors");
    let snap = first.snapshot(true).unwrap();
    run(11..=12, &mut first, &a1); // training goes on; the snapshot does not change
    checkpoint::save_training(&path, &snap, None, &momentum()).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.num_updates().unwrap(), 10);
    assert_eq!(
        ck.get("embed").unwrap().1,
        params_at(10).get("embed").unwrap()
    );

    // Resume into a fresh arena and EMA.
    let (a2, mut resumed) = build(99);
    let params = ck.params_for(&specs()).unwrap();
    resumed.write_params(&params).unwrap();
    resumed.restore(&ck).unwrap();
    run(11..=20, &mut resumed, &a2);
    assert_eq!(
        resumed.read_shadows_blocking().unwrap(),
        straight.read_shadows_blocking().unwrap()
    );

    // Export for inference: the shadows under plain names.
    let export = dir.path().join("ema.safetensors");
    checkpoint::export_ema(&export, &resumed.snapshot(false).unwrap()).unwrap();
    let ex = Checkpoint::load(&export).unwrap();
    assert_eq!(ex.names().collect::<Vec<_>>(), ["bias", "embed", "weight"]);
    assert_eq!(ex.metadata()["format"], "ema_export");
    let shadows = resumed.read_shadows_blocking().unwrap();
    assert_eq!(ex.weights_for(&specs()).unwrap(), shadows);
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut ema = new_cpu();
    cpu_ema(1..=3, &mut ema);
    let index =
        checkpoint::save_training_sharded(dir.path(), &ema, Some(&params_at(3)), &momentum(), 64)
            .unwrap();
    assert!(index.ends_with("model.safetensors.index.json"));
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let shards = files.iter().filter(|f| f.ends_with(".safetensors")).count();
    assert!(shards >= 3, "{files:?}");
    // Shards carry their save's generation: model-<generation>-00001-of-0000N.safetensors.
    let first = format!("-00001-of-{shards:05}.safetensors");
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("model-") && f.ends_with(&first)),
        "{files:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    assert_eq!(
        json["metadata"]["total_size"],
        serde_json::json!((2 + 1 + 21) * 4 * 2 + 3 * 4)
    );
    assert!(json["weight_map"]["embed/ExponentialMovingAverage"]
        .as_str()
        .unwrap()
        .starts_with("model-"));
    let sharded = Checkpoint::load(&index).unwrap();
    let single_path = dir.path().join("one.safetensors");
    checkpoint::save_training(&single_path, &ema, Some(&params_at(3)), &momentum()).unwrap();
    let single = Checkpoint::load(&single_path).unwrap();
    assert_eq!(
        sharded.names().collect::<Vec<_>>(),
        single.names().collect::<Vec<_>>()
    );
    for n in single.names() {
        assert_eq!(sharded.get(n), single.get(n), "{n}");
    }
    assert_eq!(sharded.num_updates().unwrap(), 3);

    // A shard missing from disk: the error names it.
    let victim = json["weight_map"]["bias"].as_str().unwrap().to_string();
    std::fs::remove_file(dir.path().join(&victim)).unwrap();
    let e = Checkpoint::load(&index).unwrap_err().to_string();
    assert!(e.contains(&victim) && e.contains("missing"), "{e}");
}

fn expect_checkpoint_error(
    path: &std::path::Path,
    needle: &str,
    kind: CheckpointErrorKind,
) -> Error {
    let e = Checkpoint::load(path).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "error does not name the file: {text}"
    );
    assert!(text.contains(needle), "{text}");
    crate::common::assert_checkpoint_kind(&e, kind, None);
    e
}

#[test]
fn corrupt_truncated_and_wrong_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let mut ema = new_cpu();
    cpu_ema(1..=2, &mut ema);
    checkpoint::save_training(&good, &ema, Some(&params_at(2)), &HostTensors::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
    expect_checkpoint_error(
        &truncated,
        "not a valid safetensors file",
        CheckpointErrorKind::Truncated,
    );

    let short = dir.path().join("short.safetensors");
    std::fs::write(&short, &bytes[..6]).unwrap();
    expect_checkpoint_error(
        &short,
        "not a valid safetensors file",
        CheckpointErrorKind::Truncated,
    );

    let garbage = dir.path().join("garbage.safetensors");
    let mut g = bytes.clone();
    g[8..16].copy_from_slice(b"#!garbag");
    std::fs::write(&garbage, &g).unwrap();
    expect_checkpoint_error(
        &garbage,
        "not a valid safetensors file",
        CheckpointErrorKind::Format,
    );

    let huge_header = dir.path().join("huge.safetensors");
    let mut h = bytes.clone();
    h[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&huge_header, &h).unwrap();
    expect_checkpoint_error(
        &huge_header,
        "not a valid safetensors file",
        CheckpointErrorKind::Format,
    );
    // A header that would end past the file: the file was cut inside its header.
    let cut = dir.path().join("cut.safetensors");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    std::fs::write(&cut, &bytes[..8 + header_len / 2]).unwrap();
    expect_checkpoint_error(&cut, "header of", CheckpointErrorKind::Truncated);

    // A wrong dtype, written by the safetensors crate itself.
    let f64_path = dir.path().join("f64.safetensors");
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2], &data).unwrap();
    safetensors::serialize_to_file([("weight/ExponentialMovingAverage", view)], None, &f64_path)
        .unwrap();
    let e = expect_checkpoint_error(
        &f64_path,
        "weight/ExponentialMovingAverage",
        CheckpointErrorKind::Dtype,
    );
    crate::common::assert_checkpoint_kind(
        &e,
        CheckpointErrorKind::Dtype,
        Some("weight/ExponentialMovingAverage"),
    );

    let missing = dir.path().join("nope.safetensors");
    let e = Checkpoint::load(&missing).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("nope.safetensors"),
        "{e}"
    );
}

#[test]
fn restore_checks_everything_before_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut ema = new_cpu();
    cpu_ema(1..=4, &mut ema);
    let before = ema.shadows();
    let write = |name: &str, entries: Vec<(&str, Vec<usize>, Vec<f32>)>, meta: &[(&str, &str)]| {
        let path = dir.path().join(name);
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|(n, s, v)| Entry {
                name: n.into(),
                shape: s,
                produce: Box::new(move || Ok(v.clone())),
            })
            .collect();
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        checkpoint::write_safetensors(&path, entries, &meta).unwrap();
        Checkpoint::load(&path).unwrap()
    };
    fn ok(n: &str) -> (&str, Vec<usize>, Vec<f32>) {
        let spec = specs().into_iter().find(|s| s.shadow_name() == n).unwrap();
        (n, spec.shape.clone(), vec![1.0f32; spec.numel() as usize])
    }
    let n = [("num_updates", "7")];
    // The last tensor is wrong: nothing may have been written from the first two.
    let shape = write(
        "shape.safetensors",
        vec![
            ok("bias/ExponentialMovingAverage"),
            ok("embed/ExponentialMovingAverage"),
            (
                "weight/ExponentialMovingAverage",
                vec![1, 2],
                vec![1.0, 1.0],
            ),
        ],
        &n,
    );
    let e = ema.restore(&shape).unwrap_err();
    crate::common::assert_checkpoint_kind(
        &e,
        CheckpointErrorKind::Shape,
        Some("weight/ExponentialMovingAverage"),
    );
    let e = e.to_string();
    assert!(
        e.contains("weight/ExponentialMovingAverage") && e.contains("shape"),
        "{e}"
    );
    let missing = write(
        "missing.safetensors",
        vec![
            ok("bias/ExponentialMovingAverage"),
            ok("embed/ExponentialMovingAverage"),
        ],
        &n,
    );
    let e = ema.restore(&missing).unwrap_err();
    crate::common::assert_checkpoint_kind(
        &e,
        CheckpointErrorKind::MissingTensor,
        Some("weight/ExponentialMovingAverage"),
    );
    let e = e.to_string();
    assert!(
        e.contains("weight/ExponentialMovingAverage") && e.contains("missing"),
        "{e}"
    );
    let unexpected = write(
        "unexpected.safetensors",
        vec![
            ok("bias/ExponentialMovingAverage"),
            ok("embed/ExponentialMovingAverage"),
            ok("weight/ExponentialMovingAverage"),
            ("other/ExponentialMovingAverage", vec![1], vec![0.0]),
        ],
        &n,
    );
    let e = ema.restore(&unexpected).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, CheckpointErrorKind::UnexpectedTensor, None);
    let e = e.to_string();
    assert!(
        e.contains("other/ExponentialMovingAverage") && e.contains("unexpected"),
        "{e}"
    );
    let no_counter = write(
        "nocounter.safetensors",
        vec![
            ok("bias/ExponentialMovingAverage"),
            ok("embed/ExponentialMovingAverage"),
            ok("weight/ExponentialMovingAverage"),
        ],
        &[],
    );
    let e = ema.restore(&no_counter).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, CheckpointErrorKind::Metadata, None);
    assert!(e.to_string().contains("num_updates"));
    assert_eq!(ema.shadows(), before, "failed restores changed nothing");
    assert_eq!(ema.num_updates(), 4);
}

#[test]
fn gpu_restore_failure_changes_nothing() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let arena = ParamArena::new(&ctx.device, specs()).unwrap();
    for (spec, v) in params_at(0).iter() {
        arena.write(&ctx.queue, &spec.name, v).unwrap();
    }
    let mut ema = GpuEma::builder(Schedule::tf(0.99))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.update().unwrap();
    let before = ema.read_shadows_blocking().unwrap();
    // A checkpoint of a model whose `embed` has another shape.
    let mut other = CpuEma::new(Schedule::tf(0.99), Numerics::Exact).unwrap();
    other
        .track(TensorSpec::new("weight", [2, 1]), &[1.0, 2.0])
        .unwrap();
    other.track(TensorSpec::new("bias", []), &[3.0]).unwrap();
    other
        .track(TensorSpec::new("embed", [3, 7]), &[4.0; 21])
        .unwrap();
    let path = dir.path().join("other.safetensors");
    let p = other.shadows();
    checkpoint::save_training(&path, &other, Some(&p), &HostTensors::new()).unwrap();
    let e = ema
        .restore(&Checkpoint::load(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("embed/ExponentialMovingAverage"), "{e}");
    assert_eq!(ema.read_shadows_blocking().unwrap(), before);
    assert_eq!(ema.num_updates(), 1);
}

#[test]
fn a_save_failing_halfway_leaves_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut ema = new_cpu();
    cpu_ema(1..=3, &mut ema);
    checkpoint::save_training(&path, &ema, Some(&params_at(3)), &momentum()).unwrap();
    let good = std::fs::read(&path).unwrap();

    // A writer whose second tensor fails (a GPU readback error, a full disk...).
    struct Failing<'a>(&'a CpuEma);
    impl EmaState for Failing<'_> {
        fn specs(&self) -> Vec<TensorSpec> {
            self.0.specs().to_vec()
        }
        fn num_updates(&self) -> u64 {
            99
        }
        fn schedule(&self) -> Schedule {
            self.0.schedule()
        }
        fn numerics(&self) -> Numerics {
            self.0.numerics()
        }
        fn read_shadow(&self, i: usize) -> wgpu_ema::Result<Vec<f32>> {
            if i == 1 {
                Err(Error::Readback("device lost (simulated)".into()))
            } else {
                EmaState::read_shadow(self.0, i)
            }
        }
        fn read_param(&self, _: usize) -> wgpu_ema::Result<Option<Vec<f32>>> {
            Ok(None)
        }
    }
    cpu_ema(4..=6, &mut ema);
    let e = checkpoint::save_training(&path, &Failing(&ema), Some(&params_at(6)), &momentum())
        .unwrap_err();
    assert!(e.to_string().contains("simulated"), "{e}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the previous checkpoint is intact"
    );
    assert_eq!(Checkpoint::load(&path).unwrap().num_updates().unwrap(), 3);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files are removed: {leftovers:?}"
    );

    // A save into a directory that does not exist fails cleanly too.
    let e = checkpoint::save_training(
        dir.path().join("no/such/dir.safetensors"),
        &ema,
        Some(&params_at(6)),
        &momentum(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}
