//! What an answer offers the drift monitor: per output, the monitored statistics of each
//! of its rows, read in place from the answer (no copies, no maps: this runs on every
//! answer of a monitored model).
//!
//! MC answers give, per row, the predictive entropy, the mutual information and the
//! top-class probability of a probability output, and the mean and std of each element of
//! a regression output (up to [`MAX_REGRESSION_ELEMENTS`]). Eval answers give what eval
//! can: the top-class probability, or each element's value. Outputs with several rows of
//! classes per request row (per-position outputs) offer nothing yet.

use std::collections::BTreeMap;

use tract_onnx::prelude::{DatumType, Tensor};

use crate::engine::drift_reference::{Samples, Statistic};
use crate::engine::model::{McOutput, NamedTensor};

/// Elements of a regression output beyond which it is not monitored (m stays small).
pub const MAX_REGRESSION_ELEMENTS: usize = 8;

/// One output of an answer, as the monitor reads it.
pub enum Observed<'a> {
    Mc(&'a McOutput),
    Eval {
        name: &'a str,
        values: Values,
        /// A probability output (its last axis sums to 1).
        probability: bool,
    },
}

/// An eval tensor's values as f64 (None: not a float tensor, nothing to monitor). A copy:
/// eval outputs are small where a monitor reads them (a monitored output has at most
/// [`MAX_REGRESSION_ELEMENTS`] values or one row of classes per row).
pub struct Values(Option<Vec<f64>>);

impl Values {
    pub fn new(values: Vec<f64>) -> Values {
        Values(Some(values))
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, Vec::len)
    }

    fn get(&self, i: usize) -> f64 {
        self.0.as_ref().map_or(f64::NAN, |v| v[i])
    }
}

impl<'a> Observed<'a> {
    /// The outputs of an eval answer; `probability[o]`: output o is a probability output.
    pub fn eval(outputs: &'a [NamedTensor], probability: &[bool]) -> Vec<Observed<'a>> {
        outputs
            .iter()
            .enumerate()
            .map(|(o, t)| Observed::Eval {
                name: &t.name,
                values: values(&t.tensor),
                probability: probability.get(o).copied().unwrap_or(false),
            })
            .collect()
    }

    pub fn mc(outputs: &'a [McOutput]) -> Vec<Observed<'a>> {
        outputs.iter().map(Observed::Mc).collect()
    }

    pub fn name(&self) -> &str {
        match self {
            Observed::Mc(o) => &o.name,
            Observed::Eval { name, .. } => name,
        }
    }

    /// Values per row of its first monitored quantity (classes, or elements), when the
    /// output's size is a whole number of rows.
    fn per_row(&self, rows: usize) -> Option<usize> {
        let len = match self {
            Observed::Mc(o) => o.stats.mean.len(),
            Observed::Eval { values, .. } => values.len(),
        };
        (rows > 0 && len > 0 && len.is_multiple_of(rows)).then_some(len / rows)
    }

    /// The statistics this output offers for an answer of `rows` rows.
    pub fn offers(&self, rows: usize) -> Vec<Statistic> {
        let Some(per_row) = self.per_row(rows) else {
            return vec![];
        };
        let elements = |make: &dyn Fn(Option<usize>) -> Vec<Statistic>| -> Vec<Statistic> {
            match per_row {
                1 => make(None),
                k if k <= MAX_REGRESSION_ELEMENTS => (0..k).flat_map(|c| make(Some(c))).collect(),
                _ => vec![],
            }
        };
        match self {
            Observed::Mc(o) => match &o.stats.entropy {
                Some(e) if e.predictive_entropy.len() == rows => vec![
                    Statistic::PredictiveEntropy,
                    Statistic::MutualInformation,
                    Statistic::TopClassProbability,
                ],
                Some(_) => vec![],
                None => elements(&|c| vec![Statistic::Mean(c), Statistic::Std(c)]),
            },
            Observed::Eval { probability: true, .. } => vec![Statistic::TopClassProbability],
            Observed::Eval {
                values: Values(None), ..
            } => vec![],
            Observed::Eval { .. } => elements(&|c| vec![Statistic::Value(c)]),
        }
    }

    /// Whether it can give `s` for an answer of `rows` rows (what [`value`](Self::value)
    /// needs).
    pub fn gives(&self, s: Statistic, rows: usize) -> bool {
        let Some(per_row) = self.per_row(rows) else {
            return false;
        };
        let element = |c: Option<usize>| match c {
            None => per_row == 1,
            Some(c) => per_row > 1 && c < per_row,
        };
        match (self, s) {
            (Observed::Mc(o), Statistic::PredictiveEntropy | Statistic::MutualInformation) => o
                .stats
                .entropy
                .as_ref()
                .is_some_and(|e| e.predictive_entropy.len() == rows && e.mutual_information.len() == rows),
            (Observed::Mc(o), Statistic::TopClassProbability) => o
                .stats
                .entropy
                .as_ref()
                .is_some_and(|e| e.predictive_entropy.len() == rows),
            (Observed::Mc(o), Statistic::Mean(c) | Statistic::Std(c)) => {
                o.stats.entropy.is_none() && o.stats.std.len() == o.stats.mean.len() && element(c)
            }
            (Observed::Eval { probability, .. }, Statistic::TopClassProbability) => *probability,
            (
                Observed::Eval {
                    probability: false,
                    values,
                    ..
                },
                Statistic::Value(c),
            ) => values.0.is_some() && element(c),
            _ => false,
        }
    }

    /// Statistic `s` of row `r` (of `rows`); [`gives`](Self::gives) must hold.
    pub fn value(&self, s: Statistic, rows: usize, r: usize) -> f64 {
        let per_row = self.per_row(rows).unwrap_or(1);
        let column = |c: Option<usize>| r * per_row + c.unwrap_or(0);
        match (self, s) {
            (Observed::Mc(o), Statistic::PredictiveEntropy) => {
                o.stats.entropy.as_ref().map_or(f64::NAN, |e| e.predictive_entropy[r])
            }
            (Observed::Mc(o), Statistic::MutualInformation) => {
                o.stats.entropy.as_ref().map_or(f64::NAN, |e| e.mutual_information[r])
            }
            (Observed::Mc(o), Statistic::TopClassProbability) => o.stats.mean[r * per_row..(r + 1) * per_row]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max),
            (Observed::Mc(o), Statistic::Mean(c)) => o.stats.mean[column(c)],
            (Observed::Mc(o), Statistic::Std(c)) => o.stats.std[column(c)],
            (Observed::Eval { values, .. }, Statistic::TopClassProbability) => (r * per_row..(r + 1) * per_row)
                .map(|i| values.get(i))
                .fold(f64::NEG_INFINITY, f64::max),
            (Observed::Eval { values, .. }, Statistic::Value(c)) => values.get(column(c)),
            _ => f64::NAN,
        }
    }
}

fn values(t: &Tensor) -> Values {
    if !matches!(t.datum_type(), DatumType::F16 | DatumType::F32 | DatumType::F64) {
        return Values(None);
    }
    let copy = || -> Option<Vec<f64>> {
        let t = t.cast_to::<f64>().ok()?;
        let view = t.try_as_plain_ram().ok()?;
        Some(view.as_slice::<f64>().ok()?.to_vec())
    };
    Values(copy())
}

/// Per output, per statistic it offers, its values on the answer's `rows` rows: what
/// `mcd-serve calibrate` stores as the reference, read exactly as served rows are.
pub fn samples(observed: &[Observed], rows: usize) -> Samples {
    let mut all = BTreeMap::new();
    for o in observed {
        let offered = o.offers(rows);
        if offered.is_empty() {
            continue;
        }
        let stats = offered
            .into_iter()
            .map(|s| (s.name(), (0..rows).map(|r| o.value(s, rows, r)).collect()))
            .collect();
        all.insert(o.name().to_string(), stats);
    }
    all
}
