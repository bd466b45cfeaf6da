//! The dispatches of a step: chunk-table rows, parameter slots and bind groups, built when
//! tensors are tracked and patched when they are rebound.
//!
//! A rebind rewrites only the moved tensor's rows (O(changed tensors) host work, uploaded in
//! one `write_buffer` per dispatch at the next record). A parameter window already bound in
//! the dispatch, or a free slot for it, needs no new GPU resource; a new set of windows looks
//! its bind group up in a small per-dispatch cache before creating one. Only when a dispatch
//! has no free slot (or a tensor's segments change shape, past one binding) is everything
//! planned again.

use std::collections::{HashMap, HashSet};

use super::bindings::{bind_group, Family, Place, Shape, Slot, Store};
use super::pipelines::Pipelines;
use crate::layout::{self, PlanLimits, SegPlan, ROW_BYTES};
use crate::tensors::ParamDtype;

/// Bind groups kept per dispatch for sets of parameter windows seen before.
const BIND_CACHE: usize = 16;

/// Where a tensor's parameters are now.
pub(crate) struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub dtype: ParamDtype,
}

#[derive(Debug)]
struct BindGroups {
    read: wgpu::BindGroup,
    write: Option<wgpu::BindGroup>,
}

#[derive(Debug)]
struct Dispatch {
    /// Parameter bindings its pipelines have: enough for its highest bound slot.
    tier: usize,
    shadow_buffer: usize,
    slots: Vec<Slot>,
    /// Rows using each slot.
    users: Vec<u32>,
    rows: Vec<[u32; 8]>,
    table_offset: u64,
    /// Rows changed since the last upload.
    dirty: Option<(usize, usize)>,
    groups: (u32, u32),
    bind: BindGroups,
    cache: Vec<(Vec<Slot>, usize, BindGroups)>,
}

/// Every dispatch of a step, and where each tensor's rows are.
#[derive(Debug)]
pub(crate) struct Dispatches {
    shape: Shape,
    lim: PlanLimits,
    list: Vec<Dispatch>,
    table: Option<wgpu::Buffer>,
    /// `rows[t]`: (dispatch, row) of each segment of tensor `t`.
    rows: Vec<Vec<(usize, usize)>>,
    /// A window lost its last row since the last plan or check.
    freed: bool,
}

impl Dispatches {
    pub fn new(shape: Shape, lim: PlanLimits) -> Self {
        Self {
            shape,
            lim,
            list: Vec::new(),
            table: None,
            rows: Vec::new(),
            freed: false,
        }
    }

    /// Plans every dispatch from scratch for tensors whose shadows are `pieces[t]` and whose
    /// parameters are at `bindings[t]`, uploading the chunk table (lands at the next submit).
    pub fn rebuild(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        pipes: &Pipelines,
        store: &Store,
        pieces: &[Vec<layout::Piece>],
        bindings: &[Binding<'_>],
    ) {
        let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
        let mut segs: Vec<(usize, SegPlan)> = Vec::new();
        let mut owner = Vec::new();
        for (t, (pieces, b)) in pieces.iter().zip(bindings).enumerate() {
            let id = match buffers.iter().position(|&x| x == b.buffer) {
                Some(id) => id,
                None => {
                    buffers.push(b.buffer);
                    buffers.len() - 1
                }
            };
            for s in layout::plan_tensor(pieces, b.offset, b.dtype, b.buffer.size(), &self.lim) {
                segs.push((id, s));
                owner.push(t);
            }
        }
        let plans = layout::group_segments(&segs, self.shape.slots);
        self.freed = false;
        self.rows = vec![Vec::new(); pieces.len()];
        let mut at = 0u64;
        let mut list = Vec::with_capacity(plans.len());
        for (g, plan) in plans.iter().enumerate() {
            let slots: Vec<Slot> = plan
                .slots
                .iter()
                .map(|&(id, w)| Some((buffers[id].clone(), w)))
                .collect();
            let mut slots = slots;
            // Every dispatch has all its slots; free ones (None, or no row using them) take
            // the windows of later rebinds.
            slots.resize(self.shape.slots, None);
            let mut users = vec![0u32; slots.len()];
            let mut rows = Vec::with_capacity(plan.segments.len());
            let mut vstart = 0u64;
            for &si in &plan.segments {
                let (id, seg) = &segs[si];
                let slot = plan
                    .slots
                    .iter()
                    .position(|&k| k == (*id, seg.window))
                    .unwrap_or_default();
                users[slot] += 1;
                self.rows[owner[si]].push((g, rows.len()));
                rows.push(layout::row(vstart, seg, slot));
                vstart += seg.items();
            }
            let table_offset = at;
            at = layout::align_up(at + rows.len() as u64 * ROW_BYTES, self.lim.align);
            list.push((plan.shadow_buffer, slots, users, rows, table_offset, vstart));
        }
        let need = at.max(ROW_BYTES);
        if self.table.as_ref().is_none_or(|t| t.size() < need) {
            self.table = Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-ema chunk table"),
                size: need,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let Some(table) = &self.table else { return };
        self.list = list
            .into_iter()
            .map(|(shadow_buffer, slots, users, rows, table_offset, items)| {
                queue.write_buffer(table, table_offset, bytemuck::cast_slice(&rows));
                let tier =
                    pipes.tier_for(slots.iter().rposition(Option::is_some).map_or(1, |i| i + 1));
                let place = Place {
                    tier,
                    shadow_buffer,
                    slots: &slots,
                    table_offset,
                    rows: rows.len(),
                };
                let read = bind_group(
                    device,
                    pipes,
                    store,
                    &self.shape,
                    Family::Read,
                    table,
                    &place,
                );
                Dispatch {
                    tier,
                    shadow_buffer,
                    slots,
                    users,
                    rows,
                    table_offset,
                    dirty: None,
                    groups: layout::workgroups(items),
                    bind: BindGroups { read, write: None },
                    cache: Vec::new(),
                }
            })
            .collect();
    }

    /// Points tensor `t`'s rows at its new parameter binding. Returns false when that needs a
    /// new plan ([`rebuild`](Self::rebuild)): its segments changed shape, or a dispatch has no
    /// free slot for a new window. Sets `freed` when a window lost its last row (then the
    /// dispatches may fit in fewer: [`fragmented`](Self::fragmented)).
    pub fn patch(
        &mut self,
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        t: usize,
        pieces: &[layout::Piece],
        b: &Binding<'_>,
    ) -> bool {
        let plans = layout::plan_tensor(pieces, b.offset, b.dtype, b.buffer.size(), &self.lim);
        let Some(rows) = self.rows.get(t) else {
            return false;
        };
        if rows.len() != plans.len() {
            return false;
        }
        let Some(table) = &self.table else {
            return false;
        };
        for (&(di, ri), seg) in rows.iter().zip(&plans) {
            let d = &mut self.list[di];
            let row = d.rows[ri];
            if u64::from(row[1]) != seg.count || u64::from(row[3]) != seg.shadow {
                return false;
            }
            // This row leaves its slot first, so that a window only it used can be reused.
            let old = row[4] as usize;
            d.users[old] = d.users[old].saturating_sub(1);
            self.freed |= d.users[old] == 0;
            let key = Some((b.buffer.clone(), seg.window));
            let slot = match d.slots.iter().position(|s| *s == key) {
                Some(s) => s,
                None => {
                    // A slot no row uses any more, else a new one.
                    let Some(s) = d.users.iter().position(|&u| u == 0) else {
                        return false;
                    };
                    // Not next to another window of the same buffer that overlaps it (bound
                    // slots stay in the bind group even when no row uses them): the swap and
                    // copy passes write through these bindings, and WebGPU refuses writable
                    // bindings that overlap. A new plan keeps them in separate dispatches.
                    let overlaps = d.slots.iter().enumerate().any(|(i, other)| {
                        i != s
                            && other
                                .as_ref()
                                .is_some_and(|(buf, w)| buf == b.buffer && w.overlaps(&seg.window))
                    });
                    if overlaps {
                        return false;
                    }
                    d.set_slot(s, key, device, pipes, store, &self.shape, table);
                    s
                }
            };
            d.users[slot] += 1;
            let new = layout::row(u64::from(row[0]), seg, slot);
            if new != row {
                d.rows[ri] = new;
                d.dirty = Some(match d.dirty {
                    Some((lo, hi)) => (lo.min(ri), hi.max(ri + 1)),
                    None => (ri, ri + 1),
                });
            }
        }
        true
    }

    /// Uploads the rows changed since the last call (lands at the next submit).
    pub fn flush(&mut self, queue: &wgpu::Queue) {
        let Some(table) = &self.table else { return };
        for d in &mut self.list {
            if let Some((lo, hi)) = d.dirty.take() {
                queue.write_buffer(
                    table,
                    d.table_offset + lo as u64 * ROW_BYTES,
                    bytemuck::cast_slice(&d.rows[lo..hi]),
                );
            }
        }
    }

    /// Makes the bind groups with the parameters read-write, where missing.
    pub fn ensure_write(&mut self, device: &wgpu::Device, pipes: &Pipelines, store: &Store) {
        let Some(table) = &self.table else { return };
        for i in 0..self.list.len() {
            if self.list[i].bind.write.is_none() {
                let g = bind_group(
                    device,
                    pipes,
                    store,
                    &self.shape,
                    Family::Write,
                    table,
                    &self.list[i].place(),
                );
                self.list[i].bind.write = Some(g);
            }
        }
    }

    /// (bind group, slot count of its pipelines, workgroups) of every dispatch, for `family`.
    pub fn each(
        &self,
        family: Family,
    ) -> impl Iterator<Item = (&wgpu::BindGroup, usize, (u32, u32))> {
        self.list.iter().filter_map(move |d| {
            let g = match family {
                Family::Read => Some(&d.bind.read),
                Family::Write => d.bind.write.as_ref(),
            };
            g.map(|g| (g, d.tier, d.groups))
        })
    }

    /// True when the parameter windows in use would fit in fewer dispatches than there are
    /// (tensors rebound out of a dispatch that has since been split): worth a
    /// [`rebuild`](Self::rebuild). Checked only after a window lost its last row; then costs
    /// O(dispatches x slots), nothing per tensor.
    pub fn take_fragmented(&mut self) -> bool {
        // Only a window losing its last row can make fewer dispatches enough.
        if !std::mem::take(&mut self.freed) || self.list.len() < 2 {
            return false;
        }
        // Per shadow buffer: its dispatches, and the distinct windows rows still use.
        let mut seen: HashMap<usize, (usize, HashSet<&Slot>)> = HashMap::new();
        for d in &self.list {
            let entry = seen.entry(d.shadow_buffer).or_default();
            entry.0 += 1;
            let live = d.slots.iter().zip(&d.users).filter(|(_, &u)| u > 0);
            entry.1.extend(live.map(|(k, _)| k));
        }
        seen.values()
            .any(|(count, keys)| keys.len().div_ceil(self.shape.slots).max(1) < *count)
    }

    /// Dispatches per step.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Parameter bindings per dispatch.
    pub fn slots(&self) -> usize {
        self.shape.slots
    }
}

impl Dispatch {
    fn place(&self) -> Place<'_> {
        Place {
            tier: self.tier,
            shadow_buffer: self.shadow_buffer,
            slots: &self.slots,
            table_offset: self.table_offset,
            rows: self.rows.len(),
        }
    }

    /// Binds slot `s` to `key`: the bind groups of the new set of windows come from the cache
    /// when it was seen before, else are made; the old ones are cached.
    #[allow(clippy::too_many_arguments)]
    fn set_slot(
        &mut self,
        s: usize,
        key: Slot,
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        shape: &Shape,
        table: &wgpu::Buffer,
    ) {
        let old_key = std::mem::replace(&mut self.slots[s], key);
        let mut old_slots = self.slots.clone();
        old_slots[s] = old_key;
        let old_tier = self.tier;
        let used = self
            .slots
            .iter()
            .rposition(Option::is_some)
            .map_or(1, |i| i + 1);
        self.tier = pipes.tier_for(used);
        let fresh = match self.cache.iter().position(|(k, ..)| *k == self.slots) {
            Some(i) => {
                let (_, tier, groups) = self.cache.remove(i);
                self.tier = tier;
                groups
            }
            None => BindGroups {
                read: bind_group(
                    device,
                    pipes,
                    store,
                    shape,
                    Family::Read,
                    table,
                    &self.place(),
                ),
                write: None,
            },
        };
        let old = std::mem::replace(&mut self.bind, fresh);
        self.cache.push((old_slots, old_tier, old));
        if self.cache.len() > BIND_CACHE {
            self.cache.remove(0);
        }
    }
}
