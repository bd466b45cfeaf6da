//! The main job: the TensorFlow EMA demo, on the GPU.
//!
//! Trains `y = x . w + b` (w of shape [2, 1], b a scalar) on seeded synthetic data with
//! momentum SGD written in WGSL (`examples/train_linear.wgsl`), keeps an EMA of the weights
//! with decay 0.9999 and num_updates = the global step, checkpoints every `--every` steps,
//! then reads the last checkpoint back and evaluates with the raw and the EMA weights, as
//! TensorFlow's `variables_to_restore` does.
//!
//! ```text
//! cargo run --release --example train_linear -- [--steps N] [--every N] [--out DIR] [--resume PATH] [--cpu] [--fused | --offload]
//! ```
//!
//! With no GPU adapter (or `--cpu`) it runs the same training on the CPU path and says so.
//! With `--fused` the EMA is updated inside the optimizer's own shader (`GpuEma::epilogue`):
//! the checkpoints hold the same bits as without. With `--offload` the shadows live in host
//! memory (`GpuEmaBuilder::build_offloaded`); the model is one chunk, and the loop lets the
//! host finish each sample (one step per submit), so no sample is skipped and the checkpoints
//! again hold the same bits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use wgpu_ema::checkpoint::{self, Checkpoint};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::{wgpu, GpuContext, GpuEma, HostTensors, Numerics, Offload, ParamArena, Schedule};

// The model, its data and its constants, shared with the web demo (`examples/web`).
#[path = "shared/linear.rs"]
mod linear;
use linear::*;

type Error = Box<dyn std::error::Error>;

struct Args {
    steps: u64,
    every: u64,
    out: PathBuf,
    resume: Option<PathBuf>,
    cpu: bool,
    /// Checkpoints in TensorFlow's format (`--format tf`) instead of safetensors.
    tf: bool,
    /// The EMA fused into the optimizer's shader.
    fused: bool,
    /// The shadows in host memory.
    offload: bool,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        steps: 3000,
        every: 1000,
        out: PathBuf::from("target/ema-demo"),
        resume: None,
        cpu: false,
        tf: false,
        fused: false,
        offload: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => a.steps = value()?.parse()?,
            "--every" => a.every = value()?.parse::<u64>()?.max(1),
            "--out" => a.out = value()?.into(),
            "--resume" => a.resume = Some(value()?.into()),
            "--cpu" => a.cpu = true,
            "--fused" => a.fused = true,
            "--offload" => a.offload = true,
            "--format" => {
                a.tf = match value()?.as_str() {
                    "tf" | "tensorflow" => true,
                    "safetensors" => false,
                    other => return Err(format!("--format {other:?}: tf or safetensors").into()),
                }
            }
            "-h" | "--help" => {
                println!(
                    "train_linear [--steps N] [--every N] [--out DIR] [--resume PATH] [--format tf|safetensors] [--cpu] [--fused | --offload]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if a.fused && a.offload {
        return Err(
            "--fused and --offload exclude each other: a fused EMA has its shadows on the GPU"
                .into(),
        );
    }
    Ok(a)
}

/// Where training starts: fresh, or from a checkpoint.
struct Start {
    global: u64,
    params: HostTensors,
    momentum: HostTensors,
    checkpoint: Option<Checkpoint>,
}

fn start(resume: Option<&Path>) -> Result<Start, Error> {
    let Some(path) = resume else {
        let mut params = HostTensors::new();
        params.insert(specs()[0].clone(), vec![0.0, 0.0])?;
        params.insert(specs()[1].clone(), vec![0.0])?;
        let mut momentum = HostTensors::new();
        momentum.insert(momentum_specs()[0].clone(), vec![0.0, 0.0])?;
        momentum.insert(momentum_specs()[1].clone(), vec![0.0])?;
        return Ok(Start {
            global: 0,
            params,
            momentum,
            checkpoint: None,
        });
    };
    let ck = Checkpoint::load(path)?;
    let params = ck.params_for(&specs())?;
    let mut momentum = HostTensors::new();
    for s in momentum_specs() {
        let v = ck.tensor_as(&s.name, &s)?.to_vec();
        momentum.insert(s, v)?;
    }
    Ok(Start {
        global: ck.num_updates()?,
        params,
        momentum,
        checkpoint: Some(ck),
    })
}

/// `ckpt-<step>.safetensors`, or with `--format tf` the TensorFlow prefix `ckpt-<step>`
/// (`.index`, `.data-00000-of-00001` and the directory's `checkpoint` file).
fn checkpoint_path(out: &Path, step: u64, tf: bool) -> PathBuf {
    if tf {
        out.join(format!("ckpt-{step:08}"))
    } else {
        out.join(format!("ckpt-{step:08}.safetensors"))
    }
}

/// Saves a training checkpoint in the format asked for.
fn save(
    path: &Path,
    tf: bool,
    state: &dyn checkpoint::EmaState,
    params: Option<&HostTensors>,
    momentum: &HostTensors,
) -> Result<(), Error> {
    if tf {
        checkpoint::save_tf(path, state, params, momentum)?;
    } else {
        checkpoint::save_training(path, state, params, momentum)?;
    }
    Ok(())
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// What a run leaves: the losses it logged per step (raw, EMA) and its last checkpoint.
struct Run {
    first_global: u64,
    losses: Vec<(f32, f32)>,
    last_checkpoint: PathBuf,
}

fn run_gpu(ctx: &GpuContext, args: &Args, data: &[f32], st: Start) -> Result<Run, Error> {
    let device = &ctx.device;
    let queue = &ctx.queue;
    let params = ParamArena::new(device, specs())?;
    let momentum = ParamArena::new(device, momentum_specs())?;
    for (s, v) in st.params.iter() {
        params.write(queue, &s.name, v)?;
    }
    for (s, v) in st.momentum.iter() {
        momentum.write(queue, &s.name, v)?;
    }
    let mut ema = GpuEma::builder(Schedule::tf(DECAY))
        .track_arena(&params)
        .build(device, queue)?;
    if let Some(ck) = &st.checkpoint {
        ema.restore(ck)?;
    }

    let steps = args.steps.saturating_sub(st.global);
    let data_buf = upload_data(device, queue, data);
    let log_buf = log_buffer(device, steps);
    queue.write_buffer(
        &log_buf,
        0,
        bytemuck::cast_slice(&[0u32, st.global as u32, 0, 0]),
    );

    let (pipeline, bind_group) = if args.fused {
        fused_pipeline(device, &mut ema, &data_buf, &params, &momentum, &log_buf)?
    } else {
        let pipeline = pipeline(device);
        let bind_group = bind_group(
            device, &pipeline, &data_buf, &params, &momentum, &ema, &log_buf,
        )?;
        (pipeline, bind_group)
    };

    let bar = progress(steps);
    let mut last_checkpoint = None;
    let mut global = st.global;
    std::fs::create_dir_all(&args.out)?;
    while global < args.steps {
        // Up to 100 steps per submit, never past the next checkpoint.
        let next_ckpt = (global / args.every + 1) * args.every;
        let until = next_ckpt.min(args.steps).min(global + 100);
        let mut encoder = device.create_command_encoder(&Default::default());
        for g in global + 1..=until {
            // Fused: the optimizer's shader updates the EMA itself, with this step's values.
            let fused = if args.fused {
                Some(ema.fused_step_at(g)?)
            } else {
                None
            };
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                if let Some(step) = &fused {
                    step.set_on(&mut pass);
                }
                pass.dispatch_workgroups(1, 1, 1);
            }
            // Else the EMA right after the optimizer, in the same encoder: num_updates = global
            // step.
            if fused.is_none() {
                ema.record_update_at(&mut encoder, g)?;
            }
        }
        queue.submit(Some(encoder.finish()));
        bar.inc(until - global);
        global = until;
        if global.is_multiple_of(args.every) || global == args.steps {
            let path = checkpoint_path(&args.out, global, args.tf);
            let snapshot = ema.snapshot(true)?;
            let mom = momentum.read_blocking(device, queue)?;
            save(&path, args.tf, &snapshot, None, &mom)?;
            bar.suspend(|| println!("checkpoint: {}", path.display()));
            last_checkpoint = Some(path);
        }
    }
    bar.finish_and_clear();

    let losses = logged_losses(device, queue, &log_buf, steps)?;
    let last_checkpoint = match last_checkpoint {
        Some(p) => p,
        None => save_resumed(
            &args.out,
            args.tf,
            &ema.snapshot(true)?,
            &momentum.read_blocking(device, queue)?,
        )?,
    };
    Ok(Run {
        first_global: st.global,
        losses,
        last_checkpoint,
    })
}

/// [`run_gpu`] with the shadows in host memory. The shader reads the EMA weights for its
/// held-out loss from a small mirror written after each step; one step per submit, and the
/// host finishes each sample before the next, so every step is sampled.
fn run_offloaded(ctx: &GpuContext, args: &Args, data: &[f32], st: Start) -> Result<Run, Error> {
    let device = &ctx.device;
    let queue = &ctx.queue;
    let params = ParamArena::new(device, specs())?;
    let momentum = ParamArena::new(device, momentum_specs())?;
    let mirror = ParamArena::new(device, specs())?;
    for (s, v) in st.params.iter() {
        params.write(queue, &s.name, v)?;
    }
    for (s, v) in st.momentum.iter() {
        momentum.write(queue, &s.name, v)?;
    }
    // 64 bytes of staging: the model (3 floats) is one chunk.
    let mut ema = GpuEma::builder(Schedule::tf(DECAY))
        .track_arena(&params)
        .build_offloaded(device, queue, Offload::new(64))?;
    if let Some(ck) = &st.checkpoint {
        ema.restore(ck)?;
    }
    let mirror_shadows = |ema: &mut wgpu_ema::OffloadedEma| -> Result<(), Error> {
        for (s, v) in ema.read_shadows()?.iter() {
            mirror.write(queue, &s.name, v)?;
        }
        Ok(())
    };
    mirror_shadows(&mut ema)?;

    let steps = args.steps.saturating_sub(st.global);
    let data_buf = upload_data(device, queue, data);
    let log_buf = log_buffer(device, steps);
    queue.write_buffer(
        &log_buf,
        0,
        bytemuck::cast_slice(&[0u32, st.global as u32, 0, 0]),
    );
    let pipeline = pipeline(device);
    let ema_weights = [mirror.binding("weight")?, mirror.binding("bias")?];
    let bind_group = bind_group_with(
        device,
        &pipeline,
        &data_buf,
        &params,
        &momentum,
        ema_weights,
        &log_buf,
    )?;

    let bar = progress(steps);
    let mut last_checkpoint = None;
    std::fs::create_dir_all(&args.out)?;
    for global in st.global + 1..=args.steps {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        ema.record_update_at(&mut encoder, global)?;
        queue.submit(Some(encoder.finish()));
        // Waits for the host's update of this step: the next step's loss reads it.
        mirror_shadows(&mut ema)?;
        bar.inc(1);
        if global.is_multiple_of(args.every) || global == args.steps {
            let path = checkpoint_path(&args.out, global, args.tf);
            let mom = momentum.read_blocking(device, queue)?;
            save(&path, args.tf, &ema, None, &mom)?;
            bar.suspend(|| println!("checkpoint: {}", path.display()));
            last_checkpoint = Some(path);
        }
    }
    bar.finish_and_clear();
    let stats = ema.stats();
    println!(
        "offloaded: {} samples, {} skipped, {} bytes of GPU staging",
        stats.samples, stats.skipped, stats.gpu_bytes
    );

    let losses = logged_losses(device, queue, &log_buf, steps)?;
    let last_checkpoint = match last_checkpoint {
        Some(p) => p,
        None => save_resumed(
            &args.out,
            args.tf,
            &ema,
            &momentum.read_blocking(device, queue)?,
        )?,
    };
    Ok(Run {
        first_global: st.global,
        losses,
        last_checkpoint,
    })
}

/// The training step with the EMA fused in (group 1 = the epilogue's): the optimizer calls
/// `ema_epilogue` with each new weight, and reads the EMA weights for its held-out loss through
/// `ema_value` (the shadows are the epilogue's, read-write, so they are not bound a second time).
fn fused_pipeline(
    device: &wgpu::Device,
    ema: &mut GpuEma,
    data: &wgpu::Buffer,
    params: &ParamArena,
    momentum: &ParamArena,
    log: &wgpu::Buffer,
) -> Result<(wgpu::ComputePipeline, wgpu::BindGroup), Error> {
    let epi = ema.epilogue(1)?;
    let base = include_str!("train_linear.wgsl");
    let mut source = String::new();
    for line in base.lines() {
        // The EMA weights' own read-only bindings give way to the epilogue's.
        if line.contains("var<storage, read> ema_") {
            continue;
        }
        let line = line.replace(
            "eval_loss(ema_weight[0], ema_weight[1], ema_bias[0])",
            "eval_loss(ema_value(0u, 0u), ema_value(0u, 1u), ema_value(1u, 0u))",
        );
        source.push_str(&line);
        source.push('\n');
        if line.trim() == "bias[0] -= LR * bias_momentum[0];" {
            // Tensor numbers are the EMA's specs' order: weight, bias.
            source.push_str(
                "    ema_epilogue(0u, 0u, weight[0]);\n    ema_epilogue(0u, 1u, weight[1]);\n    ema_epilogue(1u, 0u, bias[0]);\n",
            );
        }
    }
    source.push_str(epi.source());
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("train_linear (fused)"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let entry = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let layout0 = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("train_linear (fused)"),
        entries: &[
            entry(0, true),
            entry(1, false),
            entry(2, false),
            entry(3, false),
            entry(4, false),
            entry(7, false),
        ],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("train_linear (fused)"),
        bind_group_layouts: &[Some(&layout0), Some(epi.layout())],
        immediate_size: 0,
    });
    let constants = constants();
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("train_step (fused)"),
        layout: Some(&layout),
        module: &module,
        entry_point: Some("train_step"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            ..Default::default()
        },
        cache: None,
    });
    let bindings = [
        (0, data.as_entire_buffer_binding()),
        (1, params.binding("weight")?),
        (2, params.binding("bias")?),
        (3, momentum.binding("weight/Momentum")?),
        (4, momentum.binding("bias/Momentum")?),
        (7, log.as_entire_buffer_binding()),
    ];
    let entries: Vec<wgpu::BindGroupEntry> = bindings
        .into_iter()
        .map(|(binding, b)| wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(b),
        })
        .collect();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("train_step (fused)"),
        layout: &layout0,
        entries: &entries,
    });
    Ok((pipeline, bind_group))
}

/// A resume with nothing left to train still leaves a checkpoint to report on.
fn save_resumed(
    out: &Path,
    tf: bool,
    state: &dyn checkpoint::EmaState,
    momentum: &HostTensors,
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(out)?;
    let path = checkpoint_path(out, state.num_updates(), tf);
    save(&path, tf, state, None, momentum)?;
    Ok(path)
}

/// The (raw, EMA) held-out losses the shader logged for each of `steps` steps.
fn logged_losses(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    log_buf: &wgpu::Buffer,
    steps: u64,
) -> Result<Vec<(f32, f32)>, Error> {
    let log = read_buffer(device, queue, log_buf)?;
    Ok(log[4..4 + 2 * steps as usize]
        .chunks_exact(2)
        .map(|p| (p[0], p[1]))
        .collect())
}

fn read_buffer(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buf: &wgpu::Buffer,
) -> Result<Vec<f32>, Error> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("log readback"),
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    queue.submit(Some(encoder.finish()));
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv()??;
    let out = bytemuck::pod_collect_to_vec(&staging.get_mapped_range(..)?);
    staging.unmap();
    Ok(out)
}

/// The same training on the CPU path (momentum SGD in Rust, `CpuEma`).
fn run_cpu(args: &Args, data: &[f32], st: Start) -> Result<Run, Error> {
    let mut w = st.params.try_get("weight")?.to_vec();
    let mut b = st.params.try_get("bias")?[0];
    let mut mw = st.momentum.try_get("weight/Momentum")?.to_vec();
    let mut mb = st.momentum.try_get("bias/Momentum")?[0];
    let mut ema = CpuEma::new(Schedule::tf(DECAY), Numerics::Exact)?;
    for (s, v) in st.params.iter() {
        ema.track(s.clone(), v)?;
    }
    if let Some(ck) = &st.checkpoint {
        ema.restore(ck)?;
    }
    let steps = args.steps.saturating_sub(st.global);
    let bar = progress(steps);
    let mut losses = Vec::with_capacity(steps as usize);
    let mut last_checkpoint = None;
    std::fs::create_dir_all(&args.out)?;
    let state_now =
        |w: &[f32], b: f32, mw: &[f32], mb: f32| -> Result<(HostTensors, HostTensors), Error> {
            let mut p = HostTensors::new();
            p.insert(specs()[0].clone(), w.to_vec())?;
            p.insert(specs()[1].clone(), vec![b])?;
            let mut m = HostTensors::new();
            m.insert(momentum_specs()[0].clone(), mw.to_vec())?;
            m.insert(momentum_specs()[1].clone(), vec![mb])?;
            Ok((p, m))
        };
    for g in st.global + 1..=args.steps {
        let (ew, eb) = (ema.shadow("weight")?, ema.shadow("bias")?[0]);
        losses.push((eval_loss(data, &w, b), eval_loss(data, ew, eb)));
        let start = ((g - 1) as usize % (N_TRAIN / BATCH)) * BATCH;
        let (mut g0, mut g1, mut gb) = (0.0f32, 0.0f32, 0.0f32);
        for s in data[3 * start..3 * (start + BATCH)].chunks_exact(3) {
            let e = w[0] * s[0] + w[1] * s[1] + b - s[2];
            g0 += 2.0 * e * s[0];
            g1 += 2.0 * e * s[1];
            gb += 2.0 * e;
        }
        let inv = 1.0 / BATCH as f32;
        mw[0] = MOMENTUM * mw[0] + g0 * inv;
        mw[1] = MOMENTUM * mw[1] + g1 * inv;
        mb = MOMENTUM * mb + gb * inv;
        w[0] -= LR * mw[0];
        w[1] -= LR * mw[1];
        b -= LR * mb;
        ema.update_at(g, &[&w, &[b]])?;
        bar.inc(1);
        if g.is_multiple_of(args.every) || g == args.steps {
            let path = checkpoint_path(&args.out, g, args.tf);
            let (p, m) = state_now(&w, b, &mw, mb)?;
            save(&path, args.tf, &ema, Some(&p), &m)?;
            bar.suspend(|| println!("checkpoint: {}", path.display()));
            last_checkpoint = Some(path);
        }
    }
    bar.finish_and_clear();
    let last_checkpoint = match last_checkpoint {
        Some(p) => p,
        None => {
            let (p, m) = state_now(&w, b, &mw, mb)?;
            std::fs::create_dir_all(&args.out)?;
            let path = checkpoint_path(&args.out, ema.num_updates(), args.tf);
            save(&path, args.tf, &ema, Some(&p), &m)?;
            path
        }
    };
    Ok(Run {
        first_global: st.global,
        losses,
        last_checkpoint,
    })
}

fn fmt_values(v: &[f32]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
    format!("[{}]", items.join(", "))
}

/// Reads the checkpoint back and prints what TensorFlow's demo prints.
fn report(run: &Run, data: &[f32]) -> Result<(), Error> {
    let ck = Checkpoint::load(&run.last_checkpoint)?;
    println!(
        "\nvariables in checkpoint {} (num_updates = {}):",
        ck.path().display(),
        ck.num_updates()?
    );
    for name in ck.names() {
        if let Some((_, v)) = ck.get(name) {
            println!("  {name:<32} {}", fmt_values(v));
        }
    }
    let raw = ck.params_for(&specs())?;
    println!("\nvariables restored not from ExponentialMovingAverage:");
    for (s, v) in raw.iter() {
        println!("  {:<8} <- {:<32} {}", s.name, s.name, fmt_values(v));
    }
    let averaged = ck.shadows_for(&specs())?;
    println!("\nvariables restored from ExponentialMovingAverage:");
    for ((name, from), (_, v)) in checkpoint::variables_to_restore(&specs())
        .iter()
        .zip(averaged.iter())
    {
        println!("  {name:<8} <- {from:<32} {}", fmt_values(v));
    }
    let raw_loss = eval_loss(data, raw.try_get("weight")?, raw.try_get("bias")?[0]);
    let ema_loss = eval_loss(
        data,
        averaged.try_get("weight")?,
        averaged.try_get("bias")?[0],
    );
    println!(
        "\nevaluation loss (mean squared error on {N_EVAL} held-out samples; noise floor {:.4}):",
        NOISE * NOISE
    );
    println!("  raw weights: {raw_loss:.6}");
    println!("  EMA weights: {ema_loss:.6}");
    println!(
        "  (true weight [{}, {}], bias {TRUE_B})",
        TRUE_W[0], TRUE_W[1]
    );
    Ok(())
}

fn plot(run: &Run, out: &Path) -> Result<Option<PathBuf>, Error> {
    use plotters::prelude::*;
    if run.losses.is_empty() {
        return Ok(None);
    }
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "bad font file")?;
    let path = out.join("loss.png");
    draw(run, &path)?;
    Ok(Some(path))
}

fn draw(run: &Run, path: &Path) -> Result<(), Error> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let x0 = run.first_global as f32;
    let x1 = x0 + run.losses.len() as f32;
    let all = run
        .losses
        .iter()
        .flat_map(|&(a, b)| [a, b])
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = all.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "held-out loss per step: raw vs EMA weights",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (lo * 0.9..hi * 1.1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("global step")
        .y_desc("mean squared error")
        .label_style(("sans-serif", 14))
        .draw()?;
    let series = |f: fn(&(f32, f32)) -> f32| {
        run.losses
            .iter()
            .enumerate()
            .map(move |(i, p)| (x0 + i as f32 + 1.0, f(p)))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(series(|p| p.0), RED.mix(0.6)))?
        .label("raw weights")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(series(|p| p.1), BLUE.stroke_width(2)))?
        .label("EMA weights (decay 0.9999, num_updates)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<(), Error> {
    let args = parse_args()?;
    let data = dataset();
    let st = start(args.resume.as_deref())?;
    if let Some(p) = &args.resume {
        println!("resuming from {} at global step {}", p.display(), st.global);
    }
    let ctx = if args.cpu {
        None
    } else {
        match GpuContext::new() {
            Ok(ctx) => Some(ctx),
            // Where a GPU is required (CI sets this), a missing one is a failure, not a
            // quiet run on the CPU path.
            Err(e) if std::env::var("WGPU_EMA_REQUIRE_ADAPTER").as_deref() == Ok("1") => {
                return Err(format!("WGPU_EMA_REQUIRE_ADAPTER=1 and {e}").into());
            }
            Err(e) => {
                println!("no GPU adapter ({e})");
                None
            }
        }
    };
    let run = match &ctx {
        Some(ctx) => {
            println!("training on the GPU: {}", ctx.describe());
            if args.offload {
                run_offloaded(ctx, &args, &data, st)?
            } else {
                run_gpu(ctx, &args, &data, st)?
            }
        }
        None => {
            println!(
                "training on the CPU path (no GPU adapter{})",
                if args.cpu { ": --cpu" } else { "" }
            );
            run_cpu(&args, &data, st)?
        }
    };
    println!(
        "trained {} steps (momentum SGD, lr {LR}, batch {BATCH}); EMA decay {DECAY} with num_updates = global step",
        run.losses.len()
    );
    report(&run, &data)?;
    if let Some(p) = plot(&run, &args.out)? {
        println!("\nloss plot: {}", p.display());
    }
    Ok(())
}
