//! Quick start: an EMA of a small model's parameters on the GPU, checked against the CPU.
//!
//! `cargo run --release --example quickstart`
//!
//! The "training" here is a seeded random walk of the parameters written from the host each
//! step (a real loop would run its optimizer's pass on the GPU, in the same encoder).

use wgpu_ema::cpu::{CpuEma, ReferenceEma};
use wgpu_ema::{GpuContext, GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());

    let specs = vec![
        TensorSpec::new("embed", [1000, 64]),
        TensorSpec::new("dense.weight", [64, 257]),
        TensorSpec::new("dense.bias", [257]),
        TensorSpec::new("head.weight", [257, 10]),
        TensorSpec::new("head.bias", [10]),
    ];
    let params = ParamArena::new(&ctx.device, specs.clone())?;
    let mut rng = fastrand::Rng::with_seed(42);
    let mut values: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| (0..s.numel()).map(|_| rng.f32() - 0.5).collect())
        .collect();
    for (s, v) in specs.iter().zip(&values) {
        params.write(&ctx.queue, &s.name, v)?;
    }

    let schedule = Schedule::tf(0.999);
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&params)
        .build(&ctx.device, &ctx.queue)?;
    let mut cpu = CpuEma::new(schedule, Numerics::Exact)?;
    for (s, v) in specs.iter().zip(&values) {
        cpu.track(s.clone(), v)?;
    }
    let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &slices)?;

    let total: u64 = specs.iter().map(TensorSpec::numel).sum();
    let steps = 300;
    println!(
        "{} tensors, {total} parameters, {steps} steps, {} dispatch(es) per step",
        specs.len(),
        ema.dispatches_per_step()
    );
    for _ in 0..steps {
        for v in &mut values {
            for x in v.iter_mut() {
                *x = 0.99 * *x + 0.02 * (rng.f32() - 0.5);
            }
        }
        for (s, v) in specs.iter().zip(&values) {
            params.write(&ctx.queue, &s.name, v)?;
        }
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        // ... an optimizer pass would be recorded here ...
        ema.record_update(&mut encoder)?;
        ctx.queue.submit(Some(encoder.finish()));
        let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        cpu.update(&slices)?;
        reference.update(&slices)?;
    }

    let gpu = ema.read_shadows_blocking()?;
    let (mut worst_ref, mut worst_cpu) = (0.0f64, 0.0f64);
    for (i, (spec, shadow)) in gpu.iter().enumerate() {
        let cpu_shadow = cpu.shadow(&spec.name)?;
        // Errors relative to the tensor's largest value: elements near zero do not inflate it.
        let scale = reference.shadows()[i]
            .iter()
            .fold(0.0f64, |m, r| m.max(r.abs()));
        if shadow.len() != cpu_shadow.len() || shadow.len() != reference.shadows()[i].len() {
            return Err(format!("`{}`: lengths differ", spec.name).into());
        }
        for ((&g, &r), &c) in shadow.iter().zip(&reference.shadows()[i]).zip(cpu_shadow) {
            // NaN-aware: `f64::max` would drop a NaN and report 0.
            let (er, ec) = ((g as f64 - r).abs() / scale, (g - c).abs() as f64 / scale);
            if !er.is_finite() || !ec.is_finite() {
                return Err(
                    format!("`{}`: non-finite shadow {g} (reference {r})", spec.name).into(),
                );
            }
            worst_ref = worst_ref.max(er);
            worst_cpu = worst_cpu.max(ec);
        }
    }
    println!(
        "after {} updates (decay now {}):",
        ema.num_updates(),
        schedule.decay(ema.num_updates())?
    );
    println!("  max error, GPU vs f64 reference: {worst_ref:.3e}");
    println!("  max error, GPU vs CPU f32 path:  {worst_cpu:.3e}");
    println!(
        "  (relative to each tensor's largest value; f32 epsilon is {:.3e})",
        f32::EPSILON
    );
    // f32 rounding over 300 steps stays near 4e-7 (see docs/examples.md); 1e-5 leaves room for
    // fused multiply-adds on real GPUs and still fails an update that is off.
    if worst_ref > 1e-5 {
        return Err(format!("GPU shadows differ from the reference by {worst_ref:e}").into());
    }
    Ok(())
}
