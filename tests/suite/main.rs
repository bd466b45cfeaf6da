//! The integration tests, one binary (one link of wgpu instead of one per file): a module per
//! area. GPU tests share one device (`common::gpu`) and skip with a `SKIPPED` line when there
//! is no adapter, or fail with `WGPU_EMA_REQUIRE_ADAPTER=1`.
//!
//! Apart, as their own binaries: `streaming` (it measures the process's memory, which other
//! tests running beside it would disturb), `cli` (feature `cli`), `burn` and `burn_learner`
//! (features `burn`, `burn-learner`).

#[path = "../common/mod.rs"]
mod common;

/// BEMA: the anchor, the corrected weights, their swaps, copies and checkpoints.
mod bema;
/// Safetensors checkpoints: save, shards, export, restore, resume.
mod checkpoint;
/// Compensated (Kahan) shadows against f64 over long runs.
mod compensated;
/// Bad input gets a clear error.
mod errors;
/// Swapping the EMA weights in and back, copying them into the parameters.
mod evaluation;
/// The fused epilogue in an optimizer of the test's own, against the separate pass.
mod fused;
/// f16 and bf16 parameters with f32 shadows.
mod half_precision;
/// Checkpoints as bytes, async readback, a schedule changed mid-run.
mod in_memory;
/// Many tensors in many buffers: the multi-tensor dispatch and rebinding.
mod many_tensors;
/// Offloaded shadows: host memory fed through a staging ring.
mod offload;
/// Tensors and buffers larger than one storage binding.
mod past_one_binding;
/// The peers' own EMA code (diffusers, timm, ema-pytorch, EDM2) as the reference.
mod peers;
/// Post-hoc EMA: recording, solving, synthesis.
mod posthoc;
/// An EMA spread over ranks: rank files, the committing index, consolidation, resharding.
mod ranks;
/// Corruption, killed saves, refusals, a destroyed device.
mod reliability;
/// Schedules and policies end to end.
mod schedules;
/// Several EMAs (K schedules) updated in one pass.
mod several_emas;
/// TensorFlow's checkpoint format, both ways.
mod tf_checkpoint;
/// TensorFlow 2.21's own shadows, replayed.
mod tf_fixture;
/// Both ways of spreading items over invocations, every route through the shader.
mod tiling;
/// The GPU update against the f64 reference: sizes, offsets, numerics, immediates and the ring.
mod update;
/// EMA variants: Switch EMA, selection by name, target networks.
mod variants;
