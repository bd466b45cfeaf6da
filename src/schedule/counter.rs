//! The step counter: the one place where "one more call" becomes an [`Action`] and each EMA's
//! `alpha`. The GPU path, the CPU path, the f64 reference and burn's `EmaOptim` each hold one.
//! What it counts is documented once, in the parent module ("What `n` counts").

use super::{Action, Numerics, Policy, Schedule};
use crate::error::{Error, Result};

/// BEMA writes no EMA back into the parameters: its weights are the EMA plus a correction,
/// and writing the EMA alone back would train from something else than either.
fn check_pair(schedule: &Schedule, policy: &Policy) -> Result<()> {
    if schedule.as_bema().is_some() && policy.write_back_every > 0 {
        return Err(Error::InvalidConfig(
            "a BEMA schedule with write_back_every > 0: BEMA's weights are the EMA plus a \
             correction; copy them with the BEMA calls instead"
                .into(),
        ));
    }
    Ok(())
}

/// A step counter with the schedule, numerics and policy it drives. Its state is private: it
/// moves only by a call ([`advance_to`](Self::advance_to)), a restore
/// ([`set_num_updates`](Self::set_num_updates)) or a configuration change, each validated.
#[derive(Clone, Debug)]
pub(crate) struct Stepper {
    schedule: Schedule,
    numerics: Numerics,
    policy: Policy,
    /// Calls so far (see the module docs); the next call is number `num_updates + 1`.
    num_updates: u64,
}

impl Stepper {
    /// A counter at `num_updates` calls; the schedule and the policy are validated.
    pub fn new(
        schedule: Schedule,
        numerics: Numerics,
        policy: Policy,
        num_updates: u64,
    ) -> Result<Self> {
        schedule.validate()?;
        policy.validate()?;
        check_pair(&schedule, &policy)?;
        Ok(Self {
            schedule,
            numerics,
            policy,
            num_updates,
        })
    }

    /// The schedule (of EMA 0).
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// The numerics.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Calls so far.
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }

    /// The number of the next call.
    pub fn next(&self) -> u64 {
        self.num_updates.saturating_add(1)
    }

    /// Sets the counter (restoring a checkpoint): the next call is `n + 1`.
    pub fn set_num_updates(&mut self, n: u64) {
        self.num_updates = n;
    }

    /// Replaces the schedule from the next call on; an invalid one changes nothing, and so
    /// does a change into or out of BEMA (whose anchor exists only in a BEMA EMA).
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<()> {
        schedule.validate()?;
        check_pair(&schedule, &self.policy)?;
        if schedule.as_bema().is_some() != self.schedule.as_bema().is_some() {
            return Err(Error::InvalidConfig(format!(
                "cannot change the schedule from {} to {}: a BEMA EMA keeps an anchor the \
                 others do not (build a new EMA)",
                self.schedule.describe(),
                schedule.describe()
            )));
        }
        self.schedule = schedule;
        Ok(())
    }

    /// Replaces the policy; an invalid one changes nothing.
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        policy.validate()?;
        check_pair(&self.schedule, &policy)?;
        self.policy = policy;
        Ok(())
    }

    /// What rounding EMA 0's alpha of call `n` to f32 dropped (see
    /// [`Schedule::alpha_split`]): compensated shadows add it back.
    pub fn alpha_lo(&self, n: u64) -> Result<f32> {
        let k = n.saturating_sub(self.policy.update_after_step);
        Ok(self.schedule.alpha_split(k, self.numerics)?.1)
    }

    /// BEMA's correction weight `alpha_t` for the weights asked for now: `t` of the last call
    /// that updated (or copied), so that weights asked for right after an update are the
    /// paper's `BEMA_t`. `None` unless the schedule is BEMA.
    pub fn bias_weight(&self) -> Option<f64> {
        let b = self.schedule.as_bema()?;
        let k = self
            .num_updates
            .saturating_sub(self.policy.update_after_step);
        let every = self.policy.update_every.max(1);
        // The last call that updated is a multiple of `every`; a restart since then made t 0.
        let last_update = k - k % every;
        let last_restart = match b.restart_every {
            0 => 0,
            r => k - k % r,
        };
        if last_restart > last_update {
            return Some(0.0);
        }
        Some(b.bias_weight(b.local(last_update)))
    }

    /// What call `n` does, then the counter set to `n`. An error leaves the counter alone.
    pub fn advance_to(&mut self, n: u64) -> Result<Action> {
        let a = self.policy.action(&self.schedule, n, self.numerics)?;
        self.num_updates = n;
        Ok(a)
    }

    /// [`advance_to`](Self::advance_to) for several EMAs sharing the counter and the policy:
    /// writes the alpha of each schedule of `extra` at the same point into `alphas[1..]`
    /// (`alphas[0]` is left alone: it is in the returned action), all computed before the
    /// counter moves, so that an invalid schedule changes nothing.
    pub fn advance_all(
        &mut self,
        n: u64,
        extra: &[Schedule],
        alphas: &mut [f32],
    ) -> Result<Action> {
        let k = n.saturating_sub(self.policy.update_after_step);
        for (slot, schedule) in alphas.iter_mut().skip(1).zip(extra) {
            *slot = schedule.alpha(k, self.numerics)?;
        }
        self.advance_to(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_skips_and_copies_included() {
        let policy = Policy {
            update_after_step: 2,
            update_every: 2,
            write_back_every: 0,
        };
        let mut s = Stepper::new(Schedule::constant(0.5), Numerics::Exact, policy, 0).unwrap();
        let actions: Vec<Action> = (0..6)
            .map(|_| {
                let n = s.next();
                s.advance_to(n).unwrap()
            })
            .collect();
        assert_eq!(
            actions,
            [
                Action::Copy,
                Action::Copy,
                Action::Skip,
                Action::Update(0.5),
                Action::Skip,
                Action::Update(0.5)
            ]
        );
        assert_eq!(s.num_updates(), 6);
        assert_eq!(s.policy(), policy);
        let tf = Stepper::new(Schedule::constant(0.5), Numerics::TensorFlow, policy, 0).unwrap();
        assert_eq!(tf.numerics(), Numerics::TensorFlow);
    }

    #[test]
    fn bema_bias_weight_is_that_of_the_last_update() {
        use super::super::Bema;
        let a = |t: f64| (10.0 + t).powf(-0.2);
        let at = |bema: Bema, after: u64, every: u64, n: u64| {
            let policy = Policy {
                update_after_step: after,
                update_every: every,
                write_back_every: 0,
            };
            let mut s = Stepper::new(Schedule::Bema(bema), Numerics::Exact, policy, 0).unwrap();
            s.set_num_updates(n);
            s.bias_weight().unwrap()
        };
        let b = Bema::default();
        // Burn-in to call 3, updates at 5, 7, ...: t of the last update.
        let got: Vec<f64> = (3..=7).map(|n| at(b, 3, 2, n)).collect();
        assert_eq!(got, [0.0, 0.0, a(2.0), a(2.0), a(4.0)]);
        // Restarts every 4 calls, updates every call: t runs 1, 2, 3, 0, 1, ...
        let r = Bema {
            restart_every: 4,
            ..b
        };
        let got: Vec<f64> = (3..=8).map(|n| at(r, 0, 1, n)).collect();
        assert_eq!(got, [a(3.0), 0.0, a(1.0), a(2.0), a(3.0), 0.0]);
        // Restarts every 4, updates every 3rd call: a restart after the last update makes it 0.
        let got: Vec<f64> = (3..=7).map(|n| at(r, 0, 3, n)).collect();
        assert_eq!(got, [a(3.0), 0.0, 0.0, a(2.0), a(2.0)]);
        let plain = Stepper::new(
            Schedule::constant(0.9),
            Numerics::Exact,
            Policy::default(),
            5,
        );
        assert_eq!(plain.unwrap().bias_weight(), None);
    }

    #[test]
    fn bema_is_kept_or_refused_as_a_whole() {
        use super::super::Bema;
        let bema = Schedule::Bema(Bema::default());
        let mut s = Stepper::new(bema, Numerics::Exact, Policy::default(), 0).unwrap();
        assert!(s.set_schedule(Schedule::constant(0.9)).is_err());
        assert_eq!(s.schedule(), bema);
        let other = Schedule::Bema(Bema {
            lag: 3.0,
            ..Bema::default()
        });
        s.set_schedule(other).unwrap();
        let write_back = Policy {
            write_back_every: 2,
            ..Policy::default()
        };
        assert!(s.set_policy(write_back).is_err());
        assert!(Stepper::new(bema, Numerics::Exact, write_back, 0).is_err());
        let mut plain =
            Stepper::new(Schedule::constant(0.9), Numerics::Exact, write_back, 0).unwrap();
        assert!(plain.set_schedule(bema).is_err());
    }

    #[test]
    fn an_invalid_schedule_moves_nothing() {
        let mut s = Stepper::new(
            Schedule::constant(0.9),
            Numerics::Exact,
            Policy::default(),
            7,
        )
        .unwrap();
        let mut alphas = [1.0f32; 3];
        let bad = [Schedule::constant(0.5), Schedule::constant(2.0)];
        assert!(s.advance_all(8, &bad, &mut alphas).is_err());
        assert_eq!(s.num_updates(), 7);
        assert!(s.set_schedule(Schedule::constant(-1.0)).is_err());
        assert_eq!(s.schedule(), Schedule::constant(0.9));
        let zero = Policy {
            update_after_step: 0,
            update_every: 0,
            write_back_every: 0,
        };
        assert!(s.set_policy(zero).is_err());
        assert!(Stepper::new(Schedule::constant(0.9), Numerics::Exact, zero, 0).is_err());
    }
}
