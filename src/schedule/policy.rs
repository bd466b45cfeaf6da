//! When updates happen: a delayed start and an interval around the schedule.

use super::{Numerics, Schedule};
use crate::error::{Error, Result};

/// When updates happen, around the [`Schedule`]: a delayed start and an update interval
/// (ema-pytorch's `update_after_step` and `update_every`, diffusers' `update_after_step`,
/// Composer's `update_interval`).
///
/// The step counter `n` counts *calls* (optimizer steps), whether they update or not:
/// - calls with `n <= update_after_step` copy the parameters into the shadows (exactly, with
///   the copy pass) instead of averaging;
/// - after that, only calls where `n - update_after_step` is a multiple of `update_every`
///   update; the others record nothing;
/// - an update evaluates the schedule at `n - update_after_step`, so warm-ups start when the
///   averaging does. With `update_every = k`, each update folds in one parameter value per
///   `k` steps: pick the decay per update (a [`Schedule::HalfLife`] with
///   `update_interval = k` does it for you);
/// - a [`Schedule::Bema`] with `restart_every = r` makes every call `k = r, 2r, ...` after
///   `update_after_step` a copy too (a restart);
/// - with `write_back_every = w > 0` (Switch EMA, arXiv 2402.09240; ema-pytorch's
///   `update_model_with_ema_every`, Keras' `ema_overwrite_frequency`), every `w`-th update
///   then writes the first EMA's shadows into the parameters, in the same encoder, after the
///   update: training continues from the averaged weights.
///
/// ```
/// use wgpu_ema::schedule::Policy;
/// // Average from step 101 on, every 2nd step; write the EMA back every 50th update.
/// let p = Policy { update_after_step: 100, update_every: 2, write_back_every: 50 };
/// assert!(p.writes_back(200) && !p.writes_back(198));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Calls up to and including this one copy instead of averaging (default 0).
    pub update_after_step: u64,
    /// Update on every k-th call (default 1).
    pub update_every: u64,
    /// Write the EMA into the parameters after every w-th update (default 0: never).
    pub write_back_every: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            update_after_step: 0,
            update_every: 1,
            write_back_every: 0,
        }
    }
}

/// What one call does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    /// Nothing this call (between two updates of `update_every`).
    Skip,
    /// Shadows := params, exactly (before `update_after_step`).
    Copy,
    /// The EMA update with this `alpha = 1 - decay`.
    Update(f32),
}

impl Policy {
    /// Checks `update_every >= 1`.
    pub fn validate(&self) -> Result<()> {
        if self.update_every == 0 {
            return Err(Error::InvalidConfig(
                "update_every must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// What call `n` does under `schedule` with `numerics`.
    ///
    /// ```
    /// use wgpu_ema::schedule::{Action, Numerics, Policy, Schedule};
    /// let p = Policy { update_after_step: 2, update_every: 3, write_back_every: 0 };
    /// let s = Schedule::constant(0.5);
    /// assert_eq!(p.action(&s, 1, Numerics::Exact).unwrap(), Action::Copy);
    /// assert_eq!(p.action(&s, 3, Numerics::Exact).unwrap(), Action::Skip);
    /// assert_eq!(p.action(&s, 5, Numerics::Exact).unwrap(), Action::Update(0.5));
    /// ```
    pub fn action(&self, schedule: &Schedule, n: u64, numerics: Numerics) -> Result<Action> {
        self.validate()?;
        if n <= self.update_after_step {
            return Ok(Action::Copy);
        }
        let k = n - self.update_after_step;
        if schedule.restarts_at(k) {
            return Ok(Action::Copy);
        }
        if !k.is_multiple_of(self.update_every) {
            return Ok(Action::Skip);
        }
        Ok(Action::Update(schedule.alpha(k, numerics)?))
    }

    /// True when call `n` ends by writing the first EMA into the parameters: it updates, and
    /// it is the `write_back_every`-th update since the last write-back.
    pub fn writes_back(&self, n: u64) -> bool {
        // `k.is_multiple_of(0)` holds only for k = 0, which never reaches it: so
        // `write_back_every = 0` (never) and an invalid `update_every = 0` (the division is
        // then not reached) need no case of their own.
        match n.checked_sub(self.update_after_step) {
            Some(k) if k > 0 => {
                k.is_multiple_of(self.update_every)
                    && (k / self.update_every).is_multiple_of(self.write_back_every)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_by_hand() {
        let s = Schedule::tf(0.99);
        let p = Policy {
            update_after_step: 3,
            update_every: 2,
            write_back_every: 0,
        };
        let acts: Vec<Action> = (1..=8)
            .map(|n| p.action(&s, n, Numerics::Exact).unwrap())
            .collect();
        let a = |k: u64| Action::Update(s.alpha(k, Numerics::Exact).unwrap());
        assert_eq!(
            acts,
            [
                Action::Copy,
                Action::Copy,
                Action::Copy,
                Action::Skip,
                a(2),
                Action::Skip,
                a(4),
                Action::Skip
            ]
        );
        let bad = Policy {
            update_after_step: 0,
            update_every: 0,
            write_back_every: 0,
        };
        assert!(bad.action(&s, 1, Numerics::Exact).is_err());
    }

    #[test]
    fn bema_restarts_copy_and_restart_t() {
        use super::super::Bema;
        let b = Bema {
            restart_every: 3,
            ..Bema::default()
        };
        let s = Schedule::Bema(b);
        let p = Policy {
            update_after_step: 1,
            ..Policy::default()
        };
        let acts: Vec<Action> = (1..=8)
            .map(|n| p.action(&s, n, Numerics::Exact).unwrap())
            .collect();
        // k = n - 1: copies at k = 0 (burn-in), 3 and 6; t = k mod 3 otherwise.
        let w = |t: f64| Action::Update((10.0 + t).powf(-0.5) as f32);
        assert_eq!(
            acts,
            [
                Action::Copy,
                w(1.0),
                w(2.0),
                Action::Copy,
                w(1.0),
                w(2.0),
                Action::Copy,
                w(1.0)
            ]
        );
    }

    #[test]
    fn write_back_every_w_th_update() {
        // Updates at n = 5, 7, 9, 11, 13, 15 (after 3, every 2nd): the 3rd and 6th write back.
        let p = Policy {
            update_after_step: 3,
            update_every: 2,
            write_back_every: 3,
        };
        let back: Vec<u64> = (1..=16).filter(|&n| p.writes_back(n)).collect();
        assert_eq!(back, [9, 15]);
        // Updates at n = 4, 6, 8, ... (k = 2, 4, 6, ...): every 4th update is k = 8, 16.
        let p = Policy {
            update_after_step: 2,
            update_every: 2,
            write_back_every: 4,
        };
        let back: Vec<u64> = (1..=20).filter(|&n| p.writes_back(n)).collect();
        assert_eq!(back, [10, 18]);
        assert!(!(0..=100).any(|n| Policy::default().writes_back(n)));
        let invalid = Policy {
            update_every: 0,
            write_back_every: 1,
            ..Policy::default()
        };
        assert!(!(0..=10).any(|n| invalid.writes_back(n)));
        let every = Policy {
            write_back_every: 1,
            ..Policy::default()
        };
        assert!((1..=5).all(|n| every.writes_back(n)));
    }
}
