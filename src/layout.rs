//! Where every element lives, and how a step's work is cut into dispatches.
//!
//! Pure arithmetic, no GPU. The pieces fit together like this:
//! - **Shadows** ([`place_shadows`]): each tensor's shadow is one run of f32 (several *pieces*
//!   only past one storage binding), starting at a storage-aligned offset of a crate-owned
//!   buffer no larger than one binding, so a whole shadow buffer is always one binding.
//! - **Parameter windows** ([`window_of`]): a parameter buffer is bound whole when it fits
//!   one binding, else through windows of one binding every half binding, so any run of up to
//!   half a binding lies inside one window.
//! - **Segments** ([`plan_tensor`]): a run of one tensor's elements whose shadows lie in one
//!   shadow buffer and whose parameters lie in one window: one row of the chunk table.
//! - **Dispatches** ([`group_segments`]): segments sharing a shadow buffer and at most `slots`
//!   distinct windows run in one dispatch, the shader choosing the window by slot number.
//!   Its work is a list of *items* (4 consecutive elements of one segment), numbered across
//!   the segments; each invocation takes [`ITEMS_PER_THREAD`] items, so small tensors share
//!   workgroups instead of leaving lanes idle.

use crate::tensors::ParamDtype;

/// Invocations per workgroup (`@workgroup_size` in `shaders/ema.wgsl`).
pub(crate) const WORKGROUP: u64 = 256;
/// Items per invocation (`PER_THREAD` in the shader).
pub(crate) const ITEMS_PER_THREAD: u64 = 4;
/// Elements per item: one `vec4<f32>` of shadows.
pub(crate) const ITEM: u64 = 4;
/// The most workgroups in one dimension of a dispatch (WebGPU's default limit).
pub(crate) const MAX_GROUPS_PER_DIM: u64 = 65_535;
/// Bytes of one chunk-table row (`struct Seg` in the shader).
pub(crate) const ROW_BYTES: u64 = 32;

/// The device limits the planner needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlanLimits {
    /// Granularity of offsets that may start a binding: the storage offset alignment, and at
    /// least 16 bytes so that shadow items (vec4) stay whole.
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
            .min(limits.max_buffer_size)
            // Element offsets travel as u32 in the chunk table.
            .min(1 << 32);
        Self {
            align,
            max_binding: max_binding / align * align,
            max_buffer: limits.max_buffer_size / align * align,
        }
    }
}

/// Rounds `x` up to a multiple of `a` (any positive number).
pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Where part of a tensor's shadow lives: `len` elements from byte `offset` of shadow buffer
/// `buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub buffer: usize,
    pub offset: u64,
    pub len: u64,
}

/// Each tensor's shadow pieces, and each shadow buffer's size in bytes.
pub(crate) type Placement = (Vec<Vec<Piece>>, Vec<u64>);

/// Places the shadows of tensors of `numels` elements, in order, into buffers of at most one
/// binding, each piece starting at a multiple of `align`: a shadow that fits one binding is one
/// piece; a larger one is cut into pieces on `align` boundaries (so that every piece but the
/// last holds whole items), the first filling what the last buffer has left.
/// Returns `None` when a size overflows.
pub(crate) fn place_shadows(numels: &[u64], lim: &PlanLimits) -> Option<Placement> {
    let mut pieces = Vec::with_capacity(numels.len());
    let mut buffers: Vec<u64> = Vec::new();
    for &n in numels {
        let mut mine = Vec::new();
        let mut done = 0u64;
        // A shadow larger than one binding is split anyway: it starts in the room the last
        // buffer has left (whole alignment units), so it costs no more buffers than it must.
        let split = n.checked_mul(4)? > lim.max_binding;
        while done < n {
            let used = buffers.last().map(|&u| align_up(u, lim.align));
            let room = used.map_or(0, |u| lim.max_binding.saturating_sub(u));
            let left = (n - done).checked_mul(4)?;
            let bytes = if left <= room {
                left
            } else if split && room >= lim.align {
                room / lim.align * lim.align
            } else {
                buffers.push(0);
                left.min(lim.max_binding)
            };
            let b = buffers.len() - 1;
            let at = align_up(buffers[b], lim.align);
            mine.push(Piece {
                buffer: b,
                offset: at,
                len: bytes / 4,
            });
            buffers[b] = at + bytes;
            done += bytes / 4;
        }
        pieces.push(mine);
    }
    for b in &mut buffers {
        *b = align_up((*b).max(4), lim.align);
    }
    Some((pieces, buffers))
}

/// A binding of part of a parameter buffer: `size` bytes from byte `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Window {
    pub offset: u64,
    pub size: u64,
}

impl Window {
    /// True when the two byte ranges share a byte.
    pub fn overlaps(&self, other: &Window) -> bool {
        self.offset < other.offset + other.size && other.offset < self.offset + self.size
    }
}

/// The window that byte `byte` of a parameter buffer of `buffer_size` bytes is read through.
pub(crate) fn window_of(byte: u64, buffer_size: u64, lim: &PlanLimits) -> Window {
    if buffer_size <= lim.max_binding {
        return Window {
            offset: 0,
            size: buffer_size / 4 * 4,
        };
    }
    let stride = (lim.max_binding / 2 / lim.align * lim.align).max(lim.align);
    let offset = byte / stride * stride;
    Window {
        offset,
        size: (lim.max_binding.min(buffer_size - offset)) / 4 * 4,
    }
}

/// One row of the chunk table: `count` elements of one tensor, parameters from element
/// `param` of `window` (in units of the dtype), shadows from element `shadow` of shadow
/// buffer `shadow_buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegPlan {
    pub window: Window,
    pub param: u64,
    pub shadow_buffer: usize,
    pub shadow: u64,
    pub count: u64,
    pub dtype: ParamDtype,
}

impl SegPlan {
    /// Items (4 elements, the last one padded) this segment takes.
    pub fn items(&self) -> u64 {
        self.count.div_ceil(ITEM)
    }
}

/// Cuts a tensor whose shadow is `pieces` and whose parameters start at byte `param_offset`
/// (a multiple of 4) of a buffer of `buffer_size` bytes into segments.
pub(crate) fn plan_tensor(
    pieces: &[Piece],
    param_offset: u64,
    dtype: ParamDtype,
    buffer_size: u64,
    lim: &PlanLimits,
) -> Vec<SegPlan> {
    let size = dtype.size();
    let mut out = Vec::new();
    let mut done = 0u64;
    for piece in pieces {
        let mut inside = 0u64;
        while inside < piece.len {
            let p = param_offset + (done + inside) * size;
            let window = window_of(p, buffer_size, lim);
            let room = (window.offset + window.size).saturating_sub(p) / size;
            let left = piece.len - inside;
            // A segment that stops early ends on an item boundary, so that the next one's
            // shadows start a whole item and its 16-bit parameters a whole word.
            let count = if left <= room {
                left
            } else {
                room / ITEM * ITEM
            };
            if count == 0 {
                // Only past the end of a buffer, which validation rules out.
                break;
            }
            out.push(SegPlan {
                window,
                param: (p - window.offset) / size,
                shadow_buffer: piece.buffer,
                shadow: piece.offset / 4 + inside,
                count,
                dtype,
            });
            inside += count;
        }
        done += piece.len;
    }
    out
}

/// One dispatch: segments (indices into the planner's input) over one shadow buffer, reading
/// parameters through at most `slots` windows, each named by (parameter buffer id, window).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupPlan {
    pub shadow_buffer: usize,
    pub slots: Vec<(usize, Window)>,
    pub segments: Vec<usize>,
}

/// Groups segments, each given with the id of its parameter buffer, into dispatches: per
/// shadow buffer, its distinct windows in order of first use, `slots` per dispatch, and never
/// two overlapping windows of one buffer in one dispatch.
pub(crate) fn group_segments(segs: &[(usize, SegPlan)], slots: usize) -> Vec<GroupPlan> {
    let slots = slots.max(1);
    let mut by_shadow: Vec<usize> = segs.iter().map(|(_, s)| s.shadow_buffer).collect();
    by_shadow.sort_unstable();
    by_shadow.dedup();
    let mut out = Vec::new();
    for sb in by_shadow {
        let first = out.len();
        for (i, (buf, s)) in segs.iter().enumerate() {
            if s.shadow_buffer != sb {
                continue;
            }
            let key = (*buf, s.window);
            let found = out[first..]
                .iter()
                .position(|g: &GroupPlan| g.slots.contains(&key));
            let g = match found {
                Some(g) => first + g,
                None => {
                    // The first dispatch with room that binds no window of the same buffer
                    // overlapping this one (the swap and copy passes write the parameters, and
                    // WebGPU refuses overlapping writable bindings), else a new one.
                    let fits = |g: &GroupPlan| {
                        g.slots.len() < slots
                            && !g
                                .slots
                                .iter()
                                .any(|(b, w)| *b == key.0 && w.overlaps(&key.1))
                    };
                    let g = match out[first..].iter().position(fits) {
                        Some(g) => first + g,
                        None => {
                            out.push(GroupPlan {
                                shadow_buffer: sb,
                                slots: Vec::new(),
                                segments: Vec::new(),
                            });
                            out.len() - 1
                        }
                    };
                    out[g].slots.push(key);
                    g
                }
            };
            out[g].segments.push(i);
        }
    }
    out
}

/// A chunk-table row as the shader reads it (`struct Seg`): first item, element count,
/// parameter element, shadow element, slot, dtype code, padding.
pub(crate) fn row(vstart: u64, seg: &SegPlan, slot: usize) -> [u32; 8] {
    let dtype = match seg.dtype {
        ParamDtype::F32 => 0,
        ParamDtype::F16 => 1,
        ParamDtype::BF16 => 2,
    };
    // Every value fits: offsets are below one binding (at most 4 GiB) in elements.
    [
        vstart as u32,
        seg.count as u32,
        seg.param as u32,
        seg.shadow as u32,
        slot as u32,
        dtype,
        0,
        0,
    ]
}

/// Workgroups as (x, y) for `items` items: 2-D once one dimension's 65,535 is not enough.
pub(crate) fn workgroups(items: u64) -> (u32, u32) {
    let groups = items.div_ceil(WORKGROUP * ITEMS_PER_THREAD).max(1);
    let x = groups.min(MAX_GROUPS_PER_DIM);
    let y = groups.div_ceil(x);
    // A dispatch covers one shadow buffer (at most 4 GiB): y stays far below 65,535.
    (x as u32, y as u32)
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
    fn shadows_start_aligned_and_split_past_one_binding() {
        let big = (128u64 << 20) / 4 + 5;
        let (pieces, bufs) = place_shadows(&[3, 10, big, 0], &LAVAPIPE).unwrap();
        // The big one starts in the first buffer's room and ends in a second.
        assert_eq!(
            pieces[0],
            vec![Piece {
                buffer: 0,
                offset: 0,
                len: 3
            }]
        );
        assert_eq!(
            pieces[1],
            vec![Piece {
                buffer: 0,
                offset: 256,
                len: 10
            }]
        );
        assert_eq!(pieces[2].len(), 2);
        assert_eq!(pieces[2][0].len + pieces[2][1].len, big);
        assert!(pieces[3].is_empty());
        assert!(bufs
            .iter()
            .all(|&b| b <= LAVAPIPE.max_binding && b % 256 == 0));
        for p in pieces.iter().flatten() {
            assert!(p.offset.is_multiple_of(256) && p.offset + p.len * 4 <= bufs[p.buffer]);
        }
    }

    #[test]
    fn small_buffers_are_one_window_large_ones_overlap() {
        let w = window_of(12, 1000, &LAVAPIPE);
        assert_eq!(
            w,
            Window {
                offset: 0,
                size: 1000
            }
        );
        let size = 300u64 << 20;
        let w = window_of(100 << 20, size, &LAVAPIPE);
        assert_eq!(
            w,
            Window {
                offset: 64 << 20,
                size: 128 << 20
            }
        );
        let w = window_of(size - 4, size, &LAVAPIPE);
        assert_eq!(w.offset + w.size, size);
    }

    #[test]
    fn segments_follow_pieces_and_windows() {
        let pieces = [Piece {
            buffer: 2,
            offset: 512,
            len: 7,
        }];
        let s = plan_tensor(&pieces, 260, ParamDtype::F32, 4096, &LAVAPIPE);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].param, s[0].shadow, s[0].count, s[0].items()),
            (65, 128, 7, 2)
        );
        // A tensor crossing a window boundary of a large buffer splits on an item boundary.
        let size = 300u64 << 20;
        let n = 40u64 << 20;
        let pieces = [Piece {
            buffer: 0,
            offset: 0,
            len: n,
        }];
        let s = plan_tensor(&pieces, (120 << 20) + 4, ParamDtype::F32, size, &LAVAPIPE);
        assert_eq!(s.iter().map(|x| x.count).sum::<u64>(), n);
        assert!(s.len() >= 2 && s[0].count.is_multiple_of(4));
        for x in &s {
            assert!(x.param * 4 + x.count * 4 <= x.window.size);
        }
        assert_eq!(s[1].shadow, s[0].count);
    }

    #[test]
    fn half_segments_count_in_halves() {
        let pieces = [Piece {
            buffer: 0,
            offset: 0,
            len: 9,
        }];
        let s = plan_tensor(&pieces, 8, ParamDtype::BF16, 64, &LAVAPIPE);
        assert_eq!((s[0].param, s[0].count), (4, 9));
    }

    #[test]
    fn groups_hold_at_most_slots_windows_per_shadow_buffer() {
        let seg = |buf: usize, sb: usize| {
            (
                buf,
                SegPlan {
                    window: Window {
                        offset: 0,
                        size: 64,
                    },
                    param: 0,
                    shadow_buffer: sb,
                    shadow: 0,
                    count: 4,
                    dtype: ParamDtype::F32,
                },
            )
        };
        let segs = [
            seg(0, 0),
            seg(1, 0),
            seg(0, 0),
            seg(2, 0),
            seg(3, 1),
            seg(1, 0),
        ];
        let g = group_segments(&segs, 2);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].slots.len(), 2);
        assert_eq!(g[0].segments, vec![0, 1, 2, 5]);
        assert_eq!(g[1].segments, vec![3]);
        assert_eq!((g[2].shadow_buffer, g[2].segments.clone()), (1, vec![4]));
    }

    #[test]
    fn overlapping_windows_of_one_buffer_never_share_a_dispatch() {
        let w = |offset| Window { offset, size: 100 };
        let seg = |window| {
            (
                7,
                SegPlan {
                    window,
                    param: 0,
                    shadow_buffer: 0,
                    shadow: 0,
                    count: 4,
                    dtype: ParamDtype::F32,
                },
            )
        };
        // Windows every half binding: 0 and 50 overlap, 0 and 100 do not.
        let g = group_segments(&[seg(w(0)), seg(w(50)), seg(w(100)), seg(w(0))], 8);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].slots, vec![(7, w(0)), (7, w(100))]);
        assert_eq!(g[0].segments, vec![0, 2, 3]);
        assert_eq!(g[1].slots, vec![(7, w(50))]);
        // Windows of different buffers may overlap in byte offsets: they share.
        let mut other = seg(w(50));
        other.0 = 8;
        assert_eq!(group_segments(&[seg(w(0)), other], 8).len(), 1);
    }

    #[test]
    fn workgroups_go_2d_past_65535() {
        assert_eq!(workgroups(1), (1, 1));
        assert_eq!(workgroups(65_535 * 1024 + 1), (65_535, 2));
    }
}
