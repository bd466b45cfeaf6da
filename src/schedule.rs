//! The decay for update number `n`, computed on the host.
//!
//! The GPU never sees a decay: it receives `alpha = 1 - decay`, computed here, because
//! `1 - decay` in f32 loses most of the digits of a decay close to 1 (see [`Numerics`]).

use crate::error::{Error, Result};

/// How the decay of update `n` is chosen.
///
/// `n` is the number of the update: the caller's global step when they pass one
/// ([`GpuEma::record_update_at`](crate::GpuEma::record_update_at)), else the crate's own
/// counter, which the first update sees as 1 (as TensorFlow sees a global step that the
/// optimizer increments before the average is applied).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Schedule {
    /// The same decay at every update: `decay(n) = decay`.
    Constant {
        /// The decay, in `[0, 1]`.
        decay: f64,
    },
    /// TensorFlow's rule with `num_updates`: `decay(n) = min(decay, (1 + n) / (10 + n))`.
    ///
    /// Early updates average fast (decay 2/11 at `n = 1`, 0.5 at `n = 8`, 0.9 at `n = 80`),
    /// so the shadows leave their initial values quickly; later ones use `decay`.
    NumUpdates {
        /// The cap on the decay, in `[0, 1]`.
        decay: f64,
    },
}

/// The arithmetic used to turn a decay into `alpha = 1 - decay`, and to apply it.
///
/// At decay 0.9999, TensorFlow's f32 arithmetic (`1.0f32 - 0.9999f32`) gives an alpha
/// 0.017% larger than `1 - 0.9999`; at 0.99999 it is 0.136% larger. [`Numerics::Exact`]
/// computes the alpha that the decay means; [`Numerics::TensorFlow`] reproduces
/// TensorFlow 2's shadows bit for bit on the CPU path (and within 1 ulp per step on the GPU,
/// where a shader compiler may fuse the multiply and the add).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Numerics {
    /// Decay and `alpha = 1 - decay` in f64, alpha rounded to f32 once. The default.
    #[default]
    Exact,
    /// TensorFlow 2's arithmetic: the decay held in f32, `(1 + n) / (10 + n)` in f32 with `n`
    /// cast to f32, `alpha = 1.0f32 - decay` in f32, and the update `s - (s - p) * alpha`.
    TensorFlow,
}

impl Numerics {
    /// The name stored in checkpoints' metadata: `"exact"` or `"tensorflow"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Numerics::Exact => "exact",
            Numerics::TensorFlow => "tensorflow",
        }
    }

    /// Parses [`Numerics::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" => Some(Numerics::Exact),
            "tensorflow" => Some(Numerics::TensorFlow),
            _ => None,
        }
    }
}

fn check_unit(what: &'static str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidDecay { what, value })
    }
}

impl Schedule {
    /// A constant decay.
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// assert_eq!(Schedule::constant(0.99).decay(5).unwrap(), 0.99);
    /// ```
    pub fn constant(decay: f64) -> Self {
        Schedule::Constant { decay }
    }

    /// TensorFlow's `ExponentialMovingAverage(decay, num_updates=step)`.
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// let s = Schedule::tf(0.9999);
    /// assert_eq!(s.decay(8).unwrap(), 0.5); // (1 + 8) / (10 + 8)
    /// assert_eq!(s.decay(1_000_000).unwrap(), 0.9999);
    /// ```
    pub fn tf(decay: f64) -> Self {
        Schedule::NumUpdates { decay }
    }

    /// Checks every parameter: decays in `[0, 1]` and not NaN.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Schedule::Constant { decay } | Schedule::NumUpdates { decay } => {
                check_unit("decay", decay)
            }
        }
    }

    /// The decay of update `n`, in f64.
    pub fn decay(&self, n: u64) -> Result<f64> {
        self.validate()?;
        Ok(match *self {
            Schedule::Constant { decay } => decay,
            Schedule::NumUpdates { decay } => {
                let n = n as f64;
                decay.min((1.0 + n) / (10.0 + n))
            }
        })
    }

    /// The decay of update `n` as TensorFlow 2 computes it: in f32.
    pub fn decay_f32_tf(&self, n: u64) -> Result<f32> {
        self.validate()?;
        Ok(match *self {
            Schedule::Constant { decay } => decay as f32,
            Schedule::NumUpdates { decay } => {
                let n = n as f32;
                (decay as f32).min((1.0f32 + n) / (10.0f32 + n))
            }
        })
    }

    /// `alpha = 1 - decay(n)`, the value handed to the update, with the given arithmetic.
    ///
    /// ```
    /// use wgpu_ema::{Numerics, Schedule};
    /// let s = Schedule::constant(0.9999);
    /// let exact = s.alpha(0, Numerics::Exact).unwrap();
    /// let tf = s.alpha(0, Numerics::TensorFlow).unwrap();
    /// assert_eq!(exact, 1e-4_f32);
    /// assert!(((tf / exact) as f64 - 1.00017).abs() < 1e-5); // TF's alpha is 0.017% larger
    /// ```
    pub fn alpha(&self, n: u64, numerics: Numerics) -> Result<f32> {
        match numerics {
            Numerics::Exact => Ok((1.0 - self.decay(n)?) as f32),
            Numerics::TensorFlow => Ok(1.0f32 - self.decay_f32_tf(n)?),
        }
    }

    /// A short text naming the schedule and its parameters, as stored in checkpoints.
    pub fn describe(&self) -> String {
        match *self {
            Schedule::Constant { decay } => format!("constant(decay={decay})"),
            Schedule::NumUpdates { decay } => format!("num_updates(decay={decay})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_rule_by_hand() {
        let s = Schedule::tf(0.9999);
        assert_eq!(s.decay(0).unwrap(), 0.1);
        assert_eq!(s.decay(1).unwrap(), 2.0 / 11.0);
        assert_eq!(s.decay(90).unwrap(), 0.91);
        assert_eq!(s.decay(99_990).unwrap(), 0.9999); // (1+n)/(10+n) = 0.99991 > cap
        let c = Schedule::tf(0.5);
        assert_eq!(c.decay(100).unwrap(), 0.5);
    }

    #[test]
    fn tf_f32_arithmetic_by_hand() {
        let s = Schedule::tf(0.9999);
        // n = 3: (1 + 3) / (10 + 3) in f32
        assert_eq!(s.decay_f32_tf(3).unwrap(), 4.0f32 / 13.0f32);
        assert_eq!(
            s.alpha(3, Numerics::TensorFlow).unwrap(),
            1.0f32 - 4.0f32 / 13.0f32
        );
        // large n: the f32 cap 0.9999f32, alpha = 1 - 0.9999f32 = 1.00016594e-4
        let a = s.alpha(10_000_000, Numerics::TensorFlow).unwrap();
        assert_eq!(a, 1.0f32 - 0.9999f32);
        assert_eq!(a.to_bits(), 0x38d1c000);
    }

    #[test]
    fn modes_differ_as_documented() {
        for (d, rel) in [(0.9999, 1.7e-4), (0.99999, 1.36e-3)] {
            let s = Schedule::constant(d);
            let e = s.alpha(0, Numerics::Exact).unwrap() as f64;
            let t = s.alpha(0, Numerics::TensorFlow).unwrap() as f64;
            assert!(
                ((t / e - 1.0) - rel).abs() < 0.05 * rel,
                "decay {d}: {}",
                t / e - 1.0
            );
        }
    }

    #[test]
    fn bad_decays_are_errors() {
        for d in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
            assert!(matches!(
                Schedule::constant(d).alpha(0, Numerics::Exact),
                Err(Error::InvalidDecay { .. })
            ));
            assert!(Schedule::tf(d).validate().is_err());
        }
        assert!(Schedule::constant(0.0).validate().is_ok());
        assert!(Schedule::constant(1.0).validate().is_ok());
    }
}
