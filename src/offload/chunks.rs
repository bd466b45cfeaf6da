//! Cutting the tracked tensors into chunks that each fit one staging slot, and what a chunk's
//! next sample does: pure, no device.
//!
//! The tensors, in tracking order, are laid end to end and cut greedily: a chunk is a list of
//! pieces (a tensor's element range), each copied to its own 4-byte-aligned place in the slot.
//! Copies move whole 4-byte words (wgpu's `COPY_BUFFER_ALIGNMENT`), so a piece of 16-bit
//! parameters starts on an even element; only a tensor's last piece may have an odd length,
//! and then it carries the other half of its last word along (the builder already requires
//! the buffer to hold that word).

use crate::schedule::Action;
use crate::shader::MAX_EMAS;

/// A tensor's element range, and where it sits in a staging slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// The tensor, in tracking order.
    pub tensor: usize,
    /// The first element.
    pub start: u64,
    /// Elements.
    pub len: u64,
    /// Byte offset in the slot (a multiple of 4).
    pub stage: u64,
    /// Bytes copied (`len` elements rounded up to whole 4-byte words).
    pub bytes: u64,
}

impl Piece {
    /// The same piece staged alone, at the start of a slot (a parameter read, native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn at_start(&self) -> Self {
        Self { stage: 0, ..*self }
    }
}

/// Pieces copied together into one staging slot, updated together on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub pieces: Vec<Piece>,
    /// Bytes of the slot it fills (a multiple of 4).
    pub bytes: u64,
}

/// Cuts tensors of `(elements, bytes per element)` into chunks of at most `slot_bytes` each
/// (rounded down to whole words). `None` when a slot cannot hold one word, the granularity of
/// every copy. Tensors without elements have no pieces.
pub(crate) fn cut(tensors: &[(u64, u64)], slot_bytes: u64) -> Option<Vec<Chunk>> {
    let cap = slot_bytes / 4 * 4;
    if cap == 0 {
        return None;
    }
    let mut chunks = Vec::new();
    let mut cur = Chunk::default();
    for (tensor, &(numel, elem)) in tensors.iter().enumerate() {
        let mut start = 0;
        while start < numel {
            // `room` is whole words, so for 16-bit elements `fits` is even: every piece but a
            // tensor's last starts and ends on a word.
            let room = cap - cur.bytes;
            let fits = room / elem;
            if fits == 0 {
                chunks.push(std::mem::take(&mut cur));
                continue;
            }
            let len = (numel - start).min(fits);
            let bytes = (len * elem).div_ceil(4) * 4;
            cur.pieces.push(Piece {
                tensor,
                start,
                len,
                stage: cur.bytes,
                bytes,
            });
            cur.bytes += bytes;
            start += len;
        }
    }
    if !cur.pieces.is_empty() {
        chunks.push(cur);
    }
    Some(chunks)
}

/// What a chunk's next sample does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Sample {
    /// Shadows := the sampled parameters, exactly.
    Copy,
    /// The EMA update of every EMA with these alphas; `lo` is what rounding EMA 0's alpha
    /// to f32 dropped (compensated shadows add it back).
    Update { alphas: [f32; MAX_EMAS], lo: f32 },
}

/// The calls since a chunk's last sample, folded into what its next sample does.
///
/// A sample stands for the parameters over its whole gap: the calls `(m, n]` since the last
/// sample `m` act on the value sampled at `n` as if the parameters had held it. A copy among
/// them makes the sample a copy (the updates after a copy of a constant leave it unchanged);
/// otherwise the updates compose into one, `decay = prod(1 - alpha_i)` per EMA (skipped calls
/// contribute 1), summed as logarithms so that tiny alphas keep their digits. One update alone
/// keeps its own f32 alphas, so a chunk sampled on every update follows the on-GPU EMA bit for
/// bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gap {
    copy: bool,
    updates: u64,
    /// Per EMA, `ln` of the product of the decays of the updates so far.
    log_decay: [f64; MAX_EMAS],
    /// The last update's own values.
    last: Sample,
}

impl Gap {
    /// Nothing since the last sample.
    pub fn empty() -> Self {
        Self {
            copy: false,
            updates: 0,
            log_decay: [0.0; MAX_EMAS],
            last: Sample::Copy,
        }
    }

    /// A gap whose next sample copies (a new EMA: shadows := parameters).
    pub fn copying() -> Self {
        Self {
            copy: true,
            ..Self::empty()
        }
    }

    /// True when the next sample would change nothing: no call but skipped ones since the last.
    pub fn is_empty(&self) -> bool {
        !self.copy && self.updates == 0
    }

    /// Adds one call: `action` of the step counter, `alphas` (EMA 0's in the action) with
    /// `exact` the f64 alphas they round (for the products) and `lo` EMA 0's low part.
    pub fn fold(
        &mut self,
        action: Action,
        alphas: [f32; MAX_EMAS],
        exact: [f64; MAX_EMAS],
        lo: f32,
    ) {
        match action {
            Action::Skip => {}
            Action::Copy => self.copy = true,
            Action::Update(_) if self.copy => {}
            Action::Update(_) => {
                self.updates += 1;
                for (d, a) in self.log_decay.iter_mut().zip(exact) {
                    *d += (-a).ln_1p();
                }
                self.last = Sample::Update { alphas, lo };
            }
        }
    }

    /// Puts back a sample that was taken but never applied (its encoder was dropped unsubmitted):
    /// it covered the calls before this gap's, so the two compose, a copy in either winning.
    pub fn restore(&mut self, lost: Sample) {
        match lost {
            Sample::Copy => self.copy = true,
            Sample::Update { .. } if self.copy => {}
            Sample::Update { alphas, lo } if self.updates == 0 => {
                self.updates = 1;
                for (k, (d, &a)) in self.log_decay.iter_mut().zip(&alphas).enumerate() {
                    let lo = if k == 0 { f64::from(lo) } else { 0.0 };
                    *d = (-(f64::from(a) + lo)).ln_1p();
                }
                self.last = lost;
            }
            Sample::Update { alphas, lo } => {
                // Two updates or more: composed, never taken as one update's own values.
                self.updates += 2;
                for (k, (d, &a)) in self.log_decay.iter_mut().zip(&alphas).enumerate() {
                    let lo = if k == 0 { f64::from(lo) } else { 0.0 };
                    *d += (-(f64::from(a) + lo)).ln_1p();
                }
            }
        }
    }

    /// What the next sample does, and the gap emptied; `None` (gap unchanged) when it is empty.
    pub fn take(&mut self) -> Option<Sample> {
        let sample = if self.copy {
            Sample::Copy
        } else {
            match self.updates {
                0 => return None,
                1 => self.last,
                _ => {
                    let mut alphas = [1.0f32; MAX_EMAS];
                    let mut lo = 0.0f32;
                    for (k, (a, d)) in alphas.iter_mut().zip(self.log_decay).enumerate() {
                        let exact = -d.exp_m1();
                        *a = exact as f32;
                        if k == 0 {
                            lo = (exact - f64::from(*a)) as f32;
                        }
                    }
                    Sample::Update { alphas, lo }
                }
            }
        };
        *self = Self::empty();
        Some(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of every tensor in exactly one piece, pieces within their slot, aligned,
    /// not overlapping, 16-bit pieces starting on a word.
    fn check(tensors: &[(u64, u64)], slot: u64) {
        let chunks = cut(tensors, slot).unwrap();
        let mut next = vec![0u64; tensors.len()];
        for c in &chunks {
            assert!(
                c.bytes <= slot / 4 * 4 && c.bytes > 0,
                "{c:?} in a slot of {slot}"
            );
            let mut at = 0;
            for p in &c.pieces {
                let (numel, elem) = tensors[p.tensor];
                assert_eq!(p.stage, at, "pieces packed in order");
                assert_eq!(p.stage % 4, 0);
                assert_eq!(p.start, next[p.tensor], "tensor {} in order", p.tensor);
                assert!(p.len > 0 && p.start + p.len <= numel);
                assert_eq!(p.bytes, (p.len * elem).div_ceil(4) * 4);
                assert_eq!((p.start * elem) % 4, 0, "copies start on a word");
                if p.start + p.len < numel {
                    assert_eq!(
                        (p.len * elem) % 4,
                        0,
                        "only a tensor's last piece ends mid-word"
                    );
                }
                next[p.tensor] += p.len;
                at += p.bytes;
            }
            assert_eq!(at, c.bytes);
        }
        for (t, &(numel, _)) in tensors.iter().enumerate() {
            assert_eq!(next[t], numel, "tensor {t} covered");
        }
    }

    #[test]
    fn cuts_cover_every_element_once_within_the_slot() {
        check(&[(10, 4), (3, 2), (0, 4), (1, 2), (7, 4)], 12);
        check(&[(10, 4), (3, 2), (0, 4), (1, 2), (7, 4)], 4);
        check(&[(1_000_003, 4)], 1 << 20);
        check(&[(5, 2), (5, 2), (9, 2)], 6);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let tensors: Vec<(u64, u64)> = (0..rng.usize(1..8))
                .map(|_| (rng.u64(0..200), if rng.bool() { 4 } else { 2 }))
                .collect();
            check(&tensors, rng.u64(4..300));
        }
        // A model that fits one slot is one chunk, its tensors whole.
        let one = cut(&[(3, 4), (5, 2)], 1 << 20).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].bytes, 12 + 12);
        assert!(cut(&[(3, 4)], 3).is_none());
    }

    #[test]
    fn emptiness_low_parts_and_a_piece_alone() {
        let mut g = Gap::empty();
        g.fold(Action::Skip, [1.0; MAX_EMAS], [1.0; MAX_EMAS], 0.0);
        assert!(g.is_empty());
        g.fold(Action::Copy, [1.0; MAX_EMAS], [1.0; MAX_EMAS], 0.0);
        assert!(!g.is_empty(), "a copy is due");
        let mut g = Gap::empty();
        g.fold(Action::Update(0.5), [0.5; MAX_EMAS], [0.5; MAX_EMAS], 0.0);
        assert!(!g.is_empty(), "an update is due");
        // Composed, EMA 0's low part is what its own f32 alpha dropped (not another EMA's).
        let (a0, a1) = (1e-4f64 + 1e-13, 0.3f64);
        let mut g = Gap::empty();
        for _ in 0..3 {
            let alphas = [a0 as f32, a1 as f32, 1.0, 1.0];
            g.fold(Action::Update(alphas[0]), alphas, [a0, a1, 1.0, 1.0], 0.0);
        }
        let Some(Sample::Update { alphas, lo }) = g.take() else {
            panic!("an update");
        };
        // 1 - (1 - a)^3 without the cancellation of computing it that way.
        let exact0 = 3.0 * a0 - 3.0 * a0 * a0 + a0 * a0 * a0;
        assert!((f64::from(alphas[0]) + f64::from(lo) - exact0).abs() < 1e-17);
        assert!((f64::from(alphas[1]) - (1.0 - (1.0 - a1).powi(3))).abs() < 1e-7);
        let p = Piece {
            tensor: 2,
            start: 6,
            len: 3,
            stage: 40,
            bytes: 12,
        };
        assert_eq!(p.at_start(), Piece { stage: 0, ..p });
    }

    #[test]
    fn a_lost_sample_is_put_back_in_front_of_the_gap() {
        let up = |a: f32| Sample::Update {
            alphas: [a, a, 1.0, 1.0],
            lo: 0.0,
        };
        // Into an empty gap: the lost sample itself.
        let mut g = Gap::empty();
        g.restore(up(0.25));
        assert_eq!(g.take(), Some(up(0.25)));
        // Into an empty gap, then one more update: both compose, EMA 0's low part included.
        let lost = Sample::Update {
            alphas: [0.25, 0.5, 1.0, 1.0],
            lo: 1e-9,
        };
        let mut g = Gap::empty();
        g.restore(lost);
        g.fold(Action::Update(0.5), [0.5; MAX_EMAS], [0.5; MAX_EMAS], 0.0);
        match g.take() {
            Some(Sample::Update { alphas, lo }) => {
                let want0 = 1.0 - (1.0 - (0.25 + 1e-9)) * 0.5;
                assert!((f64::from(alphas[0]) + f64::from(lo) - want0).abs() < 1e-15);
                assert_eq!(alphas[1], 0.75);
            }
            other => panic!("{other:?}"),
        }
        // Before one more update: 1 - (1 - 0.25)(1 - 0.5) = 0.625.
        let mut g = Gap::empty();
        g.fold(Action::Update(0.5), [0.5; MAX_EMAS], [0.5; MAX_EMAS], 0.0);
        g.restore(up(0.25));
        match g.take() {
            Some(Sample::Update { alphas, .. }) => assert_eq!(alphas[0], 0.625),
            other => panic!("{other:?}"),
        }
        // A lost copy makes the next sample a copy; a copy in the gap wins over a lost update.
        let mut g = Gap::empty();
        g.fold(Action::Update(0.5), [0.5; MAX_EMAS], [0.5; MAX_EMAS], 0.0);
        g.restore(Sample::Copy);
        assert_eq!(g.take(), Some(Sample::Copy));
        let mut g = Gap::empty();
        g.fold(Action::Copy, [1.0; MAX_EMAS], [1.0; MAX_EMAS], 0.0);
        g.restore(up(0.25));
        assert_eq!(g.take(), Some(Sample::Copy));
    }

    #[test]
    fn a_gap_composes_its_updates_and_a_copy_wins() {
        let up = |a: f32| {
            (
                Action::Update(a),
                [a, a / 2.0, 1.0, 1.0],
                [f64::from(a), f64::from(a / 2.0), 1.0, 1.0],
            )
        };
        let mut g = Gap::empty();
        assert!(g.is_empty() && g.clone().take().is_none());
        g.fold(Action::Skip, [1.0; MAX_EMAS], [1.0; MAX_EMAS], 0.0);
        assert!(g.take().is_none());
        // One update keeps its own values.
        let (a, al, ex) = up(0.25);
        g.fold(a, al, ex, 0.125);
        assert_eq!(
            g.take(),
            Some(Sample::Update {
                alphas: al,
                lo: 0.125
            })
        );
        assert!(g.is_empty());
        // Two: 1 - (1 - 0.25)(1 - 0.5) = 0.625; EMA 1: 1 - (1 - 0.125)(1 - 0.25) = 0.34375.
        let (a, al, ex) = up(0.25);
        g.fold(a, al, ex, 0.0);
        let (a, al, ex) = up(0.5);
        g.fold(a, al, ex, 0.0);
        match g.take() {
            Some(Sample::Update { alphas, lo }) => {
                assert_eq!(alphas[0], 0.625);
                assert_eq!(alphas[1], 0.34375);
                assert_eq!(lo, 0.0);
            }
            other => panic!("{other:?}"),
        }
        // A copy anywhere in the gap makes the sample a copy.
        g.fold(a, al, ex, 0.0);
        g.fold(Action::Copy, [1.0; MAX_EMAS], [1.0; MAX_EMAS], 0.0);
        g.fold(a, al, ex, 0.0);
        assert_eq!(g.take(), Some(Sample::Copy));
        assert_eq!(Gap::copying().take(), Some(Sample::Copy));
        // A long gap of tiny alphas keeps what f32 drops in `lo`.
        let mut g = Gap::empty();
        for _ in 0..3 {
            g.fold(
                Action::Update(1e-4),
                [1e-4; MAX_EMAS],
                [1e-4; MAX_EMAS],
                0.0,
            );
        }
        match g.take() {
            Some(Sample::Update { alphas, lo }) => {
                let exact = 1.0 - (1.0 - 1e-4f64).powi(3);
                assert!((f64::from(alphas[0]) + f64::from(lo) - exact).abs() < 1e-15);
            }
            other => panic!("{other:?}"),
        }
    }
}
