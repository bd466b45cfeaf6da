//! The EMA as a reinforcement-learning target network: Q-learning on a chain, written in WGSL
//! (`examples/target_network.wgsl`), whose TD targets come from a target network that *is*
//! the EMA's shadows, bound once in the training shader's bind group
//! (`GpuEma::shadow_binding`) and soft-updated on the GPU after every step
//! (`Schedule::polyak(tau)`, one pass over every tensor).
//!
//! Three runs from the same start, same data: a soft target (tau = 0.05), a hard one (copied
//! every 100 steps with `record_reset`), and none (the target copied every step: the online
//! network bootstraps on itself). Prints how far each online network is from the optimal
//! Q-values, writes a plot, and fails unless the soft-target run learned them.
//!
//! ```text
//! cargo run --release --example target_network -- [--steps N] [--out DIR]
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use wgpu_ema::{wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

type Error = Box<dyn std::error::Error>;

// The shader's constants (keep in sync with examples/target_network.wgsl).
const S: usize = 12;
const H: usize = 16;
const A: usize = 2;
const GAMMA: f64 = 0.9;

/// How the target network follows the online one.
#[derive(Clone, Copy)]
enum Target {
    /// Polyak averaging with this tau after every step.
    Soft(f64),
    /// An exact copy every this many steps.
    Hard(u64),
}

impl Target {
    fn label(self) -> String {
        match self {
            Target::Soft(tau) => format!("soft target, tau = {tau}"),
            Target::Hard(1) => "no target network (copied every step)".into(),
            Target::Hard(n) => format!("hard target, copied every {n} steps"),
        }
    }
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("q.w1", [S, H]),
        TensorSpec::new("q.b1", [H]),
        TensorSpec::new("q.w2", [H, A]),
        TensorSpec::new("q.b2", [A]),
    ]
}

/// The optimal Q-values: reaching the last state pays 1, discounted by GAMMA per step.
fn q_star() -> Vec<[f64; A]> {
    let v = |s: usize| GAMMA.powi((S - 2 - s) as i32); // value of a non-terminal state
    (0..S - 1)
        .map(|s| {
            let left = GAMMA * v(s.saturating_sub(1));
            let right = if s + 1 == S - 1 {
                1.0
            } else {
                GAMMA * v(s + 1)
            };
            [left, right]
        })
        .collect()
}

/// The network's Q-values for every non-terminal state, from its four tensors.
fn q_values(w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32]) -> Vec<[f64; A]> {
    (0..S - 1)
        .map(|s| {
            let mut q = [0.0; A];
            for (a, qa) in q.iter_mut().enumerate() {
                *qa = f64::from(b2[a]);
                for j in 0..H {
                    let h = (w1[s * H + j] + b1[j]).max(0.0);
                    *qa += f64::from(h) * f64::from(w2[j * A + a]);
                }
            }
            q
        })
        .collect()
}

fn max_error(q: &[[f64; A]]) -> f64 {
    q.iter()
        .zip(q_star())
        .flat_map(|(a, b)| [(a[0] - b[0]).abs(), (a[1] - b[1]).abs()])
        .fold(0.0, f64::max)
}

struct Run {
    label: String,
    /// (step, max |Q - Q*| of the online network).
    errors: Vec<(u64, f64)>,
    online_error: f64,
    target_error: f64,
    last_loss: f64,
}

fn tensors(t: &wgpu_ema::HostTensors) -> Result<Vec<Vec<f32>>, Error> {
    specs()
        .iter()
        .map(|s| Ok(t.try_get(&s.name)?.to_vec()))
        .collect()
}

fn run(ctx: &GpuContext, target: Target, steps: u64, bar: &ProgressBar) -> Result<Run, Error> {
    let (device, queue) = (&ctx.device, &ctx.queue);
    let online = ParamArena::new(device, specs())?;
    let mut rng = fastrand::Rng::with_seed(7);
    for s in specs() {
        let fan_in = if s.name == "q.w1" { 1.0 } else { H as f32 };
        let v: Vec<f32> = (0..s.numel())
            .map(|_| (rng.f32() - 0.5) / fan_in.sqrt())
            .collect();
        online.write(queue, &s.name, &v)?;
    }
    let schedule = match target {
        Target::Soft(tau) => Schedule::polyak(tau)?,
        // Only copies: the schedule is never used.
        Target::Hard(_) => Schedule::constant(1.0),
    };
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&online)
        .build(device, queue)?;

    let log = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("td log"),
        size: 4 * (steps + 1),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let module = device.create_shader_module(wgpu::include_wgsl!("target_network.wgsl"));
    let at = |name: &str| -> Result<f64, Error> { Ok((online.offset(name)? / 4) as f64) };
    let constants = [
        ("W1_AT", at("q.w1")?),
        ("B1_AT", at("q.b1")?),
        ("W2_AT", at("q.w2")?),
        ("B2_AT", at("q.b2")?),
    ];
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("td step"),
        layout: None,
        module: &module,
        entry_point: Some("td_step"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            ..Default::default()
        },
        cache: None,
    });
    // Made once: the shadows' buffer and offsets stay put for the EMA's whole life.
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: online.buffer().as_entire_binding(),
    }];
    for (i, s) in specs().iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: 1 + i as u32,
            resource: wgpu::BindingResource::Buffer(ema.shadow_binding(&s.name)?),
        });
    }
    entries.push(wgpu::BindGroupEntry {
        binding: 5,
        resource: log.as_entire_binding(),
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("td step"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });

    let check_every = 50;
    let mut errors = Vec::new();
    let mut step = 0u64;
    while step < steps {
        let until = (step + check_every).min(steps);
        let mut encoder = device.create_command_encoder(&Default::default());
        for n in step + 1..=until {
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            // The target network follows, in the same encoder, after the optimizer's step.
            match target {
                Target::Soft(_) => ema.record_update(&mut encoder)?,
                Target::Hard(every) if n.is_multiple_of(every) => ema.record_reset(&mut encoder)?,
                Target::Hard(_) => {}
            }
        }
        queue.submit(Some(encoder.finish()));
        bar.inc(until - step);
        step = until;
        let w = tensors(&online.read_blocking(device, queue)?)?;
        errors.push((step, max_error(&q_values(&w[0], &w[1], &w[2], &w[3]))));
    }
    let w = tensors(&online.read_blocking(device, queue)?)?;
    let t = tensors(&ema.read_shadows_blocking()?)?;
    let losses = read_log(ctx, &log)?;
    let tail = &losses[losses.len().saturating_sub(100)..];
    Ok(Run {
        label: target.label(),
        errors,
        online_error: max_error(&q_values(&w[0], &w[1], &w[2], &w[3])),
        target_error: max_error(&q_values(&t[0], &t[1], &t[2], &t[3])),
        last_loss: tail.iter().map(|&x| f64::from(x)).sum::<f64>() / tail.len().max(1) as f64,
    })
}

/// The per-step mean squared TD errors the shader logged.
fn read_log(ctx: &GpuContext, log: &wgpu::Buffer) -> Result<Vec<f32>, Error> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("td log readback"),
        size: log.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(log, 0, &staging, 0, log.size());
    ctx.queue.submit(Some(enc.finish()));
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv()??;
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&staging.get_mapped_range(..)?);
    staging.unmap();
    Ok(words[1..].iter().map(|&w| f32::from_bits(w)).collect())
}

fn plot(runs: &[Run], path: &Path) -> Result<(), Error> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad font file")?;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let x1 = runs
        .iter()
        .flat_map(|r| r.errors.last().map(|e| e.0))
        .max()
        .unwrap_or(1) as f64;
    let values = runs.iter().flat_map(|r| r.errors.iter().map(|e| e.1));
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Q-learning on a chain: online network's max |Q - Q*|",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x1, (lo * 0.8..hi * 1.2).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("SGD step")
        .y_desc("max |Q - Q*| over states and actions")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (r, color) in runs.iter().zip([BLUE, RED, BLACK]) {
        let pts: Vec<(f64, f64)> = r.errors.iter().map(|&(s, e)| (s as f64, e)).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(r.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("target_network: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode, Error> {
    let mut steps = 3000u64;
    let mut out = PathBuf::from("target/target-network");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => steps = args.next().ok_or("--steps needs a value")?.parse()?,
            "--out" => out = args.next().ok_or("--out needs a value")?.into(),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let ctx = GpuContext::new()?;
    println!("on {}", ctx.describe());
    let targets = [Target::Soft(0.05), Target::Hard(100), Target::Hard(1)];
    let bar = ProgressBar::new(steps * targets.len() as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} steps  eta {eta}") {
        bar.set_style(style);
    }
    let runs = targets
        .iter()
        .map(|&t| run(&ctx, t, steps, &bar))
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish_and_clear();
    println!("after {steps} steps (12-state chain, gamma {GAMMA}, batch 32, lr 0.2):");
    println!(
        "{:<42} {:>16} {:>16} {:>16}",
        "target", "online max err", "target max err", "TD loss (last 100)"
    );
    for r in &runs {
        println!(
            "{:<42} {:>16.5} {:>16.5} {:>16.2e}",
            r.label, r.online_error, r.target_error, r.last_loss
        );
    }
    std::fs::create_dir_all(&out)?;
    let png = out.join("target_network.png");
    plot(&runs, &png)?;
    println!("plot: {}", png.display());
    let soft = &runs[0];
    if soft.online_error > 0.05 || !soft.online_error.is_finite() {
        eprintln!(
            "the soft-target run did not learn Q*: max error {}",
            soft.online_error
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
