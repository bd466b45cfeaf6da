//! Checksums of what we write: safetensors has none, so every file we save carries, in its
//! metadata, the CRC32C of the other metadata and of each tensor (name, shape, then bytes),
//! verified on load. A bit flipped anywhere that matters is an error naming the file and the
//! tensor; files written by other tools (no checksums) still load, and say so
//! ([`Checkpoint::verified`](super::Checkpoint::verified)).

use crate::error::CheckpointErrorKind as K;
use std::collections::HashMap;

pub use crate::names::META_CHECKSUMS;

const PREFIX: &str = "v1;meta=";

/// CRC32C of the metadata other than the checksums: `key=value\n` in key order.
pub(crate) fn metadata_crc(meta: &HashMap<String, String>) -> u32 {
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != META_CHECKSUMS).collect();
    keys.sort();
    keys.iter().fold(0, |crc, k| {
        let crc = crc32c::crc32c_append(crc, k.as_bytes());
        let crc = crc32c::crc32c_append(crc, b"=");
        let crc = crc32c::crc32c_append(crc, meta[*k].as_bytes());
        crc32c::crc32c_append(crc, b"\n")
    })
}

/// The running CRC32C of a tensor, started from its name (length, bytes) and shape (rank, then
/// each dimension, all as u64 little-endian), so that a renamed tensor or a changed shape of
/// the same size is caught too; the data's bytes follow.
pub(crate) fn tensor_start(name: &str, shape: &[usize]) -> u32 {
    let mut crc = crc32c::crc32c(&(name.len() as u64).to_le_bytes());
    crc = crc32c::crc32c_append(crc, name.as_bytes());
    crc = crc32c::crc32c_append(crc, &(shape.len() as u64).to_le_bytes());
    for &d in shape {
        crc = crc32c::crc32c_append(crc, &(d as u64).to_le_bytes());
    }
    crc
}

/// The value written before the tensors' checksums are known: fixed width, patched in place.
pub(crate) fn placeholder(meta_crc: u32, tensors: usize) -> String {
    let zeros = vec!["00000000"; tensors].join(",");
    format!("{PREFIX}{meta_crc:08x};{zeros}")
}

/// Byte offset, within the placeholder, of the tensors' checksums.
pub(crate) fn tensors_at() -> usize {
    PREFIX.len() + 9
}

/// The tensors' checksums as written over the placeholder's zeros.
pub(crate) fn tensor_list(crcs: &[u32]) -> String {
    crcs.iter()
        .map(|c| format!("{c:08x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// True for metadata of a file written by wgpu-ema 0.2 or later, which always carries
/// checksums: their absence then means damage (a flipped byte in the key), not another writer.
/// Files of wgpu-ema 0.1 have none and load unverified.
pub(crate) fn required(meta: &HashMap<String, String>) -> bool {
    let Some(v) = meta.get(super::META_VERSION) else {
        return false;
    };
    let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (0, 2),
        // Not a version we wrote: damaged.
        _ => true,
    }
}

/// Checks the metadata of a file of `tensors` tensors at `path`: `None` for a file without
/// checksums from another writer, the tensors' checksums (in name order) when the metadata's
/// own checksum matches, an error for damage (missing where required, malformed, mismatched,
/// or a count that is not the tensors').
pub(crate) fn verify_metadata(
    path: &std::path::Path,
    meta: &HashMap<String, String>,
    tensors: usize,
) -> crate::error::Result<Option<Vec<u32>>> {
    use super::errors::bad;
    let Some(v) = meta.get(META_CHECKSUMS) else {
        if required(meta) {
            return Err(bad(
                path, K::Checksum,
                "written by wgpu-ema 0.2 or later but without checksums: the file was changed or damaged",
            ));
        }
        return Ok(None);
    };
    let (meta_crc, crcs) =
        parse(v).ok_or_else(|| bad(path, K::Checksum, "malformed checksums in the metadata"))?;
    if metadata_crc(meta) != meta_crc {
        return Err(bad(
            path,
            K::Checksum,
            "metadata checksum mismatch: the file was changed or damaged",
        ));
    }
    if crcs.len() != tensors {
        return Err(bad(
            path,
            K::Checksum,
            format!(
                "{} checksums for {tensors} tensors: the file was changed or damaged",
                crcs.len()
            ),
        ));
    }
    Ok(Some(crcs))
}

/// The error for tensor `name` whose bytes do not match the checksum written.
pub(crate) fn mismatch(
    path: &std::path::Path,
    name: &str,
    got: u32,
    want: u32,
) -> crate::error::Error {
    super::errors::bad_tensor(path, K::Checksum, name, format!("tensor `{name}`: checksum mismatch (crc32c {got:08x}, written {want:08x}): the file was changed or damaged"),
    )
}

/// Exactly 8 lowercase hex digits, as written (anything else is a damaged value).
fn hex8(s: &str) -> Option<u32> {
    let ok = s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

/// (metadata checksum, tensor checksums) from the metadata value, or `None` if malformed.
pub(crate) fn parse(value: &str) -> Option<(u32, Vec<u32>)> {
    let rest = value.strip_prefix(PREFIX)?;
    let (meta, list) = rest.split_once(';')?;
    let meta = hex8(meta)?;
    let list = if list.is_empty() {
        Vec::new()
    } else {
        list.split(',').map(hex8).collect::<Option<Vec<u32>>>()?
    };
    Some((meta, list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_parses_and_patches() {
        let p = placeholder(0xdeadbeef, 3);
        assert_eq!(parse(&p), Some((0xdeadbeef, vec![0, 0, 0])));
        let mut patched = p.clone();
        let list = tensor_list(&[1, 0xffffffff, 42]);
        patched.replace_range(tensors_at()..tensors_at() + list.len(), &list);
        assert_eq!(parse(&patched), Some((0xdeadbeef, vec![1, 0xffffffff, 42])));
        assert_eq!(parse(&placeholder(7, 0)), Some((7, vec![])));
        assert_eq!(parse("v2;meta=0;"), None);
        assert_eq!(
            parse("v1;meta=0000000A;"),
            None,
            "uppercase is not what we write"
        );
    }

    #[test]
    fn name_and_shape_change_the_checksum() {
        assert_ne!(tensor_start("a", &[2, 3]), tensor_start("a", &[3, 2]));
        assert_ne!(tensor_start("a", &[]), tensor_start("a", &[1]));
        assert_ne!(tensor_start("a", &[1]), tensor_start("b", &[1]));
    }
}
