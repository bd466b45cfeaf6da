//! The linear model of the TensorFlow EMA article, shared by `train_linear` and the web demo:
//! `y = x . w + b` with w of shape [2, 1] and a scalar b, seeded synthetic data, and momentum
//! SGD's constants (the WGSL step is `examples/train_linear.wgsl`).

use wgpu_ema::TensorSpec;

/// TensorFlow's article decay (`num_updates` caps it early on).
pub const DECAY: f64 = 0.9999;
/// Momentum SGD: learning rate, momentum and minibatch size.
pub const LR: f32 = 0.05;
pub const MOMENTUM: f32 = 0.9;
pub const BATCH: usize = 8;
/// Training and held-out samples.
pub const N_TRAIN: usize = 1024;
pub const N_EVAL: usize = 256;
/// The true model and the noise on its targets (held-out MSE cannot go below NOISE^2).
pub const TRUE_W: [f32; 2] = [2.0, -3.4];
pub const TRUE_B: f32 = 4.2;
pub const NOISE: f32 = 0.5;

/// The parameters, with TensorFlow's names.
pub fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("weight", [2, 1]),
        TensorSpec::new("bias", []),
    ]
}

/// The optimizer's slots, saved beside the parameters.
pub fn momentum_specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("weight/Momentum", [2, 1]),
        TensorSpec::new("bias/Momentum", []),
    ]
}

/// Train samples then eval samples, each (x0, x1, y), seeded.
pub fn dataset() -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(2017);
    let mut gauss = || {
        let (u, v) = (rng.f32().max(1e-7), rng.f32());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    };
    let mut out = Vec::with_capacity(3 * (N_TRAIN + N_EVAL));
    for _ in 0..N_TRAIN + N_EVAL {
        let x0 = gauss();
        let x1 = gauss();
        let y = TRUE_W[0] * x0 + TRUE_W[1] * x1 + TRUE_B + NOISE * gauss();
        out.extend([x0, x1, y]);
    }
    out
}

/// Mean squared error on the held-out samples.
pub fn eval_loss(data: &[f32], w: &[f32], b: f32) -> f32 {
    let eval = &data[3 * N_TRAIN..];
    let sum: f32 = eval
        .chunks_exact(3)
        .map(|s| {
            let e = w[0] * s[0] + w[1] * s[1] + b - s[2];
            e * e
        })
        .sum();
    sum / N_EVAL as f32
}

/// The WGSL training step, and the values of its override constants.
pub const WGSL: &str = include_str!("../train_linear.wgsl");

/// `LR`, `MOMENTUM`, `BATCH`, `N_TRAIN`, `N_EVAL` for the pipeline.
pub fn constants() -> [(&'static str, f64); 5] {
    [
        ("LR", LR as f64),
        ("MOMENTUM", MOMENTUM as f64),
        ("BATCH", BATCH as f64),
        ("N_TRAIN", N_TRAIN as f64),
        ("N_EVAL", N_EVAL as f64),
    ]
}
