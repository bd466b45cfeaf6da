//! A directory of post-hoc snapshots: each file's header read and the set checked for
//! consistency before anything is synthesized from it.

use crate::error::CheckpointErrorKind as K;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::record::parse_name;
use super::solve::sigma_rel_of;
use super::{META_INDEX, META_PROFILES, META_RUN, META_T, SNAPSHOT_FORMAT};
use crate::checkpoint::errors::bad;
use crate::checkpoint::{TensorFile, META_KIND};
use crate::error::{Error, Result};
use crate::tensors::{ParamDtype, TensorSpec};

/// One recorded profile of a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileInfo {
    /// What its tensors' names end with (`/ExponentialMovingAverage`, `..._1`, ...).
    pub suffix: String,
    /// The power function's exponent.
    pub gamma: f64,
    /// Its `sigma_rel`.
    pub sigma_rel: f64,
}

/// One snapshot file, as its header describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// Its number.
    pub index: u64,
    /// The step it was taken at.
    pub t: u64,
    /// The profiles it holds.
    pub profiles: Vec<ProfileInfo>,
    /// How its tensors are stored.
    pub dtype: ParamDtype,
    /// The recording run it belongs to (`None` for snapshots of wgpu-ema 0.2, which recorded
    /// none).
    pub run: Option<String>,
}

/// The snapshots in a directory, read and checked for consistency (headers only).
#[derive(Clone, Debug)]
pub struct SnapshotSet {
    pub(super) dir: PathBuf,
    pub(super) snapshots: Vec<SnapshotInfo>,
    /// Parameter name → shape, the same in every snapshot.
    pub(super) params: BTreeMap<String, Vec<usize>>,
    /// Numbers missing from the sequence (only with [`SnapshotSet::open_allowing_gaps`]).
    missing: Vec<u64>,
}

/// Reads one snapshot's header and checks it holds every profile of every parameter, and that
/// its name's number and step are its metadata's (a file renamed into another's place is
/// refused). `named` is `(index, t)` from the file name.
pub(super) fn describe(
    path: &Path,
    named: (u64, u64),
) -> Result<(SnapshotInfo, BTreeMap<String, Vec<usize>>)> {
    let index = named.0;
    let file = TensorFile::open(path)?;
    let meta = file.metadata();
    if meta.get(META_KIND).map(String::as_str) != Some(SNAPSHOT_FORMAT) {
        return Err(bad(
            path,
            K::Metadata,
            format!(
                "not a post-hoc snapshot (no `{META_KIND}: {SNAPSHOT_FORMAT}` in its metadata)"
            ),
        ));
    }
    let t: u64 = meta
        .get(META_T)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            bad(
                path,
                K::Metadata,
                format!("metadata `{META_T}` is missing or not a step"),
            )
        })?;
    let stored_index = meta.get(META_INDEX).and_then(|v| v.parse::<u64>().ok());
    if (stored_index, t) != (Some(named.0), named.1) {
        return Err(bad(
            path,
            K::Inconsistent,
            format!(
                "the file's name says snapshot {} of step {}, its metadata snapshot {} of step \
                 {t}: a file renamed or copied into the set",
                named.0,
                named.1,
                stored_index.map_or("(none)".to_string(), |i| i.to_string()),
            ),
        ));
    }
    let run = meta.get(META_RUN).cloned();
    let list: Vec<serde_json::Value> = meta
        .get(META_PROFILES)
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| {
            bad(
                path,
                K::Metadata,
                format!("metadata `{META_PROFILES}` is missing or not a JSON list"),
            )
        })?;
    let mut profiles = Vec::new();
    for p in &list {
        let suffix = p.get("suffix").and_then(|v| v.as_str());
        let gamma = p.get("gamma").and_then(|v| v.as_f64());
        let (Some(suffix), Some(gamma)) = (suffix, gamma) else {
            return Err(bad(
                path,
                K::Metadata,
                format!("profile {p} lacks `suffix` or `gamma`"),
            ));
        };
        if !(gamma.is_finite() && gamma > 0.0) || suffix.is_empty() {
            return Err(bad(
                path,
                K::Metadata,
                format!("profile {p}: gamma must be a positive number and the suffix non-empty"),
            ));
        }
        profiles.push(ProfileInfo {
            suffix: suffix.to_string(),
            gamma,
            sigma_rel: sigma_rel_of(gamma),
        });
    }
    if profiles.is_empty() {
        return Err(bad(path, K::Metadata, "the snapshot lists no profiles"));
    }
    let mut dtype = None;
    let mut params: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut seen = 0;
    for t in file.tensors() {
        let Some(d) = t.float else {
            return Err(bad(
                path,
                K::Dtype,
                format!(
                    "tensor `{}` has dtype {}, not a float type",
                    t.name, t.dtype
                ),
            ));
        };
        if *dtype.get_or_insert(d) != d {
            return Err(bad(
                path,
                K::Dtype,
                format!(
                    "tensor `{}` is {} but others are {:?}: one dtype per snapshot",
                    t.name, t.dtype, dtype
                ),
            ));
        }
        // The longest suffix that matches: `_1` profiles also end in the plain suffix's prefix.
        let Some((name, _)) = profiles
            .iter()
            .filter_map(|p| t.name.strip_suffix(&p.suffix).map(|n| (n, p.suffix.len())))
            .max_by_key(|&(_, len)| len)
        else {
            return Err(bad(
                path,
                K::UnexpectedTensor,
                format!(
                    "tensor `{}` belongs to none of the snapshot's profiles",
                    t.name
                ),
            ));
        };
        match params.get(name) {
            Some(shape) if *shape != t.shape => {
                return Err(bad(
                    path,
                    K::Shape,
                    format!(
                        "tensor `{}` has shape {:?}, the other profiles of `{name}` {:?}",
                        t.name, t.shape, shape
                    ),
                ));
            }
            Some(_) => {}
            None => {
                params.insert(name.to_string(), t.shape.clone());
            }
        }
        seen += 1;
    }
    for name in params.keys() {
        for p in &profiles {
            if file.entry(&format!("{name}{}", p.suffix)).is_none() {
                return Err(bad(
                    path,
                    K::MissingTensor,
                    format!(
                        "`{name}{}` is missing (profile sigma_rel {:.4} of `{name}`)",
                        p.suffix, p.sigma_rel
                    ),
                ));
            }
        }
    }
    if seen != params.len() * profiles.len() {
        return Err(bad(
            path,
            K::Inconsistent,
            format!(
                "{seen} tensors for {} parameters x {} profiles: ambiguous profile suffixes",
                params.len(),
                profiles.len()
            ),
        ));
    }
    let info = SnapshotInfo {
        path: path.to_path_buf(),
        index,
        t,
        profiles,
        dtype: dtype.unwrap_or_default(),
        run,
    };
    Ok((info, params))
}

/// True when two lists of profiles, as (suffix, gamma), are one recording's: the same suffixes
/// and gammas in order, gamma within 1e-12 relative (sigma_rel is derived from it, and JSON's
/// decimal may round its last digit). A missing field matches nothing.
pub(super) fn same_profiles(
    a: &[(Option<String>, Option<f64>)],
    b: &[(Option<String>, Option<f64>)],
) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            ((Some(sx), Some(gx)), (Some(sy), Some(gy))) => {
                sx == sy && (gx - gy).abs() <= 1e-12 * gx.abs().max(gy.abs())
            }
            _ => false,
        })
}

/// The most snapshot numbers a set may lack (with gaps accepted).
const MAX_MISSING: u64 = 1 << 20;

impl SnapshotSet {
    /// Reads the headers of every snapshot in `dir` (`phema-*.safetensors`; `stale/` is not
    /// looked into) and checks that they form one recording: every file verified against its
    /// checksums; one run (the id its recorder wrote) and the same profiles in all; numbered
    /// 0, 1, 2, ... without a gap (a deleted snapshot is an error naming the missing numbers),
    /// steps growing with the numbers; the same parameters with the same shapes and one dtype
    /// in all; every profile of every parameter present.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(dir.as_ref(), false)
    }

    /// [`open`](Self::open), accepting gaps in the numbering (snapshots deleted on purpose):
    /// [`missing`](Self::missing) lists them. Everything else is checked as by `open`.
    pub fn open_allowing_gaps(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(dir.as_ref(), true)
    }

    /// The snapshot numbers missing from the sequence (empty unless opened with
    /// [`open_allowing_gaps`](Self::open_allowing_gaps)).
    pub fn missing(&self) -> &[u64] {
        &self.missing
    }

    fn open_inner(dir: &Path, allow_gaps: bool) -> Result<Self> {
        let dir = dir.to_path_buf();
        let list = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut found = Vec::new();
        for e in list.flatten() {
            if let Some(named) = parse_name(&e.file_name().to_string_lossy()) {
                found.push((named, e.path()));
            }
        }
        if found.is_empty() {
            return Err(Error::PostHoc(format!(
                "no snapshots (phema-*.safetensors) in {}",
                dir.display()
            )));
        }
        found.sort();
        let mut snapshots: Vec<SnapshotInfo> = Vec::new();
        let mut params: Option<BTreeMap<String, Vec<usize>>> = None;
        for (named, path) in found {
            let (info, p) = describe(&path, named)?;
            match &params {
                None => params = Some(p),
                Some(first) if *first != p => {
                    let first_path = &snapshots[0].path;
                    let why = first
                        .iter()
                        .find(|(n, s)| p.get(*n) != Some(s))
                        .map(|(n, s)| match p.get(n) {
                            None => format!("`{n}` is missing"),
                            Some(other) => format!("`{n}` has shape {other:?}, not {s:?}"),
                        })
                        .or_else(|| {
                            p.keys()
                                .find(|n| !first.contains_key(*n))
                                .map(|n| format!("`{n}` is extra"))
                        })
                        .unwrap_or_default();
                    return Err(bad(
                        &path,
                        K::Inconsistent,
                        format!("does not match {}: {why}", first_path.display()),
                    ));
                }
                Some(_) => {}
            }
            if let Some(first) = snapshots.first() {
                let differs = |what: &str, theirs: String, ours: String| {
                    bad(
                        &path,
                        K::Inconsistent,
                        format!(
                            "{what} {theirs}, but {} has {ours}: snapshots of another recording \
                             in this directory (move them elsewhere)",
                            first.path.display()
                        ),
                    )
                };
                if first.dtype != info.dtype {
                    return Err(differs(
                        "stored as",
                        format!("{:?}", info.dtype),
                        format!("{:?}", first.dtype),
                    ));
                }
                if first.run != info.run {
                    return Err(differs(
                        "of run",
                        format!("{:?}", info.run.as_deref().unwrap_or("(none)")),
                        format!("{:?}", first.run.as_deref().unwrap_or("(none)")),
                    ));
                }
                let key = |s: &SnapshotInfo| -> Vec<(Option<String>, Option<f64>)> {
                    s.profiles
                        .iter()
                        .map(|p| (Some(p.suffix.clone()), Some(p.gamma)))
                        .collect()
                };
                if !same_profiles(&key(first), &key(&info)) {
                    let list = |s: &SnapshotInfo| {
                        let v: Vec<String> = s
                            .profiles
                            .iter()
                            .map(|p| format!("{:.4}", p.sigma_rel))
                            .collect();
                        format!("profiles (sigma_rel) {}", v.join(", "))
                    };
                    return Err(differs("with", list(&info), list(first)));
                }
            }
            if let Some(other) = snapshots.iter().find(|s| s.index == info.index) {
                return Err(bad(
                    &path,
                    K::Inconsistent,
                    format!(
                        "a second snapshot numbered {} (also {})",
                        info.index,
                        other.path.display()
                    ),
                ));
            }
            if let Some(other) = snapshots.iter().find(|s| s.t == info.t) {
                return Err(bad(
                    &path,
                    K::Inconsistent,
                    format!(
                        "a second snapshot of step {} (also {}): two runs in one directory?",
                        info.t,
                        other.path.display()
                    ),
                ));
            }
            if let Some(before) = snapshots.last().filter(|s| s.t > info.t) {
                return Err(bad(
                    &path,
                    K::Inconsistent,
                    format!(
                        "snapshot {} is of step {}, before snapshot {}'s step {}: numbers and \
                         steps must grow together",
                        info.index, info.t, before.index, before.t
                    ),
                ));
            }
            snapshots.push(info);
        }
        // Numbered 0, 1, 2, ...: a number missing is a snapshot deleted. (Numbers come from
        // verified metadata, but a jump no recorder makes is refused rather than listed.)
        let last = snapshots.last().map_or(0, |s| s.index);
        let absent = last
            .saturating_add(1)
            .saturating_sub(snapshots.len() as u64);
        if absent > MAX_MISSING {
            return Err(Error::PostHoc(format!(
                "{}: snapshot numbers run to {last} for {} snapshots: not one recording",
                dir.display(),
                snapshots.len()
            )));
        }
        let mut missing = Vec::new();
        let mut expect = 0u64;
        for s in &snapshots {
            missing.extend(expect..s.index);
            expect = s.index.saturating_add(1);
        }
        if !missing.is_empty() && !allow_gaps {
            let shown: Vec<String> = missing.iter().take(20).map(|i| i.to_string()).collect();
            return Err(Error::PostHoc(format!(
                "{}: snapshot number(s) {}{} missing from 0..={last}: deleted snapshots change \
                 every synthesized EMA; restore them, or accept the gaps (--allow-gaps, \
                 SnapshotSet::open_allowing_gaps)",
                dir.display(),
                shown.join(", "),
                if missing.len() > 20 { ", ..." } else { "" }
            )));
        }
        snapshots.sort_by_key(|s| s.t);
        Ok(Self {
            dir,
            snapshots,
            params: params.unwrap_or_default(),
            missing,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshots, by step.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.snapshots
    }

    /// The parameters every snapshot holds, by name.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.params
            .iter()
            .map(|(n, s)| TensorSpec::new(n.clone(), s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::same_profiles;

    #[test]
    fn profiles_match_by_suffix_and_gamma_within_a_rounding() {
        let p = |s: &str, g: f64| (Some(s.to_string()), Some(g));
        let a = [p("/E", 6.937203937601807), p("/E_1", 16.97)];
        assert!(same_profiles(
            &a,
            &[p("/E", 6.937203937601806), p("/E_1", 16.97)]
        ));
        assert!(!same_profiles(&a, &[p("/E", 6.94), p("/E_1", 16.97)]));
        assert!(!same_profiles(
            &a,
            &[p("/E_1", 6.937203937601807), p("/E", 16.97)]
        ));
        assert!(!same_profiles(&a, &a[..1]));
        assert!(!same_profiles(
            &a,
            &[(None, Some(6.937203937601807)), p("/E_1", 16.97)]
        ));
    }
}
