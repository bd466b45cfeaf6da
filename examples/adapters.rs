//! The EMA of a fine-tune's adapters only: a frozen base layer and two low-rank adapter
//! matrices (LoRA's A and B), trained by SGD on a seeded regression; the EMA tracks the
//! adapters alone (a selection over the names) and exports them under their module paths.
//!
//! `cargo run --release --example adapters [-- --out DIR]`
//!
//! The training runs on the host (the point is the selection, not the optimizer); each step
//! writes the adapters into the arena and records one EMA update over them.

use wgpu_ema::select::Selection;
use wgpu_ema::{checkpoint, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};

const D: usize = 32;
const R: usize = 4;
const BATCH: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map_or_else(|| std::path::PathBuf::from("target/adapters"), Into::into);
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    let mut rng = fastrand::Rng::with_seed(3);
    let mut init =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| (rng.f32() - 0.5) * scale).collect() };
    // y = (W + B A) x; W frozen, A (R x D) and B (D x R) trained; the target is W + a low-rank
    // change the adapters can learn.
    let base = init(D * D, 0.4);
    let mut a = init(R * D, 0.2);
    let mut b = vec![0.0f32; D * R];
    let (true_a, true_b) = (init(R * D, 0.5), init(D * R, 0.5));
    let specs = vec![
        TensorSpec::new("layer.base.weight", [D, D]),
        TensorSpec::new("layer.lora_a.weight", [R, D]),
        TensorSpec::new("layer.lora_b.weight", [D, R]),
    ];
    let arena = ParamArena::new(&ctx.device, specs.clone())?;
    arena.write(&ctx.queue, "layer.base.weight", &base)?;
    arena.write(&ctx.queue, "layer.lora_a.weight", &a)?;
    arena.write(&ctx.queue, "layer.lora_b.weight", &b)?;
    // Everything left out, then the adapters averaged again: the last matching rule decides.
    let mut ema = GpuEma::builder(Schedule::tf(0.99))
        .select(Selection::new().exclude("*").average("*.lora_*"))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)?;
    let tracked: Vec<String> = ema.specs().into_iter().map(|s| s.name).collect();
    println!("tracking {tracked:?} (selection: {})", ema.selection());

    let lr = 2.0;
    let mut data = fastrand::Rng::with_seed(4);
    for step in 1..=400 {
        let mut ga = vec![0.0f32; R * D];
        let mut gb = vec![0.0f32; D * R];
        let mut loss = 0.0;
        for _ in 0..BATCH {
            let x: Vec<f32> = (0..D).map(|_| data.f32() - 0.5).collect();
            let ax = matvec(&a, &x, R, D);
            let tax = matvec(&true_a, &x, R, D);
            let (y, t) = (matvec(&b, &ax, D, R), matvec(&true_b, &tax, D, R));
            // The frozen base cancels out of the error (the same in prediction and target).
            let err: Vec<f32> = y.iter().zip(&t).map(|(y, t)| y - t).collect();
            loss += err.iter().map(|e| e * e).sum::<f32>() / D as f32;
            // dL/dB = err ax^T, dL/dA = (B^T err) x^T.
            let bt_err: Vec<f32> = (0..R)
                .map(|r| (0..D).map(|i| b[i * R + r] * err[i]).sum())
                .collect();
            for i in 0..D {
                for r in 0..R {
                    gb[i * R + r] += err[i] * ax[r];
                }
            }
            for r in 0..R {
                for j in 0..D {
                    ga[r * D + j] += bt_err[r] * x[j];
                }
            }
        }
        for (p, g) in a.iter_mut().zip(&ga).chain(b.iter_mut().zip(&gb)) {
            *p -= lr * g / BATCH as f32;
        }
        arena.write(&ctx.queue, "layer.lora_a.weight", &a)?;
        arena.write(&ctx.queue, "layer.lora_b.weight", &b)?;
        ema.update()?;
        if step == 1 || step % 100 == 0 {
            println!("step {step:4}: loss {:.3e}", loss / BATCH as f32);
        }
    }
    std::fs::create_dir_all(&out)?;
    let path = out.join("adapters-ema.safetensors");
    checkpoint::export_ema(&path, &ema.snapshot(false)?)?;
    let exported = checkpoint::Checkpoint::load(&path)?;
    let names: Vec<&str> = exported.names().collect();
    println!("exported {} with {names:?}", path.display());
    // Only the adapters, under their module paths; the base is the frozen checkpoint's.
    if names != ["layer.lora_a.weight", "layer.lora_b.weight"] {
        return Err(format!("the export holds {names:?}").into());
    }
    Ok(())
}

/// `m x` for `m` of `rows x cols`, row-major.
fn matvec(m: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows)
        .map(|i| (0..cols).map(|j| m[i * cols + j] * x[j]).sum())
        .collect()
}
