//! The page's self-check: the GPU EMA in this tab against the CPU paths computed in the same
//! tab, on tensors of odd sizes, several steps per submit through a uniform ring smaller than a
//! submit (the ring is the only path WebGPU has: distinct values within one submit, rings
//! replaced as they are used up), and a checkpoint round trip through bytes. What the headless-browser test in CI reads.

use serde_json::{json, Value};
use wgpu_ema::checkpoint::{self, Checkpoint};
use wgpu_ema::cpu::{CpuEma, ReferenceEma};
use wgpu_ema::{wgpu, GpuContext, GpuEma, HostTensors, Numerics, ParamArena, Schedule, TensorSpec};

use crate::Error;

/// Relative error allowed against the f64 reference, of `max(1, |reference|)`: f32 rounding
/// of a few dozen steps.
pub const REL_TOL: f64 = 1e-5;
/// Units in the last place allowed between the GPU and the CPU's f32 path (0 where neither
/// side fuses the multiply-add; a compiler may).
pub const ULPS_TOL: u64 = 4;
/// Uniform-ring slots of the checked EMA: fewer than the steps of one submit.
const RING_SLOTS: usize = 5;

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("conv/kernel", [3, 3, 7, 5]),
        TensorSpec::new("conv/bias", [5]),
        TensorSpec::new("scale", []),
        TensorSpec::new("dense/kernel", [257, 131]),
        TensorSpec::new("embed", [70_001]),
    ]
}

/// Seeded values in [-1, 1), one set per tensor.
fn values(rng: &mut fastrand::Rng) -> Vec<Vec<f32>> {
    specs()
        .iter()
        .map(|s| (0..s.numel()).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect()
}

fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        (if i < 0 { i32::MIN - i } else { i }) as i64
    };
    (key(a) - key(b)).unsigned_abs()
}

/// The largest distance in ulps between two equally long slices (a length mismatch is
/// `u64::MAX`).
pub fn max_ulps(a: &[f32], b: &[f32]) -> u64 {
    if a.len() != b.len() {
        return u64::MAX;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ulps(x, y))
        .max()
        .unwrap_or(0)
}

/// The largest error relative to `max(1, |reference|)`; NaN or a length mismatch is infinite.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let e = (g as f64 - w).abs() / w.abs().max(1.0);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// Runs `steps` updates, `per_submit` to a submit, and compares. Returns the report (with
/// `"pass"`), or an error when something could not run at all.
pub async fn run(steps: u32, per_submit: u32) -> Result<Value, Error> {
    let per_submit = per_submit.clamp(1, steps.max(1));
    let ctx = GpuContext::new_async().await?;
    let (device, queue) = (&ctx.device, &ctx.queue);
    let arena = ParamArena::new(device, specs())?;
    let mut rng = fastrand::Rng::with_seed(2026);
    let init = values(&mut rng);
    for (s, v) in specs().iter().zip(&init) {
        arena.write(queue, &s.name, v)?;
    }
    let (first, second) = (Schedule::tf(0.99), Schedule::constant(0.9));
    // A ring of 5 slots for 8 steps per submit: used up and replaced within a submit and
    // across submits, the path every WebGPU step takes once a ring is full.
    let mut ema = GpuEma::builder(first)
        .extra_ema(second)
        .ring_slots(RING_SLOTS)
        .track_arena(&arena)
        .build(device, queue)?;
    let init_refs: Vec<&[f32]> = init.iter().map(Vec::as_slice).collect();
    let mut cpu = CpuEma::new(first, Numerics::Exact)?;
    for (s, v) in specs().iter().zip(&init) {
        cpu.track(s.clone(), v)?;
    }
    let mut reference = ReferenceEma::new(first, Numerics::Exact, &init_refs)?;
    let mut reference_1 = ReferenceEma::new(second, Numerics::Exact, &init_refs)?;

    // Each submit's parameter sets, laid out as the arena (its padding NaN), copied into the
    // arena before each step of the submit.
    let image = (arena.size() / 4) as usize;
    let source = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("self-check params"),
        size: arena.size() * per_submit as u64,
        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut last = init.clone();
    let mut done = 0u32;
    let mut submits = 0u32;
    while done < steps {
        let n = per_submit.min(steps - done);
        let mut host = vec![f32::NAN; image * n as usize];
        let mut encoder = device.create_command_encoder(&Default::default());
        for j in 0..n as usize {
            let p = values(&mut rng);
            for (s, v) in specs().iter().zip(&p) {
                let at = j * image + (arena.offset(&s.name)? / 4) as usize;
                host[at..at + v.len()].copy_from_slice(v);
            }
            let p_refs: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
            cpu.update(&p_refs)?;
            reference.update(&p_refs)?;
            reference_1.update(&p_refs)?;
            let bytes = arena.size();
            encoder.copy_buffer_to_buffer(&source, j as u64 * bytes, arena.buffer(), 0, bytes);
            ema.record_update(&mut encoder)?;
            last = p;
        }
        queue.write_buffer(&source, 0, bytemuck::cast_slice(&host));
        queue.submit(Some(encoder.finish()));
        done += n;
        submits += 1;
    }

    let shadows = ema.read_shadows().await?;
    let shadows_1 = ema.read_ema(1).await?;
    let mut worst_rel = 0.0f64;
    let mut worst_ulps = 0u64;
    for (i, s) in specs().iter().enumerate() {
        let gpu = shadows.try_get(&s.name)?;
        worst_rel = worst_rel
            .max(max_rel_err(gpu, &reference.shadows()[i]))
            .max(max_rel_err(
                shadows_1.try_get(&s.name)?,
                &reference_1.shadows()[i],
            ));
        worst_ulps = worst_ulps.max(max_ulps(gpu, cpu.shadow(&s.name)?));
    }

    let same = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    // The checkpoint a page downloads, loaded back from its bytes, holds the GPU's shadows
    // bit for bit.
    let snapshot = ema.snapshot(false)?.into_host().await?;
    let mut params = HostTensors::new();
    for (s, v) in specs().iter().zip(&last) {
        params.insert(s.clone(), v.clone())?;
    }
    let bytes = checkpoint::training_bytes(&snapshot, Some(&params), &HostTensors::new())?;
    let loaded = Checkpoint::from_bytes(bytes.clone())?;
    let mut round_trip = loaded.verified() && loaded.num_updates()? == steps as u64;
    for s in specs() {
        let from_file = loaded
            .get(&s.shadow_name())
            .map(|(_, v)| v)
            .unwrap_or_default();
        let gpu = shadows.try_get(&s.name)?;
        round_trip &= from_file.len() == gpu.len()
            && from_file
                .iter()
                .zip(gpu)
                .all(|(a, b)| a.to_bits() == b.to_bits());
    }

    // Evaluation with the EMA weights: swap them into the parameters and back (the pass that
    // writes the parameters), bit for bit both ways.
    ema.swap()?;
    let swapped = arena.read(device, queue).await?;
    ema.swap()?;
    let restored = arena.read(device, queue).await?;
    let mut swap_ok = true;
    for (s, p) in specs().iter().zip(&last) {
        swap_ok &= same(swapped.try_get(&s.name)?, shadows.try_get(&s.name)?);
        swap_ok &= same(restored.try_get(&s.name)?, p);
    }

    let info = ctx.info();
    let elements: u64 = specs().iter().map(TensorSpec::numel).sum();
    let mut more = crate::layouts::run(&ctx).await?;
    let fused = crate::fused::run(&ctx, 20).await?;
    let offload = crate::offload::run(&ctx, 20).await?;
    for extra in [fused, offload] {
        if let (Some(m), Some(f)) = (more.as_object_mut(), extra.as_object()) {
            m.extend(f.clone());
        }
    }
    let pass = worst_rel <= REL_TOL
        && worst_ulps <= ULPS_TOL
        && round_trip
        && swap_ok
        && !ema.uses_immediates()
        && more["user_buffers_pass"] == true
        && more["compensated_pass"] == true
        && more["failed_readback_pass"] == true
        && more["fused_pass"] == true
        && more["offload_pass"] == true;
    let mut report = json!({
        "pass": pass,
        "adapter": info.name,
        "backend": format!("{:?}", info.backend),
        "uses_immediates": ema.uses_immediates(),
        "steps": steps,
        "steps_per_submit": per_submit,
        "ring_slots": RING_SLOTS,
        "submits": submits,
        "tensors": specs().len(),
        "elements": elements,
        "emas": ema.ema_count(),
        "max_rel_err_vs_f64": worst_rel,
        "rel_tol": REL_TOL,
        "max_ulps_vs_cpu_f32": worst_ulps,
        "ulps_tol": ULPS_TOL,
        "checkpoint_bytes": bytes.len(),
        "checkpoint_round_trip": round_trip,
        "swap_round_trip": swap_ok,
    });
    if let (Some(r), Some(m)) = (report.as_object_mut(), more.as_object()) {
        r.extend(m.clone());
    }
    Ok(report)
}
