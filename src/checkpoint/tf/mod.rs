//! TensorFlow's own checkpoint format (TensorBundle V2), both ways: [`save_tf`] writes what
//! `tf.compat.v1.train.Saver` restores (with `ema.variables_to_restore()` too), and
//! [`Checkpoint::load`](super::Checkpoint::load) reads what TensorFlow wrote.
//!
//! A checkpoint `PREFIX` is `PREFIX.index` (a LevelDB table: key `""` → the bundle header,
//! then one entry per tensor in sorted key order: dtype, shape, shard, offset, size, masked
//! CRC32C of its bytes) and `PREFIX.data-0000k-of-0000N` (raw little-endian bytes); the
//! directory's `checkpoint` file names the latest prefix for `tf.train.latest_checkpoint`.

mod proto;
mod table;

use crate::error::CheckpointErrorKind as K;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::encode::write_f32_le;
use super::errors::{bad, bad_tensor, io};
use super::write::atomic_write;
use super::{training_entries, EmaState, META_NUM_UPDATES};
use crate::error::{Error, Result};
use crate::tensors::HostTensors;
use proto::{
    BundleEntry, BundleHeader, Dim, TensorShape, VersionDef, DT_FLOAT, DT_INT32, DT_INT64,
};

pub use crate::names::{GLOBAL_STEP, STATE_FILE};

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn data_path(prefix: &Path, shard: i32, shards: i32) -> PathBuf {
    with_suffix(prefix, &format!(".data-{shard:05}-of-{shards:05}"))
}

/// The prefix of a TensorFlow checkpoint named by `path` (`PREFIX.index` or `PREFIX`), if it
/// is one.
pub(crate) fn prefix_of(path: &Path) -> Option<PathBuf> {
    let s = path.to_string_lossy();
    if let Some(p) = s.strip_suffix(".index") {
        return Some(PathBuf::from(p));
    }
    with_suffix(path, ".index")
        .exists()
        .then(|| path.to_path_buf())
}

/// Saves a training checkpoint in TensorFlow's format at `prefix` (e.g. `dir/ckpt-00003000`),
/// with the tensors [`save_training`](super::save_training) writes (`weight`,
/// `weight/ExponentialMovingAverage`, the `extra` ones such as `weight/Momentum`) and the step
/// counter as TensorFlow's `global_step` (int64), then points the directory's `checkpoint`
/// file at it.
///
/// Atomic like our other saves: the data file, then the index, each written to a temporary
/// file and renamed, the state file last; a failed save leaves the previous checkpoint
/// usable. (Rewriting the same prefix in place is two renames: between them the old index
/// meets the new data, which every tensor's checksum then refuses rather than loads.)
pub fn save_tf(
    prefix: impl AsRef<Path>,
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
) -> Result<()> {
    let prefix = prefix.as_ref();
    let mut entries = training_entries(state, params, extra)?;
    if entries.iter().any(|e| e.name == GLOBAL_STEP) {
        return Err(Error::NameCollision {
            name: GLOBAL_STEP.into(),
            with: "TensorFlow's step counter, which the checkpoint stores under that name".into(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    // The data: every tensor in key order, one in memory at a time; global_step last.
    let data = data_path(prefix, 0, 1);
    let mut index: Vec<(String, BundleEntry)> = Vec::with_capacity(entries.len() + 1);
    atomic_write(&data, |w| {
        let mut offset = 0i64;
        // Records a tensor just written: `size` bytes whose CRC32C is `crc`.
        let mut put = |name: &str, dtype, shape: &[usize], size: i64, crc: u32| {
            index.push((
                name.to_string(),
                BundleEntry {
                    dtype,
                    shape: Some(TensorShape {
                        dim: shape
                            .iter()
                            .map(|&d| Dim {
                                size: d as i64,
                                name: String::new(),
                            })
                            .collect(),
                        unknown_rank: false,
                    }),
                    shard_id: 0,
                    offset,
                    size,
                    crc32c: table::mask(crc),
                    slices: Vec::new(),
                },
            ));
            offset += size;
        };
        for e in &mut entries {
            let values = e.produce_checked(&data)?;
            // The safetensors writer's little-endian write, which also gives the CRC32C.
            let crc = write_f32_le(w, &values, 0).map_err(io(&data))?;
            put(&e.name, DT_FLOAT, &e.shape, values.len() as i64 * 4, crc);
        }
        let step = i64::try_from(state.num_updates())
            .unwrap_or(i64::MAX)
            .to_le_bytes();
        w.write_all(&step).map_err(io(&data))?;
        put(GLOBAL_STEP, DT_INT64, &[], 8, crc32c::crc32c(&step));
        Ok(())
    })?;
    index.sort_by(|a, b| a.0.cmp(&b.0));
    let header = BundleHeader {
        num_shards: 1,
        endianness: 0,
        version: Some(VersionDef {
            producer: 1,
            min_consumer: 0,
            bad_consumers: Vec::new(),
        }),
    };
    let mut kv: Vec<(Vec<u8>, Vec<u8>)> = vec![(Vec::new(), header.encode_to_vec())];
    kv.extend(
        index
            .iter()
            .map(|(k, e)| (k.clone().into_bytes(), e.encode_to_vec())),
    );
    let index_path = with_suffix(prefix, ".index");
    let bytes = table::build(&kv);
    atomic_write(&index_path, |w| {
        w.write_all(&bytes).map_err(io(&index_path))
    })?;
    write_state(prefix)
}

/// Points the directory's `checkpoint` file at `prefix`, keeping the earlier checkpoints it
/// lists whose index files still exist.
fn write_state(prefix: &Path) -> Result<()> {
    let dir = match prefix.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| bad(prefix, K::Format, "not a checkpoint prefix"))?;
    let path = dir.join(STATE_FILE);
    let mut all: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("all_model_checkpoint_paths:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|p| *p != name && dir.join(format!("{p}.index")).exists())
        .collect();
    all.push(name.clone());
    let mut text = format!("model_checkpoint_path: {:?}\n", name);
    for p in &all {
        text += &format!("all_model_checkpoint_paths: {p:?}\n");
    }
    atomic_write(&path, |w| w.write_all(text.as_bytes()).map_err(io(&path)))
}

/// A loaded TensorFlow checkpoint: its f32 tensors by name, and `num_updates` from
/// `global_step`.
pub(crate) struct Loaded {
    pub index: PathBuf,
    pub metadata: HashMap<String, String>,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Tensors of other dtypes, not read: (name, why), an error when one is asked for.
    pub unsupported: Vec<(String, String)>,
}

/// Reads the TensorFlow checkpoint at `prefix`, verifying every table block and every
/// tensor's checksum.
pub(crate) fn load(prefix: &Path) -> Result<Loaded> {
    let index = with_suffix(prefix, ".index");
    let bytes = std::fs::read(&index).map_err(io(&index))?;
    let kv = table::read(&bytes).map_err(|m| bad(&index, K::Format, m))?;
    let mut it = kv.into_iter();
    let header = match it.next() {
        Some((k, v)) if k.is_empty() => BundleHeader::decode(v.as_slice())
            .map_err(|e| bad(&index, K::Format, format!("bundle header: {e}")))?,
        _ => return Err(bad(&index, K::Format, "no bundle header (key \"\")")),
    };
    if header.endianness != 0 {
        return Err(bad(
            &index,
            K::Unsupported,
            "big-endian checkpoints are not read",
        ));
    }
    if header.num_shards < 1 {
        return Err(bad(
            &index,
            K::Format,
            format!("{} data shards", header.num_shards),
        ));
    }
    let mut files: HashMap<i32, File> = HashMap::new();
    let mut tensors = Vec::new();
    let mut unsupported = Vec::new();
    let mut metadata = HashMap::from([("format".to_string(), "tensorflow".to_string())]);
    for (key, value) in it {
        // `name\0<slice>` keys hold the pieces of a partitioned variable, whose own entry
        // lists its slices: that entry is what says the tensor is not read.
        if key.contains(&0) {
            continue;
        }
        let name = String::from_utf8(key)
            .map_err(|_| bad(&index, K::Format, "a tensor name is not UTF-8"))?;
        let what =
            |m: String| bad_tensor(&index, K::Format, &name, format!("tensor `{name}`: {m}"));
        let e =
            BundleEntry::decode(value.as_slice()).map_err(|err| what(format!("entry: {err}")))?;
        if !e.slices.is_empty() {
            unsupported.push((
                name.clone(),
                "a partitioned variable (saved in slices), which wgpu-ema does not read".into(),
            ));
            continue;
        }
        let shape = e.shape.clone().unwrap_or_default();
        if shape.unknown_rank || shape.dim.iter().any(|d| d.size < 0) {
            return Err(what("unknown shape".into()));
        }
        let dims: Vec<usize> = shape.dim.iter().map(|d| d.size as usize).collect();
        let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let elem = match e.dtype {
            DT_FLOAT => 4,
            DT_INT32 | DT_INT64 if name == GLOBAL_STEP => {
                if e.dtype == DT_INT32 {
                    4
                } else {
                    8
                }
            }
            other if name == GLOBAL_STEP => {
                return Err(what(format!(
                    "dtype {other}; the step counter must be int64 or int32"
                )))
            }
            other => {
                // Not ours to read (TF2's object graph string, integer counters, doubles):
                // listed, and an error only where a float32 tensor of that name is needed.
                unsupported.push((name.clone(), format!("dtype {other} (TensorFlow DataType); wgpu-ema reads float32 tensors and an int64 or int32 global_step")));
                continue;
            }
        };
        let want = numel.and_then(|n| n.checked_mul(elem)).map(|b| b as i64);
        if want != Some(e.size) || e.offset < 0 {
            return Err(what(format!(
                "{} bytes at {} for shape {dims:?}",
                e.size, e.offset
            )));
        }
        if !(0..header.num_shards).contains(&e.shard_id) {
            return Err(what(format!(
                "shard {} of {}",
                e.shard_id, header.num_shards
            )));
        }
        let path = data_path(prefix, e.shard_id, header.num_shards);
        let file = match files.entry(e.shard_id) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(|err| {
                    bad(
                        &path,
                        K::MissingTensor,
                        format!("data shard holding `{name}` cannot be opened: {err}"),
                    )
                })?)
            }
        };
        let mut buf = vec![0u8; e.size as usize];
        file.seek(SeekFrom::Start(e.offset as u64))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|_| {
                bad_tensor(
                    &path,
                    K::Truncated,
                    &name,
                    format!(
                        "tensor `{name}`: {} bytes at {} run past the file",
                        e.size, e.offset
                    ),
                )
            })?;
        if table::mask(crc32c::crc32c(&buf)) != e.crc32c {
            return Err(bad_tensor(
                &path,
                K::Checksum,
                &name,
                format!("tensor `{name}`: checksum mismatch: the file was changed or damaged"),
            ));
        }
        match e.dtype {
            DT_FLOAT => {
                let v = buf
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                tensors.push((name, dims, v));
            }
            _ if name == GLOBAL_STEP && dims.is_empty() => {
                let step = if e.dtype == DT_INT64 {
                    i64::from_le_bytes(buf[..8].try_into().unwrap_or_default())
                } else {
                    i64::from(i32::from_le_bytes(buf[..4].try_into().unwrap_or_default()))
                };
                let step =
                    u64::try_from(step).map_err(|_| what(format!("negative step {step}")))?;
                metadata.insert(META_NUM_UPDATES.to_string(), step.to_string());
            }
            _ => return Err(what("global_step must be a scalar".into())),
        }
    }
    Ok(Loaded {
        index,
        metadata,
        tensors,
        unsupported,
    })
}
