//! Which schedule runs the packed f32 products (packed_linear.rs) on this CPU.
//!
//! Every schedule gives the same bits: each output element is one fused multiply-add chain
//! over the input columns in order (a test holds them to gemm's kernel bit for bit); they
//! differ only in what stays in which cache, and which is fastest depends on the CPU. On AMD
//! Zen 4 (half-rate AVX-512, 1 MiB L2) gemm's own schedule is as fast as any; on an Intel
//! core with two full-width FMA units the weight panel streamed from L2 for every 6 tokens
//! (about 21 bytes per cycle) may be the limit, which the column-blocked and half-panel
//! schedules cut. So rather than guess, a load for inference times the candidates on this
//! CPU, for each input width its packed weights have, and keeps the fastest (the default,
//! gemm's, unless another is clearly faster). The choice can change speed only, never a
//! result. `HYPERCLONE_PACKED_SCHEDULE` fixes one instead:
//!   auto            (the default) timed at load, as above
//!   gemm            gemm's microkernel, 64 rows x 6 tokens, all input columns at once
//!   own             f32_kernel's, the same shape (to time the kernel itself)
//!   kblock:KC       f32_kernel's, input columns in blocks of KC: a block's slice of the
//!                   panel (64 x KC floats) stays in L1 while the task's tokens pass over it
//!   half, half:KC   f32_kernel's on half panels, 32 rows x 12 tokens (half the weight
//!                   stream per multiply-add, twice the activation broadcasts), all columns
//!                   at once or in blocks of KC

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Schedule {
    Gemm,
    Own { half: bool, kc: Option<usize> },
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Schedule::Gemm => write!(f, "gemm"),
            Schedule::Own { half, kc } => match (half, kc) {
                (false, None) => write!(f, "own"),
                (false, Some(kc)) => write!(f, "kblock:{kc}"),
                (true, None) => write!(f, "half"),
                (true, Some(kc)) => write!(f, "half:{kc}"),
            },
        }
    }
}

/// What `HYPERCLONE_PACKED_SCHEDULE` asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Request {
    /// Time the candidates at load (the default).
    Auto,
    Fixed(Schedule),
}

pub(crate) const VAR: &str = "HYPERCLONE_PACKED_SCHEDULE";

impl Request {
    pub(crate) fn parse(s: &str) -> Result<Request, String> {
        let kc = |v: &str| match v.parse::<usize>() {
            Ok(kc) if kc > 0 => Ok(Some(kc)),
            _ => Err(format!("{VAR}={s}: KC must be a whole number above 0")),
        };
        let own = |half, kc| Ok(Request::Fixed(Schedule::Own { half, kc }));
        match s.split_once(':') {
            None if s == "auto" || s.is_empty() => Ok(Request::Auto),
            None if s == "gemm" => Ok(Request::Fixed(Schedule::Gemm)),
            None if s == "own" => own(false, None),
            None if s == "half" => own(true, None),
            Some(("kblock", v)) => own(false, kc(v)?),
            Some(("half", v)) => own(true, kc(v)?),
            _ => Err(format!(
                "{VAR}={s}: expected auto, gemm, own, kblock:KC, half or half:KC"
            )),
        }
    }
}

/// Whether this CPU runs f32_kernel's kernels (AVX-512F), which every schedule but gemm's
/// needs.
fn own() -> bool {
    crate::f32_kernel::kernels().is_some()
}

/// The request in `HYPERCLONE_PACKED_SCHEDULE` (read once), or why it names none.
pub(crate) fn requested() -> Result<Request, String> {
    static REQUEST: OnceLock<Result<Request, String>> = OnceLock::new();
    REQUEST
        .get_or_init(|| {
            let r = match std::env::var(VAR) {
                Ok(v) => Request::parse(v.trim())?,
                Err(_) => Request::Auto,
            };
            match r {
                Request::Fixed(s) if s != Schedule::Gemm && !own() => {
                    Err(format!("{VAR}={s}: needs a CPU with AVX-512F"))
                }
                r => Ok(r),
            }
        })
        .clone()
}

/// The candidates timed at load: the default first, then column blocks whose panel slice
/// (64 x KC floats) is 16 and 32 KiB, for L1 caches of 32-48 KiB, the half panels, and our
/// kernel in gemm's shape (the same work in other instructions).
pub(crate) const CANDIDATES: [Schedule; 5] = [
    Schedule::Gemm,
    Schedule::Own {
        half: false,
        kc: Some(64),
    },
    Schedule::Own {
        half: false,
        kc: Some(128),
    },
    Schedule::Own {
        half: true,
        kc: None,
    },
    Schedule::Own {
        half: false,
        kc: None,
    },
];

/// Timed rounds (after one untimed run of each candidate). Each round runs every
/// candidate once, starting at a different one each round, so neither a slow moment of the
/// machine nor the position in the round favors one.
pub(crate) const ROUNDS: usize = 5;

/// Another candidate replaces the default only when its median time, as a fraction of the
/// default's in the same round, is at least this much below 1: on a shared virtual machine
/// single timings of equal schedules differ by up to ~10%, and a smaller gain is not worth
/// the risk of a wrong pick (half panels are 3-9% slower in whole forwards on Zen 4).
const MARGIN: f64 = 0.08;

/// What the timing found for one input width.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// The input width (columns of the weights, features of the activations).
    pub inputs: usize,
    pub chosen: String,
    /// Each candidate's best seconds over the rounds, in candidate order.
    pub seconds: Vec<(String, f64)>,
    /// Each candidate's median over the rounds of its time / the default's in that round.
    pub ratios: Vec<(String, f64)>,
}

/// The schedule per input width chosen so far in this process.
fn tuned() -> &'static Mutex<BTreeMap<usize, (Schedule, Tuning)>> {
    static TUNED: OnceLock<Mutex<BTreeMap<usize, (Schedule, Tuning)>>> = OnceLock::new();
    TUNED.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Picks from each candidate's median ratio to the default (the first, ratio 1): the
/// lowest, when it is below 1 - [`MARGIN`]; the default otherwise.
fn pick(ratios: &[(Schedule, f64)]) -> Schedule {
    let Some(&(default, _)) = ratios.first() else {
        return Schedule::Gemm;
    };
    match ratios.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) {
        Some((fastest, r)) if r < 1.0 - MARGIN => fastest,
        _ => default,
    }
}

/// Times the candidates with `run` (one product of the given width, returning its seconds)
/// unless this width was timed before, and records the choice.
pub(crate) fn tune(inputs: usize, mut run: impl FnMut(Schedule) -> f64) {
    if tuned().lock().map_or(true, |t| t.contains_key(&inputs)) {
        return;
    }
    let n = CANDIDATES.len();
    for s in CANDIDATES {
        run(s);
    }
    // times[round][candidate]
    let times: Vec<Vec<f64>> = (0..ROUNDS)
        .map(|round| {
            let mut row = vec![0.0; n];
            for i in 0..n {
                let c = (round + i) % n;
                row[c] = run(CANDIDATES[c]);
            }
            row
        })
        .collect();
    let column = |c: usize| times.iter().map(move |row| row[c]);
    let ratios: Vec<(Schedule, f64)> = (0..n)
        .map(|c| {
            let r = median(times.iter().map(|row| row[c] / row[0]).collect());
            (CANDIDATES[c], r)
        })
        .collect();
    let chosen = pick(&ratios);
    let tuning = Tuning {
        inputs,
        chosen: chosen.to_string(),
        seconds: (0..n)
            .map(|c| {
                (
                    CANDIDATES[c].to_string(),
                    column(c).fold(f64::INFINITY, f64::min),
                )
            })
            .collect(),
        ratios: ratios.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
    };
    if let Ok(mut t) = tuned().lock() {
        t.entry(inputs).or_insert((chosen, tuning));
    }
}

/// The schedule for products of this input width: the fixed one when asked, else the one
/// timed at load (gemm's where none was).
pub(crate) fn for_width(inputs: usize) -> candle_core::Result<Schedule> {
    match requested().map_err(candle_core::Error::Msg)? {
        Request::Fixed(s) => Ok(s),
        Request::Auto if !own() => Ok(Schedule::Gemm),
        Request::Auto => Ok(tuned()
            .lock()
            .ok()
            .and_then(|t| t.get(&inputs).map(|(s, _)| *s))
            .unwrap_or(Schedule::Gemm)),
    }
}

/// Whether loads time the candidates: on AVX-512F (the other kernels have one schedule)
/// where `HYPERCLONE_PACKED_SCHEDULE` fixes none.
pub(crate) fn timing_wanted() -> bool {
    own() && requested() == Ok(Request::Auto)
}

/// Every timing made in this process, by input width (none where a schedule was fixed or
/// the CPU has no AVX-512F).
pub fn tunings() -> Vec<Tuning> {
    tuned()
        .lock()
        .map(|t| t.values().map(|(_, tuning)| tuning.clone()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_name_the_choices() {
        let own = |half, kc| Ok(Request::Fixed(Schedule::Own { half, kc }));
        assert_eq!(Request::parse("auto"), Ok(Request::Auto));
        assert_eq!(Request::parse(""), Ok(Request::Auto));
        assert_eq!(Request::parse("gemm"), Ok(Request::Fixed(Schedule::Gemm)));
        assert_eq!(Request::parse("own"), own(false, None));
        assert_eq!(Request::parse("kblock:128"), own(false, Some(128)));
        assert_eq!(Request::parse("half"), own(true, None));
        assert_eq!(Request::parse("half:64"), own(true, Some(64)));
        for bad in [
            "kblock", "kblock:0", "kblock:x", "half:-1", "fast", "gemm:3", "auto:2",
        ] {
            let e = Request::parse(bad).unwrap_err();
            assert!(e.starts_with(&format!("{VAR}={bad}: ")), "{e}");
        }
        // Each schedule's name parses back to it.
        for s in CANDIDATES {
            assert_eq!(Request::parse(&s.to_string()), Ok(Request::Fixed(s)));
        }
    }

    #[test]
    fn the_default_stays_unless_another_is_clearly_faster() {
        let [gemm, k64, k128, half, _own] = CANDIDATES;
        assert_eq!(pick(&[(gemm, 1.0), (k64, 0.95), (k128, 1.2)]), gemm);
        assert_eq!(pick(&[(gemm, 1.0), (k64, 0.91), (k128, 0.85)]), k128);
        assert_eq!(pick(&[(gemm, 1.0), (half, 1.5)]), gemm);
        assert_eq!(pick(&[]), gemm);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// The untimed first runs do not count, each width is timed once, the choice is what
    /// `for_width` returns under `auto`, and a slow moment of the default in one round does
    /// not make another look faster (the median of the paired ratios decides).
    #[test]
    fn tuning_records_one_choice_per_width() {
        let (a, b) = (1_000_003, 1_000_033); // widths no other test loads
        let k128 = CANDIDATES[2];
        let mut calls = Vec::new();
        // Width a: the untimed runs favor gemm; then k128 takes half the time.
        tune(a, |s| {
            calls.push(s);
            match (calls.len() <= CANDIDATES.len(), s == k128) {
                (true, _) => (s != Schedule::Gemm) as u8 as f64,
                (false, true) => 0.5,
                (false, false) => 1.0,
            }
        });
        assert_eq!(calls.len(), CANDIDATES.len() * (ROUNDS + 1));
        assert_eq!(&calls[..CANDIDATES.len()], &CANDIDATES);
        // Each round starts one candidate further.
        assert_eq!(calls[CANDIDATES.len() * 2], CANDIDATES[1]);
        tune(a, |_| panic!("timed twice"));
        // Width b: all equal, but gemm's first timed run is 10x slow.
        let mut n = 0;
        tune(b, |s| {
            n += 1;
            if n == CANDIDATES.len() + 1 {
                assert_eq!(s, Schedule::Gemm);
                10.0
            } else {
                1.0
            }
        });
        let found = |w| tunings().into_iter().find(|t| t.inputs == w).unwrap();
        let (ta, tb) = (found(a), found(b));
        assert_eq!(ta.chosen, "kblock:128");
        assert_eq!(ta.seconds[2], ("kblock:128".to_string(), 0.5));
        assert_eq!(ta.ratios[2], ("kblock:128".to_string(), 0.5));
        assert_eq!(ta.ratios[0], ("gemm".to_string(), 1.0));
        assert_eq!(tb.chosen, "gemm");
        assert!(tb.ratios.iter().all(|(_, r)| *r == 1.0), "{tb:?}");
        if requested() == Ok(Request::Auto) {
            // Without AVX-512F the timing is not used: gemm's kernels have no other schedule.
            let want_a = if own() { k128 } else { Schedule::Gemm };
            assert_eq!(for_width(a).unwrap(), want_a);
            assert_eq!(for_width(b).unwrap(), Schedule::Gemm);
        }
    }
}
