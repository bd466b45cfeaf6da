//! Zero-debiasing, as TensorFlow does it, for averages that start from zero.
//!
//! TensorFlow applies `zero_debias` only to averages of tensors that are not variables
//! (their average starts at zero, so early values are biased towards zero); for variables
//! the shadow starts at the value and `zero_debias` changes nothing. TensorFlow keeps the
//! biased average `b` and a step count `t`, updates `b -= (b - x) * alpha`, `t += 1`, and
//! reads `b / (1 - (1 - alpha)^t)` **with the current alpha**. With a decay that varies
//! (TensorFlow's `num_updates` rule, a warm-up) `(1 - alpha)^t` is not the product of the
//! decays actually applied, so the TensorFlow correction is not exact:
//! [`DebiasMode::ExactProduct`] divides by `1 - prod(decay_i)` instead, which is exactly
//! what makes the weights of the average sum to one.
//!
//! Use it beside an EMA whose shadows start at zero: after building, zero the shadows
//! ([`GpuEma::write_shadow`](crate::GpuEma::write_shadow)), call [`ZeroDebias::step`] with
//! each update's `n`, and multiply what you read back by [`ZeroDebias::factor`].
//!
//! ```
//! use wgpu_ema::debias::{DebiasMode, ZeroDebias};
//! use wgpu_ema::{Numerics, Schedule};
//! let s = Schedule::constant(0.9);
//! let mut d = ZeroDebias::new(DebiasMode::TensorFlow);
//! d.step(&s, 1, Numerics::Exact).unwrap();
//! // After one update from zero the biased average is 0.1 * x; the factor makes it x.
//! assert!((d.factor() * 0.1 - 1.0).abs() < 1e-6);
//! ```

use crate::error::Result;
use crate::schedule::{Numerics, Schedule};

/// How the bias of a zero-started average is corrected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DebiasMode {
    /// TensorFlow's: divide by `1 - (1 - alpha)^t` with the current alpha.
    #[default]
    TensorFlow,
    /// Divide by `1 - prod(decay_i)` over the updates applied: exact for any schedule.
    ExactProduct,
}

/// The state of the correction: the step count and the product of the decays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZeroDebias {
    mode: DebiasMode,
    t: u64,
    alpha: f64,
    product: f64,
}

impl ZeroDebias {
    /// No update applied yet.
    pub fn new(mode: DebiasMode) -> Self {
        Self {
            mode,
            t: 0,
            alpha: 0.0,
            product: 1.0,
        }
    }

    /// Records one update with `alpha` (the f32 value the shaders receive).
    pub fn record(&mut self, alpha: f32) {
        let a = alpha as f64;
        self.t += 1;
        self.alpha = a;
        self.product *= 1.0 - a;
    }

    /// Records update `n` of `schedule`.
    pub fn step(&mut self, schedule: &Schedule, n: u64, numerics: Numerics) -> Result<()> {
        self.record(schedule.alpha(n, numerics)?);
        Ok(())
    }

    /// Updates recorded.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// What to multiply the biased average by. It is 1 before any update, and also while
    /// every alpha so far was 0 (the average is then still all zero).
    pub fn factor(&self) -> f64 {
        let remaining = match self.mode {
            DebiasMode::TensorFlow => (1.0 - self.alpha).powf(self.t as f64),
            DebiasMode::ExactProduct => self.product,
        };
        let weight = 1.0 - remaining;
        if self.t == 0 || weight <= 0.0 {
            1.0
        } else {
            1.0 / weight
        }
    }

    /// The debiased values of a biased average.
    pub fn debias(&self, biased: &[f32]) -> Vec<f32> {
        let f = self.factor();
        biased.iter().map(|&b| (b as f64 * f) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_decay_modes_agree_and_are_exact() {
        // Constant x from zero: biased = x (1 - d^t); both corrections give back x.
        let s = Schedule::constant(0.9);
        for mode in [DebiasMode::TensorFlow, DebiasMode::ExactProduct] {
            let mut d = ZeroDebias::new(mode);
            let mut biased = 0.0f64;
            for n in 1..=5 {
                let a = s.alpha(n, Numerics::Exact).unwrap() as f64;
                biased += a * (2.5 - biased);
                d.step(&s, n, Numerics::Exact).unwrap();
            }
            assert!((biased * d.factor() - 2.5).abs() < 1e-12, "{mode:?}");
        }
    }

    #[test]
    fn varying_decay_tensorflow_differs_exact_product_is_exact() {
        // TF's num_updates rule: decays 2/11, 3/12 then 0.9-capped... with constant input
        // the exact product recovers it, TF's (1 - alpha_t)^t does not.
        let s = Schedule::tf(0.9);
        let mut tf = ZeroDebias::new(DebiasMode::TensorFlow);
        let mut exact = ZeroDebias::new(DebiasMode::ExactProduct);
        let mut biased = 0.0f64;
        for n in 1..=3 {
            let a = s.alpha(n, Numerics::Exact).unwrap() as f64;
            biased += a * (1.0 - biased);
            tf.step(&s, n, Numerics::Exact).unwrap();
            exact.step(&s, n, Numerics::Exact).unwrap();
        }
        // By hand: decays 2/11, 3/12, 4/13; product = 24/1716.
        let product = (2.0 / 11.0) * (3.0 / 12.0) * (4.0 / 13.0);
        assert!((exact.factor() - 1.0 / (1.0 - product)).abs() < 1e-6);
        assert!((biased * exact.factor() - 1.0).abs() < 1e-6);
        let alpha3 = 1.0 - 4.0 / 13.0;
        let tf_factor = 1.0 / (1.0 - (1.0f64 - alpha3).powi(3));
        assert!((tf.factor() - tf_factor).abs() < 1e-6);
        assert!(
            (biased * tf.factor() - 1.0).abs() > 1e-3,
            "TF's correction is not exact here"
        );
    }

    #[test]
    fn no_update_is_factor_one() {
        assert_eq!(ZeroDebias::new(DebiasMode::TensorFlow).factor(), 1.0);
        let mut d = ZeroDebias::new(DebiasMode::ExactProduct);
        d.record(0.0);
        assert_eq!(d.factor(), 1.0);
    }
}
