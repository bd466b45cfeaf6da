//! `EmaOptim` under burn's `Learner` (feature `burn-learner`): shadows against the f64
//! reference, a checkpoint resume bit for bit, records of another model refused, the export
//! loaded by burn-store, and two devices.

mod common;

#[path = "../examples/burn_learner/model.rs"]
#[allow(dead_code)]
mod model;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, DeviceKind, Tensor};
use burn::train::TrainStep;
use common::{assert_close, bits};
use model::{samples, train, ItemBatcher, Mlp};
use wgpu_ema::burn::{EmaOptim, EmaWeights};
use wgpu_ema::checkpoint::Checkpoint;
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::schedule::Policy;
use wgpu_ema::{Error, Numerics, Schedule};

/// The tests share burn's default device and its random generator (`Device::seed` before a
/// model is initialized): one at a time, so that a seeded initialization is the same in every
/// run.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// burn's wgpu device, or `None` (skipped) without an adapter, as `tests/burn.rs` does.
fn device() -> Option<Device> {
    match Device::wgpu_options().init() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("WGPU_EMA_REQUIRE_ADAPTER").as_deref() == Ok("1")
                && !e.to_string().contains("already")
            {
                panic!("WGPU_EMA_REQUIRE_ADAPTER=1 but burn found no wgpu adapter ({e})");
            }
            // Already initialized by another test of this process: use it.
            e.to_string().contains("already").then(Device::default)
        }
    }
}

/// (values, id) of every float parameter, in visiting order.
struct Values(Vec<(Vec<f32>, u64)>);
impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let v = param.val().into_data().try_to_vec::<f32>().expect("f32");
        self.0.push((v, param.id.val()));
    }
}
fn values<M: Module>(m: &M) -> Vec<(Vec<f32>, u64)> {
    let mut v = Values(Vec::new());
    m.visit(&mut v);
    v.0
}

fn grads(m: &Mlp, seed: u64, device: &Device) -> GradientsParams {
    use burn::data::dataloader::batcher::Batcher;
    TrainStep::step(m, ItemBatcher.batch(samples(seed, 16), device)).grads
}

#[test]
fn shadows_match_the_f64_reference() {
    let _one = lock();
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let schedules = [Schedule::tf(0.9), Schedule::power_sigma_rel(0.15).unwrap()];
    let policy = Policy {
        update_after_step: 2,
        update_every: 2,
        write_back_every: 0,
    };
    let mut net = Mlp::new(&device);
    let mut optim: ModuleOptimizer = EmaOptim::new(AdamConfig::new().build(), schedules[0])
        .unwrap()
        .extra_ema(schedules[1])
        .unwrap()
        .policy(policy)
        .unwrap()
        .into();
    let start = values(&net);
    let slices: Vec<&[f32]> = start.iter().map(|(v, _)| v.as_slice()).collect();
    let mut refs: Vec<ReferenceEma> = schedules
        .iter()
        .map(|s| {
            let mut r = ReferenceEma::new(*s, Numerics::Exact, &slices).unwrap();
            r.set_policy(policy).unwrap();
            r
        })
        .collect();
    for step in 0..9 {
        let g = grads(&net, step, &device);
        net = optim.step(1e-2, net, g);
        let now = values(&net);
        let slices: Vec<&[f32]> = now.iter().map(|(v, _)| v.as_slice()).collect();
        for r in &mut refs {
            r.update(&slices).unwrap();
        }
    }
    let w = EmaWeights::from_record(optim.to_record()).unwrap();
    assert_eq!(w.num_updates(), Some(9));
    assert_eq!(w.len(), 4);
    for (k, r) in refs.iter().enumerate() {
        for (i, (_, id)) in start.iter().enumerate() {
            let (_, got) = w.shadow(*id, k).unwrap();
            assert_close(
                &format!("EMA {k} tensor {i}"),
                got,
                &r.shadows()[i],
                16.0 * f32::EPSILON as f64,
            );
        }
    }
}

/// Switch EMA under `EmaOptim`: every 2nd update the optimizer returns the first EMA's weights
/// as the parameters (bit for bit), and training goes on from them.
#[test]
fn switch_ema_returns_the_ema_as_the_parameters_every_w_updates() {
    let _one = lock();
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let policy = Policy {
        write_back_every: 2,
        ..Policy::default()
    };
    let mut net = Mlp::new(&device);
    let mut optim: ModuleOptimizer =
        EmaOptim::new(AdamConfig::new().build(), Schedule::constant(0.5))
            .unwrap()
            .policy(policy)
            .unwrap()
            .into();
    let start = values(&net);
    for n in 1..=6u64 {
        let g = grads(&net, n, &device);
        net = optim.step(1e-2, net, g);
        let now = values(&net);
        let w = EmaWeights::from_record(optim.to_record()).unwrap();
        let same = start.iter().zip(&now).all(|((_, id), (v, _))| {
            let (_, shadow) = w.shadow(*id, 0).unwrap();
            shadow
                .iter()
                .zip(v)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        assert_eq!(same, policy.writes_back(n), "after update {n}");
    }
}

#[test]
fn learner_resume_restores_the_ema_bit_for_bit_and_burn_store_loads_the_export() {
    let _one = lock();
    let Some(device) = device() else { return };
    let (tr, va) = (samples(1, 256), samples(2, 64));
    let whole = tempfile::tempdir().unwrap();
    let a = train(whole.path(), &device, 3, None, tr.clone(), va.clone()).unwrap();
    let parts = tempfile::tempdir().unwrap();
    train(parts.path(), &device, 1, None, tr.clone(), va.clone()).unwrap();
    let b = train(parts.path(), &device, 3, Some(1), tr.clone(), va.clone()).unwrap();
    let wa = EmaWeights::load(whole.path().join("checkpoint/optim-3.bpk")).unwrap();
    let wb = EmaWeights::load(parts.path().join("checkpoint/optim-3.bpk")).unwrap();
    assert_eq!(wa.num_updates(), Some(24));
    assert_eq!(wb.num_updates(), Some(24));
    // burn's own resume is exact for the raw weights; the EMA must be too.
    for ((x, _), (y, _)) in values(&a.model).iter().zip(&values(&b.model)) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "raw weights differ after resume"
        );
    }
    for k in 0..2 {
        let (pa, pb) = (
            whole.path().join(format!("ema{k}.safetensors")),
            parts.path().join(format!("ema{k}.safetensors")),
        );
        wa.export_safetensors(&a.model, k, &pa).unwrap();
        wb.export_safetensors(&b.model, k, &pb).unwrap();
        let (ca, cb) = (
            Checkpoint::load(&pa).unwrap(),
            Checkpoint::load(&pb).unwrap(),
        );
        let names: Vec<&str> = ca.names().collect();
        assert_eq!(
            names,
            ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
        );
        for n in names {
            let (x, y) = (ca.get(n).unwrap().1, cb.get(n).unwrap().1);
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "EMA {k} `{n}` differs after resume"
            );
        }
    }
    // The EMA is not the raw weights, and burn-store loads the export into a fresh model.
    let ema = wa.ema_module(a.model.clone(), 0).unwrap();
    assert_ne!(values(&ema)[0].0, values(&a.model)[0].0);
    let mut fresh = Mlp::new(&device);
    let result = fresh
        .load_from(&mut SafetensorsStore::from_file(
            whole.path().join("ema0.safetensors"),
        ))
        .unwrap();
    assert_eq!(result.applied.len(), 4);
    for ((x, _), (y, _)) in values(&fresh).iter().zip(values(&ema).iter()) {
        assert_eq!(x, y);
    }
}

#[test]
fn records_of_another_model_are_refused() {
    let _one = lock();
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let net = Mlp::new(&device);
    let mut optim: ModuleOptimizer = EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.9))
        .unwrap()
        .into();
    let net = optim.step(1e-2, net.clone(), grads(&net, 1, &device));
    let w = EmaWeights::from_record(optim.to_record()).unwrap();
    w.check(&net, 0).unwrap();
    let err = |e: Error| match e {
        Error::Burn { name, message } => format!("{name}: {message}"),
        other => panic!("unexpected {other:?}"),
    };
    // Another model (fresh ids, other shapes): names the first parameter.
    let other = Mlp::new(&device);
    let e = err(w.check(&other, 0).unwrap_err());
    assert!(e.starts_with("hidden.weight"), "{e}");
    // EMA 1 was not kept.
    assert!(err(w.ema_module(net.clone(), 1).unwrap_err()).contains("EMA 1"));
    // A record of the plain optimizer holds no shadows.
    let mut plain: ModuleOptimizer = AdamConfig::new().build().into();
    let _ = plain.step(1e-2, net.clone(), grads(&net, 1, &device));
    assert!(err(EmaWeights::from_record(plain.to_record()).unwrap_err()).contains("EmaOptim"));
    // A file that is not a record.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.bpk"), b"not a record").unwrap();
    assert!(matches!(
        EmaWeights::load(dir.path().join("x.bpk")),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn two_devices_with_gradients_from_both() {
    let _one = lock();
    let Some(d0) = device() else { return };
    // A second logical device on the same adapter (burn keys runtimes by device kind).
    let d1 = Device::wgpu(DeviceKind::Cpu);
    let (d0, d1) = (d0.autodiff(), d1.autodiff());
    let schedule = Schedule::tf(0.8);
    // burn places parameter `p`'s step on device `p.id % 2` here (burn-optim's
    // `MultiGradientsParams::select`), and parameter ids are random: one model in 8 has all
    // four on one device. Take a model whose ids reach both devices, so that the test always
    // tests what it says.
    let mut net = loop {
        let m = Mlp::new(&d0);
        let parities: std::collections::HashSet<u64> =
            values(&m).iter().map(|(_, id)| id % 2).collect();
        if parities.len() == 2 {
            break m;
        }
    };
    let mut optim: ModuleOptimizer = EmaOptim::new(AdamConfig::new().build(), schedule)
        .unwrap()
        .into();
    let start = values(&net);
    let slices: Vec<&[f32]> = start.iter().map(|(v, _)| v.as_slice()).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &slices).unwrap();
    for step in 0..5 {
        // As burn-train's multi-device strategy does: a replica forked to each device, the
        // optimizer (here sharded: each parameter's state on the device its gradients are
        // accumulated on) stepping the main model.
        let g0 = grads(&net.clone().fork(&d0), 10 + step, &d0);
        let g1 = grads(&net.clone().fork(&d1), 20 + step, &d1);
        let multi = MultiGradientsParams {
            grads: vec![(g0, d0.clone()), (g1, d1.clone())],
        };
        net = optim.step_multi(1e-2, net, multi);
        let now = values(&net);
        let slices: Vec<&[f32]> = now.iter().map(|(v, _)| v.as_slice()).collect();
        reference.update(&slices).unwrap();
    }
    // Parameters (and their EMA state) were spread over both devices.
    struct Devices(std::collections::HashSet<String>);
    impl ModuleVisitor for Devices {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.insert(format!("{:?}", param.val().device()));
        }
    }
    let mut devices = Devices(Default::default());
    net.visit(&mut devices);
    assert_eq!(devices.0.len(), 2, "parameters on {:?}", devices.0);
    let w = EmaWeights::from_record(optim.to_record()).unwrap();
    assert_eq!(w.num_updates(), Some(5));
    for (i, (_, id)) in start.iter().enumerate() {
        let (_, got) = w.shadow(*id, 0).unwrap();
        assert_close(
            &format!("tensor {i}"),
            got,
            &reference.shadows()[i],
            16.0 * f32::EPSILON as f64,
        );
    }
}

/// An inner optimizer whose step makes the parameter its gradient: the test chooses the
/// trajectory.
#[derive(Clone)]
struct Follow;

impl burn::optim::Optimizer for Follow {
    type State<const D: usize> = ();
    fn step<const D: usize>(
        &self,
        _lr: burn::optim::LearningRate,
        _tensor: Tensor<D>,
        grad: Tensor<D>,
        _state: Option<()>,
    ) -> (Tensor<D>, Option<()>) {
        (grad, None)
    }
    fn to_device<const D: usize>(state: (), _device: &Device) {
        state
    }
}

#[test]
fn compensated_shadows_keep_small_updates() {
    use burn::optim::Optimizer;
    let _one = lock();
    let Some(device) = device() else { return };
    let n = 512;
    let steps = 3000;
    let schedule = Schedule::constant(0.9999);
    let trajectory = |t: u64| -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(t);
        (0..n)
            .map(|i| 1.0 + i as f32 / n as f32 + 0.01 * (rng.f32() - 0.5))
            .collect()
    };
    let tensor =
        |v: Vec<f32>| Tensor::<1>::from_data(burn::tensor::TensorData::new(v, [n]), &device);
    let mut errors = Vec::new();
    for compensated in [false, true] {
        let optim = EmaOptim::new(Follow, schedule)
            .unwrap()
            .compensated(compensated);
        let start = trajectory(0);
        let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&start]).unwrap();
        let mut param = tensor(start);
        let mut state = None;
        for t in 1..=steps {
            let next = trajectory(t);
            reference.update(&[&next]).unwrap();
            let (p, s) = optim.step(0.0, param, tensor(next), state);
            (param, state) = (p, s);
        }
        let state = state.unwrap();
        assert_eq!(state.num_updates(), steps);
        let got = state
            .shadow(0)
            .unwrap()
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let worst = common::max_error(&got, &reference.shadows()[0], 1.0);
        eprintln!("compensated {compensated}: worst error {worst:.3e} after {steps} steps at decay 0.9999");
        errors.push(worst);
    }
    // Measured on lavapipe: 9.2e-6 plain, 5.9e-8 compensated.
    assert!(errors[1] * 10.0 < errors[0], "{errors:?}");
}

/// BEMA under `EmaOptim`: the anchor rides in the optimizer's state, the corrected weights
/// (`EmaWeights::bema_module`) match the f64 BEMA of the paper's equations, a record resumes
/// them bit for bit, and bad configurations are errors.
#[test]
fn bema_under_ema_optim_matches_the_paper_and_resumes_exactly() {
    use wgpu_ema::schedule::Bema;
    let _one = lock();
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let bema = Bema::default();
    let schedule = Schedule::bema(bema);
    let policy = Policy {
        update_after_step: 2,
        update_every: 2,
        write_back_every: 0,
    };
    let make = || -> ModuleOptimizer {
        EmaOptim::new(AdamConfig::new().build(), schedule)
            .unwrap()
            .policy(policy)
            .unwrap()
            .into()
    };
    let mut net = Mlp::new(&device);
    let mut optim = make();
    let thetas = |m: &Mlp| -> Vec<Vec<f32>> { values(m).into_iter().map(|(v, _)| v).collect() };
    let mut paper = common::PaperBema::new(&bema, &policy, &thetas(&net));
    let mut resumed: Option<(Mlp, ModuleOptimizer)> = None;
    for n in 1..=9u64 {
        let g = grads(&net, n, &device);
        if let Some((rnet, mut ropt)) = resumed.take() {
            let g2 = grads(&rnet, n, &device);
            let rnet = ropt.step(1e-2, rnet, g2);
            resumed = Some((rnet, ropt));
        }
        net = optim.step(1e-2, net, g);
        paper.call(n, &thetas(&net));
        if n == 5 {
            resumed = Some((net.clone(), make().load_record(optim.to_record())));
        }
    }
    let w = EmaWeights::from_record(optim.to_record()).unwrap();
    let weights = w.bema_module(net.clone(), schedule, policy).unwrap();
    let want = paper.weights(&thetas(&net));
    for (i, (got, _)) in values(&weights).iter().enumerate() {
        assert_close(&format!("BEMA tensor {i}"), got, &want[i], 1e-5);
    }
    assert_ne!(
        values(&weights)[0].0,
        thetas(&net)[0],
        "the weights are not the parameters"
    );
    let (rnet, ropt) = resumed.unwrap();
    let wr = EmaWeights::from_record(ropt.to_record()).unwrap();
    let resumed_weights = wr.bema_module(rnet, schedule, policy).unwrap();
    for ((x, _), (y, _)) in values(&weights).iter().zip(&values(&resumed_weights)) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "BEMA weights differ after resuming from the record"
        );
    }
    // Refusals.
    assert!(matches!(
        w.bema_module(net.clone(), Schedule::constant(0.9), policy),
        Err(Error::InvalidConfig(_))
    ));
    let mut plain: ModuleOptimizer = EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.9))
        .unwrap()
        .into();
    let stepped = plain.step(1e-2, net.clone(), grads(&net, 1, &device));
    let wp = EmaWeights::from_record(plain.to_record()).unwrap();
    assert!(wp.bema_module(stepped, schedule, policy).is_err());
    let write_back = Policy {
        write_back_every: 2,
        ..Policy::default()
    };
    assert!(EmaOptim::new(AdamConfig::new().build(), schedule)
        .unwrap()
        .policy(write_back)
        .is_err());
    assert!(EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.9))
        .unwrap()
        .extra_ema(schedule)
        .is_err());
}

/// A selection under `EmaOptim`, through burn's parameter groups: excluded parameters are
/// stepped by the inner optimizer alone (as a plain run steps them, bit for bit) and have no
/// EMA state; a copied one's shadow is its value; the averaged one matches the f64 EMA; the
/// export holds only the tracked parameters, under their module paths.
#[test]
fn a_selection_under_ema_optim_uses_burns_parameter_groups() {
    use wgpu_ema::select::Selection;
    let _one = lock();
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let schedule = Schedule::constant(0.8);
    let selection = Selection::new().exclude("hidden.*").copy("out.bias");
    let net0 = Mlp::new(&device);
    let mut optim = EmaOptim::new(AdamConfig::new().build(), schedule)
        .unwrap()
        .with_selection(&net0, &selection)
        .unwrap();
    let mut plain: ModuleOptimizer = AdamConfig::new().build().into();
    let (mut net, mut reference_net) = (net0.clone(), net0.clone());
    // Visiting order: hidden.weight, hidden.bias, out.weight, out.bias.
    let start = values(&net);
    let mut r = ReferenceEma::new(schedule, Numerics::Exact, &[&start[2].0]).unwrap();
    for n in 1..=6u64 {
        let g = grads(&net, n, &device);
        let g2 = grads(&reference_net, n, &device);
        net = optim.step(1e-2, net, g);
        reference_net = plain.step(1e-2, reference_net, g2);
        let now = values(&net);
        r.update(&[&now[2].0]).unwrap();
        let w = EmaWeights::from_record(optim.to_record()).unwrap();
        assert!(w.shadow(now[0].1, 0).is_none() && w.shadow(now[1].1, 0).is_none());
        assert_eq!(w.shadow(now[3].1, 0).unwrap().1, now[3].0.as_slice());
        assert_close(
            "out.weight",
            w.shadow(now[2].1, 0).unwrap().1,
            &r.shadows()[0],
            1e-6,
        );
        for (i, ((a, _), (b, _))) in now.iter().zip(values(&reference_net)).enumerate().take(2) {
            assert_eq!(a, &b, "excluded tensor {i} is stepped as without the EMA");
        }
    }
    let w = EmaWeights::from_record(optim.to_record()).unwrap();
    assert!(
        w.check(&net, 0).is_err(),
        "without the selection, the excluded look missing"
    );
    let w = w.select(&net, &selection).unwrap();
    let ema = w.ema_module(net.clone(), 0).unwrap();
    let (got, now) = (values(&ema), values(&net));
    assert_eq!(got[0], now[0]);
    assert_eq!(got[1], now[1]);
    assert_ne!(got[2], now[2]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("selected.safetensors");
    w.export_safetensors(&net, 0, &path).unwrap();
    let names: Vec<String> = Checkpoint::load(&path)
        .unwrap()
        .names()
        .map(str::to_string)
        .collect();
    assert_eq!(names, ["out.bias", "out.weight"]);
    // A record of another selection, and patterns matching nothing, are refused.
    let other = EmaWeights::from_record(optim.to_record())
        .unwrap()
        .select(&net, &Selection::new().exclude("out.*"))
        .unwrap();
    assert!(other.check(&net, 0).is_err());
    assert!(EmaOptim::new(AdamConfig::new().build(), schedule)
        .unwrap()
        .with_selection(&net, &Selection::new().exclude("nothing.*"))
        .is_err());
}

/// One optimizer step as [`Watch`] saw it.
struct Seen {
    shape: Vec<usize>,
    /// Where the step ran, and where the first EMA's shadow lives after it.
    param_device: String,
    state_device: String,
    values: Vec<f32>,
}

static SEEN: std::sync::Mutex<Vec<Seen>> = std::sync::Mutex::new(Vec::new());

/// `EmaOptim` over Adam, as `model::optimizer` builds it, recording each step: the test's
/// window into the Learner's optimizer. Parameters are told apart by shape (the MLP's four all
/// differ); burn hands optimizers no parameter id.
#[derive(Clone)]
struct Watch(EmaOptim<burn::optim::Adam>);

impl burn::optim::Optimizer for Watch {
    type State<const D: usize> = <EmaOptim<burn::optim::Adam> as burn::optim::Optimizer>::State<D>;
    fn step<const D: usize>(
        &self,
        lr: burn::optim::LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (t, s) = self.0.step(lr, tensor, grad, state);
        let state_device = s
            .as_ref()
            .and_then(|s| s.shadow(0))
            .map(|x| format!("{:?}", x.device()))
            .unwrap_or_default();
        let seen = Seen {
            shape: t.shape().dims::<D>().to_vec(),
            param_device: format!("{:?}", t.device()),
            state_device,
            values: t.clone().into_data().try_to_vec::<f32>().expect("f32"),
        };
        SEEN.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
        (t, s)
    }
    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <EmaOptim<burn::optim::Adam> as burn::optim::Optimizer>::to_device(state, device)
    }
}

const SCHEDULES: fn() -> [Schedule; 2] =
    || [Schedule::tf(0.99), Schedule::power_sigma_rel(0.10).unwrap()];

fn watched() -> ModuleOptimizer {
    let [a, b] = SCHEDULES();
    Watch(
        EmaOptim::new(AdamConfig::new().build(), a)
            .unwrap()
            .extra_ema(b)
            .unwrap(),
    )
    .into()
}

/// (shape, id, values) of every float parameter.
fn by_shape<M: Module>(m: &M) -> Vec<(Vec<usize>, u64, Vec<f32>)> {
    struct V(Vec<(Vec<usize>, u64, Vec<f32>)>);
    impl ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let shape = t.shape().dims::<D>().to_vec();
            self.0.push((
                shape,
                param.id.val(),
                t.into_data().try_to_vec::<f32>().expect("f32"),
            ));
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    v.0
}

/// burn's Learner under `MultiDevice` on two devices (two logical wgpu devices on one
/// adapter), with the optimizer sharded (each parameter's step and state on device `id % 2`)
/// and on the main device: the EMA state sits where burn keeps each parameter's optimizer
/// state, both EMAs equal the f64 EMA of the values the run produced, and the sharded run's
/// record exports.
#[test]
fn the_learner_on_two_devices_keeps_the_ema_with_each_parameters_state() {
    use burn::train::{ExecutionStrategy, MultiDeviceOptim};
    let _one = lock();
    let Some(d0) = device() else { return };
    let d1 = Device::wgpu(DeviceKind::Cpu);
    let (tr, va) = (samples(1, 256), samples(2, 64));
    // The parameters as `train_with` initializes them (seeded), by shape.
    d0.seed(7);
    let init = by_shape(&Mlp::new(&d0.clone().autodiff()));
    for optim in [
        MultiDeviceOptim::OptimSharded,
        MultiDeviceOptim::OptimMainDevice,
    ] {
        SEEN.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let dir = tempfile::tempdir().unwrap();
        let strategy = ExecutionStrategy::multi(vec![d0.clone(), d1.clone()], optim);
        let result = model::train_with(
            dir.path(),
            &d0,
            2,
            None,
            tr.clone(),
            va.clone(),
            Some(strategy),
            watched(),
        );
        let seen = std::mem::take(&mut *SEEN.lock().unwrap_or_else(|e| e.into_inner()));
        let trained = by_shape(&result.model);
        let w = EmaWeights::load(dir.path().join("checkpoint/optim-2.bpk")).unwrap();
        // Where each parameter was stepped and its EMA kept.
        let mut home = Vec::new();
        for (shape, id, _) in &trained {
            let steps: Vec<&Seen> = seen.iter().filter(|s| &s.shape == shape).collect();
            assert!(!steps.is_empty(), "{optim:?}: no step of {shape:?}");
            let devices: std::collections::HashSet<&str> =
                steps.iter().map(|s| s.param_device.as_str()).collect();
            assert_eq!(
                devices.len(),
                1,
                "{optim:?}: {shape:?} stepped on {devices:?}"
            );
            for s in &steps {
                assert_eq!(
                    s.state_device, s.param_device,
                    "{optim:?}: {shape:?}'s EMA elsewhere"
                );
            }
            home.push((id % 2, steps[0].param_device.clone()));
        }
        let homes: std::collections::HashSet<&str> = home.iter().map(|(_, d)| d.as_str()).collect();
        match optim {
            MultiDeviceOptim::OptimMainDevice => assert_eq!(homes.len(), 1, "{homes:?}"),
            MultiDeviceOptim::OptimSharded => {
                // burn's rule: parameter `id` on device `id % 2`; same parity, same device.
                for (pa, da) in &home {
                    for (pb, db) in &home {
                        assert_eq!(pa == pb, da == db, "{home:?}");
                    }
                }
            }
        }
        // Both EMAs: the f64 EMA of each parameter's values, as the run produced them.
        for (k, schedule) in SCHEDULES().into_iter().enumerate() {
            for (shape, id, _) in &trained {
                let start = &init.iter().find(|(s, ..)| s == shape).unwrap().2;
                let mut r = ReferenceEma::new(schedule, Numerics::Exact, &[start]).unwrap();
                for s in seen.iter().filter(|s| &s.shape == shape) {
                    r.update(&[&s.values]).unwrap();
                }
                let (_, got) = w.shadow(*id, k).unwrap();
                assert_close(
                    &format!("{optim:?} EMA {k} {shape:?}"),
                    got,
                    &r.shadows()[0],
                    16.0 * f32::EPSILON as f64,
                );
            }
        }
        let export = dir.path().join("ema.safetensors");
        w.export_safetensors(&result.model, 0, &export).unwrap();
        assert_eq!(Checkpoint::load(&export).unwrap().names().count(), 4);
    }
}

/// A sharded two-device run checkpointed at epoch 1 resumes bit for bit as the uninterrupted
/// one; its record resumes under one device, and a one-device record under two.
#[test]
fn two_device_records_resume_exactly_and_across_device_counts() {
    use burn::train::{ExecutionStrategy, MultiDeviceOptim};
    let _one = lock();
    let Some(d0) = device() else { return };
    let d1 = Device::wgpu(DeviceKind::Cpu);
    let (tr, va) = (samples(1, 256), samples(2, 64));
    let two = || {
        Some(ExecutionStrategy::multi(
            vec![d0.clone(), d1.clone()],
            MultiDeviceOptim::OptimSharded,
        ))
    };
    let run = |dir: &std::path::Path, epochs, resume, strategy| {
        model::train_with(
            dir,
            &d0,
            epochs,
            resume,
            tr.clone(),
            va.clone(),
            strategy,
            watched(),
        )
    };
    let record = |dir: &std::path::Path, epoch: usize| {
        EmaWeights::load(dir.join(format!("checkpoint/optim-{epoch}.bpk"))).unwrap()
    };
    let whole = tempfile::tempdir().unwrap();
    let a = run(whole.path(), 2, None, two());
    let parts = tempfile::tempdir().unwrap();
    run(parts.path(), 1, None, two());
    let b = run(parts.path(), 2, Some(1), two());
    let (wa, wb) = (record(whole.path(), 2), record(parts.path(), 2));
    let per_epoch = record(parts.path(), 1).num_updates().unwrap();
    assert_eq!(wa.num_updates(), Some(2 * per_epoch));
    assert_eq!(wb.num_updates(), wa.num_updates());
    // Each run made its own model (parameter ids are random): matched by position.
    for ((shape, ia, x), (_, ib, y)) in by_shape(&a.model).iter().zip(&by_shape(&b.model)) {
        assert_eq!(bits(x), bits(y), "raw weights differ after resume");
        for k in 0..2 {
            let (sa, sb) = (wa.shadow(*ia, k).unwrap().1, wb.shadow(*ib, k).unwrap().1);
            assert_eq!(
                bits(sa),
                bits(sb),
                "EMA {k} of {shape:?} differs after resume"
            );
        }
    }
    // Two devices, then one; one, then two: the records load and the EMA goes on.
    let single = {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), 1, None, None);
        record(dir.path(), 1).num_updates().unwrap()
    };
    let moved = tempfile::tempdir().unwrap();
    run(moved.path(), 1, None, two());
    let c = run(moved.path(), 2, Some(1), None);
    let wc = record(moved.path(), 2);
    assert_eq!(wc.num_updates(), Some(per_epoch + single));
    wc.check(&c.model, 0).unwrap();
    let back = tempfile::tempdir().unwrap();
    run(back.path(), 1, None, None);
    let d = run(back.path(), 2, Some(1), two());
    let wd = record(back.path(), 2);
    assert_eq!(wd.num_updates(), Some(single + per_epoch));
    wd.check(&d.model, 0).unwrap();
    for (_, id, v) in by_shape(&d.model) {
        let (_, s) = wd.shadow(id, 0).unwrap();
        assert!(s.iter().all(|x| x.is_finite()) && s.len() == v.len());
    }
}
