//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `wgpu-ema`, each variant saying what and where.
///
/// Library code never panics on bad input: it returns one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A decay (or another schedule parameter that must lie in `[0, 1]`) is outside it, or NaN.
    #[error("{what} must be a number in [0, 1], got {value}")]
    InvalidDecay {
        /// Which parameter was wrong (`"decay"`, `"min_decay"`, ...).
        what: &'static str,
        /// The value given.
        value: f64,
    },

    /// A schedule parameter other than a decay is out of its range.
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// A configuration that cannot work: too many EMAs for one pass, compensated shadows with
    /// several EMAs or with TensorFlow's numerics, an update policy with `update_every = 0`.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// Post-hoc EMA: the snapshots or the target cannot give an answer (too few profiles, a
    /// target outside the recorded steps, inconsistent snapshots, ...).
    #[error("post-hoc EMA: {0}")]
    PostHoc(String),

    /// Two tracked tensors share a name.
    #[error("tensor `{name}` is tracked twice: names must be unique")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },

    /// No tracked tensor has this name.
    #[error("no tracked tensor is named `{name}`")]
    UnknownName {
        /// The name asked for.
        name: String,
    },

    /// A buffer lacks a usage flag the operation needs.
    #[error(
        "the buffer of tensor `{name}` lacks {needed:?} usage (it has {have:?}); \
         create it with `BufferUsages::{needed:?}` added"
    )]
    MissingUsage {
        /// The tensor whose buffer is wrong.
        name: String,
        /// The usage needed.
        needed: wgpu::BufferUsages,
        /// The usages the buffer has.
        have: wgpu::BufferUsages,
    },

    /// A tensor's byte range does not fit in its buffer.
    #[error(
        "tensor `{name}`: bytes {offset}..{end} lie past the end of its buffer ({buffer_size} bytes)"
    )]
    OutOfBounds {
        /// The tensor.
        name: String,
        /// First byte.
        offset: u64,
        /// One past the last byte.
        end: u64,
        /// The buffer's size.
        buffer_size: u64,
    },

    /// The tensor lives in the parameter arena, whose layout is fixed: it cannot be rebound.
    #[error(
        "tensor `{name}` lives in the parameter arena and cannot be rebound to another buffer"
    )]
    NotRebindable {
        /// The tensor.
        name: String,
    },

    /// The tensor's shadow is larger than one storage binding, so it is stored in several
    /// pieces and has no single binding.
    #[error(
        "the shadow of tensor `{name}` is larger than one storage binding of this device and \
         is stored in {pieces} pieces: read it back, or split the tensor"
    )]
    NotContiguous {
        /// The tensor.
        name: String,
        /// How many pieces its shadow is stored in.
        pieces: usize,
    },
    /// The tensor has no shadow to bind (it has no elements).
    #[error("tensor `{name}` has no elements, so its shadow has no binding")]
    EmptyTensor {
        /// The tensor.
        name: String,
    },
    /// Compensation terms were given to an EMA that keeps none.
    #[error(
        "tensor `{name}`: compensation terms given, but the EMA is not compensated \
         (build it with `compensated(true)`)"
    )]
    NotCompensated {
        /// The tensor.
        name: String,
    },

    /// A tensor's byte offset is not a multiple of 4.
    #[error(
        "tensor `{name}`: byte offset {offset} is not a multiple of 4 \
         (f32 elements; f16/bf16 tensors too, read as u32 words)"
    )]
    Misaligned {
        /// The tensor.
        name: String,
        /// The offset given.
        offset: u64,
    },

    /// A host slice or shape does not hold the number of elements expected.
    #[error("tensor `{name}`: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// The tensor.
        name: String,
        /// Elements expected (from its shape).
        expected: u64,
        /// Elements given.
        got: u64,
    },

    /// The number of tensors handed in differs from the number tracked.
    #[error("expected {expected} tensors (one per tracked tensor, in tracking order), got {got}")]
    TensorCountMismatch {
        /// Tensors tracked.
        expected: usize,
        /// Tensors given.
        got: usize,
    },

    /// A buffer would exceed what the device allows.
    #[error("{what}: {bytes} bytes exceed the device's limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size (as u128: a size that overflows u64 is still reported exactly).
        bytes: u128,
        /// The device limit.
        limit: u64,
    },

    /// An operation that does not support f16/bf16 parameters was asked of a tensor that has
    /// them.
    #[error(
        "tensor `{name}` has f16/bf16 parameters, which {what} do not support; \
         read the f32 shadows back and convert them on the host"
    )]
    HalfPrecision {
        /// The tensor.
        name: String,
        /// The operation.
        what: &'static str,
    },

    /// The parameters hold the EMA weights (after a swap): training steps, resets, copies,
    /// rebinds, snapshots, restores and writes of shadows or parameters are refused until the
    /// second swap (they would save or land in exchanged buffers).
    #[error(
        "parameters and shadows are swapped (evaluating with the EMA weights): swap back \
         first (updates, snapshots, restores and writes would use exchanged buffers)"
    )]
    Swapped,

    /// Two tracked tensors share bytes of one buffer: updating or swapping one would change
    /// the other.
    #[error(
        "tensors `{first}` and `{second}` overlap in the same buffer \
         (bytes {first_range:?} and {second_range:?})"
    )]
    Overlap {
        /// One tensor.
        first: String,
        /// The other.
        second: String,
        /// The first one's byte range.
        first_range: std::ops::Range<u64>,
        /// The second one's byte range.
        second_range: std::ops::Range<u64>,
    },

    /// A name would collide with one the checkpoint derives (`<x>/ExponentialMovingAverage`,
    /// `..._k`, `.../Compensation`) or reserves (`__metadata__`).
    #[error("name `{name}` collides with {with}: rename the tensor")]
    NameCollision {
        /// The name refused.
        name: String,
        /// What it collides with.
        with: String,
    },

    /// A burn parameter cannot be tracked (feature `burn`): another backend, a dtype other
    /// than f32, non-contiguous storage, or a module whose parameters changed.
    #[error("burn parameter `{name}`: {message}")]
    Burn {
        /// The parameter's module path.
        name: String,
        /// What is wrong.
        message: String,
    },

    /// No GPU adapter was found.
    #[error(
        "no GPU adapter found{backends}; for a software one install Mesa \
         (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers libvulkan1` for Vulkan lavapipe, \
         `libegl1 libegl-mesa0 libgl1-mesa-dri` for GL llvmpipe)"
    )]
    NoAdapter {
        /// The backends searched, as text (empty for all).
        backends: String,
    },

    /// The adapter refused to open a device.
    #[error("could not open a device on `{adapter}`: {message}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },

    /// The device refused work the crate submitted: it was lost or destroyed, or is out of
    /// memory. wgpu's own error, as text (wgpu's error type is not `Sync`, and this one is, so
    /// that it fits `anyhow` and friends).
    #[error("the GPU device refused the work: {0} (was it lost or destroyed?)")]
    Device(String),

    /// A tracked buffer belongs to another wgpu device than the one the EMA is built on.
    #[error("tensor `{name}`: its buffer belongs to another device than the EMA's ({detail})")]
    OtherDevice {
        /// The tensor.
        name: String,
        /// wgpu's message.
        detail: String,
    },

    /// Mapping a readback buffer failed, or the device was lost while waiting.
    #[error("reading shadows back from the GPU failed: {0}")]
    Readback(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint (or a post-hoc snapshot, or a TensorFlow checkpoint) is corrupt,
    /// truncated, or does not match what is tracked; or a save was refused before writing.
    /// Match on `kind` to act on the cause; `message` says it in words, naming the tensor.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// The tensor concerned, where there is one.
        tensor: Option<String>,
        /// What kind of failure.
        kind: CheckpointErrorKind,
        /// What is wrong, in words (the source's own text is not repeated here: it is the
        /// error's [`source`](std::error::Error::source)).
        message: String,
        /// The parser's own error, where one caused it (safetensors', serde_json's, prost's).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What kind of checkpoint failure an [`Error::Checkpoint`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckpointErrorKind {
    /// The file ends before what its header or index describes, or is too short to have one.
    Truncated,
    /// A stored checksum does not match, or checksums the file should carry are missing: the
    /// file was changed or damaged.
    Checksum,
    /// A tensor that is needed is not in the file.
    MissingTensor,
    /// The file holds a tensor that nothing tracked matches.
    UnexpectedTensor,
    /// A tensor's shape differs from what is tracked or declared.
    Shape,
    /// A tensor's dtype is not one that is read there.
    Dtype,
    /// The bytes are not a valid file of the format (header, index, table, JSON).
    Format,
    /// A metadata key is missing or its value malformed (`num_updates`, profiles, ...).
    Metadata,
    /// The file was written with another configuration (schedule, numerics, policy, EMAs,
    /// compensation) than the EMA restoring it.
    Config,
    /// Values a restore refuses: NaN or infinite.
    NonFinite,
    /// Valid, but not supported here (compressed blocks, partitioned variables, ...).
    Unsupported,
    /// The files of a set disagree: a shard of another save, snapshots of another run.
    Inconsistent,
    /// A save refused before writing anything (colliding names, a tensor too large).
    Refused,
    /// A file without this crate's checksums (another tool's, or one whose checksum keys were
    /// edited), refused by the verifying readers; the `_unverified` readers take it.
    Unverified,
    /// Another writer holds the folder (see [`FolderLock`](crate::checkpoint::FolderLock)).
    Busy,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
