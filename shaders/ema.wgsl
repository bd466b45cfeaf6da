// wgpu-ema: the in-place EMA update and the shadow initialisation.
//
// One bind group per *segment*: a run of `count` elements of one tensor (or of the parameter
// arena) that fits in one storage binding. The host binds
//   - `params` at the storage-aligned offset at or below the segment's first parameter, so the
//     segment starts `shift` elements into the binding and the binding holds `shift + count`
//     elements (vec4 entry points: `shift` and `count` are multiples of 4);
//   - `shadow` exactly over the segment's shadows (`count` elements).
// So `count = arrayLength(shadow)` and `shift = arrayLength(params) - count`: a segment needs
// no uniform of its own, and rebinding a parameter only needs a new bind group.
//
// The per-step value, `alpha = 1 - decay`, is computed on the host (in f64, or with
// TensorFlow's f32 arithmetic) and arrives as an immediate (push constant) where the device
// has `Features::IMMEDIATES`, else from a uniform ring slot chosen by a dynamic offset: the
// host rewrites the declaration of `step` below for that case.
//
// Dispatches are 2-D when a segment needs more than 65,535 workgroups: the linear workgroup
// index is `wid.y * num_workgroups.x + wid.x`.

struct Step {
    alpha: f32,
    // Always 1.0, but unknown to the shader compiler: see the compensated updates.
    one: f32,
    pad0: f32,
    pad1: f32,
    // Several EMAs in one pass: the alpha of each (x: the first, as `alpha`).
    alphas: vec4<f32>,
}

var<immediate> step: Step;

// TensorFlow writes the update as `s - (s - p) * alpha`; our default as `s + alpha * (p - s)`.
// Without fused multiply-add the two are bitwise identical; the form is kept as TensorFlow
// writes it in the TensorFlow-compatible mode so that a compiler that fuses sees the same
// expression TensorFlow's kernels do.
override TF_FORM: bool = false;

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> params: array<f32>;
@group(0) @binding(1) var<storage, read_write> shadow: array<f32>;
@group(0) @binding(0) var<storage, read> params4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> shadow4: array<vec4<f32>>;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

fn ema1(s: f32, p: f32, a: f32) -> f32 {
    if TF_FORM {
        return s - (s - p) * a;
    }
    return s + a * (p - s);
}

fn ema4(s: vec4<f32>, p: vec4<f32>, a: f32) -> vec4<f32> {
    if TF_FORM {
        return s - (s - p) * a;
    }
    return s + a * (p - s);
}

@compute @workgroup_size(256)
fn update_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let shift = arrayLength(&params) - count;
    shadow[i] = ema1(shadow[i], params[shift + i], step.alpha);
}

@compute @workgroup_size(256)
fn update_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let shift = arrayLength(&params4) - count;
    shadow4[i] = ema4(shadow4[i], params4[shift + i], step.alpha);
}

@compute @workgroup_size(256)
fn copy_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = params[arrayLength(&params) - count + i];
}

@compute @workgroup_size(256)
fn copy_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow4[i] = params4[arrayLength(&params4) - count + i];
}

// Evaluation with the EMA weights: the same segments, with the parameters bound read-write.
// Swapping moves bits, never arithmetic, so swapping twice restores both sides exactly.

@group(0) @binding(0) var<storage, read_write> params_rw: array<f32>;
@group(0) @binding(0) var<storage, read_write> params_rw4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn swap_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let j = arrayLength(&params_rw) - count + i;
    let p = params_rw[j];
    params_rw[j] = shadow[i];
    shadow[i] = p;
}

@compute @workgroup_size(256)
fn swap_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let j = arrayLength(&params_rw4) - count + i;
    let p = params_rw4[j];
    params_rw4[j] = shadow4[i];
    shadow4[i] = p;
}

@compute @workgroup_size(256)
fn to_params_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    params_rw[arrayLength(&params_rw) - count + i] = shadow[i];
}

@compute @workgroup_size(256)
fn to_params_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    params_rw4[arrayLength(&params_rw4) - count + i] = shadow4[i];
}

// Compensated shadows (Kahan summation): beside each shadow an f32 term `comp` holding the
// low-order bits that the last additions lost, fed back into the next one, so rounding errors
// stop accumulating over long runs with decays close to 1. 8 more bytes per element per step.
// Note: `(t - s) - y` is zero in exact arithmetic, and shader compilers treat float math as
// reassociable (Mesa's NIR folds `((s + y) - s) - y` to 0 on both Vulkan and GL). Computing
// `t * step.one - s`, with `one` = 1.0 arriving at run time, hides the identity from them;
// the multiplication by 1 is exact. The tests check the accuracy on each backend.

@group(0) @binding(2) var<storage, read_write> comp: array<f32>;
@group(0) @binding(2) var<storage, read_write> comp4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn update_kahan_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let s = shadow[i];
    let y = step.alpha * (params[arrayLength(&params) - count + i] - s) - comp[i];
    let t = s + y;
    comp[i] = (t * step.one - s) - y;
    shadow[i] = t;
}

@compute @workgroup_size(256)
fn update_kahan_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let s = shadow4[i];
    let y = step.alpha * (params4[arrayLength(&params4) - count + i] - s) - comp4[i];
    let t = s + y;
    comp4[i] = (t * step.one - s) - y;
    shadow4[i] = t;
}

@compute @workgroup_size(256)
fn copy_kahan_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = params[arrayLength(&params) - count + i];
    comp[i] = 0.0;
}

@compute @workgroup_size(256)
fn copy_kahan_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow4[i] = params4[arrayLength(&params4) - count + i];
    comp4[i] = vec4<f32>(0.0);
}

// Several EMAs of the same parameters in one pass (K = 2..4, e.g. decays 0.999 and 0.9999,
// or EDM2's two power-function profiles): each parameter is read once and K shadows are
// updated, 4 + 8K bytes per element instead of 12K for K separate passes. Shadows of unused
// slots (K < 4) are bound to a small placeholder and never touched.

override K: u32 = 2u;

@group(0) @binding(1) var<storage, read_write> shadow_a: array<f32>;
@group(0) @binding(2) var<storage, read_write> shadow_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> shadow_c: array<f32>;
@group(0) @binding(4) var<storage, read_write> shadow_d: array<f32>;
@group(0) @binding(1) var<storage, read_write> shadow_a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> shadow_b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> shadow_c4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> shadow_d4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn update_multi_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow_a);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let p = params[arrayLength(&params) - count + i];
    let a = step.alphas;
    shadow_a[i] = ema1(shadow_a[i], p, a.x);
    shadow_b[i] = ema1(shadow_b[i], p, a.y);
    if K > 2u {
        shadow_c[i] = ema1(shadow_c[i], p, a.z);
    }
    if K > 3u {
        shadow_d[i] = ema1(shadow_d[i], p, a.w);
    }
}

@compute @workgroup_size(256)
fn update_multi_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow_a4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let p = params4[arrayLength(&params4) - count + i];
    let a = step.alphas;
    shadow_a4[i] = ema4(shadow_a4[i], p, a.x);
    shadow_b4[i] = ema4(shadow_b4[i], p, a.y);
    if K > 2u {
        shadow_c4[i] = ema4(shadow_c4[i], p, a.z);
    }
    if K > 3u {
        shadow_d4[i] = ema4(shadow_d4[i], p, a.w);
    }
}

@compute @workgroup_size(256)
fn copy_multi_scalar(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow_a);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let p = params[arrayLength(&params) - count + i];
    shadow_a[i] = p;
    shadow_b[i] = p;
    if K > 2u {
        shadow_c[i] = p;
    }
    if K > 3u {
        shadow_d[i] = p;
    }
}

@compute @workgroup_size(256)
fn copy_multi_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow_a4);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    let p = params4[arrayLength(&params4) - count + i];
    shadow_a4[i] = p;
    shadow_b4[i] = p;
    if K > 2u {
        shadow_c4[i] = p;
    }
    if K > 3u {
        shadow_d4[i] = p;
    }
}

// f16 and bf16 parameters, f32 shadows (a 16-bit shadow stops moving once alpha * (p - s) is
// below half its ulp). Parameters are read as u32 words, two per word, element j of the
// binding in the low half of word j / 2 when j is even: f16 with `unpack2x16float` (core WGSL,
// no SHADER_F16 needed), bf16 by shifting its bits into an f32. The tensor starts at a 4-byte
// multiple, so its shift into the binding is even: shift = 2 * words - count rounded up to
// even, where words = arrayLength(params_half).

@group(0) @binding(0) var<storage, read> params_half: array<u32>;

fn half_shift(count: u32) -> u32 {
    return 2u * arrayLength(&params_half) - (count + (count & 1u));
}

fn load_f16(j: u32) -> f32 {
    let v = unpack2x16float(params_half[j >> 1u]);
    return select(v.x, v.y, (j & 1u) == 1u);
}

fn load_bf16(j: u32) -> f32 {
    let w = params_half[j >> 1u];
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (j & 1u) == 1u));
}

@compute @workgroup_size(256)
fn update_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = ema1(shadow[i], load_f16(half_shift(count) + i), step.alpha);
}

@compute @workgroup_size(256)
fn update_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = ema1(shadow[i], load_bf16(half_shift(count) + i), step.alpha);
}

@compute @workgroup_size(256)
fn copy_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = load_f16(half_shift(count) + i);
}

@compute @workgroup_size(256)
fn copy_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let i = linear_index(wid, nwg, lid);
    if i >= count {
        return;
    }
    shadow[i] = load_bf16(half_shift(count) + i);
}

// Copying f32 shadows into 16-bit parameters, rounding to nearest, ties to even (WGSL leaves
// the rounding of its own conversions to the implementation, so it is done by hand). One
// invocation per u32 word: both halves are written together, and a half that belongs to
// another tensor (at the end of the range) is kept.

@group(0) @binding(0) var<storage, read_write> params_half_rw: array<u32>;

fn f32_to_bf16_rne(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return ((b >> 16u) | 0x40u) & 0xffffu; // NaN stays NaN (quiet)
    }
    return ((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) & 0xffffu;
}

fn f32_to_f16_rne(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let exp = (b >> 23u) & 0xffu;
    let man = b & 0x7fffffu;
    if exp == 0xffu {
        return sign | 0x7c00u | select(0u, 0x200u | (man >> 13u), man != 0u);
    }
    let e = i32(exp) - 112; // rebias: -127 + 15
    if e >= 31 {
        return sign | 0x7c00u; // overflow: infinity
    }
    if e <= 0 {
        // Subnormal (or zero) in f16: h units of 2^-24.
        if e < -10 {
            return sign;
        }
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        var h = m >> shift;
        let rem = m & ((1u << shift) - 1u);
        let halfway = 1u << (shift - 1u);
        if rem > halfway || (rem == halfway && (h & 1u) == 1u) {
            h += 1u;
        }
        return sign | h;
    }
    var h = (u32(e) << 10u) | (man >> 13u);
    let rem = man & 0x1fffu;
    if rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u) {
        h += 1u; // may carry into the exponent, up to infinity: still correct
    }
    return sign | h;
}

fn to_params_word(w: u32, count: u32, bf16: bool) {
    let words = (count + 1u) / 2u;
    let base = arrayLength(&params_half_rw) - words;
    let i = 2u * w;
    let old = params_half_rw[base + w];
    var lo = f32_to_f16_rne(shadow[i]);
    if bf16 {
        lo = f32_to_bf16_rne(shadow[i]);
    }
    var hi = old >> 16u;
    if i + 1u < count {
        hi = f32_to_f16_rne(shadow[i + 1u]);
        if bf16 {
            hi = f32_to_bf16_rne(shadow[i + 1u]);
        }
    }
    params_half_rw[base + w] = lo | (hi << 16u);
}

@compute @workgroup_size(256)
fn to_params_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let w = linear_index(wid, nwg, lid);
    if w < (count + 1u) / 2u {
        to_params_word(w, count, false);
    }
}

@compute @workgroup_size(256)
fn to_params_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let count = arrayLength(&shadow);
    let w = linear_index(wid, nwg, lid);
    if w < (count + 1u) / 2u {
        to_params_word(w, count, true);
    }
}
