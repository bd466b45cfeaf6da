//! The burn integration (feature `burn`): shadows of a burn MLP trained with Adam on burn's
//! own wgpu device, against the f64 reference fed the parameter values read back from burn.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use common::assert_close;
use wgpu_ema::burn::BurnEma;
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{Error, Numerics, Schedule};

#[derive(Module, Debug)]
struct Net {
    hidden: Linear,
    out: Linear,
}

/// Every float parameter's values, in visiting order, read back from burn.
struct Values(Vec<Vec<f32>>);
impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(
            param
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32 parameter"),
        );
    }
}

fn values<M: Module>(m: &M) -> Vec<Vec<f32>> {
    let mut v = Values(Vec::new());
    m.visit(&mut v);
    v.0
}

/// burn's wgpu device and its setup, made once per process (burn's runtime registers once),
/// and a lock the tests hold while they use it (one at a time on one device).
fn burn_device() -> Option<(
    Device,
    burn::tensor::wgpu::WgpuSetup,
    std::sync::MutexGuard<'static, ()>,
)> {
    static SETUP: std::sync::OnceLock<Option<(Device, burn::tensor::wgpu::WgpuSetup)>> =
        std::sync::OnceLock::new();
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let setup = SETUP.get_or_init(|| match Device::wgpu_options().init_with_setup() {
        Ok(x) => Some(x),
        Err(e) => {
            if std::env::var("WGPU_EMA_REQUIRE_ADAPTER").as_deref() == Ok("1") {
                panic!("WGPU_EMA_REQUIRE_ADAPTER=1 but burn found no wgpu adapter ({e}): install mesa-vulkan-drivers and libvulkan1");
            }
            eprintln!("SKIPPED: no wgpu adapter for burn ({e})");
            None
        }
    });
    setup.clone().map(|(d, s)| (d, s, one))
}

#[test]
fn shadows_of_a_burn_mlp_match_the_reference() {
    let Some((device, setup, _one)) = burn_device() else {
        return;
    };
    let device = device.autodiff();
    device.seed(7);
    let mut net = Net {
        hidden: LinearConfig::new(5, 7).init(&device),
        out: LinearConfig::new(7, 3).init(&device),
    };
    let schedule = Schedule::tf(0.9);
    let mut ema = BurnEma::new(&net, &setup.device, &setup.queue, schedule).unwrap();
    // The same EMA with its shadows in host memory, through a ring of two 32-byte slots (the
    // model's 66 parameters in 9 chunks), settled after each update so that every chunk is
    // sampled at every step.
    let mut off = BurnEma::offloaded(
        &net,
        &setup.device,
        &setup.queue,
        schedule,
        &wgpu_ema::select::Selection::new(),
        wgpu_ema::Offload::new(64).slots(2),
    )
    .unwrap();
    assert_eq!(off.ema().stats().chunks, 9);
    let names: Vec<&str> = ema.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    );
    assert_eq!(ema.specs()[0].shape, [5, 7]);

    let start = values(&net);
    let slices: Vec<&[f32]> = start.iter().map(|v| v.as_slice()).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &slices).unwrap();
    let shadows = ema.read_shadows().unwrap();
    assert_eq!(
        shadows.try_get("out.weight").unwrap(),
        start[2].as_slice(),
        "shadows start at the params"
    );

    let mut optim = AdamConfig::new().init();
    let mut rng = fastrand::Rng::with_seed(4);
    for _ in 0..6 {
        let x: Vec<f32> = (0..16 * 5).map(|_| rng.f32() - 0.5).collect();
        let y: Vec<f32> = (0..16 * 3).map(|_| rng.f32() - 0.5).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [16, 5]), &device);
        let y = Tensor::<2>::from_data(TensorData::new(y, [16, 3]), &device);
        let d = net
            .out
            .forward(burn::tensor::activation::relu(net.hidden.forward(x)))
            - y;
        let grads = GradientsParams::from_grads(d.clone().mul(d).mean().backward(), &net);
        net = optim.step(0.05, net, grads);
        ema.update(&net).unwrap();
        off.update(&net).unwrap();
        off.ema_mut().settle().unwrap();
        let now = values(&net);
        let slices: Vec<&[f32]> = now.iter().map(|v| v.as_slice()).collect();
        reference.update(&slices).unwrap();
    }
    assert_eq!(ema.ema().num_updates(), 6);
    let shadows = ema.read_shadows().unwrap();
    let offloaded = off.read_shadows(&net).unwrap();
    for (i, spec) in ema.specs().iter().enumerate() {
        for (what, got) in [("on-GPU", &shadows), ("offloaded", &offloaded)] {
            assert_close(
                &format!("{what} {}", spec.name),
                got.try_get(&spec.name).unwrap(),
                &reference.shadows()[i],
                24.0 * f32::EPSILON as f64,
            );
        }
    }
    let off_net = off.ema_module(net.clone()).unwrap();
    assert_eq!(
        values(&off_net)[3].as_slice(),
        offloaded.try_get("out.bias").unwrap()
    );

    // The EMA copy of the module holds the shadows.
    let ema_net = ema.ema_module(net.clone()).unwrap();
    let v = values(&ema_net);
    assert_eq!(v[0], shadows.try_get("hidden.weight").unwrap());

    // A module of another shape is refused, naming the parameter.
    let other = Net {
        hidden: LinearConfig::new(5, 8).init(&device),
        out: LinearConfig::new(8, 3).init(&device),
    };
    let e = ema.update(&other).unwrap_err();
    assert!(
        matches!(e, Error::Burn { ref name, .. } if name == "hidden.weight"),
        "{e}"
    );
}

/// A selection over module paths: `out.bias` copied (as running statistics would be),
/// `hidden.bias` left out (not tracked; the EMA module keeps its trained value), the rest
/// averaged.
#[test]
fn a_selection_over_module_paths() {
    let Some((device, setup, _one)) = burn_device() else {
        return;
    };
    let device = device.autodiff();
    device.seed(11);
    let mut net = Net {
        hidden: LinearConfig::new(5, 7).init(&device),
        out: LinearConfig::new(7, 3).init(&device),
    };
    let sel = wgpu_ema::select::Selection::new()
        .copy("out.bias")
        .exclude("hidden.bias");
    let mut ema = BurnEma::with_selection(
        &net,
        &setup.device,
        &setup.queue,
        Schedule::constant(0.5),
        &sel,
    )
    .unwrap();
    let names: Vec<&str> = ema.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["hidden.weight", "out.weight", "out.bias"]);
    let mut optim = AdamConfig::new().init();
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..3 {
        let x: Vec<f32> = (0..8 * 5).map(|_| rng.f32() - 0.5).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [8, 5]), &device);
        let d = net.out.forward(net.hidden.forward(x));
        let grads = GradientsParams::from_grads(d.clone().mul(d).mean().backward(), &net);
        net = optim.step(0.05, net, grads);
        ema.update(&net).unwrap();
        let now = values(&net);
        let shadows = ema.read_shadows().unwrap();
        assert_eq!(
            shadows.try_get("out.bias").unwrap(),
            now[3].as_slice(),
            "copied"
        );
        assert_ne!(
            shadows.try_get("out.weight").unwrap(),
            now[2].as_slice(),
            "averaged"
        );
    }
    let now = values(&net);
    let ema_net = ema.ema_module(net.clone()).unwrap();
    assert_eq!(
        values(&ema_net)[1],
        now[1],
        "an excluded parameter keeps its value"
    );
}

/// A module's EMA kept by two ranks, each its even part of every parameter (element ranges
/// of burn's buffers, followed as burn moves them): the committed ranked save is, bit for bit,
/// the EMA one BurnEma keeps of the whole module.
#[test]
fn ranked_burn_emas_save_the_whole_modules_ema() {
    use wgpu_ema::checkpoint::ranks::{commit_ranks, save_rank, RankPlan, RankedCheckpoint};
    let Some((device, setup, _one)) = burn_device() else {
        return;
    };
    let device = device.autodiff();
    device.seed(13);
    let mut net = Net {
        hidden: LinearConfig::new(5, 7).init(&device),
        out: LinearConfig::new(7, 3).init(&device),
    };
    let schedule = Schedule::tf(0.9);
    let mut whole = BurnEma::new(&net, &setup.device, &setup.queue, schedule).unwrap();
    let plans: Vec<RankPlan> = (0..2)
        .map(|r| RankPlan::even(whole.specs(), r, 2).unwrap())
        .collect();
    let mut ranks: Vec<BurnEma> = plans
        .iter()
        .map(|p| BurnEma::ranked(&net, &setup.device, &setup.queue, schedule, p).unwrap())
        .collect();
    assert_eq!(
        ranks[1].specs()[0],
        wgpu_ema::TensorSpec::new("hidden.weight", [17])
    );
    let mut optim = AdamConfig::new().init();
    let mut rng = fastrand::Rng::with_seed(6);
    for _ in 0..4 {
        let x: Vec<f32> = (0..8 * 5).map(|_| rng.f32() - 0.5).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [8, 5]), &device);
        let d = net.out.forward(net.hidden.forward(x));
        let grads = GradientsParams::from_grads(d.clone().mul(d).mean().backward(), &net);
        net = optim.step(0.05, net, grads);
        whole.update(&net).unwrap();
        for r in &mut ranks {
            r.update(&net).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for (r, plan) in ranks.iter().zip(&plans) {
        // With the parameters: burn's buffers can be copied out.
        let snapshot = r.ema().snapshot(true).unwrap();
        save_rank(
            dir.path(),
            &snapshot,
            None,
            &wgpu_ema::HostTensors::new(),
            plan,
            4,
        )
        .unwrap();
    }
    commit_ranks(dir.path(), 4, 2, std::time::Duration::ZERO).unwrap();
    let ck = RankedCheckpoint::open(dir.path()).unwrap();
    let want = whole.read_shadows().unwrap();
    for s in whole.specs() {
        let got = ck
            .read(&format!("{}/ExponentialMovingAverage", s.name))
            .unwrap();
        let want = want.try_get(&s.name).unwrap();
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
                && got.len() == want.len(),
            "{}",
            s.name
        );
        // The parameters the ranks saved are burn's, whole again.
        let v = values(&net);
        let i = whole.specs().iter().position(|x| x.name == s.name).unwrap();
        assert_eq!(ck.read(&s.name).unwrap(), v[i]);
    }
    assert!(ranks[0].ema_module(net.clone()).is_err());
}
