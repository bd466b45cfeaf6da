//! The `burn_learner` example's model, data and training run, shared with
//! `tests/burn_learner.rs`: a small MLP regression trained with burn's `Learner`.

use std::path::Path;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{LossMetric, MetricDefinition};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, LearningResult, RegressionOutput,
    SupervisedTraining, TrainOutput, TrainStep, TrainingStrategy,
};
use wgpu_ema::burn::EmaOptim;
use wgpu_ema::Schedule;

pub const FEATURES: usize = 8;
pub const HIDDEN: usize = 32;
pub const BATCH: usize = 32;
pub const LR: f64 = 1e-2;

#[derive(Module, Debug)]
pub struct Mlp {
    pub hidden: Linear,
    pub out: Linear,
    pub act: Relu,
}

impl Mlp {
    pub fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(FEATURES, HIDDEN).init(device),
            out: LinearConfig::new(HIDDEN, 1).init(device),
            act: Relu::new(),
        }
    }

    fn forward(&self, batch: Batch) -> RegressionOutput {
        let out = self
            .out
            .forward(self.act.forward(self.hidden.forward(batch.x)));
        let loss = MseLoss::new().forward(out.clone(), batch.y.clone(), Reduction::Mean);
        RegressionOutput::new(loss, out, batch.y)
    }
}

#[derive(Clone, Debug)]
pub struct Batch {
    pub x: Tensor<2>,
    pub y: Tensor<2>,
}

/// One sample: features and target.
pub type Item = (Vec<f32>, f32);

#[derive(Clone)]
pub struct ItemBatcher;

impl Batcher<Item, Batch> for ItemBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let n = items.len();
        let x: Vec<f32> = items.iter().flat_map(|(x, _)| x.iter().copied()).collect();
        let y: Vec<f32> = items.iter().map(|(_, y)| *y).collect();
        Batch {
            x: Tensor::from_data(TensorData::new(x, [n, FEATURES]), device),
            y: Tensor::from_data(TensorData::new(y, [n, 1]), device),
        }
    }
}

impl TrainStep for Mlp {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let out = self.forward(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for Mlp {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.forward(batch)
    }
}

/// Seeded samples of `y = sin(x . a) + 0.5 (x . b)^2 / 8 + noise`.
pub fn samples(seed: u64, n: usize) -> Vec<Item> {
    let mut dirs = fastrand::Rng::with_seed(99);
    let a: Vec<f32> = (0..FEATURES).map(|_| dirs.f32() - 0.5).collect();
    let b: Vec<f32> = (0..FEATURES).map(|_| dirs.f32() - 0.5).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| {
            let x: Vec<f32> = (0..FEATURES).map(|_| rng.f32() * 4.0 - 2.0).collect();
            let da: f32 = x.iter().zip(&a).map(|(p, q)| p * q).sum();
            let db: f32 = x.iter().zip(&b).map(|(p, q)| p * q).sum();
            let y = da.sin() + db * db / 16.0 + 0.3 * (rng.f32() - 0.5);
            (x, y)
        })
        .collect()
}

pub fn loader(items: Vec<Item>) -> Arc<dyn DataLoader<Batch>> {
    // No shuffling: an epoch resumed from a checkpoint sees the batches of an uninterrupted run.
    DataLoaderBuilder::new(ItemBatcher)
        .batch_size(BATCH)
        .build(InMemDataset::new(items))
}

/// Adam with two EMAs: TensorFlow's schedule (decay 0.99) and EDM2's sigma_rel 0.10.
pub fn optimizer() -> wgpu_ema::Result<ModuleOptimizer> {
    Ok(
        EmaOptim::new(AdamConfig::new().build(), Schedule::tf(0.99))?
            .extra_ema(Schedule::power_sigma_rel(0.10)?)?
            .into(),
    )
}

/// Trains up to epoch `epochs` with the Learner, checkpointing every epoch into `dir`,
/// resuming from epoch `resume` when given.
pub fn train(
    dir: &Path,
    device: &Device,
    epochs: usize,
    resume: Option<usize>,
    train: Vec<Item>,
    valid: Vec<Item>,
) -> wgpu_ema::Result<LearningResult<Mlp>> {
    Ok(train_with(
        dir,
        device,
        epochs,
        resume,
        train,
        valid,
        None,
        optimizer()?,
    ))
}

/// [`train`] with an execution strategy (burn's default, one device, for `None`) and an
/// optimizer of the caller's; the model starts on `device` (the strategy's main device).
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    dir: &Path,
    device: &Device,
    epochs: usize,
    resume: Option<usize>,
    train: Vec<Item>,
    valid: Vec<Item>,
    strategy: Option<ExecutionStrategy>,
    optimizer: ModuleOptimizer,
) -> LearningResult<Mlp> {
    device.seed(7);
    // The parameters must be tracked by autodiff for the Learner's backward pass.
    let model = Mlp::new(&device.clone().autodiff());
    let mut training = SupervisedTraining::new(dir, loader(train), loader(valid))
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_default_checkpointers()
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(2))
        .with_application_logger(None)
        .renderer(Box::new(EpochLines::default()))
        .num_epochs(epochs);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    if let Some(strategy) = strategy {
        training = training.with_training_strategy(TrainingStrategy::Default(strategy));
    }
    training.launch(Learner::new(model, optimizer, LR))
}

/// Mean squared error of `model` on `items`.
pub fn mse(model: &Mlp, items: &[Item], device: &Device) -> f32 {
    let batch = ItemBatcher.batch(items.to_vec(), device);
    let out = model.forward(batch);
    out.loss
        .into_data()
        .try_to_vec::<f32>()
        .map_or(f32::NAN, |v| v[0])
}

/// Progress as one line per epoch, and nothing for evaluations: burn's default renderer off a
/// terminal prints a Debug dump of its progress for every batch, which buries the example's
/// output in a log.
#[derive(Default)]
pub struct EpochLines {
    epochs: usize,
}

impl MetricsRendererTraining for EpochLines {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
}

impl TrainingProgressLogger for EpochLines {
    fn start(
        &mut self,
        total: usize,
        _starting: usize,
        _items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.epochs = total;
    }
    // burn numbers epochs from 1.
    fn update_epoch(&mut self, epoch: usize) {
        println!("epoch {epoch}/{} trained", self.epochs);
    }
    fn start_split(&mut self, _split: &str, _items: usize) {}
    fn update_split(&mut self, _items: usize) {}
    fn end_split(&mut self) {}
    fn end(&mut self) {}
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for EpochLines {
    fn start_global_progress(&mut self, _tests: usize) {}
    fn start_test(&mut self, _name: &str, _items: usize) {}
    fn update_test_progress(&mut self, _items: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRendererEvaluation for EpochLines {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl MetricsRenderer for EpochLines {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}
