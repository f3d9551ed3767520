//! The drift reference: per output and monitored statistic, its values on rows the model
//! was not trained on. `core::drift` tests served rows against it.
//!
//! It comes from one of two files, both written by `mcd-serve calibrate`:
//! - the calibration file (`drift_reference`, `drift_reference_eval`), made from labelled
//!   rows: the reference of the very rows the conformal guarantees were fitted on, so the
//!   test asks whether served rows are still exchangeable with them;
//! - `<stem>.drift-reference.json`, made from unlabelled rows, for a model without a
//!   calibration (or with one made before drift references existed).
//!
//! A model with a reference in both is refused: which one the server tests against must
//! never be a guess.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::conformal::{ModelCalibration, made_for};

pub const FORMAT: &str = "mcd-serve-drift-reference/1";

/// Per output, per statistic name, its value on each reference row.
pub type Samples = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

/// `<stem>.drift-reference.json` beside `<stem>.onnx`.
pub fn reference_path(model_path: &Path) -> PathBuf {
    model_path.with_extension("drift-reference.json")
}

/// The statistics a monitor can test, as references and reports name them. Which answers
/// can give which is `core::drift`'s business; the names are fixed here so that a file
/// naming anything else is refused at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    /// MC: predictive entropy of the mean probabilities, per row.
    PredictiveEntropy,
    /// MC: mutual information (epistemic part), per row.
    MutualInformation,
    /// MC: the largest mean probability; eval: the largest probability.
    TopClassProbability,
    /// MC, regression: one element's mean (None: the row has one element).
    Mean(Option<usize>),
    /// MC, regression: one element's std.
    Std(Option<usize>),
    /// Eval, regression: one element's value.
    Value(Option<usize>),
}

impl Statistic {
    pub fn name(&self) -> String {
        let indexed = |n: &str, c: &Option<usize>| match c {
            None => n.to_string(),
            Some(c) => format!("{n}[{c}]"),
        };
        match self {
            Statistic::PredictiveEntropy => "predictive_entropy".into(),
            Statistic::MutualInformation => "mutual_information".into(),
            Statistic::TopClassProbability => "top_class_probability".into(),
            Statistic::Mean(c) => indexed("mean", c),
            Statistic::Std(c) => indexed("std", c),
            Statistic::Value(c) => indexed("value", c),
        }
    }

    pub fn parse(name: &str) -> Option<Statistic> {
        let indexed = |base: &str| -> Option<Option<usize>> {
            let rest = name.strip_prefix(base)?;
            if rest.is_empty() {
                return Some(None);
            }
            let c = rest.strip_prefix('[')?.strip_suffix(']')?;
            if c.is_empty() || !c.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            c.parse().ok().map(Some)
        };
        match name {
            "predictive_entropy" => return Some(Statistic::PredictiveEntropy),
            "mutual_information" => return Some(Statistic::MutualInformation),
            "top_class_probability" => return Some(Statistic::TopClassProbability),
            _ => {}
        }
        if let Some(c) = indexed("mean") {
            return Some(Statistic::Mean(c));
        }
        if let Some(c) = indexed("std") {
            return Some(Statistic::Std(c));
        }
        indexed("value").map(Statistic::Value)
    }

    /// Whether eval answers (true) or MC answers (false) give it.
    pub fn of_eval(&self) -> bool {
        matches!(self, Statistic::TopClassProbability | Statistic::Value(_))
    }

    pub fn of_mc(&self) -> bool {
        !matches!(self, Statistic::Value(_))
    }
}

/// `<stem>.drift-reference.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceFile {
    pub format: String,
    pub model_file: String,
    pub model_sha256: String,
    /// UTC, RFC 3339.
    pub created: String,
    pub n: usize,
    pub mc_samples: usize,
    /// Row i of the data file ran with seed `seed + i`.
    pub seed: u64,
    /// Of MC answers (`mc_samples` samples).
    pub drift_reference: Samples,
    /// Of eval answers.
    #[serde(default)]
    pub drift_reference_eval: Samples,
}

/// A model's checked reference, wherever it came from.
#[derive(Debug, Clone)]
pub struct DriftReference {
    /// The file it was read from (its name only).
    pub file: String,
    /// When it was made (UTC, RFC 3339).
    pub created: String,
    /// The MC samples per row of the MC reference: served rows with another count have
    /// other statistics.
    pub mc_samples: usize,
    /// Rows it was made from.
    pub n: usize,
    pub mc: Samples,
    pub eval: Samples,
}

/// The model's drift reference, if it has one: from its calibration, or else from its
/// reference file, which is checked as a calibration is (made for this very file, names
/// only outputs and statistics the model has, finite values, one per row).
pub fn load(
    model_file: &Path,
    calibration: Option<&ModelCalibration>,
    outputs: &[&str],
) -> Result<Option<DriftReference>, String> {
    let path = reference_path(model_file);
    let from_calibration = calibration
        .filter(|c| !c.file.drift_reference.is_empty() || !c.file.drift_reference_eval.is_empty())
        .map(|c| DriftReference {
            file: file_name(&c.path),
            created: c.file.created.clone(),
            mc_samples: c.file.mc_samples,
            n: c.file.n,
            mc: c.file.drift_reference.clone(),
            eval: c.file.drift_reference_eval.clone(),
        });
    let shown = path.display();
    let reference = match (from_calibration, path.is_file()) {
        (Some(_), true) => {
            return Err(format!(
                "both {} and {shown} hold a drift reference; remove one (the calibration's is the reference of its guarantees)",
                calibration.map(|c| c.path.display().to_string()).unwrap_or_default()
            ));
        }
        (Some(r), false) => r,
        (None, false) => return Ok(None),
        (None, true) => {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {shown}: {e}"))?;
            let file: ReferenceFile = serde_json::from_str(&text).map_err(|e| format!("parsing {shown}: {e}"))?;
            if file.format != FORMAT {
                return Err(format!("{shown} has format '{}', expected '{FORMAT}'", file.format));
            }
            made_for(model_file, &file.model_sha256, &path)?;
            DriftReference {
                file: file_name(&path),
                created: file.created,
                mc_samples: file.mc_samples,
                n: file.n,
                mc: file.drift_reference,
                eval: file.drift_reference_eval,
            }
        }
    };
    validate(&reference, outputs).map_err(|e| format!("the drift reference in {} is invalid: {e}", reference.file))?;
    Ok(Some(reference))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every output is the model's, every statistic one its mode gives, and every sample
/// holds one finite value per reference row.
pub fn validate(r: &DriftReference, outputs: &[&str]) -> Result<(), String> {
    if r.n == 0 {
        return Err("n is 0: a reference needs at least one row".into());
    }
    if !r.mc.is_empty() && r.mc_samples < 2 {
        return Err(format!("mc_samples is {}; MC needs at least 2", r.mc_samples));
    }
    for (mode, samples, fits) in [
        ("drift_reference", &r.mc, Statistic::of_mc as fn(&Statistic) -> bool),
        ("drift_reference_eval", &r.eval, Statistic::of_eval),
    ] {
        for (output, stats) in samples {
            if !outputs.contains(&output.as_str()) {
                return Err(format!("{mode} names output '{output}', which the model does not have"));
            }
            for (name, values) in stats {
                if !Statistic::parse(name).is_some_and(|s| fits(&s)) {
                    return Err(format!("{mode} of '{output}' names an unknown statistic '{name}'"));
                }
                if values.len() != r.n {
                    return Err(format!(
                        "{mode} of '{output}', '{name}': {} values for n = {} rows",
                        values.len(),
                        r.n
                    ));
                }
                if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                    return Err(format!("{mode} of '{output}', '{name}' holds {v}, not a finite number"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistic_names_round_trip_and_nothing_else_parses() {
        for s in [
            Statistic::PredictiveEntropy,
            Statistic::MutualInformation,
            Statistic::TopClassProbability,
            Statistic::Mean(None),
            Statistic::Mean(Some(3)),
            Statistic::Std(Some(0)),
            Statistic::Value(None),
            Statistic::Value(Some(7)),
        ] {
            assert_eq!(Statistic::parse(&s.name()), Some(s), "{}", s.name());
        }
        for bad in [
            "", "mean[]", "mean[x]", "mean[-1]", "means", "value[1", "entropy", "std[1]x",
        ] {
            assert_eq!(Statistic::parse(bad), None, "{bad}");
        }
    }

    fn reference(n: usize, values: Vec<f64>) -> DriftReference {
        DriftReference {
            file: "m.drift-reference.json".into(),
            created: "2026-12-06T00:00:00Z".into(),
            mc_samples: 30,
            n,
            mc: BTreeMap::from([("y".to_string(), BTreeMap::from([("mean".to_string(), values)]))]),
            eval: Default::default(),
        }
    }

    #[test]
    fn a_reference_is_refused_for_what_it_cannot_be() {
        assert!(validate(&reference(2, vec![0.5, 1.0]), &["y"]).is_ok());
        let e = |r: DriftReference, outputs: &[&str]| validate(&r, outputs).unwrap_err();
        assert!(e(reference(3, vec![0.5, 1.0]), &["y"]).contains("2 values for n = 3"));
        assert!(e(reference(2, vec![0.5, f64::NAN]), &["y"]).contains("not a finite number"));
        assert!(e(reference(2, vec![0.5, 1.0]), &["z"]).contains("does not have"));
        let mut r = reference(2, vec![0.5, 1.0]);
        r.eval = r.mc.clone();
        assert!(
            e(r, &["y"]).contains("unknown statistic 'mean'"),
            "mean is not an eval statistic"
        );
        assert!(e(reference(0, vec![]), &["y"]).contains("n is 0"));
    }
}
