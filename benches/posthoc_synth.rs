//! Post-hoc synthesis at GPT-2-small size: time and peak host memory.
//!
//! ```text
//! cargo bench --bench posthoc_synth -- make DIR [--snapshots 20] [--dtype f16|f32]
//! cargo bench --bench posthoc_synth -- synth DIR [--sigma-rel 0.08]
//! ```
//! `make` writes a snapshot set of GPT-2 small's 148 tensors (124M parameters) with EDM2's two
//! profiles, from seeded values; `synth` (run it as its own process, so the peak is its own)
//! opens the set, solves for the weights, synthesizes one EMA, and prints the time, the bytes
//! read, the same bytes read plainly in the same run, and the process's peak resident memory.

#[allow(dead_code)]
#[path = "shared/models.rs"]
mod models;

use std::path::{Path, PathBuf};
use std::time::Instant;

use wgpu_ema::checkpoint::EmaState;
use wgpu_ema::posthoc::{self, Recorder, SnapshotSet};
use wgpu_ema::schedule::Schedule;
use wgpu_ema::{Numerics, ParamDtype, TensorSpec};

type Error = Box<dyn std::error::Error>;

/// A state with two power-function EMAs whose shadows are seeded values.
struct Synthetic {
    specs: Vec<TensorSpec>,
    t: u64,
    gammas: [f64; 2],
}

impl Synthetic {
    fn values(&self, k: usize, i: usize) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(self.t * 1000 + i as u64 * 10 + k as u64);
        (0..self.specs[i].numel())
            .map(|_| rng.f32() * 0.2 - 0.1)
            .collect()
    }
}

impl EmaState for Synthetic {
    fn specs(&self) -> Vec<TensorSpec> {
        self.specs.clone()
    }
    fn num_updates(&self) -> u64 {
        self.t
    }
    fn schedule(&self) -> Schedule {
        Schedule::power(self.gammas[0])
    }
    fn numerics(&self) -> Numerics {
        Numerics::Exact
    }
    fn read_shadow(&self, i: usize) -> wgpu_ema::Result<Vec<f32>> {
        Ok(self.values(0, i))
    }
    fn read_param(&self, _i: usize) -> wgpu_ema::Result<Option<Vec<f32>>> {
        Ok(None)
    }
    fn ema_count(&self) -> usize {
        2
    }
    fn ema_schedule(&self, k: usize) -> Option<Schedule> {
        self.gammas.get(k).map(|&g| Schedule::power(g))
    }
    fn read_ema_shadow(&self, k: usize, i: usize) -> wgpu_ema::Result<Vec<f32>> {
        Ok(self.values(k, i))
    }
}

/// `VmHWM` (peak resident) and `RssAnon` of this process, in MiB (Linux).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (kib("VmHWM:"), kib("RssAnon:"))
}

fn plain_read(paths: &[PathBuf]) -> Result<u64, Error> {
    use std::io::Read;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    for p in paths {
        let mut f = std::fs::File::open(p)?;
        loop {
            let got = f.read(&mut buf)?;
            if got == 0 {
                break;
            }
            n += got as u64;
        }
    }
    Ok(n)
}

fn main() -> Result<(), Error> {
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (mode, dir) = match args.as_slice() {
        [m, d, ..] => (m.as_str(), PathBuf::from(d)),
        _ => {
            return Err(
                "usage: cargo bench --bench posthoc_synth -- make|synth DIR [options]".into(),
            )
        }
    };
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match mode {
        "make" => make(
            &dir,
            opt("--snapshots").map_or(Ok(20), |v| v.parse())?,
            opt("--dtype").unwrap_or_else(|| "f16".into()),
        ),
        "synth" => synth(&dir, opt("--sigma-rel").map_or(Ok(0.08), |v| v.parse())?),
        _ => Err(format!("unknown mode {mode}").into()),
    }
}

fn make(dir: &Path, snapshots: u64, dtype: String) -> Result<(), Error> {
    let dtype = match dtype.as_str() {
        "f16" => ParamDtype::F16,
        "f32" => ParamDtype::F32,
        _ => return Err("--dtype f16 or f32".into()),
    };
    let _ = std::fs::remove_dir_all(dir);
    let gammas = [
        posthoc::gamma_of_sigma_rel(0.05)?,
        posthoc::gamma_of_sigma_rel(0.10)?,
    ];
    let mut rec = Recorder::open(dir, 0)?.dtype(dtype);
    let start = Instant::now();
    for s in 1..=snapshots {
        let state = Synthetic {
            specs: models::gpt2_small(),
            t: s * 4096,
            gammas,
        };
        let path = rec.write(&state)?;
        println!(
            "wrote {} ({:.0} MB) at {:.1} s",
            path.display(),
            std::fs::metadata(&path)?.len() as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn synth(dir: &Path, sigma_rel: f64) -> Result<(), Error> {
    let t0 = Instant::now();
    let set = SnapshotSet::open(dir)?;
    let t_open = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let w = set.weights(sigma_rel, None)?;
    let t_solve = t1.elapsed().as_secs_f64();
    let paths: Vec<PathBuf> = set.snapshots().iter().map(|s| s.path.clone()).collect();
    let file_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let t2 = Instant::now();
    plain_read(&paths)?;
    let t_read = t2.elapsed().as_secs_f64();
    let out = dir.join("synthesized.safetensors");
    let t3 = Instant::now();
    set.synthesize(&w, &out, &|_, _| {})?;
    let t_synth = t3.elapsed().as_secs_f64();
    let (peak, anon) = memory();
    let params: u64 = set.specs().iter().map(|s| s.numel()).sum();
    let largest = set.specs().iter().map(|s| s.numel()).max().unwrap_or(0);
    let _ = std::fs::remove_file(&out);
    println!(
        "{} snapshots x 2 profiles ({:?}), {params} parameters, {:.2} GB of snapshots",
        set.snapshots().len(),
        set.snapshots()[0].dtype,
        file_bytes as f64 / 1e9
    );
    println!("open (headers, consistency): {:.3} s", t_open);
    println!(
        "weights ({} terms, f64 solve): {:.4} s",
        w.terms.len(),
        t_solve
    );
    println!(
        "synthesize: {:.2} s = {:.2} GB/s of snapshots read (plain sequential read of the same files: {:.2} s = {:.2} GB/s)",
        t_synth,
        file_bytes as f64 / 1e9 / t_synth,
        t_read,
        file_bytes as f64 / 1e9 / t_read
    );
    println!(
        "peak resident memory {peak:.0} MiB (anonymous now {anon:.0} MiB); largest tensor {:.0} MiB as f32, model {:.0} MiB as f32",
        largest as f64 * 4.0 / 1048576.0,
        params as f64 * 4.0 / 1048576.0
    );
    Ok(())
}
