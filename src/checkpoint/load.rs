//! Reading checkpoints back: one file or a sharded set, validated before anything is used.

use crate::error::CheckpointErrorKind as K;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::SafeTensors;

use super::checksum;
use super::errors::{bad, bad_from, bad_tensor};
#[cfg(not(target_arch = "wasm32"))]
use super::write::META_GENERATION;

#[cfg(not(target_arch = "wasm32"))]
use crate::error::Error;
use crate::error::Result;

/// A whole file's bytes: read from disk into words (so that f32 tensors at 4-byte offsets,
/// as our writer places them, are borrowed in place), or handed in (a browser's file input).
#[derive(Debug)]
enum Bytes {
    #[cfg(not(target_arch = "wasm32"))]
    Words {
        words: Vec<u32>,
        len: usize,
    },
    Heap(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Bytes::Words { words, len } => &bytemuck::cast_slice(words)[..*len],
            Bytes::Heap(v) => v,
        }
    }
}

/// A tensor's values: borrowed from the file's bytes where they are aligned f32 on a
/// little-endian machine (always, for files we write), else copied.
#[derive(Clone, Debug)]
enum Values {
    Mapped {
        map: Arc<Bytes>,
        start: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

impl Values {
    fn as_slice(&self) -> &[f32] {
        match self {
            // Checked to cast when the tensor was loaded.
            Values::Mapped { map, start, len } => {
                bytemuck::try_cast_slice(&map[*start..*start + *len]).unwrap_or_default()
            }
            Values::Owned(v) => v,
        }
    }
}

/// A loaded and validated checkpoint: f32 tensors by name, and the metadata.
///
/// A file is read whole into memory once (host memory of about the file's size; values are
/// borrowed from that copy, not copied again) and verified there: nothing touches the file
/// afterwards, so another program changing or truncating it can make the read fail with an
/// error, never the process fault (as a memory-mapped file would). For files larger than the
/// memory to spare, [`TensorFile`](super::TensorFile) reads one piece at a time.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: BTreeMap<String, (Vec<usize>, Values)>,
    verified: bool,
    /// Tensors present but not read (another dtype), with why: an error when asked for.
    unsupported: BTreeMap<String, String>,
}

/// The largest safetensors header we read (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// A file of `len` bytes, too short to hold a safetensors header's size.
pub(super) fn too_short(path: &Path, len: u64) -> crate::error::Error {
    bad(
        path,
        K::Truncated,
        format!("not a valid safetensors file: {len} bytes, too short for a header"),
    )
}

/// The kind of a safetensors parse error: data that does not reach the end its header
/// declares is a truncated (or extended) file; anything else is not a valid file.
pub(super) fn parse_kind(e: &safetensors::SafeTensorError) -> K {
    match e {
        safetensors::SafeTensorError::MetadataIncompleteBuffer => K::Truncated,
        _ => K::Format,
    }
}

/// Refuses a header size `n` that no real file of `len` bytes has, before anything is parsed:
/// a file cannot make us read or parse more than it holds.
pub(super) fn check_header_size(path: &Path, n: u64, len: u64) -> Result<()> {
    // A header larger than the data it describes (and than a megabyte) is no model's.
    if n > len - 8 || n > MAX_HEADER || (n > 1 << 20 && n > len - 8 - n) {
        // A header that would end past the file (and is not absurd) is a truncated file.
        let kind = if n > len - 8 && n <= MAX_HEADER {
            K::Truncated
        } else {
            K::Format
        };
        let what = if kind == K::Format && n > MAX_HEADER {
            // Not a header size at all: most likely not a checkpoint.
            "; expected a .safetensors file, a sharded checkpoint's index.json, a TensorFlow \
             checkpoint (prefix, .index or its `checkpoint` state file), or a folder holding one"
        } else {
            ""
        };
        return Err(bad(
            path,
            kind,
            format!(
                "not a valid safetensors file: header of {n} bytes in a file of {len} \
                 (at most {MAX_HEADER}){what}"
            ),
        ));
    }
    Ok(())
}

/// The error for a file that carries no checksums of ours.
fn unverified(path: &Path) -> crate::error::Error {
    bad(
        path,
        K::Unverified,
        "carries no wgpu-ema checksums (written by another tool or by wgpu-ema 0.1, or its \
         checksum keys were edited): nothing in it can be verified; if you trust it, read it \
         with Checkpoint::load_unverified (`--allow-unverified` in the command)",
    )
}

impl Checkpoint {
    #[cfg(not(target_arch = "wasm32"))]
    /// Loads a `.safetensors` file, a sharded checkpoint through its
    /// `model.safetensors.index.json`, or a TensorFlow checkpoint by its prefix or its
    /// `.index` file (f32 tensors; `global_step` becomes `num_updates`; every table block and
    /// tensor checksum verified); a folder or TensorFlow's `checkpoint` state file stands for
    /// the latest checkpoint it names (see [`resolve`](super::resolve)). Every file is
    /// validated (header size and offsets by the safetensors parser, f32 dtype, every shard
    /// present and holding the names its index gives); errors name the file and the tensor.
    ///
    /// Every safetensors file must carry wgpu-ema's checksums and match them: a file without
    /// them (another tool's, or one whose checksum keys were edited away) is refused with
    /// [`Unverified`](crate::error::CheckpointErrorKind::Unverified); read such a file with
    /// [`load_unverified`](Self::load_unverified).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let c = Self::load_with(path.as_ref(), true)?;
        if !c.verified {
            return Err(unverified(&c.path));
        }
        Ok(c)
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// [`load`](Self::load), also accepting files without wgpu-ema's checksums (written by
    /// another tool): every check but the checksums is made, files that do carry checksums are
    /// still verified, and [`verified`](Self::verified) says which it was. The explicit choice
    /// to trust a file nothing can verify. (A TensorFlow checkpoint whose float32 tensors are
    /// not laid out in key order, as TensorFlow's Saver writes them, loads here, unverified.)
    pub fn load_unverified(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path.as_ref(), false)
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn load_with(path: &Path, strict: bool) -> Result<Self> {
        let path = super::resolve(path)?;
        let path = path.as_path();
        if let Some(prefix) = super::tf::prefix_of(path) {
            let t = super::tf::load(&prefix, strict)?;
            return Ok(Self {
                path: t.index,
                metadata: t.metadata,
                tensors: t
                    .tensors
                    .into_iter()
                    .map(|(n, s, v)| (n, (s, Values::Owned(v))))
                    .collect(),
                // Every block and tensor matched its CRC32C (and the layout its key order).
                verified: t.in_order,
                unsupported: t.unsupported.into_iter().collect(),
            });
        }
        if path.to_string_lossy().ends_with(".index.json") {
            Self::load_index(path)
        } else {
            Self::load_file(path)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn load_file(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        // The header's size first: a file cannot make us read or parse more than it holds.
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; 8];
        std::io::Read::read_exact(&mut file, &mut head).map_err(|_| too_short(path, len))?;
        check_header_size(path, u64::from_le_bytes(head), len)?;
        // Read through the file, not mapped: a file truncated by another program while we read
        // is a short read (an error), where a mapping would fault on access. Measured on a
        // 256 MiB checkpoint (load and verify, warm page cache, 2 cores): 0.021 s mapped, 0.15 s
        // read: the price of never faulting.
        let len_usize = usize::try_from(len).map_err(|_| too_short(path, len))?;
        let mut words = vec![0u32; len_usize.div_ceil(4)];
        let bytes: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut words)[..len_usize];
        bytes[..8].copy_from_slice(&head);
        std::io::Read::read_exact(&mut file, &mut bytes[8..]).map_err(|e| {
            bad_from(
                path,
                K::Truncated,
                format!("the file ended while being read ({len} bytes when opened)"),
                e,
            )
        })?;
        Self::parse(
            path,
            Arc::new(Bytes::Words {
                words,
                len: len_usize,
            }),
        )
    }

    /// Reads a safetensors checkpoint from bytes in memory (what a browser's file input
    /// gives), with every check [`load`](Self::load) makes of a file, checksums included.
    /// [`path`](Self::path) is then [`IN_MEMORY`](super::IN_MEMORY).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let c = Self::from_bytes_unverified(bytes)?;
        if !c.verified {
            return Err(unverified(&c.path));
        }
        Ok(c)
    }

    /// [`from_bytes`](Self::from_bytes), also accepting bytes without wgpu-ema's checksums
    /// (as [`load_unverified`](Self::load_unverified) does files).
    pub fn from_bytes_unverified(bytes: Vec<u8>) -> Result<Self> {
        let path = Path::new(super::IN_MEMORY);
        let len = bytes.len() as u64;
        let head: [u8; 8] = bytes
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| too_short(path, len))?;
        check_header_size(path, u64::from_le_bytes(head), len)?;
        Self::parse(path, Arc::new(Bytes::Heap(bytes)))
    }

    /// Parses and validates a whole file whose header size is checked.
    fn parse(path: &Path, map: Arc<Bytes>) -> Result<Self> {
        let bytes: &[u8] = &map;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad_from(path, parse_kind(&e), "not a valid safetensors file", e))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad_from(path, K::Format, "not a valid safetensors file", e))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(bad_tensor(
                    path,
                    K::Dtype,
                    name,
                    format!(
                        "tensor `{name}` has dtype {:?}; wgpu-ema stores F32",
                        view.dtype()
                    ),
                ));
            }
            let data = view.data();
            let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
            let values = if cfg!(target_endian = "little")
                && bytemuck::try_cast_slice::<u8, f32>(data).is_ok()
            {
                Values::Mapped {
                    map: map.clone(),
                    start,
                    len: data.len(),
                }
            } else {
                Values::Owned(
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        let verified = match checksum::verify_metadata(path, &metadata, tensors.len())? {
            None => false,
            Some(crcs) => {
                // Our writer stores tensors in name order, and so lists their checksums.
                for ((name, (shape, _)), want) in tensors.iter().zip(crcs) {
                    let view = st
                        .tensor(name)
                        .map_err(|e| bad_from(path, K::Format, format!("tensor `{name}`"), e))?;
                    let got =
                        crc32c::crc32c_append(checksum::tensor_start(name, shape), view.data());
                    if got != want {
                        return Err(checksum::mismatch(path, name, got, want));
                    }
                }
                true
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            verified,
            unsupported: BTreeMap::new(),
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn load_index(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad_from(path, K::Format, "index is not JSON", e))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(path, K::Format, "index has no `weight_map` object"))?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad_tensor(
                    path,
                    K::Format,
                    name,
                    format!("tensor `{name}`: shard name is not a string"),
                )
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                return Err(bad_tensor(
                    path,
                    K::Format,
                    name,
                    format!("tensor `{name}`: shard `{file}` is not a file name"),
                ));
            }
            by_file.entry(file).or_default().push(name);
        }
        let generation = index
            .get("metadata")
            .and_then(|m| m.get(META_GENERATION))
            .and_then(|g| g.as_str());
        let mut first_gen: Option<Option<String>> = None;
        let mut out = Self {
            path: path.to_path_buf(),
            metadata: HashMap::new(),
            tensors: BTreeMap::new(),
            verified: true,
            unsupported: BTreeMap::new(),
        };
        for (file, names) in by_file {
            let shard_path = dir.join(file);
            if !shard_path.exists() {
                return Err(bad(
                    path,
                    K::MissingTensor,
                    format!("shard `{file}` (holding `{}`) is missing", names[0]),
                ));
            }
            let shard = Self::load_file(&shard_path)?;
            for name in names {
                if !shard.tensors.contains_key(name) {
                    return Err(bad_tensor(
                        &shard_path,
                        K::Inconsistent,
                        name,
                        format!("tensor `{name}` listed in the index is not in this shard"),
                    ));
                }
            }
            // Every shard must come from the save that wrote the index, and from the same
            // save as the first shard (should the index have lost its generation).
            let shard_gen = shard.metadata.get(META_GENERATION).cloned();
            let want = match (generation, &first_gen) {
                (Some(g), _) => Some(g.to_string()),
                (None, Some(first)) => first.clone(),
                (None, None) => shard_gen.clone(),
            };
            first_gen.get_or_insert_with(|| shard_gen.clone());
            if shard_gen != want {
                return Err(bad(
                    &shard_path,
                    K::Inconsistent,
                    format!(
                        "shard of save {:?}, but the checkpoint is of save {:?}: a torn sharded \
                         checkpoint",
                        shard_gen.as_deref().unwrap_or("(none)"),
                        want.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
            out.verified &= shard.verified;
            if out.metadata.is_empty() {
                out.metadata = shard.metadata;
            }
            for (name, t) in shard.tensors {
                if out.tensors.insert(name.clone(), t).is_some() {
                    return Err(bad_tensor(
                        &shard_path,
                        K::Inconsistent,
                        &name,
                        format!("tensor `{name}` is in two shards"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The file it was loaded from (the index for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when every file carried wgpu-ema's checksums and every tensor matched them; false
    /// for files written by other tools (loaded unverified).
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Why tensor `name` is in the file but was not read (a dtype other than float32 in a
    /// TensorFlow checkpoint, such as TF2's `_CHECKPOINTABLE_OBJECT_GRAPH` string), if it is.
    pub fn unsupported(&self, name: &str) -> Option<&str> {
        self.unsupported.get(name).map(String::as_str)
    }

    /// `__metadata__`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's shape and values.
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.tensors
            .get(name)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
    }
}
