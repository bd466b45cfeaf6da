//! The decay for update number `n`, computed on the host.
//!
//! The GPU never sees a decay: it receives `alpha = 1 - decay`, computed here, because
//! `1 - decay` in f32 loses most of the digits of a decay close to 1 (see [`Numerics`]).
//!
//! ## What `n` counts
//! Every EMA of this crate ([`GpuEma`](crate::GpuEma), [`CpuEma`](crate::cpu::CpuEma), the
//! f64 reference, burn's `EmaOptim`) keeps one step counter, `num_updates`. It counts *calls*
//! (optimizer steps), whether they updated the shadows or not: under a [`Policy`], a call up to
//! `update_after_step` copies the parameters and a call between two updates of `update_every`
//! skips, and both still advance it. The first call is `n = 1`. A caller may pass its own
//! global step as `n` instead (`record_update_at`, `update_at`; as TensorFlow reads its
//! `num_updates` variable), and the counter becomes that `n`. Checkpoints save it as
//! `num_updates`; a restore sets it back, so the next call continues the sequence.

mod bema;
mod counter;
mod policy;

pub use bema::Bema;

pub(crate) use counter::Stepper;
pub use policy::{Action, Policy};

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
    /// diffusers' `EMAModel` default: TensorFlow's rule on `k = n - 1` (diffusers'
    /// `optimization_step - update_after_step - 1`; combine with
    /// [`Policy::update_after_step`] for its `update_after_step`), floored at `min_decay`:
    /// `decay(n) = 0` for `k <= 0`, else `max(min_decay, min(decay, (1 + k) / (10 + k)))`.
    Diffusers {
        /// The cap, in `[0, 1]` (diffusers' `decay`, default 0.9999).
        decay: f64,
        /// The floor, in `[0, 1]` (diffusers' `min_decay`, default 0).
        min_decay: f64,
    },
    /// Warm-up as in timm's `ModelEmaV3`, diffusers (`use_ema_warmup`) and ema-pytorch:
    /// `decay(n) = clamp(1 - (1 + n / inv_gamma)^(-power), min_decay, max_decay)`, `n` counted
    /// from the policy's start. Those peers average from their call `update_after_step + 2`:
    /// give ours their `update_after_step + 1` (the guide's "Porting a peer's settings").
    ///
    /// `inv_gamma = 1` and `power = 2/3` (the defaults) suit training runs of about a million
    /// steps (decay 0.999 near 31.6k steps, 0.9999 near 1M); `power = 3/4` suits shorter runs
    /// (0.999 near 10k steps, 0.9999 near 215k).
    Warmup {
        /// Scale of `n` (default 1).
        inv_gamma: f64,
        /// Exponent (default 2/3).
        power: f64,
        /// Lower clamp, in `[0, 1]`.
        min_decay: f64,
        /// Upper clamp, in `[0, 1]`.
        max_decay: f64,
    },
    /// The power-function EMA of Karras et al. (EDM2, exactly; ema-pytorch's `KarrasEMA` runs
    /// one step behind: start ours with `num_updates(2)` after its first call), whose
    /// averaging window grows with training: `decay(n) = (1 - 1/n)^(1 + gamma)` for update `n`
    /// (1-based; with a 0-based step count `s = n - 1` this is EDM2's `(1 - 1/(s+1))^(1+gamma)`),
    /// so the first update copies the parameters. [`Schedule::power_sigma_rel`] sets `gamma`
    /// from the relative width `sigma_rel`.
    Power {
        /// The exponent, > 0 (EDM2 uses 6.94 and 16.97, i.e. `sigma_rel` 0.10 and 0.05).
        gamma: f64,
    },
    /// Composer's half-life: `decay = 2^(-update_interval / half_life)`, constant: after
    /// `half_life` steps (of which every `update_interval`-th updates the average) a
    /// parameter's old value weighs half.
    HalfLife {
        /// Steps for the weight of old values to halve, > 0.
        half_life: f64,
        /// Steps between two updates (Composer's `update_interval`), > 0.
        update_interval: f64,
    },
    /// BEMA, the bias-corrected EMA (Block & Zhang 2025; TRL's `BEMACallback`): the EMA's
    /// weight falls as `(lag + multiplier t)^(-ema_power)`, and the EMA keeps the anchor
    /// `theta_0` so that it can give the corrected weights
    /// `EMA_t + (lag + multiplier t)^(-bias_power) (theta_t - theta_0)` on request. `t`
    /// counts calls after the burn-in ([`Policy::update_after_step`]) or the last restart. See
    /// [`Bema`].
    Bema(Bema),
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

/// The widest power-function EMA's `sigma_rel`, `sqrt(1/12)`: exponent 0, the running mean
/// of every step so far. Valid `sigma_rel` lie strictly between 0 and this.
pub const SIGMA_REL_MAX: f64 = 0.288_675_134_594_812_9;

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

    /// A target network's soft update (Polyak averaging), `target = (1 - tau) target + tau
    /// online`, as Stable-Baselines3's `polyak_update(tau)`, torchrl's `SoftUpdate(tau=...)`
    /// and CleanRL write it: the constant decay `1 - tau`. `tau` must lie in `(0, 1]` (an
    /// error otherwise, where a decay outside `[0, 1]` would be).
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// let s = Schedule::polyak(0.005).unwrap();
    /// assert_eq!(s, Schedule::constant(0.995));
    /// assert!(Schedule::polyak(0.0).is_err() && Schedule::polyak(1.5).is_err());
    /// ```
    pub fn polyak(tau: f64) -> Result<Self> {
        if !(tau > 0.0 && tau <= 1.0) {
            return Err(Error::InvalidSchedule(format!(
                "polyak tau = {tau}: the fraction of the online network taken per update lies in (0, 1]"
            )));
        }
        Ok(Schedule::Constant { decay: 1.0 - tau })
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

    /// diffusers' `EMAModel` default rule (see [`Schedule::Diffusers`]).
    pub fn diffusers(decay: f64, min_decay: f64) -> Self {
        Schedule::Diffusers { decay, min_decay }
    }

    /// Warm-up with `inv_gamma`, `power`, clamped to `[0, max_decay]` (see
    /// [`Schedule::Warmup`]).
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// let s = Schedule::warmup(1.0, 2.0 / 3.0, 0.9999);
    /// assert!((s.decay(7).unwrap() - 0.75).abs() < 1e-12); // 1 - 8^(-2/3)
    /// ```
    pub fn warmup(inv_gamma: f64, power: f64, max_decay: f64) -> Self {
        Schedule::Warmup {
            inv_gamma,
            power,
            min_decay: 0.0,
            max_decay,
        }
    }

    /// The power-function EMA with exponent `gamma`.
    pub fn power(gamma: f64) -> Self {
        Schedule::Power { gamma }
    }

    /// The power-function EMA whose averaging window has relative standard deviation
    /// `sigma_rel` (EDM2's parametrisation): `gamma` is the largest real root of
    /// `g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0`. Fails unless
    /// `0 < sigma_rel < sqrt(1/12) = 0.2887` ([`SIGMA_REL_MAX`]: `gamma = 0`, the plain
    /// running mean; wider windows would need `gamma <= 0`).
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// let Schedule::Power { gamma } = Schedule::power_sigma_rel(0.10).unwrap() else { unreachable!() };
    /// assert!((gamma - 6.94).abs() < 0.01);
    /// ```
    pub fn power_sigma_rel(sigma_rel: f64) -> Result<Self> {
        if !(sigma_rel > 0.0 && sigma_rel < SIGMA_REL_MAX) {
            return Err(Error::InvalidSchedule(format!(
                "sigma_rel must be in (0, {SIGMA_REL_MAX:.4}), got {sigma_rel}"
            )));
        }
        let t = sigma_rel.powi(-2);
        let f = |g: f64| ((g + 7.0) * g + 16.0 - t) * g + 12.0 - t;
        let df = |g: f64| (3.0 * g + 14.0) * g + 16.0 - t;
        // Newton from the right of every root converges to the largest one.
        let mut g = t.sqrt() + 10.0;
        for _ in 0..200 {
            let step = f(g) / df(g);
            g -= step;
            if step.abs() < 1e-14 * g.abs().max(1.0) {
                break;
            }
        }
        if !g.is_finite() {
            return Err(Error::InvalidSchedule(format!(
                "sigma_rel {sigma_rel} is too small: its gamma does not fit an f64"
            )));
        }
        if g <= 0.0 {
            return Err(Error::InvalidSchedule(format!(
                "sigma_rel {sigma_rel} is too close to {SIGMA_REL_MAX:.6}: its gamma rounds to 0 or below"
            )));
        }
        Ok(Schedule::Power { gamma: g })
    }

    /// BEMA with these parameters (see [`Bema`]; `Bema::default()` is TRL's).
    ///
    /// ```
    /// use wgpu_ema::{schedule::Bema, Schedule};
    /// let s = Schedule::bema(Bema::default());
    /// assert!((s.decay(90).unwrap() - 0.9).abs() < 1e-15); // 1 - (10 + 90)^(-1/2)
    /// ```
    pub fn bema(params: Bema) -> Self {
        Schedule::Bema(params)
    }

    /// BEMA's parameters, for a BEMA schedule.
    pub fn as_bema(&self) -> Option<&Bema> {
        match self {
            Schedule::Bema(b) => Some(b),
            _ => None,
        }
    }

    /// True when call `k` after the burn-in restarts the average (BEMA's restarts): the
    /// shadows (and BEMA's anchor) take the parameters' values, as during the burn-in.
    pub fn restarts_at(&self, k: u64) -> bool {
        self.as_bema().is_some_and(|b| b.restarts_at(k))
    }

    /// Composer's half-life (see [`Schedule::HalfLife`]).
    ///
    /// ```
    /// use wgpu_ema::Schedule;
    /// let s = Schedule::half_life(1000.0, 1.0);
    /// assert!((s.decay(1).unwrap().powf(1000.0) - 0.5).abs() < 1e-12);
    /// ```
    pub fn half_life(half_life: f64, update_interval: f64) -> Self {
        Schedule::HalfLife {
            half_life,
            update_interval,
        }
    }

    /// Checks every parameter: decays in `[0, 1]` and not NaN, exponents and lengths positive.
    pub fn validate(&self) -> Result<()> {
        let positive = |what: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::InvalidSchedule(format!(
                    "{what} must be a positive number, got {v}"
                )))
            }
        };
        match *self {
            Schedule::Constant { decay } | Schedule::NumUpdates { decay } => {
                check_unit("decay", decay)
            }
            Schedule::Diffusers { decay, min_decay } => {
                check_unit("decay", decay)?;
                check_unit("min_decay", min_decay)
            }
            Schedule::Warmup {
                inv_gamma,
                power,
                min_decay,
                max_decay,
            } => {
                positive("inv_gamma", inv_gamma)?;
                positive("power", power)?;
                check_unit("min_decay", min_decay)?;
                check_unit("max_decay", max_decay)?;
                if min_decay > max_decay {
                    return Err(Error::InvalidSchedule(format!(
                        "min_decay {min_decay} is above max_decay {max_decay}"
                    )));
                }
                Ok(())
            }
            Schedule::Power { gamma } => positive("gamma", gamma),
            Schedule::Bema(b) => b.validate(),
            Schedule::HalfLife {
                half_life,
                update_interval,
            } => {
                positive("half_life", half_life)?;
                positive("update_interval", update_interval)
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
            Schedule::Diffusers { decay, min_decay } => {
                if n <= 1 {
                    0.0
                } else {
                    let k = (n - 1) as f64;
                    decay.min((1.0 + k) / (10.0 + k)).max(min_decay)
                }
            }
            Schedule::Warmup {
                inv_gamma,
                power,
                min_decay,
                max_decay,
            } => (1.0 - (1.0 + n as f64 / inv_gamma).powf(-power)).clamp(min_decay, max_decay),
            Schedule::Power { gamma } => {
                if n == 0 {
                    0.0
                } else {
                    (1.0 - 1.0 / n as f64).powf(1.0 + gamma)
                }
            }
            Schedule::HalfLife {
                half_life,
                update_interval,
            } => 2f64.powf(-update_interval / half_life),
            Schedule::Bema(b) => 1.0 - b.ema_weight(b.local(n)),
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
            // TensorFlow has no other schedule: the f64 decay, held in f32.
            _ => self.decay(n)? as f32,
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
        let (hi, _) = self.alpha_split(n, numerics)?;
        Ok(hi)
    }

    /// [`alpha`](Self::alpha) and what its rounding to f32 dropped: `alpha_hi + alpha_lo` is the
    /// f64 alpha to about 48 bits ([`Numerics::Exact`]; `alpha_lo = 0` with
    /// [`Numerics::TensorFlow`], whose alpha is f32 by definition). Compensated shadows use
    /// both, so that the decay's own rounding does not bias a long average.
    ///
    /// ```
    /// use wgpu_ema::{Numerics, Schedule};
    /// let (hi, lo) = Schedule::constant(0.99999).alpha_split(0, Numerics::Exact).unwrap();
    /// assert_eq!(f64::from(hi) + f64::from(lo), 1.0 - 0.99999);
    /// ```
    pub fn alpha_split(&self, n: u64, numerics: Numerics) -> Result<(f32, f32)> {
        let exact = match numerics {
            Numerics::TensorFlow => return Ok((1.0f32 - self.decay_f32_tf(n)?, 0.0)),
            Numerics::Exact => match self {
                // BEMA's weight is computed as such, not as 1 - (1 - weight).
                Schedule::Bema(b) => {
                    self.validate()?;
                    b.ema_weight(b.local(n))
                }
                _ => 1.0 - self.decay(n)?,
            },
        };
        let hi = exact as f32;
        Ok((hi, (exact - f64::from(hi)) as f32))
    }

    /// A short text naming the schedule and its parameters, as stored in checkpoints.
    pub fn describe(&self) -> String {
        match *self {
            Schedule::Constant { decay } => format!("constant(decay={decay})"),
            Schedule::NumUpdates { decay } => format!("num_updates(decay={decay})"),
            Schedule::Diffusers { decay, min_decay } => {
                format!("diffusers(decay={decay}, min_decay={min_decay})")
            }
            Schedule::Warmup {
                inv_gamma,
                power,
                min_decay,
                max_decay,
            } => format!(
                "warmup(inv_gamma={inv_gamma}, power={power}, min_decay={min_decay}, max_decay={max_decay})"
            ),
            Schedule::Power { gamma } => format!("power(gamma={gamma})"),
            Schedule::HalfLife {
                half_life,
                update_interval,
            } => format!("half_life(half_life={half_life}, update_interval={update_interval})"),
            Schedule::Bema(b) => b.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerics_names_are_the_files_values() {
        // What checkpoints store (and other tools read): written out, not round-tripped only.
        assert_eq!(Numerics::Exact.as_str(), "exact");
        assert_eq!(Numerics::TensorFlow.as_str(), "tensorflow");
        assert_eq!(Numerics::parse("exact"), Some(Numerics::Exact));
        assert_eq!(Numerics::parse("tensorflow"), Some(Numerics::TensorFlow));
        assert_eq!(Numerics::parse("Exact"), None);
    }

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
    fn diffusers_by_hand() {
        let s = Schedule::diffusers(0.9999, 0.0);
        assert_eq!(s.decay(1).unwrap(), 0.0); // k = 0
        assert_eq!(s.decay(2).unwrap(), 2.0 / 11.0); // k = 1
        assert_eq!(s.decay(9).unwrap(), 0.5); // k = 8
        assert_eq!(s.decay(10_000_000).unwrap(), 0.9999);
        let floored = Schedule::diffusers(0.9999, 0.3);
        assert_eq!(floored.decay(2).unwrap(), 0.3);
        assert_eq!(
            floored.decay(1).unwrap(),
            0.0,
            "k <= 0 is a copy, as in diffusers"
        );
    }

    #[test]
    fn warmup_by_hand() {
        let s = Schedule::Warmup {
            inv_gamma: 1.0,
            power: 0.75,
            min_decay: 0.0,
            max_decay: 0.999,
        };
        assert_eq!(s.decay(0).unwrap(), 0.0);
        assert!((s.decay(15).unwrap() - 0.875).abs() < 1e-15); // 1 - 16^-0.75
        assert!((s.decay(80).unwrap() - (1.0 - 1.0 / 27.0)).abs() < 1e-15); // 81^-0.75 = 1/27
        assert_eq!(s.decay(100_000_000).unwrap(), 0.999);
        let inv = Schedule::Warmup {
            inv_gamma: 2.0,
            power: 2.0 / 3.0,
            min_decay: 0.1,
            max_decay: 1.0,
        };
        assert!((inv.decay(14).unwrap() - 0.75).abs() < 1e-12); // 1 - 8^(-2/3)
        assert_eq!(inv.decay(0).unwrap(), 0.1);
    }

    #[test]
    fn power_by_hand() {
        let s = Schedule::power(1.0);
        assert_eq!(s.decay(1).unwrap(), 0.0);
        assert_eq!(s.decay(2).unwrap(), 0.25); // (1/2)^2
        assert_eq!(s.decay(4).unwrap(), 0.5625); // (3/4)^2
                                                 // gamma = 0 would be a plain average; sigma_rel pairs from EDM2.
        for (sigma, gamma) in [(0.10, 6.94), (0.05, 16.97)] {
            let Schedule::Power { gamma: g } = Schedule::power_sigma_rel(sigma).unwrap() else {
                unreachable!()
            };
            assert!((g - gamma).abs() < 0.01, "sigma_rel {sigma}: {g}");
        }
        assert!(Schedule::power_sigma_rel(0.3).is_err());
        assert!(Schedule::power(0.0).validate().is_err());
    }

    #[test]
    fn half_life_by_hand() {
        let s = Schedule::half_life(10.0, 1.0);
        assert!((s.decay(1).unwrap() - 0.5f64.powf(0.1)).abs() < 1e-15);
        let every4 = Schedule::half_life(8.0, 4.0);
        assert!((every4.decay(9).unwrap() - 0.5f64.sqrt()).abs() < 1e-15);
        assert!(Schedule::half_life(0.0, 1.0).validate().is_err());
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
