//! Synthesis: the weights of the snapshots that best express a wanted EMA length, and the
//! weighted sum streamed from the snapshot files into one safetensors file.

use std::collections::HashMap;
use std::path::Path;

use super::set::SnapshotSet;
use super::solve::{fit, Profile};
use super::META_T;
use crate::checkpoint::{write_safetensors, Entry, TensorFile, META_KIND};
use crate::error::{Error, Result};

/// One weighted profile of one snapshot in a synthesis.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    /// Position in [`SnapshotSet::snapshots`].
    pub snapshot: usize,
    /// Position in that snapshot's profiles.
    pub profile: usize,
    /// The snapshot's step.
    pub t: u64,
    /// The profile's exponent.
    pub gamma: f64,
    /// Its weight (all weights sum to 1).
    pub weight: f64,
}

/// The weights that synthesize the EMA of `sigma_rel` at step `t`.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// The wanted `sigma_rel`.
    pub sigma_rel: f64,
    /// Its exponent.
    pub gamma: f64,
    /// The step it is synthesized at.
    pub t: u64,
    /// One term per profile of every snapshot taken at or before `t`.
    pub terms: Vec<Term>,
}

impl SnapshotSet {
    /// The weights that synthesize the EMA of `sigma_rel` at step `t`, which must be a
    /// snapshot's step (default: the last snapshot's; another step is an error naming the
    /// nearest), from every profile of every snapshot taken at or before `t` (EDM2's rule:
    /// later snapshots hold steps the wanted EMA has not seen), by least squares over the
    /// profiles in f64, normalised to sum to 1.
    pub fn weights(&self, sigma_rel: f64, t: Option<u64>) -> Result<Weights> {
        let gamma = super::gamma_of_sigma_rel(sigma_rel)?;
        let last = self.snapshots.last().map_or(0, |s| s.t);
        let t = t.unwrap_or(last);
        // EDM2 synthesizes at a snapshot's step: elsewhere the EMA being approximated has
        // moved on from the last snapshot used, and nothing in the set says where to.
        if !self.snapshots.iter().any(|s| s.t == t) {
            let before = self.snapshots.iter().rev().find(|s| s.t < t);
            let after = self.snapshots.iter().find(|s| s.t > t);
            let near: Vec<String> = before
                .into_iter()
                .chain(after)
                .map(|s| format!("{} (snapshot {})", s.t, s.index))
                .collect();
            return Err(Error::PostHoc(format!(
                "no snapshot at step {t}: synthesis is at a snapshot's step; the nearest: {}",
                near.join(", ")
            )));
        }
        let mut terms = Vec::new();
        for (i, s) in self.snapshots.iter().enumerate() {
            if s.t > t || s.t == 0 {
                continue;
            }
            for (k, p) in s.profiles.iter().enumerate() {
                // The same profile recorded twice (two EMAs of one schedule) is one term.
                if s.profiles[..k].iter().any(|q| q.gamma == p.gamma) {
                    continue;
                }
                terms.push(Term {
                    snapshot: i,
                    profile: k,
                    t: s.t,
                    gamma: p.gamma,
                    weight: 0.0,
                });
            }
        }
        if terms.is_empty() {
            return Err(Error::PostHoc(format!(
                "no snapshot at or before step {t} (the first is at step {})",
                self.snapshots.first().map_or(0, |s| s.t)
            )));
        }
        let mut gammas: Vec<f64> = terms.iter().map(|x| x.gamma).collect();
        gammas.sort_by(f64::total_cmp);
        gammas.dedup();
        if gammas.len() < 2 {
            return Err(Error::PostHoc(format!(
                "the snapshots up to step {t} hold {} distinct profile(s): synthesis needs at \
                 least two different sigma_rel",
                gammas.len()
            )));
        }
        let recorded: Vec<Profile> = terms
            .iter()
            .map(|x| Profile {
                t: x.t as f64,
                gamma: x.gamma,
            })
            .collect();
        let x = fit(&recorded, Profile { t: t as f64, gamma })?;
        for (term, w) in terms.iter_mut().zip(x) {
            term.weight = w;
        }
        Ok(Weights {
            sigma_rel,
            gamma,
            t,
            terms,
        })
    }

    /// Writes the EMA that `weights` describe to `out` (f32 safetensors, plain parameter
    /// names, atomically), streaming: for each parameter, each snapshot's tensor is read in
    /// chunks and accumulated as `sum_i w_i x_i` in f32; host memory holds one tensor's
    /// accumulator and one chunk, whatever the model's size. Every tensor's checksum is
    /// verified as it is read. `progress(done, total)` reports bytes read.
    pub fn synthesize(
        &self,
        weights: &Weights,
        out: impl AsRef<Path>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<()> {
        let out = out.as_ref();
        let mut files: HashMap<usize, TensorFile> = HashMap::new();
        for term in &weights.terms {
            let s = self.snapshots.get(term.snapshot).ok_or_else(|| {
                Error::PostHoc(format!(
                    "term of snapshot {} of {}",
                    term.snapshot,
                    self.snapshots.len()
                ))
            })?;
            if s.profiles.get(term.profile).is_none() {
                return Err(Error::PostHoc(format!(
                    "profile {} of {}",
                    term.profile,
                    s.path.display()
                )));
            }
            if let std::collections::hash_map::Entry::Vacant(e) = files.entry(term.snapshot) {
                e.insert(TensorFile::open(&s.path)?);
            }
        }
        let per_term: u64 = self
            .params
            .values()
            .map(|s| s.iter().map(|&d| d as u64).product::<u64>())
            .sum::<u64>()
            * self.snapshots.first().map_or(4, |s| s.dtype.size());
        let total = per_term * weights.terms.len() as u64;
        let done = std::cell::Cell::new(0u64);
        let files = &files;
        let done = &done;
        let entries = self
            .params
            .iter()
            .map(|(name, shape)| {
                let name = name.clone();
                let numel: usize = shape.iter().product();
                Entry {
                    name: name.clone(),
                    shape: shape.clone(),
                    produce: Box::new(move || {
                        let mut acc = vec![0.0f32; numel];
                        for term in &weights.terms {
                            let s = &self.snapshots[term.snapshot];
                            let tensor = format!("{name}{}", s.profiles[term.profile].suffix);
                            let w = term.weight as f32;
                            let file = files.get(&term.snapshot).ok_or_else(|| {
                                Error::PostHoc(format!("snapshot {} is not open", term.snapshot))
                            })?;
                            file.accumulate_into(&tensor, w, &mut acc, CHUNK)?;
                            done.set(done.get() + numel as u64 * s.dtype.size());
                            progress(done.get(), total);
                        }
                        Ok(acc)
                    }),
                }
            })
            .collect();
        let meta = HashMap::from([
            (META_KIND.to_string(), "ema_export".to_string()),
            (
                crate::checkpoint::META_NUM_UPDATES.to_string(),
                weights.t.to_string(),
            ),
            (
                "posthoc_sigma_rel".to_string(),
                weights.sigma_rel.to_string(),
            ),
            ("posthoc_gamma".to_string(), weights.gamma.to_string()),
            (META_T.to_string(), weights.t.to_string()),
            (
                "posthoc_weights".to_string(),
                serde_json::Value::from(
                    weights
                        .terms
                        .iter()
                        .map(
                            |x| serde_json::json!({"t": x.t, "gamma": x.gamma, "weight": x.weight}),
                        )
                        .collect::<Vec<_>>(),
                )
                .to_string(),
            ),
            (
                crate::checkpoint::META_VERSION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ]);
        write_safetensors(out, entries, &meta).map(|_| ())
    }
}

/// Elements read per chunk: 4 MiB of f32, large enough for full-speed reads, small enough to
/// stay in cache while it is accumulated.
const CHUNK: usize = 1 << 20;
