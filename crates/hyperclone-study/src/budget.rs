//! The budget-matched measurement: where a clone's final loss, as a function of its budget,
//! crosses the random init's final loss, and which rungs a seed still has to run to bracket
//! that crossing.
//!
//! A clone arm's runs of one seed give points (budget b_i, final loss L_i), b ascending.
//! With T the random init's final loss at its full budget R on the same seed, the first i
//! with L_i <= T decides:
//!
//! ```text
//! i = 1 (the shortest rung already reaches T):  clone budget <= b_1, speedup >= R / b_1
//! no such i (the longest rung does not):        clone budget >  b_k, speedup <  R / b_k
//! otherwise, between b_{i-1} and b_i:           b* = b_{i-1} (b_i / b_{i-1})^t,
//!                                               t = (L_{i-1} - T) / (L_{i-1} - L_i)
//!                                               speedup = R / b*
//! ```
//!
//! i.e. the loss is interpolated linearly in log-budget between the two bracketing runs;
//! nothing is extrapolated past the ladder.

use serde_json::{json, Value};

/// Where the crossing lies, in tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Crossing {
    /// Interpolated between two runs.
    Between { tokens: f64, lo: f64, hi: f64 },
    /// The shortest run already reaches the target: the clone needs at most `tokens`.
    BelowSmallest { tokens: f64 },
    /// The longest run does not: the clone needs more than `tokens`.
    NotReached { tokens: f64 },
}

impl Crossing {
    pub fn status(&self) -> &'static str {
        match self {
            Crossing::Between { .. } => "interpolated",
            Crossing::BelowSmallest { .. } => "below the smallest budget",
            Crossing::NotReached { .. } => "not reached within the ladder",
        }
    }

    pub fn tokens(&self) -> f64 {
        match *self {
            Crossing::Between { tokens, .. }
            | Crossing::BelowSmallest { tokens }
            | Crossing::NotReached { tokens } => tokens,
        }
    }

    /// The clone's budget as JSON: a number, `{"at_most": b}` or `{"above": b}`.
    pub fn budget_json(&self) -> Value {
        match *self {
            Crossing::Between { tokens, .. } => json!(tokens),
            Crossing::BelowSmallest { tokens } => json!({ "at_most": tokens }),
            Crossing::NotReached { tokens } => json!({ "above": tokens }),
        }
    }

    /// The speedup `f(clone budget)` (decreasing in the budget), bounded as the crossing is.
    pub fn speedup(&self, f: impl Fn(f64) -> f64) -> Speedup {
        match *self {
            Crossing::Between { tokens, .. } => Speedup::Exact(f(tokens)),
            Crossing::BelowSmallest { tokens } => Speedup::AtLeast(f(tokens)),
            Crossing::NotReached { tokens } => Speedup::Below(f(tokens)),
        }
    }
}

/// A speedup, or the bound the ladder allows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speedup {
    Exact(f64),
    AtLeast(f64),
    Below(f64),
}

impl Speedup {
    /// A number, `{"at_least": x}` or `{"below": x}`.
    pub fn to_json(&self) -> Value {
        match *self {
            Speedup::Exact(x) => json!(x),
            Speedup::AtLeast(x) => json!({ "at_least": x }),
            Speedup::Below(x) => json!({ "below": x }),
        }
    }

    pub fn text(&self) -> String {
        match *self {
            Speedup::Exact(x) => format!("{x:.2}x"),
            Speedup::AtLeast(x) => format!(">= {x:.2}x"),
            Speedup::Below(x) => format!("< {x:.2}x"),
        }
    }

    pub fn exact(&self) -> Option<f64> {
        match *self {
            Speedup::Exact(x) => Some(x),
            _ => None,
        }
    }

    /// Known to be at least `x` (an exact value or a lower bound); None when the ladder
    /// cannot tell (a lower bound under `x`).
    pub fn at_least(&self, x: f64) -> Option<bool> {
        match *self {
            Speedup::Exact(v) => Some(v >= x),
            Speedup::AtLeast(v) => (v >= x).then_some(true),
            Speedup::Below(v) => (v <= x).then_some(false),
        }
    }
}

/// b* between (b_lo, L_lo) and (b_hi, L_hi), linear in log b, where the loss equals `target`.
pub fn log_interpolate(lo: (f64, f64), hi: (f64, f64), target: f64) -> f64 {
    let t = (lo.1 - target) / (lo.1 - hi.1);
    lo.0 * (hi.0 / lo.0).powf(t)
}

/// The crossing of `target` by (budget tokens, final loss) points in budget order; None
/// without points.
pub fn crossing(points: &[(f64, f64)], target: f64) -> Option<Crossing> {
    let first = points.first()?;
    if first.1 <= target {
        return Some(Crossing::BelowSmallest { tokens: first.0 });
    }
    Some(points.windows(2).find(|w| w[1].1 <= target).map_or(
        Crossing::NotReached {
            tokens: points[points.len() - 1].0,
        },
        |w| Crossing::Between {
            tokens: log_interpolate(w[0], w[1], target),
            lo: w[0].0,
            hi: w[1].0,
        },
    ))
}

/// The rungs (in ladder order) that bracket the crossing of `points` (one seed's finished
/// rungs, as (rung, final loss)): the two around it, or the end rung it lies past.
pub fn bracket(points: &[(u64, f64)], target: f64) -> Vec<u64> {
    let as_f: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, p.1)).collect();
    match crossing(&as_f, target) {
        None => Vec::new(),
        Some(Crossing::Between { lo, hi, .. }) => vec![lo as u64, hi as u64],
        Some(Crossing::BelowSmallest { tokens }) | Some(Crossing::NotReached { tokens }) => {
            vec![tokens as u64]
        }
    }
}

/// The next rung a seed must run so its own points bracket its crossing: the neighbour
/// past the end its crossing lies beyond, while the ladder has one; None once bracketed
/// (or the ladder is exhausted). `points` are that seed's finished rungs, contiguous in
/// the ladder.
pub fn next_rung(ladder: &[u64], points: &[(u64, f64)], target: f64) -> Option<u64> {
    let as_f: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, p.1)).collect();
    match crossing(&as_f, target)? {
        Crossing::Between { .. } => None,
        Crossing::BelowSmallest { .. } => {
            let first = points[0].0;
            ladder.iter().rev().find(|&&r| r < first).copied()
        }
        Crossing::NotReached { .. } => {
            let last = points[points.len() - 1].0;
            ladder.iter().find(|&&r| r > last).copied()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_is_linear_in_log_budget() {
        // 1M at 4.60, 4M at 4.40: 4.50 is halfway in log budget, i.e. at 2M.
        let b = log_interpolate((1e6, 4.60), (4e6, 4.40), 4.50);
        assert!((b - 2e6).abs() < 1e-6, "{b}");
        // A quarter of the way from 4.60 to 4.40 (4.55): 1M x 4^0.25 = 1.41421M.
        let b = log_interpolate((1e6, 4.60), (4e6, 4.40), 4.55);
        assert!((b - 1e6 * 2f64.sqrt()).abs() < 1e-6, "{b}");
        // At a run's own loss, that run's budget.
        assert_eq!(log_interpolate((1e6, 4.6), (2e6, 4.4), 4.4), 2e6);
    }

    #[test]
    fn the_crossing_and_its_bounds() {
        let pts = [(1e6, 4.8), (2e6, 4.6), (4e6, 4.4), (8e6, 4.3)];
        match crossing(&pts, 4.5).unwrap() {
            Crossing::Between { tokens, lo, hi } => {
                assert_eq!((lo, hi), (2e6, 4e6));
                assert!((tokens - 2e6 * 2f64.sqrt()).abs() < 1e-6);
            }
            c => panic!("{c:?}"),
        }
        assert_eq!(
            crossing(&pts, 4.9),
            Some(Crossing::BelowSmallest { tokens: 1e6 })
        );
        assert_eq!(
            crossing(&pts, 4.2),
            Some(Crossing::NotReached { tokens: 8e6 })
        );
        assert_eq!(crossing(&[], 4.2), None);
        // The first crossing counts when noise makes the losses non-monotone.
        let noisy = [(1e6, 4.8), (2e6, 4.45), (4e6, 4.55), (8e6, 4.3)];
        let c = crossing(&noisy, 4.5).unwrap();
        assert!(matches!(c, Crossing::Between { lo, hi, .. } if lo == 1e6 && hi == 2e6));
    }

    #[test]
    fn speedups_keep_the_bounds() {
        let r = 8e6;
        let c = crossing(&[(1e6, 4.8), (2e6, 4.6)], 4.7).unwrap();
        let s = c.speedup(|b| r / b);
        assert!((s.exact().unwrap() - 8e6 / (1e6 * 2f64.sqrt())).abs() < 1e-9);
        assert_eq!(
            Crossing::BelowSmallest { tokens: 1e6 }.speedup(|b| r / b),
            Speedup::AtLeast(8.0)
        );
        assert_eq!(
            Crossing::NotReached { tokens: 8e6 }.speedup(|b| r / b),
            Speedup::Below(1.0)
        );
        assert_eq!(Speedup::AtLeast(8.0).at_least(2.0), Some(true));
        assert_eq!(
            Speedup::AtLeast(1.5).at_least(2.0),
            None,
            "a bound under 2 says nothing"
        );
        assert_eq!(Speedup::Below(1.0).at_least(2.0), Some(false));
        assert_eq!(Speedup::Exact(1.9).at_least(2.0), Some(false));
        assert_eq!(Speedup::AtLeast(8.0).to_json(), json!({"at_least": 8.0}));
        assert_eq!(
            Crossing::NotReached { tokens: 8e6 }.budget_json(),
            json!({"above": 8e6})
        );
    }

    #[test]
    fn rungs_are_added_until_the_crossing_is_bracketed() {
        let ladder = [500, 1000, 2000, 4000];
        // Seed 0's bracket.
        let seed0 = [(500, 4.8), (1000, 4.6), (2000, 4.45), (4000, 4.35)];
        assert_eq!(bracket(&seed0, 4.5), vec![1000, 2000]);
        assert_eq!(bracket(&seed0, 4.9), vec![500]);
        assert_eq!(bracket(&seed0, 4.0), vec![4000]);
        // Another seed: both of seed 0's rungs still above its target, so the next rung up.
        let other = [(1000, 4.62), (2000, 4.52)];
        assert_eq!(next_rung(&ladder, &other, 4.50), Some(4000));
        // Both below: the next rung down; at the ladder's ends there is nothing to add.
        assert_eq!(next_rung(&ladder, &other, 4.70), Some(500));
        assert_eq!(next_rung(&ladder, &[(500, 4.6)], 4.7), None);
        assert_eq!(next_rung(&ladder, &[(4000, 4.6)], 4.5), None);
        assert_eq!(next_rung(&ladder, &other, 4.55), None, "bracketed");
    }
}
