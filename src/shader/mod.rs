//! The shader contract, in one place: which buffer is bound where, what the per-step values
//! and the chunk-table rows look like, which entry points exist, and the WGSL source of each
//! pipeline variant, generated from these tables with no text replacement. No wgpu types:
//! every variant is validated by naga in the tests, without a device.
//!
//! `shaders/ema.wgsl` holds what is written by hand: the item loop's helpers and one body
//! function per op (`fn update_item(it: Item)`, ...). Generated around it:
//! - the constants `WG`, `PER_THREAD` and `LANES` (from [`crate::plan`] and the shape's
//!   [`ItemMap`]),
//! - `struct Step` (from [`StepValues`]) and its declaration, as an immediate or a uniform
//!   ring slot ([`StepSource`]),
//! - `struct Seg` (from [`SegRow`](crate::plan::SegRow)),
//! - the storage bindings, numbered by [`Role::binding`], and per parameter slot the
//!   functions that pick one by slot number (`load4`, `load2`, `load4_rw`, `load1_rw`,
//!   `store_rw`),
//! - one entry point per [`Op`], all running the same item loop around the op's body.
//!
//! A new op is one variant of [`Op`] (its entry point, family, and body function) and one body
//! function in `shaders/ema.wgsl`; a new buffer beside the shadows is one [`Role`].

use std::fmt::Write;

use crate::plan::{ItemMap, DTYPE_CODES, WORKGROUP};

/// The hand-written part of the shader.
const BODY: &str = include_str!("../../shaders/ema.wgsl");

pub(crate) mod fused;

/// The most EMAs one pass updates (`K` in the shader).
pub(crate) const MAX_EMAS: usize = 4;

/// The binding number of parameter slot 0; further slots follow.
pub(crate) const FIRST_PARAM: u32 = 8;

/// The per-step values as the shader sees them (`struct Step`, generated from
/// [`STEP_FIELDS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct StepValues {
    /// EMA 0's `alpha = 1 - decay`.
    pub alpha: f32,
    /// Always 1.0, but unknown to the shader compiler: see the compensated update.
    pub one: f32,
    /// What the fused epilogue does this step ([`MODE_SKIP`], [`MODE_COPY`], [`MODE_UPDATE`]);
    /// the separate passes know it from their op.
    pub mode: f32,
    /// What rounding EMA 0's alpha to f32 dropped (compensated shadows add it back).
    pub alpha_lo: f32,
    /// Every EMA's alpha, for passes updating several.
    pub alphas: [f32; MAX_EMAS],
}

/// `struct Step`'s fields in WGSL, in [`StepValues`]' order.
const STEP_FIELDS: [(&str, &str); 5] = [
    ("alpha", "f32"),
    ("one", "f32"),
    ("mode", "f32"),
    ("alpha_lo", "f32"),
    ("alphas", "vec4<f32>"),
];

/// `struct Seg`'s fields in WGSL, in [`SegRow`](crate::plan::SegRow)'s order (all `u32`).
const SEG_FIELDS: [&str; 8] = [
    "vstart", "count", "param", "shadow", "slot", "dtype", "flags", "pad1",
];

/// [`StepValues::mode`]: nothing this step (between two updates of `update_every`).
pub(crate) const MODE_SKIP: f32 = 0.0;
/// [`StepValues::mode`]: shadows := parameters (before `update_after_step`, BEMA's restarts).
pub(crate) const MODE_COPY: f32 = 1.0;
/// [`StepValues::mode`]: the EMA update.
pub(crate) const MODE_UPDATE: f32 = 2.0;

/// Bytes of [`StepValues`].
pub(crate) const STEP_BYTES: u64 = std::mem::size_of::<StepValues>() as u64;

impl StepValues {
    /// The values of a step updating EMA `k` with `alphas[k]`.
    pub fn new(alphas: [f32; MAX_EMAS]) -> Self {
        Self {
            alpha: alphas[0],
            one: 1.0,
            mode: MODE_UPDATE,
            alpha_lo: 0.0,
            alphas,
        }
    }
}

/// What a binding holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The dispatch's rows of the chunk table (read-only).
    Table,
    /// The shadows of EMA `k` (0: the builder's schedule), in the dispatch's shadow buffer.
    Shadow(usize),
    /// The Kahan compensation terms, laid out as the shadows.
    Comp,
    /// BEMA's anchor `theta_0`, laid out as the shadows.
    Anchor,
    /// BEMA's weights, computed on request into a buffer laid out as the shadows.
    BemaOut,
    /// Parameter window number `slot` of the dispatch.
    Param(usize),
}

impl Role {
    /// Its binding number in group 0.
    pub fn binding(self) -> u32 {
        match self {
            Role::Table => 0,
            Role::Shadow(0) => 1,
            Role::Comp => 2,
            Role::Shadow(k) => 2 + k as u32,
            Role::Anchor => 6,
            Role::BemaOut => 7,
            Role::Param(slot) => FIRST_PARAM + slot as u32,
        }
    }

    /// The WGSL variable of a fixed role (parameters have two: see [`declarations`]).
    fn variable(self) -> &'static str {
        match self {
            Role::Table => "segs",
            Role::Shadow(0) => "shadow",
            Role::Shadow(1) => "shadow_b",
            Role::Shadow(2) => "shadow_c",
            Role::Shadow(_) => "shadow_d",
            Role::Comp => "comp",
            Role::Anchor => "anchor",
            Role::BemaOut => "bema_out",
            Role::Param(_) => "p",
        }
    }
}

/// One entry of a bind group layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub role: Role,
    pub writable: bool,
}

/// Which bindings a family of passes uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// Update, init and BEMA's weights: parameters read-only; every buffer the EMA has
    /// beside them.
    Read,
    /// Swap and copy into the parameters: parameters read-write; EMA 0's shadows (or, for
    /// BEMA's weights, their buffer bound in the shadows' place: the executor chooses).
    Write,
}

/// What the EMA keeps beside EMA 0's shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// EMAs in one pass (1 to [`MAX_EMAS`]).
    pub emas: usize,
    pub compensated: bool,
    /// BEMA: the anchor and the weights' buffer beside the shadows (one EMA, not
    /// compensated).
    pub bema: bool,
    /// Parameter bindings per dispatch.
    pub slots: usize,
    /// How items are spread over invocations.
    pub map: ItemMap,
}

/// The table: for `family`, every binding and whether it is written.
///
/// Several EMAs bind all four shadow bindings (the shader's `K` override chooses how many it
/// touches; unused ones get a placeholder), since WGSL counts a binding as used even in a
/// branch that `K` rules out.
pub(crate) fn entries(family: Family, shape: &Shape) -> Vec<Entry> {
    let rw = |role| Entry {
        role,
        writable: true,
    };
    let mut out = vec![
        Entry {
            role: Role::Table,
            writable: false,
        },
        rw(Role::Shadow(0)),
    ];
    if family == Family::Read {
        if shape.compensated {
            out.push(rw(Role::Comp));
        }
        if shape.emas > 1 {
            out.extend((1..MAX_EMAS).map(|k| rw(Role::Shadow(k))));
        }
        if shape.bema {
            out.push(rw(Role::Anchor));
            out.push(rw(Role::BemaOut));
        }
    }
    out.extend((0..shape.slots).map(|slot| Entry {
        role: Role::Param(slot),
        writable: family == Family::Write,
    }));
    out
}

/// Storage bindings that are not parameters, at most (table, shadows, compensation).
pub(crate) fn fixed_bindings(shape: &Shape) -> usize {
    entries(Family::Read, &Shape { slots: 0, ..*shape }).len()
}

/// Which operation a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `shadow = ema(shadow, param, alpha)`.
    Update,
    /// `shadow = param`.
    Init,
    /// Exchange `param` and `shadow` (parameters bound read-write).
    Swap,
    /// `param = shadow` (parameters bound read-write).
    ToParams,
    /// BEMA's weights: `bema_out = shadow + alpha_t (param - anchor)`.
    Bema,
    /// [`Op::Update`] for dispatches whose rows all have f32 parameters starting on a 16-byte
    /// boundary of their window: each item's 4 parameters in one `vec4` load.
    UpdateAligned,
}

impl Op {
    /// Every op, in the order the generated source declares their entry points.
    pub const ALL: [Op; 6] = [
        Op::Update,
        Op::Init,
        Op::Swap,
        Op::ToParams,
        Op::Bema,
        Op::UpdateAligned,
    ];

    /// True when an EMA of `shape` has this op (its source declares the entry point, and
    /// its pipelines include it).
    pub fn applies(self, shape: &Shape) -> bool {
        match self {
            Op::Bema => shape.bema,
            // The plain update only: several EMAs and compensation keep the general loads.
            Op::UpdateAligned => shape.emas == 1 && !shape.compensated,
            _ => true,
        }
    }

    /// The bindings this op's pass uses.
    pub fn family(self) -> Family {
        match self {
            Op::Update | Op::Init | Op::Bema | Op::UpdateAligned => Family::Read,
            Op::Swap | Op::ToParams => Family::Write,
        }
    }

    /// Its entry point.
    pub fn entry_point(self) -> &'static str {
        match self {
            Op::Update => "update",
            Op::Init => "init",
            Op::Swap => "swap",
            Op::ToParams => "to_params",
            Op::Bema => "bema",
            Op::UpdateAligned => "update_aligned",
        }
    }

    /// The body function in `shaders/ema.wgsl` that does this op for one item, for an EMA
    /// of `shape`.
    fn body(self, shape: &Shape) -> &'static str {
        if self == Op::Init && shape.bema {
            return "init_item_bema";
        }
        match (self, shape.emas > 1, shape.compensated) {
            (Op::Bema, ..) => "bema_item",
            (Op::UpdateAligned, ..) => "update_item_aligned",
            (Op::Update, true, _) => "update_item_multi",
            (Op::Update, false, true) => "update_item_kahan",
            (Op::Update, false, false) => "update_item",
            (Op::Init, true, _) => "init_item_multi",
            (Op::Init, false, true) => "init_item_kahan",
            (Op::Init, false, false) => "init_item",
            (Op::Swap, ..) => "swap_item",
            (Op::ToParams, ..) => "to_params_item",
        }
    }

    /// Its pass's label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Update => "wgpu-ema update",
            Op::Init => "wgpu-ema init",
            Op::Swap => "wgpu-ema swap",
            Op::ToParams => "wgpu-ema shadows to params",
            Op::Bema => "wgpu-ema BEMA weights",
            Op::UpdateAligned => "wgpu-ema update",
        }
    }
}

/// How the per-step values reach the shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StepSource {
    /// An immediate (push constant): `Features::IMMEDIATES`.
    Immediate,
    /// A slot of a uniform ring, bound in group 1 with a dynamic offset.
    Ring,
}

/// One pipeline variant's source: `shape.slots` parameter bindings, the step values from
/// `step`. The numerics and the number of EMAs a multi-EMA pass touches are overrides
/// ([`overrides`]), not part of the source.
pub(crate) fn source(shape: &Shape, step: StepSource) -> String {
    let mut s = String::with_capacity(BODY.len() + 4096);
    s.push_str("// Generated by wgpu-ema (src/shader/mod.rs) around shaders/ema.wgsl.\n\n");
    let _ = writeln!(s, "const WG: u32 = {WORKGROUP}u;");
    let _ = writeln!(s, "const PER_THREAD: u32 = {}u;", shape.map.per_thread);
    let _ = writeln!(s, "const LANES: u32 = {}u;", shape.map.lanes);
    let _ = writeln!(s, "const DTYPES: u32 = {DTYPE_CODES}u;\n");
    s.push_str("struct Step {\n");
    for (name, ty) in STEP_FIELDS {
        let _ = writeln!(s, "    {name}: {ty},");
    }
    s.push_str("}\n");
    s.push_str(match step {
        StepSource::Immediate => "var<immediate> step: Step;\n\n",
        StepSource::Ring => "@group(1) @binding(0) var<uniform> step: Step;\n\n",
    });
    s.push_str("struct Seg {\n");
    for name in SEG_FIELDS {
        let _ = writeln!(s, "    {name}: u32,");
    }
    s.push_str("}\n\n");
    s.push_str(&declarations(shape.slots));
    s.push('\n');
    s.push_str(BODY);
    s.push('\n');
    for op in Op::ALL.into_iter().filter(|op| op.applies(shape)) {
        let _ = write!(
            s,
            "
@compute @workgroup_size(WG)
fn {entry}(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {{
    let total = total_items();
    // The workgroup's first item and its row depend on the workgroup only: every lane
    // computes the same values, which compilers keep in scalar registers.
    let first = item_index(wid, nwg, vec3<u32>(0u), 0u);
    if first >= total {{
        return;
    }}
    var row = find_row(first, 0u);
    if in_one_row(first, row) {{
        let seg = segs[row];
        // Averaged rows of each dtype rebuilt with their dtype and flags as constants, so
        // that the inlined body loses its branches on them.
        switch select(DTYPES, seg.dtype, seg.flags == 0u) {{
{by_dtype}            default: {{
                for (var j = 0u; j < PER_THREAD; j++) {{
                    {body}(locate_in(seg, item_index(wid, nwg, lid, j)));
                }}
            }}
        }}
        return;
    }}
    for (var j = 0u; j < PER_THREAD; j++) {{
        let it = next_item(wid, nwg, lid, j, total, &row);
        if it.n == 0u {{
            return;
        }}
        {body}(it);
    }}
}}
",
            entry = op.entry_point(),
            body = op.body(shape),
            by_dtype = by_dtype(op.body(shape)),
        );
    }
    s
}

/// The one-row loop's cases for averaged rows of each parameter dtype code (`dtype_code` in
/// `crate::plan`): the row rebuilt with `dtype` and `flags` as literals (the constructor's
/// arguments in [`SEG_FIELDS`]' order).
fn by_dtype(body: &str) -> String {
    let mut s = String::new();
    for code in 0..DTYPE_CODES {
        let fields: Vec<String> = SEG_FIELDS
            .iter()
            .map(|&f| match f {
                "dtype" => format!("{code}u"),
                "flags" => "0u".to_string(),
                other => format!("seg.{other}"),
            })
            .collect();
        let _ = writeln!(
            s,
            "            case {code}u: {{
                let known = Seg({});
                for (var j = 0u; j < PER_THREAD; j++) {{
                    {body}(locate_in(known, item_index(wid, nwg, lid, j)));
                }}
            }}",
            fields.join(", ")
        );
    }
    s
}

/// The pipeline-overridable constants of a variant: `TF_FORM` (TensorFlow's form of the
/// update) and `K` (EMAs a multi-EMA pass updates).
pub(crate) fn overrides(shape: &Shape, tf_form: bool) -> [(&'static str, f64); 2] {
    [
        ("TF_FORM", if tf_form { 1.0 } else { 0.0 }),
        ("K", shape.emas.clamp(2, MAX_EMAS) as f64),
    ]
}

/// The storage bindings: the fixed roles once each (every variant declares them all; an
/// entry point binds only those its body uses), and per parameter slot `p<i>` read-only and
/// `q<i>` read-write at the same binding (updates read through one, swaps write through the
/// other; no entry point uses both), with the functions that pick a slot by number.
fn declarations(slots: usize) -> String {
    let mut s = String::new();
    s.push_str("@group(0) @binding(0) var<storage, read> segs: array<Seg>;\n");
    for role in [
        Role::Shadow(0),
        Role::Comp,
        Role::Shadow(1),
        Role::Shadow(2),
        Role::Shadow(3),
        Role::Anchor,
        Role::BemaOut,
    ] {
        let _ = writeln!(
            s,
            "@group(0) @binding({}) var<storage, read_write> {}: array<vec4<f32>>;",
            role.binding(),
            role.variable()
        );
    }
    for i in 0..slots {
        let b = Role::Param(i).binding();
        let _ = writeln!(
            s,
            "@group(0) @binding({b}) var<storage, read> p{i}: array<u32>;"
        );
        let _ = writeln!(
            s,
            "@group(0) @binding({b}) var<storage, read> p4_{i}: array<vec4<u32>>;"
        );
        let _ = writeln!(
            s,
            "@group(0) @binding({b}) var<storage, read_write> q{i}: array<u32>;"
        );
    }
    let mut func = |head: &str, default: &str, case: &dyn Fn(usize) -> String| {
        let _ = writeln!(s, "\n{head} {{\n    switch slot {{");
        for i in 0..slots {
            let _ = writeln!(s, "        case {i}u: {{ {} }}", case(i));
        }
        let _ = writeln!(s, "        default: {{ {default} }}\n    }}\n}}");
    };
    func(
        "fn load4(slot: u32, i: u32) -> vec4<u32>",
        "return vec4<u32>();",
        &|i| format!("return vec4<u32>(p{i}[i], p{i}[i + 1u], p{i}[i + 2u], p{i}[i + 3u]);"),
    );
    func(
        "fn load4v(slot: u32, j: u32) -> vec4<u32>",
        "return vec4<u32>();",
        &|i| format!("return p4_{i}[j];"),
    );
    func(
        "fn load2(slot: u32, w: u32) -> vec2<u32>",
        "return vec2<u32>();",
        &|i| format!("return vec2<u32>(p{i}[w], p{i}[w + 1u]);"),
    );
    func(
        "fn load4_rw(slot: u32, i: u32) -> vec4<u32>",
        "return vec4<u32>();",
        &|i| format!("return vec4<u32>(q{i}[i], q{i}[i + 1u], q{i}[i + 2u], q{i}[i + 3u]);"),
    );
    func(
        "fn load1_rw(slot: u32, w: u32) -> u32",
        "return 0u;",
        &|i| format!("return q{i}[w];"),
    );
    func("fn store_rw(slot: u32, w: u32, v: u32)", "", &|i| {
        format!("q{i}[w] = v;")
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::SegRow;
    use naga::valid::{Capabilities, ValidationFlags, Validator};

    fn parse(src: &str) -> (naga::Module, naga::valid::ModuleInfo) {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
        (module, info)
    }

    /// Every variant the GPU side can ask for parses and validates, and every entry point
    /// survives each value of its overrides.
    #[test]
    fn every_variant_validates() {
        let mut count = 0;
        // The item map only changes two constants: each step source takes one.
        for (step, map) in [
            (StepSource::Immediate, ItemMap::GPU),
            (StepSource::Ring, ItemMap::SOFTWARE),
        ] {
            for slots in [1, 2, 4, 16, 29, 64, 120] {
                for (emas, compensated, bema) in [
                    (1, false, false),
                    (1, true, false),
                    (2, false, false),
                    (3, false, false),
                    (4, false, false),
                    (1, false, true),
                ] {
                    let shape = Shape {
                        emas,
                        compensated,
                        bema,
                        slots,
                        map,
                    };
                    let src = source(&shape, step);
                    let (module, info) = parse(&src);
                    for tf_form in [false, true] {
                        let constants = overrides(&shape, tf_form).into_iter();
                        let constants: naga::back::PipelineConstants =
                            constants.map(|(k, v)| (k.to_string(), v)).collect();
                        for op in Op::ALL.into_iter().filter(|op| op.applies(&shape)) {
                            naga::back::pipeline_constants::process_overrides(
                                &module,
                                &info,
                                Some((naga::ShaderStage::Compute, op.entry_point())),
                                &constants,
                            )
                            .unwrap_or_else(|e| panic!("{op:?} {shape:?}: {e:?}"));
                            count += 1;
                        }
                    }
                }
            }
        }
        // Four ops in every variant of the six; the aligned update in the two with one plain
        // EMA (plain, BEMA); BEMA's weights in BEMA's.
        assert_eq!(count, 2 * 7 * 2 * (4 * 6 + 2 + 1));
    }

    /// The bindings each entry point uses are exactly in its family's table for the shape, with
    /// the access the table says: what wgpu checks against the bind group layout.
    #[test]
    fn entry_points_use_what_the_table_binds() {
        for (emas, compensated, bema) in [
            (1, false, false),
            (1, true, false),
            (3, false, false),
            (1, false, true),
        ] {
            let shape = Shape {
                emas,
                compensated,
                bema,
                slots: 3,
                map: ItemMap::GPU,
            };
            let (module, info) = parse(&source(&shape, StepSource::Ring));
            for op in Op::ALL.into_iter().filter(|op| op.applies(&shape)) {
                let table = entries(op.family(), &shape);
                let (i, _) = module
                    .entry_points
                    .iter()
                    .enumerate()
                    .find(|(_, e)| e.name == op.entry_point())
                    .expect("entry point");
                let uses = info.get_entry_point(i);
                for (handle, var) in module.global_variables.iter() {
                    if uses[handle].is_empty() {
                        continue;
                    }
                    let Some(rb) = &var.binding else { continue };
                    if rb.group == 1 {
                        continue;
                    }
                    let entry = table
                        .iter()
                        .find(|e| e.role.binding() == rb.binding)
                        .unwrap_or_else(|| {
                            panic!(
                                "{op:?} {shape:?} uses binding {} not in its table",
                                rb.binding
                            )
                        });
                    let writes = uses[handle].contains(naga::valid::GlobalUse::WRITE);
                    assert!(
                        !writes || entry.writable,
                        "{op:?} writes read-only {:?}",
                        var.name
                    );
                    if let naga::AddressSpace::Storage { access } = var.space {
                        let declared_rw = access.contains(naga::StorageAccess::STORE);
                        assert_eq!(declared_rw, entry.writable, "{op:?} {:?}", var.name);
                    }
                }
            }
        }
    }

    /// `struct Step` and `struct Seg` as naga lays them out are the Rust structs' layouts.
    #[test]
    fn structs_mirror_the_host_types() {
        let shape = Shape {
            emas: 1,
            compensated: false,
            bema: false,
            slots: 1,
            map: ItemMap::SOFTWARE,
        };
        let (module, _) = parse(&source(&shape, StepSource::Ring));
        let layout = |name: &str| -> (Vec<(String, u32)>, u32) {
            let (_, ty) = module
                .types
                .iter()
                .find(|(_, t)| t.name.as_deref() == Some(name))
                .expect("struct");
            match &ty.inner {
                naga::TypeInner::Struct { members, span } => (
                    members
                        .iter()
                        .map(|m| (m.name.clone().unwrap_or_default(), m.offset))
                        .collect(),
                    *span,
                ),
                other => panic!("{other:?}"),
            }
        };
        let (step, span) = layout("Step");
        assert_eq!(u64::from(span), STEP_BYTES);
        let rust_step = [
            ("alpha", std::mem::offset_of!(StepValues, alpha)),
            ("one", std::mem::offset_of!(StepValues, one)),
            ("mode", std::mem::offset_of!(StepValues, mode)),
            ("alpha_lo", std::mem::offset_of!(StepValues, alpha_lo)),
            ("alphas", std::mem::offset_of!(StepValues, alphas)),
        ];
        let rust_step: Vec<(String, u32)> = rust_step
            .iter()
            .map(|(n, o)| (n.to_string(), *o as u32))
            .collect();
        assert_eq!(step, rust_step);
        let (seg, span) = layout("Seg");
        assert_eq!(span as usize, std::mem::size_of::<SegRow>());
        let rust_seg = [
            ("vstart", std::mem::offset_of!(SegRow, vstart)),
            ("count", std::mem::offset_of!(SegRow, count)),
            ("param", std::mem::offset_of!(SegRow, param)),
            ("shadow", std::mem::offset_of!(SegRow, shadow)),
            ("slot", std::mem::offset_of!(SegRow, slot)),
            ("dtype", std::mem::offset_of!(SegRow, dtype)),
            ("flags", std::mem::offset_of!(SegRow, flags)),
            ("pad1", std::mem::offset_of!(SegRow, pad1)),
        ];
        let rust_seg: Vec<(String, u32)> = rust_seg
            .iter()
            .map(|(n, o)| (n.to_string(), *o as u32))
            .collect();
        assert_eq!(seg, rust_seg);
    }

    #[test]
    fn the_table_numbers_each_role_once() {
        let shape = Shape {
            emas: 3,
            compensated: true,
            bema: true,
            slots: 4,
            map: ItemMap::SOFTWARE,
        };
        let r = entries(Family::Read, &shape);
        let mut numbers: Vec<u32> = r.iter().map(|e| e.role.binding()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), r.len());
        assert_eq!(fixed_bindings(&shape), 8);
        assert!(r
            .iter()
            .filter(|e| e.role.binding() < FIRST_PARAM)
            .all(|e| !matches!(e.role, Role::Param(_))));
        let w = entries(Family::Write, &shape);
        assert_eq!(w.len(), 2 + 4);
        assert!(w
            .iter()
            .filter(|e| matches!(e.role, Role::Param(_)))
            .all(|e| e.writable));
    }
}
