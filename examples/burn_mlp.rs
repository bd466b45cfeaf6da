//! EMA of a burn model's weights on burn's own wgpu device.
//!
//! `cargo run --release --features burn --example burn_mlp`
//!
//! A small MLP (8 -> 32 -> 32 -> 1) trained with burn's Adam on seeded synthetic data (no
//! downloads) on burn's wgpu backend (Mesa's lavapipe when there is no GPU), with our EMA
//! recorded after every optimizer step, in place in burn's parameter buffers. It prints the
//! evaluation loss of the raw and the EMA weights, exports the EMA weights, and times our
//! per-step pass against the EMA a burn user writes with burn's own tensor ops.
use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use wgpu_ema::burn::BurnEma;
use wgpu_ema::{checkpoint, Schedule};

const FEATURES: usize = 8;
const N_TRAIN: usize = 2048;
const N_EVAL: usize = 512;
const BATCH: usize = 64;
const STEPS: usize = 300;

#[path = "../benches/shared/models.rs"]
#[allow(dead_code)]
mod models;

/// A module with ResNet-50's 161 parameter tensors (flattened): the EMA's cost on a real
/// model's list, without training one.
#[derive(Module, Debug)]
struct Shapes {
    params: Vec<Param<Tensor<1>>>,
}

#[derive(Module, Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        let dims = [FEATURES, 32, 32, 1];
        Self {
            layers: dims
                .windows(2)
                .map(|d| LinearConfig::new(d[0], d[1]).init(device))
                .collect(),
        }
    }
    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

/// Seeded data: y = sin(x . w) + 0.1 x0^2 + noise.
fn dataset(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let w: Vec<f32> = (0..FEATURES)
        .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4)
        .collect();
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let row: Vec<f32> = (0..FEATURES).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let dot: f32 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
        y.push(dot.sin() + 0.1 * row[0] * row[0] + 0.2 * (rng.f32() - 0.5));
        x.extend(row);
    }
    (x, y)
}

fn mse(model: &Mlp, x: &Tensor<2>, y: &Tensor<2>) -> f32 {
    let d = model.forward(x.clone()) - y.clone();
    d.clone().mul(d).mean().into_scalar::<f32>()
}

/// What a burn user writes without wgpu-ema: per parameter, `ema * decay + param * (1 - decay)`
/// with burn's tensor ops.
struct TensorOpEma<'a> {
    params: &'a [Tensor<1>],
    at: usize,
    decay: f32,
}

impl ModuleMapper for TensorOpEma<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let p = self.params[self.at].clone();
        self.at += 1;
        let d = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema.mul_scalar(d) + p.reshape(shape).mul_scalar(1.0 - d)
        })
    }
}

struct Flatten(Vec<Tensor<1>>);
impl burn::module::ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // burn's device, and the wgpu device and queue under it (lavapipe when there is no GPU).
    let (device, setup) = Device::wgpu_options().init_with_setup()?;
    println!(
        "burn on wgpu: {} ({:?})",
        setup.adapter.get_info().name,
        setup.backend
    );
    let plain = device.clone();
    let device = device.autodiff();
    device.seed(2017); // burn's parameter initialisation, seeded

    let (xt, yt) = dataset(N_TRAIN, 1);
    let (xe, ye) = dataset(N_EVAL, 2);
    let x_train = Tensor::<2>::from_data(TensorData::new(xt, [N_TRAIN, FEATURES]), &device);
    let y_train = Tensor::<2>::from_data(TensorData::new(yt, [N_TRAIN, 1]), &device);
    let x_eval = Tensor::<2>::from_data(TensorData::new(xe, [N_EVAL, FEATURES]), &device);
    let y_eval = Tensor::<2>::from_data(TensorData::new(ye, [N_EVAL, 1]), &device);

    let mut model = Mlp::new(&device);
    let mut optim = AdamConfig::new().init();
    let mut ema = BurnEma::new(&model, &setup.device, &setup.queue, Schedule::tf(0.98))?;
    println!(
        "tracking {} parameters: {:?}",
        ema.specs().len(),
        ema.specs()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
    );

    let t0 = Instant::now();
    for step in 0..STEPS {
        let b = (step * BATCH) % N_TRAIN;
        let x = x_train.clone().slice([b..b + BATCH, 0..FEATURES]);
        let y = y_train.clone().slice([b..b + BATCH, 0..1]);
        let pred = model.forward(x);
        let d = pred - y;
        let loss = d.clone().mul(d).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
        ema.update(&model)?; // our pass, on burn's device and queue
        if (step + 1) % 100 == 0 {
            println!(
                "step {:>4}: train loss {:.5}",
                step + 1,
                loss.into_scalar::<f32>()
            );
        }
    }
    println!(
        "trained {STEPS} steps with Adam in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let ema_model = ema.ema_module(model.clone())?;
    let (raw, ema_loss) = (
        mse(&model, &x_eval, &y_eval),
        mse(&ema_model, &x_eval, &y_eval),
    );
    println!("evaluation loss (MSE on {N_EVAL} held-out samples):");
    println!("  raw weights: {raw:.6}");
    println!("  EMA weights: {ema_loss:.6}");
    // Checked (CI runs this): after 300 steps the EMA tracks the trained model; it need not
    // beat it in so short a run, but it must be finite and in its neighbourhood.
    if !(raw.is_finite() && ema_loss.is_finite() && ema_loss < 2.0 * raw) {
        return Err(format!("EMA loss {ema_loss} against raw {raw}").into());
    }

    let out = std::path::Path::new("target/burn-ema"); // names and shapes as burn-store saves them
    std::fs::create_dir_all(out)?;
    let path = out.join("mlp-ema.safetensors");
    checkpoint::export_ema(&path, &ema.snapshot()?)?;
    let exported = checkpoint::Checkpoint::load(&path)?;
    if exported.names().count() != ema.specs().len() {
        return Err(format!(
            "{} holds {} tensors",
            path.display(),
            exported.names().count()
        )
        .into());
    }
    println!("EMA weights exported to {}", path.display());

    // Per-step cost: our pass against the EMA written with burn's tensor ops, on this MLP and
    // on a module with ResNet-50's 161 parameter shapes.
    let (ours, theirs) = per_step(&mut ema, &model.clone().valid(), &setup.device, 50)?;
    println!(
        "per-step EMA cost ({} tensors): wgpu-ema pass {:.3} ms, burn tensor ops {:.3} ms",
        ema.specs().len(),
        ours * 1e3,
        theirs * 1e3
    );
    let big = Shapes {
        params: models::resnet50()
            .iter()
            .map(|s| {
                let n = s.numel() as usize;
                Param::from_tensor(Tensor::<1>::random([n], Distribution::Default, &plain))
            })
            .collect(),
    };
    let mut big_ema = BurnEma::new(&big, &setup.device, &setup.queue, Schedule::tf(0.98))?;
    let (ours, theirs) = per_step(&mut big_ema, &big, &setup.device, 20)?;
    println!(
        "per-step EMA cost (ResNet-50's {} tensors, {} dispatch(es)): wgpu-ema pass {:.3} ms, burn tensor ops {:.3} ms",
        big_ema.specs().len(),
        big_ema.ema().dispatches_per_step(),
        ours * 1e3,
        theirs * 1e3
    );
    Ok(())
}

/// Reads one value of the module's first parameter: waits for the work that produced it.
struct Sync(Option<f32>);
impl burn::module::ModuleVisitor for Sync {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.0.is_none() {
            self.0 = Some(param.val().sum().into_scalar::<f32>());
        }
    }
}

/// Seconds per step, waiting for the device at the end of `reps` steps: our pass
/// (`BurnEma::update`), then burn's tensor ops (a `ModuleMapper`).
fn per_step<M: Module>(
    ema: &mut BurnEma,
    module: &M,
    device: &wgpu_ema::wgpu::Device,
    reps: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    ema.update(module)?;
    device.poll(wgpu_ema::wgpu::PollType::wait_indefinitely())?;
    let t = Instant::now();
    for _ in 0..reps {
        ema.update(module)?;
    }
    device.poll(wgpu_ema::wgpu::PollType::wait_indefinitely())?;
    let ours = t.elapsed().as_secs_f64() / reps as f64;
    let mut flat = Flatten(Vec::new());
    module.visit(&mut flat);
    let mut shadow = module.clone();
    let t = Instant::now();
    for _ in 0..reps {
        shadow = shadow.map(&mut TensorOpEma {
            params: &flat.0,
            at: 0,
            decay: 0.99,
        });
    }
    shadow.visit(&mut Sync(None));
    let theirs = t.elapsed().as_secs_f64() / reps as f64;
    Ok((ours, theirs))
}
