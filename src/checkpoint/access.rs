//! What restores take from a loaded checkpoint: tensors by the names TensorFlow gives them,
//! checked against what is tracked, borrowed from the file rather than copied.

use super::errors::{bad, bad_tensor};
use super::load::Checkpoint;
use super::{
    describe_policy, ema_shadow_name, Config, RestoreOptions, META_EXTRA_SCHEDULES, META_NUMERICS,
    META_NUM_UPDATES, META_POLICY, META_SCHEDULE, META_SELECTION,
};
use crate::error::CheckpointErrorKind as K;
use crate::error::Result;
use crate::names::EMA_SUFFIX;
use crate::schedule::Numerics;
use crate::tensors::{HostTensors, TensorSpec};

/// Everything a restore takes from a checkpoint, borrowed from the file and checked.
pub(crate) struct RestoreSet<'a> {
    pub num_updates: u64,
    pub shadows: Vec<&'a [f32]>,
    pub comps: Option<Vec<&'a [f32]>>,
    /// EMA 1, 2, ...
    pub extras: Vec<Vec<&'a [f32]>>,
    /// BEMA's anchors, for an EMA whose schedule is BEMA.
    pub anchors: Option<Vec<&'a [f32]>>,
}

impl Checkpoint {
    /// What a restore of `specs` into an EMA of `config` takes: every shadow (of each EMA), the
    /// compensation terms when `compensated`, the counter; names, shapes, configuration and
    /// finiteness all checked before the caller writes anything.
    pub(crate) fn restore_set(
        &self,
        specs: &[TensorSpec],
        compensated: bool,
        config: &Config<'_>,
        opts: RestoreOptions,
    ) -> Result<RestoreSet<'_>> {
        let shadows = self.shadow_slices(specs)?;
        let num_updates = self.num_updates()?;
        let comps = if compensated {
            self.compensation_slices(specs)?
        } else {
            None
        };
        let extras = (1..=config.extra.len())
            .map(|k| self.slices(specs, |s| ema_shadow_name(&s.name, k)))
            .collect::<Result<Vec<_>>>()?;
        // A BEMA EMA cannot resume without its anchor: every one must be there.
        let anchors = match config.schedule.as_bema() {
            Some(_) => Some(self.slices(specs, |s| crate::names::anchor_name(&s.name))?),
            None => None,
        };
        // Each value under its name in the file, so that a refusal names what to look at.
        let mut named: Vec<(String, &[f32])> = Vec::new();
        for (spec, v) in specs.iter().zip(&shadows) {
            named.push((ema_shadow_name(&spec.name, 0), v));
        }
        for (spec, v) in specs.iter().zip(comps.iter().flatten()) {
            named.push((crate::names::compensation_name(&spec.name), v));
        }
        for (k, set) in extras.iter().enumerate() {
            for (spec, v) in specs.iter().zip(set) {
                named.push((ema_shadow_name(&spec.name, k + 1), v));
            }
        }
        for (spec, v) in specs.iter().zip(anchors.iter().flatten()) {
            named.push((crate::names::anchor_name(&spec.name), v));
        }
        let all: Vec<(&str, &[f32])> = named.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        self.check_restore(config, opts, &all)?;
        Ok(RestoreSet {
            num_updates,
            shadows,
            comps,
            extras,
            anchors,
        })
    }

    /// The step counter stored in the metadata.
    pub fn num_updates(&self) -> Result<u64> {
        let v = self
            .metadata()
            .get(META_NUM_UPDATES)
            .ok_or_else(|| bad(self.path(), K::Metadata, "metadata has no `num_updates`"))?;
        v.parse().map_err(|_| {
            bad(
                self.path(),
                K::Metadata,
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
        values: &[(&str, &[f32])],
    ) -> Result<()> {
        if !opts.allow_config_mismatch {
            let extra: Vec<String> = config.extra.iter().map(|s| s.describe()).collect();
            let ours = [
                (META_SCHEDULE, config.schedule.describe()),
                (META_NUMERICS, config.numerics.as_str().to_string()),
                (META_POLICY, describe_policy(config.policy)),
                (META_EXTRA_SCHEDULES, extra.join("; ")),
                (META_SELECTION, config.selection.to_string()),
            ];
            for (key, mine) in ours {
                let theirs = match (self.metadata().get(key), key) {
                    (Some(v), _) => v.clone(),
                    // A file of one EMA, or of no selection, has no such key (ours always have
                    // a schedule); others must have one.
                    (None, META_EXTRA_SCHEDULES | META_SELECTION)
                        if self.metadata().contains_key(META_SCHEDULE) =>
                    {
                        String::new()
                    }
                    (None, _) => continue,
                };
                if theirs != mine {
                    return Err(bad(
                        self.path(),
                        K::Config,
                        format!(
                            "{key} differs: the checkpoint's is {theirs:?}, this EMA's {mine:?} \
                             (RestoreOptions::allow_config_mismatch restores it anyway)"
                        ),
                    ));
                }
            }
        }
        if !opts.allow_non_finite {
            for (name, v) in values {
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(bad_tensor(self.path(), K::NonFinite, name, format!("tensor `{name}`: element {i} is {} (RestoreOptions::allow_non_finite restores it anyway)",
                            v[i]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The numerics stored in the metadata, if any.
    pub fn numerics(&self) -> Option<Numerics> {
        self.metadata()
            .get(META_NUMERICS)
            .and_then(|s| Numerics::parse(s))
    }

    /// `name` with the shape of `spec`, or an error naming the file and the tensor.
    pub fn tensor_as(&self, name: &str, spec: &TensorSpec) -> Result<&[f32]> {
        let (shape, values) = self.get(name).ok_or_else(|| match self.unsupported(name) {
            Some(why) => bad_tensor(
                self.path(),
                K::Unsupported,
                name,
                format!("tensor `{name}`: {why}"),
            ),
            None => bad_tensor(
                self.path(),
                K::MissingTensor,
                name,
                format!("tensor `{name}` is missing"),
            ),
        })?;
        if shape != spec.shape.as_slice() {
            return Err(bad_tensor(
                self.path(),
                K::Shape,
                name,
                format!(
                    "tensor `{name}` has shape {shape:?}, expected {:?}",
                    spec.shape
                ),
            ));
        }
        Ok(values)
    }

    /// The values of `specs` under the names `name_of` gives, borrowed from the file, each
    /// checked for its shape.
    pub(crate) fn slices(
        &self,
        specs: &[TensorSpec],
        name_of: impl Fn(&TensorSpec) -> String,
    ) -> Result<Vec<&[f32]>> {
        specs
            .iter()
            .map(|spec| self.tensor_as(&name_of(spec), spec))
            .collect()
    }

    fn collect(
        &self,
        specs: &[TensorSpec],
        name_of: impl Fn(&TensorSpec) -> String,
    ) -> Result<HostTensors> {
        let mut out = HostTensors::new();
        for (spec, values) in specs.iter().zip(self.slices(specs, name_of)?) {
            out.insert(spec.clone(), values.to_vec())?;
        }
        Ok(out)
    }

    /// [`shadows_for`](Self::shadows_for), borrowed.
    pub(crate) fn shadow_slices(&self, specs: &[TensorSpec]) -> Result<Vec<&[f32]>> {
        for name in self.names() {
            if let Some(base) = name.strip_suffix(EMA_SUFFIX) {
                if !specs.iter().any(|s| s.name == base) {
                    return Err(bad(
                        self.path(),
                        K::UnexpectedTensor,
                        format!("unexpected tensor `{name}`: `{base}` is not tracked"),
                    ));
                }
            }
        }
        self.slices(specs, TensorSpec::shadow_name)
    }

    /// [`compensation_for`](Self::compensation_for), borrowed.
    pub(crate) fn compensation_slices(&self, specs: &[TensorSpec]) -> Result<Option<Vec<&[f32]>>> {
        let name = |s: &TensorSpec| crate::names::compensation_name(&s.name);
        if !specs.iter().any(|s| self.get(&name(s)).is_some()) {
            return Ok(None);
        }
        self.slices(specs, name).map(Some)
    }

    /// The shadows of `specs` (`<name>/ExponentialMovingAverage`), keyed by parameter name:
    /// what evaluation with the moving averages loads into the parameters (TensorFlow's
    /// `variables_to_restore`). A shadow in the file for a tensor not in `specs` is an
    /// "unexpected name" error.
    pub fn shadows_for(&self, specs: &[TensorSpec]) -> Result<HostTensors> {
        self.shadow_slices(specs)?;
        self.collect(specs, TensorSpec::shadow_name)
    }

    /// The Kahan compensation terms of `specs`
    /// (`<name>/ExponentialMovingAverage/Compensation`), or `None` when the file has none (a
    /// checkpoint of an uncompensated EMA: resuming starts the terms at zero). Some but not
    /// all present is an error.
    pub fn compensation_for(&self, specs: &[TensorSpec]) -> Result<Option<HostTensors>> {
        let name = |s: &TensorSpec| crate::names::compensation_name(&s.name);
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
