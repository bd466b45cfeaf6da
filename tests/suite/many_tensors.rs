//! Multi-tensor apply: many tensors of any size, at any 4-byte offset, in a few buffers, of
//! mixed dtypes, in one dispatch per group of buffers. Each tensor's shadow must equal what an
//! EMA of that tensor alone computes, bit for bit, and the f64 reference within a stated
//! tolerance; parameters between the tensors are NaN, so reading a wrong element shows.

use crate::common::{assert_close, gpu};
use half::{bf16, f16};
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{wgpu, GpuContext, GpuEma, Numerics, ParamDtype, Schedule, TensorSpec};

/// Relative tolerance against the f64 reference after a few steps: a few f32 roundings.
const TOL: f64 = 20.0 * f32::EPSILON as f64;

struct Tensor {
    buffer: usize,
    offset: u64,
    n: usize,
    dtype: ParamDtype,
}

/// Tensors laid out round-robin in `buffers` buffers, as a framework might: each at a 4-byte offset that is
/// rarely a multiple of 16, with NaN-filled gaps between them.
struct Model {
    tensors: Vec<Tensor>,
    sizes: Vec<u64>,
    buffers: Vec<wgpu::Buffer>,
}

impl Model {
    fn new(ctx: &GpuContext, sizes: &[usize], buffers: usize, seed: u64, halves: bool) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ends = vec![0u64; buffers];
        let mut tensors = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let dtype = match i % 7 {
                3 if halves => ParamDtype::BF16,
                5 if halves => ParamDtype::F16,
                _ => ParamDtype::F32,
            };
            let buffer = i % buffers;
            let offset = ends[buffer] + 4 * rng.u64(0..4);
            ends[buffer] = (offset + n as u64 * dtype.size()).next_multiple_of(4);
            tensors.push(Tensor {
                buffer,
                offset,
                n,
                dtype,
            });
        }
        let sizes: Vec<u64> = ends.iter().map(|&e| e + 16).collect();
        let buffers = sizes
            .iter()
            .map(|&size| {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("test model"),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Self {
            tensors,
            sizes,
            buffers,
        }
    }

    fn spec(&self, i: usize) -> TensorSpec {
        TensorSpec::new(format!("t{i}"), [self.tensors[i].n])
    }

    /// Writes fresh seeded values into every tensor (NaN between them) and returns them as
    /// f32, as the EMA reads them.
    fn fill(&self, ctx: &GpuContext, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut bytes: Vec<Vec<u8>> = self
            .sizes
            .iter()
            .map(|&s| f32::NAN.to_le_bytes().repeat(s as usize / 4))
            .collect();
        let mut out = Vec::new();
        for t in &self.tensors {
            let v: Vec<f32> = (0..t.n).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let dst = &mut bytes[t.buffer][t.offset as usize..];
            let decoded = match t.dtype {
                ParamDtype::F32 => {
                    dst[..4 * t.n].copy_from_slice(bytemuck::cast_slice(&v));
                    v
                }
                ParamDtype::F16 | ParamDtype::BF16 => {
                    let mut d = Vec::with_capacity(t.n);
                    for (j, &x) in v.iter().enumerate() {
                        let (bits, back) = if t.dtype == ParamDtype::F16 {
                            let h = f16::from_f32(x);
                            (h.to_bits(), h.to_f32())
                        } else {
                            let h = bf16::from_f32(x);
                            (h.to_bits(), h.to_f32())
                        };
                        dst[2 * j..2 * j + 2].copy_from_slice(&bits.to_le_bytes());
                        d.push(back);
                    }
                    d
                }
            };
            out.push(decoded);
        }
        for (b, data) in self.buffers.iter().zip(&bytes) {
            ctx.queue.write_buffer(b, 0, data);
        }
        out
    }

    fn track<'a>(
        &'a self,
        mut b: wgpu_ema::GpuEmaBuilder<'a>,
        which: &[usize],
    ) -> wgpu_ema::GpuEmaBuilder<'a> {
        for &i in which {
            let t = &self.tensors[i];
            b = b.track_buffer_as(self.spec(i), &self.buffers[t.buffer], t.offset, t.dtype);
        }
        b
    }
}

fn sizes(count: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v: Vec<usize> = [1, 2, 3, 4, 5, 7, 64, 255, 256, 257, 1023, 1024, 1025].to_vec();
    while v.len() < count {
        v.push(rng.usize(1..=1025));
    }
    v
}

/// The slot settings every test runs with: the device's default (one buffer per dispatch on
/// software devices), and as many buffers per dispatch as the device binds.
const SLOTS: [Option<usize>; 2] = [None, Some(usize::MAX)];

fn builder(schedule: Schedule, slots: Option<usize>) -> wgpu_ema::GpuEmaBuilder<'static> {
    match slots {
        Some(n) => GpuEma::builder(schedule).param_slots(n),
        None => GpuEma::builder(schedule),
    }
}

#[test]
fn five_hundred_tensors_in_seven_buffers_equal_each_tensor_alone() {
    for slots in SLOTS {
        five_hundred_tensors(slots);
    }
}

fn five_hundred_tensors(slots: Option<usize>) {
    let Some(ctx) = gpu() else { return };
    let model = Model::new(ctx, &sizes(500, 1), 7, 2, true);
    let all: Vec<usize> = (0..500).collect();
    let schedule = Schedule::tf(0.99);
    let p0 = model.fill(ctx, 10);
    let mut ema = model
        .track(builder(schedule, slots), &all)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(
        ema.dispatches_per_step(),
        7usize.div_ceil(ema.param_slots())
    );
    // Every 25th tensor also alone, in an EMA of its own.
    let alone: Vec<usize> = (0..500).step_by(25).collect();
    let mut singles: Vec<GpuEma> = alone
        .iter()
        .map(|&i| {
            model
                .track(GpuEma::builder(schedule), &[i])
                .build(&ctx.device, &ctx.queue)
                .unwrap()
        })
        .collect();
    let initial: Vec<&[f32]> = p0.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &initial).unwrap();
    for step in 1..=4u64 {
        let p = model.fill(ctx, 10 + step);
        ema.update().unwrap();
        for s in &mut singles {
            s.update().unwrap();
        }
        let slices: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        reference.update(&slices).unwrap();
    }
    let got = ema.read_shadows_blocking().unwrap();
    for (i, want) in reference.shadows().iter().enumerate() {
        let t = &model.tensors[i];
        let what = format!("t{i} ({} x {:?} at {})", t.n, t.dtype, t.offset);
        assert_close(&what, got.try_get(&format!("t{i}")).unwrap(), want, TOL);
    }
    for (&i, s) in alone.iter().zip(&singles) {
        let name = format!("t{i}");
        let one = s.read_shadow_blocking(&name).unwrap();
        let many = got.try_get(&name).unwrap();
        assert!(
            one.iter()
                .zip(many)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: the multi-tensor step differs from the tensor's own step"
        );
    }
}

#[test]
fn k_emas_and_compensated_over_mixed_dtypes() {
    let Some(ctx) = gpu() else { return };
    let model = Model::new(ctx, &sizes(60, 3), 4, 4, true);
    let all: Vec<usize> = (0..60).collect();
    let scheds = [
        Schedule::tf(0.99),
        Schedule::constant(0.9),
        Schedule::power_sigma_rel(0.1).unwrap(),
    ];
    for compensated in [false, true] {
        let p0 = model.fill(ctx, 20);
        let builder = if compensated {
            GpuEma::builder(scheds[0]).compensated(true)
        } else {
            GpuEma::builder(scheds[0])
                .extra_ema(scheds[1])
                .extra_ema(scheds[2])
        };
        let mut ema = model
            .track(builder, &all)
            .build(&ctx.device, &ctx.queue)
            .unwrap();
        let k = ema.ema_count();
        let initial: Vec<&[f32]> = p0.iter().map(Vec::as_slice).collect();
        let mut refs: Vec<ReferenceEma> = scheds[..k]
            .iter()
            .map(|s| ReferenceEma::new(*s, Numerics::Exact, &initial).unwrap())
            .collect();
        for step in 1..=5u64 {
            let p = model.fill(ctx, 20 + step);
            ema.update().unwrap();
            let slices: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
            for r in &mut refs {
                r.update(&slices).unwrap();
            }
        }
        for (e, r) in refs.iter().enumerate() {
            let got = ema.read_ema_blocking(e).unwrap();
            for (i, want) in r.shadows().iter().enumerate() {
                let what = format!("EMA {e} (compensated: {compensated}) of t{i}");
                assert_close(&what, got.try_get(&format!("t{i}")).unwrap(), want, TOL);
            }
        }
    }
}

#[test]
fn rebinding_between_steps_moves_tensors_across_more_buffers_than_one_dispatch_binds() {
    for slots in SLOTS {
        rebinding(slots);
    }
}

fn rebinding(slots: Option<usize>) {
    let Some(ctx) = gpu() else { return };
    // Two layouts of the same tensors: the second spreads them over more buffers than one
    // dispatch binds, so rebinding into it needs more dispatches, and back fewer again.
    let n = 48;
    let sizes = sizes(n, 5);
    let a = Model::new(ctx, &sizes, 3, 6, false);
    let b = Model::new(ctx, &sizes, 40, 7, false);
    let all: Vec<usize> = (0..n).collect();
    let schedule = Schedule::constant(0.95);
    let p0 = a.fill(ctx, 30);
    let mut ema = a
        .track(builder(schedule, slots), &all)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(
        ema.dispatches_per_step(),
        3usize.div_ceil(ema.param_slots())
    );
    let initial: Vec<&[f32]> = p0.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &initial).unwrap();
    for step in 1..=6u64 {
        // Odd steps in layout b (tensor by tensor, so some steps mix both), even in a.
        let m = if step % 2 == 1 { &b } else { &a };
        let p = m.fill(ctx, 30 + step);
        for i in 0..n {
            let t = &m.tensors[i];
            ema.rebind(&format!("t{i}"), &m.buffers[t.buffer], t.offset)
                .unwrap();
        }
        let buffers: usize = if step % 2 == 1 { 40 } else { 3 };
        let want = buffers.div_ceil(ema.param_slots());
        assert_eq!(ema.dispatches_per_step(), want, "step {step}");
        ema.update().unwrap();
        let slices: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        reference.update(&slices).unwrap();
    }
    let got = ema.read_shadows_blocking().unwrap();
    for (i, want) in reference.shadows().iter().enumerate() {
        assert_close(
            &format!("t{i}"),
            got.try_get(&format!("t{i}")).unwrap(),
            want,
            TOL,
        );
    }
    // Swapping twice over the multi-tensor table restores the parameters bit for bit.
    let before = crate::common::read_words(ctx, &a.buffers[0]);
    ema.swap().unwrap();
    let swapped = crate::common::read_words(ctx, &a.buffers[0]);
    ema.swap().unwrap();
    assert_eq!(crate::common::read_words(ctx, &a.buffers[0]), before);
    let t0 = a.tensors.iter().position(|t| t.buffer == 0).unwrap();
    let o = a.tensors[t0].offset as usize / 4;
    let shadow = got.try_get(&format!("t{t0}")).unwrap();
    assert_eq!(
        swapped[o],
        shadow[0].to_bits(),
        "swap put the shadow into the parameter"
    );
}

#[test]
fn more_rows_than_one_dispatch_has_workgroups() {
    let Some(ctx) = gpu() else { return };
    // 70,000 tensors of 1 to 4 elements: more chunk-table rows than the 65,535 workgroups of
    // one dispatch dimension, packed four elements to an item, 1,024 items to a workgroup.
    let count = 70_000;
    let mut rng = fastrand::Rng::with_seed(8);
    let sizes: Vec<usize> = (0..count).map(|_| rng.usize(1..=4)).collect();
    let model = Model::new(ctx, &sizes, 2, 9, false);
    let all: Vec<usize> = (0..count).collect();
    let schedule = Schedule::tf(0.9);
    let p0 = model.fill(ctx, 40);
    let mut ema = model
        .track(GpuEma::builder(schedule), &all)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(
        ema.dispatches_per_step(),
        2usize.div_ceil(ema.param_slots())
    );
    let initial: Vec<&[f32]> = p0.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &initial).unwrap();
    for step in 1..=3u64 {
        let p = model.fill(ctx, 40 + step);
        ema.update().unwrap();
        let slices: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        reference.update(&slices).unwrap();
    }
    let got = ema.read_shadows_blocking().unwrap();
    for (i, want) in reference.shadows().iter().enumerate() {
        assert_close(
            &format!("t{i}"),
            got.try_get(&format!("t{i}")).unwrap(),
            want,
            TOL,
        );
    }
}
