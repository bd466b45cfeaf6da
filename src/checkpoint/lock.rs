//! One writer per folder: an advisory lock on `<dir>/.wgpu-ema.lock`, held by every sharded
//! save, TensorFlow save and post-hoc recorder while it writes there.
//!
//! Those writers clean up behind themselves (a sharded save removes the previous saves'
//! shards, a TensorFlow save the data files its index no longer names): two of them in one
//! folder would remove each other's files. With the lock, a second writer gets
//! [`CheckpointErrorKind::Busy`](crate::error::CheckpointErrorKind::Busy) instead, before it
//! writes anything. A program that would rather wait holds a [`FolderLock`] itself
//! ([`FolderLock::wait`]); the saves it then makes in that folder run under it.
//!
//! The lock is the operating system's (`flock` on Unix, `LockFileEx` on Windows, through
//! `std::fs::File::try_lock`): released when its holder exits, however it exits, so a killed
//! writer never leaves the folder locked. The lock file itself stays (removing it would race
//! with a writer opening it). Such a lock belongs to the open file, which a child process
//! forked by another thread shares until it starts its program: a writer therefore unlocks
//! it explicitly when done, rather than only closing it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::errors::{bad, io};
use crate::error::CheckpointErrorKind as K;
use crate::error::Result;

/// The lock file's name in a folder.
pub const LOCK_FILE: &str = ".wgpu-ema.lock";

/// Folders whose lock a [`FolderLock`] of this process holds for its owner, with the locked
/// file: saves into them run under it instead of taking the lock again, and keep the file
/// (so the lock) open while they write, even if the `FolderLock` is dropped meanwhile.
static HELD: Mutex<Vec<(PathBuf, Arc<Locked>)>> = Mutex::new(Vec::new());

/// The exclusive right to write checkpoints into a folder, until dropped.
///
/// Saves take it on their own; hold one yourself to wait for another writer, or to keep the
/// folder for a series of saves. The right is the process's: while you hold it, every save
/// and recorder of your process into that folder runs under it (keeping them from running at
/// once, from several threads, is then yours to do).
///
/// ```
/// # fn main() -> wgpu_ema::Result<()> {
/// use wgpu_ema::checkpoint::FolderLock;
/// let dir = std::env::temp_dir().join(format!("wgpu-ema-lock-doc-{}", std::process::id()));
/// let held = FolderLock::wait(&dir)?;
/// // A second writer is refused while `held` lives.
/// assert!(FolderLock::try_acquire(&dir).is_err());
/// drop(held);
/// assert!(FolderLock::try_acquire(&dir).is_ok());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FolderLock {
    /// The locked file: the lock lasts while any clone of it is held.
    file: Arc<Locked>,
    /// Set when this lock lets the saves of this process join it.
    shared_as: Option<PathBuf>,
}

impl FolderLock {
    /// Takes the lock of `dir` (created if missing), or fails at once with
    /// [`Busy`](crate::error::CheckpointErrorKind::Busy) while another writer holds it.
    pub fn try_acquire(dir: impl AsRef<Path>) -> Result<Self> {
        Self::take(dir.as_ref(), false, true)
    }

    /// Takes the lock of `dir` (created if missing), waiting for another writer to finish.
    pub fn wait(dir: impl AsRef<Path>) -> Result<Self> {
        Self::take(dir.as_ref(), true, true)
    }

    fn take(dir: &Path, wait: bool, share: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        if wait {
            file.lock().map_err(io(&path))?;
        } else {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(bad(
                        dir,
                        K::Busy,
                        format!(
                            "another writer holds {} (a save or a post-hoc recorder, in this or \
                             another process): one writer per folder; write elsewhere, or wait \
                             with FolderLock::wait",
                            path.display()
                        ),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
        let file = Arc::new(Locked(file));
        let shared_as = if share {
            let key = std::fs::canonicalize(dir).map_err(io(dir))?;
            if let Ok(mut held) = HELD.lock() {
                held.push((key.clone(), file.clone()));
            }
            Some(key)
        } else {
            None
        };
        Ok(Self { file, shared_as })
    }
}

/// The locked file. Unlocked explicitly when its last holder lets go, not only by closing it:
/// an OS lock belongs to the open file, and a child process forked by another thread of this
/// program shares our open files until it runs its program (which closes them: Rust opens
/// files close-on-exec). Closed without an unlock, the lock would outlive its writer for
/// those moments, and a save right after another, in a program that starts processes, would
/// find the folder busy with its own released lock. An unlock through any copy releases it
/// for all of them.
#[derive(Debug)]
struct Locked(File);

impl Drop for Locked {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut held)) = (&self.shared_as, HELD.lock()) {
            if let Some(i) = held
                .iter()
                .position(|(k, f)| k == key && Arc::ptr_eq(f, &self.file))
            {
                held.swap_remove(i);
            }
        }
    }
}

/// What a writer holds while it writes into a folder: its own lock, or the locked file of
/// a [`FolderLock`] its program holds (kept open, so the folder stays locked while it writes).
#[derive(Debug)]
pub(crate) struct WriterGuard(#[allow(dead_code)] Arc<Locked>);

/// The lock a writer takes before writing into `dir`: joins a [`FolderLock`] this process
/// holds for the folder, else takes it, failing at once if another writer holds it.
pub(crate) fn for_writer(dir: &Path) -> Result<WriterGuard> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = std::fs::canonicalize(dir).map_err(io(dir))?;
    let joined = HELD
        .lock()
        .ok()
        .and_then(|held| held.iter().find(|(k, _)| *k == key).map(|(_, f)| f.clone()));
    match joined {
        Some(file) => Ok(WriterGuard(file)),
        None => FolderLock::take(dir, false, false).map(|l| WriterGuard(l.file.clone())),
    }
}

/// The folder a file at `path` is written into.
pub(crate) fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_writer_keeps_the_folder_locked_after_the_lock_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::wait(dir.path()).unwrap();
        // A writer of this process joins the held lock instead of being refused by it.
        let writer = for_writer(dir.path()).unwrap();
        drop(held);
        // The folder stays locked while the joined writer writes.
        let e = FolderLock::try_acquire(dir.path()).unwrap_err();
        assert!(
            matches!(e, crate::Error::Checkpoint { kind: K::Busy, .. }),
            "{e}"
        );
        assert!(for_writer(dir.path()).is_err());
        drop(writer);
        let again = FolderLock::try_acquire(dir.path()).unwrap();
        // A writer not joined to a held lock is refused by it.
        drop(again);
        let own = for_writer(dir.path()).unwrap();
        assert!(FolderLock::try_acquire(dir.path()).is_err());
        drop(own);
    }
}
