//! The per-slice update kernels: f32 (all cores for large slices), TensorFlow's f32
//! arithmetic, Kahan-compensated f32, and the f64 reference.

use crate::error::{Error, Result};

/// Below this many elements a tensor is updated on the calling thread: spawning threads costs
/// more than the update.
pub(super) const PARALLEL_MIN: usize = 1 << 19;

/// Cores to use. Note: `available_parallelism` reads cgroup files on Linux (tens of
/// microseconds), so it is asked once.
#[cfg(not(target_arch = "wasm32"))]
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// On the web (wasm32 without threads) everything runs on the calling thread.
#[cfg(target_arch = "wasm32")]
fn threads() -> usize {
    1
}

/// Runs `f` over matching chunks of `a` and `b`, on all cores when the slices are large.
fn par_zip<A: Send, B: Sync>(a: &mut [A], b: &[B], f: impl Fn(&mut [A], &[B]) + Sync) {
    if a.len() < PARALLEL_MIN || threads() < 2 {
        f(a, b);
        return;
    }
    let t = threads();
    // Chunks a multiple of 1024 elements, so every thread's slice starts cache-line aligned
    // relative to the others.
    let chunk = a.len().div_ceil(t).next_multiple_of(1024);
    std::thread::scope(|scope| {
        let f = &f;
        let mut pairs = a.chunks_mut(chunk).zip(b.chunks(chunk));
        let first = pairs.next();
        for (sa, sb) in pairs {
            scope.spawn(move || f(sa, sb));
        }
        if let Some((sa, sb)) = first {
            f(sa, sb);
        }
    });
}

pub(super) fn check_len(name: &str, shadow: usize, param: usize) -> Result<()> {
    if shadow == param {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            name: name.to_string(),
            expected: shadow as u64,
            got: param as u64,
        })
    }
}

/// One EMA step in f32, in place: `shadow[i] += alpha * (param[i] - shadow[i])`.
///
/// Uses all cores for large slices. Bitwise equal to [`ema_step_tf`] (no fused multiply-add).
///
/// ```
/// let mut s = vec![1.0f32, 2.0];
/// wgpu_ema::cpu::ema_step(&mut s, &[3.0, 2.0], 0.5).unwrap();
/// assert_eq!(s, [2.0, 2.0]);
/// ```
pub fn ema_step(shadow: &mut [f32], param: &[f32], alpha: f32) -> Result<()> {
    check_len("<slice>", shadow.len(), param.len())?;
    par_zip(shadow, param, |s, p| {
        for (s, &p) in s.iter_mut().zip(p) {
            *s += alpha * (p - *s);
        }
    });
    Ok(())
}

/// One EMA step written as TensorFlow writes it: `shadow[i] -= (shadow[i] - param[i]) * alpha`.
pub fn ema_step_tf(shadow: &mut [f32], param: &[f32], alpha: f32) -> Result<()> {
    check_len("<slice>", shadow.len(), param.len())?;
    par_zip(shadow, param, |s, p| {
        for (s, &p) in s.iter_mut().zip(p) {
            *s -= (*s - p) * alpha;
        }
    });
    Ok(())
}

/// `a + b` as `(s, e)` with `s + e == a + b` exactly (Knuth's two-sum).
#[inline]
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// `x` as `hi + lo` exactly, each of 12 significant bits (Veltkamp's split).
#[inline]
fn split(x: f32) -> (f32, f32) {
    let c = 4097.0 * x;
    let hi = c - (c - x);
    (hi, x - hi)
}

/// `a * b` as `(p, e)` with `p + e == a * b` exactly (Dekker's two-product, no FMA needed).
#[inline]
fn two_product(a: f32, b: f32) -> (f32, f32) {
    let p = a * b;
    let ((ah, al), (bh, bl)) = (split(a), split(b));
    (p, ((ah * bh - p) + ah * bl + al * bh) + al * bl)
}

/// One compensated step: `shadow[i] += alpha * (param[i] - shadow[i])` kept as the pair
/// `shadow - comp` (`comp` holds what the shadow's last rounding dropped, negated, as in
/// Kahan's summation), with `alpha` given as `alpha_hi + alpha_lo` (see
/// [`Schedule::alpha_split`](crate::Schedule::alpha_split)) and the increment computed without
/// rounding: two-sum for `param - shadow`, Dekker's two-product for the multiplication,
/// two-sum for the addition to the shadow; only sums of terms an ulp of the shadow small are
/// rounded. After 10^5 steps at decay 0.99999 the shadows lie within 1 ulp of the f64 EMA of
/// the decay as written (plain f32: thousands). `shaders/ema.wgsl` computes the same.
pub fn ema_step_kahan(
    shadow: &mut [f32],
    comp: &mut [f32],
    param: &[f32],
    alpha_hi: f32,
    alpha_lo: f32,
) -> Result<()> {
    check_len("<slice>", shadow.len(), param.len())?;
    check_len("<compensation>", shadow.len(), comp.len())?;
    let kernel = |s: &mut [f32], c: &mut [f32], p: &[f32]| {
        for ((s, c), &p) in s.iter_mut().zip(c.iter_mut()).zip(p) {
            let (d, dl) = two_sum(p, -*s);
            let (ph, pl) = two_product(alpha_hi, d);
            let (t, e) = two_sum(*s, ph);
            let small = ((pl + alpha_hi * dl + alpha_lo * d) - *c) + e;
            let next = t + small;
            *c = (next - t) - small;
            *s = next;
        }
    };
    if shadow.len() < PARALLEL_MIN || threads() < 2 {
        kernel(shadow, comp, param);
        return Ok(());
    }
    let chunk = shadow.len().div_ceil(threads()).next_multiple_of(1024);
    std::thread::scope(|scope| {
        let kernel = &kernel;
        for ((s, c), p) in shadow
            .chunks_mut(chunk)
            .zip(comp.chunks_mut(chunk))
            .zip(param.chunks(chunk))
        {
            scope.spawn(move || kernel(s, c, p));
        }
    });
    Ok(())
}

/// The f64 reference: `shadow[i] += alpha * (param[i] - shadow[i])` with f64 shadows.
pub fn ema_step_f64(shadow: &mut [f64], param: &[f32], alpha: f64) -> Result<()> {
    check_len("<slice>", shadow.len(), param.len())?;
    for (s, &p) in shadow.iter_mut().zip(param) {
        *s += alpha * (p as f64 - *s);
    }
    Ok(())
}
