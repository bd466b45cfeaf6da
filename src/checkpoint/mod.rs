//! Checkpoints in [safetensors](https://github.com/huggingface/safetensors), readable from
//! PyTorch, JAX, NumPy and burn, with TensorFlow's names.
//!
//! - A **training checkpoint** ([`save_training`]) holds each shadow as
//!   `<name>/ExponentialMovingAverage`, each raw parameter as `<name>`, any extra tensors you
//!   hand in (optimizer state such as `<name>/Momentum`), and `__metadata__` with
//!   `num_updates`, the schedule, the numerics and the crate version.
//! - An **export for inference** ([`export_ema`]) holds the shadows alone under the plain
//!   parameter names, so any loader of the model's weights takes the EMA weights.
//! - [`Checkpoint::load`] reads either, or a sharded one through its
//!   `model.safetensors.index.json`, validating everything before anything is used; restoring
//!   ([`GpuEma::restore`](crate::GpuEma::restore), [`CpuEma::restore`](crate::cpu::CpuEma::restore))
//!   checks every name and shape before writing anything.
//!
//! Saves are atomic (temporary file, fsync, rename, fsync of the directory): a failed or
//! interrupted save leaves the previous checkpoint intact.
//!
//! In memory, for a browser page (where the file functions are not compiled):
//! [`training_bytes`], [`export_ema_bytes`] and [`safetensors_bytes`] encode the same files,
//! and [`Checkpoint::from_bytes`] reads one.

mod access;
mod checksum;
mod encode;
pub(crate) mod errors;
mod load;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod lock;
// An EMA spread over ranks: files per rank, an index committing a save, resharding.
#[cfg(not(target_arch = "wasm32"))]
pub mod ranks;
// Files: native-only (a page has no filesystem; it uses the bytes functions).
#[cfg(not(target_arch = "wasm32"))]
mod stream;
#[cfg(not(target_arch = "wasm32"))]
mod tf;
#[cfg(not(target_arch = "wasm32"))]
mod write;

pub use load::Checkpoint;
#[cfg(not(target_arch = "wasm32"))]
pub use lock::{FolderLock, LOCK_FILE};
#[cfg(not(target_arch = "wasm32"))]
pub use stream::{TensorEntry, TensorFile};

use std::collections::HashMap;
#[cfg(not(target_arch = "wasm32"))]
use std::path::{Path, PathBuf};

pub use checksum::META_CHECKSUMS;
pub use encode::{safetensors_bytes, Entry};
#[cfg(not(target_arch = "wasm32"))]
pub use tf::{save_tf, GLOBAL_STEP, STATE_FILE};
#[cfg(not(target_arch = "wasm32"))]
pub use write::{
    write_safetensors, write_safetensors_as, write_sharded, INDEX_FILE, META_GENERATION,
};

/// What a path given to [`Checkpoint::load`] (or `wgpu-ema inspect`) stands for: a
/// checkpoint file or TensorFlow prefix as is; TensorFlow's `checkpoint` state file, or a
/// folder holding one, the latest checkpoint it names (`model_checkpoint_path`, as
/// `tf.train.latest_checkpoint` reads it); a folder holding a sharded checkpoint, its
/// `model.safetensors.index.json`. A folder holding neither is an error saying what was
/// expected.
#[cfg(not(target_arch = "wasm32"))]
pub fn resolve(path: &Path) -> Result<PathBuf> {
    use crate::error::CheckpointErrorKind as K;
    let state = if path.is_dir() {
        let state = path.join(STATE_FILE);
        if !state.is_file() {
            let index = path.join(INDEX_FILE);
            if index.is_file() {
                return Ok(index);
            }
            return Err(errors::bad(
                path,
                K::Format,
                format!(
                    "a folder without a checkpoint in it: expected TensorFlow's `{STATE_FILE}` \
                     state file or a sharded checkpoint's `{INDEX_FILE}` (or name a \
                     .safetensors file or a TensorFlow prefix)"
                ),
            ));
        }
        state
    } else if path.file_name().is_some_and(|n| n == STATE_FILE) && path.is_file() {
        path.to_path_buf()
    } else {
        return Ok(path.to_path_buf());
    };
    let text = std::fs::read_to_string(&state).map_err(errors::io(&state))?;
    let latest = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("model_checkpoint_path:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| {
            errors::bad(
                &state,
                K::Format,
                "a TensorFlow state file without `model_checkpoint_path`",
            )
        })?;
    let latest = Path::new(&latest);
    Ok(if latest.is_absolute() {
        latest.to_path_buf()
    } else {
        state
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(latest)
    })
}

/// What stands for the path of a checkpoint held in memory, in errors and in
/// [`Checkpoint::path`].
pub const IN_MEMORY: &str = "(in memory)";

use crate::error::{Error, Result};
use crate::schedule::{Numerics, Policy, Schedule};
use crate::tensors::{HostTensors, TensorSpec};

// The names and metadata keys are `crate::names`'; re-exported here where users found them.
pub use crate::names::{
    ema_shadow_name, COMPENSATION_SUFFIX, META_EXTRA_SCHEDULES, META_KIND, META_NUMERICS,
    META_NUM_UPDATES, META_POLICY, META_SCHEDULE, META_SELECTION, META_VERSION,
};

/// The policy as the metadata stores it: `update_after_step=M,update_every=K`, and
/// `,write_back_every=W` when it writes back (so that files of policies without write-back
/// read as before).
pub fn describe_policy(p: Policy) -> String {
    let mut s = format!(
        "update_after_step={},update_every={}",
        p.update_after_step, p.update_every
    );
    if p.write_back_every > 0 {
        s += &format!(",write_back_every={}", p.write_back_every);
    }
    s
}

/// What a restore accepts beyond a checkpoint of the same configuration with finite values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Accept NaN and infinite shadows (refused by default: a diverged run's checkpoint).
    pub allow_non_finite: bool,
    /// Accept a checkpoint whose schedule, numerics, policy or further EMAs differ from the
    /// EMA's own (refused by default, naming both). Keys a file lacks (files written by other
    /// tools) are never compared.
    pub allow_config_mismatch: bool,
}

/// The configuration a restore compares with a checkpoint's metadata.
pub(crate) struct Config<'a> {
    pub schedule: Schedule,
    pub numerics: Numerics,
    pub policy: Policy,
    pub extra: &'a [Schedule],
    /// The tensors copied and left out (`select::describe`; empty when all are averaged).
    pub selection: &'a str,
}

impl<'a> Config<'a> {
    /// An EMA's: its step counter's schedule, numerics and policy, its further EMAs, and its
    /// selection.
    pub fn of(
        stepper: &crate::schedule::Stepper,
        extra: &'a [Schedule],
        selection: &'a str,
    ) -> Self {
        Self {
            schedule: stepper.schedule(),
            numerics: stepper.numerics(),
            policy: stepper.policy(),
            extra,
            selection,
        }
    }
}

/// What a checkpoint is written from: an EMA's tracked tensors, counter, schedule, and a way
/// to read each shadow (and parameter) one at a time.
///
/// Implemented by [`Snapshot`](crate::Snapshot) (GPU) and [`CpuEma`](crate::cpu::CpuEma).
pub trait EmaState {
    /// The tracked tensors, in order.
    fn specs(&self) -> Vec<TensorSpec>;
    /// The step counter (calls so far; see [`schedule`](crate::schedule)).
    fn num_updates(&self) -> u64;
    /// The schedule.
    fn schedule(&self) -> Schedule;
    /// The numerics.
    fn numerics(&self) -> Numerics;
    /// When updates happen.
    fn policy(&self) -> Policy {
        Policy::default()
    }
    /// The shadow of tensor `i`.
    fn read_shadow(&self, i: usize) -> Result<Vec<f32>>;
    /// The raw parameter of tensor `i`, where the state holds it.
    fn read_param(&self, i: usize) -> Result<Option<Vec<f32>>>;
    /// True when the shadows carry Kahan compensation terms.
    fn compensated(&self) -> bool {
        false
    }
    /// EMAs kept per parameter (1 unless several are updated in one pass).
    fn ema_count(&self) -> usize {
        1
    }
    /// The schedule of EMA `k`, for the metadata.
    fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        (k == 0).then(|| self.schedule())
    }
    /// The shadow of tensor `i` in EMA `k >= 1`.
    fn read_ema_shadow(&self, k: usize, _i: usize) -> Result<Vec<f32>> {
        Err(Error::UnknownName {
            name: format!("EMA number {k}"),
        })
    }
    /// The compensation term of tensor `i`, for a compensated EMA.
    fn read_compensation(&self, _i: usize) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
    /// BEMA's anchor `theta_0` of tensor `i`, for an EMA whose schedule is
    /// [`Schedule::Bema`] (saved as [`anchor_name`](crate::names::anchor_name), restored
    /// exactly).
    fn read_anchor(&self, _i: usize) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
    /// The tensors copied and left out (see [`select`](crate::select)), as
    /// [`META_SELECTION`] records it; empty when every tensor is averaged.
    fn selection(&self) -> String {
        String::new()
    }
}

fn metadata(state: &dyn EmaState, kind: &str) -> HashMap<String, String> {
    let mut m = base_metadata(state, kind);
    if state.ema_count() > 1 {
        let extra: Vec<String> = (1..state.ema_count())
            .filter_map(|k| state.ema_schedule(k).map(|s| s.describe()))
            .collect();
        m.insert(META_EXTRA_SCHEDULES.to_string(), extra.join("; "));
    }
    let selection = state.selection();
    if !selection.is_empty() {
        m.insert(META_SELECTION.to_string(), selection);
    }
    m
}

fn base_metadata(state: &dyn EmaState, kind: &str) -> HashMap<String, String> {
    HashMap::from([
        (META_KIND.to_string(), kind.to_string()),
        (
            META_NUM_UPDATES.to_string(),
            state.num_updates().to_string(),
        ),
        (META_SCHEDULE.to_string(), state.schedule().describe()),
        (META_POLICY.to_string(), describe_policy(state.policy())),
        (
            META_NUMERICS.to_string(),
            state.numerics().as_str().to_string(),
        ),
        (
            META_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ])
}

fn training_entries<'a>(
    state: &'a dyn EmaState,
    params: Option<&'a HostTensors>,
    extra: &'a HostTensors,
) -> Result<Vec<Entry<'a>>> {
    let specs = state.specs();
    let mut entries = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        entries.push(Entry {
            name: spec.shadow_name(),
            shape: spec.shape.clone(),
            produce: Box::new(move || state.read_shadow(i)),
        });
        names.push(spec.shadow_name());
        for k in 1..state.ema_count() {
            let name = ema_shadow_name(&spec.name, k);
            entries.push(Entry {
                name: name.clone(),
                shape: spec.shape.clone(),
                produce: Box::new(move || state.read_ema_shadow(k, i)),
            });
            names.push(name);
        }
        if state.compensated() {
            let name = crate::names::compensation_name(&spec.name);
            let missing = name.clone();
            entries.push(Entry {
                name: name.clone(),
                shape: spec.shape.clone(),
                produce: Box::new(move || {
                    state.read_compensation(i)?.ok_or(Error::UnknownName {
                        name: missing.clone(),
                    })
                }),
            });
            names.push(name);
        }
        if state.schedule().as_bema().is_some() {
            let name = crate::names::anchor_name(&spec.name);
            let missing = name.clone();
            entries.push(Entry {
                name: name.clone(),
                shape: spec.shape.clone(),
                produce: Box::new(move || {
                    state.read_anchor(i)?.ok_or(Error::UnknownName {
                        name: missing.clone(),
                    })
                }),
            });
            names.push(name);
        }
        let param: Entry<'a> = match params {
            Some(p) => Entry::from_slice(spec.name.clone(), &spec.shape, p.try_get(&spec.name)?),
            None => {
                let name = spec.name.clone();
                Entry {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    produce: Box::new(move || {
                        state.read_param(i)?.ok_or_else(|| Error::UnknownName {
                            name: format!("{name} (raw parameter: take the snapshot with params, or pass them)"),
                        })
                    }),
                }
            }
        };
        if let Some(p) = params {
            let got = p.try_get(&spec.name)?.len() as u64;
            if got != spec.numel() {
                return Err(Error::LengthMismatch {
                    name: spec.name.clone(),
                    expected: spec.numel(),
                    got,
                });
            }
        }
        names.push(param.name.clone());
        entries.push(param);
    }
    for (spec, values) in extra.iter() {
        if crate::names::looks_derived(&spec.name) {
            return Err(Error::NameCollision {
                name: spec.name.clone(),
                with: "the names of shadows (an extra tensor of this name would load back as a shadow)".into(),
            });
        }
        names.push(spec.name.clone());
        entries.push(Entry::from_slice(spec.name.clone(), &spec.shape, values));
    }
    // Every name once, none reserved: checked before anything is written.
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    for name in &names {
        if name == crate::names::RESERVED_NAME {
            return Err(Error::NameCollision {
                name: name.clone(),
                with: "safetensors' reserved `__metadata__`".into(),
            });
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::NameCollision {
                name: name.clone(),
                with: "another tensor of the checkpoint (a tracked tensor, a name derived from one, or an extra tensor)".into(),
            });
        }
    }
    Ok(entries)
}

#[cfg(not(target_arch = "wasm32"))]
/// Saves a training checkpoint to `path` (one file), atomically.
///
/// `params`: the raw parameters by name when you have them on the host; `None` reads them
/// from `state` (a [`GpuEma::snapshot`](crate::GpuEma::snapshot) taken with params).
/// `extra`: further tensors under their own names (`weight/Momentum`, ...).
pub fn save_training(
    path: impl AsRef<Path>,
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
) -> Result<()> {
    let entries = training_entries(state, params, extra)?;
    write_safetensors(path.as_ref(), entries, &metadata(state, "training")).map(|_| ())
}

#[cfg(not(target_arch = "wasm32"))]
/// [`save_training`] into shards of at most `max_shard_bytes` in directory `dir`, with a
/// Hugging Face index; returns the index's path.
pub fn save_training_sharded(
    dir: impl AsRef<Path>,
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
    max_shard_bytes: u64,
) -> Result<PathBuf> {
    let entries = training_entries(state, params, extra)?;
    write_sharded(
        dir.as_ref(),
        entries,
        &metadata(state, "training"),
        max_shard_bytes,
    )
}

/// [`save_training`] into bytes in memory (the same file, through the same code): how a
/// browser page, which has no filesystem, saves a checkpoint. Read a GPU snapshot back with
/// [`Snapshot::into_host`](crate::Snapshot::into_host) first there.
pub fn training_bytes(
    state: &dyn EmaState,
    params: Option<&HostTensors>,
    extra: &HostTensors,
) -> Result<Vec<u8>> {
    let entries = training_entries(state, params, extra)?;
    safetensors_bytes(
        entries,
        &metadata(state, "training"),
        crate::ParamDtype::F32,
    )
}

fn export_entries(state: &dyn EmaState) -> Vec<Entry<'_>> {
    state
        .specs()
        .into_iter()
        .enumerate()
        .map(|(i, spec)| Entry {
            name: spec.name,
            shape: spec.shape,
            produce: Box::new(move || state.read_shadow(i)),
        })
        .collect()
}

#[cfg(not(target_arch = "wasm32"))]
/// Exports the shadows alone, under the plain parameter names, for inference.
pub fn export_ema(path: impl AsRef<Path>, state: &dyn EmaState) -> Result<()> {
    let entries = export_entries(state);
    write_safetensors(path.as_ref(), entries, &metadata(state, "ema_export")).map(|_| ())
}

/// [`export_ema`] into bytes in memory: the EMA weights a page offers as a download.
pub fn export_ema_bytes(state: &dyn EmaState) -> Result<Vec<u8>> {
    safetensors_bytes(
        export_entries(state),
        &metadata(state, "ema_export"),
        crate::ParamDtype::F32,
    )
}

/// TensorFlow's `variables_to_restore`: for each parameter, the name in a training checkpoint
/// to load it from when evaluating with the moving averages:
/// `("weight", "weight/ExponentialMovingAverage")`.
pub fn variables_to_restore(specs: &[TensorSpec]) -> Vec<(String, String)> {
    specs
        .iter()
        .map(|s| (s.name.clone(), s.shadow_name()))
        .collect()
}
