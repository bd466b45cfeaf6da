//! TensorFlow's checkpoint format both ways: a checkpoint TensorFlow 2.21 wrote
//! (`tests/data/tf_ckpt`, made by `tests/data/make_tf_checkpoint.py`) loads bit for bit without
//! TensorFlow; ours load back; damaged ones are errors naming the file and the tensor.

use std::path::{Path, PathBuf};

use wgpu_ema::checkpoint::{self, Checkpoint};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{HostTensors, Numerics, Schedule, TensorSpec};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tf_ckpt")
}

#[test]
fn tensorflow_written_checkpoint_loads_bit_for_bit() {
    let expected = std::fs::read_to_string(fixture().join("expected.txt")).unwrap();
    // By prefix, and by its .index file.
    for path in [fixture().join("ckpt-7"), fixture().join("ckpt-7.index")] {
        let c = Checkpoint::load(&path).unwrap();
        assert!(c.verified());
        assert_eq!(c.num_updates().unwrap(), 7);
        let mut seen = 0;
        for line in expected.lines() {
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap();
            let rest: Vec<&str> = parts.collect();
            if rest.contains(&"int") {
                continue; // global_step, checked above
            }
            let words: Vec<u32> = rest
                .iter()
                .filter(|w| w.len() == 8 && !w.contains('['))
                .map(|w| u32::from_str_radix(w, 16).unwrap())
                .collect();
            let (_, values) = c.get(name).unwrap_or_else(|| panic!("`{name}` missing"));
            let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, words, "`{name}`");
            seen += 1;
        }
        assert_eq!(seen, 6);
    }
}

fn state(step: u64) -> (CpuEma, HostTensors, HostTensors) {
    let mut ema = CpuEma::new(Schedule::tf(0.9999), Numerics::TensorFlow).unwrap();
    ema.track(TensorSpec::new("weight", [2, 1]), &[0.5, -0.25])
        .unwrap();
    ema.track(TensorSpec::new("bias", []), &[0.1]).unwrap();
    ema.update_at(step, &[&[0.7, -0.5], &[0.3]]).unwrap();
    let mut params = HostTensors::new();
    params
        .insert(TensorSpec::new("weight", [2, 1]), vec![0.7, -0.5])
        .unwrap();
    params
        .insert(TensorSpec::new("bias", []), vec![0.3])
        .unwrap();
    let mut extra = HostTensors::new();
    extra
        .insert(TensorSpec::new("weight/Momentum", [2, 1]), vec![0.01, 0.02])
        .unwrap();
    extra
        .insert(TensorSpec::new("bias/Momentum", []), vec![-0.03])
        .unwrap();
    (ema, params, extra)
}

#[test]
fn our_tensorflow_checkpoint_round_trips_and_names_itself_latest() {
    let dir = tempfile::tempdir().unwrap();
    let (ema, params, extra) = state(3);
    for step in [1000u64, 2000] {
        let prefix = dir.path().join(format!("ckpt-{step:08}"));
        checkpoint::save_tf(&prefix, &ema, Some(&params), &extra).unwrap();
    }
    let state_file = std::fs::read_to_string(dir.path().join(checkpoint::STATE_FILE)).unwrap();
    assert!(
        state_file.starts_with("model_checkpoint_path: \"ckpt-00002000\"\n"),
        "{state_file}"
    );
    assert!(state_file.contains("all_model_checkpoint_paths: \"ckpt-00001000\""));
    let c = Checkpoint::load(dir.path().join("ckpt-00002000")).unwrap();
    assert_eq!(c.num_updates().unwrap(), 3);
    let names: Vec<&str> = c.names().collect();
    assert_eq!(
        names,
        [
            "bias",
            "bias/ExponentialMovingAverage",
            "bias/Momentum",
            "weight",
            "weight/ExponentialMovingAverage",
            "weight/Momentum"
        ]
    );
    assert_eq!(
        c.get("weight/ExponentialMovingAverage").unwrap().1,
        ema.shadow("weight").unwrap()
    );
    // A resume from it continues where the EMA was (TensorFlow files carry no schedule).
    let mut back = CpuEma::new(Schedule::tf(0.9999), Numerics::TensorFlow).unwrap();
    back.track(TensorSpec::new("weight", [2, 1]), &[0.0, 0.0])
        .unwrap();
    back.track(TensorSpec::new("bias", []), &[0.0]).unwrap();
    back.restore(&c).unwrap();
    assert_eq!(back.shadows(), ema.shadows());
    assert_eq!(back.num_updates(), 3);
}

fn expect_error(path: &Path, needles: &[&str]) {
    let e = Checkpoint::load(path).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

#[test]
fn damaged_tensorflow_checkpoints_are_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (ema, params, extra) = state(2);
    let prefix = dir.path().join("ckpt");
    checkpoint::save_tf(&prefix, &ema, Some(&params), &extra).unwrap();
    let data = dir.path().join("ckpt.data-00000-of-00001");
    let index = dir.path().join("ckpt.index");
    let (good_data, good_index) = (
        std::fs::read(&data).unwrap(),
        std::fs::read(&index).unwrap(),
    );

    // A flipped byte in the data: the tensor stored there fails its checksum.
    let mut d = good_data.clone();
    d[0] ^= 1; // the first tensor in key order: `bias`
    std::fs::write(&data, &d).unwrap();
    expect_error(&prefix, &["ckpt.data-00000-of-00001", "`bias`", "checksum"]);
    std::fs::write(&data, &good_data).unwrap();

    // Every flipped bit of the index is refused or changes nothing that is read.
    let good = Checkpoint::load(&prefix).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..400 {
        let mut i = good_index.clone();
        let at = rng.usize(..i.len());
        i[at] ^= 1 << rng.u8(0..8);
        std::fs::write(&index, &i).unwrap();
        if let Ok(c) = Checkpoint::load(&prefix) {
            assert_eq!(
                c.names().collect::<Vec<_>>(),
                good.names().collect::<Vec<_>>(),
                "byte {at}"
            );
            for n in good.names() {
                assert_eq!(c.get(n), good.get(n), "byte {at}");
            }
            assert_eq!(c.num_updates().unwrap(), 2);
        }
    }
    std::fs::write(&index, &good_index).unwrap();

    // Truncated data, a missing shard.
    std::fs::write(&data, &good_data[..good_data.len() - 6]).unwrap();
    // (The last tensor in the file is what binds the others: `_WGPU_EMA_CHECKSUMS`.)
    expect_error(
        &prefix,
        &[
            "ckpt.data-00000-of-00001",
            "`_WGPU_EMA_CHECKSUMS`",
            "run past",
        ],
    );
    std::fs::remove_file(&data).unwrap();
    expect_error(&prefix, &["ckpt.data-00000-of-00001", "cannot be opened"]);
    // Not a table at all.
    std::fs::write(
        &index,
        b"definitely not a table, but long enough to have a footer at all",
    )
    .unwrap();
    expect_error(&prefix, &["ckpt.index", "magic"]);
}

#[test]
fn a_tensorflow_entry_edited_to_another_dtype_is_refused() {
    // The fixture's index with `bias`'s dtype rewritten from DT_FLOAT (1) to DT_DOUBLE (2):
    // the entry's first field is `08 01`. The block checksum then fails first; so rebuild the
    // checksum by saving our own table instead: write a checkpoint and patch its entry.
    let dir = tempfile::tempdir().unwrap();
    let (ema, params, extra) = state(2);
    let prefix = dir.path().join("ckpt");
    checkpoint::save_tf(&prefix, &ema, Some(&params), &extra).unwrap();
    let index = dir.path().join("ckpt.index");
    let mut bytes = std::fs::read(&index).unwrap();
    // The first tensor entry (`bias`) follows the header entry in the first block: find its
    // value's `08 01` and make it `08 02`, then fix the block's masked CRC32C.
    let at = bytes.windows(5).position(|w| w == b"bias\x08").unwrap() + 4;
    bytes[at + 1] = 2;
    let block_len = bytes.len() - 48 - 5 * 3 - 8 /* empty metaindex */ - index_block_len(&bytes);
    let crc = crc32c(&bytes[..block_len]);
    bytes[block_len + 1..block_len + 5].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&index, &bytes).unwrap();
    // TensorFlow's own checksum covers the bytes alone; what our save binds (name, dtype,
    // shape, size, checksum) refuses the edit, naming the tensor. (Another dtype in a file
    // TensorFlow wrote is listed, not read: the two-shard fixture below.)
    let e = Checkpoint::load(&prefix).unwrap_err();
    crate::common::assert_checkpoint_kind(
        &e,
        wgpu_ema::CheckpointErrorKind::Checksum,
        Some("bias"),
    );
    let e = e.to_string();
    for n in ["ckpt.index", "`bias`", "_WGPU_EMA_CHECKSUMS"] {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

#[test]
fn a_tensorflow_checkpoint_in_two_data_shards_loads() {
    // TF2's tf.train.Checkpoint with MaxShardSizePolicy: object paths as names, the step an
    // int64 under its path, the object graph a string tensor (listed, not read), `w2` cut into
    // slices across the two shards (a partitioned variable: listed, an error when asked for).
    let c = Checkpoint::load(fixture().with_file_name("tf_sharded").join("ckpt")).unwrap();
    let names: Vec<&str> = c.names().collect();
    assert_eq!(
        names,
        [
            "w0/.ATTRIBUTES/VARIABLE_VALUE",
            "w1/.ATTRIBUTES/VARIABLE_VALUE",
            "w3/.ATTRIBUTES/VARIABLE_VALUE"
        ]
    );
    let why = c.unsupported("w2/.ATTRIBUTES/VARIABLE_VALUE").unwrap();
    assert!(why.contains("partitioned"), "{why}");
    for i in [0, 1, 3] {
        let (shape, v) = c.get(&format!("w{i}/.ATTRIBUTES/VARIABLE_VALUE")).unwrap();
        assert_eq!(shape, &[30, 10]);
        let want: Vec<f32> = (0..300).map(|k| (i * 1000 + k) as f32).collect();
        assert_eq!(v, want.as_slice(), "w{i}");
    }
    assert!(c.unsupported("_CHECKPOINTABLE_OBJECT_GRAPH").is_some());
    assert!(c.unsupported("step/.ATTRIBUTES/VARIABLE_VALUE").is_some());
    let data = fixture().with_file_name("tf_sharded");
    let shard = data.join("ckpt.data-00001-of-00002");
    let copy = tempfile::tempdir().unwrap();
    for f in ["ckpt.index", "ckpt.data-00000-of-00002"] {
        std::fs::copy(data.join(f), copy.path().join(f)).unwrap();
    }
    assert!(shard.exists());
    expect_error(
        &copy.path().join("ckpt"),
        &["ckpt.data-00001-of-00002", "cannot be opened"],
    );
}

/// The index block's length, from the footer's second handle.
fn index_block_len(table: &[u8]) -> usize {
    let footer = &table[table.len() - 48..];
    let mut at = 0;
    let mut varint = || {
        let mut v = 0usize;
        let mut shift = 0;
        loop {
            let b = footer[at];
            at += 1;
            v |= ((b & 0x7f) as usize) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    };
    let (_, _, _, size) = (varint(), varint(), varint(), varint());
    size
}

/// LevelDB's masked CRC32C of a block and its type byte (0).
fn crc32c(block: &[u8]) -> u32 {
    let c = crc32c::crc32c_append(crc32c::crc32c(block), &[0]);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Saves over one prefix: each writes its data under the shard count the previous one does not
/// use (one file, then two), so the replaced checkpoint's files are never touched; after each,
/// the prefix loads as the newest and only its data files remain. With
/// `WGPU_EMA_TF_SAME_PREFIX_OUT` set, the folder is left there for TensorFlow to read
/// (`.ci/tensorflow-check`).
#[test]
fn saves_over_one_prefix_replace_it_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("WGPU_EMA_TF_SAME_PREFIX_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let prefix = dir.join("latest");
    // A fresh folder starts with one data file (a kept one may hold two from a run before).
    let starts_with_one = !dir.join("latest.data-00000-of-00001").exists();
    for step in 1..=3u64 {
        let (ema, params, extra) = state(step);
        checkpoint::save_tf(&prefix, &ema, Some(&params), &extra).unwrap();
        let c = Checkpoint::load(&prefix).unwrap();
        assert_eq!(c.num_updates().unwrap(), step);
        assert_eq!(
            c.get("weight/ExponentialMovingAverage").unwrap().1,
            ema.shadow("weight").unwrap()
        );
        let mut data: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("latest.data-"))
            .collect();
        data.sort();
        let want: &[&str] = if (step % 2 == 1) == starts_with_one {
            &["latest.data-00000-of-00001"]
        } else {
            &["latest.data-00000-of-00002", "latest.data-00001-of-00002"]
        };
        assert_eq!(data, want, "after save {step}");
    }
}
