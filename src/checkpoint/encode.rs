//! The safetensors encoding of our checkpoints, to any seekable writer: a file being written
//! atomically (`write`), or bytes in memory, which is how a browser page saves one.

use crate::error::CheckpointErrorKind as K;
use std::collections::HashMap;
use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use super::checksum;
use super::errors::{bad, bad_from, bad_tensor, io};
use crate::error::{Error, Result};
use crate::names::RESERVED_NAME;
use crate::tensors::ParamDtype;

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

impl Entry<'_> {
    /// Calls `produce` and checks that it gave as many values as the shape holds: what a
    /// writer of any format puts in a file (named after `path`) must match its header.
    pub(crate) fn produce_checked(&mut self, path: &std::path::Path) -> Result<Vec<f32>> {
        let values = (self.produce)()?;
        let numel = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(values.len()) {
            return Err(bad_tensor(
                path,
                K::Shape,
                &self.name,
                format!(
                    "tensor `{}`: {} values for shape {:?}",
                    self.name,
                    values.len(),
                    self.shape
                ),
            ));
        }
        Ok(values)
    }
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

    /// Bytes of data, or `None` when the shape's size overflows.
    pub(super) fn bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64))
    }
}

/// A file ready to encode: the header, with a placeholder where the tensors' checksums go once
/// they are known, and the entries in file (name) order. Building it checks the names and
/// shapes before anything is written.
pub(super) struct Encoder<'a> {
    /// Names the file in errors.
    path: PathBuf,
    entries: Vec<Entry<'a>>,
    header: Vec<u8>,
    /// Byte offset, from the start of the file, of the checksums' placeholder.
    patch_at: u64,
    /// What the file writer reports (the web has none).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    data_bytes: u64,
    dtype: ParamDtype,
}

impl<'a> Encoder<'a> {
    pub(super) fn new(
        path: &Path,
        mut entries: Vec<Entry<'a>>,
        metadata: &HashMap<String, String>,
        dtype: ParamDtype,
    ) -> Result<Self> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let stored = match dtype {
            ParamDtype::F32 => Dtype::F32,
            ParamDtype::F16 => Dtype::F16,
            ParamDtype::BF16 => Dtype::BF16,
        };
        let mut infos = Vec::with_capacity(entries.len());
        let mut offset = 0usize;
        for (i, e) in entries.iter().enumerate() {
            if e.name == RESERVED_NAME || (i > 0 && entries[i - 1].name == e.name) {
                return Err(Error::NameCollision {
                    name: e.name.clone(),
                    with: if e.name == RESERVED_NAME {
                        "safetensors' reserved `__metadata__`".into()
                    } else {
                        "another tensor of the same file".into()
                    },
                });
            }
            let n = e
                .bytes()
                .map(|n| n / 4 * dtype.size())
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| offset.checked_add(n).map(|end| (n, end)))
                .ok_or_else(|| {
                    bad(
                        path,
                        K::Refused,
                        format!("tensor `{}`: shape {:?} is too large", e.name, e.shape),
                    )
                })?;
            infos.push((
                e.name.clone(),
                TensorInfo {
                    dtype: stored,
                    shape: e.shape.clone(),
                    data_offsets: (offset, n.1),
                },
            ));
            offset = n.1;
        }
        let mut metadata = metadata.clone();
        metadata.remove(checksum::META_CHECKSUMS);
        let placeholder = checksum::placeholder(checksum::metadata_crc(&metadata), entries.len());
        metadata.insert(checksum::META_CHECKSUMS.to_string(), placeholder.clone());
        let header = Metadata::new(Some(metadata), infos)
            .map_err(|e| bad_from(path, K::Format, "cannot describe the tensors", e))?;
        let mut header = serde_json::to_string(&header)
            .map_err(|e| bad_from(path, K::Format, "cannot encode the header", e))?
            .into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        // Where the tensors' checksums go once they are known (the placeholder needs no escaping).
        let patch_at = header
            .windows(placeholder.len())
            .position(|w| w == placeholder.as_bytes())
            .map(|p| 8 + (p + checksum::tensors_at()) as u64)
            .ok_or_else(|| bad(path, K::Format, "cannot place the checksums in the header"))?;
        Ok(Self {
            path: path.to_path_buf(),
            entries,
            header,
            patch_at,
            data_bytes: offset as u64,
            dtype,
        })
    }

    /// Bytes of tensor data the file holds.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(super) fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Writes the file from `w`'s current position (which must be its start), producing each
    /// tensor's values in turn, then patches the checksums into the header.
    pub(super) fn write_to<W: Write + Seek>(mut self, w: &mut W) -> Result<()> {
        let path = self.path.as_path();
        let dtype = self.dtype;
        let entries = &mut self.entries;
        w.write_all(&(self.header.len() as u64).to_le_bytes())
            .map_err(io(path))?;
        w.write_all(&self.header).map_err(io(path))?;
        let mut crcs = Vec::with_capacity(entries.len());
        for e in entries.iter_mut() {
            let values = e.produce_checked(path)?;
            let crc = checksum::tensor_start(&e.name, &e.shape);
            crcs.push(match dtype {
                ParamDtype::F32 => write_f32_le(w, &values, crc).map_err(io(path))?,
                _ => {
                    let bytes = to_half_le(&values, dtype).map_err(|i| {
                        bad(
                            path, K::Refused,
                            format!(
                                "tensor `{}`: element {i} ({}) does not fit f16; store the snapshots as f32 or bf16",
                                e.name, values[i]
                            ),
                        )
                    })?;
                    w.write_all(&bytes).map_err(io(path))?;
                    crc32c::crc32c_append(crc, &bytes)
                }
            });
        }
        w.seek(SeekFrom::Start(self.patch_at)).map_err(io(path))?;
        w.write_all(checksum::tensor_list(&crcs).as_bytes())
            .map_err(io(path))?;
        Ok(())
    }
}

/// Encodes a safetensors file in memory: what [`write_safetensors_as`](super::write_safetensors_as)
/// writes to disk, through the same code, for a page to offer as a download (or to send
/// anywhere). (The metadata's keys, like those of every save, come in no fixed order.)
/// Holds the whole file in memory.
///
/// ```
/// use std::collections::HashMap;
/// use wgpu_ema::checkpoint::{safetensors_bytes, Checkpoint, Entry};
/// use wgpu_ema::ParamDtype;
/// let w = [0.5f32, -1.25];
/// let bytes = safetensors_bytes(vec![Entry::from_slice("w", &[2], &w)], &HashMap::new(), ParamDtype::F32)?;
/// let back = Checkpoint::from_bytes(bytes)?;
/// assert_eq!(back.get("w").unwrap().1, &w);
/// # Ok::<(), wgpu_ema::Error>(())
/// ```
pub fn safetensors_bytes(
    entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
    dtype: ParamDtype,
) -> Result<Vec<u8>> {
    let file = Encoder::new(Path::new(super::IN_MEMORY), entries, metadata, dtype)?;
    let mut out = Cursor::new(Vec::new());
    file.write_to(&mut out)?;
    Ok(out.into_inner())
}

/// `values` as little-endian f16 or bf16 (round to nearest even), or the index of the first
/// finite value that overflows to infinity.
fn to_half_le(values: &[f32], dtype: ParamDtype) -> std::result::Result<Vec<u8>, usize> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for (i, &v) in values.iter().enumerate() {
        let (bits, inf) = match dtype {
            ParamDtype::BF16 => {
                let h = half::bf16::from_f32(v);
                (h.to_bits(), h.is_infinite())
            }
            _ => {
                let h = half::f16::from_f32(v);
                (h.to_bits(), h.is_infinite())
            }
        };
        if inf && v.is_finite() {
            return Err(i);
        }
        out.extend_from_slice(&bits.to_le_bytes());
    }
    Ok(out)
}

/// Writes `values` little-endian; returns the CRC32C of the bytes appended to `crc`.
pub(super) fn write_f32_le(w: &mut dyn Write, values: &[f32], crc: u32) -> std::io::Result<u32> {
    if cfg!(target_endian = "little") {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        w.write_all(bytes)?;
        Ok(crc32c::crc32c_append(crc, bytes))
    } else {
        values.iter().try_fold(crc, |crc, v| {
            let b = v.to_le_bytes();
            w.write_all(&b)?;
            Ok(crc32c::crc32c_append(crc, &b))
        })
    }
}
