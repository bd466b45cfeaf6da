//! EDM2's least-squares fit of one power-function EMA profile by a weighted sum of recorded
//! ones, in f64.
//!
//! A power-function EMA with exponent `gamma`, read at step `t`, averages the parameters of
//! steps `tau <= t` with density `p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`. The fit
//! minimises the L2 distance between the target's density and `sum_i x_i p_i`: the normal
//! equations `A x = b` use the closed-form inner products of two such densities.

use crate::error::{Error, Result};

/// `<p_a, p_b>`: the integral over `0..min(t_a, t_b)` of the product of two profile densities.
///
/// With `t_a <= t_b` it is `(g_a+1)(g_b+1) / (g_a+g_b+1) * t_a^g_b / t_b^(g_b+1)`; written
/// with a ratio of times so that neither power overflows for long runs and large exponents.
pub(crate) fn inner(t_a: f64, gamma_a: f64, t_b: f64, gamma_b: f64) -> f64 {
    let exponent = if t_a < t_b { gamma_b } else { -gamma_a };
    (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b).powf(exponent)
        / ((gamma_a + gamma_b + 1.0) * t_a.max(t_b))
}

/// A recorded (or wanted) profile: read at step `t`, exponent `gamma`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Profile {
    pub t: f64,
    pub gamma: f64,
}

/// The weights of `recorded` whose sum best matches `target`, normalised to sum to 1 (the
/// synthesized average of a constant parameter is that constant).
pub(crate) fn fit(recorded: &[Profile], target: Profile) -> Result<Vec<f64>> {
    let n = recorded.len();
    let mut a: Vec<f64> = Vec::with_capacity(n * n);
    for p in recorded {
        for q in recorded {
            a.push(inner(p.t, p.gamma, q.t, q.gamma));
        }
    }
    let b: Vec<f64> = recorded
        .iter()
        .map(|p| inner(p.t, p.gamma, target.t, target.gamma))
        .collect();
    let mut x = solve(&mut a, b)?;
    let sum: f64 = x.iter().sum();
    if !(sum.is_finite() && sum.abs() > 1e-12) {
        return Err(Error::PostHoc(format!(
            "the fitted weights sum to {sum}: the snapshots cannot express this profile"
        )));
    }
    for v in &mut x {
        *v /= sum;
    }
    Ok(x)
}

/// Solves `a x = b` (`a` row-major, `n x n`) by Gaussian elimination with partial pivoting,
/// as `numpy.linalg.solve` does. A pivot that vanishes next to the matrix's scale means two
/// recorded profiles are the same one: an error, not a meaningless solution.
fn solve(a: &mut [f64], mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap_or(col);
        let big_enough = a[pivot * n + col].abs() > scale * 1e-15;
        if !big_enough {
            return Err(Error::PostHoc(
                "the snapshots' profiles are linearly dependent (the same step and exponent \
                 twice?): the least-squares system is singular"
                    .into(),
            ));
        }
        if pivot != col {
            for k in 0..n {
                a.swap(col * n + k, pivot * n + k);
            }
            b.swap(col, pivot);
        }
        for row in col + 1..n {
            let f = a[row * n + col] / a[col * n + col];
            if f != 0.0 {
                for k in col..n {
                    a[row * n + k] -= f * a[col * n + k];
                }
                b[row] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row * n + k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row * n + row];
    }
    Ok(x)
}

/// `sigma_rel` of the power-function EMA with exponent `gamma`: the standard deviation of its
/// averaging window relative to its length.
pub(crate) fn sigma_rel_of(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0).powi(2) * (gamma + 3.0))).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn inner_products_by_hand() {
        // At t = 1: p_0 = 1, p_1 = 2 tau, p_2 = 3 tau^2.
        assert!(close(inner(1.0, 0.0, 1.0, 1.0), 1.0));
        assert!(close(inner(1.0, 1.0, 1.0, 1.0), 4.0 / 3.0));
        assert!(close(inner(1.0, 1.0, 1.0, 2.0), 1.5));
        // p_1 at t = 1 against p_1 at t = 2 (= tau / 2 on 0..2): integral of 2 tau * tau / 2
        // over 0..1 = 1/3.
        assert!(close(inner(1.0, 1.0, 2.0, 1.0), 1.0 / 3.0));
        assert!(close(inner(2.0, 1.0, 1.0, 1.0), 1.0 / 3.0));
        // Symmetric, and scale-free: times in steps or in samples give the same weights.
        assert!(close(inner(3.0, 2.5, 7.0, 0.5), inner(7.0, 0.5, 3.0, 2.5)));
        assert!(close(
            inner(3e6, 2.5, 7e6, 0.5) * 1e6,
            inner(3.0, 2.5, 7.0, 0.5)
        ));
        // Long runs with large exponents stay finite.
        assert!(inner(1e9, 40.0, 1.1e9, 40.0).is_finite());
    }

    #[test]
    fn fit_by_hand() {
        // The best a + b tau for 3 tau^2 on [0, 1] is 3 tau - 1/2 = -0.5 p_0 + 1.5 p_1,
        // and those weights already sum to 1.
        let rec = [
            Profile { t: 1.0, gamma: 0.0 },
            Profile { t: 1.0, gamma: 1.0 },
        ];
        let x = fit(&rec, Profile { t: 1.0, gamma: 2.0 }).unwrap();
        assert!(close(x[0], -0.5) && close(x[1], 1.5), "{x:?}");
        // A recorded profile is its own best fit.
        let rec = [
            Profile {
                t: 10.0,
                gamma: 3.0,
            },
            Profile {
                t: 20.0,
                gamma: 3.0,
            },
            Profile {
                t: 20.0,
                gamma: 9.0,
            },
        ];
        let x = fit(
            &rec,
            Profile {
                t: 20.0,
                gamma: 9.0,
            },
        )
        .unwrap();
        assert!(
            close(x[2], 1.0) && x[0].abs() < 1e-9 && x[1].abs() < 1e-9,
            "{x:?}"
        );
    }

    #[test]
    fn many_snapshots_still_solve() {
        // EDM2's setting: two profiles, a snapshot every 4k steps of a long run.
        let g = |s: f64| crate::posthoc::gamma_of_sigma_rel(s).unwrap();
        let mut rec = Vec::new();
        for i in 1..=200 {
            for s in [0.05, 0.10] {
                rec.push(Profile {
                    t: 4096.0 * i as f64,
                    gamma: g(s),
                });
            }
        }
        for s in [0.02, 0.05, 0.08, 0.13, 0.25] {
            let x = fit(
                &rec,
                Profile {
                    t: 4096.0 * 200.0,
                    gamma: g(s),
                },
            )
            .unwrap();
            assert!(x.iter().all(|v| v.is_finite()));
            assert!((x.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn duplicate_profiles_are_refused() {
        let p = Profile { t: 5.0, gamma: 2.0 };
        assert!(fit(&[p, p], Profile { t: 5.0, gamma: 3.0 }).is_err());
    }

    #[test]
    fn sigma_rel_round_trips() {
        for s in [0.01, 0.05, 0.1, 0.2, 0.28] {
            let crate::Schedule::Power { gamma } = crate::Schedule::power_sigma_rel(s).unwrap()
            else {
                unreachable!()
            };
            assert!((sigma_rel_of(gamma) - s).abs() < 1e-12, "{s}");
        }
    }
}
