//! BEMA's coefficients (Block & Zhang 2025, "EMA Without the Lag", arXiv 2508.00180): the
//! EMA's weight `beta_t` and the bias correction's weight `alpha_t`, both functions of the
//! number `t` of steps since the anchor `theta_0` was taken.

use crate::error::{Error, Result};

/// Parameters of BEMA, the bias-corrected EMA, under the names TRL's `BEMACallback` gives
/// them (the paper's symbols in brackets):
///
/// - the EMA: `EMA_t = (1 - beta_t) EMA_{t-1} + beta_t theta_t`, with
///   `beta_t = max((lag + multiplier t)^(-ema_power), min_ema_multiplier)`;
/// - the evaluated weights: `BEMA_t = EMA_t + alpha_t (theta_t - theta_0)`, with
///   `alpha_t = (lag + multiplier t)^(-bias_power)`;
/// - `t` counts calls since `theta_0` was taken: since the end of the burn-in
///   ([`Policy::update_after_step`](crate::schedule::Policy::update_after_step), the paper's
///   `tau`), or since the last restart when `restart_every > 0`.
///
/// Use it as [`Schedule::Bema`](crate::Schedule::Bema) (`Schedule::bema`): the EMA keeps
/// `theta_0` beside the shadows, and the BEMA weights are computed on request (see the guide's
/// BEMA section). The defaults are TRL's.
///
/// ```
/// use wgpu_ema::schedule::Bema;
/// let b = Bema::default(); // ema_power 0.5, bias_power 0.2, lag 10, multiplier 1
/// assert!((b.ema_weight(6) - 0.25).abs() < 1e-15); // (10 + 6)^(-1/2)
/// assert!((b.bias_weight(22) - 0.5).abs() < 1e-15); // (10 + 22)^(-1/5)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bema {
    /// `kappa`: how fast the EMA's weight `beta_t` falls (TRL default 0.5). `0` gives
    /// `beta_t = 1`: the EMA is the last parameter value.
    pub ema_power: f64,
    /// `eta`: how fast the correction's weight `alpha_t` falls (TRL default 0.2). `0` keeps
    /// `alpha_t = 1`, the strongest correction (BEMA = EMA + theta_t - theta_0); larger values
    /// fade it out sooner, towards the plain EMA.
    pub bias_power: f64,
    /// `rho`: the offset of `t`, a virtual starting age (TRL default 10).
    pub lag: f64,
    /// `gamma`: the scale of `t` (TRL default 1).
    pub multiplier: f64,
    /// A floor on `beta_t`, in `[0, 1]` (TRL default 0).
    pub min_ema_multiplier: f64,
    /// Restart every this many calls after the burn-in: `theta_0` and the EMA are set to the
    /// parameters and `t` starts again from 0 (0, the default: never).
    pub restart_every: u64,
}

impl Default for Bema {
    /// TRL's defaults: `ema_power` 0.5, `bias_power` 0.2, `lag` 10, `multiplier` 1,
    /// `min_ema_multiplier` 0, no restarts.
    fn default() -> Self {
        Self {
            ema_power: 0.5,
            bias_power: 0.2,
            lag: 10.0,
            multiplier: 1.0,
            min_ema_multiplier: 0.0,
            restart_every: 0,
        }
    }
}

impl Bema {
    /// Checks the ranges: powers, lag and multiplier finite and not negative,
    /// `min_ema_multiplier` in `[0, 1]`, and `lag + multiplier >= 1` when `ema_power > 0` (so
    /// that the first update's `beta_1` is at most 1: a weighted average, not an
    /// extrapolation).
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("ema_power", self.ema_power),
            ("bias_power", self.bias_power),
            ("lag", self.lag),
            ("multiplier", self.multiplier),
        ];
        for (what, v) in fields {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::InvalidSchedule(format!(
                    "BEMA {what} must be a finite number >= 0, got {v}"
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.min_ema_multiplier) {
            return Err(Error::InvalidSchedule(format!(
                "BEMA min_ema_multiplier must lie in [0, 1], got {}",
                self.min_ema_multiplier
            )));
        }
        if self.ema_power > 0.0 && self.lag + self.multiplier < 1.0 {
            return Err(Error::InvalidSchedule(format!(
                "BEMA lag + multiplier = {} is below 1: the first update's weight \
                 (lag + multiplier)^(-ema_power) would exceed 1",
                self.lag + self.multiplier
            )));
        }
        Ok(())
    }

    /// `t` for a call `k` calls after the burn-in: `k`, or `k` modulo `restart_every`.
    pub fn local(&self, k: u64) -> u64 {
        match self.restart_every {
            0 => k,
            r => k % r,
        }
    }

    /// True when call `k` after the burn-in (`k >= 1`) is a restart.
    pub fn restarts_at(&self, k: u64) -> bool {
        k > 0 && self.restart_every > 0 && k.is_multiple_of(self.restart_every)
    }

    /// `lag + multiplier t`, the base of both weights.
    fn base(&self, t: u64) -> f64 {
        self.lag + self.multiplier * t as f64
    }

    /// The EMA's weight `beta_t` (what the rest of the crate calls `alpha = 1 - decay`):
    /// `max((lag + multiplier t)^(-ema_power), min_ema_multiplier)`,
    /// at most 1.
    pub fn ema_weight(&self, t: u64) -> f64 {
        self.base(t)
            .powf(-self.ema_power)
            .max(self.min_ema_multiplier)
            .min(1.0)
    }

    /// The bias correction's weight `alpha_t`: `(lag + multiplier t)^(-bias_power)`; 0 at
    /// `t = 0`, when the EMA and `theta_0` were just taken from the same parameters.
    pub fn bias_weight(&self, t: u64) -> f64 {
        if t == 0 {
            return 0.0;
        }
        self.base(t).powf(-self.bias_power)
    }

    /// A short text naming the parameters, as stored in checkpoints.
    pub fn describe(&self) -> String {
        format!(
            "bema(ema_power={}, bias_power={}, lag={}, multiplier={}, min_ema_multiplier={}, restart_every={})",
            self.ema_power,
            self.bias_power,
            self.lag,
            self.multiplier,
            self.min_ema_multiplier,
            self.restart_every
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_by_hand() {
        let b = Bema::default();
        assert_eq!(b.ema_weight(0), 10f64.powf(-0.5));
        assert!((b.ema_weight(90) - 0.1).abs() < 1e-15); // 100^(-1/2)
        assert!((b.bias_weight(22) - 0.5).abs() < 1e-15); // 32^(-1/5)
        assert_eq!(b.bias_weight(0), 0.0);
        let floored = Bema {
            min_ema_multiplier: 0.2,
            ..b
        };
        assert_eq!(floored.ema_weight(90), 0.2);
        let no_ema = Bema {
            ema_power: 0.0,
            ..b
        };
        assert_eq!(no_ema.ema_weight(5), 1.0);
        let full = Bema {
            bias_power: 0.0,
            ..b
        };
        assert_eq!(full.bias_weight(7), 1.0);
        let scaled = Bema {
            lag: 1.0,
            multiplier: 0.5,
            ema_power: 1.0,
            ..b
        };
        assert_eq!(scaled.ema_weight(6), 0.25); // (1 + 3)^-1
    }

    #[test]
    fn described_as_checkpoints_store_it() {
        // What checkpoints record and restores compare: written out, not round-tripped only.
        assert_eq!(
            Bema::default().describe(),
            "bema(ema_power=0.5, bias_power=0.2, lag=10, multiplier=1, min_ema_multiplier=0, restart_every=0)"
        );
    }

    #[test]
    fn restarts_by_hand() {
        let b = Bema {
            restart_every: 4,
            ..Bema::default()
        };
        let locals: Vec<u64> = (1..=9).map(|k| b.local(k)).collect();
        assert_eq!(locals, [1, 2, 3, 0, 1, 2, 3, 0, 1]);
        let at: Vec<u64> = (0..=9).filter(|&k| b.restarts_at(k)).collect();
        assert_eq!(at, [4, 8]);
        assert!(!(0..100).any(|k| Bema::default().restarts_at(k)));
        assert_eq!(Bema::default().local(1234), 1234);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let ok = Bema::default();
        assert!(ok.validate().is_ok());
        for bad in [
            Bema {
                ema_power: -0.5,
                ..ok
            },
            Bema {
                bias_power: f64::NAN,
                ..ok
            },
            Bema { lag: -1.0, ..ok },
            Bema {
                multiplier: f64::INFINITY,
                ..ok
            },
            Bema {
                min_ema_multiplier: 1.5,
                ..ok
            },
            Bema {
                lag: 0.0,
                multiplier: 0.5,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Without an EMA (ema_power 0) beta is 1 whatever the lag.
        assert!(Bema {
            ema_power: 0.0,
            lag: 0.0,
            multiplier: 0.5,
            ..ok
        }
        .validate()
        .is_ok());
        // lag 0 with multiplier 1 keeps beta_1 = 1: allowed.
        assert!(Bema {
            lag: 0.0,
            multiplier: 1.0,
            ..ok
        }
        .validate()
        .is_ok());
    }
}
