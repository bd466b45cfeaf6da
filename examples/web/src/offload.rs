//! Offloaded shadows in the browser: the host update runs in the map callbacks on the page's
//! one thread. An offloaded EMA cut into several chunks and an on-GPU EMA follow the same
//! parameters; the offloaded one is settled after each step (every chunk sampled each step),
//! so the two must agree to the f32 rounding of their arithmetic.

use serde_json::{json, Value};
use wgpu_ema::{GpuContext, GpuEma, Offload, ParamArena, Schedule, TensorSpec};

use crate::Error;

fn specs() -> Vec<TensorSpec> {
    vec![TensorSpec::new("a", [1001]), TensorSpec::new("b", [37])]
}

/// `steps` steps of random parameters, each way; `offload_pass` when the shadows agree within
/// `1e-6` and no sample was skipped.
pub async fn run(ctx: &GpuContext, steps: u32) -> Result<Value, Error> {
    let mut rng = fastrand::Rng::with_seed(41);
    let arena = ParamArena::new(&ctx.device, specs())?;
    let mut write = |arena: &ParamArena| -> Result<(), Error> {
        for s in specs() {
            let v: Vec<f32> = (0..s.numel()).map(|_| rng.f32() * 2.0 - 1.0).collect();
            arena.write(&ctx.queue, &s.name, &v)?;
        }
        Ok(())
    };
    write(&arena)?;
    let schedule = Schedule::tf(0.99);
    let mut on_gpu = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)?;
    // 512-byte slots: the 1038 parameters in 9 chunks, 2 sampled per update.
    let mut off = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build_offloaded_async(&ctx.device, &ctx.queue, Offload::new(2048))
        .await?;
    for _ in 0..steps {
        write(&arena)?;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        on_gpu.record_update(&mut encoder)?;
        off.record_update(&mut encoder)?;
        ctx.queue.submit(Some(encoder.finish()));
        off.settle_async().await?;
    }
    let want = on_gpu.read_shadows().await?;
    let got = off.read_shadows_async().await?;
    let (mut worst, mut equal, mut total) = (0.0f64, 0usize, 0usize);
    for s in specs() {
        for (&x, &y) in want.try_get(&s.name)?.iter().zip(got.try_get(&s.name)?) {
            worst = worst.max((f64::from(x) - f64::from(y)).abs());
            equal += usize::from(x.to_bits() == y.to_bits());
            total += 1;
        }
    }
    let stats = off.stats();
    Ok(json!({
        "offload_steps": steps,
        "offload_chunks": stats.chunks,
        "offload_samples": stats.samples,
        "offload_skipped": stats.skipped,
        "offload_max_abs_diff": worst,
        "offload_bits_equal": format!("{equal}/{total}"),
        "offload_pass": worst <= 1e-6 && stats.skipped == 0 && stats.chunks > 1,
    }))
}
