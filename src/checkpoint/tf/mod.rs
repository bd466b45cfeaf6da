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
use crate::names::{TF_CHECKSUMS, TF_OBJECT_GRAPH};
use crate::tensors::HostTensors;
use proto::{
    BundleEntry, BundleHeader, Dim, TensorShape, VersionDef, DT_FLOAT, DT_INT32, DT_INT64,
    DT_UINT32,
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
/// Atomic, to a new prefix or the same one: a checkpoint is an index and data files named
/// after the index's shard count (`PREFIX.data-00000-of-00001`), so a save over an existing
/// checkpoint writes its data under the other count (one shard, or two with the second
/// empty: both read by TensorFlow) and never touches the files of the checkpoint it replaces.
/// The index, renamed over the old one, is the commit; the state file follows; only then are
/// the old data files removed. Killed or failed at any point, the prefix loads as the old
/// checkpoint or the new one. Runs under the folder's [`FolderLock`](super::FolderLock).
///
/// Besides TensorFlow's per-tensor checksum (of the bytes only), the file holds
/// [`TF_CHECKSUMS`](crate::names::TF_CHECKSUMS): one CRC32C per entry of its name, dtype,
/// shape, size and checksum, so that values exchanged between two tensors, or a changed
/// shape, are refused on load. TensorFlow's restores ignore it.
pub fn save_tf(
    prefix: impl AsRef<Path>,
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
) -> Result<()> {
    let prefix = prefix.as_ref();
    let mut entries = training_entries(state, params, extra)?;
    if let Some(e) = entries
        .iter()
        .find(|e| e.name == GLOBAL_STEP || e.name == TF_CHECKSUMS)
    {
        return Err(Error::NameCollision {
            name: e.name.clone(),
            with: "a tensor the TensorFlow checkpoint stores under that name (the step counter, or its checksums)".into(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let dir = super::lock::folder_of(prefix);
    let _writer = super::lock::for_writer(&dir)?;
    // The data under a shard count the current checkpoint does not use.
    let old = current_shards(prefix);
    let shards = if old == Some(1) { 2 } else { 1 };
    let data = data_path(prefix, 0, shards);
    let mut index: Vec<(String, BundleEntry)> = Vec::with_capacity(entries.len() + 2);
    let step = i64::try_from(state.num_updates())
        .unwrap_or(i64::MAX)
        .to_le_bytes();
    atomic_write(&data, |w| {
        let mut offset = 0i64;
        // Records a tensor just written: `size` bytes whose CRC32C is `crc`.
        let mut put = |index: &mut Vec<_>, name: &str, dtype, shape: &[usize], size: i64, crc| {
            index.push((name.to_string(), entry(dtype, shape, offset, size, crc)));
            offset += size;
        };
        // Every tensor in key order (TensorFlow's Saver's layout, which `load` checks), one
        // in memory at a time; global_step in its place.
        let step_at = entries.partition_point(|e| e.name.as_str() < GLOBAL_STEP);
        for i in 0..=entries.len() {
            if i == step_at {
                w.write_all(&step).map_err(io(&data))?;
                let crc = crc32c::crc32c(&step);
                put(&mut index, GLOBAL_STEP, DT_INT64, &[], 8, crc);
            }
            let Some(e) = entries.get_mut(i) else {
                break;
            };
            let values = e.produce_checked(&data)?;
            // The safetensors writer's little-endian write, which also gives the CRC32C.
            let crc = write_f32_le(w, &values, 0).map_err(io(&data))?;
            let size = values.len() as i64 * 4;
            put(&mut index, &e.name, DT_FLOAT, &e.shape, size, crc);
        }
        // What binds each entry's name to its values, last (the one entry outside key order).
        let bound: Vec<u8> = index
            .iter()
            .flat_map(|(k, e)| binding(k, e).to_le_bytes())
            .collect();
        w.write_all(&bound).map_err(io(&data))?;
        let crc = crc32c::crc32c(&bound);
        put(
            &mut index,
            TF_CHECKSUMS,
            DT_UINT32,
            &[bound.len() / 4],
            bound.len() as i64,
            crc,
        );
        Ok(())
    })?;
    if shards == 2 {
        // The second shard holds nothing; TensorFlow expects every data file to exist.
        let empty = data_path(prefix, 1, 2);
        atomic_write(&empty, |_| Ok(()))?;
    }
    index.sort_by(|a, b| a.0.cmp(&b.0));
    let header = BundleHeader {
        num_shards: shards,
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
    write_state(prefix)?;
    // Committed: the replaced checkpoint's data files are no one's now.
    remove_other_data(prefix, shards);
    Ok(())
}

/// A bundle entry of a whole tensor in shard 0.
fn entry(dtype: i32, shape: &[usize], offset: i64, size: i64, crc: u32) -> BundleEntry {
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
    }
}

/// The CRC32C that binds entry `name` to what it says: dtype, shape, shard, size and the
/// checksum of its bytes (each integer little-endian, the name after its length).
fn binding(name: &str, e: &BundleEntry) -> u32 {
    let dims: &[Dim] = e.shape.as_ref().map_or(&[], |s| &s.dim);
    let mut c = crc32c::crc32c(&(name.len() as u64).to_le_bytes());
    c = crc32c::crc32c_append(c, name.as_bytes());
    c = crc32c::crc32c_append(c, &e.dtype.to_le_bytes());
    c = crc32c::crc32c_append(c, &(dims.len() as u64).to_le_bytes());
    for d in dims {
        c = crc32c::crc32c_append(c, &d.size.to_le_bytes());
    }
    c = crc32c::crc32c_append(c, &e.shard_id.to_le_bytes());
    c = crc32c::crc32c_append(c, &e.size.to_le_bytes());
    crc32c::crc32c_append(c, &e.crc32c.to_le_bytes())
}

/// The shard count of the checkpoint at `prefix`, if one is there and its header reads.
fn current_shards(prefix: &Path) -> Option<i32> {
    let bytes = std::fs::read(with_suffix(prefix, ".index")).ok()?;
    let kv = table::read(&bytes).ok()?;
    let (k, v) = kv.first()?;
    if !k.is_empty() {
        return None;
    }
    BundleHeader::decode(v.as_slice())
        .ok()
        .map(|h| h.num_shards)
}

/// Removes the data files of `prefix` (`PREFIX.data-*-of-*`) other than those of a checkpoint
/// of `shards` shards.
fn remove_other_data(prefix: &Path, shards: i32) {
    let dir = super::lock::folder_of(prefix);
    let Some(base) = prefix.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let keep: Vec<PathBuf> = (0..shards).map(|i| data_path(prefix, i, shards)).collect();
    let Ok(list) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in list.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let numbered = |r: &str| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit());
        let ours = name
            .strip_prefix(base.as_str())
            .and_then(|r| r.strip_prefix(".data-"))
            .and_then(|r| r.split_once("-of-"))
            .is_some_and(|(i, n)| numbered(i) && numbered(n));
        if ours
            && !keep
                .iter()
                .any(|k| k.file_name() == Some(e.file_name().as_os_str()))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
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
    /// False when, read leniently, the float32 tensors were not laid out in key order where
    /// the writer would have (see [`load`]).
    pub in_order: bool,
}

/// A tensor of the index, checked against its data file but not read yet.
struct Planned {
    name: String,
    dims: Vec<usize>,
    dtype: i32,
    shard: i32,
    offset: u64,
    size: u64,
    crc: u32,
}

/// Reads the TensorFlow checkpoint at `prefix`, verifying every table block and every
/// tensor's checksum.
///
/// Nothing is allocated for a tensor before its size is checked against the dtype and shape
/// and its bytes against the data file's length; the index's keys must be strictly sorted;
/// no two tensors may share bytes; the entries [`TF_CHECKSUMS`] binds must match it. And in a
/// checkpoint without TensorFlow 2's object graph (what `tf.compat.v1.train.Saver` and
/// [`save_tf`] write) each data file holds its float32 tensors in key order, so values
/// exchanged between two entries (their checksums recomputed) are refused when `strict`;
/// leniently (a writer of another layout, trusted by the caller) `in_order` says so instead.
/// (`global_step`, an integer, is outside that order: wgpu-ema 0.2 wrote it last.)
pub(crate) fn load(prefix: &Path, strict: bool) -> Result<Loaded> {
    let index = with_suffix(prefix, ".index");
    let bytes = std::fs::read(&index).map_err(io(&index))?;
    let kv = table::read(&bytes).map_err(|m| bad(&index, K::Format, m))?;
    drop(bytes);
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
    // Pass 1: every entry decoded and checked against its data file.
    let mut files: HashMap<i32, (File, u64)> = HashMap::new();
    let mut planned: Vec<Planned> = Vec::new();
    let mut unsupported = Vec::new();
    // Every entry holding bytes, for the layout checks, in key order.
    let mut ranges: Vec<Range> = Vec::new();
    let mut bound: Option<Planned> = None;
    let mut bindings: Vec<(String, u32)> = Vec::new();
    let mut object_graph = false;
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
        if name != TF_CHECKSUMS {
            bindings.push((name.clone(), binding(&name, &e)));
        }
        object_graph |= name == TF_OBJECT_GRAPH;
        if !e.slices.is_empty() {
            unsupported.push((
                name.clone(),
                "a partitioned variable (saved in slices), which wgpu-ema does not read".into(),
            ));
            continue;
        }
        let (Ok(offset), Ok(size)) = (u64::try_from(e.offset), u64::try_from(e.size)) else {
            return Err(what(format!("{} bytes at {}", e.size, e.offset)));
        };
        if !(0..header.num_shards).contains(&e.shard_id) {
            return Err(what(format!(
                "shard {} of {}",
                e.shard_id, header.num_shards
            )));
        }
        let path = data_path(prefix, e.shard_id, header.num_shards);
        let len = match files.entry(e.shard_id) {
            std::collections::hash_map::Entry::Occupied(f) => f.get().1,
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = File::open(&path).map_err(|err| {
                    bad(
                        &path,
                        K::MissingTensor,
                        format!("data shard holding `{name}` cannot be opened: {err}"),
                    )
                })?;
                let len = file.metadata().map_err(io(&path))?.len();
                v.insert((file, len)).1
            }
        };
        // Every size is checked against the file before anything is allocated for it.
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(bad_tensor(
                &path,
                K::Truncated,
                &name,
                format!(
                    "tensor `{name}`: {size} bytes at {offset} run past the file ({len} bytes)"
                ),
            ));
        }
        if name != TF_CHECKSUMS {
            ranges.push(Range {
                shard: e.shard_id,
                offset,
                size,
                name: name.clone(),
                float: e.dtype == DT_FLOAT,
            });
        }
        let shape = e.shape.clone().unwrap_or_default();
        if shape.unknown_rank || shape.dim.iter().any(|d| d.size < 0) {
            return Err(what("unknown shape".into()));
        }
        let dims: Vec<usize> = shape
            .dim
            .iter()
            .map(|d| usize::try_from(d.size))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| what("a dimension too large for this machine".into()))?;
        let elem: u64 = match e.dtype {
            DT_FLOAT => 4,
            DT_UINT32 if name == TF_CHECKSUMS => 4,
            DT_INT64 if name == GLOBAL_STEP => 8,
            DT_INT32 if name == GLOBAL_STEP => 4,
            other if name == GLOBAL_STEP || name == TF_CHECKSUMS => {
                return Err(what(format!(
                    "dtype {other}; the step counter must be int64 or int32, the checksums uint32"
                )))
            }
            other => {
                // Not ours to read (TF2's object graph string, integer counters, doubles):
                // listed, and an error only where a float32 tensor of that name is needed.
                unsupported.push((name.clone(), format!("dtype {other} (TensorFlow DataType); wgpu-ema reads float32 tensors and an int64 or int32 global_step")));
                continue;
            }
        };
        let want = dims.iter().try_fold(elem, |a, &d| a.checked_mul(d as u64));
        if want != Some(size) {
            return Err(what(format!("{size} bytes at {offset} for shape {dims:?}")));
        }
        if (name == GLOBAL_STEP || name == TF_CHECKSUMS) != (e.dtype != DT_FLOAT)
            || (name == GLOBAL_STEP && !dims.is_empty())
            || (name == TF_CHECKSUMS && dims.len() != 1)
        {
            return Err(what(format!("dtype {} and shape {dims:?}", e.dtype)));
        }
        let p = Planned {
            name,
            dims,
            dtype: e.dtype,
            shard: e.shard_id,
            offset,
            size,
            crc: e.crc32c,
        };
        if p.name == TF_CHECKSUMS {
            bound = Some(p);
        } else {
            planned.push(p);
        }
    }
    let out_of_order = if object_graph {
        None
    } else {
        out_of_key_order(&ranges)
    };
    if let (Some((a, b)), true) = (&out_of_order, strict) {
        return Err(bad_tensor(
            &index,
            K::Inconsistent,
            b,
            format!(
                "tensor `{b}` is placed before `{a}` in the data file, out of the key order \
                 TensorFlow's Saver writes: entries were edited (values exchanged?); a file of \
                 another writer's layout loads with Checkpoint::load_unverified"
            ),
        ));
    }
    check_no_shared_bytes(&index, &mut ranges)?;
    // Pass 2: the bytes, each tensor's checksum, then what binds them.
    let mut read = |p: &Planned| -> Result<Vec<u8>> {
        let path = data_path(prefix, p.shard, header.num_shards);
        let Some((file, _)) = files.get_mut(&p.shard) else {
            return Err(bad_tensor(
                &path,
                K::MissingTensor,
                &p.name,
                "data shard not opened",
            ));
        };
        let mut buf = vec![0u8; p.size as usize];
        file.seek(SeekFrom::Start(p.offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|_| {
                bad_tensor(
                    &path,
                    K::Truncated,
                    &p.name,
                    format!(
                        "tensor `{}`: {} bytes at {} run past the file",
                        p.name, p.size, p.offset
                    ),
                )
            })?;
        if table::mask(crc32c::crc32c(&buf)) != p.crc {
            return Err(bad_tensor(
                &path,
                K::Checksum,
                &p.name,
                format!(
                    "tensor `{}`: checksum mismatch: the file was changed or damaged",
                    p.name
                ),
            ));
        }
        Ok(buf)
    };
    if let Some(b) = &bound {
        let words = read(b)?;
        if words.len() / 4 != bindings.len() {
            return Err(bad(
                &index,
                K::Checksum,
                format!(
                    "{TF_CHECKSUMS} binds {} entries, the index has {}: the file was changed or damaged",
                    words.len() / 4,
                    bindings.len()
                ),
            ));
        }
        for ((name, got), want) in bindings.iter().zip(words.chunks_exact(4)) {
            if want != got.to_le_bytes() {
                return Err(bad_tensor(
                    &index,
                    K::Checksum,
                    name,
                    format!(
                        "tensor `{name}`: its name, dtype, shape or checksum differs from what \
                         the save bound ({TF_CHECKSUMS}): the file was changed or damaged"
                    ),
                ));
            }
        }
    }
    let mut tensors = Vec::new();
    let mut metadata = HashMap::from([("format".to_string(), "tensorflow".to_string())]);
    for p in &planned {
        let buf = read(p)?;
        if p.dtype == DT_FLOAT {
            let v = buf
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.push((p.name.clone(), p.dims.clone(), v));
        } else {
            // global_step, a scalar of 8 or 4 bytes (checked above).
            let step = match buf.len() {
                8 => buf[..8]
                    .try_into()
                    .map(i64::from_le_bytes)
                    .unwrap_or_default(),
                _ => buf[..4]
                    .try_into()
                    .map(i32::from_le_bytes)
                    .map(i64::from)
                    .unwrap_or_default(),
            };
            let step = u64::try_from(step).map_err(|_| {
                bad_tensor(
                    &index,
                    K::Format,
                    GLOBAL_STEP,
                    format!("negative step {step}"),
                )
            })?;
            metadata.insert(META_NUM_UPDATES.to_string(), step.to_string());
        }
    }
    Ok(Loaded {
        index,
        metadata,
        tensors,
        unsupported,
        in_order: out_of_order.is_none(),
    })
}

/// Where an entry's bytes are.
struct Range {
    shard: i32,
    offset: u64,
    size: u64,
    name: String,
    /// A float32 tensor: one whose place in the key order is checked.
    float: bool,
}

/// Refuses two entries sharing bytes of a data file (sizes are checked against the file
/// already, so the sums cannot overflow).
fn check_no_shared_bytes(index: &Path, ranges: &mut [Range]) -> Result<()> {
    ranges.sort_by_key(|r| (r.shard, r.offset, r.size));
    for w in ranges.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.shard == b.shard && b.offset < a.offset + a.size {
            return Err(bad_tensor(
                index,
                K::Inconsistent,
                &b.name,
                format!(
                    "tensor `{}` shares bytes with `{}` in the data file, which TensorFlow's \
                     writers never do: the index was edited",
                    b.name, a.name
                ),
            ));
        }
    }
    Ok(())
}

/// The first pair (earlier key, later key) of float32 tensors of one data file whose bytes
/// are not in their keys' order. `ranges` come in key order.
fn out_of_key_order(ranges: &[Range]) -> Option<(String, String)> {
    let mut last: HashMap<i32, &Range> = HashMap::new();
    for r in ranges.iter().filter(|r| r.float) {
        if let Some(prev) = last.get(&r.shard) {
            if r.offset < prev.offset + prev.size {
                return Some((prev.name.clone(), r.name.clone()));
            }
        }
        last.insert(r.shard, r);
    }
    None
}

#[cfg(test)]
mod tests {
    //! Crafted bundles, with valid checksums (built here with the table writer): what a file
    //! says about sizes, offsets, keys and layout is checked before it is believed.
    use super::*;
    use crate::error::Error;

    /// Writes a one-shard bundle at `dir/b` of `entries` (in the order given) over `data`.
    fn bundle(dir: &Path, entries: &[(&str, BundleEntry)], data: &[u8]) -> PathBuf {
        bundle_of(dir, entries, &[data])
    }

    /// A bundle of as many data shards as `shards`.
    fn bundle_of(dir: &Path, entries: &[(&str, BundleEntry)], shards: &[&[u8]]) -> PathBuf {
        let prefix = dir.join("b");
        let header = BundleHeader {
            num_shards: shards.len() as i32,
            endianness: 0,
            version: None,
        };
        let mut kv = vec![(Vec::new(), header.encode_to_vec())];
        kv.extend(
            entries
                .iter()
                .map(|(k, e)| (k.as_bytes().to_vec(), e.encode_to_vec())),
        );
        std::fs::write(with_suffix(&prefix, ".index"), table::build(&kv)).unwrap();
        let n = shards.len() as i32;
        for (i, data) in shards.iter().enumerate() {
            std::fs::write(data_path(&prefix, i as i32, n), data).unwrap();
        }
        prefix
    }

    fn float(shape: &[i64], offset: i64, bytes: &[u8]) -> BundleEntry {
        BundleEntry {
            dtype: DT_FLOAT,
            shape: Some(TensorShape {
                dim: shape
                    .iter()
                    .map(|&size| Dim {
                        size,
                        name: String::new(),
                    })
                    .collect(),
                unknown_rank: false,
            }),
            shard_id: 0,
            offset,
            size: bytes.len() as i64,
            crc32c: table::mask(crc32c::crc32c(bytes)),
            slices: Vec::new(),
        }
    }

    fn kind(r: Result<Loaded>) -> CheckpointKindOrOk {
        match r {
            Ok(_) => CheckpointKindOrOk::Ok,
            Err(Error::Checkpoint { kind, .. }) => CheckpointKindOrOk::Kind(kind),
            Err(e) => panic!("not a checkpoint error: {e}"),
        }
    }

    #[derive(Debug, PartialEq)]
    enum CheckpointKindOrOk {
        Ok,
        Kind(K),
    }

    fn le(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn sizes_past_the_file_are_refused_before_anything_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let data = le(&[1.0, 2.0, 3.0]);
        // 2^61 elements (wrapped the old i64 check), 4 GiB, 32 GiB, 4 TiB: each with its own
        // consistent shape and size, and a valid checksum of the bytes that are there.
        for (shape, size) in [
            (vec![1i64 << 61], i64::MIN),
            (vec![1i64 << 61], 0),
            (vec![1 << 30], 4i64 << 30),
            (vec![8 << 30], 32i64 << 30),
            (vec![1 << 40], 4i64 << 40),
            (vec![i64::MAX, 2], 8),
            (vec![3], -12),
        ] {
            let mut e = float(&[3], 0, &data);
            e.shape = float(&shape, 0, &[]).shape;
            e.size = size;
            let prefix = bundle(dir.path(), &[("w", e)], &data);
            let got = kind(load(&prefix, true));
            assert!(
                matches!(got, CheckpointKindOrOk::Kind(K::Truncated | K::Format)),
                "shape {shape:?}, size {size}: {got:?}"
            );
        }
        // An offset past the end, and one that wraps.
        for offset in [12, i64::MAX - 4, -1] {
            let prefix = bundle(dir.path(), &[("w", float(&[3], offset, &data))], &data);
            assert_ne!(
                kind(load(&prefix, true)),
                CheckpointKindOrOk::Ok,
                "offset {offset}"
            );
        }
    }

    #[test]
    fn repeated_or_unsorted_keys_and_shared_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (le(&[1.0, 2.0]), le(&[3.0, 4.0]));
        let data = [a.clone(), b.clone()].concat();
        let ok = bundle(
            dir.path(),
            &[("a", float(&[2], 0, &a)), ("b", float(&[2], 8, &b))],
            &data,
        );
        assert_eq!(kind(load(&ok, true)), CheckpointKindOrOk::Ok);
        // Shared bytes are refused whatever the layout rule (here read leniently, where the
        // key order is not enforced); the same offsets in two shards share nothing.
        for entries in [
            vec![("a", float(&[2], 0, &a)), ("b", float(&[2], 0, &a))],
            vec![
                ("a", float(&[2], 4, &data[4..12])),
                ("b", float(&[2], 0, &a)),
            ],
        ] {
            let prefix = bundle(dir.path(), &entries, &data);
            assert_eq!(
                kind(load(&prefix, false)),
                CheckpointKindOrOk::Kind(K::Inconsistent)
            );
        }
        let mut in_second = float(&[2], 0, &b);
        in_second.shard_id = 1;
        let two = bundle_of(
            dir.path(),
            &[("a", float(&[2], 0, &a)), ("b", in_second)],
            &[&a, &b],
        );
        let l = load(&two, true).unwrap();
        assert_eq!(l.tensors[1].2, [3.0, 4.0]);
        for (what, entries) in [
            (
                "twice",
                vec![("a", float(&[2], 0, &a)), ("a", float(&[2], 8, &b))],
            ),
            (
                "unsorted",
                vec![("b", float(&[2], 8, &b)), ("a", float(&[2], 0, &a))],
            ),
            (
                "shared bytes",
                vec![("a", float(&[2], 0, &a)), ("b", float(&[2], 0, &a))],
            ),
            (
                "overlap",
                vec![
                    ("a", float(&[2], 0, &a)),
                    ("b", float(&[2], 4, &data[4..12])),
                ],
            ),
            // Values exchanged between two entries, their checksums recomputed: the data no
            // longer follows the key order TensorFlow's Saver writes.
            (
                "exchanged",
                vec![("a", float(&[2], 8, &b)), ("b", float(&[2], 0, &a))],
            ),
        ] {
            let prefix = bundle(dir.path(), &entries, &data);
            assert!(
                matches!(
                    kind(load(&prefix, true)),
                    CheckpointKindOrOk::Kind(K::Format | K::Inconsistent)
                ),
                "{what}"
            );
        }
    }

    /// wgpu-ema 0.2 wrote `global_step` after every float tensor: outside the key order, which
    /// only float32 tensors keep. Floats out of key order (another writer's layout, or an
    /// edit) are refused, or loaded unverified when the caller is lenient.
    #[test]
    fn the_layouts_of_wgpu_ema_0_2_and_of_other_writers() {
        let dir = tempfile::tempdir().unwrap();
        let (b, w) = (le(&[1.0, 2.0]), le(&[3.0, 4.0]));
        let step = 7i64.to_le_bytes();
        let mut gs = float(&[], 16, &step);
        gs.dtype = DT_INT64;
        let data = [b.clone(), w.clone(), step.to_vec()].concat();
        let prefix = bundle(
            dir.path(),
            &[
                ("bias", float(&[2], 0, &b)),
                ("global_step", gs),
                ("weight", float(&[2], 8, &w)),
            ],
            &data,
        );
        let l = load(&prefix, true).unwrap();
        assert!(l.in_order);
        assert_eq!(l.metadata[META_NUM_UPDATES], "7");
        let data = [w.clone(), b.clone()].concat();
        let prefix = bundle(
            dir.path(),
            &[("bias", float(&[2], 8, &b)), ("weight", float(&[2], 0, &w))],
            &data,
        );
        assert_eq!(
            kind(load(&prefix, true)),
            CheckpointKindOrOk::Kind(K::Inconsistent)
        );
        let l = load(&prefix, false).unwrap();
        assert!(!l.in_order);
        assert_eq!(l.tensors[1].2, [3.0, 4.0]);
    }

    /// Our own saves bind names, dtypes, shapes and checksums: an exchange of values with the
    /// offsets kept in order (the bytes themselves swapped, checksums recomputed) and a
    /// reshape are refused even where the layout alone could not tell.
    #[test]
    fn what_our_save_binds_catches_exchanged_values_and_reshapes() {
        use crate::cpu::CpuEma;
        use crate::schedule::{Numerics, Schedule};
        use crate::tensors::TensorSpec;
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("ckpt");
        let mut ema = CpuEma::new(Schedule::constant(0.5), Numerics::Exact).unwrap();
        ema.track(TensorSpec::new("b", [7]), &[1.0; 7]).unwrap();
        ema.update(&[&[3.0; 7]]).unwrap();
        let mut params = HostTensors::new();
        params
            .insert(TensorSpec::new("b", [7]), vec![3.0; 7])
            .unwrap();
        save_tf(&prefix, &ema, Some(&params), &HostTensors::new()).unwrap();
        assert!(load(&prefix, true).is_ok());
        let index_path = with_suffix(&prefix, ".index");
        let data_path0 = data_path(&prefix, 0, 1);
        let kv = table::read(&std::fs::read(&index_path).unwrap()).unwrap();
        let data = std::fs::read(&data_path0).unwrap();
        type Entries = Vec<(Vec<u8>, BundleEntry)>;
        let rewrite = |edit: &dyn Fn(&mut Entries, &mut Vec<u8>)| {
            let mut entries: Entries = kv[1..]
                .iter()
                .map(|(k, v)| (k.clone(), BundleEntry::decode(v.as_slice()).unwrap()))
                .collect();
            let mut d = data.clone();
            edit(&mut entries, &mut d);
            let mut out = vec![kv[0].clone()];
            out.extend(entries.iter().map(|(k, e)| (k.clone(), e.encode_to_vec())));
            std::fs::write(&index_path, table::build(&out)).unwrap();
            std::fs::write(&data_path0, &d).unwrap();
            kind(load(&prefix, true))
        };
        let find = |entries: &Entries, name: &str| {
            entries
                .iter()
                .position(|(k, _)| k == name.as_bytes())
                .unwrap()
        };
        // `b` and its shadow exchange their bytes; each entry's checksum recomputed.
        let got = rewrite(&|entries, d| {
            let (i, j) = (
                find(entries, "b"),
                find(entries, "b/ExponentialMovingAverage"),
            );
            let (ei, ej) = (entries[i].1.clone(), entries[j].1.clone());
            let (ri, rj) = (
                ei.offset as usize..(ei.offset + ei.size) as usize,
                ej.offset as usize..(ej.offset + ej.size) as usize,
            );
            let (bi, bj) = (d[ri.clone()].to_vec(), d[rj.clone()].to_vec());
            d[ri].copy_from_slice(&bj);
            d[rj].copy_from_slice(&bi);
            entries[i].1.crc32c = table::mask(crc32c::crc32c(&bj));
            entries[j].1.crc32c = table::mask(crc32c::crc32c(&bi));
        });
        assert_eq!(
            got,
            CheckpointKindOrOk::Kind(K::Checksum),
            "exchanged values"
        );
        // [7] → [7, 1].
        let got = rewrite(&|entries, _| {
            let i = find(entries, "b");
            if let Some(s) = entries[i].1.shape.as_mut() {
                s.dim.push(Dim {
                    size: 1,
                    name: String::new(),
                });
            }
        });
        assert_eq!(got, CheckpointKindOrOk::Kind(K::Checksum), "reshape");
    }

    /// Saves over one prefix alternate between one data file and two, and remove the other
    /// count's files once committed.
    #[test]
    fn saves_over_one_prefix_alternate_their_data_files() {
        use crate::cpu::CpuEma;
        use crate::schedule::{Numerics, Schedule};
        use crate::tensors::TensorSpec;
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("latest");
        let data_files = || {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("latest.data-"))
                .collect();
            v.sort();
            v
        };
        for step in 1..=4u64 {
            let mut ema = CpuEma::new(Schedule::constant(0.5), Numerics::Exact).unwrap();
            ema.track(TensorSpec::new("w", [3]), &[step as f32; 3])
                .unwrap();
            ema.set_num_updates(step);
            let mut params = HostTensors::new();
            params
                .insert(TensorSpec::new("w", [3]), vec![step as f32; 3])
                .unwrap();
            save_tf(&prefix, &ema, Some(&params), &HostTensors::new()).unwrap();
            assert_eq!(
                current_shards(&prefix),
                Some(if step % 2 == 1 { 1 } else { 2 })
            );
            let want: &[&str] = if step % 2 == 1 {
                &["latest.data-00000-of-00001"]
            } else {
                &["latest.data-00000-of-00002", "latest.data-00001-of-00002"]
            };
            assert_eq!(data_files(), want, "after save {step}");
            let l = load(&prefix, true).unwrap();
            assert_eq!(l.metadata[META_NUM_UPDATES], step.to_string());
            assert_eq!(l.tensors[0].2, [step as f32; 3]);
        }
        // A stale data file of the prefix goes; files that merely start alike stay.
        for f in [
            "latest.data-00002-of-00003",
            "latest2.data-00000-of-00001",
            "latest.data-notes",
            "latest.data-x-of-y",
            "latest.data-0000a-of-00002",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        remove_other_data(&prefix, 2);
        assert!(dir.path().join("latest2.data-00000-of-00001").exists());
        assert_eq!(
            data_files(),
            [
                "latest.data-00000-of-00002",
                "latest.data-00001-of-00002",
                "latest.data-0000a-of-00002",
                "latest.data-notes",
                "latest.data-x-of-y",
            ]
        );
    }

    /// Seeded random edits of every field of every entry of a bundle, with valid table
    /// checksums: never a panic, and whatever loads reads only bytes inside the data file.
    #[test]
    fn random_entry_edits_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<[f32; 3]> = (0..4).map(|i| [i as f32, 1.0, -2.0]).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| le(v)).collect();
        let names = ["a", "b", "c", "d"];
        let mut rng = fastrand::Rng::with_seed(19);
        let mut loaded = 0;
        for _ in 0..2000 {
            let mut entries: Vec<(&str, BundleEntry)> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, float(&[3], 12 * i as i64, &data[12 * i..12 * i + 12])))
                .collect();
            let e = &mut entries[rng.usize(..4)].1;
            let big = |rng: &mut fastrand::Rng| match rng.u8(0..4) {
                0 => rng.i64(..),
                1 => 1i64 << rng.u32(0..63),
                2 => -rng.i64(0..100),
                _ => rng.i64(0..64),
            };
            match rng.u8(0..6) {
                0 => e.offset = big(&mut rng),
                1 => e.size = big(&mut rng),
                2 => e.dtype = rng.i32(0..30),
                3 => e.shard_id = rng.i32(-2..3),
                4 => {
                    if let Some(s) = e.shape.as_mut() {
                        s.dim = (0..rng.usize(0..4))
                            .map(|_| Dim {
                                size: big(&mut rng),
                                name: String::new(),
                            })
                            .collect();
                    }
                }
                _ => e.crc32c = rng.u32(..),
            }
            let prefix = bundle(dir.path(), &entries, &data);
            if let Ok(l) = load(&prefix, true) {
                loaded += 1;
                let bytes: usize = l.tensors.iter().map(|(_, _, v)| v.len() * 4).sum();
                assert!(
                    bytes <= data.len(),
                    "{bytes} bytes read from {}",
                    data.len()
                );
            }
        }
        assert!(loaded > 0 && loaded < 2000, "{loaded} of 2000 loaded");
    }
}
