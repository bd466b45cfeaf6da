//! criterion benches of one EMA step: the CPU fast path, the f64 reference, the GPU update
//! (submitted and waited for), and the host cost of recording a step.
//!
//! Throughput is reported as 12 bytes per element (read param, read shadow, write shadow).
//! `cargo bench --bench update`; set `WGPU_EMA_BENCH_MAX_LOG2` (default 24) for larger sizes
//! (26 or more adds GPT-2 small's tensor list to ResNet-50's).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgpu_ema::{cpu, wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

#[path = "shared/models.rs"]
mod models;

fn max_log2() -> u32 {
    std::env::var("WGPU_EMA_BENCH_MAX_LOG2")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

fn sizes() -> impl Iterator<Item = usize> {
    (10..=max_log2()).step_by(2).map(|k| 1usize << k)
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f32() - 0.5).collect()
}

/// Waits for one submission (and only it).
fn wait(ctx: &GpuContext, idx: wgpu::SubmissionIndex) {
    ctx.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(idx),
            timeout: None,
        })
        .expect("poll");
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    for n in sizes() {
        let p = data(n, 1);
        let mut s = data(n, 2);
        g.throughput(Throughput::Bytes(12 * n as u64));
        g.bench_with_input(BenchmarkId::new("f32", n), &n, |b, _| {
            b.iter(|| cpu::ema_step(&mut s, &p, 1e-3))
        });
        let mut s64: Vec<f64> = s.iter().map(|&x| x as f64).collect();
        g.throughput(Throughput::Bytes(20 * n as u64));
        g.bench_with_input(BenchmarkId::new("f64-reference", n), &n, |b, _| {
            b.iter(|| cpu::ema_step_f64(&mut s64, &p, 1e-3))
        });
    }
}

fn bench_gpu(c: &mut Criterion) {
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED GPU benches: {e}");
            return;
        }
    };
    eprintln!("GPU benches on {}", ctx.describe());
    let mut g = c.benchmark_group("gpu");
    for n in sizes() {
        let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n])]).expect("arena");
        arena.write(&ctx.queue, "p", &data(n, 3)).expect("write");
        let mut ema = GpuEma::builder(Schedule::tf(0.999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)
            .expect("build");
        g.throughput(Throughput::Bytes(12 * n as u64));
        g.bench_with_input(BenchmarkId::new("update+wait", n), &n, |b, _| {
            b.iter(|| {
                let idx = ema.update().expect("update");
                wait(&ctx, idx)
            })
        });
    }
    // Several steps recorded into one encoder, one submit: time per 4 steps.
    let n = 1 << 20;
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n])]).expect("arena");
    let mut ema = GpuEma::builder(Schedule::tf(0.999))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .expect("build");
    g.throughput(Throughput::Bytes(4 * 12 * n as u64));
    g.bench_function("4-steps-per-submit/1048576", |b| {
        b.iter(|| {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            ema.record_updates(&mut enc, 4).expect("record");
            let idx = ctx.queue.submit(Some(enc.finish()));
            wait(&ctx, idx)
        })
    });
    g.finish();

    // Model-shaped workloads: an arena against one user buffer per tensor.
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    let mut list = vec![("resnet50", models::resnet50())];
    if max_log2() >= 26 {
        list.push(("gpt2-small", models::gpt2_small()));
    }
    for (model, specs) in list {
        let total: u64 = specs.iter().map(TensorSpec::numel).sum();
        let arena = ParamArena::new(&ctx.device, specs.clone()).expect("arena");
        let buffers: Vec<wgpu::Buffer> = specs
            .iter()
            .map(|s| {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: s.numel() * 4,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let a = GpuEma::builder(Schedule::tf(0.999))
            .track_arena(&arena)
            .build(&ctx.device, &ctx.queue)
            .expect("build");
        let b = specs
            .iter()
            .zip(&buffers)
            .fold(GpuEma::builder(Schedule::tf(0.999)), |bld, (s, buf)| {
                bld.track_buffer(s.clone(), buf, 0)
            })
            .build(&ctx.device, &ctx.queue)
            .expect("build");
        g.throughput(Throughput::Bytes(12 * total));
        for (name, mut ema) in [("arena", a), ("buffers", b)] {
            g.bench_function(format!("{model}/{name}"), |bch| {
                bch.iter(|| {
                    let idx = ema.update().expect("update");
                    wait(&ctx, idx)
                })
            });
        }
    }
    g.finish();

    // Host cost of recording one step (no submit, no wait): an arena of 161 tensors against
    // 161 separate user buffers (ResNet-50's tensor count).
    let mut g = c.benchmark_group("record");
    let specs: Vec<TensorSpec> = (0..161)
        .map(|i| TensorSpec::new(format!("t{i}"), [1000 + 37 * i]))
        .collect();
    let arena = ParamArena::new(&ctx.device, specs.clone()).expect("arena");
    let mut a = GpuEma::builder(Schedule::tf(0.999))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .expect("build");
    let buffers: Vec<wgpu::Buffer> = specs
        .iter()
        .map(|s| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: s.numel() * 4,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .collect();
    let mut b = specs
        .iter()
        .zip(&buffers)
        .fold(GpuEma::builder(Schedule::tf(0.999)), |bld, (s, buf)| {
            bld.track_buffer(s.clone(), buf, 0)
        })
        .build(&ctx.device, &ctx.queue)
        .expect("build");
    for (name, ema) in [("arena-161", &mut a), ("buffers-161", &mut b)] {
        g.bench_function(name, |bch| {
            bch.iter_batched(
                || ctx.device.create_command_encoder(&Default::default()),
                |mut enc| {
                    ema.record_update(&mut enc).expect("record");
                    enc
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Criterion draws its plots with plotters, which needs a system font: on a machine without
    // one (CI, containers) it panicked after the first measurement. The numbers are the point.
    config = Criterion::default().without_plots();
    targets = bench_cpu, bench_gpu
}
criterion_main!(benches);
