//! A training loop fully on the GPU: your own WGSL optimizer pass and the EMA recorded into
//! the same encoder, many steps per submit; then evaluation with the raw and the EMA weights
//! by swapping them in place, in one submit.
//!
//! `cargo run --release --example pipeline`
//!
//! The model is `y = x . w + b` with 64 features, trained by minibatch SGD
//! (`examples/pipeline.wgsl`); the EMA uses a warm-up schedule and starts after 100 steps.

use wgpu_ema::schedule::Policy;
use wgpu_ema::{wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

const F: usize = 64;
const N_TRAIN: usize = 4096;
const N_EVAL: usize = 1024;
const STEPS: u64 = 3000;
const PER_SUBMIT: u64 = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    let (device, queue) = (&ctx.device, &ctx.queue);

    // Seeded data: y = x . w_true + 0.3 + noise.
    let mut rng = fastrand::Rng::with_seed(11);
    let w_true: Vec<f32> = (0..F).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let mut data = Vec::with_capacity((N_TRAIN + N_EVAL) * (F + 1));
    for _ in 0..N_TRAIN + N_EVAL {
        let x: Vec<f32> = (0..F).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let y =
            x.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() + 0.3 + 0.5 * (rng.f32() - 0.5);
        data.extend(x);
        data.push(y);
    }
    let storage = |bytes: u64, usage: wgpu::BufferUsages| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | usage,
            mapped_at_creation: false,
        })
    };
    let data_buf = storage((data.len() * 4) as u64, wgpu::BufferUsages::COPY_DST);
    queue.write_buffer(&data_buf, 0, bytemuck::cast_slice(&data));
    let counter = storage(4, wgpu::BufferUsages::empty());
    let loss = storage(4, wgpu::BufferUsages::COPY_SRC);

    // The parameters live in an arena; the optimizer binds each tensor on its own.
    let params = ParamArena::new(
        device,
        [TensorSpec::new("weight", [F]), TensorSpec::new("bias", [])],
    )?;
    let mut ema = GpuEma::builder(Schedule::warmup(1.0, 0.75, 0.999))
        .policy(Policy {
            update_after_step: 100,
            update_every: 1,
            write_back_every: 0,
        })
        .track_arena(&params)
        .build(device, queue)?;
    println!(
        "EMA: {} with {:?}, {} dispatch per step",
        ema.schedule().describe(),
        ema.update_policy(),
        ema.dispatches_per_step()
    );

    let module = device.create_shader_module(wgpu::include_wgsl!("pipeline.wgsl"));
    let pipeline = |entry: &str| {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let (sgd, eval) = (pipeline("sgd_step"), pipeline("evaluate"));
    // Automatic layouts hold only the bindings an entry point uses: `sgd_step` has no loss
    // (binding 4), `evaluate` no step counter (binding 3).
    let bind = |p: &wgpu::ComputePipeline,
                skip: Option<u32>|
     -> Result<wgpu::BindGroup, wgpu_ema::Error> {
        let b = [
            data_buf.as_entire_buffer_binding(),
            params.binding("weight")?,
            params.binding("bias")?,
            counter.as_entire_buffer_binding(),
            loss.as_entire_buffer_binding(),
        ];
        let entries: Vec<wgpu::BindGroupEntry> = b
            .into_iter()
            .enumerate()
            .filter(|(i, _)| Some(*i as u32) != skip)
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b),
            })
            .collect();
        Ok(device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &entries,
        }))
    };
    let (sgd_bg, eval_bg) = (bind(&sgd, Some(4))?, bind(&eval, Some(3))?);
    let dispatch =
        |enc: &mut wgpu::CommandEncoder, p: &wgpu::ComputePipeline, bg: &wgpu::BindGroup| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(p);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        };

    let mut step = 0;
    while step < STEPS {
        let mut enc = device.create_command_encoder(&Default::default());
        for _ in 0..PER_SUBMIT {
            dispatch(&mut enc, &sgd, &sgd_bg); // your optimizer
            ema.record_update(&mut enc)?; // the EMA, right after it, same encoder
        }
        queue.submit(Some(enc.finish()));
        step += PER_SUBMIT;
    }
    println!("trained {STEPS} steps, {PER_SUBMIT} per submit");

    // Evaluate raw, swap, evaluate EMA, swap back: one encoder, one submit.
    let before = params.read_blocking(device, queue)?;
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("losses"),
        size: 8,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    dispatch(&mut enc, &eval, &eval_bg);
    enc.copy_buffer_to_buffer(&loss, 0, &readback, 0, 4);
    ema.record_swap(&mut enc)?;
    dispatch(&mut enc, &eval, &eval_bg);
    enc.copy_buffer_to_buffer(&loss, 0, &readback, 4, 4);
    ema.record_swap(&mut enc)?;
    queue.submit(Some(enc.finish()));
    let (tx, rx) = std::sync::mpsc::channel();
    readback.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    rx.recv()??;
    let losses: Vec<f32> = bytemuck::pod_collect_to_vec(&readback.get_mapped_range(..)?);
    readback.unmap();
    let after = params.read_blocking(device, queue)?;
    println!(
        "evaluation loss (MSE on {N_EVAL} held-out samples; noise floor {:.4}):",
        0.25f32 / 12.0
    );
    println!("  raw weights: {:.6}", losses[0]);
    println!("  EMA weights: {:.6}", losses[1]);
    println!(
        "raw weights restored bit for bit after the two swaps: {}",
        before == after
    );
    if before != after {
        return Err("parameters changed across two swaps".into());
    }
    Ok(())
}
