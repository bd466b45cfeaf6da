//! Checkpoints of an EMA spread over ranks (devices or processes), each rank keeping a part of
//! a global model: whole tensors, or element ranges of them.
//!
//! Each rank saves its own file ([`save_rank`]): a training checkpoint of its part, under the
//! global tensors' names with flat shapes, whose metadata says which element range of which
//! global tensor each piece is. [`commit_ranks`] writes the index that commits a save only once
//! every rank's file of that save exists and agrees with the others, then removes older saves'
//! files: a rank killed mid-save leaves the last committed save whole. [`RankedCheckpoint`]
//! reads a committed save back: any global tensor or range of one, the part a rank restores
//! (for any plan: N ranks into M), one consolidated file, or the same save resharded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::errors::{bad, io};
use super::{EmaState, Entry, TensorFile};
use crate::error::CheckpointErrorKind as K;
use crate::error::{Error, Result};
use crate::names::{
    META_CHECKSUMS, META_GENERATION, META_PIECES, META_RANK, META_RANKS, META_SAVE, META_SELECTION,
};
use crate::tensors::{HostTensors, TensorSpec};

pub use crate::names::RANKS_INDEX;

/// An element range of a global tensor that a rank keeps. The rank tracks it as a flat tensor
/// named as the global one, of `len` elements.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    /// The global tensor's name.
    pub global: String,
    /// The global tensor's shape.
    pub shape: Vec<usize>,
    /// The first element (row-major, of the flattened global tensor).
    pub start: u64,
    /// Elements.
    pub len: u64,
}

impl Piece {
    /// Elements of the global tensor; `None` past u64.
    fn numel(&self) -> Option<u64> {
        numel(&self.shape)
    }
}

fn numel(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))
}

/// What one rank keeps of the global model: at most one piece per global tensor.
///
/// ```
/// use wgpu_ema::checkpoint::ranks::RankPlan;
/// use wgpu_ema::TensorSpec;
/// let model = [TensorSpec::new("w", [4, 3]), TensorSpec::new("b", [3])];
/// // Rank 1 of 2: the second half of each tensor, as flat tensors to track.
/// let plan = RankPlan::even(&model, 1, 2).unwrap();
/// assert_eq!(plan.local_specs(), [TensorSpec::new("w", [6]), TensorSpec::new("b", [1])]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankPlan {
    rank: usize,
    ranks: usize,
    pieces: Vec<Piece>,
}

impl RankPlan {
    /// Rank `rank` of `ranks`, keeping nothing yet.
    pub fn new(rank: usize, ranks: usize) -> Result<Self> {
        if rank >= ranks {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} of {ranks}: ranks are numbered from 0"
            )));
        }
        Ok(Self {
            rank,
            ranks,
            pieces: Vec::new(),
        })
    }

    /// Keeps elements `start .. start + len` of global tensor `global` of `shape`.
    pub fn piece(
        mut self,
        global: impl Into<String>,
        shape: impl AsRef<[usize]>,
        start: u64,
        len: u64,
    ) -> Result<Self> {
        let piece = Piece {
            global: global.into(),
            shape: shape.as_ref().to_vec(),
            start,
            len,
        };
        let n = piece.numel().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "`{}`: shape {:?} is too large",
                piece.global, piece.shape
            ))
        })?;
        if start.checked_add(len).is_none_or(|end| end > n) {
            return Err(Error::InvalidConfig(format!(
                "elements {start}..+{len} of `{}`, which has {n}",
                piece.global
            )));
        }
        if self.pieces.iter().any(|p| p.global == piece.global) {
            return Err(Error::DuplicateName { name: piece.global });
        }
        self.pieces.push(piece);
        Ok(self)
    }

    /// Keeps all of `spec`.
    pub fn whole(self, spec: &TensorSpec) -> Result<Self> {
        let n = spec.numel();
        self.piece(spec.name.clone(), &spec.shape, 0, n)
    }

    /// Rank `rank`'s share of `globals` cut evenly: each tensor in `ranks` contiguous ranges
    /// of `ceil(numel / ranks)` elements (the last ones shorter, or empty and left out; a
    /// tensor without elements is kept by no rank).
    pub fn even(globals: &[TensorSpec], rank: usize, ranks: usize) -> Result<Self> {
        let mut plan = Self::new(rank, ranks)?;
        for g in globals {
            let n = g.numel();
            let per = n.div_ceil(ranks as u64);
            let start = (per * rank as u64).min(n);
            let len = per.min(n - start);
            if len > 0 {
                plan = plan.piece(g.name.clone(), &g.shape, start, len)?;
            }
        }
        Ok(plan)
    }

    /// This rank's number.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The pieces kept.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The tensors this rank tracks: one flat tensor per piece, named as its global tensor.
    pub fn local_specs(&self) -> Vec<TensorSpec> {
        self.pieces
            .iter()
            .map(|p| TensorSpec::new(p.global.clone(), [p.len as usize]))
            .collect()
    }
}

/// The file of rank `rank` of `ranks` in save `save`.
fn rank_file(save: u64, rank: usize, ranks: usize) -> String {
    format!("ema-{save:020}-rank{rank:05}-of-{ranks:05}.safetensors")
}

/// The save a rank file belongs to, from its name (exactly as [`rank_file`] makes it).
fn save_of(file_name: &str) -> Option<u64> {
    let rest = file_name
        .strip_prefix("ema-")?
        .strip_suffix(".safetensors")?;
    let (save, rest) = rest.split_once("-rank")?;
    let (rank, ranks) = rest.split_once("-of-")?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    (digits(save, 20) && digits(rank, 5) && digits(ranks, 5)).then(|| save.parse().ok())?
}

/// The save the index in `dir` commits, if there is a readable one.
fn committed(dir: &Path) -> Option<u64> {
    read_index(&dir.join(RANKS_INDEX)).ok().map(|i| i.save)
}

/// Refuses to write files of save `save` into `dir` when a save as new is committed there:
/// its files would replace the committed ones in place.
fn check_newer(dir: &Path, save: u64) -> Result<()> {
    match committed(dir) {
        Some(c) if c >= save => Err(bad(
            &dir.join(RANKS_INDEX),
            K::Refused,
            format!("save {c} is committed here; save {save} would overwrite or precede it (number saves upward)"),
        )),
        _ => Ok(()),
    }
}

/// Saves rank `plan.rank()`'s part of save `save` (a number of the caller's that grows from
/// save to save: the step) into `dir`, atomically: the state's shadows (and further EMAs,
/// compensation terms, parameters) and `extra` tensors (`<name>/Momentum`, ...), as
/// [`save_training`](super::save_training) writes them, with the plan in the metadata. The
/// state must track exactly the plan's [`local_specs`](RankPlan::local_specs). Returns the
/// file's path; the save counts once [`commit_ranks`] has committed it.
pub fn save_rank(
    dir: impl AsRef<Path>,
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
    plan: &RankPlan,
    save: u64,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let mut want: Vec<(String, u64)> = plan
        .local_specs()
        .iter()
        .map(|s| (s.name.clone(), s.numel()))
        .collect();
    let mut have: Vec<(String, u64)> = state
        .specs()
        .iter()
        .map(|s| (s.name.clone(), s.numel()))
        .collect();
    want.sort();
    have.sort();
    if want != have {
        return Err(Error::InvalidConfig(format!(
            "rank {}'s EMA tracks {have:?}; its plan keeps {want:?} (track plan.local_specs())",
            plan.rank
        )));
    }
    check_newer(dir, save)?;
    let entries = super::training_entries(state, params, extra)?;
    for e in &entries {
        let Some((piece, _)) = piece_of(&plan.pieces, &e.name) else {
            return Err(Error::InvalidConfig(format!(
                "tensor `{}` belongs to no piece of rank {}'s plan (extra tensors are named \
                 `<tracked name>/...`)",
                e.name, plan.rank
            )));
        };
        if numel(&e.shape) != Some(piece.len) {
            return Err(Error::InvalidConfig(format!(
                "tensor `{}` has shape {:?}; its piece holds {} elements (extra tensors have \
                 their piece's elements)",
                e.name, e.shape, piece.len
            )));
        }
    }
    let mut meta = super::metadata(state, "training");
    meta.insert(META_RANK.into(), plan.rank.to_string());
    meta.insert(META_RANKS.into(), plan.ranks.to_string());
    meta.insert(META_SAVE.into(), save.to_string());
    let pieces = serde_json::to_string(&plan.pieces)
        .map_err(|e| Error::InvalidConfig(format!("cannot encode the plan: {e}")))?;
    meta.insert(META_PIECES.into(), pieces);
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(rank_file(save, plan.rank, plan.ranks));
    super::write_safetensors(&path, entries, &meta)?;
    Ok(path)
}

/// The piece a stored tensor belongs to: the one whose name it is, or starts as `<name>/`
/// (the longest such), and the rest of its name.
fn piece_of<'a>(pieces: &'a [Piece], stored: &'a str) -> Option<(&'a Piece, &'a str)> {
    pieces
        .iter()
        .filter_map(|p| {
            let rest = stored.strip_prefix(p.global.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then_some((p, rest))
        })
        .max_by_key(|(p, _)| p.global.len())
}

/// Commits save `save` of `ranks` ranks in `dir` once every rank's file of it exists (waiting
/// up to `wait` for the others) and the files agree: writes the index atomically, then
/// removes the files of older saves. Call it on one rank (rank 0) after its own
/// [`save_rank`]. A save older than the committed one is refused. Returns the index's path.
pub fn commit_ranks(
    dir: impl AsRef<Path>,
    save: u64,
    ranks: usize,
    wait: Duration,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    if ranks == 0 {
        return Err(Error::InvalidConfig("a save of 0 ranks".into()));
    }
    let files: Vec<String> = (0..ranks).map(|r| rank_file(save, r, ranks)).collect();
    let start = Instant::now();
    loop {
        let missing: Vec<&String> = files.iter().filter(|f| !dir.join(f).is_file()).collect();
        if missing.is_empty() {
            break;
        }
        if start.elapsed() > wait {
            return Err(bad(
                dir,
                K::Inconsistent,
                format!(
                    "save {save} not committed: after {wait:?}, no file yet from {} rank(s) \
                     ({})",
                    missing.len(),
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let index_path = dir.join(RANKS_INDEX);
    // One commit at a time per folder: the check, the index and the cleanup together.
    let _lock = super::FolderLock::wait(dir)?;
    match committed(dir) {
        Some(c) if c > save => {
            return Err(bad(
                &index_path,
                K::Inconsistent,
                format!("save {c} is committed already; save {save} is older"),
            ))
        }
        Some(c) if c == save => return Ok(index_path),
        _ => {}
    }
    // Every file opens, verifies, and agrees with the others before the commit.
    let ck = RankedCheckpoint::from_files(dir, save, ranks, &files)?;
    let index = Index {
        format: INDEX_FORMAT.into(),
        save,
        ranks,
        files: files.clone(),
        pieces: ck.pieces.clone(),
    };
    let text = serde_json::to_string_pretty(&index).map_err(|e| {
        bad(
            &index_path,
            K::Format,
            format!("cannot encode the index: {e}"),
        )
    })?;
    super::write::atomic_write(&index_path, |w| {
        w.write_all(text.as_bytes()).map_err(io(&index_path))
    })?;
    if let Ok(list) = fs::read_dir(dir) {
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if save_of(&name).is_some_and(|s| s < save) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(index_path)
}

/// A selection as the metadata writes it (`copy=a,b;exclude=c`): the names copied and left out.
fn parse_selection(s: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut copy, mut exclude) = (BTreeSet::new(), BTreeSet::new());
    for part in s.split(';') {
        let (set, names) = match part.split_once('=') {
            Some(("copy", names)) => (&mut copy, names),
            Some(("exclude", names)) => (&mut exclude, names),
            _ => continue,
        };
        set.extend(names.split(',').filter(|n| !n.is_empty()).map(String::from));
    }
    (copy, exclude)
}

/// [`parse_selection`]'s inverse, over the names `keep` accepts (the form `select::describe`
/// writes: sorted names, the empty string for no selection).
fn describe_selection(
    copy: &BTreeSet<String>,
    exclude: &BTreeSet<String>,
    keep: impl Fn(&str) -> bool,
) -> String {
    let list = |set: &BTreeSet<String>| -> String {
        set.iter()
            .filter(|n| keep(n))
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    };
    let (c, e) = (list(copy), list(exclude));
    let mut parts = Vec::new();
    if !c.is_empty() {
        parts.push(format!("copy={c}"));
    }
    if !e.is_empty() {
        parts.push(format!("exclude={e}"));
    }
    parts.join(";")
}

const INDEX_FORMAT: &str = "wgpu-ema ranks v1";

/// The index: the save it commits, its files (rank `r`'s is `files[r]`), and every piece of
/// every file, for readers that look no further.
#[derive(serde::Serialize, serde::Deserialize)]
struct Index {
    format: String,
    save: u64,
    ranks: usize,
    files: Vec<String>,
    /// Per file, the pieces it holds (as its metadata says).
    #[serde(default)]
    pieces: Vec<Vec<Piece>>,
}

fn read_index(path: &Path) -> Result<Index> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| {
        bad(
            path,
            K::Format,
            format!("not a ranked checkpoint's index: {e}"),
        )
    })?;
    if index.format != INDEX_FORMAT || index.files.len() != index.ranks || index.ranks == 0 {
        return Err(bad(
            path,
            K::Format,
            format!(
                "an index of format `{}` with {} files for {} ranks",
                index.format,
                index.files.len(),
                index.ranks
            ),
        ));
    }
    Ok(index)
}

/// Where a global tensor's elements are: in which file, under which name, which range.
#[derive(Clone, Debug)]
struct Part {
    file: usize,
    stored: String,
    start: u64,
    len: u64,
}

/// A global tensor of the save: its shape, its base (the piece's global name: `w` for
/// `w/ExponentialMovingAverage`), and its parts in order.
#[derive(Clone, Debug)]
struct Global {
    shape: Vec<usize>,
    base: String,
    parts: Vec<Part>,
}

/// A committed save of a ranked checkpoint, every file verified and the pieces checked to
/// cover each global tensor exactly once. Values are read on demand, a piece at a time.
#[derive(Debug)]
pub struct RankedCheckpoint {
    dir: PathBuf,
    save: u64,
    files: Vec<TensorFile>,
    /// Per file, its pieces.
    pieces: Vec<Vec<Piece>>,
    metadata: HashMap<String, String>,
    /// The union of the ranks' selections: tensors copied, and left out.
    selection: (BTreeSet<String>, BTreeSet<String>),
    tensors: BTreeMap<String, Global>,
}

impl RankedCheckpoint {
    /// Opens the save the index in `dir` commits.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        // A commit of a newer save may remove this one's files while they are opened: then
        // the index has moved on, and the newer save is read instead.
        let mut tries = 0;
        let (index, ck) = loop {
            let index = read_index(&dir.join(RANKS_INDEX))?;
            for (r, f) in index.files.iter().enumerate() {
                if *f != rank_file(index.save, r, index.ranks) {
                    return Err(bad(
                        &dir.join(RANKS_INDEX),
                        K::Format,
                        format!("it names `{f}` as rank {r}'s file of save {}", index.save),
                    ));
                }
            }
            match Self::from_files(dir, index.save, index.ranks, &index.files) {
                Ok(ck) => break (index, ck),
                Err(_) if tries < 3 && committed(dir) != Some(index.save) => tries += 1,
                Err(e) => return Err(e),
            }
        };
        // The index's copy of the pieces, when it has one, says what the files say.
        if !index.pieces.is_empty() {
            for (r, (listed, held)) in index.pieces.iter().zip(&ck.pieces).enumerate() {
                if listed != held || index.pieces.len() != ck.pieces.len() {
                    return Err(bad(
                        &dir.join(&index.files[r]),
                        K::Inconsistent,
                        format!(
                            "the index lists other pieces for this file ({RANKS_INDEX} edited?)"
                        ),
                    ));
                }
            }
        }
        Ok(ck)
    }

    fn from_files(dir: &Path, save: u64, ranks: usize, names: &[String]) -> Result<Self> {
        if ranks == 0 || names.len() != ranks {
            return Err(bad(
                dir,
                K::Format,
                format!("{} files for {ranks} ranks", names.len()),
            ));
        }
        let mut files = Vec::with_capacity(names.len());
        let mut all_pieces = Vec::with_capacity(names.len());
        let mut selection = (BTreeSet::new(), BTreeSet::new());
        let mut metadata: Option<HashMap<String, String>> = None;
        let mut tensors: BTreeMap<String, Global> = BTreeMap::new();
        for (rank, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file = TensorFile::open(&path)?;
            let meta = file.metadata();
            let field = |key: &str| -> Result<&str> {
                meta.get(key)
                    .map(String::as_str)
                    .ok_or_else(|| bad(&path, K::Metadata, format!("not a rank file: no `{key}`")))
            };
            let expect = [
                (META_RANK, rank.to_string()),
                (META_RANKS, ranks.to_string()),
                (META_SAVE, save.to_string()),
            ];
            for (key, want) in &expect {
                let got = field(key)?;
                if got != want {
                    return Err(bad(
                        &path,
                        K::Inconsistent,
                        format!("`{key}` is {got}, the index says {want}: a file of another save or rank count"),
                    ));
                }
            }
            let pieces: Vec<Piece> = serde_json::from_str(field(META_PIECES)?).map_err(|e| {
                bad(
                    &path,
                    K::Metadata,
                    format!("malformed `{META_PIECES}`: {e}"),
                )
            })?;
            // The rest of the metadata (counter, schedule, ...) must be the same on every rank.
            let mut common = meta.clone();
            for key in [META_RANK, META_PIECES, META_CHECKSUMS, META_GENERATION] {
                common.remove(key);
            }
            // Each rank's selection names its own tensors: the save's is their union.
            if let Some(s) = common.remove(META_SELECTION) {
                let (c, e) = parse_selection(&s);
                selection.0.extend(c);
                selection.1.extend(e);
            }
            match &metadata {
                None => metadata = Some(common),
                Some(first) if *first != common => {
                    let differing: Vec<&String> = first
                        .keys()
                        .chain(common.keys())
                        .filter(|k| first.get(*k) != common.get(*k))
                        .collect();
                    return Err(bad(
                        &path,
                        K::Inconsistent,
                        format!("its metadata differs from rank 0's in {differing:?}"),
                    ));
                }
                Some(_) => {}
            }
            for t in file.tensors() {
                let Some((piece, rest)) = piece_of(&pieces, &t.name) else {
                    return Err(bad(
                        &path,
                        K::UnexpectedTensor,
                        format!("tensor `{}` belongs to none of the file's pieces", t.name),
                    ));
                };
                if t.numel() != piece.len {
                    return Err(bad(
                        &path,
                        K::Shape,
                        format!(
                            "tensor `{}` has {} elements, its piece {}",
                            t.name,
                            t.numel(),
                            piece.len
                        ),
                    ));
                }
                let global = format!("{}{rest}", piece.global);
                if tensors.get(&global).is_some_and(|g| g.base != piece.global) {
                    return Err(bad(
                        &path,
                        K::Inconsistent,
                        format!(
                            "`{global}` belongs to `{}` here and to another piece elsewhere",
                            piece.global
                        ),
                    ));
                }
                let entry = tensors.entry(global.clone()).or_insert_with(|| Global {
                    shape: piece.shape.clone(),
                    base: piece.global.clone(),
                    parts: Vec::new(),
                });
                if entry.shape != piece.shape {
                    return Err(bad(
                        &path,
                        K::Shape,
                        format!(
                            "`{global}` has shape {:?} here, {:?} in another rank's file",
                            piece.shape, entry.shape
                        ),
                    ));
                }
                entry.parts.push(Part {
                    file: rank,
                    stored: t.name.clone(),
                    start: piece.start,
                    len: piece.len,
                });
            }
            files.push(file);
            all_pieces.push(pieces);
        }
        // Each global tensor covered exactly once, in order.
        for (name, g) in &mut tensors {
            g.parts.retain(|p| p.len > 0);
            g.parts.sort_by_key(|p| p.start);
            let numel = numel(&g.shape).ok_or_else(|| {
                bad(
                    dir,
                    K::Shape,
                    format!("`{name}`: shape {:?} too large", g.shape),
                )
            })?;
            let mut at = 0u64;
            for p in &g.parts {
                let path = dir.join(&names[p.file]);
                if p.start != at {
                    let what = if p.start < at {
                        "overlaps"
                    } else {
                        "leaves a gap before"
                    };
                    return Err(bad(
                        &path,
                        K::Inconsistent,
                        format!(
                            "its piece {}..{} of `{name}` {what} element {at} (the ranks' ranges \
                             must tile the tensor)",
                            p.start,
                            p.start + p.len
                        ),
                    ));
                }
                at += p.len;
            }
            if at != numel {
                let last = g
                    .parts
                    .last()
                    .map_or(dir.to_path_buf(), |p| dir.join(&names[p.file]));
                return Err(bad(
                    &last,
                    K::Inconsistent,
                    format!("the ranks hold elements 0..{at} of `{name}`, which has {numel}"),
                ));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            save,
            files,
            pieces: all_pieces,
            metadata: metadata.unwrap_or_default(),
            selection,
            tensors,
        })
    }

    /// The save committed (the number its ranks saved it under).
    pub fn save(&self) -> u64 {
        self.save
    }

    /// How many ranks wrote it.
    pub fn ranks(&self) -> usize {
        self.files.len()
    }

    /// The pieces rank `r`'s file holds.
    pub fn pieces_of(&self, r: usize) -> Option<&[Piece]> {
        self.pieces.get(r).map(Vec::as_slice)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata the ranks share (counter, schedule, numerics, ...), without the ranks'
    /// own keys and checksums.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The global tensors stored (shadows, parameters, extra tensors), in name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The global tensors the ranks track (the pieces' tensors), as specs.
    pub fn tracked(&self) -> Vec<TensorSpec> {
        let mut out: Vec<TensorSpec> = Vec::new();
        for g in self.tensors.values() {
            if !out.iter().any(|s| s.name == g.base) {
                out.push(TensorSpec::new(g.base.clone(), &g.shape));
            }
        }
        out
    }

    /// The shape of global tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|g| g.shape.as_slice())
    }

    fn global(&self, name: &str) -> Result<&Global> {
        self.tensors.get(name).ok_or_else(|| {
            bad(
                &self.dir,
                K::MissingTensor,
                format!("no tensor `{name}` in save {}", self.save),
            )
        })
    }

    /// Global tensor `name`, assembled from the ranks' pieces.
    pub fn read(&self, name: &str) -> Result<Vec<f32>> {
        let n = numel(&self.global(name)?.shape).unwrap_or(u64::MAX);
        self.read_range(name, 0, n)
    }

    /// Elements `start .. start + len` of global tensor `name`: each rank's piece overlapping
    /// the range is read (and verified) a part at a time, keeping only the range.
    pub fn read_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<f32>> {
        let g = self.global(name)?;
        let n = numel(&g.shape).unwrap_or(u64::MAX);
        let end = start.checked_add(len).filter(|&e| e <= n).ok_or_else(|| {
            bad(
                &self.dir,
                K::Shape,
                format!("elements {start}..+{len} of `{name}`, which has {n}"),
            )
        })?;
        let mut out = Vec::with_capacity(len as usize);
        for p in &g.parts {
            let (lo, hi) = (start.max(p.start), end.min(p.start + p.len));
            if lo < hi {
                out.extend(self.files[p.file].read_f32_range(&p.stored, lo - p.start, hi - lo)?);
            }
        }
        if out.len() as u64 != len {
            return Err(bad(
                &self.dir,
                K::Shape,
                format!(
                    "elements {start}..{end} of `{name}`: only {} there",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }

    /// The metadata a consolidated or resharded file carries, its selection restricted to
    /// the tensors `keep` accepts.
    fn common_metadata(&self, keep: impl Fn(&str) -> bool) -> HashMap<String, String> {
        let mut m = self.metadata.clone();
        m.remove(META_RANKS);
        m.remove(META_SAVE);
        let selection = describe_selection(&self.selection.0, &self.selection.1, keep);
        if !selection.is_empty() {
            m.insert(META_SELECTION.into(), selection);
        }
        m
    }

    /// Entries for every global tensor in `plan`'s pieces (or all of them, whole, for `None`).
    fn entries<'a>(&'a self, plan: Option<&RankPlan>) -> Vec<Entry<'a>> {
        let mut out = Vec::new();
        for (name, g) in &self.tensors {
            let (start, len, shape) = match plan {
                None => (0, numel(&g.shape).unwrap_or(0), g.shape.clone()),
                Some(plan) => match plan.pieces.iter().find(|p| p.global == g.base) {
                    Some(p) => (p.start, p.len, vec![p.len as usize]),
                    None => continue,
                },
            };
            let name = name.clone();
            out.push(Entry {
                name: name.clone(),
                shape,
                produce: Box::new(move || self.read_range(&name, start, len)),
            });
        }
        out
    }

    /// Writes the whole model into one training checkpoint at `out` (global names and shapes,
    /// the ranks' common metadata), one tensor in memory at a time: what a single process
    /// restores, and what PyTorch reads with `safetensors.torch.load_file`.
    pub fn consolidate(&self, out: impl AsRef<Path>) -> Result<()> {
        super::write_safetensors(
            out.as_ref(),
            self.entries(None),
            &self.common_metadata(|_| true),
        )
        .map(|_| ())
    }

    /// [`consolidate`](Self::consolidate) into Hugging Face shards of at most
    /// `max_shard_bytes` each in folder `out`; returns the index's path.
    pub fn consolidate_sharded(
        &self,
        out: impl AsRef<Path>,
        max_shard_bytes: u64,
    ) -> Result<PathBuf> {
        super::write_sharded(
            out.as_ref(),
            self.entries(None),
            &self.common_metadata(|_| true),
            max_shard_bytes,
        )
    }

    /// The part `plan` keeps, as a training checkpoint in memory that its EMA (tracking
    /// `plan.local_specs()`) restores: any plan, of any rank count.
    pub fn part(&self, plan: &RankPlan) -> Result<super::Checkpoint> {
        self.check_plan(plan)?;
        let keeps = |name: &str| plan.pieces.iter().any(|p| p.global == name);
        let bytes = super::safetensors_bytes(
            self.entries(Some(plan)),
            &self.common_metadata(keeps),
            crate::ParamDtype::F32,
        )?;
        super::Checkpoint::from_bytes(bytes)
    }

    /// Every piece of `plan` names a tracked tensor of the save, with its shape.
    fn check_plan(&self, plan: &RankPlan) -> Result<()> {
        let tracked = self.tracked();
        for p in &plan.pieces {
            match tracked.iter().find(|s| s.name == p.global) {
                Some(s) if s.shape == p.shape => {}
                Some(s) => {
                    return Err(bad(
                        &self.dir,
                        K::Shape,
                        format!(
                            "`{}` is {:?} in the save, {:?} in the plan",
                            p.global, s.shape, p.shape
                        ),
                    ))
                }
                None => {
                    return Err(bad(
                        &self.dir,
                        K::MissingTensor,
                        format!(
                            "the plan keeps `{}`, which the save does not hold",
                            p.global
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The same save for `ranks` ranks (each tensor cut evenly, [`RankPlan::even`]) in folder
    /// `out` (not this one), committed. Each new rank's file is written from the ranges it
    /// needs; each source piece a range overlaps is read whole, to verify its checksum.
    /// Returns the index's path.
    pub fn reshard(&self, out: impl AsRef<Path>, ranks: usize) -> Result<PathBuf> {
        let out = out.as_ref();
        if ranks == 0 {
            return Err(Error::InvalidConfig("a save of 0 ranks".into()));
        }
        fs::create_dir_all(out).map_err(io(out))?;
        if fs::canonicalize(out).ok() == fs::canonicalize(&self.dir).ok() {
            return Err(bad(
                out,
                K::Refused,
                "resharding into the folder it reads from: write into another folder",
            ));
        }
        check_newer(out, self.save)?;
        let tracked = self.tracked();
        for rank in 0..ranks {
            let plan = RankPlan::even(&tracked, rank, ranks)?;
            let keeps = |name: &str| plan.pieces.iter().any(|p| p.global == name);
            let mut meta = self.common_metadata(keeps);
            meta.insert(META_RANK.into(), rank.to_string());
            meta.insert(META_RANKS.into(), ranks.to_string());
            meta.insert(META_SAVE.into(), self.save.to_string());
            let pieces = serde_json::to_string(&plan.pieces)
                .map_err(|e| Error::InvalidConfig(format!("cannot encode the plan: {e}")))?;
            meta.insert(META_PIECES.into(), pieces);
            let path = out.join(rank_file(self.save, rank, ranks));
            super::write_safetensors(&path, self.entries(Some(&plan)), &meta)?;
        }
        commit_ranks(out, self.save, ranks, Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_plans_tile_every_tensor() {
        let model = [
            TensorSpec::new("a", [7, 3]),
            TensorSpec::new("b", [2]),
            TensorSpec::new("c", []),
        ];
        for ranks in 1..6 {
            let plans: Vec<RankPlan> = (0..ranks)
                .map(|r| RankPlan::even(&model, r, ranks).unwrap())
                .collect();
            for g in &model {
                let mut parts: Vec<&Piece> = plans
                    .iter()
                    .flat_map(|p| p.pieces.iter())
                    .filter(|p| p.global == g.name)
                    .collect();
                parts.sort_by_key(|p| p.start);
                let mut at = 0;
                for p in parts {
                    assert_eq!(p.start, at, "{ranks} ranks, {}", g.name);
                    assert!(p.len > 0);
                    at += p.len;
                }
                assert_eq!(at, g.numel(), "{ranks} ranks, {}", g.name);
            }
        }
        assert!(RankPlan::new(2, 2).is_err());
        let p = RankPlan::new(0, 1).unwrap();
        assert!(p.clone().piece("a", [4], 3, 2).is_err(), "past the end");
        assert!(p
            .piece("a", [4], 0, 2)
            .unwrap()
            .piece("a", [4], 2, 2)
            .is_err());
    }

    #[test]
    fn stored_names_map_to_their_piece() {
        let pieces = [
            Piece {
                global: "w".into(),
                shape: vec![4],
                start: 0,
                len: 4,
            },
            Piece {
                global: "w/x".into(),
                shape: vec![4],
                start: 0,
                len: 4,
            },
        ];
        let of = |s| piece_of(&pieces, s).map(|(p, rest)| (p.global.as_str(), rest));
        assert_eq!(of("w"), Some(("w", "")));
        assert_eq!(
            of("w/ExponentialMovingAverage"),
            Some(("w", "/ExponentialMovingAverage"))
        );
        assert_eq!(of("w/x/Momentum"), Some(("w/x", "/Momentum")));
        assert_eq!(of("wx"), None);
        assert_eq!(save_of(&rank_file(42, 1, 3)), Some(42));
        assert_eq!(save_of("model-1-of-2.safetensors"), None);
        // Only names exactly as rank_file makes them: a user's file is never taken for one.
        for other in [
            "ema-5-rankings.safetensors",
            "ema-00000000000000000042-rank1-of-00003.safetensors",
            "ema-00000000000000000042-rank00001-of-3.safetensors",
            "ema-0000000000000000004x-rank00001-of-00003.safetensors",
            "ema-00000000000000000042-rank00001-of-00003.safetensors.tmp",
        ] {
            assert_eq!(save_of(other), None, "{other}");
        }
    }
}
