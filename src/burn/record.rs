//! The EMA weights inside a burn optimizer record: read back by parameter id, put into a
//! module for evaluation, checked against a model, exported under module paths.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use ::burn::optim::OptimizerRecord;
use ::burn::tensor::{DType, FloatDType, Tensor, TensorData};

use super::{burn_error, PathStack};
use crate::checkpoint::{write_safetensors, Entry, META_KIND, META_NUM_UPDATES, META_VERSION};
use crate::error::{Error, Result};
use crate::names::{shadow_leaf, ANCHOR_LEAF, COUNTER_LEAF};
use crate::schedule::{Numerics, Policy, Schedule, Stepper};

/// The shadows an [`EmaOptim`](super::EmaOptim) left in a burn optimizer record (a
/// `Learner` checkpoint's `optim-<epoch>.bpk`, or `ModuleOptimizer::to_record()`), keyed by
/// parameter id.
#[derive(Clone, Debug, Default)]
pub struct EmaWeights {
    /// `(param id, k)` → (shape, values).
    shadows: HashMap<(u64, usize), (Vec<usize>, Vec<f32>)>,
    /// Param id → BEMA's anchor (shape, values), for a BEMA optimizer.
    anchors: HashMap<u64, (Vec<usize>, Vec<f32>)>,
    counters: HashMap<u64, u64>,
    /// Param id → module path, as burn's optimizer records them.
    paths: BTreeMap<u64, String>,
    /// Ids of the parameters a selection left out (see [`select`](Self::select)).
    excluded: std::collections::HashSet<u64>,
}

fn record_error(message: impl std::fmt::Display) -> Error {
    burn_error("optimizer record", message)
}

impl EmaWeights {
    /// Reads the shadows out of `record` (consumed: burn's records cannot be cloned).
    pub fn from_record(record: OptimizerRecord) -> Result<Self> {
        let bytes = record
            .into_bytes()
            .map_err(|e| record_error(format!("{e:?}")))?;
        Self::from_reader(
            burn_pack::Reader::from_bytes(bytes).map_err(|e| record_error(format!("{e:?}")))?,
        )
    }

    /// Reads the shadows out of a burnpack optimizer record on disk: a `Learner`'s
    /// `<dir>/checkpoint/optim-<epoch>.bpk`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let reader = burn_pack::Reader::from_file(path).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            tensor: None,
            kind: crate::error::CheckpointErrorKind::Format,
            message: format!("not a burn optimizer record: {e:?}"),
            source: None,
        })?;
        Self::from_reader(reader)
    }

    fn from_reader(reader: burn_pack::Reader) -> Result<Self> {
        let mut out = Self::default();
        for (key, value) in reader.scalars() {
            if let Some(id) = key.strip_suffix(&format!(".{COUNTER_LEAF}")) {
                if let (Ok(id), burn_pack::Scalar::UInt(n)) = (id.parse::<u64>(), value) {
                    out.counters.insert(id, *n);
                }
            }
        }
        for (key, path) in reader.metadata() {
            if let Ok(id) = key.parse::<u64>() {
                out.paths.insert(id, path.clone());
            }
        }
        let tensors = reader
            .into_tensors()
            .map_err(|e| record_error(format!("{e:?}")))?;
        for t in tensors {
            let (name, dtype, shape, _, bytes) =
                t.into_parts().map_err(|e| record_error(format!("{e:?}")))?;
            // `{id}.ema` or `{id}.ema_{k}`: the inner optimizer's leaves are under `{id}.inner.`.
            let Some((id, leaf)) = name.split_once('.') else {
                continue;
            };
            let Ok(id) = id.parse::<u64>() else { continue };
            // `Some(k)`: EMA k's shadow; `None`: BEMA's anchor.
            let k = match leaf.strip_prefix("ema") {
                _ if leaf == ANCHOR_LEAF => None,
                Some("") => Some(0),
                Some(rest) => match rest.strip_prefix('_').and_then(|k| k.parse::<usize>().ok()) {
                    Some(k) if shadow_leaf(k) == leaf => Some(k),
                    _ => continue,
                },
                None => continue,
            };
            if dtype != DType::F32 {
                return Err(record_error(format!(
                    "shadow `{name}` has dtype {dtype:?}, not F32"
                )));
            }
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            match k {
                Some(k) => out.shadows.insert((id, k), (shape.to_vec(), values)),
                None => out.anchors.insert(id, (shape.to_vec(), values)),
            };
        }
        if out.shadows.is_empty() {
            return Err(record_error(
                "no EMA shadows in it: was the optimizer wrapped in `EmaOptim`?",
            ));
        }
        Ok(out)
    }

    /// The step counter of the parameters (all equal in a record of one run), or `None` if the
    /// record has none.
    pub fn num_updates(&self) -> Option<u64> {
        self.counters.values().copied().max()
    }

    /// How many parameters have a shadow of EMA 0.
    pub fn len(&self) -> usize {
        self.shadows.keys().filter(|(_, k)| *k == 0).count()
    }

    /// True when no parameter has a shadow.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// EMA `k`'s shadow of the parameter with this id.
    pub fn shadow(&self, param_id: u64, k: usize) -> Option<(&[usize], &[f32])> {
        self.shadows
            .get(&(param_id, k))
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
    }

    /// Reads the record as [`EmaOptim::with_selection`](super::EmaOptim::with_selection) wrote
    /// it for `module` and `selection`: the parameters the selection leaves out have no
    /// shadows; [`ema_module`](Self::ema_module) and [`bema_module`](Self::bema_module) leave
    /// them as they are and [`export_safetensors`](Self::export_safetensors) writes only the
    /// others (an EMA of the adapters alone, under their module paths). [`check`](Self::check)
    /// then refuses a left-out parameter that has a shadow (a record of another selection).
    pub fn select<M: Module>(
        mut self,
        module: &M,
        selection: &crate::select::Selection,
    ) -> Result<Self> {
        let mut v = Collect {
            path: PathStack::default(),
            found: Vec::new(),
        };
        module.visit(&mut v);
        let modes = selection.resolve(v.found.iter().map(|(p, ..)| p.as_str()))?;
        self.excluded = v
            .found
            .iter()
            .zip(modes)
            .filter(|(_, m)| *m == crate::select::Mode::Exclude)
            .map(|((_, id, _), _)| *id)
            .collect();
        Ok(self)
    }

    /// Checks that this record belongs to `module`: a shadow of EMA `k` for every float
    /// parameter, of the parameter's shape, and none for parameters the module does not have.
    /// Errors name the module path. Run it on a record before resuming from it: burn's
    /// `load_record` drops what does not fit silently (and the EMA of such a parameter would
    /// restart).
    pub fn check<M: Module>(&self, module: &M, k: usize) -> Result<()> {
        let mut v = Collect {
            path: PathStack::default(),
            found: Vec::new(),
        };
        module.visit(&mut v);
        let mut seen = std::collections::HashSet::new();
        for (path, id, shape) in &v.found {
            seen.insert(*id);
            if self.excluded.contains(id) {
                if self.shadows.contains_key(&(*id, k)) {
                    return Err(burn_error(path, "has a shadow in the record, but the selection leaves it out: a record of another selection?"));
                }
                continue;
            }
            match self.shadows.get(&(*id, k)) {
                None => return Err(burn_error(path, format!("no shadow of EMA {k} in the record (parameter id {id}): a record of another model?"))),
                Some((s, _)) if s != shape => {
                    return Err(burn_error(path, format!("the record's shadow has shape {s:?}, the parameter {shape:?}")))
                }
                Some(_) => {}
            }
        }
        if let Some(((id, _), _)) = self
            .shadows
            .iter()
            .find(|((id, kk), _)| *kk == k && !seen.contains(id))
        {
            let path = self
                .paths
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("parameter id {id}"));
            return Err(burn_error(
                &path,
                "has a shadow in the record but is not in the module: a record of another model?",
            ));
        }
        Ok(())
    }

    /// `module` with every float parameter replaced by EMA `k`'s shadow (same ids, so the
    /// module still lines up with optimizer records), for evaluation or export. Checked with
    /// [`check`](Self::check) first.
    pub fn ema_module<M: Module>(&self, module: M, k: usize) -> Result<M> {
        self.check(&module, k)?;
        let mut m = Replace { weights: self, k };
        Ok(module.map(&mut m))
    }

    /// `module` (the parameters `theta_t` of the last step, as training left them) with every
    /// float parameter replaced by BEMA's weights `EMA_t + alpha_t (theta_t - theta_0)`: the
    /// record's EMA 0 and anchors, `alpha_t` from its step counter under the optimizer's
    /// `schedule` and `policy` (the record does not store them; pass those given to
    /// [`EmaOptim`](super::EmaOptim)). Computed on the host in f32, as the GPU path does.
    /// Errors: a schedule that is not BEMA, a record without anchors (of another schedule), or
    /// of another model (see [`check`](Self::check)).
    pub fn bema_module<M: Module>(
        &self,
        module: M,
        schedule: Schedule,
        policy: Policy,
    ) -> Result<M> {
        self.check(&module, 0)?;
        let n = self.num_updates().unwrap_or(0);
        let stepper = Stepper::new(schedule, Numerics::Exact, policy, n)?;
        let Some(a) = stepper.bias_weight() else {
            return Err(Error::InvalidConfig(format!(
                "BEMA's weights asked with the schedule {}",
                schedule.describe()
            )));
        };
        if self.anchors.len() < self.len() {
            return Err(record_error(
                "it holds no BEMA anchors (`ema_theta0`): a record of an EmaOptim whose first \
                 schedule was not BEMA",
            ));
        }
        // The parameters read first, so that a failed read is an error, not a half-mapped
        // module; then BEMA's weights in f32, as the GPU path computes them.
        let mut thetas = Thetas {
            path: PathStack::default(),
            found: Vec::new(),
            failed: None,
        };
        module.visit(&mut thetas);
        if let Some(e) = thetas.failed {
            return Err(e);
        }
        let a = a as f32;
        let mut weights = HashMap::with_capacity(thetas.found.len());
        for (path, id, theta) in thetas.found {
            if self.excluded.contains(&id) {
                continue;
            }
            let (Some((shape, ema)), Some((_, anchor))) =
                (self.shadows.get(&(id, 0)), self.anchors.get(&id))
            else {
                return Err(burn_error(&path, "has no BEMA anchor in the record"));
            };
            let w: Vec<f32> = ema
                .iter()
                .zip(anchor)
                .zip(&theta)
                .map(|((&s, &z), &p)| s + a * (p - z))
                .collect();
            weights.insert(id, (shape.clone(), w));
        }
        Ok(module.map(&mut Computed { weights }))
    }

    /// Writes EMA `k`'s shadows to a safetensors file under `module`'s paths
    /// (`layers.0.weight`), atomically and checksummed: burn-store's `SafetensorsStore` loads
    /// it straight into the model, and PyTorch's `load_file` reads it.
    pub fn export_safetensors<M: Module>(
        &self,
        module: &M,
        k: usize,
        path: impl AsRef<Path>,
    ) -> Result<()> {
        self.check(module, k)?;
        let mut v = Collect {
            path: PathStack::default(),
            found: Vec::new(),
        };
        module.visit(&mut v);
        let entries = v
            .found
            .into_iter()
            .filter(|(_, id, _)| !self.excluded.contains(id))
            .map(|(name, id, shape)| {
                let values = &self.shadows[&(id, k)].1;
                Entry::from_slice(name, &shape, values)
            })
            .collect();
        let meta = HashMap::from([
            (META_KIND.to_string(), "ema_export".to_string()),
            (
                META_NUM_UPDATES.to_string(),
                self.num_updates().unwrap_or(0).to_string(),
            ),
            (
                META_VERSION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ]);
        write_safetensors(path.as_ref(), entries, &meta).map(|_| ())
    }
}

/// Every float parameter's module path, id and shape.
struct Collect {
    path: PathStack,
    found: Vec<(String, u64, Vec<usize>)>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.found.push((
            self.path.name(),
            param.id.val(),
            param.shape().dims::<D>().to_vec(),
        ));
    }
}

/// Every float parameter's module path, id and values (as f32).
struct Thetas {
    path: PathStack,
    found: Vec<(String, u64, Vec<f32>)>,
    failed: Option<Error>,
}

impl ModuleVisitor for Thetas {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.name();
        match param
            .val()
            .cast(FloatDType::F32)
            .into_data()
            .try_into_vec::<f32>()
        {
            Ok(v) => self.found.push((path, param.id.val(), v)),
            Err(e) => {
                self.failed
                    .get_or_insert_with(|| burn_error(&path, format!("cannot read it: {e:?}")));
            }
        }
    }
}

/// Replaces each float parameter by values computed beforehand (by id), in its own dtype.
struct Computed {
    weights: HashMap<u64, (Vec<usize>, Vec<f32>)>,
}

impl ModuleMapper for Computed {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((shape, values)) = self.weights.remove(&param.id.val()) else {
            return param;
        };
        param.map(move |tensor| {
            let dtype = tensor.dtype();
            let t = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device());
            if dtype == DType::F32 {
                t
            } else {
                t.cast(dtype)
            }
        })
    }
}

struct Replace<'a> {
    weights: &'a EmaWeights,
    k: usize,
}

impl ModuleMapper for Replace<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((shape, values)) = self.weights.shadows.get(&(param.id.val(), self.k)) else {
            // `check` ran first: every parameter has one.
            return param;
        };
        let (shape, values) = (shape.clone(), values.clone());
        param.map(move |tensor| {
            let dtype = tensor.dtype();
            let t = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device());
            if dtype == DType::F32 {
                t
            } else {
                t.cast(dtype)
            }
        })
    }
}
