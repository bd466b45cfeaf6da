// pipeline: the user's own shaders. A minibatch SGD step for y = x . w + b with 64 features,
// and an evaluation pass writing the mean squared error of the parameters it is given.

const F: u32 = 64u;
override BATCH: u32 = 16u;
override N_TRAIN: u32 = 4096u;
override N_EVAL: u32 = 1024u;
override LR: f32 = 0.05;

struct Counter {
    step: u32,
}

// Samples: F features then the target, train samples first.
@group(0) @binding(0) var<storage, read> data: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> counter: Counter;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;

var<workgroup> residual: array<f32, 64>;

fn predict(k: u32) -> f32 {
    var y = bias[0];
    for (var f = 0u; f < F; f++) {
        y += weight[f] * data[k * (F + 1u) + f];
    }
    return y;
}

// One workgroup of 64: thread f owns weight f; residuals of the batch are shared.
@compute @workgroup_size(64)
fn sgd_step(@builtin(local_invocation_index) f: u32) {
    let start = (counter.step % (N_TRAIN / BATCH)) * BATCH;
    var g = 0.0;
    var gb = 0.0;
    for (var b = 0u; b < BATCH; b += 64u) {
        let k = start + b + f;
        if b + f < BATCH {
            residual[f] = predict(k) - data[k * (F + 1u) + F];
        }
        workgroupBarrier();
        for (var j = 0u; j < min(64u, BATCH - b); j++) {
            let kj = start + b + j;
            g += residual[j] * data[kj * (F + 1u) + f];
            gb += residual[j];
        }
        workgroupBarrier();
    }
    storageBarrier();
    let scale = 2.0 / f32(BATCH);
    weight[f] -= LR * scale * g;
    storageBarrier();
    workgroupBarrier();
    if f == 0u {
        bias[0] -= LR * scale * gb;
        counter.step += 1u;
    }
}

// Mean squared error on the eval set, of whatever the parameter buffers hold now.
@compute @workgroup_size(64)
fn evaluate(@builtin(local_invocation_index) t: u32) {
    var sum = 0.0;
    for (var i = t; i < N_EVAL; i += 64u) {
        let k = N_TRAIN + i;
        let e = predict(k) - data[k * (F + 1u) + F];
        sum += e * e;
    }
    residual[t] = sum;
    workgroupBarrier();
    if t == 0u {
        var total = 0.0;
        for (var j = 0u; j < 64u; j++) {
            total += residual[j];
        }
        loss[0] = total / f32(N_EVAL);
    }
}
