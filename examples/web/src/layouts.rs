//! More of the self-check: parameters in the caller's own buffers at odd offsets with NaN
//! between the tensors, bf16 parameters, and compensated (Kahan) shadows, whose extra terms a
//! shader compiler must not fold away, each against the references computed in the tab; and a
//! readback the device refuses, which must be an error.

use serde_json::{json, Value};
use wgpu_ema::checkpoint::EmaState;
use wgpu_ema::cpu::{CpuEma, ReferenceEma};
use wgpu_ema::{wgpu, GpuContext, GpuEma, Numerics, ParamArena, ParamDtype, Schedule, TensorSpec};

use crate::check::{max_rel_err, max_ulps, REL_TOL};
use crate::Error;

/// Elements of the two f32 tensors and of the bf16 one: odd on purpose.
const NA: usize = 1001;
const NB: usize = 37;
const NH: usize = 513;
/// Byte offsets in the f32 buffer: `a` after one NaN word, `b` after three more.
const A_AT: u64 = 4;
const B_AT: u64 = A_AT + 4 * (NA as u64 + 3);

fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn uniform(rng: &mut fastrand::Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

/// bf16 values as their bits (an f32's upper half, so exactly representable) and as f32.
fn bf16(rng: &mut fastrand::Rng, n: usize) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = uniform(rng, n)
        .iter()
        .map(|v| (v.to_bits() >> 16) as u16)
        .collect();
    let wide = bits
        .iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect();
    (bits, wide)
}

/// User buffers and bf16: `steps` updates, one submit each, against the f64 reference.
async fn user_buffers(ctx: &GpuContext, steps: u32) -> Result<Value, Error> {
    let queue = &ctx.queue;
    let mut rng = fastrand::Rng::with_seed(7);
    let words = (B_AT / 4) as usize + NB + 5;
    let buf = storage(ctx, "self-check f32 params", 4 * words as u64);
    let hbuf = storage(ctx, "self-check bf16 params", 2 * NH as u64 + 4);
    let write = |a: &[f32], b: &[f32], h: &[u16]| {
        let mut all = vec![f32::NAN; words];
        all[(A_AT / 4) as usize..][..NA].copy_from_slice(a);
        all[(B_AT / 4) as usize..][..NB].copy_from_slice(b);
        queue.write_buffer(&buf, 0, bytemuck::cast_slice(&all));
        let mut hw = h.to_vec();
        hw.resize(NH.next_multiple_of(2) + 2, 0x7fc0); // bf16 NaN past the end
        queue.write_buffer(&hbuf, 0, bytemuck::cast_slice(&hw));
    };
    let (a, b) = (uniform(&mut rng, NA), uniform(&mut rng, NB));
    let (h, hw) = bf16(&mut rng, NH);
    write(&a, &b, &h);
    let schedule = Schedule::tf(0.99);
    let specs = [
        TensorSpec::new("user/a", [7, 11, 13]),
        TensorSpec::new("user/b", [NB]),
        TensorSpec::new("half/w", [NH]),
    ];
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(specs[0].clone(), &buf, A_AT)
        .track_buffer(specs[1].clone(), &buf, B_AT)
        .track_buffer_as(specs[2].clone(), &hbuf, 0, ParamDtype::BF16)
        .build(&ctx.device, queue)?;
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&a, &b, &hw])?;
    for _ in 0..steps {
        let (a, b) = (uniform(&mut rng, NA), uniform(&mut rng, NB));
        let (h, hw) = bf16(&mut rng, NH);
        write(&a, &b, &h);
        ema.update()?;
        reference.update(&[&a, &b, &hw])?;
    }
    let got = ema.read_shadows().await?;
    let mut worst = 0.0f64;
    for (i, s) in specs.iter().enumerate() {
        worst = worst.max(max_rel_err(got.try_get(&s.name)?, &reference.shadows()[i]));
    }
    Ok(json!({
        "user_buffers_steps": steps,
        "user_buffers_max_rel_err_vs_f64": worst,
        "user_buffers_pass": worst <= REL_TOL,
    }))
}

/// Compensated shadows at decay 0.999 against the CPU's compensated path (shadows and Kahan
/// terms) and the f64 reference.
async fn compensated(ctx: &GpuContext, steps: u32) -> Result<Value, Error> {
    let (device, queue) = (&ctx.device, &ctx.queue);
    let mut rng = fastrand::Rng::with_seed(11);
    let spec = TensorSpec::new("kahan", [4099]);
    let n = spec.numel() as usize;
    // Parameters near 1 moving by 1e-3: updates far below the shadows' ulp without Kahan.
    let base = uniform(&mut rng, n);
    let params = |rng: &mut fastrand::Rng| -> Vec<f32> {
        base.iter()
            .map(|b| 1.0 + 0.25 * b + 1e-3 * (rng.f32() - 0.5))
            .collect()
    };
    let arena = ParamArena::new(device, [spec.clone()])?;
    let p = params(&mut rng);
    arena.write(queue, &spec.name, &p)?;
    let schedule = Schedule::constant(0.999);
    let mut ema = GpuEma::builder(schedule)
        .compensated(true)
        .track_arena(&arena)
        .build(device, queue)?;
    let mut cpu = CpuEma::new(schedule, Numerics::Exact)?;
    cpu.track(spec.clone(), &p)?;
    cpu.set_compensated(true)?;
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p])?;
    for _ in 0..steps {
        let p = params(&mut rng);
        arena.write(queue, &spec.name, &p)?;
        ema.update()?;
        cpu.update(&[&p])?;
        reference.update(&[&p])?;
    }
    let snapshot = ema.snapshot(false)?.into_host().await?;
    let shadow = snapshot.read_shadow(0)?;
    let comp = snapshot.read_compensation(0)?.unwrap_or_default();
    let cpu_comp = cpu.compensation(&spec.name)?.unwrap_or_default();
    let ulps = max_ulps(&shadow, cpu.shadow(&spec.name)?);
    let comp_ulps = max_ulps(&comp, cpu_comp);
    let rel = max_rel_err(&shadow, &reference.shadows()[0]);
    Ok(json!({
        "compensated_steps": steps,
        "compensated_max_ulps_vs_cpu": ulps,
        "compensated_terms_max_ulps_vs_cpu": comp_ulps,
        "compensated_max_rel_err_vs_f64": rel,
        "compensated_pass": ulps == 0 && comp_ulps == 0 && comp.len() == n && rel <= REL_TOL,
    }))
}

/// A readback whose copy the device refuses (its buffer destroyed) resolves to an error on
/// the web too, not to a buffer of zeros.
async fn failed_readback(ctx: &GpuContext) -> Result<Value, Error> {
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("gone", [64])])?;
    arena.buffer().destroy();
    let message = match arena.read(&ctx.device, &ctx.queue).await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    Ok(json!({
        "failed_readback_error": message,
        "failed_readback_pass": message.is_some(),
    }))
}

/// The checks, merged into one report.
pub async fn run(ctx: &GpuContext) -> Result<Value, Error> {
    let mut report = user_buffers(ctx, 12).await?;
    for more in [compensated(ctx, 200).await?, failed_readback(ctx).await?] {
        if let (Some(r), Some(m)) = (report.as_object_mut(), more.as_object()) {
            r.extend(m.clone());
        }
    }
    Ok(report)
}
