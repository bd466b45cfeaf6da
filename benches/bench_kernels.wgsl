// Kernels the bench compares our update with.

// The memory-bandwidth reference: the update's access pattern (read two f32, write one)
// with vec4 loads, `a += s * b`.
@group(0) @binding(0) var<storage, read_write> a4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> s: vec4<f32>;

@compute @workgroup_size(256)
fn axpy_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if i < arrayLength(&a4) {
        a4[i] = a4[i] + s.x * b4[i];
    }
}

// What a user writes without the crate: one scalar dispatch and one uniform per tensor.
@group(0) @binding(0) var<storage, read_write> shadow: array<f32>;
@group(0) @binding(1) var<storage, read> param: array<f32>;
@group(0) @binding(2) var<uniform> alpha: vec4<f32>;

@compute @workgroup_size(256)
fn naive_ema(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if i < arrayLength(&shadow) {
        shadow[i] = shadow[i] + alpha.x * (param[i] - shadow[i]);
    }
}

// A plain copy with vec4 loads (8 bytes per element): the other bandwidth reference.
@group(0) @binding(0) var<storage, read_write> dst4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if i < arrayLength(&dst4) {
        dst4[i] = src4[i];
    }
}
