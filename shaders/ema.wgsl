// wgpu-ema: the EMA update and its companions (copy, swap, copy into the parameters) over any
// set of tensors, in one dispatch per shadow buffer and group of parameter bindings.
//
// This file is the hand-written half of the shader. The host (src/shader/mod.rs) generates the
// other half around it: the constants WG, PER_THREAD and LANES, `struct Step` and its declaration
// `step` (an immediate, or a uniform ring slot), `struct Seg` (the chunk-table row), the
// storage bindings (`segs`, `shadow`, `comp`, `shadow_b..d`, and per parameter slot `p<i>` /
// `q<i>` with `load4`, `load2`, `load4_rw`, `load1_rw`, `store_rw` picking one by slot
// number), and one entry point per op that runs the item loop below and calls the op's body
// (`update_item`, `init_item`, ...). The contract's tests validate every generated variant
// with naga.
//
// Multi-tensor apply. Each dispatch binds a chunk table `segs`: one row per *segment*, a run
// of `count` elements of one tensor whose parameters start at element `param` of parameter
// binding number `slot` and whose shadows start at element `shadow` of the shadow binding.
// The work is a list of *items* of 4 elements (one `vec4<f32>` of shadows; a segment's last
// item is padded), numbered across the segments: a row's `vstart` is its first item. A
// workgroup takes WG * PER_THREAD consecutive items; each run of LANES invocations takes a
// block of them, LANES apart per step (`ItemMap` in src/plan/mod.rs: on GPUs LANES = WG, so
// that neighbouring lanes read neighbouring memory at every step; on software devices small
// blocks, which a CPU core streams through). Where all the workgroup's items lie in one row
// (most of a large tensor), the row is found once, from the workgroup's first item;
// elsewhere each invocation finds an item's row by binary search (rows are sorted by
// `vstart`), and most items only check that they are still in the row of the one before.
// Small tensors thus share workgroups with their neighbours instead of leaving lanes idle.
//
// Parameter bindings are plain `array<u32>` (f32 bits, or two f16/bf16 per word) at any
// element offset, so one dispatch reads up to as many buffers as the device allows storage
// bindings, on every backend. Shadows are ours: every segment starts on an item boundary.

// TensorFlow writes the update as `s - (s - p) * alpha`; our default as `s + alpha * (p - s)`.
// Without fused multiply-add the two are bitwise identical; the form is kept as TensorFlow
// writes it in the TensorFlow-compatible mode so that a compiler that fuses sees the same
// expression TensorFlow's kernels do.
override TF_FORM: bool = false;
// How many EMAs a multi-EMA update (`update_item_multi`) touches (2 to 4).
override K: u32 = 2u;

// One item: its row, its first element in the row (`e`), how many of its 4 elements are real
// (`n`), and its shadows' vec4 index (`sh`).
struct Item {
    seg: Seg,
    e: u32,
    n: u32,
    sh: u32,
}

fn total_items() -> u32 {
    let last = segs[arrayLength(&segs) - 1u];
    return last.vstart + (last.count + 3u) / 4u;
}

// Item number `j` of this invocation.
fn item_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, j: u32) -> u32 {
    let block = (wid.y * nwg.x + wid.x) * WG * PER_THREAD + (lid.x / LANES) * LANES * PER_THREAD;
    return block + j * LANES + lid.x % LANES;
}

// The row holding item `v`, searching from row `start` (which starts at or before `v`).
fn find_row(v: u32, start: u32) -> u32 {
    let rows = arrayLength(&segs);
    if start + 1u >= rows || segs[start + 1u].vstart > v {
        return start;
    }
    var lo = start + 1u;
    var hi = rows;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if segs[mid].vstart <= v {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Item number `j` of this invocation, its row searched from `*row` (and left there for the
// next); `n` = 0 past the last item.
fn next_item(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, j: u32, total: u32, row: ptr<function, u32>) -> Item {
    let v = item_index(wid, nwg, lid, j);
    if v >= total {
        return Item(Seg(), 0u, 0u, 0u);
    }
    *row = find_row(v, *row);
    return locate(v, *row);
}

fn locate(v: u32, row: u32) -> Item {
    return locate_in(segs[row], v);
}

fn locate_in(seg: Seg, v: u32) -> Item {
    let q = v - seg.vstart;
    let e = q * 4u;
    return Item(seg, e, min(4u, seg.count - e), seg.shadow / 4u + q);
}

// True when all of a workgroup's items, from item `first` on, lie in row `row`. The entry
// points then read the row once, from values every lane shares (the workgroup's first item
// depends on the workgroup only), so the compiler can keep it in scalar registers: software
// devices otherwise run each lane's row search and row loads as gathers across their SIMD
// lanes, which cost them more than the update's own memory traffic.
fn in_one_row(first: u32, row: u32) -> bool {
    let seg = segs[row];
    return first + WG * PER_THREAD <= seg.vstart + (seg.count + 3u) / 4u;
}

// The item's 4 parameters as f32 (elements past `n` are whatever the binding holds there).
fn load_params(it: Item) -> vec4<f32> {
    let i = it.seg.param + it.e;
    if it.seg.dtype == 0u {
        return bitcast<vec4<f32>>(load4(it.seg.slot, i));
    }
    // 16-bit parameters: `i` is even (tensors start on a word), so the item is 2 words.
    return widen(load2(it.seg.slot, i >> 1u), it.seg.dtype);
}

// Two words of 16-bit parameters (dtype 1: f16, 2: bf16) as 4 f32.
fn widen(w: vec2<u32>, dtype: u32) -> vec4<f32> {
    if dtype == 1u {
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return bitcast<vec4<f32>>(vec4<u32>(w.x << 16u, w.x & 0xffff0000u, w.y << 16u, w.y & 0xffff0000u));
}

// The item's 4 parameters from one vec4 load, for rows whose first parameter is element 4k of
// their window (the executor runs `update_aligned` only on dispatches whose rows all are, with
// their last item's vec4 inside the window): software devices run 4 scalar loads as 4 gathers
// across their SIMD lanes, one vec4 load as one. A 16-bit item is half of a vec4 (2 words).
fn load_params_aligned(it: Item) -> vec4<f32> {
    let i = it.seg.param + it.e;
    if it.seg.dtype == 0u {
        return bitcast<vec4<f32>>(load4v(it.seg.slot, i >> 2u));
    }
    let q = load4v(it.seg.slot, i >> 3u);
    return widen(select(q.xy, q.zw, (i & 4u) != 0u), it.seg.dtype);
}

fn ema4(s: vec4<f32>, p: vec4<f32>, a: f32) -> vec4<f32> {
    if TF_FORM {
        return s - (s - p) * a;
    }
    return s + a * (p - s);
}

// The bodies: one item each. The generated entry points run them over this invocation's
// items. Padding lanes of a segment's last item compute on whatever lies past the tensor
// and write only the shadows' padding, never parameters.

// A tensor selected to be copied rather than averaged (running statistics) has `Seg.flags`
// bit 0 set: its update is the exact copy, as at initialisation.
fn follows(it: Item) -> bool {
    return (it.seg.flags & 1u) != 0u;
}

fn update_item(it: Item) {
    if follows(it) {
        init_item(it);
        return;
    }
    shadow[it.sh] = ema4(shadow[it.sh], load_params(it), step.alpha);
}

fn init_item(it: Item) {
    shadow[it.sh] = load_params(it);
}

fn update_item_aligned(it: Item) {
    let p = load_params_aligned(it);
    if follows(it) {
        shadow[it.sh] = p;
        return;
    }
    shadow[it.sh] = ema4(shadow[it.sh], p, step.alpha);
}

// Compensated shadows: beside each shadow an f32 term `comp` holding what the shadow's last
// rounding dropped (negated, as in Kahan's summation: the average is `shadow - comp`), fed
// back into the next step, so rounding errors stop accumulating over long runs with decays
// close to 1; and the increment `alpha * (p - s)` and its addition computed without rounding
// (two-sum for `p - s` and for the addition, Dekker's two-product for the product, alpha as
// `step.alpha + step.alpha_lo`), so that neither their rounding nor alpha's biases the
// average: within 1 ulp of the f64 EMA after 10^5 steps at 0.99999. 8 more bytes per element
// per step. src/cpu/kernels.rs computes the same.
// Note: these error terms are zero in exact arithmetic, and shader compilers treat float math
// as reassociable (Mesa's NIR folds `((s + y) - s) - y` to 0 on both Vulkan and GL).
// Multiplying by `step.one`, 1.0 arriving at run time, hides the identities from them (the
// multiplication is exact), and keeps the product `ph` from being fused into a later add. The
// tests check the accuracy on each backend.

struct Pair4 {
    hi: vec4<f32>,
    lo: vec4<f32>,
}

fn two_sum4(a: vec4<f32>, b: vec4<f32>) -> Pair4 {
    let s = a + b;
    let bb = s * step.one - a;
    return Pair4(s, (a - (s - bb)) + (b - bb));
}

fn split4(x: vec4<f32>) -> Pair4 {
    let c = 4097.0 * x;
    let hi = c * step.one - (c - x);
    return Pair4(hi, x - hi);
}

fn two_product4(a: vec4<f32>, b: vec4<f32>) -> Pair4 {
    let p = (a * b) * step.one;
    let x = split4(a);
    let y = split4(b);
    return Pair4(p, ((x.hi * y.hi - p) + x.hi * y.lo + x.lo * y.hi) + x.lo * y.lo);
}

fn update_item_kahan(it: Item) {
    if follows(it) {
        init_item_kahan(it);
        return;
    }
    let s = shadow[it.sh];
    let d = two_sum4(load_params(it), -s);
    let a = vec4<f32>(step.alpha);
    let prod = two_product4(a, d.hi);
    let t = two_sum4(s, prod.hi);
    // The two inexact products are multiplied by `one` so that no compiler fuses them into
    // the adds (a fused multiply-add would round differently from the CPU's path).
    let small = ((prod.lo + (a * d.lo) * step.one + (step.alpha_lo * d.hi) * step.one)
        - comp[it.sh]) + t.lo;
    let next = t.hi + small;
    comp[it.sh] = (next * step.one - t.hi) - small;
    shadow[it.sh] = next;
}

fn init_item_kahan(it: Item) {
    shadow[it.sh] = load_params(it);
    comp[it.sh] = vec4<f32>(0.0);
}

// Several EMAs of the same parameters in one pass (K = 2..4, e.g. decays 0.999 and 0.9999,
// or EDM2's two power-function profiles): each parameter is read once and K shadows are
// updated, 4 + 8K bytes per element instead of 12K for K separate passes.

fn update_item_multi(it: Item) {
    if follows(it) {
        init_item_multi(it);
        return;
    }
    let a = step.alphas;
    let p = load_params(it);
    let i = it.sh;
    shadow[i] = ema4(shadow[i], p, a.x);
    shadow_b[i] = ema4(shadow_b[i], p, a.y);
    if K > 2u {
        shadow_c[i] = ema4(shadow_c[i], p, a.z);
    }
    if K > 3u {
        shadow_d[i] = ema4(shadow_d[i], p, a.w);
    }
}

fn init_item_multi(it: Item) {
    let p = load_params(it);
    let i = it.sh;
    shadow[i] = p;
    shadow_b[i] = p;
    if K > 2u {
        shadow_c[i] = p;
    }
    if K > 3u {
        shadow_d[i] = p;
    }
}

// BEMA, the bias-corrected EMA: beside the shadows the anchor `theta_0` (`anchor`), taken with
// the shadows when the burn-in ends and at each restart; the update itself is `update_item`
// (it does not read the anchor). The corrected weights are computed on request into
// `bema_out`, with the correction's weight `alpha_t` in `step.alpha`; the executor then reads
// them back, or swaps or copies them into the parameters by binding `bema_out` in the
// shadows' place. A tensor selected to be copied has the parameter as its weights.

fn init_item_bema(it: Item) {
    let p = load_params(it);
    shadow[it.sh] = p;
    anchor[it.sh] = p;
}

fn bema_item(it: Item) {
    let p = load_params(it);
    if follows(it) {
        bema_out[it.sh] = p;
        return;
    }
    bema_out[it.sh] = shadow[it.sh] + step.alpha * (p - anchor[it.sh]);
}

// Evaluation with the EMA weights: the parameters bound read-write (`load4_rw`, `store_rw`).
// Swapping moves bits, never arithmetic, so swapping twice restores both sides exactly. Only
// the item's `n` real elements of the parameters are written.

fn store_n(slot: u32, i: u32, v: vec4<u32>, n: u32) {
    for (var c = 0u; c < n; c++) {
        store_rw(slot, i + c, v[c]);
    }
}

fn swap_item(it: Item) {
    let i = it.seg.param + it.e;
    let p = load4_rw(it.seg.slot, i);
    store_n(it.seg.slot, i, bitcast<vec4<u32>>(shadow[it.sh]), it.n);
    shadow[it.sh] = bitcast<vec4<f32>>(p);
}

// Copying f32 shadows into the parameters; into 16-bit ones rounding to nearest, ties to even
// (WGSL leaves the rounding of its own conversions to the implementation, so it is done by
// hand). A 16-bit item is 2 words; a half past the tensor's end (in its last word) is kept.

fn to_params_item(it: Item) {
    let s = shadow[it.sh];
    let i = it.seg.param + it.e;
    if it.seg.dtype == 0u {
        store_n(it.seg.slot, i, bitcast<vec4<u32>>(s), it.n);
        return;
    }
    var h: vec4<u32>;
    for (var c = 0u; c < 4u; c++) {
        if it.seg.dtype == 1u {
            h[c] = f32_to_f16_rne(s[c]);
        } else {
            h[c] = f32_to_bf16_rne(s[c]);
        }
    }
    let w = i >> 1u;
    var hi0 = h.y;
    if it.n < 2u {
        hi0 = load1_rw(it.seg.slot, w) >> 16u;
    }
    store_rw(it.seg.slot, w, h.x | (hi0 << 16u));
    if it.n > 2u {
        var hi1 = h.w;
        if it.n < 4u {
            hi1 = load1_rw(it.seg.slot, w + 1u) >> 16u;
        }
        store_rw(it.seg.slot, w + 1u, h.z | (hi1 << 16u));
    }
}

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

