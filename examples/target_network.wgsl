// Q-learning on a chain, one SGD step per dispatch, for examples/target_network.rs.
//
// States 0..S-1 in a row; state S-1 is terminal. Action 0 moves left (state 0 stays), action 1
// moves right; reaching the terminal state pays 1, everything else 0. The Q-network is
// `q(s) = W2^T relu(W1[s] + b1) + b2` (one-hot input, so the first layer is a row lookup).
// Each step draws B transitions (s, a) uniformly from a counter-based hash, computes the TD
// targets `r + GAMMA * max_a' q_target(s', a')` with the *target* network, and takes one SGD
// step on the online network's squared TD error.
//
// The online network lives in the caller's parameter arena (`online`, tensors at the element
// offsets W1_AT..B2_AT); the target network is the EMA's shadows, bound per tensor from
// `GpuEma::shadow_binding` (stable for the EMA's life, so this bind group is made once).

const S: u32 = 12u;
const H: u32 = 16u;
const A: u32 = 2u;
const B: u32 = 32u;

override W1_AT: u32;
override B1_AT: u32;
override W2_AT: u32;
override B2_AT: u32;
override LR: f32 = 0.2;
override GAMMA: f32 = 0.9;

@group(0) @binding(0) var<storage, read_write> online: array<f32>;
@group(0) @binding(1) var<storage, read> t_w1: array<f32>;
@group(0) @binding(2) var<storage, read> t_b1: array<f32>;
@group(0) @binding(3) var<storage, read> t_w2: array<f32>;
@group(0) @binding(4) var<storage, read> t_b2: array<f32>;
// [0]: steps taken so far (the hash's key); [1 + k]: step k's mean squared TD error (f32 bits).
@group(0) @binding(5) var<storage, read_write> log: array<u32>;

fn hash(x: u32) -> u32 {
    // PCG's output permutation over a counter: enough for uniform draws.
    var v = x * 747796405u + 2891336453u;
    v = ((v >> ((v >> 28u) + 4u)) ^ v) * 277803737u;
    return (v >> 22u) ^ v;
}

// The target network's value of the best action in state `s`.
fn target_max(s: u32) -> f32 {
    var best = -1e30;
    for (var a = 0u; a < A; a++) {
        var q = t_b2[a];
        for (var j = 0u; j < H; j++) {
            q += max(t_w1[s * H + j] + t_b1[j], 0.0) * t_w2[j * A + a];
        }
        best = max(best, q);
    }
    return best;
}

@compute @workgroup_size(1)
fn td_step() {
    let step = log[0];
    var g_w1: array<f32, 192>; // S * H
    var g_b1: array<f32, 16>;
    var g_w2: array<f32, 32>; // H * A
    var g_b2: array<f32, 2>;
    var loss = 0.0;
    for (var i = 0u; i < B; i++) {
        let r0 = hash(step * B + i);
        let s = r0 % (S - 1u);
        let a = (r0 >> 16u) & 1u;
        var next = s + 1u;
        if a == 0u {
            next = max(s, 1u) - 1u;
        }
        let done = next == S - 1u;
        var y = select(0.0, 1.0, done);
        if !done {
            y += GAMMA * target_max(next);
        }
        // Forward through the online network, keeping the hidden layer.
        var h: array<f32, 16>;
        var q = online[B2_AT + a];
        for (var j = 0u; j < H; j++) {
            h[j] = max(online[W1_AT + s * H + j] + online[B1_AT + j], 0.0);
            q += h[j] * online[W2_AT + j * A + a];
        }
        let d = q - y;
        loss += d * d;
        // Gradients of d^2 / 2.
        g_b2[a] += d;
        for (var j = 0u; j < H; j++) {
            g_w2[j * A + a] += d * h[j];
            if h[j] > 0.0 {
                let dh = d * online[W2_AT + j * A + a];
                g_w1[s * H + j] += dh;
                g_b1[j] += dh;
            }
        }
    }
    let k = LR / f32(B);
    for (var i = 0u; i < S * H; i++) {
        online[W1_AT + i] -= k * g_w1[i];
    }
    for (var j = 0u; j < H; j++) {
        online[B1_AT + j] -= k * g_b1[j];
    }
    for (var i = 0u; i < H * A; i++) {
        online[W2_AT + i] -= k * g_w2[i];
    }
    for (var a = 0u; a < A; a++) {
        online[B2_AT + a] -= k * g_b2[a];
    }
    log[1u + step] = bitcast<u32>(loss / f32(B));
    log[0] = step + 1u;
}
