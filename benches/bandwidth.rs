//! The benchmark table: our GPU and CPU paths against this machine's measured memory
//! bandwidth for the same access pattern, and against what users would write instead.
//!
//! ```text
//! cargo bench --bench bandwidth -- [--quick] [--cpu-only] [--update-only] [--fused-only] [--out DIR]
//! ```
//!
//! `--update-only` measures just the GPU update of one tensor against the bandwidth kernel
//! at each size (no CPU rows, no models), `--fused-only` just the reference optimizers with
//! and without the fused epilogue: for iterating on the shaders.
//!
//! The update moves 12 bytes per f32 element (read param, read shadow, write shadow); the
//! f64 reference moves 20 (read an f32 param, read and write an f64 shadow). Each row:
//! elements, median milliseconds, GB/s, and % of the bandwidth measured in the same run with
//! `a += s * b` (also 12 bytes per element): on the CPU over all cores, on the GPU as a WGSL
//! kernel with `vec4<f32>` loads timed like our update (submit, then wait for that submit).
//! Writes `bench.csv` and `bandwidth.png` to `--out` (default `target/bench/`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use wgpu_ema::{cpu, wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec, Tiling};

#[path = "shared/optimizers.rs"]
mod optimizers;

#[path = "shared/models.rs"]
mod models;
use models::{gpt2_small, resnet50};

type Error = Box<dyn std::error::Error>;

struct Row {
    path: String,
    elements: u64,
    median_ms: f64,
    gb_per_s: f64,
    pct: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `reps` runs of `f` after one warm-up run, capped at ~`budget` in total.
fn time(reps: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f();
        out.push(t.elapsed().as_secs_f64());
        if start.elapsed() > budget && out.len() >= 3 {
            break;
        }
    }
    median(out)
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f32() - 0.5).collect()
}

fn axpy_serial(a: &mut [f32], b: &[f32], s: f32) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x += s * y;
    }
}

/// `a += s * b` over all cores: the CPU's bandwidth for the update's access pattern.
fn cpu_axpy(a: &mut [f32], b: &[f32], s: f32) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = a.len().div_ceil(threads).next_multiple_of(1024);
    std::thread::scope(|scope| {
        for (x, y) in a.chunks_mut(chunk).zip(b.chunks(chunk)) {
            scope.spawn(move || {
                for (x, &y) in x.iter_mut().zip(y) {
                    *x += s * y;
                }
            });
        }
    });
}

fn row(path: &str, n: u64, secs: f64, bytes_per_elem: u64, bandwidth: f64) -> Row {
    let gbs = (n * bytes_per_elem) as f64 / secs / 1e9;
    Row {
        path: path.to_string(),
        elements: n,
        median_ms: secs * 1e3,
        gb_per_s: gbs,
        pct: 100.0 * gbs / bandwidth,
    }
}

struct Args {
    quick: bool,
    cpu_only: bool,
    update_only: bool,
    fused_only: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        quick: false,
        cpu_only: false,
        update_only: false,
        fused_only: false,
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        match f.as_str() {
            "--quick" => a.quick = true,
            "--cpu-only" => a.cpu_only = true,
            "--update-only" => a.update_only = true,
            "--fused-only" => a.fused_only = true,
            "--out" => a.out = it.next().ok_or("--out needs a value")?.into(),
            "--bench" => {} // passed by `cargo bench`-style runners
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(a)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if let Ok(s) = ProgressStyle::with_template("{msg:>12} {bar:30} {pos}/{len}") {
        b.set_style(s);
    }
    b.set_message(what.to_string());
    b
}

fn cpu_rows(sizes: &[u64], reps: usize, rows: &mut Vec<Row>) -> f64 {
    let pb = bar(sizes.len() as u64, "cpu");
    let mut bw_at = Vec::new();
    for &n in sizes {
        let n_us = n as usize;
        let p = data(n_us, 1);
        let mut s = data(n_us, 2);
        let budget = Duration::from_millis(1500);
        // The better of one thread and all threads (spawning costs more than small sizes).
        let t_bw =
            time(reps, budget, || cpu_axpy(&mut s, &p, 1e-3))
                .min(time(reps, budget, || axpy_serial(&mut s, &p, 1e-3)));
        let bw = (12 * n) as f64 / t_bw / 1e9;
        bw_at.push((n, bw));
        rows.push(row("cpu-bandwidth", n, t_bw, 12, bw));
        let t = time(reps, budget, || {
            let _ = cpu::ema_step(&mut s, &p, 1e-3);
        });
        rows.push(row("cpu", n, t, 12, bw));
        let mut s64: Vec<f64> = s.iter().map(|&x| x as f64).collect();
        let t = time(reps.min(7), budget, || {
            let _ = cpu::ema_step_f64(&mut s64, &p, 1e-3);
        });
        rows.push(row("cpu-f64-reference", n, t, 20, bw));
        pb.inc(1);
    }
    pb.finish_and_clear();
    bw_at
        .iter()
        .find(|(n, _)| *n == 1 << 24)
        .or(bw_at.last())
        .map_or(0.0, |x| x.1)
}

struct GpuBench<'a> {
    ctx: &'a GpuContext,
    module: wgpu::ShaderModule,
}

impl GpuBench<'_> {
    fn wait(&self, idx: wgpu::SubmissionIndex) {
        let _ = self.ctx.device.poll(wgpu::PollType::Wait {
            submission_index: Some(idx),
            timeout: None,
        });
    }

    fn storage(&self, n: u64, read_only: bool) -> wgpu::Buffer {
        let _ = read_only;
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: n * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn uniform(&self, v: f32) -> wgpu::Buffer {
        let b = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ctx
            .queue
            .write_buffer(&b, 0, bytemuck::cast_slice(&[v, 0.0, 0.0, 0.0]));
        b
    }

    fn pipeline(&self, entry: &str) -> wgpu::ComputePipeline {
        self.ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &self.module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
    }

    fn groups(items: u64) -> (u32, u32) {
        let g = items.div_ceil(256).max(1);
        let x = g.min(65_535);
        (x as u32, g.div_ceil(x) as u32)
    }

    /// The same tensors tracked two ways: in an arena, and one user buffer each (returned so
    /// that other kernels can use them too).
    fn arena_and_buffers(
        &self,
        specs: &[TensorSpec],
        schedule: Schedule,
    ) -> Result<(ParamArena, GpuEma, Vec<wgpu::Buffer>, GpuEma), Error> {
        let ctx = self.ctx;
        let arena = ParamArena::new(&ctx.device, specs.to_vec())?;
        let a = GpuEma::builder(schedule)
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let params: Vec<wgpu::Buffer> = specs
            .iter()
            .map(|s| self.storage(s.numel(), true))
            .collect();
        let b = specs
            .iter()
            .zip(&params)
            .fold(GpuEma::builder(schedule), |bld, (s, p)| {
                bld.track_buffer(s.clone(), p, 0)
            })
            .build(&ctx.device, &ctx.queue)?;
        Ok((arena, a, params, b))
    }

    /// Median seconds of `ema.update()`, each waited for (as [`time`]).
    fn time_updates(&self, ema: &mut GpuEma, reps: usize, budget: Duration) -> f64 {
        time(reps, budget, || {
            if let Ok(idx) = ema.update() {
                self.wait(idx);
            }
        })
    }

    /// Seconds per `a += s*b` pass (vec4), one submit each, waited for, and the elements it
    /// covered (`n`, or fewer where `n` exceeds one storage binding).
    fn bandwidth(&self, n: u64, reps: usize) -> (f64, u64) {
        let limit = self.ctx.device.limits().max_storage_buffer_binding_size / 4;
        let n = n.min(limit) / 4 * 4;
        let (a, b) = (self.storage(n, false), self.storage(n, true));
        let s = self.uniform(1e-3);
        let pipe = self.pipeline("axpy_vec4");
        let bg = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipe.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: a.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: b.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: s.as_entire_binding(),
                    },
                ],
            });
        let (x, y) = Self::groups(n / 4);
        let t = time(reps, Duration::from_millis(1500), || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipe);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
            self.wait(self.ctx.queue.submit(Some(enc.finish())));
        });
        (t, n)
    }
}

/// `--update-only`: the update of one tensor (the device's default tiling, then each tiling)
/// against the bandwidth kernel at each size, measured in alternation (7 rounds of 3 runs
/// each) so that all see the same machine state; the rows hold the medians over the rounds,
/// and a note each round's ratio.
fn update_vs_bandwidth(
    gb: &GpuBench<'_>,
    sizes: &[u64],
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<f64, Error> {
    let ctx = gb.ctx;
    let pb = bar(sizes.len() as u64, "gpu");
    let mut bw_ref = 0.0;
    for &n in sizes {
        let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n as usize])])?;
        // The device's default tiling, then each one.
        let mut emas = Vec::new();
        for tiling in [Tiling::Auto, Tiling::Gpu, Tiling::Software] {
            emas.push(
                GpuEma::builder(Schedule::tf(0.999))
                    .tiling(tiling)
                    .track_arena(&arena)
                    .build(&ctx.device, &ctx.queue)?,
            );
        }
        let mut t_bw = Vec::new();
        let mut t_up = vec![Vec::new(); emas.len()];
        let mut ratios = vec![Vec::new(); emas.len()];
        let mut n_bw = n;
        for _ in 0..7 {
            let (t, covered) = gb.bandwidth(n, 3);
            n_bw = covered;
            t_bw.push(t);
            for (k, ema) in emas.iter_mut().enumerate() {
                let u = gb.time_updates(ema, 3, Duration::from_millis(500));
                ratios[k].push((12 * n) as f64 / u / ((12 * covered) as f64 / t));
                t_up[k].push(u);
            }
        }
        let t = median(t_bw);
        let bw = (12 * n_bw) as f64 / t / 1e9;
        if n <= 1 << 24 {
            bw_ref = bw;
        }
        rows.push(row("gpu-bandwidth", n_bw, t, 12, bw));
        for (k, path) in ["gpu", "gpu-tiling-gpu", "gpu-tiling-software"]
            .into_iter()
            .enumerate()
        {
            rows.push(row(path, n, median(t_up[k].clone()), 12, bw));
            let mut sorted = ratios[k].clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let r: Vec<String> = sorted
                .iter()
                .map(|x| format!("{:.0}%", 100.0 * x))
                .collect();
            notes.push(format!(
                "2^{} {path}: update / bandwidth per round (sorted): {}; median {:.1}%",
                n.trailing_zeros(),
                r.join(" "),
                100.0 * median(ratios[k].clone())
            ));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(bw_ref)
}

fn gpu_rows(
    gb: &GpuBench<'_>,
    sizes: &[u64],
    reps: usize,
    quick: bool,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<f64, Error> {
    let ctx = gb.ctx;
    let pb = bar(sizes.len() as u64, "gpu");
    let mut bw_ref = 0.0;
    for &n in sizes {
        let (t_bw, n_bw) = gb.bandwidth(n, reps);
        let bw = (12 * n_bw) as f64 / t_bw / 1e9;
        if n <= 1 << 24 {
            bw_ref = bw;
        }
        rows.push(row("gpu-bandwidth", n_bw, t_bw, 12, bw));
        let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n as usize])])?;
        let mut ema = GpuEma::builder(Schedule::tf(0.999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let t = gb.time_updates(&mut ema, reps, Duration::from_millis(1500));
        rows.push(row("gpu", n, t, 12, bw));
        // Several steps in one encoder: per-step time.
        let k = 4;
        let t = time(reps, Duration::from_millis(1500), || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let _ = ema.record_updates(&mut enc, k);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        }) / k as f64;
        rows.push(row("gpu-4-steps-per-submit", n, t, 12, bw));
        pb.inc(1);
    }
    pb.finish_and_clear();

    // Two EMAs of the same parameters: one pass (reads the params once: 20 bytes per
    // element) against two separate passes (24 bytes).
    for &n in sizes.iter().filter(|&&n| n == 1 << 22 || n == 1 << 24) {
        let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n as usize])])?;
        let mut both = GpuEma::builder(Schedule::constant(0.999))
            .extra_ema(Schedule::constant(0.9999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let mut one = GpuEma::builder(Schedule::constant(0.999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let mut two = GpuEma::builder(Schedule::constant(0.9999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let t1 = gb.time_updates(&mut both, reps, Duration::from_millis(1500));
        let t2 = time(reps, Duration::from_millis(1500), || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let _ = one.record_update(&mut enc);
            let _ = two.record_update(&mut enc);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        rows.push(row("gpu-2-emas-one-pass", n, t1, 20, bw_ref.max(1e-9)));
        rows.push(row("gpu-2-emas-two-passes", n, t2, 24, bw_ref.max(1e-9)));
        // bf16 parameters, f32 shadows: 2 + 8 = 10 bytes per element.
        let params16 = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: n * 2,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut half = GpuEma::builder(Schedule::constant(0.999))
            .track_buffer_as(
                TensorSpec::new("p", [n as usize]),
                &params16,
                0,
                wgpu_ema::ParamDtype::BF16,
            )
            .build(&ctx.device, &ctx.queue)?;
        let t3 = gb.time_updates(&mut half, reps, Duration::from_millis(1500));
        rows.push(row("gpu-bf16-params", n, t3, 10, bw_ref.max(1e-9)));
        // Compensated shadows: 4 + 16 = 20 bytes per element, and the error-free arithmetic.
        let mut kahan = GpuEma::builder(Schedule::constant(0.999))
            .compensated(true)
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)?;
        let t4 = gb.time_updates(&mut kahan, reps, Duration::from_millis(1500));
        rows.push(row("gpu-compensated", n, t4, 20, bw_ref.max(1e-9)));
    }

    // Model-shaped workloads: arena vs separate user buffers vs the naive way.
    let models: Vec<(&str, Vec<TensorSpec>)> = if quick {
        vec![("resnet50", resnet50())]
    } else {
        vec![("resnet50", resnet50()), ("gpt2-small", gpt2_small())]
    };
    for (model, specs) in models {
        let total: u64 = specs.iter().map(TensorSpec::numel).sum();
        let (arena, mut a, params, mut b) = gb.arena_and_buffers(&specs, Schedule::tf(0.999))?;
        let bw = bw_ref.max(1e-9);
        let t = gb.time_updates(&mut a, reps, Duration::from_secs(3));
        rows.push(row(&format!("gpu-{model}-arena"), total, t, 12, bw));
        // The arena under each tiling, whatever the device's default.
        for (tiling, name) in [(Tiling::Gpu, "gpu"), (Tiling::Software, "software")] {
            let mut e = GpuEma::builder(Schedule::tf(0.999))
                .tiling(tiling)
                .track_arena(&arena)
                .build(&ctx.device, &ctx.queue)?;
            let t = gb.time_updates(&mut e, reps, Duration::from_secs(3));
            rows.push(row(
                &format!("gpu-{model}-arena-tiling-{name}"),
                total,
                t,
                12,
                bw,
            ));
        }
        let t = gb.time_updates(&mut b, reps, Duration::from_secs(3));
        rows.push(row(&format!("gpu-{model}-buffers"), total, t, 12, bw));
        // The naive way: one uniform write and one dispatch per tensor, each tensor bound
        // whole; it cannot handle a tensor larger than one binding.
        let limit = ctx.device.limits().max_storage_buffer_binding_size;
        if let Some(big) = specs.iter().find(|s| s.numel() * 4 > limit) {
            notes.push(format!(
                "{model}: the naive per-tensor way cannot bind `{}` ({} bytes > the {limit}-byte binding limit); no naive row",
                big.name,
                big.numel() * 4
            ));
            continue;
        }
        let naive = Naive::new(gb, &specs, &params);
        let t = time(reps, Duration::from_secs(3), || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            naive.record(ctx, &mut enc);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        rows.push(row(&format!("gpu-{model}-naive"), total, t, 12, bw));
    }
    host_costs(gb, notes)?;
    target_networks(gb, reps, rows, notes, bw_ref.max(1e-9))?;
    let n = if quick { 1 << 22 } else { 1 << 24 };
    fused_optimizers(gb, n, reps, rows, notes, bw_ref.max(1e-9))?;
    Ok(bw_ref)
}

/// Reference optimizers (`benches/shared/optimizers.rs`: SGD, SGD with momentum, AdamW) over one
/// tensor of `n` f32, each alone, followed by our separate EMA pass, and with the EMA fused
/// into it (`GpuEma::epilogue`), in the same run. Bytes per element: the optimizer's, +12 for
/// the pass, +8 fused.
fn fused_optimizers(
    gb: &GpuBench<'_>,
    n: u64,
    reps: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    bw: f64,
) -> Result<(), Error> {
    let ctx = gb.ctx;
    let device = &ctx.device;
    let arena = ParamArena::new(device, [TensorSpec::new("p", [n as usize])])?;
    arena.write(&ctx.queue, "p", &data(n as usize, 3))?;
    let mut ema = GpuEma::builder(Schedule::tf(0.999))
        .track_arena(&arena)
        .build(device, &ctx.queue)?;
    let epilogue = ema.epilogue(1)?;
    let opt = optimizers::Optimizers::new(device, &ctx.queue, &arena, &epilogue, n)?;
    let budget = Duration::from_secs(3);
    for (which, &(entry, bytes)) in optimizers::OPTIMIZERS.iter().enumerate() {
        let alone = time(reps, budget, || {
            let mut enc = device.create_command_encoder(&Default::default());
            opt.record(&mut enc, which, None);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        let separate = time(reps, budget, || {
            let mut enc = device.create_command_encoder(&Default::default());
            opt.record(&mut enc, which, None);
            let _ = ema.record_update(&mut enc);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        let together = time(reps, budget, || {
            let Ok(step) = ema.fused_step() else { return };
            let mut enc = device.create_command_encoder(&Default::default());
            opt.record(&mut enc, which, Some(&step));
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        rows.push(row(&format!("opt-{entry}"), n, alone, bytes, bw));
        rows.push(row(
            &format!("opt-{entry}+ema-pass"),
            n,
            separate,
            bytes + 12,
            bw,
        ));
        rows.push(row(
            &format!("opt-{entry}-fused"),
            n,
            together,
            bytes + 8,
            bw,
        ));
        notes.push(format!(
            "{entry} + EMA on {n} f32: {:.3} ms with the separate pass, {:.3} ms fused: {:.2}x (the bytes say {}/{} = {:.2}x); the optimizer alone {:.3} ms",
            separate * 1e3,
            together * 1e3,
            separate / together,
            bytes + 12,
            bytes + 8,
            (bytes + 12) as f64 / (bytes + 8) as f64,
            alone * 1e3,
        ));
    }
    Ok(())
}

/// A 3-layer MLP as RL agents use for a target network (Atari-RAM-sized input 128, two hidden
/// layers of 256, 18 actions): 6 tensors, 103,442 parameters.
fn mlp3() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("l1.weight", [256, 128]),
        TensorSpec::new("l1.bias", [256]),
        TensorSpec::new("l2.weight", [256, 256]),
        TensorSpec::new("l2.bias", [256]),
        TensorSpec::new("l3.weight", [18, 256]),
        TensorSpec::new("l3.bias", [18]),
    ]
}

/// A target network's soft update (`Schedule::polyak(0.005)`) of ResNet-50's and a 3-layer
/// MLP's tensors: ours (an arena: one dispatch; one buffer per tensor) against the per-tensor
/// loop a user writes without the crate, in the same run. Wall time of one step submitted and
/// waited for, and the host's time to record and submit one without waiting.
fn target_networks(
    gb: &GpuBench<'_>,
    reps: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    bw: f64,
) -> Result<(), Error> {
    let ctx = gb.ctx;
    for (model, specs) in [("resnet50", resnet50()), ("mlp3", mlp3())] {
        let total: u64 = specs.iter().map(TensorSpec::numel).sum();
        let (_arena, mut a, params, mut b) =
            gb.arena_and_buffers(&specs, Schedule::polyak(0.005)?)?;
        let naive = Naive::new(gb, &specs, &params);
        let budget = Duration::from_secs(2);
        let ta = gb.time_updates(&mut a, reps, budget);
        let tb = gb.time_updates(&mut b, reps, budget);
        let tn = time(reps, budget, || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            naive.record(ctx, &mut enc);
            gb.wait(ctx.queue.submit(Some(enc.finish())));
        });
        rows.push(row(&format!("target-{model}-arena"), total, ta, 12, bw));
        rows.push(row(&format!("target-{model}-buffers"), total, tb, 12, bw));
        rows.push(row(
            &format!("target-{model}-per-tensor"),
            total,
            tn,
            12,
            bw,
        ));
        let host = |f: &mut dyn FnMut()| host_us(ctx, 100, 10, f);
        let record = |ema: &mut GpuEma| {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let _ = ema.record_update(&mut enc);
            drop(enc.finish());
        };
        let (ra, rb) = (host(&mut || record(&mut a)), host(&mut || record(&mut b)));
        let rn = host(&mut || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            naive.record(ctx, &mut enc);
            drop(enc.finish());
        });
        notes.push(format!(
            "target network soft update, {model} ({} tensors, {total} parameters): per step {:.3} ms arena / {:.3} ms {} buffers / {:.3} ms per-tensor loop (wall, waited); recording one step {ra:.1} / {rb:.1} / {rn:.1} us",
            specs.len(),
            ta * 1e3,
            tb * 1e3,
            specs.len(),
            tn * 1e3,
        ));
    }
    Ok(())
}

/// What a user writes without the crate: per tensor, its own shadow buffer, a uniform holding
/// alpha rewritten every step, and one scalar dispatch.
struct Naive {
    pipe: wgpu::ComputePipeline,
    uniforms: Vec<wgpu::Buffer>,
    groups: Vec<wgpu::BindGroup>,
    counts: Vec<u64>,
}

impl Naive {
    fn new(gb: &GpuBench<'_>, specs: &[TensorSpec], params: &[wgpu::Buffer]) -> Self {
        let pipe = gb.pipeline("naive_ema");
        let uniforms: Vec<wgpu::Buffer> = specs.iter().map(|_| gb.uniform(1e-3)).collect();
        let groups = specs
            .iter()
            .zip(params)
            .zip(&uniforms)
            .map(|((s, p), u)| {
                let shadow = gb.storage(s.numel(), false);
                gb.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipe.get_bind_group_layout(0),
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: shadow.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: p.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: u.as_entire_binding(),
                        },
                    ],
                })
            })
            .collect();
        Self {
            pipe,
            uniforms,
            groups,
            counts: specs.iter().map(TensorSpec::numel).collect(),
        }
    }

    fn record(&self, ctx: &GpuContext, enc: &mut wgpu::CommandEncoder) {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipe);
        for ((u, g), &n) in self.uniforms.iter().zip(&self.groups).zip(&self.counts) {
            ctx.queue
                .write_buffer(u, 0, bytemuck::cast_slice(&[1e-3f32, 0.0, 0.0, 0.0]));
            pass.set_bind_group(0, g, &[]);
            let (x, y) = GpuBench::groups(n);
            pass.dispatch_workgroups(x, y, 1);
        }
    }
}

/// Median host microseconds of `rounds` calls of `f`, letting the device catch up every `every`
/// calls (so that queued work does not pile up) and at the end.
fn host_us(ctx: &GpuContext, rounds: usize, every: usize, f: &mut dyn FnMut()) -> f64 {
    let mut v = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e6);
        if i % every == every - 1 {
            let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
        }
    }
    let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
    median(v)
}

/// Host cost of one step, record + submit without waiting, for 161 tensors: an arena, 161
/// user buffers, and the naive way. Tensors are tiny (64 elements) so that the device's work
/// (which a software device runs inside `submit`) does not count.
fn host_costs(gb: &GpuBench<'_>, notes: &mut Vec<String>) -> Result<(), Error> {
    let ctx = gb.ctx;
    let specs: Vec<TensorSpec> = (0..161)
        .map(|i| TensorSpec::new(format!("t{i}"), [64]))
        .collect();
    let (_arena, mut a, params, mut b) = gb.arena_and_buffers(&specs, Schedule::tf(0.999))?;
    let naive_way = Naive::new(gb, &specs, &params);
    let naive = |submit: bool| {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        naive_way.record(ctx, &mut enc);
        let cb = enc.finish();
        if submit {
            ctx.queue.submit(Some(cb));
        }
    };
    let host = |f: &mut dyn FnMut()| host_us(ctx, 300, 50, f);
    let ha = host(&mut || {
        let _ = a.update();
    });
    let hb = host(&mut || {
        let _ = b.update();
    });
    let hn = host(&mut || naive(true));
    // Recording alone (encoder, pass, finish; no submit): the crate's own share.
    let record = |ema: &mut GpuEma| {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let _ = ema.record_update(&mut enc);
        drop(enc.finish());
    };
    let ra = host(&mut || record(&mut a));
    let rb = host(&mut || record(&mut b));
    let rn = host(&mut || naive(false));
    notes.push(format!(
        "host cost per step, 161 tensors (median of 300), record + submit without waiting: arena {ha:.1} us ({} dispatch), 161 user buffers {hb:.1} us ({} dispatches), naive per-tensor {hn:.1} us (161 dispatches + 161 uniform writes); recording alone: arena {ra:.1} us, user buffers {rb:.1} us, naive {rn:.1} us",
        a.dispatches_per_step(),
        b.dispatches_per_step(),
    ));
    Ok(())
}

fn write_csv(path: &std::path::Path, rows: &[Row]) -> Result<(), Error> {
    let mut s = String::from("path,elements,median_ms,gb_per_s,pct_of_bandwidth\n");
    for r in rows {
        s += &format!(
            "{},{},{:.6},{:.3},{:.1}\n",
            r.path, r.elements, r.median_ms, r.gb_per_s, r.pct
        );
    }
    std::fs::write(path, s)?;
    Ok(())
}

fn plot(path: &std::path::Path, rows: &[Row], title: &str) -> Result<(), Error> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad font")?;
    let series: Vec<&str> = [
        "cpu-bandwidth",
        "cpu",
        "cpu-f64-reference",
        "gpu-bandwidth",
        "gpu",
        "gpu-4-steps-per-submit",
    ]
    .into_iter()
    .filter(|p| rows.iter().any(|r| r.path == *p))
    .collect();
    let pts: Vec<&Row> = rows
        .iter()
        .filter(|r| series.contains(&r.path.as_str()))
        .collect();
    let (xmin, xmax) = pts.iter().fold((f64::MAX, 0.0f64), |(a, b), r| {
        (a.min(r.elements as f64), b.max(r.elements as f64))
    });
    let ymax = pts.iter().fold(0.0f64, |m, r| m.max(r.gb_per_s));
    let ymin = pts
        .iter()
        .fold(f64::MAX, |m, r| m.min(r.gb_per_s))
        .max(1e-3);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (xmin..xmax).log_scale(),
            (ymin * 0.8..ymax * 1.3).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("elements (f32)")
        .y_desc("GB/s (12 bytes per element; f64 reference 20)")
        .label_style(("sans-serif", 13))
        .draw()?;
    let colors = [BLACK, RED, MAGENTA, RGBColor(120, 120, 120), BLUE, CYAN];
    for (i, p) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let data: Vec<(f64, f64)> = pts
            .iter()
            .filter(|r| r.path == *p)
            .map(|r| (r.elements as f64, r.gb_per_s))
            .collect();
        let style = if p.ends_with("bandwidth") {
            c.stroke_width(1)
        } else {
            c.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(data.clone(), style))?
            .label(*p)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart.draw_series(data.into_iter().map(|xy| Circle::new(xy, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (max_log2, reps) = if args.quick { (24, 5) } else { (26, 11) };
    let sizes: Vec<u64> = (10..=max_log2).step_by(2).map(|k| 1u64 << k).collect();
    let mut rows = Vec::new();
    println!(
        "measuring the CPU path ({cores} threads){}",
        if args.quick { ", --quick" } else { "" }
    );
    let cpu_bw = if args.update_only || args.fused_only {
        0.0
    } else {
        cpu_rows(&sizes, reps, &mut rows)
    };
    let mut notes = Vec::new();
    let mut gpu_summary = String::from("GPU: not measured (--cpu-only)");
    if !args.cpu_only {
        match GpuContext::new() {
            Ok(ctx) => {
                println!("measuring the GPU path on {}", ctx.describe());
                let gb = GpuBench {
                    ctx: &ctx,
                    module: ctx
                        .device
                        .create_shader_module(wgpu::include_wgsl!("bench_kernels.wgsl")),
                };
                let gpu_sizes: Vec<u64> = sizes
                    .iter()
                    .copied()
                    .filter(|&n| !args.quick || n <= 1 << 22 || n == 1 << 24)
                    .filter(|&n| !args.update_only || n >= 1 << 20)
                    .collect();
                let bw = if args.update_only {
                    update_vs_bandwidth(&gb, &gpu_sizes, &mut rows, &mut notes)?
                } else if args.fused_only {
                    let n = 1 << 22;
                    let (t, covered) = gb.bandwidth(n, reps);
                    let bw = (12 * covered) as f64 / t / 1e9;
                    rows.push(row("gpu-bandwidth", covered, t, 12, bw));
                    fused_optimizers(&gb, n, reps, &mut rows, &mut notes, bw)?;
                    bw
                } else {
                    gpu_rows(&gb, &gpu_sizes, reps, args.quick, &mut rows, &mut notes)?
                };
                let at = rows
                    .iter()
                    .find(|r| r.path == "gpu" && r.elements == 1 << 24);
                gpu_summary = match at {
                    Some(r) => format!(
                        "GPU update {:.1}% at 2^24 ({:.1} of {bw:.1} GB/s) on {}",
                        r.pct,
                        r.gb_per_s,
                        ctx.describe()
                    ),
                    None => format!("GPU on {}", ctx.describe()),
                };
            }
            Err(e) => gpu_summary = format!("GPU: no adapter ({e})"),
        }
    }

    println!(
        "\n{:<28} {:>10} {:>12} {:>9} {:>9}",
        "path", "elements", "median ms", "GB/s", "% of bw"
    );
    for r in &rows {
        println!(
            "{:<28} {:>10} {:>12.4} {:>9.2} {:>8.1}%",
            r.path, r.elements, r.median_ms, r.gb_per_s, r.pct
        );
    }
    for n in &notes {
        println!("\n{n}");
    }
    let csv = args.out.join("bench.csv");
    write_csv(&csv, &rows)?;
    let png = args.out.join("bandwidth.png");
    plot(
        &png,
        &rows,
        "EMA update throughput vs size (bandwidth rows: a += s*b, same bytes)",
    )?;
    println!("\nwrote {} and {}", csv.display(), png.display());
    let cpu_at = rows
        .iter()
        .find(|r| r.path == "cpu" && r.elements == 1 << 24)
        .or(rows.iter().rfind(|r| r.path == "cpu"));
    if let Some(r) = cpu_at {
        println!(
            "summary: CPU fast path {:.1}% of measured bandwidth at 2^{} ({:.1} of {cpu_bw:.1} GB/s, {cores} threads); {gpu_summary}",
            r.pct,
            r.elements.trailing_zeros(),
            r.gb_per_s
        );
    }
    Ok(())
}
