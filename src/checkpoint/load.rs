//! Reading checkpoints back: one file or a sharded set, validated before anything is used.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::checksum;
use super::write::META_GENERATION;
use super::{
    describe_policy, ema_shadow_name, Config, RestoreOptions, COMPENSATION_SUFFIX,
    META_EXTRA_SCHEDULES, META_NUMERICS, META_NUM_UPDATES, META_POLICY, META_SCHEDULE,
};
use crate::error::{Error, Result};
use crate::schedule::Numerics;
use crate::tensors::{HostTensors, TensorSpec, EMA_SUFFIX};

/// A loaded and validated checkpoint: f32 tensors by name, and the metadata.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    verified: bool,
}

/// The largest safetensors header we read (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

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
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        // The header's size first: a file cannot make us read or parse more than it holds.
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; 8];
        std::io::Read::read_exact(&mut file, &mut head).map_err(|_| {
            bad(
                path,
                format!("not a valid safetensors file: {len} bytes, too short for a header"),
            )
        })?;
        let n = u64::from_le_bytes(head);
        if n > len - 8 || n > MAX_HEADER {
            return Err(bad(
                path,
                format!(
                    "not a valid safetensors file: header of {n} bytes in a file of {len} \
                     (at most {MAX_HEADER})"
                ),
            ));
        }
        drop(file);
        let bytes = std::fs::read(path).map_err(io)?;
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
        let metadata = meta.metadata().clone().unwrap_or_default();
        let verified = match metadata.get(checksum::META_CHECKSUMS) {
            None if checksum::required(&metadata) => {
                return Err(bad(
                    path,
                    "written by wgpu-ema 0.2 or later but without checksums: the file was changed or damaged",
                ))
            }
            None => false,
            Some(v) => {
                let (meta_crc, crcs) = checksum::parse(v)
                    .ok_or_else(|| bad(path, "malformed checksums in the metadata"))?;
                if checksum::metadata_crc(&metadata) != meta_crc {
                    return Err(bad(
                        path,
                        "metadata checksum mismatch: the file was changed or damaged",
                    ));
                }
                if crcs.len() != tensors.len() {
                    return Err(bad(
                        path,
                        format!(
                            "{} checksums for {} tensors: the file was changed or damaged",
                            crcs.len(),
                            tensors.len()
                        ),
                    ));
                }
                // Our writer stores tensors in name order, and so lists their checksums.
                for ((name, (shape, _)), want) in tensors.iter().zip(crcs) {
                    let view = st
                        .tensor(name)
                        .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
                    let got =
                        crc32c::crc32c_append(checksum::tensor_start(name, shape), view.data());
                    if got != want {
                        return Err(bad(
                            path,
                            format!("tensor `{name}`: checksum mismatch (crc32c {got:08x}, written {want:08x}): the file was changed or damaged"),
                        ));
                    }
                }
                true
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            verified,
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
        let generation = index
            .get("metadata")
            .and_then(|m| m.get(META_GENERATION))
            .and_then(|g| g.as_str());
        let mut out = Self {
            path: path.to_path_buf(),
            metadata: HashMap::new(),
            tensors: BTreeMap::new(),
            verified: true,
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
            // Every shard must come from the save that wrote the index.
            let shard_gen = shard.metadata.get(META_GENERATION).map(String::as_str);
            if generation.is_some() && shard_gen != generation {
                return Err(bad(
                    &shard_path,
                    format!(
                        "shard of save {:?}, but the index is of save {:?}: a torn sharded checkpoint",
                        shard_gen.unwrap_or("(none)"),
                        generation.unwrap_or_default()
                    ),
                ));
            }
            out.verified &= shard.verified;
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

    /// True when every file carried wgpu-ema's checksums and every tensor matched them; false
    /// for files written by other tools (loaded unverified).
    pub fn verified(&self) -> bool {
        self.verified
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

    /// Checks what a restore is about to take: the EMA's configuration against the metadata
    /// (keys the file lacks are skipped), and `values` finite, unless `opts` allow otherwise.
    pub(crate) fn check_restore(
        &self,
        config: &Config<'_>,
        opts: RestoreOptions,
        values: &[&HostTensors],
    ) -> Result<()> {
        if !opts.allow_config_mismatch {
            let extra: Vec<String> = config.extra.iter().map(|s| s.describe()).collect();
            let ours = [
                (META_SCHEDULE, config.schedule.describe()),
                (META_NUMERICS, config.numerics.as_str().to_string()),
                (META_POLICY, describe_policy(config.policy)),
                (META_EXTRA_SCHEDULES, extra.join("; ")),
            ];
            for (key, mine) in ours {
                let theirs = match (self.metadata.get(key), key) {
                    (Some(v), _) => v.clone(),
                    // A file of one EMA has no such key; others must have one.
                    (None, META_EXTRA_SCHEDULES) if self.metadata.contains_key(META_SCHEDULE) => {
                        String::new()
                    }
                    (None, _) => continue,
                };
                if theirs != mine {
                    return Err(bad(
                        &self.path,
                        format!(
                            "{key} differs: the checkpoint's is {theirs:?}, this EMA's {mine:?} \
                             (RestoreOptions::allow_config_mismatch restores it anyway)"
                        ),
                    ));
                }
            }
        }
        if !opts.allow_non_finite {
            for set in values {
                for (spec, v) in set.iter() {
                    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                        return Err(bad(
                            &self.path,
                            format!(
                                "tensor `{}`: element {i} is {} (RestoreOptions::allow_non_finite restores it anyway)",
                                spec.name, v[i]
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
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
