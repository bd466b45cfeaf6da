//! Where every element lives, and how a step's work splits into storage bindings.
//!
//! Pure arithmetic, no GPU: a *segment* is a run of elements that one bind group covers,
//! with the parameters bound at the storage-aligned offset at or below their first element
//! (`shift` elements in) and the shadows bound exactly. Segments never exceed the device's
//! `max_storage_buffer_binding_size`; every split falls on a multiple of the storage offset
//! alignment, so all chunks of a run have the same shift.

/// Elements per workgroup invocation group (`@workgroup_size` in `shaders/ema.wgsl`).
pub(crate) const WORKGROUP: u64 = 256;
/// The most workgroups in one dimension of a dispatch (WebGPU's default limit).
pub(crate) const MAX_GROUPS_PER_DIM: u64 = 65_535;

/// The device limits the planner needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlanLimits {
    /// Granularity of offsets that may start a binding: the storage offset alignment, and at
    /// least 16 bytes so that vec4 chunks stay whole.
    pub align: u64,
    /// Largest binding, in bytes, a multiple of `align`.
    pub max_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
}

impl PlanLimits {
    pub fn from_device(limits: &wgpu::Limits) -> Self {
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(16);
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Self {
            align,
            max_binding: max_binding / align * align,
            max_buffer: limits.max_buffer_size / align * align,
        }
    }
}

/// Rounds `x` up to a multiple of `a` (a power of two or any positive number).
pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Which entry point a segment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// Four elements per invocation (`vec4<f32>`): shift and count multiples of 4.
    Vec4,
    /// One element per invocation.
    Scalar,
    /// f16 parameters (two per u32 word), one element per invocation.
    F16,
    /// bf16 parameters (two per u32 word), one element per invocation.
    BF16,
}

/// One bind group's worth of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentPlan {
    pub kind: Kind,
    /// Byte offset of the parameter binding (storage-aligned).
    pub param_offset: u64,
    /// Byte size of the parameter binding: `(shift + count) * 4`.
    pub param_size: u64,
    /// Byte offset of the shadow binding (storage-aligned); its size is `count * 4`.
    pub shadow_offset: u64,
    /// Elements.
    pub count: u64,
}

impl SegmentPlan {
    /// Workgroups as (x, y): 2-D once one dimension's 65,535 is not enough.
    pub fn groups(&self) -> (u32, u32) {
        let items = match self.kind {
            Kind::Vec4 => self.count / 4,
            _ => self.count,
        };
        let groups = items.div_ceil(WORKGROUP).max(1);
        let x = groups.min(MAX_GROUPS_PER_DIM);
        let y = groups.div_ceil(x);
        // max_binding <= 4 GiB keeps y far below 65,535.
        (x as u32, y as u32)
    }
}

/// Plans a run of `n` elements whose parameters start at byte `param_offset` (a multiple of
/// 4) and whose shadows start at byte `shadow_offset` (a multiple of `lim.align`).
/// `vec4` allows the vec4 entry point where the parameters' alignment permits it; `n` must
/// then be a multiple of 4 for it to be used.
pub(crate) fn plan_run(
    param_offset: u64,
    shadow_offset: u64,
    n: u64,
    vec4: bool,
    lim: &PlanLimits,
) -> Vec<SegmentPlan> {
    debug_assert_eq!(param_offset % 4, 0);
    debug_assert_eq!(shadow_offset % lim.align, 0);
    let mut out = Vec::new();
    let mut done = 0u64;
    while done < n {
        let p = param_offset + done * 4;
        let bind = p / lim.align * lim.align;
        let shift = (p - bind) / 4;
        let kind = if vec4 && shift.is_multiple_of(4) && n.is_multiple_of(4) {
            Kind::Vec4
        } else {
            Kind::Scalar
        };
        let fits = (lim.max_binding - shift * 4) / lim.align * lim.align / 4;
        let count = (n - done).min(fits);
        out.push(SegmentPlan {
            kind,
            param_offset: bind,
            param_size: (shift + count) * 4,
            shadow_offset: shadow_offset + done * 4,
            count,
        });
        done += count;
    }
    out
}

/// Plans a run of `n` 16-bit parameters (f16 or bf16, `kind`) starting at byte
/// `param_offset` (a multiple of 4, so that the shift into the binding is even) with f32
/// shadows from byte `shadow_offset` (a multiple of `lim.align`). The parameter binding is
/// rounded up to whole u32 words.
pub(crate) fn plan_run_half(
    param_offset: u64,
    shadow_offset: u64,
    n: u64,
    kind: Kind,
    lim: &PlanLimits,
) -> Vec<SegmentPlan> {
    debug_assert_eq!(param_offset % 4, 0);
    let mut out = Vec::new();
    let mut done = 0u64;
    let step = lim.align / 4;
    while done < n {
        let p = param_offset + done * 2;
        let bind = p / lim.align * lim.align;
        let shift = (p - bind) / 2;
        let fits = ((lim.max_binding / 2 - shift).min(lim.max_binding / 4) / step) * step;
        let count = (n - done).min(fits);
        out.push(SegmentPlan {
            kind,
            param_offset: bind,
            param_size: ((shift + count) * 2).next_multiple_of(4),
            shadow_offset: shadow_offset + done * 4,
            count,
        });
        done += count;
    }
    out
}

/// Where part of a tensor's shadow lives: `len` elements from byte `offset` of shadow buffer
/// `buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub buffer: usize,
    pub offset: u64,
    pub len: u64,
}

/// Each region's (buffer, byte offset), and each buffer's size.
pub(crate) type Packing = (Vec<(usize, u64)>, Vec<u64>);

/// Packs regions of `sizes` bytes into buffers of at most `max_buffer` bytes, each region
/// starting at a multiple of `align`. Returns each region's (buffer, offset) and the buffers'
/// sizes, or the index of a region that fits in no buffer.
pub(crate) fn pack(sizes: &[u64], align: u64, max_buffer: u64) -> Result<Packing, usize> {
    let mut places = Vec::with_capacity(sizes.len());
    let mut buffers: Vec<u64> = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        if size > max_buffer {
            return Err(i);
        }
        let fits_last = buffers
            .last()
            .is_some_and(|&used| align_up(used, align) + size <= max_buffer);
        if !fits_last {
            buffers.push(0);
        }
        let b = buffers.len() - 1;
        let at = align_up(buffers[b], align);
        places.push((b, at));
        buffers[b] = at + size;
    }
    for b in &mut buffers {
        *b = align_up((*b).max(4), align);
    }
    Ok((places, buffers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAVAPIPE: PlanLimits = PlanLimits {
        align: 256,
        max_binding: 128 << 20,
        max_buffer: 2 << 30,
    };

    #[test]
    fn aligned_run_is_one_vec4_segment() {
        let s = plan_run(512, 0, 1024, true, &LAVAPIPE);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, Kind::Vec4);
        assert_eq!((s[0].param_offset, s[0].param_size), (512, 4096));
    }

    #[test]
    fn misaligned_run_is_scalar_with_shift() {
        // 4 bytes past an aligned offset: shift 1, scalar.
        let s = plan_run(260, 0, 10, true, &LAVAPIPE);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, Kind::Scalar);
        assert_eq!(s[0].param_offset, 256);
        assert_eq!(s[0].param_size, 44);
        // 16 bytes past: shift 4, vec4 allowed.
        let s = plan_run(272, 0, 8, true, &LAVAPIPE);
        assert_eq!(s[0].kind, Kind::Vec4);
        assert_eq!(s[0].param_size, 48);
    }

    #[test]
    fn large_run_splits_at_the_binding_limit() {
        let n = (128u64 << 20) / 4 + 1; // one element past 128 MiB
        let s = plan_run(0, 0, n + 3, true, &LAVAPIPE);
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|x| x.param_size <= LAVAPIPE.max_binding));
        assert_eq!(s[0].count + s[1].count, n + 3);
        assert_eq!(s[1].shadow_offset, s[0].count * 4);
        assert_eq!(s[1].shadow_offset % 256, 0);
        // With a shift, the first chunk leaves room for it.
        let s = plan_run(4, 0, n, false, &LAVAPIPE);
        assert!(s.iter().all(|x| x.param_size <= LAVAPIPE.max_binding));
        assert_eq!(s.iter().map(|x| x.count).sum::<u64>(), n);
        assert!(s.iter().all(|x| (x.param_size / 4 - x.count) == 1));
    }

    #[test]
    fn half_runs_have_even_shifts_and_whole_words() {
        let s = plan_run_half(260, 0, 7, Kind::BF16, &LAVAPIPE);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].param_offset, 256);
        // shift 2 halves + 7 halves = 9 halves -> 5 words.
        assert_eq!(s[0].param_size, 20);
        let big = plan_run_half(4, 0, (128u64 << 20) / 2, Kind::F16, &LAVAPIPE);
        assert!(big.len() >= 2);
        assert!(big
            .iter()
            .all(|x| x.param_size <= LAVAPIPE.max_binding && x.count * 4 <= LAVAPIPE.max_binding));
        assert!(big.iter().all(|x| x.shadow_offset % 256 == 0));
        assert_eq!(big.iter().map(|x| x.count).sum::<u64>(), (128u64 << 20) / 2);
    }

    #[test]
    fn groups_go_2d_past_65535() {
        let seg = SegmentPlan {
            kind: Kind::Scalar,
            param_offset: 0,
            param_size: 0,
            shadow_offset: 0,
            count: 65_535 * 256 + 1,
        };
        assert_eq!(seg.groups(), (65_535, 2));
        let one = SegmentPlan { count: 1, ..seg };
        assert_eq!(one.groups(), (1, 1));
    }

    #[test]
    fn packing_respects_alignment_and_buffer_size() {
        let (places, bufs) = pack(&[4, 1000, 300], 256, 1024).unwrap();
        assert_eq!(places, vec![(0, 0), (1, 0), (2, 0)]);
        assert_eq!(bufs, vec![256, 1024, 512]);
        let (places, _) = pack(&[4, 8, 12], 256, 1024).unwrap();
        assert_eq!(places, vec![(0, 0), (0, 256), (0, 512)]);
        assert_eq!(pack(&[2048], 256, 1024), Err(0));
    }
}
