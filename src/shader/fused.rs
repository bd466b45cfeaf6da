//! The fused epilogue's WGSL: the EMA's update as a function the caller's own optimizer shader
//! calls with each parameter's new value, so that the parameter is not read back from memory
//! (8 bytes per element instead of the separate pass's 12).
//!
//! Generated from the same contract as the separate passes: `struct Step` from
//! [`STEP_FIELDS`](super::STEP_FIELDS), the arithmetic of `shaders/ema.wgsl`'s bodies written
//! the same way (one lane of their `vec4`), the per-step values in the same [`StepValues`]
//! (with [`StepValues::mode`] saying what this step does). What differs is how the shadows are
//! found: by the caller's tensor number and element, through a table of one row per tracked
//! tensor (its first shadow element, its length, its flags), whose first row also holds a
//! fault word the epilogue sets on an index out of range.
//!
//! [`StepValues`]: super::StepValues
//! [`StepValues::mode`]: super::StepValues

use std::fmt::Write;

use super::{MODE_COPY, MODE_SKIP, STEP_FIELDS};

/// What the epilogue's code depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FusedShape {
    /// EMAs updated (1 to 4).
    pub emas: usize,
    pub compensated: bool,
    /// BEMA: copies also take the anchor.
    pub bema: bool,
    /// TensorFlow's form of the update (`Numerics::TensorFlow`).
    pub tf_form: bool,
}

/// What a binding of the epilogue's group holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FusedRole {
    /// The tensor table: row 0 the header (tensor count, fault word), then one row per tensor
    /// (first shadow element, element count, flags); read-write for the fault word.
    Table,
    /// The per-step values (a uniform ring slot, dynamic offset).
    Step,
    /// The shadows of EMA `k`.
    Shadow(usize),
    /// The Kahan compensation terms.
    Comp,
    /// BEMA's anchor.
    Anchor,
}

impl FusedRole {
    /// Its binding number within the caller's group.
    pub fn binding(self) -> u32 {
        match self {
            FusedRole::Table => 0,
            FusedRole::Step => 1,
            FusedRole::Shadow(k) => 2 + k as u32,
            FusedRole::Comp => 6,
            FusedRole::Anchor => 7,
        }
    }

    fn variable(self) -> &'static str {
        match self {
            FusedRole::Table => "ema_table",
            FusedRole::Step => "ema_step",
            FusedRole::Shadow(0) => "ema_shadow",
            FusedRole::Shadow(1) => "ema_shadow_b",
            FusedRole::Shadow(2) => "ema_shadow_c",
            FusedRole::Shadow(_) => "ema_shadow_d",
            FusedRole::Comp => "ema_comp",
            FusedRole::Anchor => "ema_anchor",
        }
    }
}

/// The two forms of the epilogue: one element per call, or four.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// `ema_epilogue(tensor, e, p: f32)`.
    One,
    /// `ema_epilogue4(tensor, e, p: vec4<f32>)`: elements `e..e + 4`, `e` a multiple of 4;
    /// shadows start on 4 elements, so these are one `vec4` of them.
    Four,
}

impl Width {
    fn ty(self) -> &'static str {
        match self {
            Width::One => "f32",
            Width::Four => "vec4<f32>",
        }
    }

    /// What the function names and the shadows' `vec4` views end with.
    fn suffix(self) -> &'static str {
        match self {
            Width::One => "",
            Width::Four => "4",
        }
    }

    /// True for an element the table's row (`row`) does not hold.
    fn guard(self) -> &'static str {
        match self {
            Width::One => "e >= row.y",
            Width::Four => "e >= row.y || (e & 3u) != 0u",
        }
    }

    /// The element's index in the shadows' array.
    fn index(self) -> &'static str {
        match self {
            Width::One => "row.x + e",
            Width::Four => "(row.x + e) / 4u",
        }
    }

    /// What `ema_value` of this width returns, for its comment.
    fn what(self) -> &'static str {
        match self {
            Width::One => "an element (0 past what is tracked)",
            Width::Four => {
                "elements e..e + 4 (0 past what is tracked; a tensor's last 4 hold padding \
                 past its end)"
            }
        }
    }
}

/// The update (or copy) of shadow index `i` with the new value `p`, as `shaders/ema.wgsl`'s
/// bodies compute each lane.
fn epilogue_body(s: &mut String, shape: &FusedShape, w: Width) {
    let (ty, x) = (w.ty(), w.suffix());
    // A copy: every shadow takes the value; compensation terms start at zero; BEMA's anchor
    // only on the step's copies (burn-in, restarts), not on a copied tensor's updates.
    let mut copy = format!("        ema_shadow{x}[i] = p;\n");
    for k in 1..shape.emas {
        let _ = writeln!(
            copy,
            "        {}{x}[i] = p;",
            FusedRole::Shadow(k).variable()
        );
    }
    if shape.compensated {
        let _ = writeln!(copy, "        ema_comp{x}[i] = {ty}(0.0);");
    }
    if shape.bema {
        let _ = writeln!(
            copy,
            "        if mode == {MODE_COPY:?} {{\n            ema_anchor{x}[i] = p;\n        }}"
        );
    }
    let _ = write!(
        s,
        "    if mode == {MODE_COPY:?} || (row.z & 1u) != 0u {{\n{copy}        return;\n    }}\n"
    );
    if shape.compensated {
        // shaders/ema.wgsl's update_item_kahan (its comments say why each `one`).
        let _ = write!(
            s,
            "    let one = ema_step.one;
    let s = ema_shadow{x}[i];
    let a = {ty}(ema_step.alpha);
    let d = p + (-s);
    let dbb = d * one - p;
    let dl = (p - (d - dbb)) + (-s - dbb);
    let ph = (a * d) * one;
    let ac = 4097.0 * a;
    let ah = ac * one - (ac - a);
    let al = a - ah;
    let dc = 4097.0 * d;
    let dh = dc * one - (dc - d);
    let dlo = d - dh;
    let pl = ((ah * dh - ph) + ah * dlo + al * dh) + al * dlo;
    let t = s + ph;
    let tbb = t * one - s;
    let te = (s - (t - tbb)) + (ph - tbb);
    let small = ((pl + (a * dl) * one + (ema_step.alpha_lo * d) * one) - ema_comp{x}[i]) + te;
    let next = t + small;
    ema_comp{x}[i] = (next * one - t) - small;
    ema_shadow{x}[i] = next;
"
        );
    } else if shape.emas > 1 {
        for (k, lane) in ["x", "y", "z", "w"].iter().enumerate().take(shape.emas) {
            let v = FusedRole::Shadow(k).variable();
            let _ = writeln!(
                s,
                "    {v}{x}[i] = ema_lerp{x}({v}{x}[i], p, ema_step.alphas.{lane});"
            );
        }
    } else {
        let _ = writeln!(
            s,
            "    ema_shadow{x}[i] = ema_lerp{x}(ema_shadow{x}[i], p, ema_step.alpha);"
        );
    }
}

/// Every binding the epilogue of `shape` declares, in binding order.
pub(crate) fn entries(shape: &FusedShape) -> Vec<FusedRole> {
    let mut v = vec![FusedRole::Table, FusedRole::Step];
    v.extend((0..shape.emas.max(1)).map(FusedRole::Shadow));
    if shape.compensated {
        v.push(FusedRole::Comp);
    }
    if shape.bema {
        v.push(FusedRole::Anchor);
    }
    v
}

/// Words of the table's header row and of each tensor's row (a `vec4<u32>`).
pub(crate) const ROW_WORDS: usize = 4;

/// The epilogue's WGSL for `shape`, its bindings in the caller's `group`: the declarations,
/// then `fn ema_epilogue(tensor: u32, e: u32, p: f32)` and its four-element form
/// `fn ema_epilogue4(tensor: u32, e: u32, p: vec4<f32>)` (with `ema_value` and `ema_value4`).
pub(crate) fn source(shape: &FusedShape, group: u32) -> String {
    let mut s = String::with_capacity(4096);
    s.push_str(
        "// wgpu-ema fused epilogue (generated by wgpu-ema for this EMA; do not edit).\n\
         // Call ema_epilogue(tensor, element, new_value) once per element of every tracked\n\
         // tensor, after computing the parameter's new value (as stored: rounded to its dtype),\n\
         // or ema_epilogue4(tensor, element, new_values) once per 4 elements from a multiple of\n\
         // 4 (past the tensor's end, the values are ignored). One entry point uses one form.\n\n",
    );
    s.push_str("struct EmaStep {\n");
    for (name, ty) in STEP_FIELDS {
        let _ = writeln!(s, "    {name}: {ty},");
    }
    s.push_str("}\n\n");
    // The shadows' buffers twice: as `array<f32>` for `ema_epilogue` and as
    // `array<vec4<f32>>` (name + "4") for `ema_epilogue4`; an entry point uses one or the other.
    for role in entries(shape) {
        let b = role.binding();
        let v = role.variable();
        let decl = match role {
            FusedRole::Table => format!("var<storage, read_write> {v}: array<vec4<u32>>"),
            FusedRole::Step => format!("var<uniform> {v}: EmaStep"),
            _ => format!(
                "var<storage, read_write> {v}: array<f32>;\n\
                 @group({group}) @binding({b}) var<storage, read_write> {v}4: array<vec4<f32>>"
            ),
        };
        let _ = writeln!(s, "@group({group}) @binding({b}) {decl};");
    }
    let lerp = if shape.tf_form {
        "s - (s - p) * a"
    } else {
        "s + a * (p - s)"
    };
    for w in [Width::One, Width::Four] {
        let (ty, x, guard, index) = (w.ty(), w.suffix(), w.guard(), w.index());
        let _ = write!(
            s,
            "
fn ema_lerp{x}(s: {ty}, p: {ty}, a: f32) -> {ty} {{
    return {lerp};
}}

// EMA 0's shadow of {what}, for a shader that also evaluates
// with the EMA weights: read it before this step's ema_epilogue{x} call for the same element.
fn ema_value{x}(tensor: u32, e: u32) -> {ty} {{
    if tensor >= ema_table[0].x {{
        return {ty}(0.0);
    }}
    let row = ema_table[1u + tensor];
    if {guard} {{
        return {ty}(0.0);
    }}
    return ema_shadow{x}[{index}];
}}

fn ema_epilogue{x}(tensor: u32, e: u32, p: {ty}) {{
    let mode = ema_step.mode;
    if mode == {MODE_SKIP:?} {{
        return;
    }}
    if tensor >= ema_table[0].x {{
        ema_table[0].y = 1u;
        return;
    }}
    let row = ema_table[1u + tensor];
    if {guard} {{
        ema_table[0].y = 1u;
        return;
    }}
    let i = {index};
",
            what = w.what(),
        );
        epilogue_body(&mut s, shape, w);
        s.push_str("}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use naga::valid::{Capabilities, ValidationFlags, Validator};

    /// A caller's optimizer: plain SGD over one tensor, calling the epilogue.
    const CALLER: &str = "
@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;

@compute @workgroup_size(64)
fn sgd(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i >= arrayLength(&param) {
        return;
    }
    let p = param[i] - 0.01 * grad[i];
    param[i] = p;
    ema_epilogue(0u, i, p);
}

@group(0) @binding(2) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> grad4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn sgd4(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.x;
    if j >= arrayLength(&param4) {
        return;
    }
    let p = param4[j] - 0.01 * grad4[j];
    param4[j] = p;
    ema_epilogue4(0u, 4u * j, p);
}
";

    #[test]
    fn every_epilogue_validates_inside_a_callers_shader() {
        let mut count = 0;
        for emas in 1..=4 {
            for compensated in [false, true] {
                for bema in [false, true] {
                    for tf_form in [false, true] {
                        for group in [1, 3] {
                            let shape = FusedShape {
                                emas,
                                compensated,
                                bema,
                                tf_form,
                            };
                            let src = format!("{CALLER}\n{}", source(&shape, group));
                            let module = naga::front::wgsl::parse_str(&src)
                                .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
                            Validator::new(ValidationFlags::all(), Capabilities::all())
                                .validate(&module)
                                .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
                            // Every declared binding in the caller's group, numbered by the table.
                            let mut found: Vec<u32> = module
                                .global_variables
                                .iter()
                                .filter_map(|(_, v)| v.binding.as_ref())
                                .filter(|b| b.group == group)
                                .map(|b| b.binding)
                                .collect();
                            found.sort_unstable();
                            found.dedup();
                            let want: Vec<u32> =
                                entries(&shape).iter().map(|r| r.binding()).collect();
                            assert_eq!(found, want, "{shape:?}");
                            count += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(count, 4 * 2 * 2 * 2 * 2);
    }

    #[test]
    fn the_update_is_written_as_the_separate_pass_writes_it() {
        let plain = FusedShape {
            emas: 1,
            compensated: false,
            bema: false,
            tf_form: false,
        };
        assert!(source(&plain, 1).contains("return s + a * (p - s);"));
        let tf = FusedShape {
            tf_form: true,
            ..plain
        };
        assert!(source(&tf, 1).contains("return s - (s - p) * a;"));
        let body = include_str!("../../shaders/ema.wgsl");
        assert!(
            body.contains("return s + a * (p - s);") && body.contains("return s - (s - p) * a;")
        );
        let kahan = source(
            &FusedShape {
                compensated: true,
                ..plain
            },
            1,
        );
        assert!(kahan.contains("(next * one - t) - small"));
        assert!(body.contains("(next * step.one - t.hi) - small"));
        assert!(kahan.contains("(ema_step.alpha_lo * d) * one"));
        assert!(body.contains("(step.alpha_lo * d.hi) * step.one"));
    }
}
