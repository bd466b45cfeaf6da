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

mod write;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

pub use write::{write_safetensors, write_sharded, Entry, INDEX_FILE};

use crate::error::{Error, Result};
use crate::schedule::{Numerics, Policy, Schedule};
use crate::tensors::{HostTensors, TensorSpec, EMA_SUFFIX};

/// Suffix of a compensated shadow's Kahan term: `weight/ExponentialMovingAverage/Compensation`.
pub const COMPENSATION_SUFFIX: &str = "/Compensation";

/// Metadata key: the schedules of further EMAs kept in the same pass, `; `-separated, EMA 1
/// first (absent with one EMA).
pub const META_EXTRA_SCHEDULES: &str = "extra_schedules";

/// The name of a shadow of EMA `k`: TensorFlow's `<name>/ExponentialMovingAverage` for the
/// first, `<name>/ExponentialMovingAverage_<k>` for the others (as TensorFlow names the
/// shadows of a second `ExponentialMovingAverage` object).
pub fn ema_shadow_name(name: &str, k: usize) -> String {
    match k {
        0 => format!("{name}{EMA_SUFFIX}"),
        _ => format!("{name}{EMA_SUFFIX}_{k}"),
    }
}

/// Metadata key: the step counter (`num_updates`), decimal.
pub const META_NUM_UPDATES: &str = "num_updates";
/// Metadata key: the schedule and its parameters, e.g. `num_updates(decay=0.9999)`.
pub const META_SCHEDULE: &str = "schedule";
/// Metadata key: when updates happen, `update_after_step=M,update_every=K`.
pub const META_POLICY: &str = "policy";
/// Metadata key: `exact` or `tensorflow`.
pub const META_NUMERICS: &str = "numerics";
/// Metadata key: the version of wgpu-ema that wrote the file.
pub const META_VERSION: &str = "wgpu_ema_version";
/// Metadata key: `training` or `ema_export`.
pub const META_KIND: &str = "format";

/// What a checkpoint is written from: an EMA's tracked tensors, counter, schedule, and a way
/// to read each shadow (and parameter) one at a time.
///
/// Implemented by [`Snapshot`](crate::Snapshot) (GPU) and [`CpuEma`](crate::cpu::CpuEma).
pub trait EmaState {
    /// The tracked tensors, in order.
    fn specs(&self) -> Vec<TensorSpec>;
    /// Updates applied so far.
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
}

fn metadata(state: &dyn EmaState, kind: &str) -> HashMap<String, String> {
    let mut m = base_metadata(state, kind);
    if state.ema_count() > 1 {
        let extra: Vec<String> = (1..state.ema_count())
            .filter_map(|k| state.ema_schedule(k).map(|s| s.describe()))
            .collect();
        m.insert(META_EXTRA_SCHEDULES.to_string(), extra.join("; "));
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
            let name = format!("{}{COMPENSATION_SUFFIX}", spec.shadow_name());
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
        if names.contains(&spec.name) {
            return Err(Error::DuplicateName {
                name: spec.name.clone(),
            });
        }
        names.push(spec.name.clone());
        entries.push(Entry::from_slice(spec.name.clone(), &spec.shape, values));
    }
    Ok(entries)
}

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

/// Exports the shadows alone, under the plain parameter names, for inference.
pub fn export_ema(path: impl AsRef<Path>, state: &dyn EmaState) -> Result<()> {
    let entries = state
        .specs()
        .into_iter()
        .enumerate()
        .map(|(i, spec)| Entry {
            name: spec.name,
            shape: spec.shape,
            produce: Box::new(move || state.read_shadow(i)),
        })
        .collect();
    write_safetensors(path.as_ref(), entries, &metadata(state, "ema_export")).map(|_| ())
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

/// A loaded and validated checkpoint: f32 tensors by name, and the metadata.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Checkpoint {
    /// Loads a `.safetensors` file, or a sharded checkpoint through its
    /// `model.safetensors.index.json`. Every file is validated (header size and offsets by the
    /// safetensors parser, f32 dtype, every shard present and holding the names its index
    /// gives); errors name the file and the tensor.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.to_string_lossy().ends_with(".index.json") {
            Self::load_index(path)
        } else {
            Self::load_file(path)
        }
    }

    fn load_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(path, format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{name}` has dtype {:?}; wgpu-ema stores F32",
                        view.dtype()
                    ),
                ));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            tensors,
        })
    }

    fn load_index(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(path, format!("index is not JSON: {e}")))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(path, "index has no `weight_map` object"))?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(path, format!("tensor `{name}`: shard name is not a string")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                return Err(bad(
                    path,
                    format!("tensor `{name}`: shard `{file}` is not a file name"),
                ));
            }
            by_file.entry(file).or_default().push(name);
        }
        let mut out = Self {
            path: path.to_path_buf(),
            metadata: HashMap::new(),
            tensors: BTreeMap::new(),
        };
        for (file, names) in by_file {
            let shard_path = dir.join(file);
            if !shard_path.exists() {
                return Err(bad(
                    path,
                    format!("shard `{file}` (holding `{}`) is missing", names[0]),
                ));
            }
            let shard = Self::load_file(&shard_path)?;
            for name in names {
                if !shard.tensors.contains_key(name) {
                    return Err(bad(
                        &shard_path,
                        format!("tensor `{name}` listed in the index is not in this shard"),
                    ));
                }
            }
            if out.metadata.is_empty() {
                out.metadata = shard.metadata;
            }
            for (name, t) in shard.tensors {
                if out.tensors.insert(name.clone(), t).is_some() {
                    return Err(bad(
                        &shard_path,
                        format!("tensor `{name}` is in two shards"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The file it was loaded from (the index for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `__metadata__`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's shape and values.
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.tensors
            .get(name)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
    }

    /// The step counter stored in the metadata.
    pub fn num_updates(&self) -> Result<u64> {
        let v = self
            .metadata
            .get(META_NUM_UPDATES)
            .ok_or_else(|| bad(&self.path, "metadata has no `num_updates`"))?;
        v.parse().map_err(|_| {
            bad(
                &self.path,
                format!("metadata `num_updates` = {v:?} is not a count"),
            )
        })
    }

    /// The numerics stored in the metadata, if any.
    pub fn numerics(&self) -> Option<Numerics> {
        self.metadata
            .get(META_NUMERICS)
            .and_then(|s| Numerics::parse(s))
    }

    /// `name` with the shape of `spec`, or an error naming the file and the tensor.
    pub fn tensor_as(&self, name: &str, spec: &TensorSpec) -> Result<&[f32]> {
        let (shape, values) = self
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("tensor `{name}` is missing")))?;
        if shape != spec.shape.as_slice() {
            return Err(bad(
                &self.path,
                format!(
                    "tensor `{name}` has shape {shape:?}, expected {:?}",
                    spec.shape
                ),
            ));
        }
        Ok(values)
    }

    fn collect(
        &self,
        specs: &[TensorSpec],
        name_of: impl Fn(&TensorSpec) -> String,
    ) -> Result<HostTensors> {
        let mut out = HostTensors::new();
        for spec in specs {
            let values = self.tensor_as(&name_of(spec), spec)?;
            out.insert(spec.clone(), values.to_vec())?;
        }
        Ok(out)
    }

    /// The shadows of `specs` (`<name>/ExponentialMovingAverage`), keyed by parameter name:
    /// what evaluation with the moving averages loads into the parameters (TensorFlow's
    /// `variables_to_restore`). A shadow in the file for a tensor not in `specs` is an
    /// "unexpected name" error.
    pub fn shadows_for(&self, specs: &[TensorSpec]) -> Result<HostTensors> {
        for name in self.names() {
            if let Some(base) = name.strip_suffix(EMA_SUFFIX) {
                if !specs.iter().any(|s| s.name == base) {
                    return Err(bad(
                        &self.path,
                        format!("unexpected tensor `{name}`: `{base}` is not tracked"),
                    ));
                }
            }
        }
        self.collect(specs, TensorSpec::shadow_name)
    }

    /// The Kahan compensation terms of `specs`
    /// (`<name>/ExponentialMovingAverage/Compensation`), or `None` when the file has none (a
    /// checkpoint of an uncompensated EMA: resuming starts the terms at zero). Some but not
    /// all present is an error.
    pub fn compensation_for(&self, specs: &[TensorSpec]) -> Result<Option<HostTensors>> {
        let name = |s: &TensorSpec| format!("{}{COMPENSATION_SUFFIX}", s.shadow_name());
        if !specs.iter().any(|s| self.get(&name(s)).is_some()) {
            return Ok(None);
        }
        self.collect(specs, name).map(Some)
    }

    /// The shadows of EMA `k` (see [`ema_shadow_name`]) of `specs`, by parameter name.
    pub fn ema_shadows_for(&self, k: usize, specs: &[TensorSpec]) -> Result<HostTensors> {
        if k == 0 {
            return self.shadows_for(specs);
        }
        self.collect(specs, |s| ema_shadow_name(&s.name, k))
    }

    /// The raw parameters of `specs` (plain names), for resuming training.
    pub fn params_for(&self, specs: &[TensorSpec]) -> Result<HostTensors> {
        self.collect(specs, |s| s.name.clone())
    }

    /// The weights of an inference export (plain names) for `specs`.
    pub fn weights_for(&self, specs: &[TensorSpec]) -> Result<HostTensors> {
        self.params_for(specs)
    }
}
