//! The GPU side of the [`Plan`](crate::plan::Plan): the chunk table in a storage buffer and a
//! bind group per dispatch, kept in step with the plan. All decisions (which dispatch binds
//! which window in which slot, which rows change on a rebind) are the plan's; this module
//! only makes and caches the wgpu objects they call for.

use super::bindings::{bind_group, Place, Slot, Store, Target};
use super::pipelines::Pipelines;
use crate::plan::{Change, ParamBinding, Plan, ROW_BYTES};
use crate::shader::{Family, Shape};

/// Bind groups kept per dispatch for sets of parameter windows seen before (a framework that
/// moves tensors between a few buffers comes back to the same sets).
const BIND_CACHE: usize = 16;

#[derive(Debug)]
struct BindGroups {
    /// The windows they bind, in slot order.
    key: Vec<Slot>,
    read: wgpu::BindGroup,
    /// With the parameters read-write, per [`Target`] (EMA, BEMA), made on first use.
    write: [Option<wgpu::BindGroup>; 2],
}

fn target_index(target: Target) -> usize {
    match target {
        Target::Ema => 0,
        Target::Bema => 1,
    }
}

/// Every dispatch of a step: the plan, and its wgpu objects.
#[derive(Debug)]
pub(crate) struct Dispatches {
    shape: Shape,
    plan: Plan<wgpu::Buffer>,
    table: wgpu::Buffer,
    /// Per dispatch: its bind groups, and those of windows it bound before.
    groups: Vec<(BindGroups, Vec<BindGroups>)>,
    /// Per dispatch: [`DispatchPlan::aligned`](crate::plan::DispatchPlan::aligned), kept in
    /// step with the rows.
    aligned: Vec<bool>,
}

fn new_table(device: &wgpu::Device, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-ema chunk table"),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

impl Dispatches {
    /// Makes the table and bind groups of `plan` (its rows are uploaded at the next
    /// [`flush`](Self::flush)).
    pub fn new(
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        shape: Shape,
        plan: Plan<wgpu::Buffer>,
    ) -> Self {
        let table = new_table(device, plan.table_bytes());
        let mut work = Self {
            shape,
            plan,
            table,
            groups: Vec::new(),
            aligned: Vec::new(),
        };
        work.remake_all(device, pipes, store);
        work
    }

    /// The plan.
    pub fn plan(&self) -> &Plan<wgpu::Buffer> {
        &self.plan
    }

    fn place(&self, d: usize, target: Target) -> Place<'_> {
        let p = &self.plan.dispatches()[d];
        Place {
            tier: p.tier,
            shadow_buffer: p.shadow_buffer,
            slots: &p.slots,
            table_offset: p.table_offset,
            rows: p.rows.len(),
            target,
        }
    }

    fn make(
        &self,
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        d: usize,
    ) -> BindGroups {
        let place = self.place(d, Target::Ema);
        BindGroups {
            key: place.slots.to_vec(),
            read: bind_group(
                device,
                pipes.layout(Family::Read, place.tier),
                store,
                &self.shape,
                Family::Read,
                &self.table,
                &place,
            ),
            write: [None, None],
        }
    }

    /// After a new plan: a table large enough, and every bind group made anew.
    fn remake_all(&mut self, device: &wgpu::Device, pipes: &Pipelines, store: &Store) {
        if self.table.size() < self.plan.table_bytes() {
            self.table = new_table(device, self.plan.table_bytes());
        }
        self.groups = (0..self.plan.dispatches().len())
            .map(|d| (self.make(device, pipes, store, d), Vec::new()))
            .collect();
        self.aligned = self.plan.dispatches().iter().map(|d| d.aligned()).collect();
    }

    /// Points tensor `t`'s parameters at `binding`: a dispatch whose windows changed takes
    /// its bind groups from its cache, else makes them; a new plan makes everything anew.
    pub fn rebind(
        &mut self,
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        t: usize,
        binding: ParamBinding<wgpu::Buffer>,
    ) {
        match self.plan.rebind(t, binding) {
            Change::Replanned => self.remake_all(device, pipes, store),
            Change::Patched(touched) => {
                for d in touched {
                    let key = &self.plan.dispatches()[d].slots;
                    let hit = self.groups[d].1.iter().position(|g| g.key == *key);
                    let fresh = match hit {
                        Some(i) => self.groups[d].1.remove(i),
                        None => self.make(device, pipes, store, d),
                    };
                    let (current, cache) = &mut self.groups[d];
                    let old = std::mem::replace(current, fresh);
                    cache.push(old);
                    if cache.len() > BIND_CACHE {
                        cache.remove(0);
                    }
                }
            }
        }
    }

    /// Uploads the rows changed since the last call (lands at the next submit).
    pub fn flush(&mut self, queue: &wgpu::Queue) {
        for (d, lo, hi) in self.plan.take_dirty() {
            let p = &self.plan.dispatches()[d];
            self.aligned[d] = p.aligned();
            queue.write_buffer(
                &self.table,
                p.table_offset + lo as u64 * ROW_BYTES,
                bytemuck::cast_slice(&p.rows[lo..hi]),
            );
        }
    }

    /// Makes the bind groups with the parameters read-write for `target`, where missing.
    pub fn ensure_write(
        &mut self,
        device: &wgpu::Device,
        pipes: &Pipelines,
        store: &Store,
        target: Target,
    ) {
        let t = target_index(target);
        for d in 0..self.groups.len() {
            if self.groups[d].0.write[t].is_none() {
                let place = self.place(d, target);
                let g = bind_group(
                    device,
                    pipes.layout(Family::Write, place.tier),
                    store,
                    &self.shape,
                    Family::Write,
                    &self.table,
                    &place,
                );
                self.groups[d].0.write[t] = Some(g);
            }
        }
    }

    /// (bind group, slot count of its pipelines, workgroups, rows all aligned) of every
    /// dispatch, for `family` (and, writing the parameters, `target`).
    pub fn each(
        &self,
        family: Family,
        target: Target,
    ) -> impl Iterator<Item = (&wgpu::BindGroup, usize, (u32, u32), bool)> {
        self.groups
            .iter()
            .zip(self.plan.dispatches())
            .zip(&self.aligned)
            .filter_map(move |(((g, _), d), &aligned)| {
                let g = match family {
                    Family::Read => Some(&g.read),
                    Family::Write => g.write[target_index(target)].as_ref(),
                };
                g.map(|g| (g, d.tier, self.shape.map.workgroups(d.items), aligned))
            })
    }

    /// Dispatches per step.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Parameter bindings per dispatch.
    pub fn slots(&self) -> usize {
        self.plan.slots()
    }
}
