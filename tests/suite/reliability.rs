//! Nothing lost, nothing silently wrong: checksummed checkpoints under random bit flips,
//! sharded and single-file saves killed at random points, refusals of what would corrupt the
//! GPU state, names that cannot break a file, sizes that overflow.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{buffer_with, gpu, random};
use wgpu_ema::checkpoint::{self, Checkpoint, RestoreOptions};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{Error, GpuEma, HostTensors, Numerics, ParamArena, Schedule, TensorSpec};

fn cpu_state(step: u64, schedule: Schedule) -> CpuEma {
    let mut ema = CpuEma::new(schedule, Numerics::Exact).unwrap();
    for (i, (name, n)) in [("w", 37usize), ("b", 5), ("e", 64)].iter().enumerate() {
        ema.track(
            TensorSpec::new(*name, [*n]),
            &random(step * 3 + i as u64, *n),
        )
        .unwrap();
    }
    ema.set_num_updates(step);
    ema
}

fn params(ema: &CpuEma) -> HostTensors {
    ema.shadows()
}

#[test]
fn bit_flips_in_a_saved_checkpoint_are_refused_or_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let ema = cpu_state(7, Schedule::tf(0.99));
    checkpoint::save_training(&path, &ema, Some(&params(&ema)), &HostTensors::new()).unwrap();
    let good = Checkpoint::load(&path).unwrap();
    assert!(good.verified());
    let bytes = std::fs::read(&path).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rng = fastrand::Rng::with_seed(99);
    let (mut refused, mut same) = (0, 0);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        let at = rng.usize(..b.len());
        b[at] ^= 1 << rng.u8(0..8);
        let bad = dir.path().join("flipped.safetensors");
        std::fs::write(&bad, &b).unwrap();
        match Checkpoint::load(&bad) {
            Err(e) => {
                assert!(e.to_string().contains("flipped.safetensors"), "{e}");
                if at >= data_start {
                    // A flipped value is caught by its tensor's checksum, and says so.
                    crate::common::assert_checkpoint_kind(
                        &e,
                        wgpu_ema::CheckpointErrorKind::Checksum,
                        None,
                    );
                }
                refused += 1;
            }
            Ok(c) => {
                // Only a flip that changes nothing that is read may load (header padding).
                assert_eq!(c.metadata(), good.metadata(), "flip at byte {at}");
                for name in good.names() {
                    assert_eq!(c.get(name), good.get(name), "flip at byte {at}: `{name}`");
                }
                same += 1;
            }
        }
    }
    assert!(refused > 2900, "{refused} refused, {same} unchanged");
}

#[test]
fn files_without_checksums_are_refused_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    safetensors::serialize_to_file([("x", view)], None, &path).unwrap();
    let e = Checkpoint::load(&path).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
    assert!(e.to_string().contains("load_unverified"), "{e}");
    let e = checkpoint::TensorFile::open(&path).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
    let c = Checkpoint::load_unverified(&path).unwrap();
    assert!(!c.verified());
    assert_eq!(c.get("x").unwrap().1, &[1.0, 2.0]);
}

/// The edit that used to switch verification off: one byte changed in each of the two keys
/// that say "ours" (`wgpu_ema_version`, `wgpu_ema_crc32c`), plus a flipped data bit; and the
/// whole `__metadata__` dropped. Each is refused by default; only the explicit unverified read
/// takes the file, and says so.
#[test]
fn checksums_cannot_be_switched_off_by_editing_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let ema = cpu_state(4, Schedule::tf(0.99));
    checkpoint::save_training(&path, &ema, Some(&params(&ema)), &HostTensors::new()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let rename = |bytes: &mut Vec<u8>, key: &str| {
        let at = bytes[..8 + header_len]
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap();
        bytes[at + key.len() - 1] ^= 0x01; // `wgpu_ema_versioo`, `wgpu_ema_crc32b`
    };
    let mut edited = good.clone();
    rename(&mut edited, checkpoint::META_VERSION);
    rename(&mut edited, checkpoint::META_CHECKSUMS);
    let last = edited.len() - 1;
    edited[last] ^= 0x40;
    std::fs::write(&path, &edited).unwrap();
    let e = Checkpoint::load(&path).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
    let e = Checkpoint::from_bytes(edited.clone()).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
    let e = checkpoint::TensorFile::open(&path).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
    let mut back = cpu_state(0, Schedule::tf(0.99));
    assert!(Checkpoint::load(&path)
        .and_then(|c| back.restore(&c))
        .is_err());
    // Asked for, the file loads, and says it was not verified.
    let c = Checkpoint::load_unverified(&path).unwrap();
    assert!(!c.verified());

    // No metadata at all (what a careless re-save by another tool leaves).
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().collect();
    let bare = safetensors::serialize(views, None).unwrap();
    let e = Checkpoint::from_bytes(bare).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Unverified, None);
}

/// A checkpoint read once and verified in memory: truncating or rewriting the file afterwards
/// changes nothing that was loaded (a memory-mapped checkpoint would fault on the next read).
#[test]
fn a_file_changed_after_loading_cannot_fault_or_change_what_was_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let ema = cpu_state(4, Schedule::tf(0.99));
    checkpoint::save_training(&path, &ema, Some(&params(&ema)), &HostTensors::new()).unwrap();
    let c = Checkpoint::load(&path).unwrap();
    let before: Vec<Vec<f32>> = c.names().map(|n| c.get(n).unwrap().1.to_vec()).collect();
    // Truncated in place (not replaced): the same inode.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(16)
        .unwrap();
    let after: Vec<Vec<f32>> = c.names().map(|n| c.get(n).unwrap().1.to_vec()).collect();
    assert_eq!(before, after);
    let mut back = cpu_state(0, Schedule::tf(0.99));
    back.restore(&c).unwrap();
    assert_eq!(back.shadows(), ema.shadows());
    // Loading it now is an error, not a fault.
    assert!(Checkpoint::load(&path).is_err());
}

/// A file shrinking while it is read: each load either gets the whole verified checkpoint or
/// an error, never a crash (seeded timing, 30 rounds).
#[test]
fn a_file_truncated_while_being_loaded_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let mut ema = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
    ema.track(TensorSpec::new("w", [8 << 20]), &random(7, 8 << 20))
        .unwrap();
    checkpoint::save_training(&path, &ema, Some(&params(&ema)), &HostTensors::new()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut whole, mut refused) = (0, 0);
    for _ in 0..30 {
        std::fs::write(&path, &good).unwrap();
        let delay = Duration::from_micros(rng.u64(0..30_000));
        let p = path.clone();
        let cut = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(1 << 20).unwrap();
        });
        match Checkpoint::load(&path) {
            Ok(c) => {
                assert_eq!(
                    c.get("w/ExponentialMovingAverage").unwrap().1,
                    ema.shadow("w").unwrap()
                );
                whole += 1;
            }
            Err(_) => refused += 1,
        }
        cut.join().unwrap();
    }
    eprintln!("truncated while loading: {whole} whole, {refused} refused");
    assert!(
        refused > 0,
        "no load met the truncation: the test checks nothing"
    );
}

#[test]
fn restore_refuses_another_configuration_and_non_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let mut saved = cpu_state(3, Schedule::tf(0.99));
    checkpoint::save_training(&path, &saved, Some(&params(&saved)), &HostTensors::new()).unwrap();
    let c = Checkpoint::load(&path).unwrap();
    let mut other = cpu_state(0, Schedule::tf(0.999));
    let e = other.restore(&c).unwrap_err();
    crate::common::assert_checkpoint_kind(&e, wgpu_ema::CheckpointErrorKind::Config, None);
    assert!(e.to_string().contains("schedule differs"), "{e}");
    let opts = RestoreOptions {
        allow_config_mismatch: true,
        ..Default::default()
    };
    other.restore_with(&c, opts).unwrap();
    assert_eq!(other.num_updates(), 3);

    let mut nan = saved.shadow("b").unwrap().to_vec();
    nan[2] = f32::NAN;
    saved.set_shadow("b", &nan).unwrap();
    checkpoint::save_training(&path, &saved, Some(&params(&saved)), &HostTensors::new()).unwrap();
    let c = Checkpoint::load(&path).unwrap();
    let mut same = cpu_state(0, Schedule::tf(0.99));
    let e = same.restore(&c).unwrap_err();
    crate::common::assert_checkpoint_kind(
        &e,
        wgpu_ema::CheckpointErrorKind::NonFinite,
        Some("b/ExponentialMovingAverage"),
    );
    assert!(e.to_string().contains("element 2 is NaN"), "{e}");
    let opts = RestoreOptions {
        allow_non_finite: true,
        ..Default::default()
    };
    same.restore_with(&c, opts).unwrap();
    assert!(same.shadow("b").unwrap()[2].is_nan());
}

#[test]
fn names_that_would_break_a_file_are_refused_before_writing() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 64), 0);
    let build = |names: &[&str], k: usize| {
        let mut b = GpuEma::builder(Schedule::constant(0.9));
        for _ in 1..k {
            b = b.extra_ema(Schedule::constant(0.5));
        }
        for (i, n) in names.iter().enumerate() {
            b = b.track_buffer(TensorSpec::new(*n, [4]), &buf, 16 * i as u64);
        }
        b.build(&ctx.device, &ctx.queue)
    };
    for (names, k) in [
        (&["a", "a/ExponentialMovingAverage"][..], 1),
        (&["a/ExponentialMovingAverage", "a"][..], 1),
        (&["x", "x/ExponentialMovingAverage_1"][..], 2),
        (&["__metadata__"][..], 1),
        // Alone, names shaped like a shadow's: they saved, but read back as the shadow of an
        // untracked tensor.
        (&["b/ExponentialMovingAverage"][..], 1),
        (&["b/ExponentialMovingAverage_3"][..], 1),
        (&["b/ExponentialMovingAverage/Compensation"][..], 1),
        (&["_WGPU_EMA_CHECKSUMS"][..], 1),
    ] {
        let e = build(names, k).unwrap_err();
        assert!(matches!(e, Error::NameCollision { .. }), "{names:?}: {e}");
    }
    // Names that only look alike are fine.
    build(
        &["b/ExponentialMovingAverageX", "c/ExponentialMovingAverage_"],
        1,
    )
    .unwrap();
    let mut cpu = CpuEma::new(Schedule::tf(0.9), Numerics::Exact).unwrap();
    let e = cpu
        .track(
            TensorSpec::new("b/ExponentialMovingAverage", [2]),
            &[1.0, 2.0],
        )
        .unwrap_err();
    assert!(matches!(e, Error::NameCollision { .. }), "{e}");
    // The CPU path and extra tensors: refused by the save, which writes nothing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.safetensors");
    let ema = cpu_state(1, Schedule::tf(0.9));
    let mut extra = HostTensors::new();
    extra
        .insert(
            TensorSpec::new("w/ExponentialMovingAverage", [37]),
            random(5, 37),
        )
        .unwrap();
    let e = checkpoint::save_training(&path, &ema, Some(&params(&ema)), &extra).unwrap_err();
    assert!(matches!(e, Error::NameCollision { .. }), "{e}");
    let mut extra = HostTensors::new();
    extra
        .insert(TensorSpec::new("__metadata__", [1]), vec![1.0])
        .unwrap();
    assert!(checkpoint::save_training(&path, &ema, Some(&params(&ema)), &extra).is_err());
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary left"
    );
}

#[test]
fn swapped_state_refuses_what_would_land_in_exchanged_buffers() {
    let Some(ctx) = gpu() else { return };
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [10])]).unwrap();
    arena.write(&ctx.queue, "w", &random(2, 10)).unwrap();
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.update().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    checkpoint::save_training(
        &path,
        &ema.snapshot(true).unwrap(),
        None,
        &HostTensors::new(),
    )
    .unwrap();
    let c = Checkpoint::load(&path).unwrap();
    ema.swap().unwrap();
    let mut p = HostTensors::new();
    p.insert(TensorSpec::new("w", [10]), random(3, 10)).unwrap();
    assert!(matches!(ema.snapshot(false), Err(Error::Swapped)));
    assert!(matches!(ema.restore(&c), Err(Error::Swapped)));
    assert!(matches!(
        ema.write_shadow("w", &[0.0; 10]),
        Err(Error::Swapped)
    ));
    assert!(matches!(ema.write_params(&p), Err(Error::Swapped)));
    assert!(matches!(ema.update(), Err(Error::Swapped)));
    ema.swap().unwrap();
    ema.restore(&c).unwrap();
    ema.write_params(&p).unwrap();
}

#[test]
fn overlapping_tensors_are_refused_at_build_and_after_a_rebind() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(4, 64), 0);
    let e = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(TensorSpec::new("a", [8]), &buf, 0)
        .track_buffer(TensorSpec::new("b", [8]), &buf, 28)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::Overlap { .. }), "{e}");
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(TensorSpec::new("a", [8]), &buf, 0)
        .track_buffer(TensorSpec::new("b", [8]), &buf, 32)
        .track_buffer(TensorSpec::new("empty", [0]), &buf, 4)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.update().unwrap();
    // A framework may pass through an overlap while moving tensors: refused at the next step.
    ema.rebind("b", &buf, 16).unwrap();
    assert!(matches!(ema.update(), Err(Error::Overlap { .. })));
    ema.rebind("a", &buf, 128).unwrap();
    ema.update().unwrap();
}

#[test]
fn zero_element_tensors_and_overflowing_shapes() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(6, 16), 0);
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(TensorSpec::new("empty", [3, 0]), &buf, 0)
        .track_buffer(TensorSpec::new("x", [16]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.update().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.safetensors");
    checkpoint::save_training(
        &path,
        &ema.snapshot(true).unwrap(),
        None,
        &HostTensors::new(),
    )
    .unwrap();
    let c = Checkpoint::load(&path).unwrap();
    assert_eq!(c.get("empty/ExponentialMovingAverage").unwrap().0, &[3, 0]);
    ema.restore(&c).unwrap();

    let huge = TensorSpec::new("huge", [usize::MAX, 4]);
    assert_eq!(huge.try_numel(), None);
    let e = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(huge.clone(), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e}");
    assert!(ParamArena::new(&ctx.device, [huge]).is_err());
    assert!(Schedule::power_sigma_rel(1e-200).is_err());
}

/// How the kill and two-writer tests save.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Single,
    Sharded,
    /// TensorFlow's format, always to one prefix (`latest`).
    TfSamePrefix,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Sharded => "sharded",
            Mode::TfSamePrefix => "tf",
        }
    }

    /// What a load of the folder names: the file, the index, or (TensorFlow) the folder
    /// itself, through its `checkpoint` state file.
    fn target(self, dir: &Path) -> std::path::PathBuf {
        match self {
            Mode::Single => dir.join("c.safetensors"),
            Mode::Sharded => dir.join(checkpoint::INDEX_FILE),
            Mode::TfSamePrefix => dir.to_path_buf(),
        }
    }

    /// One save of `ema` into `dir`.
    fn save(self, dir: &Path, ema: &CpuEma) -> wgpu_ema::Result<()> {
        let p = params(ema);
        let none = HostTensors::new();
        match self {
            Mode::Single => {
                checkpoint::save_training(dir.join("c.safetensors"), ema, Some(&p), &none)
            }
            Mode::Sharded => {
                checkpoint::save_training_sharded(dir, ema, Some(&p), &none, 9000).map(|_| ())
            }
            Mode::TfSamePrefix => checkpoint::save_tf(dir.join("latest"), ema, Some(&p), &none),
        }
    }
}

/// The child of the kill and two-writer tests: saves checkpoints in a loop (every tensor of
/// step `s` filled with `s`) until killed. Runs only when the parent sets `WGPU_EMA_SAVE_LOOP`;
/// a save refused because another writer holds the folder is said and skipped.
#[test]
fn save_loop_child() {
    let Ok(dir) = std::env::var("WGPU_EMA_SAVE_LOOP") else {
        return;
    };
    let mode = match std::env::var("WGPU_EMA_SAVE_MODE").as_deref() {
        Ok("sharded") => Mode::Sharded,
        Ok("tf") => Mode::TfSamePrefix,
        _ => Mode::Single,
    };
    let start: u64 = std::env::var("WGPU_EMA_SAVE_START").map_or(1, |s| s.parse().unwrap_or(1));
    for step in start.. {
        let mut ema = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
        for (i, n) in [3000usize, 2000, 1000, 500].iter().enumerate() {
            ema.track(
                TensorSpec::new(format!("t{i}"), [*n]),
                &vec![step as f32; *n],
            )
            .unwrap();
        }
        ema.set_num_updates(step);
        // The parent reads these lines to kill inside a save and to know which saves ended.
        println!("saving {step}");
        match mode.save(Path::new(&dir), &ema) {
            Ok(()) => println!("saved {step}"),
            Err(Error::Checkpoint {
                kind: wgpu_ema::CheckpointErrorKind::Busy,
                ..
            }) => println!("busy {step}"),
            Err(e) => panic!("{e}"),
        }
    }
}

/// Loads what the killed child left: a whole checkpoint of one step, never a mix. Returns
/// that step.
fn check_consistent(path: &Path) -> u64 {
    let c = Checkpoint::load(path).unwrap_or_else(|e| panic!("after a kill: {e}"));
    let step = c.num_updates().unwrap();
    let n = step as f32;
    for name in c.names() {
        let (_, v) = c.get(name).unwrap();
        assert!(
            v.iter().all(|&x| x == n),
            "`{name}` is not from step {n}: torn checkpoint"
        );
    }
    step
}

/// What a child said: the steps whose save it started and ended, with the time each line
/// arrived.
#[derive(Default)]
struct Progress {
    started: Vec<(u64, std::time::Instant)>,
    ended: Vec<(u64, std::time::Instant)>,
}

impl Progress {
    fn take(&mut self, line: &str, at: std::time::Instant) {
        let mut words = line.split_whitespace();
        let (Some(what), Some(step)) = (words.next(), words.next()) else {
            return;
        };
        let Ok(step) = step.parse() else { return };
        match what {
            "saving" => self.started.push((step, at)),
            "saved" => self.ended.push((step, at)),
            _ => {}
        }
    }
}

/// The test binary running [`save_loop_child`] into `dir` from step `start`.
fn save_loop(dir: &Path, mode: Mode, start: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "reliability::save_loop_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WGPU_EMA_SAVE_LOOP", dir)
        .env("WGPU_EMA_SAVE_START", start.to_string())
        .env("WGPU_EMA_SAVE_MODE", mode.name())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn kill_during_saves(mode: Mode) {
    let sharded = mode == Mode::Sharded;
    let dir = tempfile::tempdir().unwrap();
    let target = mode.target(dir.path());
    let mut rng = fastrand::Rng::with_seed(match mode {
        Mode::Sharded => 1,
        Mode::Single => 2,
        Mode::TfSamePrefix => 3,
    });
    let mut start = 1u64;
    let rounds = 100;
    let mut inside = 0;
    for _ in 0..rounds {
        let mut child = save_loop(dir.path(), mode, start);
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((std::time::Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        // Learn how long a save takes from two whole ones, then kill at a random point of
        // the next: after it says it started, within the time a save takes.
        let mut seen = Progress::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let kill_after = loop {
            let (at, line) = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("the child stopped saving");
            seen.take(&line, at);
            if seen.ended.len() >= 2 && line.starts_with("saving") {
                let took: Vec<Duration> = seen
                    .ended
                    .iter()
                    .filter_map(|(s, end)| {
                        let (_, begin) = seen.started.iter().find(|(b, _)| b == s)?;
                        Some(end.duration_since(*begin))
                    })
                    .collect();
                let longest = took
                    .iter()
                    .max()
                    .copied()
                    .unwrap_or(Duration::from_millis(1));
                break longest.mul_f64(rng.f64());
            }
        };
        std::thread::sleep(kill_after);
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        for (at, line) in rx.try_iter() {
            seen.take(&line, at);
        }
        let last_started = seen.started.iter().map(|s| s.0).max().unwrap_or(0);
        let last_ended = seen.ended.iter().map(|s| s.0).max().unwrap_or(0);
        if last_started > last_ended {
            inside += 1;
        }
        // The survivor is the last save that ended, or the one under way if it got as far
        // as its commit before the kill; never older, never a mix.
        let survivor = check_consistent(&target);
        assert!(
            survivor == last_ended || survivor == last_started,
            "after a kill the checkpoint is of step {survivor}; the child had ended the save \
             of {last_ended} and started {last_started}"
        );
        start += 1000;
    }
    // Most kills must land inside a save, or the test checks little.
    assert!(
        inside * 2 >= rounds,
        "only {inside} of {rounds} kills landed inside a save"
    );
    eprintln!("kills inside a save: {inside} of {rounds} ({mode:?})");
    // The next save removes what the killed saves left behind.
    let mut ema = CpuEma::new(Schedule::constant(0.9), Numerics::Exact).unwrap();
    ema.track(TensorSpec::new("t0", [4]), &[1.0; 4]).unwrap();
    ema.set_num_updates(1);
    mode.save(dir.path(), &ema).unwrap();
    check_consistent(&target);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.contains(".tmp-")
                || (sharded && n.starts_with("model-") && !n.contains("-00001-of-00001"))
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    if mode == Mode::TfSamePrefix {
        // Only the data files the index names: one, or two (the second empty).
        let mut data: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("latest.data-"))
            .collect();
        data.sort();
        assert!(
            data == ["latest.data-00000-of-00001"]
                || data == ["latest.data-00000-of-00002", "latest.data-00001-of-00002"],
            "data files left: {data:?}"
        );
    }
}

#[test]
fn sharded_saves_killed_at_random_points_never_load_torn() {
    kill_during_saves(Mode::Sharded);
}

#[test]
fn single_file_saves_killed_at_random_points_never_load_torn() {
    kill_during_saves(Mode::Single);
}

#[test]
fn tensorflow_saves_to_one_prefix_killed_at_random_points_never_load_torn() {
    kill_during_saves(Mode::TfSamePrefix);
}

/// Two processes saving into one folder at once: one holds the folder's lock while it saves,
/// the other's save is refused (`Busy`) rather than deleting the first one's files; whatever
/// the timing, the folder loads as one whole checkpoint afterwards.
fn two_writers(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let mut busy = 0;
    let mut saved = 0;
    for round in 0..4u64 {
        let mut children: Vec<_> = (0..2u64)
            .map(|k| save_loop(dir.path(), mode, 1 + 1_000_000 * (2 * round + k)))
            .collect();
        std::thread::sleep(Duration::from_millis(600));
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut children {
            use std::io::Read;
            let mut out = String::new();
            let _ = c.stdout.take().unwrap().read_to_string(&mut out);
            busy += out.lines().filter(|l| l.starts_with("busy")).count();
            saved += out.lines().filter(|l| l.starts_with("saved")).count();
        }
        check_consistent(&mode.target(dir.path()));
    }
    eprintln!("two writers ({mode:?}): {saved} saves, {busy} refused as busy");
    assert!(
        saved > 0 && busy > 0,
        "{saved} saved, {busy} busy: the writers never met"
    );
}

#[test]
fn two_writers_in_one_folder_never_break_a_sharded_checkpoint() {
    two_writers(Mode::Sharded);
}

#[test]
fn two_writers_in_one_folder_never_break_a_tensorflow_checkpoint() {
    two_writers(Mode::TfSamePrefix);
}

#[test]
fn a_destroyed_device_is_an_error_not_a_panic() {
    // A device of its own: the shared one serves the other tests.
    let Some(_) = gpu() else { return };
    let ctx = wgpu_ema::GpuContext::new().unwrap();
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [10])]).unwrap();
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    ema.update().unwrap();
    ctx.device.destroy();
    // Work submitted to a destroyed device may be dropped without a word (wgpu's choice); what
    // reads results back must fail, and nothing may panic.
    assert!(matches!(
        ema.read_shadows_blocking(),
        Err(Error::Device(_) | Error::Readback(_))
    ));
    // wgpu drops work on a destroyed device without an error; ours say so.
    assert!(matches!(ema.update(), Err(Error::Device(_))));
    assert!(matches!(ema.check_device(), Err(Error::Device(_))));
    assert!(matches!(ema.snapshot(false), Err(Error::Device(_))));
    assert!(matches!(ema.swap(), Err(Error::Device(_))));
    assert!(ema.read_shadow_blocking("w").is_err());
}

#[test]
fn a_buffer_of_another_device_is_an_error_not_a_panic() {
    let Some(ctx) = gpu() else { return };
    // A second device of the same instance (a validation error in wgpu), and a device of
    // another instance (unknown to this one: wgpu-core panics looking it up).
    let (sibling, _queue) = pollster::block_on(
        ctx.adapter
            .request_device(&wgpu::DeviceDescriptor::default()),
    )
    .unwrap();
    let other = wgpu_ema::GpuContext::new().unwrap();
    let foreign_buffer = |device: &wgpu::Device| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    for device in [&sibling, &other.device] {
        let foreign = foreign_buffer(device);
        let e = GpuEma::builder(Schedule::constant(0.9))
            .track_buffer(TensorSpec::new("w", [16]), &foreign, 0)
            .build(&ctx.device, &ctx.queue)
            .unwrap_err();
        assert!(
            matches!(&e, Error::OtherDevice { name, .. } if name == "w"),
            "{e}"
        );
    }
    let foreign = foreign_buffer(&sibling);
    // Moved onto another device's buffer: refused, and the EMA keeps working where it was.
    let ours = crate::common::buffer_with(ctx, &crate::common::random(3, 16), 0);
    let mut ema = GpuEma::builder(Schedule::constant(0.5))
        .track_buffer(TensorSpec::new("w", [16]), &ours, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let e = ema.rebind("w", &foreign, 0).unwrap_err();
    assert!(
        matches!(&e, Error::OtherDevice { name, .. } if name == "w"),
        "{e}"
    );
    ema.update().unwrap();
    assert_eq!(
        ema.read_shadow_blocking("w").unwrap(),
        crate::common::random(3, 16)
    );
}

#[test]
fn state_accessors_return_errors_for_a_bad_index() {
    use wgpu_ema::checkpoint::EmaState;
    let ema = cpu_state(1, Schedule::tf(0.9));
    assert!(ema.read_shadow(3).is_err());
    let Some(ctx) = gpu() else { return };
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [10])]).unwrap();
    let g = GpuEma::builder(Schedule::constant(0.9))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let s = g.snapshot(true).unwrap();
    assert!(s.read_shadow(1).is_err() && s.read_param(1).is_err());
    assert!(s.read_compensation(7).is_err() && s.read_ema_shadow(1, 0).is_err());
}

#[test]
fn parser_errors_are_kept_as_sources() {
    use std::error::Error as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::load(&path).unwrap_err();
    assert!(e.source().is_some(), "{e}");
    assert!(
        e.to_string().contains("not a valid safetensors file"),
        "{e}"
    );
}

/// A folder lock just released is not reported `Busy` because a child process forked by
/// another thread still shares the locked file (until it starts its program): the child here
/// waits 500 ms between its fork and its exec, and the next writer gets the folder at once.
#[cfg(unix)]
#[test]
fn a_released_lock_shared_with_a_forking_child_is_not_busy() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let held = checkpoint::FolderLock::try_acquire(dir.path()).unwrap();
    let child = std::thread::spawn(|| {
        let mut cmd = Command::new("true");
        // SAFETY: the hook only sleeps (nanosleep is async-signal-safe).
        unsafe {
            cmd.pre_exec(|| {
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            });
        }
        cmd.status()
    });
    // The child has forked (sharing the locked file) well within 50 ms.
    std::thread::sleep(Duration::from_millis(50));
    drop(held);
    let again = checkpoint::FolderLock::try_acquire(dir.path());
    assert!(again.is_ok(), "{:?}", again.err());
    drop(again);
    assert!(child.join().unwrap().unwrap().success());
}
