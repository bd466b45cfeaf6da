//! The work of a step, planned with no GPU: which dispatches run, which parameter windows each
//! binds in which slot, and the chunk-table rows the shader reads.
//!
//! What is tracked goes in as one [`ParamBinding`] per tensor (where its parameters are) and
//! its shadow [`Piece`]s (where its shadow is, from [`place_shadows`]); the device limits as
//! [`PlanLimits`]. Out come [`DispatchPlan`]s: a shadow buffer, `slots` parameter windows
//! (some free), the rows ([`SegRow`], mirrored by `struct Seg` in the shader) and the
//! workgroup count. [`Plan::rebind`] moves one tensor's parameters and says what changed.
//!
//! The planner is generic over what names a buffer (`B`): the GPU side plans over
//! `wgpu::Buffer` handles, the tests over plain numbers. It holds the rules WebGPU imposes and
//! wgpu's native backends do not check, so that unit tests find what only a browser would:
//! - no two windows of one buffer that overlap are bound in one dispatch (the swap and copy
//!   passes bind the parameters read-write, and a writable binding may not overlap another);
//! - every dispatch has `slots` slots (free ones are `None`, kept for later rebinds); its bind
//!   group binds the first [`DispatchPlan::tier`] of them, which holds every bound one, and
//!   runs the pipelines made for that many parameter bindings.
//!
//! Rebinding is O(the moved tensor's segments): its rows are rewritten in place and marked
//! dirty; its new window takes a slot the dispatch already binds, else a free one. Only when
//! no slot is free, the window would overlap another in the dispatch, or the tensor's segments
//! change shape, is everything planned again; and when windows were freed so that the live
//! ones would fit in fewer dispatches.

pub(crate) mod layout;
#[cfg(test)]
mod proptests;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

pub(crate) use layout::{align_up, place_shadows, Piece, PlanLimits, Window};
use layout::{plan_tensor, SegPlan};

use crate::tensors::ParamDtype;

/// Invocations per workgroup (`WG` in the shader, generated from this).
pub(crate) const WORKGROUP: u64 = 256;

/// How a dispatch's items are spread over its invocations (`PER_THREAD` and `LANES` in the
/// shader, generated from this). A workgroup takes the `WORKGROUP * per_thread` consecutive
/// items from `workgroup number * span`; within it, each run of `lanes` neighbouring
/// invocations takes a block of `lanes * per_thread` consecutive items, item `j` of lane `l`
/// being `block + j * lanes + l`.
///
/// GPUs want neighbouring invocations on neighbouring items at every step (`lanes` =
/// [`WORKGROUP`]: the workgroup sweeps its span `per_thread` times, each sweep one coalesced
/// run), and enough workgroups to fill their cores. Software devices (lavapipe, SwiftShader)
/// run a workgroup on one core, a few invocations at a time as SIMD lanes, each run paying
/// the shader's prologue (finding the chunk-table row); they want many items per invocation
/// and each group of lanes on one contiguous block, which the CPU's prefetchers follow.
/// Measured on lavapipe at 2^24 f32: 4 items per invocation in 256-item sweeps reached 50-60%
/// of the same-harness `vec4` kernel, 32 items in 4-lane blocks about 90%.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ItemMap {
    /// Items per invocation.
    pub per_thread: u64,
    /// Invocations sharing one block of items (divides [`WORKGROUP`]).
    pub lanes: u64,
}

impl ItemMap {
    /// For GPUs: 4 items per invocation, the workgroup sweeping its span in coalesced runs.
    pub const GPU: ItemMap = ItemMap {
        per_thread: 4,
        lanes: WORKGROUP,
    };
    /// For software devices: 32 items per invocation, 4 lanes per contiguous block.
    pub const SOFTWARE: ItemMap = ItemMap {
        per_thread: 32,
        lanes: 4,
    };

    /// Items per workgroup.
    pub fn span(self) -> u64 {
        WORKGROUP * self.per_thread
    }

    /// Workgroups as (x, y) for `items` items: 2-D once one dimension's 65,535 is not
    /// enough.
    pub fn workgroups(self, items: u64) -> (u32, u32) {
        let groups = items.div_ceil(self.span()).max(1);
        let x = groups.min(MAX_GROUPS_PER_DIM);
        let y = groups.div_ceil(x);
        // A dispatch covers one shadow buffer (at most 4 GiB): y stays far below 65,535.
        (x as u32, y as u32)
    }

    /// The item invocation `lane` of workgroup `group` takes at its step `j`: what the
    /// shader's `item_index` computes, for the tests.
    #[cfg(test)]
    pub fn item(self, group: u64, lane: u64, j: u64) -> u64 {
        group * self.span()
            + (lane / self.lanes) * self.lanes * self.per_thread
            + j * self.lanes
            + lane % self.lanes
    }
}

/// The most workgroups in one dimension of a dispatch (WebGPU's default limit).
pub(crate) const MAX_GROUPS_PER_DIM: u64 = 65_535;
/// Bytes of one chunk-table row.
pub(crate) const ROW_BYTES: u64 = std::mem::size_of::<SegRow>() as u64;

/// Where a tracked tensor's parameters are: a byte offset (a multiple of 4) into `buffer`,
/// which is `buffer_size` bytes long, as `dtype`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParamBinding<B> {
    pub buffer: B,
    pub buffer_size: u64,
    pub offset: u64,
    pub dtype: ParamDtype,
    /// The shadows follow the parameters exactly on every update (a tensor selected to be
    /// copied, not averaged: running statistics). Set when planned; a rebind keeps it.
    pub follow: bool,
}

/// One row of the chunk table, as the shader reads it (`struct Seg` in `shaders/ema.wgsl`;
/// the shader contract's tests check that the two agree field by field).
///
/// `count` elements of one tensor: their parameters from element `param` of parameter slot
/// `slot` (in units of `dtype`), their shadows from element `shadow` of the dispatch's shadow
/// buffer; `vstart` is the row's first item, counted across the dispatch's rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct SegRow {
    pub vstart: u32,
    pub count: u32,
    pub param: u32,
    pub shadow: u32,
    pub slot: u32,
    /// [`dtype_code`] of the parameters.
    pub dtype: u32,
    /// Bit 0: the shadows follow the parameters ([`ParamBinding::follow`]).
    pub flags: u32,
    pub pad1: u32,
}

/// How many dtype codes [`dtype_code`] gives (0 to this less one).
pub(crate) const DTYPE_CODES: u32 = 3;

/// The shader's code for a parameter dtype (`Seg.dtype`).
pub(crate) fn dtype_code(dtype: ParamDtype) -> u32 {
    match dtype {
        ParamDtype::F32 => 0,
        ParamDtype::F16 => 1,
        ParamDtype::BF16 => 2,
    }
}

impl SegRow {
    fn new(vstart: u64, seg: &SegPlan, slot: usize) -> Self {
        // Every value fits: offsets are below one binding (at most 4 GiB) in elements, and
        // `vstart` counts items of one shadow buffer.
        Self {
            vstart: vstart as u32,
            count: seg.count as u32,
            param: seg.param as u32,
            shadow: seg.shadow as u32,
            slot: slot as u32,
            dtype: dtype_code(seg.dtype),
            flags: u32::from(seg.follow),
            pad1: 0,
        }
    }
}

/// A parameter slot of a dispatch: a window of a buffer, or free.
pub(crate) type Slot<B> = Option<(B, Window)>;

/// One dispatch of a step.
#[derive(Clone, Debug)]
pub(crate) struct DispatchPlan<B> {
    /// The shadow buffer every row of it reads and writes.
    pub shadow_buffer: usize,
    /// Exactly [`Plan::slots`] parameter slots; `SegRow::slot` indexes them.
    pub slots: Vec<Slot<B>>,
    /// Rows using each slot (a bound slot no row uses may take another window).
    users: Vec<u32>,
    pub rows: Vec<SegRow>,
    /// Byte offset of its rows in the chunk table (a multiple of the storage alignment).
    pub table_offset: u64,
    /// Rows changed since they were last taken ([`Plan::take_dirty`]).
    dirty: Option<(usize, usize)>,
    /// Items of its rows (see [`ItemMap::workgroups`]).
    pub items: u64,
    /// Parameter bindings of the pipelines it runs: the smallest tier holding its highest
    /// bound slot.
    pub tier: usize,
}

impl<B> DispatchPlan<B> {
    /// True when every row's first parameter is element `4k` of its window (16 bytes for f32,
    /// 8 for f16/bf16) and the window holds the 16 bytes around its last item whole: the
    /// dispatch may load each item's parameters from one `vec4` (the shader's
    /// `update_aligned`; a `vec4` array's length is the window's size in whole 16 bytes, so a
    /// last item past it would read what out-of-bounds reads give, not the tensor's last
    /// elements). Windows start at the storage alignment, itself a multiple of 16.
    pub fn aligned(&self) -> bool {
        self.rows.iter().all(|r| {
            let window = self.slots.get(r.slot as usize).and_then(Option::as_ref);
            let size = if r.dtype == dtype_code(ParamDtype::F32) {
                4
            } else {
                2
            };
            let items_end = ((u64::from(r.param) + u64::from(r.count).next_multiple_of(4)) * size)
                .next_multiple_of(16);
            r.param.is_multiple_of(4) && window.is_some_and(|(_, w)| items_end <= w.size)
        })
    }
}

/// What a [`Plan::rebind`] changed, for the GPU side to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Everything was planned again: every dispatch, its slots and the table layout.
    Replanned,
    /// Rows changed in place (see [`Plan::take_dirty`]); these dispatches bind another set
    /// of windows.
    Patched(Vec<usize>),
}

/// The plan of every dispatch of a step, and the tensors it was made from.
#[derive(Clone, Debug)]
pub(crate) struct Plan<B> {
    lim: PlanLimits,
    slots: usize,
    tiers: Vec<usize>,
    /// Per tensor: its shadow pieces and its parameters' binding.
    tensors: Vec<(Vec<Piece>, ParamBinding<B>)>,
    dispatches: Vec<DispatchPlan<B>>,
    /// `rows[t]`: (dispatch, row) of each segment of tensor `t`, in order.
    rows: Vec<Vec<(usize, usize)>>,
    /// A window lost its last row since the last plan or check.
    freed: bool,
    table_bytes: u64,
}

/// The pipeline slot counts made for dispatches of at most `slots` parameter bindings: a
/// dispatch reading few buffers runs a shader whose `switch` has few cases (a software device
/// runs every case of a divergent `switch` under a mask: 29 cases cost it 20 times one).
pub(crate) fn tiers(slots: usize) -> Vec<usize> {
    let slots = slots.max(1);
    let mut out: Vec<usize> = [1, 4, 16, 64].into_iter().filter(|&c| c < slots).collect();
    out.push(slots);
    out
}

impl<B: Clone + Eq + Hash> Plan<B> {
    /// Plans the dispatches of `tensors` (shadow pieces, parameter binding) with at most
    /// `slots` parameter windows per dispatch.
    pub fn new(lim: PlanLimits, slots: usize, tensors: Vec<(Vec<Piece>, ParamBinding<B>)>) -> Self {
        let slots = slots.max(1);
        let mut plan = Self {
            lim,
            slots,
            tiers: tiers(slots),
            tensors,
            dispatches: Vec::new(),
            rows: Vec::new(),
            freed: false,
            table_bytes: ROW_BYTES,
        };
        plan.replan();
        plan
    }

    /// The dispatches, in the order a step records them.
    pub fn dispatches(&self) -> &[DispatchPlan<B>] {
        &self.dispatches
    }

    /// Parameter windows per dispatch.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The slot counts pipelines are made for ([`tiers`]).
    pub fn tiers(&self) -> &[usize] {
        &self.tiers
    }

    /// Bytes the chunk table needs (at least one row).
    pub fn table_bytes(&self) -> u64 {
        self.table_bytes
    }

    /// Tensor `t`'s shadow pieces and parameter binding.
    pub fn tensor(&self, t: usize) -> (&[Piece], &ParamBinding<B>) {
        let (pieces, binding) = &self.tensors[t];
        (pieces, binding)
    }

    /// The (dispatch, row) of each segment of tensor `t`, in order.
    #[cfg(test)]
    pub fn rows_of(&self, t: usize) -> &[(usize, usize)] {
        &self.rows[t]
    }

    /// The tier of pipelines for a dispatch whose highest bound slot is `used - 1`.
    pub fn tier_of(&self, used: usize) -> usize {
        self.tiers
            .iter()
            .copied()
            .find(|&c| c >= used)
            .unwrap_or(self.slots)
    }

    fn tier_of_slots(&self, slots: &[Slot<B>]) -> usize {
        self.tier_of(slots.iter().rposition(Option::is_some).map_or(1, |i| i + 1))
    }

    /// Takes the rows changed since the last call: (dispatch, first row, end row). After a
    /// new plan, every row of every dispatch.
    pub fn take_dirty(&mut self) -> Vec<(usize, usize, usize)> {
        self.dispatches
            .iter_mut()
            .enumerate()
            .filter_map(|(i, d)| d.dirty.take().map(|(lo, hi)| (i, lo, hi)))
            .collect()
    }

    /// Plans every dispatch from scratch: per shadow buffer, its distinct parameter windows
    /// in order of first use, grouped first-fit into dispatches of `slots` windows, never two
    /// overlapping windows of one buffer in one dispatch.
    fn replan(&mut self) {
        // Segments, each with the number of its parameter buffer (in order of first use).
        let mut ids: HashMap<&B, usize> = HashMap::new();
        let mut buffers: Vec<&B> = Vec::new();
        // (tensor, its segment number, buffer number, segment)
        let mut segs: Vec<(usize, usize, usize, SegPlan)> = Vec::new();
        self.rows = Vec::with_capacity(self.tensors.len());
        for (t, (pieces, b)) in self.tensors.iter().enumerate() {
            let id = *ids.entry(&b.buffer).or_insert_with(|| {
                buffers.push(&b.buffer);
                buffers.len() - 1
            });
            let mut mine = plan_tensor(pieces, b.offset, b.dtype, b.buffer_size, &self.lim);
            mine.iter_mut().for_each(|s| s.follow = b.follow);
            self.rows.push(vec![(0, 0); mine.len()]);
            segs.extend(mine.into_iter().enumerate().map(|(k, s)| (t, k, id, s)));
        }
        let mut shadow_buffers: Vec<usize> = segs.iter().map(|(.., s)| s.shadow_buffer).collect();
        shadow_buffers.sort_unstable();
        shadow_buffers.dedup();

        struct Group {
            shadow_buffer: usize,
            slots: Vec<(usize, Window)>,
            segments: Vec<usize>,
        }
        let mut groups: Vec<Group> = Vec::new();
        for sb in shadow_buffers {
            let first = groups.len();
            for (i, (_, _, id, s)) in segs.iter().enumerate() {
                if s.shadow_buffer != sb {
                    continue;
                }
                let key = (*id, s.window);
                let mine = &mut groups[first..];
                let g = match mine.iter().position(|g| g.slots.contains(&key)) {
                    Some(g) => first + g,
                    None => {
                        let fits = |g: &Group| {
                            g.slots.len() < self.slots
                                && !g
                                    .slots
                                    .iter()
                                    .any(|(b, w)| *b == key.0 && w.overlaps(&key.1))
                        };
                        let g = match mine.iter().position(fits) {
                            Some(g) => first + g,
                            None => {
                                groups.push(Group {
                                    shadow_buffer: sb,
                                    slots: Vec::new(),
                                    segments: Vec::new(),
                                });
                                groups.len() - 1
                            }
                        };
                        groups[g].slots.push(key);
                        g
                    }
                };
                groups[g].segments.push(i);
            }
        }

        self.freed = false;
        let mut at = 0u64;
        let mut dispatches = Vec::with_capacity(groups.len());
        for (gi, g) in groups.iter().enumerate() {
            let mut slots: Vec<Slot<B>> = g
                .slots
                .iter()
                .map(|&(id, w)| Some((buffers[id].clone(), w)))
                .collect();
            // Every dispatch has all its slots; free ones take the windows of later rebinds.
            slots.resize(self.slots, None);
            let mut users = vec![0u32; self.slots];
            let mut rows = Vec::with_capacity(g.segments.len());
            let mut vstart = 0u64;
            for &si in &g.segments {
                let (t, k, id, seg) = &segs[si];
                let slot = g
                    .slots
                    .iter()
                    .position(|&k| k == (*id, seg.window))
                    .unwrap_or_default();
                users[slot] += 1;
                // A tensor's rows are listed in the order of its segments (first-fit may put
                // a later segment in an earlier dispatch): `patch` walks them side by side.
                self.rows[*t][*k] = (gi, rows.len());
                rows.push(SegRow::new(vstart, seg, slot));
                vstart += seg.items();
            }
            let table_offset = at;
            at = align_up(at + rows.len() as u64 * ROW_BYTES, self.lim.align);
            let tier = self.tier_of_slots(&slots);
            dispatches.push(DispatchPlan {
                shadow_buffer: g.shadow_buffer,
                slots,
                users,
                dirty: Some((0, rows.len())),
                rows,
                table_offset,
                items: vstart,
                tier,
            });
        }
        self.dispatches = dispatches;
        self.table_bytes = at.max(ROW_BYTES);
    }

    /// Points tensor `t`'s parameters at `binding` and says what changed. Rows are patched
    /// in place where they can be; otherwise, or when windows were freed so that the live ones
    /// would fit in fewer dispatches, everything is planned again.
    pub fn rebind(&mut self, t: usize, mut binding: ParamBinding<B>) -> Change {
        binding.follow = self.tensors[t].1.follow;
        self.tensors[t].1 = binding;
        match self.patch(t) {
            Some(touched) if !self.take_fragmented() => Change::Patched(touched),
            _ => {
                self.replan();
                Change::Replanned
            }
        }
    }

    /// Rewrites tensor `t`'s rows for its current binding. `None` when that needs a new plan
    /// (the rows may then be half patched: the caller plans again).
    fn patch(&mut self, t: usize) -> Option<Vec<usize>> {
        let (pieces, b) = &self.tensors[t];
        let mut segs = plan_tensor(pieces, b.offset, b.dtype, b.buffer_size, &self.lim);
        segs.iter_mut().for_each(|s| s.follow = b.follow);
        let rows = self.rows.get(t)?;
        if rows.len() != segs.len() {
            return None;
        }
        let mut touched = Vec::new();
        // Slots the rows left, with their windows: a window is freed when no row uses it once
        // all have moved, or another window took its slot.
        let mut left = Vec::new();
        for (&(di, ri), seg) in rows.iter().zip(&segs) {
            let d = &mut self.dispatches[di];
            let row = d.rows[ri];
            if u64::from(row.count) != seg.count || u64::from(row.shadow) != seg.shadow {
                return None;
            }
            // The row leaves its slot first, so that a window only it used can be reused.
            let old = row.slot as usize;
            d.users[old] = d.users[old].saturating_sub(1);
            left.push((di, old, d.slots[old].clone()));
            let key = Some((b.buffer.clone(), seg.window));
            let slot = match d.slots.iter().position(|s| *s == key) {
                Some(s) => s,
                None => {
                    // A slot no row uses any more; none left needs a new plan.
                    let s = d.users.iter().position(|&u| u == 0)?;
                    // Bound slots stay in the bind group even when no row uses them: a window
                    // overlapping another of the same buffer would be a writable alias.
                    let overlaps = d.slots.iter().enumerate().any(|(i, other)| {
                        i != s
                            && other
                                .as_ref()
                                .is_some_and(|(buf, w)| *buf == b.buffer && w.overlaps(&seg.window))
                    });
                    if overlaps {
                        return None;
                    }
                    d.slots[s] = key;
                    if !touched.contains(&di) {
                        touched.push(di);
                    }
                    s
                }
            };
            d.users[slot] += 1;
            let new = SegRow::new(u64::from(row.vstart), seg, slot);
            if new != row {
                d.rows[ri] = new;
                d.dirty = Some(match d.dirty {
                    Some((lo, hi)) => (lo.min(ri), hi.max(ri + 1)),
                    None => (ri, ri + 1),
                });
            }
        }
        self.freed |= left.iter().any(|(di, slot, key)| {
            let d = &self.dispatches[*di];
            d.users[*slot] == 0 || d.slots[*slot] != *key
        });
        for &di in &touched {
            let tier = self.tier_of_slots(&self.dispatches[di].slots);
            self.dispatches[di].tier = tier;
        }
        Some(touched)
    }

    /// True when the parameter windows in use would fit in fewer dispatches than there are.
    /// Checked only after a window lost its last row; then costs O(dispatches x slots),
    /// nothing per tensor.
    fn take_fragmented(&mut self) -> bool {
        if !std::mem::take(&mut self.freed) || self.dispatches.len() < 2 {
            return false;
        }
        // Per shadow buffer: its dispatches, and the distinct windows rows still use.
        let mut seen: HashMap<usize, (usize, HashSet<&Slot<B>>)> = HashMap::new();
        for d in &self.dispatches {
            let entry = seen.entry(d.shadow_buffer).or_default();
            entry.0 += 1;
            let live = d.slots.iter().zip(&d.users).filter(|(_, &u)| u > 0);
            entry.1.extend(live.map(|(k, _)| k));
        }
        seen.values()
            .any(|(count, keys)| keys.len().div_ceil(self.slots).max(1) < *count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: PlanLimits = PlanLimits {
        align: 256,
        max_binding: 128 << 20,
        max_buffer: 2 << 30,
    };

    fn binding(buffer: u32, offset: u64) -> ParamBinding<u32> {
        ParamBinding {
            buffer,
            buffer_size: 4096,
            offset,
            dtype: ParamDtype::F32,
            follow: false,
        }
    }

    fn tensor(
        buffer: u32,
        offset: u64,
        len: u64,
        shadow_buffer: usize,
    ) -> (Vec<Piece>, ParamBinding<u32>) {
        (
            vec![Piece {
                buffer: shadow_buffer,
                offset: 0,
                len,
            }],
            ParamBinding {
                buffer,
                buffer_size: 4096,
                offset,
                dtype: ParamDtype::F32,
                follow: false,
            },
        )
    }

    #[test]
    fn the_vec4_path_needs_f32_rows_on_16_bytes_with_their_last_item_inside() {
        let one = |offset: u64, len: u64, buffer_size: u64, dtype: ParamDtype| {
            let (pieces, mut b) = tensor(0, offset, len, 0);
            b.buffer_size = buffer_size;
            b.dtype = dtype;
            Plan::new(LIM, 1, vec![(pieces, b)]).dispatches()[0].aligned()
        };
        assert!(one(0, 40, 160, ParamDtype::F32));
        assert!(
            one(16, 37, 4096, ParamDtype::F32),
            "the last item's padding inside the buffer"
        );
        assert!(!one(4, 40, 4096, ParamDtype::F32), "not on 16 bytes");
        assert!(
            !one(0, 37, 148, ParamDtype::F32),
            "the last item past the buffer's end"
        );
        assert!(one(0, 37, 160, ParamDtype::F32));
        // 16-bit: 8-byte boundaries; the last item's whole vec4 inside.
        assert!(one(0, 40, 80, ParamDtype::BF16));
        assert!(one(8, 36, 80, ParamDtype::F16));
        assert!(
            !one(4, 36, 4096, ParamDtype::BF16),
            "element 2 is not element 4k"
        );
        assert!(
            !one(0, 37, 76, ParamDtype::BF16),
            "the last item's vec4 ends at byte 80"
        );
        // One unaligned row makes the whole dispatch take the general path.
        let plan = Plan::new(LIM, 1, vec![tensor(0, 0, 8, 0), tensor(0, 36, 4, 0)]);
        assert!(!plan.dispatches()[0].aligned());
    }

    #[test]
    fn dispatches_hold_at_most_slots_windows_per_shadow_buffer() {
        let plan = Plan::new(
            LIM,
            2,
            vec![
                tensor(0, 0, 4, 0),
                tensor(1, 0, 4, 0),
                tensor(0, 64, 4, 0),
                tensor(2, 0, 4, 0),
                tensor(3, 0, 4, 1),
                tensor(1, 64, 4, 0),
            ],
        );
        let d = plan.dispatches();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[0].slots,
            vec![
                Some((
                    0,
                    Window {
                        offset: 0,
                        size: 4096
                    }
                )),
                Some((
                    1,
                    Window {
                        offset: 0,
                        size: 4096
                    }
                ))
            ]
        );
        assert_eq!(d[0].rows.len(), 4);
        assert_eq!(d[1].rows.len(), 1);
        assert_eq!((d[2].shadow_buffer, d[2].rows.len()), (1, 1));
        assert_eq!(plan.rows_of(5), &[(0, 3)]);
        assert_eq!(d[0].rows[3].slot, 1);
        assert_eq!(d[0].rows[3].vstart, 3);
    }

    #[test]
    fn overlapping_windows_of_one_buffer_never_share_a_dispatch() {
        // A 300-byte binding limit: a 1000-byte buffer is read through windows every 144
        // bytes (half a binding, aligned to 16), each 288 bytes long.
        let lim = PlanLimits::new(16, 300, 1 << 20);
        let t = |offset| {
            (
                vec![Piece {
                    buffer: 0,
                    offset: 0,
                    len: 4,
                }],
                ParamBinding {
                    buffer: 7u32,
                    buffer_size: 1000,
                    offset,
                    dtype: ParamDtype::F32,
                    follow: false,
                },
            )
        };
        let plan = Plan::new(lim, 8, vec![t(0), t(144), t(288), t(4)]);
        let d = plan.dispatches();
        assert_eq!(d.len(), 2);
        let windows = |d: &DispatchPlan<u32>| -> Vec<u64> {
            d.slots.iter().flatten().map(|(_, w)| w.offset).collect()
        };
        assert_eq!(windows(&d[0]), vec![0, 288]);
        assert_eq!(windows(&d[1]), vec![144]);
        assert_eq!(d[0].rows.len(), 3);
    }

    #[test]
    fn a_rebind_into_a_bound_window_patches_one_row() {
        let mut plan = Plan::new(LIM, 4, vec![tensor(0, 0, 8, 0), tensor(1, 0, 8, 0)]);
        let _ = plan.take_dirty();
        let change = plan.rebind(
            1,
            ParamBinding {
                buffer: 0,
                buffer_size: 4096,
                offset: 64,
                dtype: ParamDtype::F32,
                follow: false,
            },
        );
        assert_eq!(change, Change::Patched(vec![]));
        assert_eq!(plan.take_dirty(), vec![(0, 1, 2)]);
        assert_eq!(plan.dispatches()[0].rows[1].slot, 0);
        assert_eq!(plan.dispatches()[0].rows[1].param, 16);
    }

    #[test]
    fn a_rebind_into_a_free_slot_patches_and_says_which_dispatch() {
        // Two tensors in buffer 0; tensor 1 moves to buffer 1 (same size): slot 1 is free once
        // it leaves it, and nothing else of buffer 1 is bound, so no new plan is needed.
        let mut plan = Plan::new(LIM, 4, vec![tensor(0, 0, 8, 0), tensor(0, 64, 8, 0)]);
        let _ = plan.take_dirty();
        assert_eq!(plan.rebind(1, binding(1, 64)), Change::Patched(vec![0]));
        let d = &plan.dispatches()[0];
        assert_eq!(
            d.slots[1],
            Some((
                1,
                Window {
                    offset: 0,
                    size: 4096
                }
            ))
        );
        assert_eq!((d.rows[1].slot, d.rows[1].param), (1, 16));
        assert_eq!(plan.take_dirty(), vec![(0, 1, 2)]);
        // Another tensor of buffer 1 at a window of its own joins without a new plan either.
        assert_eq!(plan.rebind(0, binding(1, 0)), Change::Patched(vec![]));
    }

    #[test]
    fn a_freed_window_lets_dispatches_merge_and_only_then() {
        // One window per dispatch: A (buffer 0), B (buffer 1), C (buffer 2) take three.
        let mut plan = Plan::new(
            LIM,
            1,
            vec![tensor(0, 0, 8, 0), tensor(1, 0, 8, 0), tensor(2, 0, 8, 0)],
        );
        assert_eq!(plan.dispatches().len(), 3);
        // B moves to buffer 3: its window is replaced, three live windows still need three.
        assert_eq!(plan.rebind(1, binding(3, 0)), Change::Patched(vec![1]));
        assert_eq!(plan.dispatches().len(), 3);
        // B moves into A's buffer: two live windows fit in two dispatches, so plan again.
        assert_eq!(plan.rebind(1, binding(0, 64)), Change::Replanned);
        assert_eq!(plan.dispatches().len(), 2);
        // With two dispatches, C moving into A's buffer frees the last other window: one.
        assert_eq!(plan.rebind(2, binding(0, 128)), Change::Replanned);
        assert_eq!(plan.dispatches().len(), 1);
    }

    #[test]
    fn rows_changed_by_several_rebinds_are_all_dirty() {
        // Two tensors of buffer 0 (rows 0 and 1 of one dispatch) move within it, one after the
        // other, before the rows are uploaded: both rows must be uploaded.
        let mut plan = Plan::new(LIM, 4, vec![tensor(0, 0, 8, 0), tensor(0, 64, 8, 0)]);
        let _ = plan.take_dirty();
        assert_eq!(plan.rebind(0, binding(0, 128)), Change::Patched(vec![]));
        assert_eq!(plan.rebind(1, binding(0, 256)), Change::Patched(vec![]));
        assert_eq!(plan.take_dirty(), vec![(0, 0, 2)]);
        let rows = &plan.dispatches()[0].rows;
        assert_eq!((rows[0].param, rows[1].param), (32, 64));
    }

    #[test]
    fn a_rebind_next_to_an_overlapping_window_plans_again() {
        // Windows every 144 bytes of a 1000-byte buffer (288-byte bindings): a tensor moving
        // into window 144 of the buffer whose window 0 the dispatch binds would alias it.
        let lim = PlanLimits::new(16, 300, 1 << 20);
        let t = |offset| ParamBinding {
            buffer: 7u32,
            buffer_size: 1000,
            offset,
            dtype: ParamDtype::F32,
            follow: false,
        };
        let piece = |at| {
            vec![Piece {
                buffer: 0,
                offset: at,
                len: 4,
            }]
        };
        let mut plan = Plan::new(lim, 8, vec![(piece(0), t(0)), (piece(16), t(288))]);
        assert_eq!(plan.dispatches().len(), 1);
        assert_eq!(plan.rebind(1, t(160)), Change::Replanned);
        assert_eq!(plan.dispatches().len(), 2);
    }

    #[test]
    fn dtype_codes_are_below_their_count() {
        for d in [ParamDtype::F32, ParamDtype::F16, ParamDtype::BF16] {
            assert!(dtype_code(d) < DTYPE_CODES, "{d:?}");
        }
    }

    /// Each map gives every item of a workgroup's span to exactly one (lane, step), inside
    /// the span; the GPU's lanes are neighbours at every step, the software map's blocks are
    /// contiguous per run of lanes.
    #[test]
    fn item_maps_cover_each_span_once() {
        for map in [ItemMap::GPU, ItemMap::SOFTWARE] {
            assert_eq!(WORKGROUP % map.lanes, 0);
            for group in [0, 3] {
                let mut seen = vec![0u32; map.span() as usize];
                for lane in 0..WORKGROUP {
                    for j in 0..map.per_thread {
                        let v = map.item(group, lane, j);
                        let local = v
                            .checked_sub(group * map.span())
                            .filter(|&x| x < map.span())
                            .expect("item outside its workgroup's span");
                        seen[local as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{map:?}");
            }
        }
        // Neighbouring lanes at one step: neighbouring items (GPU); one lane's steps: items
        // `lanes` apart inside one block (software).
        assert_eq!(ItemMap::GPU.item(0, 5, 1), ItemMap::GPU.item(0, 4, 1) + 1);
        assert_eq!(ItemMap::GPU.item(0, 0, 1), WORKGROUP);
        assert_eq!(ItemMap::SOFTWARE.item(0, 0, 1), 4);
        assert_eq!(ItemMap::SOFTWARE.item(0, 4, 0), 4 * 32);
    }

    #[test]
    fn a_tensor_split_across_dispatches_out_of_order_still_patches() {
        // Binding 192 bytes: shadows split into pieces of 48 elements, and first-fit puts the
        // last tensor's second segment into an earlier dispatch than its first.
        let lim = PlanLimits::new(32, 192, 1 << 30);
        let numels = [153, 177, 335, 89];
        let offsets = [0, 0, 320, 1572];
        let (pieces, _) = place_shadows(&numels, &lim).unwrap();
        let binding = |offset| ParamBinding {
            buffer: 0u32,
            buffer_size: 2864,
            offset,
            dtype: ParamDtype::F32,
            follow: false,
        };
        let tensors = pieces.into_iter().zip(offsets.map(binding)).collect();
        let mut plan = Plan::new(lim, 2, tensors);
        let rows = plan.rows_of(3).to_vec();
        assert!(rows.windows(2).any(|w| w[1].0 < w[0].0), "{rows:?}");
        let _ = plan.take_dirty();
        assert_eq!(plan.rebind(3, binding(1572)), Change::Patched(vec![]));
        assert_eq!(plan.take_dirty(), vec![]);
    }

    #[test]
    fn tiers_cover_every_slot_count() {
        assert_eq!(tiers(1), vec![1]);
        assert_eq!(tiers(29), vec![1, 4, 16, 29]);
        let plan = Plan::<u32>::new(LIM, 29, Vec::new());
        assert_eq!(
            (plan.tier_of(1), plan.tier_of(5), plan.tier_of(29)),
            (1, 16, 29)
        );
        assert!(plan.dispatches().is_empty());
        assert_eq!(plan.table_bytes(), ROW_BYTES);
    }

    #[test]
    fn workgroups_go_2d_past_65535() {
        assert_eq!(ItemMap::GPU.workgroups(1), (1, 1));
        assert_eq!(ItemMap::GPU.workgroups(65_535 * 1024 + 1), (65_535, 2));
        assert_eq!(ItemMap::SOFTWARE.workgroups(65_535 * 8192), (65_535, 1));
        assert_eq!(ItemMap::SOFTWARE.workgroups(65_535 * 8192 + 1), (65_535, 2));
    }
}
