//! Property tests of the planner over random layouts, offsets, dtypes, slot counts and
//! sequences of rebinds, with small binding limits so that windows, split shadows and several
//! shadow buffers appear at a few hundred elements.
//!
//! The checks are written from the rules the shader and WebGPU impose, not from the planner's
//! code: every element of every tensor is read from its own parameter byte and written to its
//! own shadow element exactly once; the window a row reads through contains what it reads; no
//! writable binding of a dispatch overlaps another of the same buffer; the rows of a dispatch
//! are numbered as the shader's binary search expects; the workgroups cover every item.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

/// Buffers named by number, with their sizes.
#[derive(Clone, Debug)]
struct Layout {
    lim: PlanLimits,
    slots: usize,
    buffer_sizes: Vec<u64>,
    /// (numel, buffer, offset, dtype) per tensor.
    tensors: Vec<(u64, u32, u64, ParamDtype)>,
    /// (tensor, buffer, offset) per rebind.
    rebinds: Vec<(usize, u32, u64)>,
}

fn dtype() -> impl Strategy<Value = ParamDtype> {
    prop_oneof![
        Just(ParamDtype::F32),
        Just(ParamDtype::F16),
        Just(ParamDtype::BF16)
    ]
}

/// A tensor of `numel` elements of `dtype` at a random 4-byte offset inside a buffer.
fn placed(buffer_sizes: &[u64], numel: u64, dtype: ParamDtype, pick: (usize, u64)) -> (u32, u64) {
    let bytes = (numel * dtype.size()).next_multiple_of(4);
    // Buffers are made large enough for the largest tensor below.
    let b = pick.0 % buffer_sizes.len();
    let room = (buffer_sizes[b] - bytes) / 4;
    (b as u32, pick.1 % (room + 1) * 4)
}

fn layout() -> impl Strategy<Value = Layout> {
    (
        prop_oneof![Just(16u64), Just(32), Just(256)],
        2u64..=8,
        1usize..=5,
        prop::collection::vec(1u64..=6, 1..=4),
        prop::collection::vec((0u64..=700, dtype(), any::<usize>(), any::<u64>()), 0..=12),
        prop::collection::vec((any::<usize>(), any::<usize>(), any::<u64>()), 0..=12),
    )
        .prop_map(|(align, binding_units, slots, sizes, tensors, rebinds)| {
            // Bindings of 2 to 8 alignment units (at least 64 bytes; a device's binding is
            // always at least two alignments: WebGPU's are 128 MiB and 256 bytes), buffers of
            // up to three bindings: big buffers are read through windows.
            let max_binding = (binding_units * align).max(64);
            let lim = PlanLimits::new(align, max_binding, 1 << 30);
            let buffer_sizes: Vec<u64> = sizes
                .iter()
                .map(|&k| (k * lim.max_binding / 2).max(700 * 4 + 64))
                .collect();
            let tensors: Vec<(u64, u32, u64, ParamDtype)> = tensors
                .into_iter()
                .map(|(n, dtype, b, o)| {
                    let (b, o) = placed(&buffer_sizes, n, dtype, (b, o));
                    (n, b, o, dtype)
                })
                .collect();
            let rebinds = if tensors.is_empty() {
                Vec::new()
            } else {
                rebinds
                    .into_iter()
                    .map(|(t, b, o)| {
                        let t = t % tensors.len();
                        let (n, _, _, dtype) = tensors[t];
                        let (b, o) = placed(&buffer_sizes, n, dtype, (b, o));
                        (t, b, o)
                    })
                    .collect()
            };
            Layout {
                lim,
                slots,
                buffer_sizes,
                tensors,
                rebinds,
            }
        })
}

fn binding(l: &Layout, buffer: u32, offset: u64, dtype: ParamDtype) -> ParamBinding<u32> {
    ParamBinding {
        buffer,
        buffer_size: l.buffer_sizes[buffer as usize],
        offset,
        dtype,
        follow: buffer % 2 == 1,
    }
}

fn initial(l: &Layout) -> Vec<(Vec<Piece>, ParamBinding<u32>)> {
    let numels: Vec<u64> = l.tensors.iter().map(|t| t.0).collect();
    let (pieces, _) = place_shadows(&numels, &l.lim).expect("small sizes");
    pieces
        .into_iter()
        .zip(&l.tensors)
        .map(|(p, &(_, b, o, dtype))| (p, binding(l, b, o, dtype)))
        .collect()
}

/// What a tensor's rows do, element run by element run: (shadow buffer, first shadow
/// element, count, parameter buffer, first parameter byte, dtype code).
type Runs = Vec<(usize, u64, u64, u32, u64, u32)>;

/// Checks every rule; returns each tensor's runs.
fn check(plan: &Plan<u32>, l: &Layout) -> Vec<Runs> {
    let slots = plan.slots();
    let mut claimed: HashSet<(usize, usize)> = HashSet::new();
    let mut runs = Vec::new();
    for t in 0..l.tensors.len() {
        let (pieces, b) = plan.tensor(t);
        let size = b.dtype.size();
        let numel: u64 = pieces.iter().map(|p| p.len).sum();
        // The tensor's rows, in order, cover its elements once: shadows piece by piece,
        // parameters from its binding's offset on.
        let mut mine: Runs = Vec::new();
        let mut done = 0u64;
        let mut piece = 0usize;
        let mut inside = 0u64;
        for &(di, ri) in plan.rows_of(t) {
            assert!(claimed.insert((di, ri)), "row ({di}, {ri}) claimed twice");
            let d = &plan.dispatches()[di];
            let row = d.rows[ri];
            let p = pieces[piece];
            assert_eq!(d.shadow_buffer, p.buffer, "tensor {t}: shadow buffer");
            assert_eq!(
                u64::from(row.shadow),
                p.offset / 4 + inside,
                "tensor {t}: shadow element"
            );
            let Some((buf, w)) = d.slots[row.slot as usize] else {
                panic!("tensor {t}: row reads a free slot");
            };
            assert_eq!(buf, b.buffer, "tensor {t}: parameter buffer");
            let first = w.offset + u64::from(row.param) * size;
            assert_eq!(first, b.offset + done * size, "tensor {t}: parameter byte");
            let end = first + u64::from(row.count) * size;
            assert!(end <= w.offset + w.size, "tensor {t}: read past its window");
            assert!(w.offset + w.size <= b.buffer_size, "window past the buffer");
            assert!(w.size <= l.lim.max_binding, "window larger than a binding");
            // The shader's codes (`load_params`, `to_params_item`), written out here.
            let code = match b.dtype {
                ParamDtype::F32 => 0,
                ParamDtype::F16 => 1,
                ParamDtype::BF16 => 2,
            };
            assert_eq!(row.dtype, code, "tensor {t}: dtype code");
            // A tensor's selection is its own, whatever it was rebound to since.
            let follows = l.tensors[t].1 % 2 == 1;
            assert_eq!(b.follow, follows, "tensor {t}: selection lost in a rebind");
            assert_eq!(row.flags, u32::from(follows), "tensor {t}: follow flag");
            assert!(row.count > 0);
            mine.push((
                d.shadow_buffer,
                u64::from(row.shadow),
                u64::from(row.count),
                buf,
                first,
                row.dtype,
            ));
            done += u64::from(row.count);
            inside += u64::from(row.count);
            if inside == p.len {
                piece += 1;
                inside = 0;
            } else {
                // A run that stops inside a piece stops on an item boundary.
                assert_eq!(inside % 4, 0, "tensor {t}: a segment ends mid-item");
            }
        }
        assert_eq!(done, numel, "tensor {t}: elements covered");
        runs.push(mine);
    }
    let mut rows = 0;
    for (di, d) in plan.dispatches().iter().enumerate() {
        rows += d.rows.len();
        assert_eq!(d.slots.len(), slots, "dispatch {di}: slot count");
        assert!(!d.rows.is_empty(), "dispatch {di}: no rows");
        // Rows numbered as the shader's search expects: consecutive items from 0.
        let mut vstart = 0u64;
        for row in &d.rows {
            assert_eq!(u64::from(row.vstart), vstart, "dispatch {di}: vstart");
            vstart += u64::from(row.count).div_ceil(4);
        }
        assert_eq!(d.items, vstart, "dispatch {di}: items");
        for map in [ItemMap::GPU, ItemMap::SOFTWARE] {
            let (x, y) = map.workgroups(d.items);
            assert!(u64::from(x) <= MAX_GROUPS_PER_DIM && x > 0 && y > 0);
            let covered = u64::from(x) * u64::from(y) * map.span();
            assert!(covered >= vstart, "dispatch {di}: workgroups miss items");
            assert!(
                covered < vstart + map.span() * u64::from(y).max(1),
                "dispatch {di}: too many workgroups"
            );
        }
        assert_eq!(
            d.table_offset % l.lim.align,
            0,
            "dispatch {di}: table offset"
        );
        assert!(d.table_offset + d.rows.len() as u64 * ROW_BYTES <= plan.table_bytes());
        // WebGPU: no writable binding overlaps another binding of the same buffer.
        let bound: Vec<&(u32, Window)> = d.slots.iter().flatten().collect();
        for (i, a) in bound.iter().enumerate() {
            for c in &bound[i + 1..] {
                assert!(
                    !(a.0 == c.0 && a.1.overlaps(&c.1)),
                    "dispatch {di}: windows {a:?} and {c:?} alias"
                );
            }
        }
        let highest = d
            .slots
            .iter()
            .rposition(Option::is_some)
            .map_or(1, |i| i + 1);
        assert!(d.tier >= highest && plan.tiers().contains(&d.tier));
        assert!(plan.tiers().iter().all(|&c| c >= d.tier || c < highest));
    }
    assert_eq!(claimed.len(), rows, "rows that no tensor owns");
    // Tables of different dispatches do not overlap.
    let mut spans: Vec<(u64, u64)> = plan
        .dispatches()
        .iter()
        .map(|d| {
            (
                d.table_offset,
                d.table_offset + d.rows.len() as u64 * ROW_BYTES,
            )
        })
        .collect();
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    runs
}

/// Distinct windows per shadow buffer that rows use.
fn live_windows(plan: &Plan<u32>) -> HashMap<usize, HashSet<(u32, Window)>> {
    let mut out: HashMap<usize, HashSet<(u32, Window)>> = HashMap::new();
    for d in plan.dispatches() {
        for row in &d.rows {
            if let Some(k) = d.slots[row.slot as usize] {
                out.entry(d.shadow_buffer).or_default().insert(k);
            }
        }
    }
    out
}

fn per_shadow_buffer(plan: &Plan<u32>) -> HashMap<usize, usize> {
    let mut out = HashMap::new();
    for d in plan.dispatches() {
        *out.entry(d.shadow_buffer).or_default() += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_fresh_plan_obeys_every_rule(l in layout()) {
        let plan = Plan::new(l.lim, l.slots, initial(&l));
        check(&plan, &l);
        // As few dispatches as the slots allow, at most one per window.
        let live = live_windows(&plan);
        for (sb, count) in per_shadow_buffer(&plan) {
            let windows = live[&sb].len();
            prop_assert!(count >= windows.div_ceil(l.slots), "too few dispatches?");
            prop_assert!(count <= windows, "{count} dispatches for {windows} windows");
        }
    }

    #[test]
    fn rebinds_keep_the_rules_and_cover_what_a_fresh_plan_covers(l in layout()) {
        let mut plan = Plan::new(l.lim, l.slots, initial(&l));
        let _ = plan.take_dirty();
        // The chunk table as the GPU side keeps it: rows uploaded when dirty.
        let mut uploaded: Vec<Vec<SegRow>> =
            plan.dispatches().iter().map(|d| d.rows.clone()).collect();
        for &(t, b, o) in &l.rebinds {
            let dtype = l.tensors[t].3;
            let before = plan.dispatches().to_vec();
            match plan.rebind(t, binding(&l, b, o, dtype)) {
                Change::Replanned => {
                    uploaded = plan.dispatches().iter().map(|d| d.rows.clone()).collect();
                    let _ = plan.take_dirty();
                }
                Change::Patched(touched) => {
                    // Only the touched dispatches bind other windows; the table layout stays.
                    prop_assert_eq!(before.len(), plan.dispatches().len());
                    for (i, (a, c)) in before.iter().zip(plan.dispatches()).enumerate() {
                        prop_assert_eq!(a.table_offset, c.table_offset);
                        prop_assert_eq!(a.rows.len(), c.rows.len());
                        if !touched.contains(&i) {
                            prop_assert_eq!(&a.slots, &c.slots, "dispatch {} rebound silently", i);
                        }
                    }
                    for (di, lo, hi) in plan.take_dirty() {
                        uploaded[di][lo..hi].copy_from_slice(&plan.dispatches()[di].rows[lo..hi]);
                    }
                }
            }
            // What the GPU reads is what the plan says.
            for (d, up) in plan.dispatches().iter().zip(&uploaded) {
                prop_assert_eq!(&d.rows, up, "a changed row was not marked dirty");
            }
            let runs = check(&plan, &l);
            let tensors: Vec<_> = (0..l.tensors.len())
                .map(|i| {
                    let (p, b) = plan.tensor(i);
                    (p.to_vec(), b.clone())
                })
                .collect();
            let fresh = Plan::new(l.lim, l.slots, tensors);
            prop_assert_eq!(runs, check(&fresh, &l));
            // Never more dispatches than a fresh plan needs, or than the live windows need.
            let live = live_windows(&plan);
            let fresh_counts = per_shadow_buffer(&fresh);
            for (sb, count) in per_shadow_buffer(&plan) {
                let need = live[&sb].len().div_ceil(l.slots);
                let fresh = fresh_counts.get(&sb).copied().unwrap_or(0);
                prop_assert!(
                    count <= need.max(fresh),
                    "{} dispatches on shadow buffer {}: fresh {}, live windows need {}",
                    count, sb, fresh, need
                );
            }
        }
    }
}
