//! Writing safetensors files atomically, one tensor in memory at a time, and sharded (the
//! encoding itself is in `encode`).

use crate::error::CheckpointErrorKind as K;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::encode::{Encoder, Entry};
use super::errors::{bad, bad_from, io};
use crate::error::Result;
use crate::tensors::ParamDtype;

/// A token of the process namespace this process's ids belong to: this boot of this
/// machine, and the PID namespace (containers on one host have their own). Only temporaries of
/// the same token can be judged by their process id: others may be another machine's or
/// container's, writing into a shared folder right now.
fn pid_space() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ns = fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!(
            "{:08x}",
            crc32c::crc32c(format!("{boot}|{ns}|{host}").as_bytes())
        )
    })
}

/// Temporary files of saves into `dir` that a crashed process left
/// (`.<name>.tmp-<space>-<pid>-<n>`): removed by the next save into the same directory when
/// their process is gone, which only a process of the same PID space ([`pid_space`]) can tell;
/// others (another machine's, another container's, or where processes cannot be looked up)
/// only once over an hour old.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    let proc_fs = Path::new("/proc/self").exists();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
            continue;
        };
        let parts: Vec<&str> = rest.1.split('-').collect();
        let (space, pid, n) = match parts[..] {
            [space, pid, n] => (Some(space), pid, n),
            // Written before the space was in the name.
            [pid, n] => (None, pid, n),
            _ => continue,
        };
        let (Ok(pid), true) = (pid.parse::<u32>(), n.chars().all(|c| c.is_ascii_digit())) else {
            continue;
        };
        let ours = space.is_none_or(|s| s == pid_space());
        let gone = if proc_fs && ours {
            pid != me && !Path::new(&format!("/proc/{pid}")).exists()
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600)
        };
        if gone {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes to `path` atomically: a temporary file in the same directory, flushed and fsynced,
/// renamed over `path`, then the directory fsynced. Temporaries of crashed saves in the same
/// directory are removed first.
pub(crate) fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| bad(path, K::Refused, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    remove_stale_temporaries(&dir);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}-{unique}",
        pid_space(),
        std::process::id()
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        // Flushed, synced and closed before the rename.
        w.into_inner()
            .map_err(|e| io(&tmp)(e.into_error()))?
            .sync_all()
            .map_err(io(&tmp))?;
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
/// Tensors are stored in name order; `metadata` becomes `__metadata__`, with the checksums
/// added (see `checksum`). Names must be unique and none may be `__metadata__`: checked before
/// anything is written.
pub fn write_safetensors(
    path: &Path,
    entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
) -> Result<u64> {
    write_safetensors_as(path, entries, metadata, ParamDtype::F32)
}

/// [`write_safetensors`], storing every tensor as `dtype`: f32 as given, or rounded to the
/// nearest even f16 or bf16 (half the bytes: what EDM2 stores its post-hoc snapshots in). A
/// finite value that f16 cannot hold (beyond ±65504) is an error naming the tensor, not a
/// silent infinity. Returns the bytes of tensor data.
pub fn write_safetensors_as(
    path: &Path,
    entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
    dtype: ParamDtype,
) -> Result<u64> {
    let file = Encoder::new(path, entries, metadata, dtype)?;
    let bytes = file.data_bytes();
    atomic_write(path, |w| file.write_to(w))?;
    Ok(bytes)
}

pub use crate::names::INDEX_FILE;

pub use crate::names::META_GENERATION;

/// A token no other save of this process or machine uses: time, process and a counter.
fn generation() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // wasm32-unknown-unknown has no clock (SystemTime::now panics there); nor has it files.
    let nanos = if cfg!(target_arch = "wasm32") {
        0
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    };
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{:x}{:x}{n:x}",
        nanos & 0xffff_ffff_ffff,
        std::process::id()
    )
}

/// True for a shard name this writer makes: `model-<generation>-<i>-of-<n>.safetensors`.
fn is_our_shard(name: &str) -> bool {
    name.starts_with("model-") && name.ends_with(".safetensors") && name.contains("-of-")
}

/// Writes `entries` into shards of at most `max_shard_bytes` of tensor data each (a larger
/// tensor gets a shard of its own) and the index `model.safetensors.index.json` with
/// `{"metadata": {"total_size": BYTES, ...}, "weight_map": {name: file}}`, in `dir`.
///
/// Atomic as a set: the shards of each save get names of their own
/// (`model-<generation>-00001-of-0000N.safetensors`, the generation also in every shard's and
/// the index's metadata), so a new save never overwrites a file the current index references;
/// the index, written atomically last, is the commit point; only then are the previous saves'
/// shards removed. A save interrupted at any point leaves the previous index and all its shards
/// intact, and [`Checkpoint::load`](super::Checkpoint::load) refuses a shard of another
/// generation. Runs under the folder's [`FolderLock`](super::FolderLock): a second writer
/// into the same folder is refused with
/// [`Busy`](crate::error::CheckpointErrorKind::Busy). Returns the index's path.
pub fn write_sharded(
    dir: &Path,
    mut entries: Vec<Entry<'_>>,
    metadata: &HashMap<String, String>,
    max_shard_bytes: u64,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    // One sharded writer per folder: the cleanup below removes every shard the new index
    // does not name, which would include another writer's.
    let _writer = super::lock::for_writer(dir)?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<Entry<'_>>> = Vec::new();
    let mut used = 0u64;
    for e in entries {
        let b = e
            .bytes()
            .ok_or_else(|| bad(dir, K::Refused, format!("tensor `{}` is too large", e.name)))?;
        if shards.is_empty() || (used.saturating_add(b) > max_shard_bytes && used > 0) {
            shards.push(Vec::new());
            used = 0;
        }
        used = used.saturating_add(b);
        if let Some(last) = shards.last_mut() {
            last.push(e);
        }
    }
    let gen = generation();
    let mut metadata = metadata.clone();
    metadata.insert(META_GENERATION.to_string(), gen.clone());
    let count = shards.len().max(1);
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{gen}-{:05}-of-{:05}.safetensors", i + 1, count);
        for e in &shard {
            weight_map.insert(e.name.clone(), file.clone());
        }
        let written = write_safetensors(&dir.join(&file), shard, &metadata);
        files.push(file);
        match written {
            Ok(bytes) => total += bytes,
            Err(e) => {
                // This save's shards are nobody's: the index still names the previous ones.
                for f in &files {
                    let _ = fs::remove_file(dir.join(f));
                }
                return Err(e);
            }
        }
    }
    let mut meta = serde_json::Map::new();
    meta.insert("total_size".into(), total.into());
    for (k, v) in &metadata {
        meta.insert(k.clone(), v.clone().into());
    }
    let index = serde_json::json!({ "metadata": meta, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| bad_from(&path, K::Format, "cannot encode the index", e))?;
    if let Err(e) = atomic_write(&path, |w| w.write_all(text.as_bytes()).map_err(io(&path))) {
        for f in &files {
            let _ = fs::remove_file(dir.join(f));
        }
        return Err(e);
    }
    // Committed: earlier saves' shards are unreferenced now.
    if let Ok(list) = fs::read_dir(dir) {
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_our_shard(&name) && !files.contains(&name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod temporaries {
    use super::*;

    /// A crashed save's temporary goes, when its process is known gone; another PID space's
    /// (another machine or container writing into a shared folder) stays until it is old.
    #[test]
    fn only_temporaries_known_dead_are_removed() {
        if !Path::new("/proc/self").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A process id no live process has here (past the kernel's pid_max limit).
        let dead = 1u32 << 30;
        let ours = format!(".a.safetensors.tmp-{}-{dead}-0", pid_space());
        let legacy = format!(".b.safetensors.tmp-{dead}-0");
        let foreign = format!(".c.safetensors.tmp-0badc0de-{dead}-0");
        for n in [&ours, &legacy, &foreign] {
            fs::write(dir.path().join(n), b"partial").unwrap();
        }
        remove_stale_temporaries(dir.path());
        assert!(!dir.path().join(&ours).exists());
        assert!(!dir.path().join(&legacy).exists());
        assert!(
            dir.path().join(&foreign).exists(),
            "another machine's save in progress"
        );
    }
}
