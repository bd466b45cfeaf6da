//! Reading a safetensors file one piece of a tensor at a time, with positioned reads: host
//! memory for the header and one chunk, whatever the file's size. What post-hoc synthesis
//! streams its snapshots through, and what `wgpu-ema inspect` lists.

use crate::error::CheckpointErrorKind as K;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;
use safetensors::Dtype;

use super::checksum;
use super::errors::{bad, bad_from, bad_tensor, io};
use super::load::{check_header_size, too_short};
use crate::error::Result;
use crate::tensors::ParamDtype;

/// One tensor of a [`TensorFile`]: name, dtype, shape and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// The name in the file.
    pub name: String,
    /// safetensors' name of the element type (`"F32"`, `"F16"`, `"BF16"`, `"I64"`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The element type when it is one this crate reads as floats.
    pub float: Option<ParamDtype>,
    /// Byte offset of the data in the file.
    offset: u64,
    /// Bytes of data.
    len: u64,
    /// The checksum our writer stored for it, if any.
    crc: Option<u32>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A safetensors file opened for streaming: the header parsed and validated (sizes, offsets,
/// metadata checksum), the data read only when asked for, chunk by chunk, each tensor's
/// checksum verified as its last chunk is read.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    metadata: HashMap<String, String>,
    tensors: Vec<TensorEntry>,
    verified: bool,
}

impl TensorFile {
    /// Opens `path` and validates its header, which must carry wgpu-ema's checksums: a file
    /// without them (another tool's, or one whose checksum keys were edited away) is refused
    /// with [`Unverified`](crate::error::CheckpointErrorKind::Unverified). Post-hoc snapshots
    /// are always read this way.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let f = Self::open_unverified(path)?;
        if !f.verified {
            return Err(bad(
                &f.path,
                K::Unverified,
                "carries no wgpu-ema checksums (written by another tool, or its checksum keys \
                 were edited): nothing in it can be verified; open it with \
                 TensorFile::open_unverified (`--allow-unverified`) if you trust it",
            ));
        }
        Ok(f)
    }

    /// [`open`](Self::open), also accepting a file without wgpu-ema's checksums (another
    /// tool's): [`has_checksums`](Self::has_checksums) says which it was.
    pub fn open_unverified(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(|_| too_short(path, len))?;
        let n = u64::from_le_bytes(head);
        check_header_size(path, n, len)?;
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io(path))?;
        let parsed: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad_from(path, K::Format, "not a valid safetensors header", e))?;
        if parsed.data_len() as u64 != len - 8 - n {
            return Err(bad(
                path, K::Truncated,
                format!(
                    "the header describes {} bytes of data, the file holds {}: truncated or extended",
                    parsed.data_len(),
                    len - 8 - n
                ),
            ));
        }
        let metadata = parsed.metadata().clone().unwrap_or_default();
        let mut tensors: Vec<TensorEntry> = parsed
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
                float: match info.dtype {
                    Dtype::F32 => Some(ParamDtype::F32),
                    Dtype::F16 => Some(ParamDtype::F16),
                    Dtype::BF16 => Some(ParamDtype::BF16),
                    _ => None,
                },
                offset: 8 + n + info.data_offsets.0 as u64,
                len: (info.data_offsets.1 - info.data_offsets.0) as u64,
                crc: None,
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let crcs = checksum::verify_metadata(path, &metadata, tensors.len())?;
        let verified = crcs.is_some();
        // Our writer lists the checksums in name order.
        for (t, crc) in tensors.iter_mut().zip(crcs.into_iter().flatten()) {
            t.crc = Some(crc);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
            tensors,
            verified,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `__metadata__`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor, in name order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// True when the file carries wgpu-ema's checksums (each tensor is verified as it is
    /// read; the metadata was verified on open).
    pub fn has_checksums(&self) -> bool {
        self.verified
    }

    /// `acc += weight * tensor` for tensor `name` (f32, or f16/bf16 widened exactly), read in
    /// pieces of `chunk` elements; a tensor of a million elements or more is split across the
    /// cores, each reading and adding its own range. The checksum is verified at the end (the
    /// ranges' CRCs combined): on a mismatch `acc` holds garbage and an error is returned.
    pub fn accumulate_into(
        &self,
        name: &str,
        weight: f32,
        acc: &mut [f32],
        chunk: usize,
    ) -> Result<()> {
        let (t, dtype) = self.float_entry(name)?;
        if acc.len() as u64 != t.numel() {
            return Err(bad_tensor(
                &self.path,
                K::Shape,
                name,
                format!(
                    "tensor `{name}` has {} elements, the accumulator {}",
                    t.numel(),
                    acc.len()
                ),
            ));
        }
        let size = dtype.size() as usize;
        let threads = if acc.len() >= 1 << 20 {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8)
        } else {
            1
        };
        let part = acc.len().div_ceil(threads).next_multiple_of(1024).max(1);
        let file = &self.file;
        // Each range: its CRC (from 0) and byte length, in order.
        let results: Vec<std::io::Result<(u32, usize)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = acc
                .chunks_mut(part)
                .enumerate()
                .map(|(i, dst)| {
                    let offset = t.offset + (i * part * size) as u64;
                    scope.spawn(move || add_range(file, offset, dtype, weight, dst, chunk))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a reader thread panicked")))
                })
                .collect()
        });
        let mut crc = checksum::tensor_start(&t.name, &t.shape);
        for r in results {
            let (part_crc, len) = r.map_err(io(&self.path))?;
            crc = crc32c::crc32c_combine(crc, part_crc, len);
        }
        self.verify(t, crc)
    }

    /// Tensor `name` and its element type, or an error naming it: missing, or not a float
    /// type this crate reads.
    fn float_entry(&self, name: &str) -> Result<(&TensorEntry, ParamDtype)> {
        let t = self.entry(name).ok_or_else(|| {
            bad_tensor(
                &self.path,
                K::MissingTensor,
                name,
                format!("tensor `{name}` is missing"),
            )
        })?;
        let dtype = t.float.ok_or_else(|| {
            bad_tensor(
                &self.path,
                K::Dtype,
                name,
                format!("tensor `{name}` has dtype {}, not a float type", t.dtype),
            )
        })?;
        Ok((t, dtype))
    }

    /// Checks the CRC32C of all of `t`'s bytes (name and shape first) against the one written.
    fn verify(&self, t: &TensorEntry, crc: u32) -> Result<()> {
        match t.crc {
            Some(want) if want != crc => Err(checksum::mismatch(&self.path, &t.name, crc, want)),
            _ => Ok(()),
        }
    }

    /// Tensor `name` as f32, whole (f16 and bf16 widened exactly; checksum verified).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, dtype) = self.float_entry(name)?;
        let mut out = vec![0.0f32; t.numel() as usize];
        let mut pieces = Pieces::new(&self.file, dtype, CHUNK);
        for (i, dst) in out.chunks_mut(CHUNK).enumerate() {
            pieces
                .read_into(t.offset + (i * CHUNK) as u64 * dtype.size(), dst)
                .map_err(io(&self.path))?;
        }
        let crc = checksum::tensor_start(&t.name, &t.shape);
        self.verify(t, crc32c::crc32c_combine(crc, pieces.crc, pieces.bytes))?;
        Ok(out)
    }
}

impl TensorFile {
    /// Elements `start .. start + len` of tensor `name` as f32. The whole tensor is read, a
    /// piece at a time, so that its checksum is verified, but only the range is kept: memory
    /// for the range and one piece.
    pub fn read_f32_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<f32>> {
        let (t, dtype) = self.float_entry(name)?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= t.numel())
            .ok_or_else(|| {
                bad_tensor(
                    &self.path,
                    K::Shape,
                    name,
                    format!(
                        "elements {start}..+{len} of tensor `{name}`, which has {}",
                        t.numel()
                    ),
                )
            })?;
        let mut out = Vec::with_capacity(len as usize);
        let mut pieces = Pieces::new(&self.file, dtype, CHUNK);
        let mut buf = vec![0f32; CHUNK.min(t.numel() as usize)];
        let mut at = 0u64;
        while at < t.numel() {
            let n = (t.numel() - at).min(CHUNK as u64) as usize;
            let piece = &mut buf[..n];
            pieces
                .read_into(t.offset + at * dtype.size(), piece)
                .map_err(io(&self.path))?;
            let (lo, hi) = (start.max(at), end.min(at + n as u64));
            if lo < hi {
                out.extend_from_slice(&piece[(lo - at) as usize..(hi - at) as usize]);
            }
            at += n as u64;
        }
        let crc = checksum::tensor_start(&t.name, &t.shape);
        self.verify(t, crc32c::crc32c_combine(crc, pieces.crc, pieces.bytes))?;
        Ok(out)
    }
}

/// Elements per positioned read where the caller does not choose.
const CHUNK: usize = 1 << 20;

/// Reads pieces of one tensor's data as f32, keeping the CRC32C (from 0) and the count of the
/// bytes read. Its buffer is typed, so the bytes land aligned for their element type.
struct Pieces<'a> {
    file: &'a File,
    dtype: ParamDtype,
    halves: Vec<u16>,
    crc: u32,
    bytes: usize,
}

impl<'a> Pieces<'a> {
    fn new(file: &'a File, dtype: ParamDtype, chunk: usize) -> Self {
        let halves = if dtype == ParamDtype::F32 { 0 } else { chunk };
        Self {
            file,
            dtype,
            halves: vec![0; halves],
            crc: 0,
            bytes: 0,
        }
    }

    /// Fills `out` with the `out.len()` elements at byte `at` (at most `chunk` of them).
    fn read_into(&mut self, at: u64, out: &mut [f32]) -> std::io::Result<()> {
        let n = out.len();
        if self.dtype == ParamDtype::F32 {
            // f32 lands in place: no copy.
            let raw: &mut [u8] = bytemuck::cast_slice_mut(out);
            read_at(self.file, raw, at)?;
            self.crc = crc32c::crc32c_append(self.crc, raw);
            if cfg!(target_endian = "big") {
                for v in out.iter_mut() {
                    *v = f32::from_bits(v.to_bits().swap_bytes());
                }
            }
        } else {
            let buf = &mut self.halves[..n];
            let raw: &mut [u8] = bytemuck::cast_slice_mut(buf);
            read_at(self.file, raw, at)?;
            self.crc = crc32c::crc32c_append(self.crc, raw);
            if cfg!(target_endian = "big") {
                for v in buf.iter_mut() {
                    *v = v.swap_bytes();
                }
            }
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            match self.dtype {
                ParamDtype::BF16 => buf
                    .reinterpret_cast::<half::bf16>()
                    .convert_to_f32_slice(out),
                _ => buf
                    .reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(out),
            }
        }
        self.bytes += n * self.dtype.size() as usize;
        Ok(())
    }
}

/// `dst += weight * values` for the elements at byte `offset` of `file`, read `chunk` at a
/// time; returns the CRC32C (from 0) of the bytes read and their length.
fn add_range(
    file: &File,
    offset: u64,
    dtype: ParamDtype,
    weight: f32,
    dst: &mut [f32],
    chunk: usize,
) -> std::io::Result<(u32, usize)> {
    let chunk = chunk.clamp(1, dst.len().max(1));
    let mut pieces = Pieces::new(file, dtype, chunk);
    let mut values = vec![0f32; chunk];
    for (i, out) in dst.chunks_mut(chunk).enumerate() {
        let values = &mut values[..out.len()];
        pieces.read_into(offset + (i * chunk) as u64 * dtype.size(), values)?;
        for (a, &v) in out.iter_mut().zip(values.iter()) {
            *a += weight * v;
        }
    }
    Ok((pieces.crc, pieces.bytes))
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
fn read_at(_file: &File, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "positioned reads are not available on this platform",
    ))
}
