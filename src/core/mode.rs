//! The mode decision: what a predict request asks for, decided once for every protocol.
//!
//! Each front end maps its own syntax (the native query string, OIP request parameters,
//! gRPC's `InferParameter`) onto [`ModeParams`] without judging it. [`decide`] turns those
//! into a [`Mode`], or refuses the request; a refusal whose parameters contradict their
//! mode carries the reason label that `mcd_mode_violations_total` counts.

use crate::engine::model::McSamples;
use crate::engine::statistics::{Requested, StatSet, Statistic};
use crate::error::Error;

/// A parameter value as a protocol carried it.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// Text: a query-string value, or an OIP/gRPC string parameter.
    Str(String),
    Int(i64),
    Uint(u64),
    /// A JSON number with a fraction or exponent, or gRPC's `double_param`
    /// (tritonclient sends Python floats so).
    Double(f64),
    Bool(bool),
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::Str(s) => write!(f, "'{s}'"),
            Param::Int(v) => write!(f, "{v}"),
            Param::Uint(v) => write!(f, "{v}"),
            Param::Double(v) => write!(f, "{v}"),
            Param::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// The names of the mode parameters, the same on every protocol.
pub const MC_SAMPLES: &str = "mc_samples";
pub const SEED: &str = "seed";
pub const RETURN_SAMPLES: &str = "return_samples";
/// With `mc_samples=auto`: the most samples to draw, and the standard error to stop at.
pub const MC_MAX: &str = "mc_max";
pub const MC_SE: &str = "mc_se";
/// The statistics an MC answer returns, comma-separated (see [`crate::engine::statistics`]).
pub const STATISTICS: &str = "statistics";
pub const MODE_PARAMS: [&str; 6] = [MC_SAMPLES, SEED, RETURN_SAMPLES, MC_MAX, MC_SE, STATISTICS];
/// The `mc_samples` value that asks for an adaptive count.
pub const AUTO: &str = "auto";
/// The standard error `mc_samples=auto` stops at unless `mc_se` says otherwise.
pub const DEFAULT_MC_SE: f64 = 0.01;

/// The mode parameters of one request, as its front end found them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModeParams {
    pub mc_samples: Option<Param>,
    pub seed: Option<Param>,
    pub return_samples: Option<Param>,
    pub mc_max: Option<Param>,
    pub mc_se: Option<Param>,
    pub statistics: Option<Param>,
    /// The outputs an OIP request names (`outputs`): the statistics it wants are among them.
    pub outputs: Option<Vec<String>>,
}

impl ModeParams {
    /// Sets one parameter by name. Unknown names and repeats are refused here, so every
    /// front end words them the same way; `where_` names the place ("query parameter",
    /// "request parameter").
    pub fn set(&mut self, name: &str, value: Param, where_: &str) -> Result<(), Error> {
        let slot = match name {
            MC_SAMPLES => &mut self.mc_samples,
            SEED => &mut self.seed,
            RETURN_SAMPLES => &mut self.return_samples,
            MC_MAX => &mut self.mc_max,
            MC_SE => &mut self.mc_se,
            STATISTICS => &mut self.statistics,
            other => {
                return Err(Error::InvalidParameter(format!(
                    "unknown {where_} '{other}'; the known ones are mc_samples, seed, return_samples, mc_max, mc_se \
                     and statistics"
                )));
            }
        };
        if slot.replace(value).is_some() {
            return Err(Error::InvalidParameter(format!("{where_} '{name}' is given twice")));
        }
        Ok(())
    }

    /// The mode the request asked for, whether or not its parameters are valid: what the
    /// answer's mode header and the metrics' `mode` label report.
    pub fn label(&self) -> ModeLabel {
        if self.mc_samples.is_some() {
            ModeLabel::McDropout
        } else {
            ModeLabel::Eval
        }
    }
}

/// The mode a request asked for, from the names of the parameters it sent, for a request
/// refused before they could all be read: naming `mc_samples` is asking for MC, whatever
/// its value. (Once read, [`ModeParams::label`] says the same.)
pub fn asked_for<'a>(mut names: impl Iterator<Item = &'a String>) -> ModeLabel {
    if names.any(|n| n == MC_SAMPLES) {
        ModeLabel::McDropout
    } else {
        ModeLabel::Eval
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeLabel {
    Eval,
    McDropout,
}

impl ModeLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            ModeLabel::Eval => "eval",
            ModeLabel::McDropout => "mc_dropout",
        }
    }
}

/// How many samples an MC request draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum McCount {
    Fixed(McSamples),
    /// Draw in chunks until every output element's std/√n is at most `se`, or `max`.
    Auto {
        max: McSamples,
        se: f64,
    },
}

impl McCount {
    /// The most samples the request may draw: its admission cost per row.
    pub fn bound(self) -> usize {
        match self {
            McCount::Fixed(n) | McCount::Auto { max: n, .. } => n.get(),
        }
    }
}

/// An MC request, valid by construction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McRequest {
    pub samples: McCount,
    pub seed: u64,
    /// Whether any output returns its samples: `return_samples=true`, and on OIP with
    /// `outputs`, a `.samples` output named.
    pub return_samples: bool,
    /// The statistics asked for.
    pub requested: Requested,
}

/// What a predict request asked for, once its parameters are validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Eval,
    McDropout(McRequest),
}

impl Mode {
    pub fn label(&self) -> ModeLabel {
        match self {
            Mode::Eval => ModeLabel::Eval,
            Mode::McDropout(_) => ModeLabel::McDropout,
        }
    }
}

/// Every `reason` label of `mcd_mode_violations_total`.
pub const VIOLATION_REASONS: [&str; 3] = ["seed_without_mc", "return_samples_without_mc", "mc_unavailable"];

/// A refused request. `violation` is the reason label when its parameters contradict its
/// mode (counted in `mcd_mode_violations_total`), None for a plain invalid parameter.
#[derive(Debug)]
pub struct Refusal {
    pub violation: Option<&'static str>,
    pub error: Error,
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Refusal { violation: None, error }
    }
}

/// Decides the mode. A request without `mc_samples` is eval; `seed` or `return_samples`
/// without it contradicts that mode and is refused, never quietly ignored.
pub fn decide(params: &ModeParams, max_samples: usize) -> Result<Mode, Refusal> {
    let Some(n) = &params.mc_samples else {
        if params.seed.is_some() {
            return Err(Refusal {
                violation: Some("seed_without_mc"),
                error: Error::ModeMismatch(
                    "'seed' only applies to MC dropout: add mc_samples=N, or drop seed for an eval answer".into(),
                ),
            });
        }
        if params.return_samples.is_some() {
            return Err(Refusal {
                violation: Some("return_samples_without_mc"),
                error: Error::ModeMismatch("'return_samples' only applies to MC dropout: add mc_samples=N".into()),
            });
        }
        if params.mc_max.is_some() || params.mc_se.is_some() {
            return Err(Error::InvalidParameter("'mc_max' and 'mc_se' only apply with mc_samples=auto".into()).into());
        }
        if params.statistics.is_some() {
            return Err(Error::ModeMismatch(
                "'statistics' only applies to MC dropout: add mc_samples=N (an eval answer is the outputs themselves)"
                    .into(),
            )
            .into());
        }
        return Ok(Mode::Eval);
    };
    let count = |n: &Param, name: &str| {
        let bad = || Error::InvalidParameter(format!("{name} must be an integer in [2, {max_samples}], got {n}"));
        let v = integer(n).ok_or_else(bad)?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= max_samples)
            .and_then(McSamples::new)
            .ok_or_else(bad)
    };
    let samples = if matches!(n, Param::Str(s) if s.trim() == AUTO) {
        let max = match &params.mc_max {
            None => McSamples::new(max_samples).ok_or_else(|| {
                Error::InvalidParameter(format!("the server's --max-mc-samples ({max_samples}) is below 2"))
            })?,
            Some(m) => count(m, MC_MAX)?,
        };
        let se = match &params.mc_se {
            None => DEFAULT_MC_SE,
            Some(v) => number(v)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| Error::InvalidParameter(format!("mc_se must be a positive number, got {v}")))?,
        };
        McCount::Auto { max, se }
    } else {
        if params.mc_max.is_some() || params.mc_se.is_some() {
            return Err(Error::InvalidParameter("'mc_max' and 'mc_se' only apply with mc_samples=auto".into()).into());
        }
        McCount::Fixed(count(n, MC_SAMPLES).map_err(|_| {
            Error::InvalidParameter(format!(
                "mc_samples must be an integer in [2, {max_samples}] or 'auto', got {n}"
            ))
        })?)
    };
    let seed = match &params.seed {
        // Drawn seeds stay below 2^53, so JavaScript clients read them exactly.
        None => rand::random::<u64>() >> 11,
        Some(s) => integer(s)
            .ok_or_else(|| Error::InvalidParameter(format!("seed must be an unsigned 64-bit integer, got {s}")))?,
    };
    let return_samples = match &params.return_samples {
        None => false,
        Some(v) => boolean(v)
            .ok_or_else(|| Error::InvalidParameter(format!("return_samples must be true or false, got {v}")))?,
    };
    let requested = match (&params.statistics, &params.outputs) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidParameter(
                "give either the 'statistics' parameter or 'outputs', not both: the outputs named are what comes back"
                    .into(),
            )
            .into());
        }
        (Some(list), None) => Requested::Every(statistics_list(list)?),
        (None, Some(names)) => Requested::Union(named_statistics(names)),
        (None, None) => Requested::Defaults,
    };
    let return_samples = return_samples && !matches!(requested, Requested::Union(s) if !s.has(Statistic::Samples));
    Ok(Mode::McDropout(McRequest {
        samples,
        seed,
        return_samples,
        requested,
    }))
}

/// The native `statistics` list: known names, at least one; samples come with
/// `return_samples`, not here.
fn statistics_list(list: &Param) -> Result<StatSet, Error> {
    let Param::Str(text) = list else {
        return Err(Error::InvalidParameter(format!(
            "statistics must be a comma-separated list of names, got {list}"
        )));
    };
    let known = || {
        Statistic::ALL
            .iter()
            .filter(|s| **s != Statistic::Samples)
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut set = StatSet::EMPTY;
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match Statistic::named(name) {
            Some(Statistic::Samples) => {
                return Err(Error::InvalidParameter(
                    "samples come back with return_samples=true, not through 'statistics'".into(),
                ));
            }
            Some(s) => set = set.with(s),
            None => {
                return Err(Error::InvalidParameter(format!(
                    "statistics: unknown statistic '{name}'; the known ones are {}",
                    known()
                )));
            }
        }
    }
    if set.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "statistics names none; the known ones are {}",
            known()
        )));
    }
    Ok(set)
}

/// The statistics among OIP output names: `y` is the mean, `y.variance` the variance,
/// `y.summary.<score>` the summary, `y.samples` the samples. Calibration outputs (`y.set_…`,
/// `y.interval_…`, `y.refer`) are always computed. Names no answer has are refused later,
/// when the outputs are selected, with the model's list.
fn named_statistics(names: &[String]) -> StatSet {
    let mut set = StatSet::EMPTY;
    for name in names {
        let (_, last) = name.rsplit_once('.').unwrap_or(("", name));
        let stat = if name.contains(".summary.") {
            Some(Statistic::Summary)
        } else if name.contains(".interval_") || name.contains(".set_") || last == "refer" {
            None
        } else {
            match Statistic::named(last) {
                Some(Statistic::Mean | Statistic::Summary) | None => Some(Statistic::Mean),
                other => other,
            }
        };
        if let Some(s) = stat {
            set = set.with(s);
        }
    }
    set
}

/// A non-negative integer: an integer type, a double with an integral value (tritonclient
/// sends Python floats as doubles), or text that parses as one.
fn integer(p: &Param) -> Option<u64> {
    match p {
        Param::Uint(v) => Some(*v),
        Param::Int(v) => u64::try_from(*v).ok(),
        // 2^64 itself is not a u64; below it every integral double converts exactly.
        Param::Double(v) if v.fract() == 0.0 && *v >= 0.0 && *v < 18_446_744_073_709_551_616.0 => Some(*v as u64),
        Param::Str(s) => s.trim().parse().ok(),
        Param::Double(_) | Param::Bool(_) => None,
    }
}

/// A finite or infinite float from any protocol's spelling of a number.
fn number(p: &Param) -> Option<f64> {
    match p {
        Param::Double(v) => Some(*v),
        Param::Int(v) => Some(*v as f64),
        Param::Uint(v) => Some(*v as f64),
        Param::Str(s) => s.trim().parse().ok(),
        Param::Bool(_) => None,
    }
}

fn boolean(p: &Param) -> Option<bool> {
    match p {
        Param::Bool(b) => Some(*b),
        Param::Str(s) => match s.as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Param::Int(_) | Param::Uint(_) | Param::Double(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, Param)]) -> ModeParams {
        let mut p = ModeParams::default();
        for (k, v) in pairs {
            p.set(k, v.clone(), "parameter").unwrap();
        }
        p
    }

    #[test]
    fn modes_follow_mc_samples() {
        assert_eq!(decide(&ModeParams::default(), 10).unwrap(), Mode::Eval);
        let p = params(&[
            (MC_SAMPLES, Param::Str("5".into())),
            (SEED, Param::Str("9".into())),
            (RETURN_SAMPLES, Param::Str("true".into())),
        ]);
        let Mode::McDropout(mc) = decide(&p, 10).unwrap() else {
            panic!()
        };
        assert_eq!(
            (mc.samples, mc.seed, mc.return_samples),
            (McCount::Fixed(McSamples::new(5).unwrap()), 9, true)
        );
        let v = decide(&params(&[(SEED, Param::Int(1))]), 10).unwrap_err();
        assert_eq!(v.violation, Some("seed_without_mc"));
        let v = decide(&params(&[(RETURN_SAMPLES, Param::Bool(false))]), 10).unwrap_err();
        assert_eq!(v.violation, Some("return_samples_without_mc"));
        let v = decide(&params(&[(MC_SAMPLES, Param::Int(11))]), 10).unwrap_err();
        assert!(v.violation.is_none() && matches!(v.error, Error::InvalidParameter(_)));
    }

    #[test]
    fn every_protocol_spelling_of_a_count_is_read_alike() {
        for p in [
            Param::Str("50".into()),
            Param::Int(50),
            Param::Uint(50),
            Param::Double(50.0),
        ] {
            let Mode::McDropout(mc) = decide(&params(&[(MC_SAMPLES, p.clone())]), 100).unwrap() else {
                panic!("{p}")
            };
            assert_eq!(mc.samples.bound(), 50, "{p}");
        }
        for p in [
            Param::Double(50.5),
            Param::Int(-3),
            Param::Bool(true),
            Param::Str("5x".into()),
        ] {
            assert!(decide(&params(&[(MC_SAMPLES, p.clone())]), 100).is_err(), "{p}");
        }
        // The whole u64 range of seeds is kept, not truncated.
        let p = params(&[(MC_SAMPLES, Param::Int(2)), (SEED, Param::Uint(u64::MAX))]);
        let Mode::McDropout(mc) = decide(&p, 100).unwrap() else {
            panic!()
        };
        assert_eq!(mc.seed, u64::MAX);
    }

    #[test]
    fn auto_takes_its_criterion_and_refuses_it_elsewhere() {
        let auto = |pairs: &[(&str, Param)]| decide(&params(pairs), 100);
        let Mode::McDropout(mc) = auto(&[(MC_SAMPLES, Param::Str("auto".into()))]).unwrap() else {
            panic!()
        };
        assert_eq!(
            mc.samples,
            McCount::Auto {
                max: McSamples::new(100).unwrap(),
                se: DEFAULT_MC_SE
            }
        );
        let Mode::McDropout(mc) = auto(&[
            (MC_SAMPLES, Param::Str("auto".into())),
            (MC_MAX, Param::Uint(40)),
            (MC_SE, Param::Str("0.5".into())),
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            mc.samples,
            McCount::Auto {
                max: McSamples::new(40).unwrap(),
                se: 0.5
            }
        );
        assert_eq!(mc.samples.bound(), 40);
        for bad in [
            vec![(MC_SAMPLES, Param::Str("auto".into())), (MC_MAX, Param::Int(101))],
            vec![(MC_SAMPLES, Param::Str("auto".into())), (MC_SE, Param::Double(0.0))],
            vec![
                (MC_SAMPLES, Param::Str("auto".into())),
                (MC_SE, Param::Str("nan".into())),
            ],
            vec![(MC_SAMPLES, Param::Int(10)), (MC_SE, Param::Double(0.1))],
            vec![(MC_MAX, Param::Int(10))],
        ] {
            let e = auto(&bad).unwrap_err();
            assert!(matches!(e.error, Error::InvalidParameter(_)), "{bad:?}: {:?}", e.error);
        }
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        let mut p = ModeParams::default();
        assert!(p.set("mc_sample", Param::Int(5), "query parameter").is_err());
        p.set(SEED, Param::Int(5), "query parameter").unwrap();
        let e = p.set(SEED, Param::Int(6), "query parameter").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use axum::http::StatusCode;
    use proptest::prelude::*;

    fn any_param() -> impl Strategy<Value = Param> {
        prop_oneof![
            ".{0,8}".prop_map(Param::Str),
            "[0-9 +-]{0,22}".prop_map(Param::Str),
            any::<i64>().prop_map(Param::Int),
            any::<u64>().prop_map(Param::Uint),
            any::<f64>().prop_map(Param::Double),
            any::<bool>().prop_map(Param::Bool),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any parameters: a mode, or a 422 refusal; a violation label only for a
        /// parameter that needs MC sent without mc_samples.
        #[test]
        fn any_parameters_decide_or_refuse_with_422(
            n in prop::option::of(any_param()),
            seed in prop::option::of(any_param()),
            samples in prop::option::of(any_param()),
            max in 2usize..2000,
        ) {
            let p = ModeParams { mc_samples: n.clone(), seed: seed.clone(), return_samples: samples.clone(), ..Default::default() };
            match decide(&p, max) {
                Ok(Mode::Eval) => prop_assert!(n.is_none() && seed.is_none() && samples.is_none()),
                Ok(Mode::McDropout(mc)) => {
                    prop_assert!(n.is_some());
                    prop_assert!((2..=max).contains(&mc.samples.bound()));
                }
                Err(r) => {
                    prop_assert_eq!(r.error.status(), StatusCode::UNPROCESSABLE_ENTITY, "{}", r.error);
                    prop_assert_eq!(r.violation.is_some(), n.is_none());
                }
            }
        }

        /// A count in range, in every spelling a protocol uses, is that count; outside the
        /// range it is an invalid parameter.
        #[test]
        fn counts_round_trip_in_every_spelling(k in 0u64..5000, seed in any::<u64>(), max in 2usize..2000) {
            for p in [Param::Str(k.to_string()), Param::Uint(k), Param::Int(k as i64), Param::Double(k as f64)] {
                let params = ModeParams { mc_samples: Some(p), seed: Some(Param::Str(seed.to_string())), ..Default::default() };
                match decide(&params, max) {
                    Ok(Mode::McDropout(mc)) => {
                        prop_assert!((2..=max as u64).contains(&k));
                        prop_assert_eq!((mc.samples, mc.seed), (McCount::Fixed(McSamples::new(k as usize).unwrap()), seed));
                    }
                    Ok(Mode::Eval) => prop_assert!(false, "eval with mc_samples"),
                    Err(r) => {
                        prop_assert!(!(2..=max as u64).contains(&k));
                        prop_assert!(matches!(r.error, Error::InvalidParameter(_)), "{}", r.error);
                    }
                }
            }
        }
    }
}
