//! What a model's calibration adds to an MC answer, computed once here for every front
//! end: intervals for regression outputs; prediction sets and referral for probability
//! outputs; a set per label and referral per row for multi-label outputs.

use crate::engine::conformal::{self, ModelCalibration, OutputCalibration};
use crate::engine::model::{LoadedModel, McOutput};
use crate::error::Error;

pub struct Interval {
    pub level: f64,
    /// Shaped like the output's mean; ±∞ where the calibration set was too small.
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
}

pub struct Sets {
    /// Per level: per row, the classes of the set, most probable first.
    pub sets: Vec<(f64, Vec<Vec<usize>>)>,
    /// Per row: predictive entropy above the threshold (every row without one).
    pub refer: Vec<bool>,
    pub refer_threshold: Option<f64>,
    pub refer_target_error: f64,
    pub classes: usize,
}

/// A multi-label output's sets: each label's set holds "absent", "present" or both.
pub struct LabelSets {
    /// Per level: per label of each row (row-major, [rows, labels]), the values in its set,
    /// 0 for absent and 1 for present, the predicted one first.
    pub sets: Vec<(f64, Vec<Vec<usize>>)>,
    /// Per row: mean predictive entropy over its labels above the threshold.
    pub refer: Vec<bool>,
    pub refer_threshold: Option<f64>,
    pub refer_target_error: f64,
    pub labels: usize,
}

pub enum Calibrated {
    Intervals(Vec<Interval>),
    Sets(Sets),
    Labels(LabelSets),
}

/// Per output, in the answer's order: what its calibration adds (None: not calibrated).
pub fn compute(model: &LoadedModel, outputs: &[McOutput]) -> Result<Vec<Option<Calibrated>>, Error> {
    let Some(cal) = &model.calibration else {
        return Ok(outputs.iter().map(|_| None).collect());
    };
    outputs.iter().map(|o| output(cal, o)).collect()
}

fn output(cal: &ModelCalibration, o: &McOutput) -> Result<Option<Calibrated>, Error> {
    let s = &o.stats;
    Ok(match cal.output(&o.name) {
        None => None,
        Some(OutputCalibration::Regression(r)) => {
            let columns = r.noise_variance.len();
            if columns == 0 || !s.mean.len().is_multiple_of(columns) {
                return Err(Error::Internal(format!(
                    "the calibration of '{}' has {columns} elements per row, which do not divide its {} values",
                    o.name,
                    s.mean.len()
                )));
            }
            let intervals = r
                .intervals
                .iter()
                .map(|level| {
                    let (lower, upper) = (0..s.mean.len())
                        .map(|j| {
                            let c = j % columns;
                            conformal::interval(s.mean[j], s.std[j], r.noise_variance[c], level.quantile[c])
                        })
                        .unzip();
                    Interval {
                        level: level.level,
                        lower,
                        upper,
                    }
                })
                .collect();
            Some(Calibrated::Intervals(intervals))
        }
        Some(OutputCalibration::Probabilities(p)) => {
            let classes = *o.shape.last().unwrap_or(&1);
            let entropy = s
                .entropy
                .as_ref()
                .ok_or_else(|| Error::Internal(format!("probability output '{}' has no entropies", o.name)))?;
            let rows: Vec<&[f64]> = s.mean.chunks_exact(classes.max(1)).collect();
            let sets = p
                .sets
                .iter()
                .map(|l| {
                    (
                        l.level,
                        rows.iter().map(|r| conformal::prediction_set(r, l.threshold)).collect(),
                    )
                })
                .collect();
            let referral = cal.referral(&p.referral).ok_or_else(|| {
                Error::Internal(format!("calibration of '{}' lacks the model's referral target", o.name))
            })?;
            let refer = entropy
                .predictive_entropy
                .iter()
                .map(|h| referral.threshold.is_none_or(|t| *h > t))
                .collect();
            Some(Calibrated::Sets(Sets {
                sets,
                refer,
                refer_threshold: referral.threshold,
                refer_target_error: cal.refer_target,
                classes,
            }))
        }
        Some(OutputCalibration::Labels(l)) => {
            let labels = l.labels.max(1);
            let entropy = s
                .entropy
                .as_ref()
                .ok_or_else(|| Error::Internal(format!("multi-label output '{}' has no entropies", o.name)))?;
            if !s.mean.len().is_multiple_of(labels) || entropy.predictive_entropy.len() != s.mean.len() {
                return Err(Error::Internal(format!(
                    "the calibration of '{}' has {labels} labels a row, which do not fit its {} values",
                    o.name,
                    s.mean.len()
                )));
            }
            let sets = l
                .sets
                .iter()
                .map(|level| {
                    let per_label = s
                        .mean
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            let (absent, present) = conformal::label_set(*p, level.threshold[j % labels]);
                            let (first, second) = if conformal::label_present(*p) {
                                ((present, 1), (absent, 0))
                            } else {
                                ((absent, 0), (present, 1))
                            };
                            [first, second]
                                .into_iter()
                                .filter(|(inside, _)| *inside)
                                .map(|(_, v)| v)
                                .collect()
                        })
                        .collect();
                    (level.level, per_label)
                })
                .collect();
            let referral = cal.referral(&l.referral).ok_or_else(|| {
                Error::Internal(format!("calibration of '{}' lacks the model's referral target", o.name))
            })?;
            let refer = entropy
                .predictive_entropy
                .chunks_exact(labels)
                .map(|row| {
                    let h = row.iter().sum::<f64>() / labels as f64;
                    referral.threshold.is_none_or(|t| h > t)
                })
                .collect();
            Some(Calibrated::Labels(LabelSets {
                sets,
                refer,
                refer_threshold: referral.threshold,
                refer_target_error: cal.refer_target,
                labels,
            }))
        }
    })
}
