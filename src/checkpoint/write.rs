//! Writing safetensors files atomically, one tensor in memory at a time, and sharded.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// A tensor to write: its name, shape, and a function producing its values when the writer
/// reaches it (so only one tensor is in host memory at a time).
pub struct Entry<'a> {
    /// The name in the file.
    pub name: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Produces the values; called once, in file order.
    pub produce: Box<dyn FnMut() -> Result<Vec<f32>> + 'a>,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<'a> Entry<'a> {
    /// An entry whose values are already on the host.
    pub fn from_slice(name: impl Into<String>, shape: &[usize], values: &'a [f32]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            produce: Box::new(move || Ok(values.to_vec())),
        }
    }

    fn bytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * 4
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed and
/// fsynced, renamed over `path`, then the directory fsynced.
pub(crate) fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ckpt_err(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{unique}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io(path))?;
        // Make the rename itself durable. Some filesystems refuse fsync on a directory.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes one safetensors file of f32 tensors, atomically; returns the bytes of tensor data.
/// Tensors are stored in name order; `metadata` becomes `__metadata__`.
pub fn write_safetensors(
    path: &Path,
    mut entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
) -> Result<u64> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut infos = Vec::with_capacity(entries.len());
    let mut offset = 0usize;
    for e in &entries {
        let n = e.bytes() as usize;
        infos.push((
            e.name.clone(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: e.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let header = Metadata::new(Some(metadata.clone()), infos)
        .map_err(|e| ckpt_err(path, format!("cannot describe the tensors: {e}")))?;
    let mut header = serde_json::to_string(&header)
        .map_err(|e| ckpt_err(path, format!("cannot encode the header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    atomic_write(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io(path))?;
        w.write_all(&header).map_err(io(path))?;
        for e in &mut entries {
            let values = (e.produce)()?;
            if (values.len() as u64) * 4 != e.bytes() {
                return Err(ckpt_err(
                    path,
                    format!(
                        "tensor `{}`: {} values for shape {:?}",
                        e.name,
                        values.len(),
                        e.shape
                    ),
                ));
            }
            write_f32_le(w, &values).map_err(io(path))?;
        }
        Ok(())
    })?;
    Ok(offset as u64)
}

fn write_f32_le(w: &mut dyn Write, values: &[f32]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(values))
    } else {
        values
            .iter()
            .try_for_each(|v| w.write_all(&v.to_le_bytes()))
    }
}

/// The index file of a sharded checkpoint, in Hugging Face's layout.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Writes `entries` into shards of at most `max_shard_bytes` of tensor data each (a larger
/// tensor gets a shard of its own) named `model-00001-of-0000N.safetensors`, and the index
/// `model.safetensors.index.json` with `{"metadata": {"total_size": BYTES}, "weight_map":
/// {name: file}}`, in `dir`. Each file is written atomically; the index last, so a crash leaves
/// the previous index pointing at complete shards. Returns the index's path.
pub fn write_sharded(
    dir: &Path,
    mut entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
    max_shard_bytes: u64,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<Entry<'_>>> = Vec::new();
    let mut used = 0u64;
    for e in entries {
        let b = e.bytes();
        if shards.is_empty() || (used + b > max_shard_bytes && used > 0) {
            shards.push(Vec::new());
            used = 0;
        }
        used += b;
        if let Some(last) = shards.last_mut() {
            last.push(e);
        }
    }
    let count = shards.len().max(1);
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        for e in &shard {
            weight_map.insert(e.name.clone(), file.clone());
        }
        total += write_safetensors(&dir.join(&file), shard, metadata)?;
    }
    let mut meta = serde_json::Map::new();
    meta.insert("total_size".into(), total.into());
    for (k, v) in metadata {
        meta.insert(k.clone(), v.clone().into());
    }
    let index = serde_json::json!({ "metadata": meta, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| ckpt_err(&path, format!("cannot encode the index: {e}")))?;
    atomic_write(&path, |w| w.write_all(text.as_bytes()).map_err(io(&path)))?;
    Ok(path)
}
