//! Every name the crate derives or reserves, in one place: the names of shadows and their
//! companions in checkpoints (TensorFlow's), the metadata keys of the files we write, and the
//! names of post-hoc snapshots, TensorFlow's state file and burn's optimizer records.
//!
//! Checkpoints name the shadow of tracked tensor `weight` as TensorFlow saves it,
//! `weight/ExponentialMovingAverage` ([`ema_shadow_name`]); further EMAs add `_1`, `_2`, ...;
//! a compensated shadow's Kahan term is `weight/ExponentialMovingAverage/Compensation`
//! ([`compensation_name`]); BEMA's anchor `theta_0` is `weight/ExponentialMovingAverage/Theta0`
//! ([`anchor_name`]). Tracked names whose derived names would collide are refused when an
//! EMA is built.
//!
//! ```
//! use wgpu_ema::names;
//! assert_eq!(names::ema_shadow_name("w", 0), "w/ExponentialMovingAverage");
//! assert_eq!(names::ema_shadow_name("w", 2), "w/ExponentialMovingAverage_2");
//! assert_eq!(names::compensation_name("w"), "w/ExponentialMovingAverage/Compensation");
//! assert_eq!(names::anchor_name("w"), "w/ExponentialMovingAverage/Theta0");
//! ```

use crate::error::{Error, Result};

/// The suffix TensorFlow gives a shadow's name: `weight` → `weight/ExponentialMovingAverage`.
pub const EMA_SUFFIX: &str = "/ExponentialMovingAverage";

/// Suffix of a compensated shadow's Kahan term: `weight/ExponentialMovingAverage/Compensation`.
pub const COMPENSATION_SUFFIX: &str = "/Compensation";

/// The name of a shadow of EMA `k`: TensorFlow's `<name>/ExponentialMovingAverage` for the
/// first, `<name>/ExponentialMovingAverage_<k>` for the others (as TensorFlow names the
/// shadows of a second `ExponentialMovingAverage` object).
pub fn ema_shadow_name(name: &str, k: usize) -> String {
    match k {
        0 => format!("{name}{EMA_SUFFIX}"),
        _ => format!("{name}{EMA_SUFFIX}_{k}"),
    }
}

/// The name of the Kahan term of `name`'s (first) shadow.
pub fn compensation_name(name: &str) -> String {
    format!("{name}{EMA_SUFFIX}{COMPENSATION_SUFFIX}")
}

/// Suffix of BEMA's anchor: `weight/ExponentialMovingAverage/Theta0`.
pub const ANCHOR_SUFFIX: &str = "/Theta0";

/// The name of BEMA's anchor `theta_0` of `name` (the parameters when the burn-in ended or
/// the average last restarted).
pub fn anchor_name(name: &str) -> String {
    format!("{name}{EMA_SUFFIX}{ANCHOR_SUFFIX}")
}

/// The name safetensors reserves for the metadata.
pub(crate) const RESERVED_NAME: &str = "__metadata__";

/// Every name a checkpoint derives from tracked tensor `name` with `emas` EMAs (compensated or
/// not): the parameter, each EMA's shadow, the compensation term, and BEMA's anchor (listed
/// always: it collides with nothing the others do not).
pub(crate) fn derived_names(name: &str, emas: usize, compensated: bool) -> Vec<String> {
    let mut v = vec![name.to_string()];
    v.extend((0..emas.max(1)).map(|k| ema_shadow_name(name, k)));
    if compensated {
        v.push(compensation_name(name));
    }
    v.push(anchor_name(name));
    v
}

/// True for a name shaped like one this crate derives (`…/ExponentialMovingAverage`,
/// `…/ExponentialMovingAverage_<k>`, `…/ExponentialMovingAverage/Compensation`,
/// `…/ExponentialMovingAverage/Theta0`): a tracked
/// tensor of such a name would read back as another tensor's shadow.
pub(crate) fn looks_derived(name: &str) -> bool {
    let Some(at) = name.rfind(EMA_SUFFIX) else {
        return false;
    };
    let rest = &name[at + EMA_SUFFIX.len()..];
    rest.is_empty()
        || rest == COMPENSATION_SUFFIX
        || rest == ANCHOR_SUFFIX
        || rest
            .strip_prefix('_')
            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses tracked names whose derived names collide with each other's, with the reserved
/// `__metadata__`, or that are shaped like derived names themselves: such a set could be
/// tracked and saved but not loaded back.
pub(crate) fn check_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    emas: usize,
    compensated: bool,
) -> Result<()> {
    let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for name in names {
        if looks_derived(name) || name == TF_CHECKSUMS {
            return Err(Error::NameCollision {
                name: name.to_string(),
                with: "the names checkpoints derive for shadows and their checksums (a tensor \
                       of this name would load back as another tensor's shadow); rename it"
                    .into(),
            });
        }
        for derived in derived_names(name, emas, compensated) {
            if derived == RESERVED_NAME {
                return Err(Error::NameCollision {
                    name: name.to_string(),
                    with: "safetensors' reserved `__metadata__`".into(),
                });
            }
            if let Some(other) = seen.insert(derived.clone(), name) {
                if other == name {
                    return Err(Error::DuplicateName { name: name.into() });
                }
                return Err(Error::NameCollision {
                    name: name.to_string(),
                    with: format!("`{derived}`, derived from tracked tensor `{other}`"),
                });
            }
        }
    }
    Ok(())
}

// Metadata keys of the safetensors files we write.

/// Metadata key: the step counter (`num_updates`), decimal.
pub const META_NUM_UPDATES: &str = "num_updates";
/// Metadata key: the schedule and its parameters, e.g. `num_updates(decay=0.9999)`.
pub const META_SCHEDULE: &str = "schedule";
/// Metadata key: the schedules of further EMAs kept in the same pass, `; `-separated, EMA 1
/// first (absent with one EMA).
pub const META_EXTRA_SCHEDULES: &str = "extra_schedules";
/// Metadata key: when updates happen, `update_after_step=M,update_every=K`.
pub const META_POLICY: &str = "policy";
/// Metadata key: the tensors copied and left out, `copy=a,b;exclude=c` (absent when every
/// tensor is averaged).
pub const META_SELECTION: &str = "selection";
/// Metadata key: `exact` or `tensorflow`.
pub const META_NUMERICS: &str = "numerics";
/// Metadata key: the version of wgpu-ema that wrote the file.
pub const META_VERSION: &str = "wgpu_ema_version";
/// Metadata key: what the file is: `training`, `ema_export`, or [`SNAPSHOT_FORMAT`].
pub const META_KIND: &str = "format";
/// Metadata key holding the checksums: `v1;meta=<crc>;<crc>,<crc>,...`, one CRC32C (8 hex
/// digits) per tensor in name order.
pub const META_CHECKSUMS: &str = "wgpu_ema_crc32c";
/// Metadata key of every shard and of the index of a sharded checkpoint: the save it belongs
/// to.
pub const META_GENERATION: &str = "wgpu_ema_generation";
/// The index file of a sharded checkpoint, in Hugging Face's layout.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

// Checkpoints of an EMA spread over ranks.

/// The index of a ranked checkpoint: the save it commits, the rank count, the rank files.
pub const RANKS_INDEX: &str = "wgpu-ema-ranks.json";
/// Metadata key of a rank file: the rank that wrote it (0-based).
pub const META_RANK: &str = "wgpu_ema_rank";
/// Metadata key of a rank file: how many ranks share the model.
pub const META_RANKS: &str = "wgpu_ema_ranks";
/// Metadata key of a rank file: the save it belongs to (the caller's number: the step).
pub const META_SAVE: &str = "wgpu_ema_save";
/// Metadata key of a rank file: its pieces, a JSON list of
/// `{"global", "shape", "start", "len"}` (the global tensor, its shape, the element range).
pub const META_PIECES: &str = "wgpu_ema_pieces";

// Post-hoc EMA snapshots.

/// Metadata `format` of a post-hoc snapshot file.
pub const SNAPSHOT_FORMAT: &str = "posthoc_snapshot";
/// Metadata key: the step (`num_updates`) the snapshot was taken at.
pub const META_T: &str = "posthoc_t";
/// Metadata key: the snapshot's number in its directory (0, 1, ...).
pub const META_INDEX: &str = "posthoc_index";
/// Metadata key: the profiles, a JSON list of `{"suffix", "gamma", "sigma_rel"}`.
pub const META_PROFILES: &str = "posthoc_profiles";
/// Metadata key: the stored dtype (`F32`, `F16`, `BF16`).
pub const META_DTYPE: &str = "posthoc_dtype";
/// Metadata key: the recording run the snapshot belongs to (made when a recorder first opens an
/// empty directory, kept by every later recorder of that directory).
pub const META_RUN: &str = "posthoc_run";

// TensorFlow checkpoints.

/// The step counter's name in TensorFlow checkpoints (an int64 scalar).
pub const GLOBAL_STEP: &str = "global_step";
/// The directory's checkpoint state file, read by `tf.train.latest_checkpoint`.
pub const STATE_FILE: &str = "checkpoint";
/// The tensor (uint32, one per other entry in key order) that binds each entry's name, dtype,
/// shape, size and checksum in the TensorFlow checkpoints we write: TensorFlow's own checksum
/// covers a tensor's bytes only. TensorFlow's restores ignore it.
pub const TF_CHECKSUMS: &str = "_WGPU_EMA_CHECKSUMS";
/// TensorFlow 2's object graph, present in checkpoints of `tf.train.Checkpoint` (whose data is
/// laid out in object order, not key order).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) const TF_OBJECT_GRAPH: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

// burn's optimizer records (feature `burn`): leaf names under each parameter id, as
// `EmaOptim` saves its state and `EmaWeights` reads it back.

/// Leaf of EMA `k`'s shadow: `"{param_id}.ema"` (k = 0) or `"{param_id}.ema_{k}"`.
#[cfg(feature = "burn")]
pub(crate) fn shadow_leaf(k: usize) -> String {
    match k {
        0 => "ema".to_string(),
        _ => format!("ema_{k}"),
    }
}

/// Leaf of EMA `k`'s Kahan compensation term: `"{param_id}.ema_comp"`, `"..._comp_{k}"`.
#[cfg(feature = "burn")]
pub(crate) fn comp_leaf(k: usize) -> String {
    match k {
        0 => "ema_comp".to_string(),
        _ => format!("ema_comp_{k}"),
    }
}

/// Leaf of BEMA's anchor `theta_0`: `"{param_id}.ema_theta0"`.
#[cfg(feature = "burn")]
pub(crate) const ANCHOR_LEAF: &str = "ema_theta0";

/// Leaf of the step counter, a scalar: `"{param_id}.ema_num_updates"`.
#[cfg(feature = "burn")]
pub(crate) const COUNTER_LEAF: &str = "ema_num_updates";

/// Where the inner optimizer's state lives: under `"{param_id}.inner."`.
#[cfg(feature = "burn")]
pub(crate) const INNER_PREFIX: &str = "inner";
