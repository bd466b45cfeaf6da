//! # wgpu-ema
//!
//! Exponential moving averages ("shadow" copies) of neural-network parameters, kept on the GPU
//! where the parameters already live, with TensorFlow's semantics
//! (`tf.train.ExponentialMovingAverage`).
//!
//! After each optimizer step, `shadow = decay * shadow + (1 - decay) * param` runs in place in
//! one compute pass over every tracked tensor, recorded into your own `wgpu::CommandEncoder`.
//! The decay for update `n` comes from a [`Schedule`] computed on the host; the shader receives
//! `alpha = 1 - decay`.
//!
//! ```no_run
//! use wgpu_ema::{GpuContext, GpuEma, ParamArena, Schedule, TensorSpec};
//! # fn main() -> wgpu_ema::Result<()> {
//! let ctx = GpuContext::new()?; // or your own device and queue
//! let params = ParamArena::new(&ctx.device, [TensorSpec::new("weight", [2, 1]), TensorSpec::new("bias", [])])?;
//! params.write(&ctx.queue, "weight", &[0.5, -0.25])?;
//! params.write(&ctx.queue, "bias", &[0.1])?;
//! let mut ema = GpuEma::builder(Schedule::tf(0.9999))
//!     .track_arena(&params)
//!     .build(&ctx.device, &ctx.queue)?; // shadows := params, on the GPU
//! for _step in 0..100 {
//!     let mut encoder = ctx.device.create_command_encoder(&Default::default());
//!     // ... your optimizer's pass writes `params.buffer()` here ...
//!     ema.record_update(&mut encoder)?;
//!     ctx.queue.submit(Some(encoder.finish()));
//! }
//! let shadows = ema.read_shadows_blocking()?;
//! println!("weight EMA: {:?}", shadows.try_get("weight")?);
//! # Ok(()) }
//! ```
//!
//! The [`cpu`] module computes the same update on host slices: a fast multi-threaded f32 path
//! and the f64 reference the tests compare the GPU with.
//!
//! ## Internals
//! Shadows live in crate-owned storage buffers. A pure planner cuts the tracked tensors into
//! rows of a chunk table and groups them into a few dispatches (one per storage binding of
//! shadows and group of parameter buffers); a step is one compute pass over them, its `alpha`
//! an immediate or a uniform-ring slot, with no GPU resource created. The WGSL is
//! `shaders/ema.wgsl`, completed by generated bindings and entry points. See ARCHITECTURE.md.

#![warn(missing_docs)]

// burn's wgpu runtime, as this crate wires it, is native-only; on the web use the crate's own
// types on burn's device directly.
#[cfg(all(feature = "burn", target_arch = "wasm32"))]
compile_error!("the `burn` feature is not available on wasm32; see README, \"The web\"");

#[cfg(feature = "burn")]
pub mod burn;
pub mod checkpoint;
mod context;
pub mod cpu;
pub mod debias;
mod error;
mod gpu;
pub mod names;
mod offload;
mod plan;
// Post-hoc EMA records and reads snapshot files: native-only (no filesystem on the web).
#[cfg(not(target_arch = "wasm32"))]
pub mod posthoc;
mod readback;
pub mod schedule;
pub mod select;
mod shader;
mod tensors;

pub use context::{wanted_features, GpuContext};
pub use error::{CheckpointErrorKind, Error, Result};
pub use gpu::{Epilogue, FusedStep, GpuEma, GpuEmaBuilder, ParamArena, Snapshot, Tiling};
pub use names::EMA_SUFFIX;
pub use offload::{Offload, OffloadStats, OffloadedEma};
pub use schedule::{Numerics, Schedule};
pub use tensors::{HostTensors, ParamDtype, TensorSpec};

// The README's and the guide's examples compile as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
#[doc = include_str!("../docs/training.md")]
#[cfg(doctest)]
pub struct TrainingDoctests;
#[doc = include_str!("../docs/checkpoints.md")]
#[cfg(doctest)]
pub struct CheckpointsDoctests;
#[doc = include_str!("../docs/posthoc.md")]
#[cfg(doctest)]
pub struct PosthocDoctests;
#[doc = include_str!("../docs/web.md")]
#[cfg(doctest)]
pub struct WebDoctests;
#[doc = include_str!("../docs/reliability.md")]
#[cfg(doctest)]
pub struct ReliabilityDoctests;
#[doc = include_str!("../docs/offload.md")]
#[cfg(doctest)]
pub struct OffloadDoctests;
#[doc = include_str!("../docs/ranks.md")]
#[cfg(doctest)]
pub struct RanksDoctests;
/// The exact `wgpu` this crate is built against: use it to create the buffers you hand in.
pub use wgpu;
