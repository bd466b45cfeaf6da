//! Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
//! Diffusion Models", EDM2): choose the EMA length after training.
//!
//! During training, track two or more power-function EMAs (EDM2's `sigma_rel` 0.05 and 0.10
//! by default) in one pass and let a [`Recorder`] write a snapshot of all of them every few
//! thousand steps. After training, [`SnapshotSet::weights`] finds the combination of snapshots
//! whose averaging profile best matches the EMA of any other `sigma_rel` (least squares over
//! the profiles, in f64), and [`SnapshotSet::synthesize`] streams the snapshots one tensor at
//! a time into a safetensors file of that EMA under the plain parameter names.
//!
//! ```no_run
//! use wgpu_ema::{posthoc, GpuContext, ParamArena, TensorSpec};
//! # fn main() -> wgpu_ema::Result<()> {
//! let ctx = GpuContext::new()?;
//! let params = ParamArena::new(&ctx.device, [TensorSpec::new("w", [1024])])?;
//! let mut ema = posthoc::builder(&posthoc::EDM2_SIGMA_RELS)?
//!     .track_arena(&params)
//!     .build(&ctx.device, &ctx.queue)?;
//! let mut recorder = posthoc::Recorder::open("snapshots", 1000)?;
//! for _step in 0..10_000 {
//!     // ... the optimizer writes the parameters ...
//!     ema.update()?;
//!     recorder.after_update(&ema)?; // a snapshot every 1000 updates, written in the background
//! }
//! recorder.finish()?;
//!
//! let set = posthoc::SnapshotSet::open("snapshots")?;
//! let weights = set.weights(0.08, None)?; // at the last snapshot's step
//! set.synthesize(&weights, "ema-0.080.safetensors", &|_done, _total| {})?;
//! # Ok(()) }
//! ```
//!
//! Snapshot files (`phema-<index>-<step>.safetensors`) hold each profile's shadows under our
//! checkpoint names (`<name>/ExponentialMovingAverage`, `..._1`, ...) and, in the metadata,
//! the step `t`, each profile's `gamma`, `sigma_rel` and name suffix, and the stored dtype
//! (f32, or f16/bf16 to halve the disk).

mod record;
mod set;
mod solve;
mod synth;

pub use record::{builder, Recorder};
pub use set::{ProfileInfo, SnapshotInfo, SnapshotSet};
pub use synth::{Term, Weights};

use crate::error::{Error, Result};
use crate::schedule::Schedule;

/// EDM2's recorded profiles: `sigma_rel` 0.05 and 0.10.
pub const EDM2_SIGMA_RELS: [f64; 2] = [0.05, 0.10];

pub use crate::names::{META_DTYPE, META_INDEX, META_PROFILES, META_RUN, META_T, SNAPSHOT_FORMAT};

/// `gamma` of `sigma_rel`, validated (`0 < sigma_rel < 0.2887`).
pub fn gamma_of_sigma_rel(sigma_rel: f64) -> Result<f64> {
    match Schedule::power_sigma_rel(sigma_rel) {
        Ok(Schedule::Power { gamma }) => Ok(gamma),
        Ok(other) => Err(Error::PostHoc(format!("not a power schedule: {other:?}"))),
        Err(Error::InvalidSchedule(why)) => Err(Error::PostHoc(why)),
        Err(e) => Err(e),
    }
}

/// `sigma_rel` of the power-function EMA with exponent `gamma`.
pub fn sigma_rel_of_gamma(gamma: f64) -> f64 {
    solve::sigma_rel_of(gamma)
}
