//! burn's `Learner` with EMA in one line: Adam wrapped in `EmaOptim`, trained epoch by epoch
//! (each epoch resumed from the Learner's own checkpoint), validated with the raw and the EMA
//! weights, and the EMA exported for burn-store.
//!
//! ```text
//! cargo run --release --features burn-learner --example burn_learner [-- --epochs 8 --out target/burn-learner]
//! cargo run --release --features burn-learner --example burn_learner -- --bench
//! ```

mod model;

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor};
use burn::train::metric::LossMetric;
use burn::train::EvaluatorBuilder;
use model::{loader, mse, samples, train, Mlp};
use wgpu_ema::burn::{EmaOptim, EmaWeights};
use wgpu_ema::Schedule;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let device = Device::default();
    if args.iter().any(|a| a == "--bench") {
        return bench(&device);
    }
    let epochs: usize = opt("--epochs").map_or(Ok(8), |v| v.parse())?;
    let dir = PathBuf::from(opt("--out").unwrap_or_else(|| "target/burn-learner".into()));
    let _ = std::fs::remove_dir_all(&dir);
    let (train_items, valid_items) = (samples(1, 1024), samples(2, 256));

    let mut rows = Vec::new();
    let mut last = None;
    for epoch in 1..=epochs {
        // One Learner run per epoch, each resumed from the previous epoch's checkpoint: the
        // EMA comes back from the optimizer record with the rest of the state.
        let result = train(
            &dir,
            &device,
            epoch,
            (epoch > 1).then(|| epoch - 1),
            train_items.clone(),
            valid_items.clone(),
        )?;
        let model = result.model;
        let record = dir.join("checkpoint").join(format!("optim-{epoch}.bpk"));
        let weights = EmaWeights::load(&record)?;
        let ema = weights.ema_module(model.clone(), 0)?;
        let ema_power = weights.ema_module(model.clone(), 1)?;
        // The EMA's validation loss in burn's own metrics output.
        EvaluatorBuilder::new(dir.join("eval"))
            .metrics((LossMetric::new(),))
            .renderer(Box::new(model::EpochLines::default()))
            .build(ema.clone())
            .eval(
                format!("EMA weights, epoch {epoch}"),
                loader(valid_items.clone()),
            );
        rows.push((
            epoch,
            weights.num_updates().unwrap_or(0),
            mse(&model, &valid_items, &device),
            mse(&ema, &valid_items, &device),
            mse(&ema_power, &valid_items, &device),
        ));
        last = Some((model, weights));
    }
    println!(
        "\nvalidation MSE per epoch (Adam lr {}, batch {}, 32 steps per epoch):",
        model::LR,
        model::BATCH
    );
    println!("epoch  steps  raw weights  EMA tf(0.99)  EMA sigma_rel 0.10");
    for (e, n, raw, ema, p) in &rows {
        println!("{e:>5} {n:>6} {raw:>12.5} {ema:>13.5} {p:>19.5}");
    }
    let (model, weights) = last.ok_or("no epochs")?;
    // Export for burn-store, and load it into a fresh model.
    let export = dir.join("ema.safetensors");
    weights.export_safetensors(&model, 0, &export)?;
    let mut fresh = Mlp::new(&device);
    let applied = fresh.load_from(&mut SafetensorsStore::from_file(&export))?;
    let ema = weights.ema_module(model, 0)?;
    let (loaded, ema_mse) = (
        mse(&fresh, &valid_items, &device),
        mse(&ema, &valid_items, &device),
    );
    println!(
        "exported the EMA to {} ({} tensors applied by burn-store); validation MSE of the loaded model {loaded:.5} (EMA {ema_mse:.5})",
        export.display(),
        applied.applied.len(),
    );
    // What this example shows, checked (CI runs it): the EMA ends better than the raw weights,
    // and burn-store loads exactly the EMA that was exported.
    let &(_, _, raw, ema_last, power_last) = rows.last().ok_or("no epochs")?;
    if !(ema_last.is_finite() && power_last.is_finite() && ema_last < raw) {
        return Err(format!("the EMA ({ema_last}) does not beat the raw weights ({raw})").into());
    }
    if applied.applied.len() != 4 || (loaded - ema_mse).abs() > 1e-6 * ema_mse.abs().max(1e-12) {
        return Err(format!(
            "burn-store applied {} tensors; the loaded model's MSE {loaded} is not the EMA's {ema_mse}",
            applied.applied.len()
        )
        .into());
    }
    Ok(())
}

/// A stack of square linear layers: the per-step optimizer cost on more parameters.
#[derive(Module, Debug)]
struct Wide {
    layers: Vec<Linear>,
}

/// Milliseconds per optimizer step (median of 5 runs of 20 steps), with fixed gradients.
fn time_steps<M: Module + Clone>(
    device: &Device,
    model: M,
    grads_of: impl Fn(&M) -> GradientsParams,
    mut optim: ModuleOptimizer,
) -> f64 {
    let mut m = model;
    let sync = |m: &M| {
        // Reading one parameter back waits for all the queued work.
        let mut v = FirstParam(None);
        m.visit(&mut v);
        if let Some(t) = v.0 {
            let _ = t.into_data();
        }
    };
    for _ in 0..3 {
        let g = grads_of(&m);
        m = optim.step(1e-3, m, g);
    }
    sync(&m);
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..20 {
            let g = grads_of(&m);
            m = optim.step(1e-3, m, g);
        }
        sync(&m);
        times.push(start.elapsed().as_secs_f64() * 1e3 / 20.0);
    }
    let _ = device;
    times.sort_by(f64::total_cmp);
    times[2]
}

struct FirstParam(Option<Tensor<1>>);
impl burn::module::ModuleVisitor for FirstParam {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if self.0.is_none() {
            self.0 = Some(param.val().flatten(0, D - 1));
        }
    }
}

fn bench(device: &Device) -> Result<(), Error> {
    let device = device.clone().autodiff();
    let mlp = Mlp::new(&device);
    let batch = model::ItemBatcher;
    let items = samples(1, 32);
    let mlp_grads = |m: &Mlp| {
        use burn::data::dataloader::batcher::Batcher;
        use burn::train::TrainStep;
        let out = TrainStep::step(m, batch.batch(items.clone(), &device));
        out.grads
    };
    let wide = Wide {
        layers: (0..8)
            .map(|_| LinearConfig::new(1024, 1024).init(&device))
            .collect(),
    };
    let x = Tensor::<2>::ones([16, 1024], &device);
    let wide_grads = |m: &Wide| {
        let mut h = x.clone();
        for l in &m.layers {
            h = l.forward(h);
        }
        GradientsParams::from_grads(h.mean().backward(), m)
    };
    let plain = || -> ModuleOptimizer { AdamConfig::new().build().into() };
    let ema = || -> Result<ModuleOptimizer, Error> {
        Ok(EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.999))?.into())
    };
    let ema2 = || -> Result<ModuleOptimizer, Error> {
        Ok(
            EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.999))?
                .extra_ema(Schedule::power_sigma_rel(0.1)?)?
                .into(),
        )
    };
    println!("per step, forward + backward + optimizer step (ms, median of 5 x 20 steps):");
    println!("model                        Adam    Adam+EMA  Adam+2 EMAs");
    let rows: [(&str, f64, f64, f64); 2] = [
        (
            "MLP 8-32-1 (4 tensors)",
            time_steps(&device, mlp.clone(), mlp_grads, plain()),
            time_steps(&device, mlp.clone(), mlp_grads, ema()?),
            time_steps(&device, mlp, mlp_grads, ema2()?),
        ),
        (
            "8 x Linear 1024 (16 tensors, 8.4M)",
            time_steps(&device, wide.clone(), wide_grads, plain()),
            time_steps(&device, wide.clone(), wide_grads, ema()?),
            time_steps(&device, wide, wide_grads, ema2()?),
        ),
    ];
    for (name, a, b, c) in rows {
        println!("{name:<35} {a:>7.3} {b:>9.3} {c:>11.3}");
    }
    Ok(())
}
