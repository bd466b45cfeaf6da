//! The f64 reference the tests compare every path with.

use super::ema_step_f64;
use crate::error::{Error, Result};
use crate::schedule::Stepper;
use crate::schedule::{Action, Numerics, Policy, Schedule};

/// The f64 reference EMA: f64 shadows fed the same f32 alphas as the f32 paths.
///
/// Tests compare the GPU and the fast CPU path with it; differences are f32 rounding only.
#[derive(Clone, Debug)]
pub struct ReferenceEma {
    stepper: Stepper,
    shadows: Vec<Vec<f64>>,
}

impl ReferenceEma {
    /// Shadows start equal to `initial` (one slice per tensor).
    pub fn new(schedule: Schedule, numerics: Numerics, initial: &[&[f32]]) -> Result<Self> {
        Ok(Self {
            stepper: Stepper::new(schedule, numerics, Policy::default(), 0)?,
            shadows: initial
                .iter()
                .map(|t| t.iter().map(|&x| x as f64).collect())
                .collect(),
        })
    }

    /// Sets when updates happen; see [`Policy`].
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        self.stepper.set_policy(policy)
    }

    /// Changes the schedule from the next update on (as
    /// [`GpuEma::set_schedule`](crate::GpuEma::set_schedule)).
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<()> {
        self.stepper.set_schedule(schedule)
    }

    /// One update with the internal counter.
    pub fn update(&mut self, params: &[&[f32]]) -> Result<()> {
        let n = self.stepper.next();
        self.update_at(n, params)
    }

    /// One update as update number `n`.
    pub fn update_at(&mut self, n: u64, params: &[&[f32]]) -> Result<()> {
        if params.len() != self.shadows.len() {
            return Err(Error::TensorCountMismatch {
                expected: self.shadows.len(),
                got: params.len(),
            });
        }
        let action = self.stepper.advance_to(n)?;
        for (s, p) in self.shadows.iter_mut().zip(params) {
            match action {
                Action::Skip => {}
                Action::Copy => {
                    for (s, &p) in s.iter_mut().zip(p.iter()) {
                        *s = p as f64;
                    }
                }
                Action::Update(alpha) => ema_step_f64(s, p, alpha as f64)?,
            }
        }
        Ok(())
    }

    /// The shadows, one vector per tensor.
    pub fn shadows(&self) -> &[Vec<f64>] {
        &self.shadows
    }
}
