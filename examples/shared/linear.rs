//! The linear model of the TensorFlow EMA article, shared by `train_linear` and the web demo:
//! `y = x . w + b` with w of shape [2, 1] and a scalar b, seeded synthetic data, and momentum
//! SGD's constants, and the GPU side of the step (`examples/train_linear.wgsl`): its data, log,
//! pipeline and bindings.

use wgpu_ema::{wgpu, GpuEma, ParamArena, TensorSpec};

/// TensorFlow's article decay (`num_updates` caps it early on).
pub const DECAY: f64 = 0.9999;
/// Momentum SGD: learning rate, momentum and minibatch size.
pub const LR: f32 = 0.05;
pub const MOMENTUM: f32 = 0.9;
pub const BATCH: usize = 8;
/// Training and held-out samples.
pub const N_TRAIN: usize = 1024;
pub const N_EVAL: usize = 256;
/// The true model and the noise on its targets (held-out MSE cannot go below NOISE^2).
pub const TRUE_W: [f32; 2] = [2.0, -3.4];
pub const TRUE_B: f32 = 4.2;
pub const NOISE: f32 = 0.5;

/// The parameters, with TensorFlow's names.
pub fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("weight", [2, 1]),
        TensorSpec::new("bias", []),
    ]
}

/// The optimizer's slots, saved beside the parameters.
pub fn momentum_specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("weight/Momentum", [2, 1]),
        TensorSpec::new("bias/Momentum", []),
    ]
}

/// Train samples then eval samples, each (x0, x1, y), seeded.
pub fn dataset() -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(2017);
    let mut gauss = || {
        let (u, v) = (rng.f32().max(1e-7), rng.f32());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    };
    let mut out = Vec::with_capacity(3 * (N_TRAIN + N_EVAL));
    for _ in 0..N_TRAIN + N_EVAL {
        let x0 = gauss();
        let x1 = gauss();
        let y = TRUE_W[0] * x0 + TRUE_W[1] * x1 + TRUE_B + NOISE * gauss();
        out.extend([x0, x1, y]);
    }
    out
}

/// Mean squared error on the held-out samples.
pub fn eval_loss(data: &[f32], w: &[f32], b: f32) -> f32 {
    let eval = &data[3 * N_TRAIN..];
    let sum: f32 = eval
        .chunks_exact(3)
        .map(|s| {
            let e = w[0] * s[0] + w[1] * s[1] + b - s[2];
            e * e
        })
        .sum();
    sum / N_EVAL as f32
}

/// The training data on the GPU (storage, read by the step).
pub fn upload_data(device: &wgpu::Device, queue: &wgpu::Queue, data: &[f32]) -> wgpu::Buffer {
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("data"),
        size: (data.len() * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&buf, 0, bytemuck::cast_slice(data));
    buf
}

/// The step's log: a 16-byte header (steps done, first global step) and a (raw, EMA) loss
/// pair for each of up to `steps` steps.
pub fn log_buffer(device: &wgpu::Device, steps: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("log"),
        size: 16 + 8 * steps.max(1),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// The overrides of `examples/train_linear.wgsl`: the constants above.
pub fn constants() -> [(&'static str, f64); 5] {
    [
        ("LR", LR as f64),
        ("MOMENTUM", MOMENTUM as f64),
        ("BATCH", BATCH as f64),
        ("N_TRAIN", N_TRAIN as f64),
        ("N_EVAL", N_EVAL as f64),
    ]
}

/// The training step (`examples/train_linear.wgsl`) with its constants.
pub fn pipeline(device: &wgpu::Device) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("train_linear"),
        source: wgpu::ShaderSource::Wgsl(include_str!("../train_linear.wgsl").into()),
    });
    let constants = constants();
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("train_step"),
        layout: None,
        module: &module,
        entry_point: Some("train_step"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            ..Default::default()
        },
        cache: None,
    })
}

/// The step's bindings, in the shader's order; the EMA's shadows are bound read-only for the
/// held-out loss of the EMA weights.
pub fn bind_group(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    data: &wgpu::Buffer,
    params: &ParamArena,
    momentum: &ParamArena,
    ema: &GpuEma,
    log: &wgpu::Buffer,
) -> wgpu_ema::Result<wgpu::BindGroup> {
    let ema_weights = [ema.shadow_binding("weight")?, ema.shadow_binding("bias")?];
    bind_group_with(device, pipeline, data, params, momentum, ema_weights, log)
}

/// [`bind_group`] with the EMA weights read from `ema_weights` (weight, bias) wherever they are.
#[allow(dead_code)] // the web demo binds the shadows
pub fn bind_group_with(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    data: &wgpu::Buffer,
    params: &ParamArena,
    momentum: &ParamArena,
    ema_weights: [wgpu::BufferBinding<'_>; 2],
    log: &wgpu::Buffer,
) -> wgpu_ema::Result<wgpu::BindGroup> {
    let [ema_weight, ema_bias] = ema_weights;
    let bindings = [
        data.as_entire_buffer_binding(),
        params.binding("weight")?,
        params.binding("bias")?,
        momentum.binding("weight/Momentum")?,
        momentum.binding("bias/Momentum")?,
        ema_weight,
        ema_bias,
        log.as_entire_buffer_binding(),
    ];
    let entries: Vec<wgpu::BindGroupEntry> = bindings
        .into_iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(b),
        })
        .collect();
    Ok(device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("train_step"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    }))
}
