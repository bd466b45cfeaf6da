// train_linear: one step of momentum SGD on y = x . w + b, on a minibatch, in one invocation
// (the model has three numbers). Before the step it logs the mean squared error on the
// held-out set with the raw weights and with the EMA weights (the shadows, bound read-only).

override LR: f32 = 0.05;
override MOMENTUM: f32 = 0.9;
override BATCH: u32 = 8u;
override N_TRAIN: u32 = 1024u;
override N_EVAL: u32 = 256u;

struct Log {
    // Steps done in this run, and the global step the run started from.
    step: u32,
    first_global: u32,
    pad0: u32,
    pad1: u32,
    // Per step: raw loss, EMA loss.
    values: array<f32>,
}

// Train samples then eval samples, each (x0, x1, y).
@group(0) @binding(0) var<storage, read> data: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> weight_momentum: array<f32>;
@group(0) @binding(4) var<storage, read_write> bias_momentum: array<f32>;
@group(0) @binding(5) var<storage, read> ema_weight: array<f32>;
@group(0) @binding(6) var<storage, read> ema_bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> log: Log;

fn eval_loss(w0: f32, w1: f32, b: f32) -> f32 {
    var sum = 0.0;
    for (var i = 0u; i < N_EVAL; i++) {
        let k = 3u * (N_TRAIN + i);
        let e = w0 * data[k] + w1 * data[k + 1u] + b - data[k + 2u];
        sum += e * e;
    }
    return sum / f32(N_EVAL);
}

@compute @workgroup_size(1)
fn train_step() {
    let s = log.step;
    let global = log.first_global + s;
    log.values[2u * s] = eval_loss(weight[0], weight[1], bias[0]);
    log.values[2u * s + 1u] = eval_loss(ema_weight[0], ema_weight[1], ema_bias[0]);

    let start = (global % (N_TRAIN / BATCH)) * BATCH;
    var g0 = 0.0;
    var g1 = 0.0;
    var gb = 0.0;
    for (var i = 0u; i < BATCH; i++) {
        let k = 3u * (start + i);
        let e = weight[0] * data[k] + weight[1] * data[k + 1u] + bias[0] - data[k + 2u];
        g0 += 2.0 * e * data[k];
        g1 += 2.0 * e * data[k + 1u];
        gb += 2.0 * e;
    }
    let inv = 1.0 / f32(BATCH);
    weight_momentum[0] = MOMENTUM * weight_momentum[0] + g0 * inv;
    weight_momentum[1] = MOMENTUM * weight_momentum[1] + g1 * inv;
    bias_momentum[0] = MOMENTUM * bias_momentum[0] + gb * inv;
    weight[0] -= LR * weight_momentum[0];
    weight[1] -= LR * weight_momentum[1];
    bias[0] -= LR * bias_momentum[0];
    log.step = s + 1u;
}
