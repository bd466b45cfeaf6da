//! Offloaded shadows: the host EMA against `CpuEma` fed the same values (bit for bit) and
//! against an f64 model of the rotation rule written here; skips, swaps, checkpoints, errors,
//! and the GPU memory it allocates.

use crate::common::{assert_close, bits, buffer_with, gpu, half_buffer, random, read_words};
use half::{bf16, f16};
use wgpu_ema::checkpoint::{self, Checkpoint, EmaState};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::schedule::{Bema, Policy};
use wgpu_ema::{
    wgpu, Error, GpuContext, GpuEma, HostTensors, Numerics, Offload, ParamArena, ParamDtype,
    Schedule, TensorSpec,
};

/// Odd sizes, in an arena, plus one tensor in a user buffer at an odd word offset.
const SIZES: [usize; 4] = [1, 7, 64, 1031];
const USER: usize = 37;
const USER_OFFSET: u64 = 12;

struct Model {
    arena: ParamArena,
    user: wgpu::Buffer,
    specs: Vec<TensorSpec>,
}

fn model(ctx: &GpuContext) -> Model {
    let specs: Vec<TensorSpec> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("layer{i}/w"), [n]))
        .collect();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let user = buffer_with(ctx, &random(99, USER), USER_OFFSET);
    let mut all = specs;
    all.push(TensorSpec::new("user/b", [USER]));
    Model {
        arena,
        user,
        specs: all,
    }
}

impl Model {
    /// Seeded parameters for call `n`, one vector per tensor.
    fn params(&self, n: u64) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| random(n * 100 + i as u64, s.numel() as usize))
            .collect()
    }

    /// Writes `p` (lands at the next submit).
    fn write(&self, ctx: &GpuContext, p: &[Vec<f32>]) {
        for (s, v) in self.specs.iter().zip(p) {
            if s.name == "user/b" {
                ctx.queue
                    .write_buffer(&self.user, USER_OFFSET, bytemuck::cast_slice(v));
            } else {
                self.arena.write(&ctx.queue, &s.name, v).unwrap();
            }
        }
    }

    fn builder(&self, schedule: Schedule) -> wgpu_ema::GpuEmaBuilder<'_> {
        GpuEma::builder(schedule)
            .track_arena(&self.arena)
            .track_buffer(TensorSpec::new("user/b", [USER]), &self.user, USER_OFFSET)
    }

    fn read_params(&self, ctx: &GpuContext) -> Vec<Vec<f32>> {
        let arena = self.arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
        let mut out: Vec<Vec<f32>> = self.specs[..SIZES.len()]
            .iter()
            .map(|s| arena.try_get(&s.name).unwrap().to_vec())
            .collect();
        out.push(read_buffer(ctx, &self.user, USER_OFFSET, USER));
        out
    }
}

/// `n` f32 elements of `buf` from `offset`.
fn read_buffer(ctx: &GpuContext, buf: &wgpu::Buffer, offset: u64, n: usize) -> Vec<f32> {
    let at = (offset / 4) as usize;
    read_words(ctx, buf)[at..at + n]
        .iter()
        .map(|&w| f32::from_bits(w))
        .collect()
}

fn step(ctx: &GpuContext, ema: &mut wgpu_ema::OffloadedEma) {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_update(&mut enc).unwrap();
    ctx.queue.submit(Some(enc.finish()));
}

/// A model of one chunk sampled at every update (the loop catches up each step): the host
/// shadows are `CpuEma`'s fed the same values, bit for bit, for every numerics, compensated or
/// not, under a policy with a delayed start and an interval.
#[test]
fn one_chunk_sampled_every_update_is_the_cpu_ema_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let m = model(ctx);
    let schedule = Schedule::tf(0.99);
    let policy = Policy {
        update_after_step: 3,
        update_every: 2,
        write_back_every: 0,
    };
    for (numerics, compensated) in [
        (Numerics::Exact, false),
        (Numerics::TensorFlow, false),
        (Numerics::Exact, true),
    ] {
        let p0 = m.params(0);
        m.write(ctx, &p0);
        let mut cpu = CpuEma::new(schedule, numerics).unwrap();
        cpu.set_policy(policy).unwrap();
        cpu.set_compensated(compensated).unwrap();
        for (s, v) in m.specs.iter().zip(&p0) {
            cpu.track(s.clone(), v).unwrap();
        }
        let mut ema = m
            .builder(schedule)
            .numerics(numerics)
            .policy(policy)
            .compensated(compensated)
            .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 20))
            .unwrap();
        assert_eq!(ema.stats().chunks, 1);
        for n in 1..=25u64 {
            let p = m.params(n);
            m.write(ctx, &p);
            step(ctx, &mut ema);
            ema.catch_up().unwrap();
            let views: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
            cpu.update(&views).unwrap();
        }
        let got = ema.read_shadows().unwrap();
        for s in &m.specs {
            assert_eq!(
                bits(got.try_get(&s.name).unwrap()),
                bits(cpu.shadow(&s.name).unwrap()),
                "{numerics:?}, compensated {compensated}: {}",
                s.name
            );
        }
        if compensated {
            for (i, s) in m.specs.iter().enumerate() {
                assert_eq!(
                    bits(&ema.read_compensation(i).unwrap().unwrap()),
                    bits(cpu.compensation(&s.name).unwrap().unwrap()),
                    "compensation of {}",
                    s.name
                );
            }
        }
        let stats = ema.stats();
        // Calls 1-3 copy; then updates at 5, 7, ..., 25: 3 + 11 samples, none skipped.
        assert_eq!((stats.samples, stats.skipped, stats.in_flight), (14, 0, 0));
        assert_eq!(ema.num_updates(), 25);
    }
}

/// Several EMAs in one ring, and f16/bf16 parameters widened on the host: each EMA is a
/// `CpuEma` of its own schedule fed the decoded values, bit for bit.
#[test]
fn several_emas_and_half_precision_parameters_are_the_cpu_ema() {
    let Some(ctx) = gpu() else { return };
    let decode = |dtype: ParamDtype, x: f32| match dtype {
        ParamDtype::F16 => f16::from_f32(x).to_f32(),
        _ => bf16::from_f32(x).to_f32(),
    };
    let encode = |dtype: ParamDtype, v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&x| match dtype {
                ParamDtype::F16 => f16::from_f32(x).to_bits(),
                _ => bf16::from_f32(x).to_bits(),
            })
            .collect()
    };
    // Odd lengths and offsets; a slot of 12 bytes cuts them into pieces of 6 elements.
    let tensors = [(ParamDtype::BF16, 9usize, 4u64), (ParamDtype::F16, 13, 8)];
    let schedules = [Schedule::tf(0.99), Schedule::constant(0.9)];
    let values = |n: u64| -> Vec<Vec<f32>> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, &(d, len, _))| {
                random(n * 10 + i as u64, len)
                    .iter()
                    .map(|&x| decode(d, x))
                    .collect()
            })
            .collect()
    };
    let p0 = values(0);
    let bufs: Vec<wgpu::Buffer> = tensors
        .iter()
        .zip(&p0)
        .map(|(&(d, _, off), v)| half_buffer(ctx, &encode(d, v), off))
        .collect();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .enumerate()
        .map(|(i, &(_, len, _))| TensorSpec::new(format!("h{i}"), [len]))
        .collect();
    let mut builder = GpuEma::builder(schedules[0]).extra_ema(schedules[1]);
    for ((spec, buf), &(d, _, off)) in specs.iter().zip(&bufs).zip(&tensors) {
        builder = builder.track_buffer_as(spec.clone(), buf, off, d);
    }
    let mut ema = builder
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(24).slots(2))
        .unwrap();
    assert!(ema.stats().chunks > 2, "{:?}", ema.stats());
    let mut cpus: Vec<CpuEma> = schedules
        .iter()
        .map(|&s| {
            let mut c = CpuEma::new(s, Numerics::Exact).unwrap();
            for (spec, v) in specs.iter().zip(&p0) {
                c.track(spec.clone(), v).unwrap();
            }
            c
        })
        .collect();
    for n in 1..=12u64 {
        let p = values(n);
        for ((buf, &(d, _, off)), v) in bufs.iter().zip(&tensors).zip(&p) {
            // Whole words: the odd tensor's last word keeps its padding.
            let mut words = encode(d, v);
            if words.len() % 2 == 1 {
                words.push(0xFFFF);
            }
            ctx.queue
                .write_buffer(buf, off, bytemuck::cast_slice(&words));
        }
        // Every chunk each step: the step samples one, settling the others.
        step(ctx, &mut ema);
        ema.settle().unwrap();
        let views: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        for c in &mut cpus {
            c.update(&views).unwrap();
        }
    }
    for (k, cpu) in cpus.iter().enumerate() {
        let got = ema.read_ema(k).unwrap();
        for s in &specs {
            assert_eq!(
                bits(got.try_get(&s.name).unwrap()),
                bits(cpu.shadow(&s.name).unwrap()),
                "EMA {k}, {}",
                s.name
            );
        }
    }
    assert_eq!(ema.read_param("h1").unwrap(), values(12)[1]);
    assert!(matches!(ema.swap(), Err(Error::HalfPrecision { .. })));
    assert!(matches!(
        ema.copy_to_params(),
        Err(Error::HalfPrecision { .. })
    ));
}

/// The rotation rule, modelled here: 8 chunks of 4 elements, 2 slots, one chunk per update.
/// Updates recorded three to an encoder find both slots busy at the third; updates recorded
/// while the host is held find them busy too. Each element's shadow is the EMA of the values
/// sampled for it, each sample taking the product of its gap's decays, across a schedule
/// change: within 1e-5 of the f64 EMA, and bit for bit the f32 one.
#[test]
fn rotating_chunks_with_skips_are_the_exact_ema_of_their_samples() {
    let Some(ctx) = gpu() else { return };
    let sizes = [5usize, 3, 9, 14];
    let total: usize = sizes.iter().sum();
    let specs: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), [n]))
        .collect();
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    // The flat values of call `n`, and a buffer holding them per tensor at the arena's offsets.
    let flat = |n: u64| random(7000 + n, total);
    let source = |n: u64| -> wgpu::Buffer {
        let v = flat(n);
        let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: arena.size(),
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0;
        for (s, &len) in specs.iter().zip(&sizes) {
            let off = arena.offset(&s.name).unwrap();
            ctx.queue
                .write_buffer(&buf, off, bytemuck::cast_slice(&v[at..at + len]));
            at += len;
        }
        buf
    };
    // The "optimizer": copies call n's values into the parameters, in the encoder.
    let optimizer = |enc: &mut wgpu::CommandEncoder, src: &wgpu::Buffer| {
        enc.copy_buffer_to_buffer(src, 0, arena.buffer(), 0, arena.size());
    };
    let switch_at = 40u64;
    let decay = |n: u64| -> f64 {
        if n <= switch_at {
            (0.95f64).min((1.0 + n as f64) / (10.0 + n as f64))
        } else {
            0.8
        }
    };
    let first = source(0);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    optimizer(&mut enc, &first);
    ctx.queue.submit(Some(enc.finish()));
    let (slots, chunk_elems) = (2usize, 4usize);
    let mut ema = GpuEma::builder(Schedule::tf(0.95))
        .track_arena(&arena)
        .build_offloaded(
            &ctx.device,
            &ctx.queue,
            Offload::new((slots * chunk_elems * 4) as u64)
                .slots(slots)
                .per_step(1),
        )
        .unwrap();
    let chunks = total.div_ceil(chunk_elems);
    assert_eq!(ema.stats().chunks, chunks);

    // The model: the rotation pointer, free slots, each chunk's last sample, the f64 EMA.
    // Per element: the f64 EMA of its samples, and the same in f32 as the CPU's f32 path
    // computes it (`s += alpha * (p - s)`, alpha the gap's `1 - prod(decay)` rounded once).
    let mut reference: Vec<(f64, f32)> = flat(0).iter().map(|&x| (f64::from(x), x)).collect();
    let mut last = vec![0u64; chunks];
    let sample = |c: usize, n: u64, reference: &mut Vec<(f64, f32)>, last: &mut Vec<u64>| {
        let d: f64 = (last[c] + 1..=n).map(decay).product();
        let alpha = (1.0 - d) as f32;
        let v = flat(n);
        for e in c * chunk_elems..((c + 1) * chunk_elems).min(total) {
            let (wide, narrow) = &mut reference[e];
            *wide = d * *wide + (1.0 - d) * f64::from(v[e]);
            *narrow += alpha * (v[e] - *narrow);
        }
        last[c] = n;
    };
    // The rotation pointer, free slots, samples taken and skipped.
    let mut rot = (0usize, slots, 0u64, 0u64);
    let call = |n: u64,
                rot: &mut (usize, usize, u64, u64),
                reference: &mut Vec<(f64, f32)>,
                last: &mut Vec<u64>| {
        if rot.1 > 0 {
            sample(rot.0, n, reference, last);
            rot.0 = (rot.0 + 1) % chunks;
            rot.1 -= 1;
            rot.2 += 1;
        } else {
            rot.3 += 1;
        }
    };
    let mut n = 0u64;
    let sources: Vec<wgpu::Buffer> = (0..=90).map(source).collect();
    while n < 90 {
        if n % 7 == 3 {
            // Three updates in one encoder: the third finds both slots busy.
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for _ in 0..3 {
                n += 1;
                if n == switch_at + 1 {
                    ema.set_schedule(Schedule::constant(0.8)).unwrap();
                }
                optimizer(&mut enc, &sources[n as usize]);
                ema.record_update(&mut enc).unwrap();
                call(n, &mut rot, &mut reference, &mut last);
            }
            ctx.queue.submit(Some(enc.finish()));
        } else if n % 11 == 5 {
            // The host held: four steps, each submitted; the last two are skipped.
            let hold = ema.hold_host();
            for _ in 0..4 {
                n += 1;
                if n == switch_at + 1 {
                    ema.set_schedule(Schedule::constant(0.8)).unwrap();
                }
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                optimizer(&mut enc, &sources[n as usize]);
                ema.record_update(&mut enc).unwrap();
                ctx.queue.submit(Some(enc.finish()));
                call(n, &mut rot, &mut reference, &mut last);
            }
            drop(hold);
        } else {
            n += 1;
            if n == switch_at + 1 {
                ema.set_schedule(Schedule::constant(0.8)).unwrap();
            }
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            optimizer(&mut enc, &sources[n as usize]);
            ema.record_update(&mut enc).unwrap();
            ctx.queue.submit(Some(enc.finish()));
            call(n, &mut rot, &mut reference, &mut last);
        }
        ema.catch_up().unwrap();
        rot.1 = slots;
    }
    let stats = ema.stats();
    let (samples, skipped) = (rot.2, rot.3);
    assert_eq!((stats.samples, stats.skipped), (samples, skipped));
    assert!(skipped >= 10, "the run skipped {skipped} samples");
    assert!(!ema.is_settled());
    // Settling samples every chunk not sampled at the last call, with the last values.
    for c in 0..chunks {
        if last[c] < n {
            sample(c, n, &mut reference, &mut last);
        }
    }
    let got = ema.read_shadows().unwrap();
    assert!(ema.is_settled());
    let mut flat_got = Vec::new();
    for s in &specs {
        flat_got.extend_from_slice(got.try_get(&s.name).unwrap());
    }
    let wide: Vec<f64> = reference.iter().map(|r| r.0).collect();
    assert_close("rotation with skips", &flat_got, &wide, 1e-5);
    let narrow: Vec<f32> = reference.iter().map(|r| r.1).collect();
    assert_eq!(
        bits(&flat_got),
        bits(&narrow),
        "the f32 EMA of the samples, bit for bit"
    );
}

/// Checkpoints come from host memory: the same bytes as the on-GPU EMA's fed the same values
/// (on drivers that do not fuse the multiply-add, bit for bit), and a restore continues
/// exactly as the uninterrupted run.
#[test]
fn checkpoints_match_the_on_gpu_files_and_resume_exactly() {
    let Some(ctx) = gpu() else { return };
    let software = ctx.adapter.get_info().device_type == wgpu::DeviceType::Cpu;
    let m = model(ctx);
    let schedule = Schedule::tf(0.999);
    m.write(ctx, &m.params(0));
    let mut gpu_ema = m
        .builder(schedule)
        .extra_ema(Schedule::constant(0.9))
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut off = m
        .builder(schedule)
        .extra_ema(Schedule::constant(0.9))
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 20))
        .unwrap();
    for n in 1..=20 {
        m.write(ctx, &m.params(n));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        gpu_ema.record_update(&mut enc).unwrap();
        off.record_update(&mut enc).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        off.catch_up().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("gpu.safetensors"),
        dir.path().join("off.safetensors"),
    );
    checkpoint::save_training(
        &a,
        &gpu_ema.snapshot(true).unwrap(),
        None,
        &HostTensors::new(),
    )
    .unwrap();
    // Unsettled state is refused, not saved torn: here it is settled (one chunk, caught up).
    assert!(off.is_settled());
    checkpoint::save_training(&b, &off, None, &HostTensors::new()).unwrap();
    let cb = Checkpoint::load(&b).unwrap();
    // The same file: the same header (the metadata's keys come in no fixed order, so it is
    // compared as JSON) and, on drivers that do not fuse, the same data bytes.
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let split = |f: &[u8]| -> (serde_json::Value, Vec<u8>) {
        let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
        (
            serde_json::from_slice(&f[8..8 + n]).unwrap(),
            f[8 + n..].to_vec(),
        )
    };
    let ((hx, dx), (hy, dy)) = (split(&x), split(&y));
    if software {
        assert_eq!(hx, hy, "headers (checksums included)");
        assert!(dx == dy, "the tensor data differ");
    } else {
        assert_eq!(hx["layer0/w"], hy["layer0/w"]);
    }
    let gpu_shadows = gpu_ema.read_shadows_blocking().unwrap();
    let off_shadows = off.read_shadows().unwrap();
    for s in &m.specs {
        let want: Vec<f64> = gpu_shadows
            .try_get(&s.name)
            .unwrap()
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_close(&s.name, off_shadows.try_get(&s.name).unwrap(), &want, 1e-6);
    }
    // Resume from the offloaded file into a fresh offloaded EMA; both go on 10 calls.
    let mut resumed = m
        .builder(schedule)
        .extra_ema(Schedule::constant(0.9))
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(64).slots(2))
        .unwrap();
    resumed.restore(&cb).unwrap();
    assert_eq!(resumed.num_updates(), 20);
    for n in 21..=30 {
        m.write(ctx, &m.params(n));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        off.record_update(&mut enc).unwrap();
        resumed.record_update(&mut enc).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        off.catch_up().unwrap();
        resumed.settle().unwrap();
    }
    for k in 0..2 {
        let (x, y) = (off.read_ema(k).unwrap(), resumed.read_ema(k).unwrap());
        for s in &m.specs {
            assert_eq!(
                bits(x.try_get(&s.name).unwrap()),
                bits(y.try_get(&s.name).unwrap()),
                "EMA {k} {} after resume",
                s.name
            );
        }
    }
    // A checkpoint of another configuration is refused, and changes nothing.
    let mut other = m
        .builder(Schedule::tf(0.99))
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 20))
        .unwrap();
    assert!(other.restore(&cb).is_err());
    assert_eq!(other.num_updates(), 0);
}

/// Swaps and copies into the parameters go chunk by chunk through the ring, exactly both ways;
/// updates are refused in between; unsettled state is refused by checkpoints.
#[test]
fn swaps_and_copies_through_the_ring_are_exact() {
    let Some(ctx) = gpu() else { return };
    let m = model(ctx);
    m.write(ctx, &m.params(0));
    let mut ema = m
        .builder(Schedule::constant(0.7))
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(512).slots(2))
        .unwrap();
    assert!(ema.stats().chunks > 4);
    for n in 1..=6 {
        m.write(ctx, &m.params(n));
        step(ctx, &mut ema);
    }
    assert!(matches!(
        checkpoint::save_training(
            tempfile::tempdir().unwrap().path().join("x"),
            &ema,
            None,
            &HostTensors::new()
        ),
        Err(Error::InvalidConfig(_))
    ));
    let shadows = ema.read_shadows().unwrap();
    let params = m.read_params(ctx);
    for (s, p) in m.specs.iter().zip(&params) {
        assert_ne!(
            bits(shadows.try_get(&s.name).unwrap()),
            bits(p),
            "{}",
            s.name
        );
    }
    ema.swap().unwrap();
    assert!(ema.is_swapped());
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    assert!(matches!(ema.record_update(&mut enc), Err(Error::Swapped)));
    assert!(matches!(ema.read_shadows(), Err(Error::Swapped)));
    let swapped = m.read_params(ctx);
    for (s, p) in m.specs.iter().zip(&swapped) {
        assert_eq!(
            bits(p),
            bits(shadows.try_get(&s.name).unwrap()),
            "{}",
            s.name
        );
    }
    ema.swap().unwrap();
    assert!(!ema.is_swapped());
    let back = m.read_params(ctx);
    assert_eq!(back, params, "the parameters come back exactly");
    assert_eq!(ema.read_shadows().unwrap(), shadows);
    ema.copy_to_params().unwrap();
    let copied = m.read_params(ctx);
    for (s, p) in m.specs.iter().zip(&copied) {
        assert_eq!(
            bits(p),
            bits(shadows.try_get(&s.name).unwrap()),
            "{}",
            s.name
        );
    }
}

/// What an offloaded EMA cannot honour is an error at build, before anything is allocated.
#[test]
fn what_offload_cannot_honour_is_refused_at_build() {
    let Some(ctx) = gpu() else { return };
    let m = model(ctx);
    let build = |b: wgpu_ema::GpuEmaBuilder<'_>, o: Offload| {
        b.build_offloaded(&ctx.device, &ctx.queue, o).map(|_| ())
    };
    let ring = Offload::new(1 << 16);
    // A slot smaller than one word.
    let e = build(m.builder(Schedule::tf(0.99)), Offload::new(12)).unwrap_err();
    assert!(e.to_string().contains("4-byte word"), "{e}");
    assert!(build(m.builder(Schedule::tf(0.99)), ring.slots(0)).is_err());
    assert!(build(m.builder(Schedule::tf(0.99)), ring.per_step(0)).is_err());
    assert!(build(m.builder(Schedule::bema(Bema::default())), ring).is_err());
    let write_back = Policy {
        write_back_every: 3,
        ..Policy::default()
    };
    assert!(build(m.builder(Schedule::tf(0.99)).policy(write_back), ring).is_err());
    // Parameters that cannot be copied out.
    let storage_only = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let b = GpuEma::builder(Schedule::tf(0.99)).track_buffer(
        TensorSpec::new("w", [4]),
        &storage_only,
        0,
    );
    assert!(matches!(build(b, ring), Err(Error::MissingUsage { .. })));
    // Compensated 16-bit parameters (the host's Kahan path is f32).
    let h = half_buffer(ctx, &[1, 2, 3, 4], 0);
    let b = GpuEma::builder(Schedule::tf(0.99))
        .compensated(true)
        .track_buffer_as(TensorSpec::new("h", [4]), &h, 0, ParamDtype::BF16);
    assert!(matches!(build(b, ring), Err(Error::HalfPrecision { .. })));
}

/// The ring is all the GPU memory an offloaded EMA allocates, whatever the model's size (on
/// Vulkan, whose allocator reports what it holds; other backends report nothing).
#[test]
fn the_ring_is_all_the_gpu_memory_it_allocates() {
    if gpu().is_none() {
        return;
    }
    // A device of its own: the allocator's report counts every buffer of its device.
    let ctx = &GpuContext::new().unwrap();
    let allocated = || {
        ctx.device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
    };
    let n = 4 << 20; // 16 MiB of f32 parameters
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [n])]).unwrap();
    arena.write(&ctx.queue, "w", &random(5, n)).unwrap();
    let ring = 1u64 << 20;
    // The write's own staging is freed once it has landed.
    ctx.queue.submit(None);
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let Some(before) = allocated() else {
        eprintln!("SKIPPED: this backend reports no allocations");
        return;
    };
    let mut ema = GpuEma::builder(Schedule::tf(0.99))
        .track_arena(&arena)
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(ring))
        .unwrap();
    step(ctx, &mut ema);
    ema.settle().unwrap();
    let offloaded = allocated().unwrap().saturating_sub(before);
    assert_eq!(ema.stats().gpu_bytes, ring);
    // The ring, and no more than allocation granularity besides (no shadow-sized buffer).
    assert!(
        offloaded <= ring + (1 << 20),
        "the offloaded EMA allocated {offloaded} bytes for a ring of {ring}"
    );
    drop(ema);
    // Dropped buffers are freed at the next poll.
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let before = allocated().unwrap();
    let on_gpu = GpuEma::builder(Schedule::tf(0.99))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let shadows = allocated().unwrap().saturating_sub(before);
    assert!(
        shadows >= (n * 4) as u64,
        "on-GPU shadows took {shadows} bytes"
    );
    drop(on_gpu);
}

/// A tensor its framework moved is followed after `rebind`: the EMA goes on, bit for bit
/// `CpuEma`'s; an arena tensor or a buffer that cannot be copied out is refused.
#[test]
fn a_moved_tensor_is_followed_after_rebind() {
    let Some(ctx) = gpu() else { return };
    let m = model(ctx);
    let schedule = Schedule::constant(0.8);
    let p0 = m.params(0);
    m.write(ctx, &p0);
    let mut cpu = CpuEma::new(schedule, Numerics::Exact).unwrap();
    for (s, v) in m.specs.iter().zip(&p0) {
        cpu.track(s.clone(), v).unwrap();
    }
    let mut ema = m
        .builder(schedule)
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(256).slots(2))
        .unwrap();
    let moved_offset = 40u64;
    let moved = buffer_with(ctx, &random(1, USER), moved_offset);
    for n in 1..=10u64 {
        let p = m.params(n);
        if n == 6 {
            ema.rebind("user/b", &moved, moved_offset).unwrap();
        }
        m.write(ctx, &p);
        if n >= 6 {
            ctx.queue
                .write_buffer(&moved, moved_offset, bytemuck::cast_slice(&p[SIZES.len()]));
            // The old buffer holds something else now: reading it would show.
            ctx.queue.write_buffer(
                &m.user,
                USER_OFFSET,
                bytemuck::cast_slice(&[f32::NAN; USER]),
            );
        }
        step(ctx, &mut ema);
        ema.settle().unwrap();
        let views: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
        cpu.update(&views).unwrap();
    }
    let got = ema.read_shadows().unwrap();
    for s in &m.specs {
        assert_eq!(
            bits(got.try_get(&s.name).unwrap()),
            bits(cpu.shadow(&s.name).unwrap()),
            "{}",
            s.name
        );
    }
    assert!(matches!(
        ema.rebind("layer0/w", &moved, 0),
        Err(Error::NotRebindable { .. })
    ));
    let storage_only = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    assert!(matches!(
        ema.rebind("user/b", &storage_only, 0),
        Err(Error::MissingUsage { .. })
    ));
    assert!(matches!(
        ema.rebind("nope", &moved, 0),
        Err(Error::UnknownName { .. })
    ));
}

/// Post-hoc snapshots written from host memory (`Recorder::write` of a settled offloaded EMA)
/// hold the values the on-GPU EMA's recorder writes (bit for bit where the driver does not
/// fuse the multiply-add).
#[test]
fn post_hoc_snapshots_are_written_from_host_memory() {
    use wgpu_ema::checkpoint::TensorFile;
    use wgpu_ema::posthoc::{self, Recorder, SnapshotSet};
    let Some(ctx) = gpu() else { return };
    let software = ctx.adapter.get_info().device_type == wgpu::DeviceType::Cpu;
    let m = model(ctx);
    m.write(ctx, &m.params(0));
    let sigma_rels = [0.05, 0.10];
    let mut on_gpu = posthoc::builder(&sigma_rels)
        .unwrap()
        .track_arena(&m.arena)
        .track_buffer(TensorSpec::new("user/b", [USER]), &m.user, USER_OFFSET)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut off = posthoc::builder(&sigma_rels)
        .unwrap()
        .track_arena(&m.arena)
        .track_buffer(TensorSpec::new("user/b", [USER]), &m.user, USER_OFFSET)
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 20))
        .unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut rec_a = Recorder::open(a.path(), 20).unwrap();
    let mut rec_b = Recorder::open(b.path(), 20).unwrap();
    for n in 1..=60u64 {
        m.write(ctx, &m.params(n));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        on_gpu.record_update(&mut enc).unwrap();
        off.record_update(&mut enc).unwrap();
        ctx.queue.submit(Some(enc.finish()));
        // Every step sampled (the host catches up), as the on-GPU EMA is.
        off.catch_up().unwrap();
        rec_a.after_update(&on_gpu).unwrap();
        if n % 20 == 0 {
            off.settle().unwrap();
            rec_b.write(&off).unwrap();
        }
    }
    rec_a.finish().unwrap();
    rec_b.finish().unwrap();
    assert_eq!(off.stats().skipped, 0);
    let (sa, sb) = (
        SnapshotSet::open(a.path()).unwrap(),
        SnapshotSet::open(b.path()).unwrap(),
    );
    assert_eq!(sa.snapshots().len(), 3, "one file per recorded step");
    assert_eq!(sa.snapshots().len(), sb.snapshots().len());
    for (x, y) in sa.snapshots().iter().zip(sb.snapshots()) {
        assert_eq!((x.index, x.t), (y.index, y.t));
        let (fx, fy) = (
            TensorFile::open(&x.path).unwrap(),
            TensorFile::open(&y.path).unwrap(),
        );
        for t in fx.tensors() {
            let (vx, vy) = (fx.read_f32(&t.name).unwrap(), fy.read_f32(&t.name).unwrap());
            if software {
                assert_eq!(bits(&vx), bits(&vy), "{} of snapshot {}", t.name, x.index);
            } else {
                let want: Vec<f64> = vx.iter().map(|&v| f64::from(v)).collect();
                assert_close(&t.name, &vy, &want, 1e-3);
            }
        }
    }
}

/// An encoder dropped without submit loses nothing: its sample goes back to its chunk, whose
/// next sample takes both gaps, and nothing waits for it. A read while an encoder holding a
/// sample is unsubmitted is an error (it would miss that step), and succeeds once submitted.
#[test]
fn a_dropped_encoder_gives_its_sample_back() {
    let Some(ctx) = gpu() else { return };
    let n = 70usize;
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [n])]).unwrap();
    let values = |t: u64| random(300 + t, n);
    arena.write(&ctx.queue, "w", &values(0)).unwrap();
    let decay = 0.9f64;
    let mut ema = GpuEma::builder(Schedule::constant(decay))
        .track_arena(&arena)
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(1 << 16))
        .unwrap();
    let mut reference: Vec<f64> = values(0).iter().map(|&x| f64::from(x)).collect();
    let mut last = 0u64;
    for t in 1..=10u64 {
        arena.write(&ctx.queue, "w", &values(t)).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_update(&mut enc).unwrap();
        if t == 4 || t == 7 {
            // A step abandoned after recording (a NaN loss, say): the encoder is dropped.
            drop(enc);
            continue;
        }
        ctx.queue.submit(Some(enc.finish()));
        ema.catch_up().unwrap();
        let d = decay.powi((t - last) as i32);
        for (r, &p) in reference.iter_mut().zip(&values(t)) {
            *r = d * *r + (1.0 - d) * f64::from(p);
        }
        last = t;
    }
    let got = ema.read_shadows().unwrap();
    assert_close(
        "after dropped encoders",
        got.try_get("w").unwrap(),
        &reference,
        1e-6,
    );
    assert_eq!(ema.stats().in_flight, 0);

    // An update recorded and not yet submitted: reads refuse, then go on once it is.
    arena.write(&ctx.queue, "w", &values(11)).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_update(&mut enc).unwrap();
    let e = ema.read_shadows().unwrap_err();
    assert!(e.to_string().contains("not yet submitted"), "{e}");
    ctx.queue.submit(Some(enc.finish()));
    let d = decay;
    for (r, &p) in reference.iter_mut().zip(&values(11)) {
        *r = d * *r + (1.0 - d) * f64::from(p);
    }
    let got = ema.read_shadows().unwrap();
    assert_close(
        "after the late submit",
        got.try_get("w").unwrap(),
        &reference,
        1e-6,
    );
}
