//! Where every element lives: shadows in crate-owned buffers, parameters read through windows
//! of the caller's buffers, and the segments that pair the two.
//!
//! - **Shadows** ([`place_shadows`]): each tensor's shadow is one run of f32 (several *pieces*
//!   only past one storage binding), starting at a storage-aligned offset of a crate-owned
//!   buffer no larger than one binding, so a whole shadow buffer is always one binding.
//! - **Parameter windows** ([`window_of`]): a parameter buffer is bound whole when it fits
//!   one binding, else through windows of one binding every half binding, so any run of up to
//!   half a binding lies inside one window.
//! - **Segments** ([`plan_tensor`]): a run of one tensor's elements whose shadows lie in one
//!   shadow buffer and whose parameters lie in one window: one row of the chunk table.
//!
//! How segments become dispatches is the parent module's business.

use crate::tensors::ParamDtype;

/// Elements per item: one `vec4<f32>` of shadows, the unit of the shader's work.
pub(crate) const ITEM: u64 = 4;

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
    /// The limits from a device's storage offset alignment, largest storage binding and
    /// largest buffer (all in bytes).
    pub fn new(offset_alignment: u64, max_storage_binding: u64, max_buffer_size: u64) -> Self {
        let align = offset_alignment.max(16);
        let max_binding = max_storage_binding
            .min(max_buffer_size)
            // Element offsets travel as u32 in the chunk table.
            .min(1 << 32);
        Self {
            align,
            max_binding: max_binding / align * align,
            max_buffer: max_buffer_size / align * align,
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
    /// The tensor's shadows follow its parameters (set by the plan from its binding).
    pub follow: bool,
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
                follow: false,
            });
            inside += count;
        }
        done += piece.len;
    }
    out
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
    fn a_shadow_of_exactly_one_binding_stays_whole() {
        // After a small tensor, one of exactly one binding goes whole into a buffer of its
        // own (one piece, one binding a user's shader can bind), not split into the room left.
        let lim = PlanLimits::new(256, 4096, 1 << 30);
        let (pieces, buffers) = place_shadows(&[3, 1024], &lim).unwrap();
        assert_eq!(
            pieces[1],
            vec![Piece {
                buffer: 1,
                offset: 0,
                len: 1024
            }]
        );
        assert_eq!(buffers, vec![256, 4096]);
        // One element more is split: it starts in the first buffer's room.
        let (pieces, _) = place_shadows(&[3, 1025], &lim).unwrap();
        assert_eq!(pieces[1].len(), 2);
        assert_eq!(pieces[1][0].buffer, 0);
    }

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
}
