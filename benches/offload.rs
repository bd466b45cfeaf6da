//! Offloaded shadows: the GPU memory they save, their throughput against its bound, and what
//! they cost a training step.
//!
//! ```text
//! cargo bench --bench offload -- [--quick] [--out DIR]
//! ```
//!
//! 1. GPU memory allocated by the EMA (Vulkan's allocator report, on a device of its own):
//!    on-GPU shadows against an offloaded EMA with a 64 MiB ring, for ResNet-50's and GPT-2
//!    small's tensor lists.
//! 2. Throughput in parameter bytes per second: steps that only record the offloaded update,
//!    back to back, against the bound measured alone in the same run: the slower of the
//!    device-to-host stage (copy a slot's bytes, map, unmap) and the host stage (`ema_step` of
//!    a slot's elements). The two stages overlap in the ring where the copy is the GPU's DMA,
//!    so the slower bounds the whole; on a software device (lavapipe) both run on the same
//!    cores, and the "shared-cores" bound adds their times.
//! 3. Cost to a step (an SGD kernel, then the EMA, then a wait for the step as a synchronous
//!    trainer does): host time of `record_update` and the step's wall time, without an EMA,
//!    with on-GPU shadows, and offloaded, at update_every 1 and 10.
//!
//! Writes `offload.csv` and `offload.png` (throughput against the bound per ring size) to
//! `--out` (default `target/bench/`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wgpu_ema::schedule::Policy;
use wgpu_ema::{cpu, wgpu, GpuContext, GpuEma, Offload, ParamArena, Schedule, TensorSpec};

#[path = "shared/models.rs"]
mod models;

type Error = Box<dyn std::error::Error>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait(device: &wgpu::Device) -> Result<(), Error> {
    device.poll(wgpu::PollType::wait_indefinitely())?;
    Ok(())
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

/// Bytes the EMA's build allocated on a fresh device, or `None` where the backend reports
/// nothing.
fn allocated_by(
    specs: &[TensorSpec],
    build: impl Fn(&GpuContext, &ParamArena) -> Result<Box<dyn std::any::Any>, Error>,
) -> Result<Option<u64>, Error> {
    let ctx = GpuContext::new()?;
    let arena = ParamArena::new(&ctx.device, specs.iter().cloned())?;
    ctx.queue.submit(None);
    wait(&ctx.device)?;
    let Some(before) = ctx.device.generate_allocator_report() else {
        return Ok(None);
    };
    let ema = build(&ctx, &arena)?;
    wait(&ctx.device)?;
    let after = ctx.device.generate_allocator_report().ok_or("no report")?;
    drop(ema);
    Ok(Some(
        after
            .total_allocated_bytes
            .saturating_sub(before.total_allocated_bytes),
    ))
}

/// Parameter bytes per second of the device-to-host stage alone, through a ring like the
/// EMA's: copy a slot's bytes into each of `slots` mappable buffers, map them all, unmap.
fn d2h_alone(
    ctx: &GpuContext,
    src: &wgpu::Buffer,
    slot: u64,
    slots: usize,
    budget: Duration,
) -> Result<f64, Error> {
    let staging: Vec<wgpu::Buffer> = (0..slots)
        .map(|_| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench staging"),
                size: slot,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
        .collect();
    let chunks = (src.size() / slot).max(1);
    let (mut bytes, start) = (0u64, Instant::now());
    let mut i = 0;
    while start.elapsed() < budget || i < 4 {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for b in &staging {
            enc.copy_buffer_to_buffer(src, (i % chunks) * slot, b, 0, slot);
            enc.map_buffer_on_submit(b, wgpu::MapMode::Read, .., |_| {});
            i += 1;
        }
        ctx.queue.submit(Some(enc.finish()));
        wait(&ctx.device)?;
        for b in &staging {
            {
                let view = b.slice(..).get_mapped_range()?;
                std::hint::black_box(view[0]);
            }
            b.unmap();
            bytes += slot;
        }
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// Parameter bytes per second of the host stage alone: `ema_step` over a slot's elements.
fn host_alone(slot: u64, budget: Duration) -> Result<f64, Error> {
    let n = (slot / 4) as usize;
    let p = data(n, 1);
    let mut s = data(n, 2);
    let (mut bytes, start) = (0u64, Instant::now());
    while start.elapsed() < budget || bytes < 4 * slot {
        cpu::ema_step(&mut s, &p, 0.001)?;
        bytes += slot;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// Parameter bytes per second of offloaded updates recorded back to back (no other work).
fn offloaded_rate(
    ctx: &GpuContext,
    arena: &ParamArena,
    ring: u64,
    budget: Duration,
) -> Result<(f64, u64, u64), Error> {
    let mut ema = GpuEma::builder(Schedule::constant(0.999))
        .track_arena(arena)
        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(ring))?;
    let per_chunk = arena.size() as f64 / ema.stats().chunks as f64;
    let start = Instant::now();
    while start.elapsed() < budget {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ema.record_update(&mut enc)?;
        ctx.queue.submit(Some(enc.finish()));
    }
    ema.catch_up()?;
    let s = ema.stats();
    Ok((
        s.samples as f64 * per_chunk / start.elapsed().as_secs_f64(),
        s.samples,
        s.skipped,
    ))
}

/// An SGD step `p -= 0.01 * g` over the first `n` elements of `arena`: the training step the
/// EMA rides on.
struct Sgd {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    workgroups: (u32, u32),
}

impl Sgd {
    fn new(ctx: &GpuContext, arena: &ParamArena, n: u64) -> Self {
        let src = "@group(0) @binding(0) var<storage, read_write> p: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = id.x + id.y * nw.x * 256u;
    if i < arrayLength(&g) { p[i] = p[i] - 0.01 * g[i]; }
}";
        let d = &ctx.device;
        let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("sgd"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("sgd"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let grad = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("grad"),
            size: n * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue
            .write_buffer(&grad, 0, bytemuck::cast_slice(&data(n as usize, 3)));
        let group = d.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("sgd"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: arena.buffer(),
                        offset: 0,
                        size: std::num::NonZeroU64::new(n * 4),
                    }),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: grad.as_entire_binding(),
                },
            ],
        });
        let groups = n.div_ceil(256) as u32;
        let x = groups.min(65535);
        Self {
            pipeline,
            group,
            workgroups: (x, groups.div_ceil(x)),
        }
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder) {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group, &[]);
        pass.dispatch_workgroups(self.workgroups.0, self.workgroups.1, 1);
    }
}

enum Ema {
    None,
    Gpu(GpuEma),
    Offloaded(wgpu_ema::OffloadedEma),
}

/// Median host microseconds of the EMA's recording and median step milliseconds.
fn step_cost(
    ctx: &GpuContext,
    sgd: &Sgd,
    ema: &mut Ema,
    steps: usize,
) -> Result<(f64, f64), Error> {
    let (mut record, mut wall) = (Vec::new(), Vec::new());
    for i in 0..steps + 3 {
        let t = Instant::now();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        sgd.record(&mut enc);
        let r = Instant::now();
        match ema {
            Ema::None => {}
            Ema::Gpu(e) => e.record_update(&mut enc)?,
            Ema::Offloaded(e) => e.record_update(&mut enc)?,
        }
        let r = r.elapsed().as_secs_f64();
        ctx.queue.submit(Some(enc.finish()));
        wait(&ctx.device)?;
        if i >= 3 {
            record.push(r * 1e6);
            wall.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok((median(record), median(wall)))
}

struct Args {
    quick: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().ok_or("--out needs a directory")?.into(),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

fn plot(path: &std::path::Path, rows: &[(u64, f64, f64, f64)], device: &str) -> Result<(), Error> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad font")?;
    let xmax = rows.iter().map(|r| r.0).max().unwrap_or(1) as f64 * 1.5;
    let xmin = rows.iter().map(|r| r.0).min().unwrap_or(1) as f64 / 1.5;
    let ymax = rows
        .iter()
        .fold(0.0f64, |m, r| m.max(r.1).max(r.2).max(r.3))
        * 1.2;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Offloaded EMA throughput ({device})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("ring size (MiB)")
        .y_desc("parameter GB/s")
        .label_style(("sans-serif", 13))
        .draw()?;
    for (label, pick, color) in [
        (
            "bound: slower stage alone (stages overlap)",
            2usize,
            RGBColor(120, 120, 120),
        ),
        (
            "bound: stages share the cores (software device)",
            3,
            RGBColor(190, 190, 190),
        ),
        ("offloaded update", 1, BLUE),
    ] {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.0 as f64, [r.1, r.2, r.3][pick - 1]))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.into_iter().map(|xy| Circle::new(xy, 3, color.filled())))?;
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
    let ctx = GpuContext::new()?;
    let device = ctx.describe();
    println!("device: {device}");
    let mut csv = String::from("section,case,value,unit\n");

    // 1. GPU memory.
    println!("\nGPU memory allocated by the EMA (64 MiB ring):");
    println!(
        "{:<12} {:>12} {:>16} {:>14}",
        "model", "parameters", "on-GPU shadows", "offloaded"
    );
    let mut models = vec![("resnet50", models::resnet50())];
    if !args.quick {
        models.push(("gpt2-small", models::gpt2_small()));
    }
    for (name, specs) in &models {
        let params: u64 = specs.iter().map(TensorSpec::numel).sum();
        let on_gpu = allocated_by(specs, |ctx, arena| {
            Ok(Box::new(
                GpuEma::builder(Schedule::tf(0.999))
                    .track_arena(arena)
                    .build(&ctx.device, &ctx.queue)?,
            ))
        })?;
        let offloaded = allocated_by(specs, |ctx, arena| {
            Ok(Box::new(
                GpuEma::builder(Schedule::tf(0.999))
                    .track_arena(arena)
                    .build_offloaded(&ctx.device, &ctx.queue, Offload::new(64 << 20))?,
            ))
        })?;
        let mib = |b: Option<u64>| match b {
            Some(b) => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
            None => "(not reported)".into(),
        };
        println!(
            "{name:<12} {params:>12} {:>16} {:>14}",
            mib(on_gpu),
            mib(offloaded)
        );
        for (case, b) in [("on-gpu", on_gpu), ("offloaded", offloaded)] {
            if let Some(b) = b {
                csv += &format!("memory,{name} {case},{b},bytes\n");
            }
        }
    }

    // 2. Throughput against the bound.
    let n: u64 = if args.quick { 8 << 20 } else { 32 << 20 };
    let budget = Duration::from_millis(if args.quick { 600 } else { 2500 });
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("w", [n as usize])])?;
    arena.write(&ctx.queue, "w", &data(n as usize, 9))?;
    println!(
        "\nThroughput, {} MiB of parameters (4 slots, 2 sampled per step):",
        n * 4 >> 20
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>12} {:>8} {:>14} {:>8} {:>11}",
        "ring",
        "offloaded",
        "d2h alone",
        "host alone",
        "bound",
        "% bound",
        "shared-cores",
        "%",
        "skipped"
    );
    let mut rows = Vec::new();
    let rings: &[u64] = if args.quick { &[4, 16] } else { &[4, 16, 64] };
    for &mib in rings {
        let ring = mib << 20;
        let slot = ring / 4;
        let d2h = d2h_alone(&ctx, arena.buffer(), slot, 4, budget)?;
        let host = host_alone(slot, budget)?;
        // The stages overlap where the copy is the GPU's DMA; on a software device the copy
        // and the host update share the same cores, so there they add up.
        let bound = d2h.min(host);
        let shared = 1.0 / (1.0 / d2h + 1.0 / host);
        let (rate, samples, skipped) = offloaded_rate(&ctx, &arena, ring, budget)?;
        let gb = |x: f64| x / 1e9;
        println!(
            "{:>5} MiB {:>7.2} GB/s {:>7.2} GB/s {:>7.2} GB/s {:>7.2} GB/s {:>7.0}% {:>9.2} GB/s {:>7.0}% {:>5}/{}",
            mib,
            gb(rate),
            gb(d2h),
            gb(host),
            gb(bound),
            100.0 * rate / bound,
            gb(shared),
            100.0 * rate / shared,
            skipped,
            samples + skipped
        );
        csv += &format!(
            "throughput,ring {mib} MiB offloaded,{rate:.0},B/s\nthroughput,ring {mib} MiB d2h alone,{d2h:.0},B/s\nthroughput,ring {mib} MiB host alone,{host:.0},B/s\n"
        );
        rows.push((mib, gb(rate), gb(bound), gb(shared)));
    }

    // 3. Cost to a step.
    let step_n = n.min(32 << 20);
    let sgd = Sgd::new(&ctx, &arena, step_n);
    let steps = if args.quick { 10 } else { 30 };
    println!(
        "\nCost to a training step (SGD over {} MiB, waited for each step):",
        step_n * 4 >> 20
    );
    println!(
        "{:<26} {:>16} {:>12} {:>10}",
        "EMA", "record (µs)", "step (ms)", "skipped"
    );
    for every in [1u64, 10] {
        let policy = Policy {
            update_every: every,
            ..Policy::default()
        };
        let cases: Vec<(String, Ema)> = vec![
            ("none".into(), Ema::None),
            (
                format!("on-GPU, every {every}"),
                Ema::Gpu(
                    GpuEma::builder(Schedule::constant(0.999))
                        .policy(policy)
                        .track_arena(&arena)
                        .build(&ctx.device, &ctx.queue)?,
                ),
            ),
            (
                format!("offloaded 64 MiB, every {every}"),
                Ema::Offloaded(
                    GpuEma::builder(Schedule::constant(0.999))
                        .policy(policy)
                        .track_arena(&arena)
                        .build_offloaded(&ctx.device, &ctx.queue, Offload::new(64 << 20))?,
                ),
            ),
        ];
        for (name, mut ema) in cases {
            if every == 10 && matches!(ema, Ema::None) {
                continue;
            }
            let (record, wall) = step_cost(&ctx, &sgd, &mut ema, steps)?;
            let skipped = match &ema {
                Ema::Offloaded(e) => {
                    let s = e.stats();
                    format!("{}/{}", s.skipped, s.samples + s.skipped)
                }
                _ => "-".into(),
            };
            println!("{name:<26} {record:>16.1} {wall:>12.2} {skipped:>10}");
            csv += &format!("step,{name} record,{record:.1},us\nstep,{name} wall,{wall:.3},ms\n");
        }
    }
    std::fs::write(args.out.join("offload.csv"), csv)?;
    plot(&args.out.join("offload.png"), &rows, &device)?;
    println!("\nwrote {}", args.out.join("offload.csv").display());
    Ok(())
}
