//! EMA of a [burn](https://burn.dev) module's weights on burn's own wgpu device (feature
//! `burn`).
//!
//! burn 0.22 runs on wgpu 30, as this crate does: its cubecl runtime hands out, for each
//! parameter, the `wgpu::Buffer` and offset where the values live, and the update runs in
//! place there, one compute pass per step on burn's device and queue, with no copy and no host
//! round trip. burn's optimizers return new tensors each step, so [`BurnEma::update`] finds
//! every parameter's current buffer again (the bind groups of the last few are cached).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use burn::nn::LinearConfig;
//! use burn::tensor::Device;
//! use wgpu_ema::burn::BurnEma;
//! use wgpu_ema::Schedule;
//!
//! // burn's device, and the wgpu device and queue it runs on.
//! let (device, setup) = Device::wgpu_options().init_with_setup()?;
//! let model = LinearConfig::new(4, 2).init(&device);
//! let mut ema = BurnEma::new(&model, &setup.device, &setup.queue, Schedule::tf(0.999))?;
//! // each training step, after `model = optimizer.step(lr, model, grads)`:
//! ema.update(&model)?;
//! let ema_model = ema.ema_module(model.clone())?; // a copy with the EMA weights
//! # let _ = ema_model; Ok(()) }
//! ```
//!
//! Names are the module paths burn-store uses (`layers.0.weight`), so
//! [`checkpoint::export_ema`](crate::checkpoint::export_ema) of [`BurnEma::snapshot`] loads
//! straight into the model with burn-store's `SafetensorsStore`.

mod optim;
mod record;
pub use optim::{EmaOptim, EmaOptimState, MAX_EMAS};
pub use record::EmaWeights;

use std::collections::HashMap;

use ::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use ::burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::{Cube, CubeBackend};
use cubecl::wgpu::{AutoCompiler, WgpuResource, WgpuServer};

use crate::error::{Error, Result};
use crate::gpu::{GpuEma, Snapshot};
use crate::schedule::Schedule;
use crate::tensors::{HostTensors, TensorSpec};

/// burn 0.22 and this crate must share one `wgpu`: a type error on this line means the `wgpu`
/// that burn was built with is not the one wgpu-ema uses. burn 0.22.x (cubecl 0.11) pairs
/// with wgpu-ema 0.1.x, both on wgpu 30.
const BURN_0_22_AND_WGPU_EMA_0_1_SHARE_WGPU_30: fn(cubecl::wgpu::wgpu::Device) -> wgpu::Device =
    |device| device;

/// A parameter's storage while our pass runs: holding the guard keeps burn's allocator from
/// freeing or reusing the memory until the pass is submitted.
struct Resolved {
    name: String,
    shape: Vec<usize>,
    resource: cubecl_runtime::storage::ManagedResource<WgpuResource>,
}

/// Walks a module and resolves every float parameter to its wgpu buffer, naming each by its
/// module path as burn-store does (dot-joined, enum variants skipped).
struct Resolver {
    path: PathStack,
    out: Vec<Result<Resolved>>,
}

/// The module path of the parameter being visited, as burn-store builds it: field and index
/// names joined with dots, enum variants left out.
#[derive(Default)]
struct PathStack {
    names: Vec<String>,
    skipped: Vec<bool>,
}

impl PathStack {
    fn enter(&mut self, name: &str, container_type: &str) {
        let skip = container_type.starts_with("Enum:");
        self.skipped.push(skip);
        if !skip {
            self.names.push(name.to_string());
        }
    }

    fn exit(&mut self) {
        if self.skipped.pop() == Some(false) {
            self.names.pop();
        }
    }

    fn name(&self) -> String {
        self.names.join(".")
    }
}

fn burn_error(name: &str, message: impl std::fmt::Display) -> Error {
    Error::Burn {
        name: name.to_string(),
        message: message.to_string(),
    }
}

fn resolve<const D: usize>(name: String, tensor: Tensor<D>) -> Result<Resolved> {
    let shape = tensor.shape().dims::<D>().to_vec();
    let primitive = tensor
        .without_autodiff()
        .try_into_primitive::<Cube>()
        .map_err(|e| {
            burn_error(
                &name,
                format!("not a tensor of burn's wgpu backend ({e:?})"),
            )
        })?;
    // Flushes burn's pending work for this tensor and gives the cubecl tensor behind it.
    let cube = primitive
        .client
        .clone()
        .resolve_tensor_float::<CubeBackend>(primitive);
    if cube.dtype != DType::F32 {
        return Err(burn_error(
            &name,
            format!("dtype {:?}; only F32 parameters are tracked", cube.dtype),
        ));
    }
    if !cube.is_contiguous() {
        return Err(burn_error(
            &name,
            "stored non-contiguously; make it contiguous first",
        ));
    }
    let resource = cube
        .client
        .get_resource::<WgpuServer<AutoCompiler>>(cube.handle.clone())
        .map_err(|e| burn_error(&name, format!("its storage is not a wgpu buffer ({e:?})")))?;
    Ok(Resolved {
        name,
        shape,
        resource,
    })
}

impl ModuleVisitor for Resolver {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(resolve(self.path.name(), param.val()));
    }
}

fn resolve_module<M: Module>(module: &M) -> Result<Vec<Resolved>> {
    let mut r = Resolver {
        path: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut r);
    r.out.into_iter().collect()
}

/// Replaces every float parameter by its EMA value (same id, so optimizers and records still
/// match).
struct WithShadows<'a> {
    path: PathStack,
    shadows: &'a HashMap<String, Vec<f32>>,
    /// Parameters left out by the selection: kept as they are.
    excluded: &'a std::collections::HashSet<String>,
    error: Option<Error>,
}

impl ModuleMapper for WithShadows<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        let Some(values) = self.shadows.get(&name) else {
            if !self.excluded.contains(&name) {
                self.error.get_or_insert(Error::UnknownName { name });
            }
            return param;
        };
        param.map(|tensor| {
            let data = TensorData::new(values.clone(), tensor.shape().dims::<D>().to_vec());
            Tensor::<D>::from_data(data, &tensor.device())
        })
    }
}

/// Exponential moving averages of a burn module's float parameters, updated in place on
/// burn's wgpu device ([`GpuEma`], the default), or with the shadows in host memory
/// ([`OffloadedEma`](crate::OffloadedEma), built by [`BurnEma::offloaded`]).
pub struct BurnEma<E = GpuEma> {
    ema: E,
    specs: Vec<TensorSpec>,
    /// Parameters the selection (or the rank's plan) leaves out, by module path.
    excluded: std::collections::HashSet<String>,
    /// A rank's part of the module ([`BurnEma::ranked`]): each tracked tensor is an element
    /// range of its parameter.
    plan: Option<crate::checkpoint::ranks::RankPlan>,
}

impl<E> std::fmt::Debug for BurnEma<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnEma")
            .field("specs", &self.specs)
            .finish_non_exhaustive()
    }
}

/// A builder tracking the resolved parameters `params` at their current buffers, with
/// `selection` (the guards in `params` hold the memory until the build is done).
fn track_module<'a>(
    schedule: Schedule,
    selection: &crate::select::Selection,
    params: &'a [Resolved],
) -> crate::GpuEmaBuilder<'a> {
    let _ = BURN_0_22_AND_WGPU_EMA_0_1_SHARE_WGPU_30;
    let mut builder = GpuEma::builder(schedule).select(selection.clone());
    for p in params {
        let r = p.resource.resource();
        let spec = TensorSpec::new(p.name.clone(), &p.shape);
        builder = builder.track_buffer(spec, &r.buffer, r.offset);
    }
    builder
}

impl<E> BurnEma<E> {
    /// Wraps a built EMA: its tracked names, and the parameters the selection left out.
    fn wrap(ema: E, specs: Vec<TensorSpec>, params: &[Resolved]) -> Self {
        let excluded = params
            .iter()
            .filter(|p| !specs.iter().any(|s| s.name == p.name))
            .map(|p| p.name.clone())
            .collect();
        Self {
            ema,
            specs,
            excluded,
            plan: None,
        }
    }

    /// Where tracked tensor `spec` is in its parameter `p`: the element offset of the rank's
    /// piece (0 when whole), after checking the parameter is the one expected.
    fn offset_in(&self, p: &Resolved, spec: &TensorSpec) -> Result<u64> {
        let piece = self
            .plan
            .as_ref()
            .and_then(|plan| plan.pieces().iter().find(|q| q.global == spec.name));
        let (shape, start) = match piece {
            Some(q) => (&q.shape, q.start),
            None => (&spec.shape, 0),
        };
        if p.name != spec.name || &p.shape != shape {
            return Err(burn_error(
                &p.name,
                format!("expected `{}` of shape {shape:?} here", spec.name),
            ));
        }
        Ok(start)
    }

    /// Finds each tracked parameter's current buffer and offset and hands it to `rebind`; the
    /// returned guards hold the parameters' memory until dropped (after the submit).
    fn rebind_all<M: Module>(
        &mut self,
        module: &M,
        mut rebind: impl FnMut(&mut E, &str, &wgpu::Buffer, u64) -> Result<()>,
    ) -> Result<Vec<Resolved>> {
        let params = resolve_module(module)?;
        let tracked: Vec<&Resolved> = params
            .iter()
            .filter(|p| !self.excluded.contains(&p.name))
            .collect();
        if tracked.len() != self.specs.len() {
            return Err(Error::TensorCountMismatch {
                expected: self.specs.len(),
                got: tracked.len(),
            });
        }
        for (p, spec) in tracked.iter().zip(&self.specs) {
            let start = self.offset_in(p, spec)?;
            let r = p.resource.resource();
            rebind(&mut self.ema, &spec.name, &r.buffer, r.offset + start * 4)?;
        }
        Ok(params)
    }

    /// The tracked parameters, named by module path.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The EMA underneath: schedule, counter, readback, checkpoints.
    pub fn ema(&self) -> &E {
        &self.ema
    }

    /// The EMA underneath, mutably (to restore a checkpoint, set the counter).
    pub fn ema_mut(&mut self) -> &mut E {
        &mut self.ema
    }

    /// `module` with every float parameter replaced by `shadows` (by module path).
    fn with_shadows<M: Module>(&self, module: M, shadows: HostTensors) -> Result<M> {
        let shadows: HashMap<String, Vec<f32>> = shadows
            .iter()
            .map(|(s, v)| (s.name.clone(), v.to_vec()))
            .collect();
        let mut mapper = WithShadows {
            path: PathStack::default(),
            shadows: &shadows,
            excluded: &self.excluded,
            error: None,
        };
        let out = module.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl BurnEma<GpuEma> {
    /// Tracks every float parameter of `module`, whose tensors live on the wgpu `device`
    /// (burn's: `Device::wgpu_options().init_with_setup()` returns it in its `WgpuSetup`).
    /// Shadows start equal to the parameters, copied on the GPU.
    pub fn new<M: Module>(
        module: &M,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        schedule: Schedule,
    ) -> Result<Self> {
        Self::with_selection(
            module,
            device,
            queue,
            schedule,
            &crate::select::Selection::new(),
        )
    }

    /// [`new`](Self::new) with a [`Selection`](crate::select::Selection) over the module
    /// paths: copied parameters (running statistics) follow their values exactly, excluded
    /// ones are not tracked (and [`ema_module`](Self::ema_module) leaves them as they are).
    pub fn with_selection<M: Module>(
        module: &M,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        schedule: Schedule,
        selection: &crate::select::Selection,
    ) -> Result<Self> {
        let params = resolve_module(module)?;
        let ema = track_module(schedule, selection, &params).build(device, queue)?;
        let specs = ema.specs();
        Ok(Self::wrap(ema, specs, &params))
    }

    /// A rank's part of `module`: for each piece of `plan` (its module path, the parameter's
    /// shape and an element range), the EMA of that range, updated in place in burn's buffer;
    /// parameters the plan does not name are left out. Save it with
    /// [`checkpoint::ranks::save_rank`](crate::checkpoint::ranks::save_rank) of
    /// `ema().snapshot(true)` (with the parameters, which a training checkpoint holds); the
    /// whole model's EMA comes from the committed save
    /// ([`RankedCheckpoint`](crate::checkpoint::ranks::RankedCheckpoint)), not from
    /// [`ema_module`](Self::ema_module), which this rank cannot fill.
    pub fn ranked<M: Module>(
        module: &M,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        schedule: Schedule,
        plan: &crate::checkpoint::ranks::RankPlan,
    ) -> Result<Self> {
        let _ = BURN_0_22_AND_WGPU_EMA_0_1_SHARE_WGPU_30;
        let params = resolve_module(module)?;
        let mut builder = GpuEma::builder(schedule);
        for q in plan.pieces() {
            let Some(p) = params.iter().find(|p| p.name == q.global) else {
                return Err(burn_error(
                    &q.global,
                    "the plan names no parameter of the module",
                ));
            };
            if p.shape != q.shape {
                return Err(burn_error(
                    &q.global,
                    format!(
                        "the parameter has shape {:?}, the plan {:?}",
                        p.shape, q.shape
                    ),
                ));
            }
            let r = p.resource.resource();
            let spec = TensorSpec::new(q.global.clone(), [q.len as usize]);
            builder = builder.track_buffer(spec, &r.buffer, r.offset + q.start * 4);
        }
        let ema = builder.build(device, queue)?;
        // Tracked in module order, as updates find them.
        let specs: Vec<TensorSpec> = params
            .iter()
            .filter_map(|p| ema.specs().into_iter().find(|s| s.name == p.name))
            .collect();
        let mut out = Self::wrap(ema, specs, &params);
        out.plan = Some(plan.clone());
        Ok(out)
    }

    /// One update after the optimizer's step: finds each parameter's current buffer and
    /// offset, records the update of all of them in one compute pass on burn's queue, and
    /// submits it. burn's pending work is flushed first (by resolving the tensors), and the
    /// parameters' memory is held until the pass is submitted.
    pub fn update<M: Module>(&mut self, module: &M) -> Result<()> {
        let params = self.rebind_all(module, |e, name, buffer, offset| {
            e.rebind(name, buffer, offset)
        })?;
        self.ema.update()?;
        // The guards in `params` are dropped only now, after the submit.
        drop(params);
        Ok(())
    }

    /// Reads every shadow back, by module path.
    pub fn read_shadows(&self) -> Result<HostTensors> {
        self.ema.read_shadows_blocking()
    }

    /// A snapshot of the shadows for checkpoints
    /// ([`checkpoint::export_ema`](crate::checkpoint::export_ema) writes them under the module
    /// paths, which burn-store's `SafetensorsStore` loads into the model).
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.ema.snapshot(false)
    }

    /// `module` with every float parameter replaced by its EMA value, for evaluation. A
    /// [`ranked`](Self::ranked) EMA holds parts of parameters: an error (consolidate the
    /// ranked checkpoint instead).
    pub fn ema_module<M: Module>(&self, module: M) -> Result<M> {
        if self.plan.is_some() {
            return Err(Error::InvalidConfig(
                "a ranked BurnEma holds part of the parameters: read the whole EMA from the \
                 committed ranked checkpoint (RankedCheckpoint::consolidate)"
                    .into(),
            ));
        }
        let shadows = self.read_shadows()?;
        self.with_shadows(module, shadows)
    }
}

impl BurnEma<crate::OffloadedEma> {
    /// [`BurnEma::with_selection`] with the shadows in host memory, fed through a staging ring
    /// of `offload`'s size (see [`GpuEmaBuilder::build_offloaded`](crate::GpuEmaBuilder::build_offloaded)):
    /// for models whose EMA does not fit beside them on the GPU. burn's parameter buffers
    /// have `COPY_SRC`, which the copies need.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::Device;
    /// use wgpu_ema::{burn::BurnEma, select::Selection, Offload, Schedule};
    /// let (device, setup) = Device::wgpu_options().init_with_setup()?;
    /// let model = LinearConfig::new(4, 2).init(&device);
    /// let mut ema = BurnEma::offloaded(&model, &setup.device, &setup.queue, Schedule::tf(0.999),
    ///     &Selection::new(), Offload::new(64 << 20))?;
    /// ema.update(&model)?;                            // never waits for the host
    /// let ema_model = ema.ema_module(model.clone())?; // settles, then reads host memory
    /// # let _ = ema_model; Ok(()) }
    /// ```
    pub fn offloaded<M: Module>(
        module: &M,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        schedule: Schedule,
        selection: &crate::select::Selection,
        offload: crate::Offload,
    ) -> Result<Self> {
        let params = resolve_module(module)?;
        let ema =
            track_module(schedule, selection, &params).build_offloaded(device, queue, offload)?;
        let specs = ema.specs();
        Ok(Self::wrap(ema, specs, &params))
    }

    /// One update after the optimizer's step: finds each parameter's current buffer, records
    /// the copies of the chunks due on burn's queue and submits them. Never waits for the host
    /// (see [`OffloadedEma`](crate::OffloadedEma)).
    pub fn update<M: Module>(&mut self, module: &M) -> Result<()> {
        let params = self.rebind_all(module, |e, name, buffer, offset| {
            e.rebind(name, buffer, offset)
        })?;
        self.ema.update()?;
        drop(params);
        Ok(())
    }

    /// Settles the EMA and reads every shadow from host memory, by module path. Settling
    /// samples the stale chunks, so it reads `module`'s parameters where they are now (pass
    /// the module as it stands: burn may have moved them since the last update).
    pub fn read_shadows<M: Module>(&mut self, module: &M) -> Result<HostTensors> {
        let params = self.rebind_all(module, |e, name, buffer, offset| {
            e.rebind(name, buffer, offset)
        })?;
        let shadows = self.ema.read_shadows();
        drop(params);
        shadows
    }

    /// `module` with every float parameter replaced by its EMA value (settled first, reading
    /// the parameters of `module`).
    pub fn ema_module<M: Module>(&mut self, module: M) -> Result<M> {
        let shadows = self.read_shadows(&module)?;
        self.with_shadows(module, shadows)
    }
}
