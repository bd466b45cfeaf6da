//! Recording: power-function EMAs tracked in one pass, and their snapshots written to a
//! directory every `every` updates without stalling training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::solve::sigma_rel_of;
use super::{META_DTYPE, META_INDEX, META_PROFILES, META_RUN, META_T, SNAPSHOT_FORMAT};
use crate::checkpoint::{ema_shadow_name, write_safetensors_as, EmaState, Entry, TensorFile};
use crate::error::{Error, Result};
use crate::gpu::{GpuEma, GpuEmaBuilder};
use crate::schedule::Schedule;
use crate::tensors::ParamDtype;

/// A [`GpuEmaBuilder`] tracking one power-function EMA per `sigma_rel` (2 to 4 of them, EDM2
/// records [`EDM2_SIGMA_RELS`](super::EDM2_SIGMA_RELS)), all updated in one pass. Add the
/// tensors to track and build it as usual.
pub fn builder<'a>(sigma_rels: &[f64]) -> Result<GpuEmaBuilder<'a>> {
    if !(2..=4).contains(&sigma_rels.len()) {
        return Err(Error::PostHoc(format!(
            "record 2 to 4 profiles (one pass updates at most 4 EMAs), got {}",
            sigma_rels.len()
        )));
    }
    let mut schedules = Vec::new();
    for &s in sigma_rels {
        schedules.push(Schedule::power(super::gamma_of_sigma_rel(s)?));
    }
    profiles_of(&schedules)?;
    let mut b = GpuEma::builder(schedules[0]);
    for s in &schedules[1..] {
        b = b.extra_ema(*s);
    }
    Ok(b)
}

/// The profiles of EMAs with these schedules, checked: each a power function, at least two
/// distinct exponents.
fn profiles_of(schedules: &[Schedule]) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut gammas: Vec<f64> = Vec::new();
    for (k, s) in schedules.iter().enumerate() {
        let Schedule::Power { gamma } = *s else {
            return Err(Error::PostHoc(format!(
                "EMA {k} has schedule {}: post-hoc synthesis needs power-function EMAs",
                s.describe()
            )));
        };
        if !gammas.contains(&gamma) {
            gammas.push(gamma);
        }
        out.push(serde_json::json!({
            "suffix": ema_shadow_name("", k),
            "gamma": gamma,
            "sigma_rel": sigma_rel_of(gamma),
        }));
    }
    if gammas.len() < 2 {
        return Err(Error::PostHoc(format!(
            "{} distinct profile(s): synthesis needs at least two different sigma_rel",
            gammas.len()
        )));
    }
    Ok(out)
}

/// The file name of snapshot `index` taken at step `t`.
fn file_name(index: u64, t: u64) -> String {
    format!("phema-{index:06}-{t:010}.safetensors")
}

/// `(index, t)` of a snapshot file name this recorder makes.
pub(super) fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("phema-")?.strip_suffix(".safetensors")?;
    let (i, t) = rest.split_once('-')?;
    Some((i.parse().ok()?, t.parse().ok()?))
}

/// Writes snapshots of power-function EMAs into a directory: every `every` updates through
/// [`after_update`](Self::after_update), or on demand.
///
/// With a [`GpuEma`], a snapshot is one GPU copy of every shadow, submitted with training's
/// work; a background thread then reads it back one tensor at a time and writes the file
/// (atomically), while training goes on. At most one write is in flight: the next snapshot
/// waits for the previous one, so GPU memory holds at most two copies. A failed write is
/// returned by the next call (or by [`finish`](Self::finish)).
///
/// Resuming: open the same directory; [`resume`](Self::resume) with the restored step moves
/// snapshots taken after it (by the run that crashed) into `stale/`, so a synthesis never mixes
/// two timelines, and numbering continues after the last snapshot kept.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    every: u64,
    dtype: ParamDtype,
    next_index: u64,
    last_t: Option<u64>,
    /// The recording run: the one the directory's snapshots belong to, or a new one (none
    /// when continuing a recording of wgpu-ema 0.2, which had no run ids).
    run: Option<String>,
    /// The profiles the directory's snapshots hold, if any: later snapshots must match.
    profiles: Option<Vec<serde_json::Value>>,
    /// The folder's lock, held while the recorder lives: one recorder per directory.
    _writer: crate::checkpoint::lock::WriterGuard,
    /// The snapshot being written: its thread, its number and the last step before it (to
    /// give both back if the write fails, so that a failed write leaves no gap).
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    thread: std::thread::JoinHandle<Result<PathBuf>>,
    index: u64,
    last_t: Option<u64>,
}

impl Recorder {
    /// A recorder writing into `dir` (created if missing) every `every` updates (0: only on
    /// demand), as f32. Numbering continues after the snapshots already there, whose run it
    /// continues (their run id, their profiles); an empty directory starts a new run.
    ///
    /// Holds the directory's [`FolderLock`](crate::checkpoint::FolderLock) while it lives: a
    /// second recorder (or sharded save) into the same directory is refused with
    /// [`Busy`](crate::error::CheckpointErrorKind::Busy).
    pub fn open(dir: impl AsRef<Path>, every: u64) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let writer = crate::checkpoint::lock::for_writer(&dir)?;
        let mut r = Self {
            dir,
            every,
            dtype: ParamDtype::F32,
            next_index: 0,
            last_t: None,
            run: Some(new_run_id()),
            profiles: None,
            _writer: writer,
            pending: None,
        };
        r.adopt_existing()?;
        Ok(r)
    }

    /// Continues the numbering, run and profiles of the snapshots in the directory.
    fn adopt_existing(&mut self) -> Result<()> {
        let mut run: Option<(String, PathBuf)> = None;
        let existing = self.existing()?;
        for (index, t, path) in &existing {
            let (index, t) = (*index, *t);
            self.next_index = self.next_index.max(index.saturating_add(1));
            self.last_t = Some(self.last_t.map_or(t, |l| l.max(t)));
            let file = TensorFile::open(path)?;
            let meta = file.metadata();
            if let Some(id) = meta.get(META_RUN) {
                match &run {
                    Some((first, at)) if first != id => {
                        return Err(Error::PostHoc(format!(
                            "{} holds snapshots of two runs ({} of {first:?}, {} of {id:?}): \
                             move one run's elsewhere before recording",
                            self.dir.display(),
                            at.display(),
                            path.display()
                        )))
                    }
                    Some(_) => {}
                    None => run = Some((id.clone(), path.clone())),
                }
            }
            if self.profiles.is_none() {
                self.profiles = meta
                    .get(META_PROFILES)
                    .and_then(|v| serde_json::from_str(v).ok());
            }
        }
        match run {
            Some((id, _)) => self.run = Some(id),
            // Snapshots of wgpu-ema 0.2: the set stays one without ids.
            None if !existing.is_empty() => self.run = None,
            None => {}
        }
        Ok(())
    }

    /// The recording run this recorder writes snapshots of (kept in each as
    /// [`META_RUN`](super::META_RUN)); `None` when it continues a recording of wgpu-ema 0.2,
    /// whose snapshots carry none.
    pub fn run_id(&self) -> Option<&str> {
        self.run.as_deref()
    }

    /// Stores snapshots as `dtype`: f16 (as EDM2 does) or bf16 halve the disk; a shadow f16
    /// cannot hold (beyond ±65504) fails the write with an error rather than becoming infinite.
    pub fn dtype(mut self, dtype: ParamDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The number the next snapshot gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// `(index, t, path)` of every snapshot file in the directory.
    fn existing(&self) -> Result<Vec<(u64, u64, PathBuf)>> {
        let list = std::fs::read_dir(&self.dir).map_err(|source| Error::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in list.flatten() {
            if let Some((i, t)) = parse_name(&e.file_name().to_string_lossy()) {
                out.push((i, t, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Continues recording after a restore to step `num_updates`: snapshots of later steps
    /// (written by a run that went on past its last checkpoint) are moved to `dir/stale/`;
    /// returns their new paths. Numbering continues after the last snapshot kept.
    pub fn resume(&mut self, num_updates: u64) -> Result<Vec<PathBuf>> {
        self.finish()?;
        let stale_dir = self.dir.join("stale");
        let mut moved = Vec::new();
        self.next_index = 0;
        self.last_t = None;
        for (index, t, path) in self.existing()? {
            if t > num_updates {
                let io = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| Error::Io { path, source }
                };
                std::fs::create_dir_all(&stale_dir).map_err(io(&stale_dir))?;
                let to = stale_dir.join(path.file_name().unwrap_or_default());
                std::fs::rename(&path, &to).map_err(io(&path))?;
                moved.push(to);
            } else {
                self.next_index = self.next_index.max(index.saturating_add(1));
                self.last_t = Some(self.last_t.map_or(t, |l| l.max(t)));
            }
        }
        Ok(moved)
    }

    /// Call after each update: takes a snapshot when `num_updates` is a multiple of `every`
    /// (and past the last snapshot). Returns the new snapshot's number, if one was taken.
    pub fn after_update(&mut self, ema: &GpuEma) -> Result<Option<u64>> {
        self.collect_finished()?;
        let n = ema.num_updates();
        if self.every == 0 || n == 0 || !n.is_multiple_of(self.every) || self.last_t == Some(n) {
            return Ok(None);
        }
        self.snapshot(ema).map(Some)
    }

    /// Takes a snapshot of `ema` now and writes it in the background; returns its number.
    pub fn snapshot(&mut self, ema: &GpuEma) -> Result<u64> {
        let schedules: Vec<Schedule> = (0..ema.ema_count())
            .filter_map(|k| ema.ema_schedule(k))
            .collect();
        self.check_profiles(&profiles_of(&schedules)?)?;
        // Waits for the previous write first: at most one snapshot copy being written.
        self.finish()?;
        self.check_step(ema.num_updates())?;
        let snapshot = ema.snapshot(false)?;
        let last_t = self.last_t;
        let (index, path) = self.claim(ema.num_updates());
        let (dtype, run) = (self.dtype, self.run.clone());
        self.pending = Some(Pending {
            thread: std::thread::spawn(move || {
                write_snapshot(&path, &snapshot, index, dtype, run.as_deref()).map(|()| path)
            }),
            index,
            last_t,
        });
        Ok(index)
    }

    /// Writes a snapshot of any [`EmaState`] (a [`Snapshot`](crate::Snapshot), a state read
    /// from a checkpoint, ...) now, on this thread; returns its path.
    pub fn write(&mut self, state: &dyn EmaState) -> Result<PathBuf> {
        self.finish()?;
        let schedules: Vec<Schedule> = (0..state.ema_count())
            .filter_map(|k| state.ema_schedule(k))
            .collect();
        self.check_profiles(&profiles_of(&schedules)?)?;
        self.check_step(state.num_updates())?;
        let (index, path) = (
            self.next_index,
            self.dir
                .join(file_name(self.next_index, state.num_updates())),
        );
        write_snapshot(&path, state, index, self.dtype, self.run.as_deref())?;
        self.claim(state.num_updates());
        Ok(path)
    }

    /// Refuses profiles other than those of the snapshots already in the directory (or of
    /// this recorder's first); the first ones become the directory's.
    fn check_profiles(&mut self, profiles: &[serde_json::Value]) -> Result<()> {
        let keys = |list: &[serde_json::Value]| -> Vec<(Option<String>, Option<f64>)> {
            list.iter()
                .map(|p| {
                    let suffix = p.get("suffix").and_then(|s| s.as_str()).map(str::to_string);
                    (suffix, p.get("gamma").and_then(|g| g.as_f64()))
                })
                .collect()
        };
        let same = |a: &[serde_json::Value], b: &[serde_json::Value]| {
            super::set::same_profiles(&keys(a), &keys(b))
        };
        match &self.profiles {
            Some(theirs) if !same(theirs, profiles) => Err(Error::PostHoc(format!(
                "{} holds snapshots with profiles {}, this EMA has {}: one recording per \
                 directory",
                self.dir.display(),
                serde_json::Value::from(theirs.clone()),
                serde_json::Value::from(profiles.to_vec()),
            ))),
            Some(_) => Ok(()),
            None => {
                self.profiles = Some(profiles.to_vec());
                Ok(())
            }
        }
    }

    /// Refuses a snapshot at a step at or before one already recorded (a second timeline:
    /// [`resume`](Self::resume) first).
    fn check_step(&self, t: u64) -> Result<()> {
        if let Some(last) = self.last_t.filter(|&l| l >= t) {
            return Err(Error::PostHoc(format!(
                "a snapshot at step {t}, but {} already holds one at step {last}: after \
                 restoring a checkpoint call `Recorder::resume(step)` so that snapshots of the \
                 lost steps are set aside",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Takes the next number for a snapshot at step `t` (checked), and its file. A background
    /// write that fails gives the number back ([`finish`](Self::finish)).
    fn claim(&mut self, t: u64) -> (u64, PathBuf) {
        let index = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        self.last_t = Some(t);
        (index, self.dir.join(file_name(index, t)))
    }

    /// Waits for the snapshot being written, if any, and returns its error.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            let written = p
                .thread
                .join()
                .map_err(|_| Error::PostHoc("the snapshot writer thread panicked".into()))
                .and_then(|r| r);
            if let Err(e) = written {
                // Nothing was written (saves are atomic): the number and the step are free
                // again, so the set keeps no gap.
                self.next_index = p.index;
                self.last_t = p.last_t;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Returns the error of a write that has finished, without waiting for one that has not.
    fn collect_finished(&mut self) -> Result<()> {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.thread.is_finished())
        {
            return self.finish();
        }
        Ok(())
    }
}

impl Drop for Recorder {
    /// Waits for a write in flight, so a snapshot is never cut short by the recorder going
    /// away (its error, if any, is lost: call [`finish`](Recorder::finish) to see it).
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Writes every EMA of `state` (each a power function) as snapshot `index`.
fn write_snapshot(
    path: &Path,
    state: &dyn EmaState,
    index: u64,
    dtype: ParamDtype,
    run: Option<&str>,
) -> Result<()> {
    let schedules: Vec<Schedule> = (0..state.ema_count())
        .filter_map(|k| state.ema_schedule(k))
        .collect();
    let profiles = profiles_of(&schedules)?;
    let mut entries = Vec::new();
    for (i, spec) in state.specs().into_iter().enumerate() {
        for k in 0..schedules.len() {
            entries.push(Entry {
                name: ema_shadow_name(&spec.name, k),
                shape: spec.shape.clone(),
                produce: Box::new(move || match k {
                    0 => state.read_shadow(i),
                    _ => state.read_ema_shadow(k, i),
                }),
            });
        }
    }
    let t = state.num_updates();
    let mut metadata = HashMap::from([
        (
            crate::checkpoint::META_KIND.to_string(),
            SNAPSHOT_FORMAT.to_string(),
        ),
        (META_T.to_string(), t.to_string()),
        (
            crate::checkpoint::META_NUM_UPDATES.to_string(),
            t.to_string(),
        ),
        (META_INDEX.to_string(), index.to_string()),
        (
            META_PROFILES.to_string(),
            serde_json::Value::from(profiles).to_string(),
        ),
        (META_DTYPE.to_string(), format!("{dtype:?}")),
        (
            crate::checkpoint::META_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    if let Some(run) = run {
        metadata.insert(META_RUN.to_string(), run.to_string());
    }
    write_safetensors_as(path, entries, &metadata, dtype)?;
    // What was written must read back as a snapshot (cheap: the header alone).
    TensorFile::open(path).map(|_| ())
}

/// A new run's id: 128 bits from the standard library's randomly keyed hasher (seeded from the
/// operating system), over the time and the process.
fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u8(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", half(0), half(1))
}
