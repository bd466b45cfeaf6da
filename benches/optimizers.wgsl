// Reference optimizers for the fused-epilogue benchmark (benches/bandwidth.rs): plain SGD,
// SGD with momentum and AdamW over one tensor of f32, one element per invocation, and the
// same with four elements per invocation (`vec4` loads; entry points ending in 4). The
// benchmark builds each twice: as is (the EMA then runs as a separate pass), and with
// `//EMA` replaced by the epilogue's call (`ema_epilogue`, or `ema_epilogue4` for the
// four-element forms) and the epilogue's source appended.
//
// Bytes per element (f32): SGD reads p, g and writes p (12); momentum also reads and writes m
// (20); AdamW also m and v (28). A separate EMA pass adds 12, the fused epilogue 8.

struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    bc1: f32, // 1 / (1 - beta1^t)
    bc2: f32, // 1 / (1 - beta2^t)
    pad: f32,
}

@group(0) @binding(0) var<storage, read_write> p: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<uniform> h: Hyper;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

@compute @workgroup_size(256)
fn sgd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if i >= arrayLength(&p) {
        return;
    }
    let x = p[i] - h.lr * g[i];
    p[i] = x;
    //EMA
}

@compute @workgroup_size(256)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if i >= arrayLength(&p) {
        return;
    }
    let mi = h.beta1 * m[i] + g[i];
    m[i] = mi;
    let x = p[i] - h.lr * mi;
    p[i] = x;
    //EMA
}

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if i >= arrayLength(&p) {
        return;
    }
    let gi = g[i];
    let mi = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
    let vi = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    let pi = p[i];
    let x = pi - h.lr * (mi * h.bc1 / (sqrt(vi * h.bc2) + h.eps) + h.wd * pi);
    p[i] = x;
    //EMA
}

// The same buffers as vec4 (an entry point uses one view or the other). The tensor's length
// is a multiple of 4 here.
@group(0) @binding(0) var<storage, read_write> p4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> g4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> m4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> v4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn sgd4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = index(wid, nwg, lid);
    if j >= arrayLength(&p4) {
        return;
    }
    let e = 4u * j;
    let x = p4[j] - h.lr * g4[j];
    p4[j] = x;
    //EMA
}

@compute @workgroup_size(256)
fn momentum4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = index(wid, nwg, lid);
    if j >= arrayLength(&p4) {
        return;
    }
    let e = 4u * j;
    let mj = h.beta1 * m4[j] + g4[j];
    m4[j] = mj;
    let x = p4[j] - h.lr * mj;
    p4[j] = x;
    //EMA
}

@compute @workgroup_size(256)
fn adamw4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = index(wid, nwg, lid);
    if j >= arrayLength(&p4) {
        return;
    }
    let e = 4u * j;
    let gj = g4[j];
    let mj = h.beta1 * m4[j] + (1.0 - h.beta1) * gj;
    let vj = h.beta2 * v4[j] + (1.0 - h.beta2) * gj * gj;
    m4[j] = mj;
    v4[j] = vj;
    let pj = p4[j];
    let x = pj - h.lr * (mj * h.bc1 / (sqrt(vj * h.bc2) + h.eps) + h.wd * pj);
    p4[j] = x;
    //EMA
}
