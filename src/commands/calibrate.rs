//! `mcd-serve calibrate`: runs eval and MC on held-out rows through the serving engine.
//!
//! - Labelled rows give `<stem>.calibration.json` beside the model: the conformal
//!   calibration (see `engine::conformal` for the maths) and the drift reference of the
//!   same rows.
//! - Unlabelled rows (no line has a `"target"`) give `<stem>.drift-reference.json`: the
//!   drift reference alone, for a model served without a calibration
//!   (`engine::drift_reference`).
//!
//! The data file is JSON Lines, one row per line:
//! `{"inputs": <as in /predict, one row>, "target": <class index, or value(s)>}`. A model
//! with several calibrated outputs takes `"target": {"<output>": ..., ...}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use tract_onnx::prelude::DatumType;

use crate::core::drift::{self, Observed};
use crate::core::offline::OfflineModel;
use crate::core::view::conformal::{
    self, Calibrates, CalibrationFile, ClassRow, DEFAULT_REFER_TARGET, FORMAT, LabelRow, OutputCalibration,
    REFER_TARGETS, RegressionRow,
};
use crate::core::view::{LoadedModel, McOutput};
use crate::engine::drift_reference::{self, ReferenceFile, Samples};

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// Folder of `*.onnx` models.
    #[arg(long, env = "MCD_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// The model to calibrate (its file stem).
    #[arg(long)]
    pub model: String,
    /// Rows, JSON Lines: {"inputs": ..., "target": ...}. Without targets on every line:
    /// only the drift reference is made (`<stem>.drift-reference.json`).
    #[arg(long)]
    pub data: PathBuf,
    /// MC samples per row.
    #[arg(long, default_value_t = 100)]
    pub mc_samples: usize,
    /// Row i (from 0) runs with seed `seed + i`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// What an output contributes, per calibration row.
enum Collected {
    Regression {
        mean: Vec<Vec<f64>>,
        std: Vec<Vec<f64>>,
        target: Vec<Vec<f64>>,
    },
    Probabilities {
        mean: Vec<Vec<f64>>,
        entropy: Vec<f64>,
        target: Vec<usize>,
    },
    /// Per row: each label's mean, the mean predictive entropy over the labels, and the
    /// true labels.
    Labels {
        mean: Vec<Vec<f64>>,
        entropy: Vec<f64>,
        target: Vec<Vec<bool>>,
    },
}

pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    let path = args.models.join(format!("{}.onnx", args.model));
    if !path.is_file() {
        bail!("no model file {}", path.display());
    }
    let offline = OfflineModel::load(&args.model, &path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    let model = offline.model();
    if args.mc_samples < 2 {
        bail!("--mc-samples must be at least 2");
    }
    let calibrated: Vec<usize> = (0..model.outputs.len())
        .filter(|&i| model.probability_classes[i].is_some() || is_float(model.outputs[i].datum))
        .collect();
    if calibrated.is_empty() {
        bail!("model '{}' has no float or probability output to calibrate", model.name);
    }
    let text = std::fs::read_to_string(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let mut collected: BTreeMap<usize, Collected> = BTreeMap::new();
    let mut n = 0u64;
    let mut reference = Samples::new();
    let mut reference_eval = Samples::new();
    // Whether the lines carry targets: decided by the first, held by every other.
    let mut labelled: Option<bool> = None;
    let probability: Vec<bool> = model.probability_classes.iter().map(Option::is_some).collect();
    let monitored = |name: &str| calibrated.iter().any(|&i| model.outputs[i].name == name);
    for (ix, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = ix + 1;
        let at = |e: String| anyhow!("{}:{line_no}: {e}", args.data.display());
        let (inputs, target) = split_line(line).map_err(at)?;
        match (labelled, &target) {
            (None, t) => labelled = Some(t.is_some()),
            (Some(true), None) => return Err(at("no \"target\" field, though the first row has one".into())),
            (Some(false), Some(_)) => {
                return Err(at(
                    "a \"target\" field, though the first row has none (unlabelled rows make a drift reference only)"
                        .into(),
                ));
            }
            _ => {}
        }
        let row = offline.row(inputs).map_err(|e| at(e.to_string()))?;
        let outputs = offline
            .mc(&row, args.mc_samples, args.seed.wrapping_add(n))
            .map_err(|e| at(e.to_string()))?;
        let eval = offline.eval(&row).map_err(|e| at(e.to_string()))?;
        // The drift reference covers what calibration covers: probability and float outputs.
        for (into, samples) in [
            (&mut reference, drift::observe::samples(&Observed::mc(&outputs), 1)),
            (
                &mut reference_eval,
                drift::observe::samples(&Observed::eval(&eval, &probability), 1),
            ),
        ] {
            for (output, stats) in samples.into_iter().filter(|(o, _)| monitored(o)) {
                let into = into.entry(output).or_default();
                for (statistic, values) in stats {
                    into.entry(statistic).or_default().extend(values);
                }
            }
        }
        if let Some(target) = &target {
            for &o in &calibrated {
                let target = target_for(model, &calibrated, o, target).map_err(at)?;
                add(&mut collected, o, model.calibrates(o), &outputs[o], target).map_err(at)?;
            }
        }
        n += 1;
    }
    if n == 0 {
        bail!("{} holds no rows", args.data.display());
    }
    let created = conformal::rfc3339(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs());
    let model_file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let calibration_out = conformal::calibration_path(&path);
    let reference_out = drift_reference::reference_path(&path);
    if labelled == Some(false) {
        // A reference beside a calibration that holds one would make the model refuse to
        // load (which one to test against must not be a guess).
        if let Ok(text) = std::fs::read_to_string(&calibration_out)
            && serde_json::from_str::<CalibrationFile>(&text).is_ok_and(|c| !c.drift_reference.is_empty())
        {
            bail!(
                "{} already holds a drift reference (of its labelled rows), and it is the one served; \
                 re-run with labelled rows to replace both, or remove it first",
                calibration_out.display()
            );
        }
        let file = ReferenceFile {
            format: drift_reference::FORMAT.into(),
            model_file,
            model_sha256: conformal::sha256_file(&path)?,
            created,
            n: n as usize,
            mc_samples: args.mc_samples,
            seed: args.seed,
            drift_reference: reference,
            drift_reference_eval: reference_eval,
        };
        write_atomically(&reference_out, &serde_json::to_vec_pretty(&file)?)?;
        println!(
            "wrote {} ({} unlabelled rows, mc_samples {}, seed {})",
            reference_out.display(),
            file.n,
            file.mc_samples,
            file.seed
        );
        print!(
            "{}",
            reference_report(&file.drift_reference, &file.drift_reference_eval, file.n)
        );
        return Ok(());
    }
    if reference_out.is_file() {
        bail!(
            "{} exists: a calibration holds its own drift reference, and a model with both is refused; \
             remove it first",
            reference_out.display()
        );
    }
    let mut targets = REFER_TARGETS.to_vec();
    let own = model.config.refer_target_error.unwrap_or(DEFAULT_REFER_TARGET);
    if !targets.iter().any(|t| (t - own).abs() < 1e-12) {
        targets.push(own);
    }
    let outputs = collected
        .into_iter()
        .map(|(o, c)| (model.outputs[o].name.clone(), fit(c, &targets)))
        .collect();
    let file = CalibrationFile {
        format: FORMAT.into(),
        model_file,
        model_sha256: conformal::sha256_file(&path)?,
        created,
        n: n as usize,
        mc_samples: args.mc_samples,
        seed: args.seed,
        outputs,
        drift_reference: reference,
        drift_reference_eval: reference_eval,
    };
    write_atomically(&calibration_out, &serde_json::to_vec_pretty(&file)?)?;
    print!("{}", report(&file, own, &calibration_out));
    Ok(())
}

fn is_float(d: DatumType) -> bool {
    matches!(d, DatumType::F16 | DatumType::F32 | DatumType::F64)
}

fn split_line(line: &str) -> Result<(Value, Option<Value>), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(mut o) = value else {
        return Err("each line must be an object {\"inputs\": ..., \"target\": ...}".into());
    };
    let inputs = o.remove("inputs").ok_or("no \"inputs\" field")?;
    let target = o.remove("target");
    if let Some(k) = o.keys().next() {
        return Err(format!("unknown field \"{k}\"; a line has \"inputs\" and \"target\""));
    }
    Ok((inputs, target))
}

/// The target of output `o`: the line's target itself when one output is calibrated,
/// else its entry under the output's name.
fn target_for<'t>(model: &LoadedModel, calibrated: &[usize], o: usize, target: &'t Value) -> Result<&'t Value, String> {
    if calibrated.len() == 1 {
        return Ok(target);
    }
    let name = &model.outputs[o].name;
    target.get(name).ok_or_else(|| {
        format!(
            "model '{}' has several outputs: \"target\" must be an object with '{name}'",
            model.name
        )
    })
}

fn add(
    collected: &mut BTreeMap<usize, Collected>,
    o: usize,
    calibrates: Calibrates,
    out: &McOutput,
    target: &Value,
) -> Result<(), String> {
    let s = &out.stats;
    match (calibrates, &s.entropy) {
        (Calibrates::Probabilities, Some(e)) => {
            let classes = s.mean.len();
            let k = target.as_u64().filter(|&k| (k as usize) < classes).ok_or_else(|| {
                format!(
                    "target of '{}' must be a class index in [0, {classes}), got {target}",
                    out.name
                )
            })?;
            let entry = collected.entry(o).or_insert_with(|| Collected::Probabilities {
                mean: vec![],
                entropy: vec![],
                target: vec![],
            });
            if let Collected::Probabilities { mean, entropy, target } = entry {
                mean.push(s.mean.clone());
                entropy.push(e.predictive_entropy[0]);
                target.push(k as usize);
            }
        }
        (Calibrates::Labels(labels), Some(e)) => {
            let flags = label_targets(target).filter(|f| f.len() == labels).ok_or_else(|| {
                format!(
                    "target of '{}' must be {labels} labels, each 0 or 1 (or false or true), got {target}",
                    out.name
                )
            })?;
            let entry = collected.entry(o).or_insert_with(|| Collected::Labels {
                mean: vec![],
                entropy: vec![],
                target: vec![],
            });
            if let Collected::Labels { mean, entropy, target } = entry {
                mean.push(s.mean.clone());
                // The statistic referral reads when serving (`core::guarantees`).
                entropy.push(e.predictive_entropy.iter().sum::<f64>() / labels.max(1) as f64);
                target.push(flags);
            }
        }
        // Per-position entropies (a segmentation map, a binary mask): no conformal method
        // for them is chosen yet, and a guarantee must never be claimed in silence.
        (_, Some(_)) => {
            return Err(format!(
                "'{}' has an uncertainty per position (per pixel or voxel): calibrating such an output is not \
                 supported yet, so no guarantee is claimed for it",
                out.name
            ));
        }
        (_, None) => {
            let values: Vec<f64> = match target {
                Value::Number(x) => vec![x.as_f64().unwrap_or(f64::NAN)],
                Value::Array(a) => flatten(a),
                _ => vec![],
            };
            if values.len() != s.mean.len() || values.iter().any(|v| !v.is_finite()) {
                return Err(format!(
                    "target of '{}' must be {} finite number(s), one per element of a row, got {target}",
                    out.name,
                    s.mean.len()
                ));
            }
            let entry = collected.entry(o).or_insert_with(|| Collected::Regression {
                mean: vec![],
                std: vec![],
                target: vec![],
            });
            if let Collected::Regression { mean, std, target } = entry {
                mean.push(s.mean.clone());
                std.push(s.std.clone());
                target.push(values);
            }
        }
    }
    Ok(())
}

/// Labels as a flat list of 0/1 or booleans (nested lists are read in order).
fn label_targets(target: &Value) -> Option<Vec<bool>> {
    let Value::Array(items) = target else {
        return None;
    };
    let mut flags = vec![];
    for v in items {
        match v {
            Value::Bool(b) => flags.push(*b),
            Value::Number(n) if n.as_f64() == Some(0.0) => flags.push(false),
            Value::Number(n) if n.as_f64() == Some(1.0) => flags.push(true),
            Value::Array(_) => flags.extend(label_targets(v)?),
            _ => return None,
        }
    }
    Some(flags)
}

fn flatten(a: &[Value]) -> Vec<f64> {
    a.iter()
        .flat_map(|v| match v {
            Value::Array(inner) => flatten(inner),
            Value::Number(x) => vec![x.as_f64().unwrap_or(f64::NAN)],
            _ => vec![f64::NAN],
        })
        .collect()
}

fn fit(c: Collected, targets: &[f64]) -> OutputCalibration {
    match c {
        Collected::Regression { mean, std, target } => {
            let rows: Vec<RegressionRow> = (0..mean.len())
                .map(|i| RegressionRow {
                    mean: &mean[i],
                    std: &std[i],
                    target: &target[i],
                })
                .collect();
            OutputCalibration::Regression(conformal::fit_regression(&rows))
        }
        Collected::Probabilities { mean, entropy, target } => {
            let rows: Vec<ClassRow> = (0..mean.len())
                .map(|i| ClassRow {
                    probabilities: &mean[i],
                    predictive_entropy: entropy[i],
                    target: target[i],
                })
                .collect();
            OutputCalibration::Probabilities(conformal::fit_sets(&rows, targets))
        }
        Collected::Labels { mean, entropy, target } => {
            let rows: Vec<LabelRow> = (0..mean.len())
                .map(|i| LabelRow {
                    probabilities: &mean[i],
                    mean_predictive_entropy: entropy[i],
                    target: &target[i],
                })
                .collect();
            OutputCalibration::Labels(conformal::fit_labels(&rows, targets))
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Which statistics the drift reference holds, per mode and output.
fn reference_report(mc: &Samples, eval: &Samples, n: usize) -> String {
    let mut r = String::new();
    for (mode, samples) in [("MC", mc), ("eval", eval)] {
        for (name, stats) in samples {
            r += &format!(
                "{name}: {mode} drift reference of {n} rows for {}\n",
                stats.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    r
}

/// The short report: coverage per level on the calibration set, set sizes, referral.
fn report(file: &CalibrationFile, own_target: f64, out: &Path) -> String {
    let mut r = format!(
        "wrote {} ({} rows, mc_samples {}, seed {})\n",
        out.display(),
        file.n,
        file.mc_samples,
        file.seed
    );
    r += &reference_report(&file.drift_reference, &file.drift_reference_eval, file.n);
    let bound = |q: Option<f64>| q.map_or("unbounded (too few rows)".to_string(), |q| format!("{q:.4}"));
    for (name, cal) in &file.outputs {
        match cal {
            OutputCalibration::Regression(c) => {
                r += &format!("{name}: regression, noise variance {:?}\n", c.noise_variance);
                for l in &c.intervals {
                    r += &format!(
                        "  level {:<4}  coverage {:.3}  mean width {:?}  quantile {}\n",
                        l.level,
                        l.calibration_coverage,
                        l.calibration_mean_width
                            .iter()
                            .map(|w| w.map_or("unbounded".to_string(), |w| format!("{}", (w * 1e3).round() / 1e3)))
                            .collect::<Vec<_>>(),
                        l.quantile.iter().map(|q| bound(*q)).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            OutputCalibration::Probabilities(c) => {
                r += &format!("{name}: prediction sets ({})\n", c.method.to_uppercase());
                for l in &c.sets {
                    r += &format!(
                        "  level {:<4}  coverage {:.3}  mean set size {:.3}\n",
                        l.level, l.calibration_coverage, l.calibration_mean_size
                    );
                }
                r += &referral_report(&c.referral, own_target);
            }
            OutputCalibration::Labels(c) => {
                r += &format!("{name}: {} labels, a set per label (LAC per label)\n", c.labels);
                for l in &c.sets {
                    let lowest = l.calibration_coverage.iter().copied().fold(f64::INFINITY, f64::min);
                    r += &format!(
                        "  level {:<4}  coverage per label {:?} (lowest {lowest:.3})  undecided labels a row {:.3}\n",
                        l.level,
                        l.calibration_coverage
                            .iter()
                            .map(|c| (c * 1e3).round() / 1e3)
                            .collect::<Vec<_>>(),
                        l.calibration_mean_undecided
                    );
                }
                r += &referral_report(&c.referral, own_target);
            }
        }
    }
    r
}

/// Referral per target: the threshold, the share referred, the accepted error.
fn referral_report(referral: &[conformal::Referral], own_target: f64) -> String {
    let mut r = String::new();
    for f in referral {
        let mark = if (f.target_error - own_target).abs() < 1e-12 {
            " (served)"
        } else {
            ""
        };
        r += &format!(
            "  refer at target error {:<5}{mark}: entropy threshold {}, refers {:.1}%, accepted error {:.4} (upper bound {:.4})\n",
            f.target_error,
            f.threshold
                .map_or("none: refer every row".into(), |t| format!("{t:.5}")),
            100.0 * (1.0 - f.coverage),
            f.accepted_error,
            f.error_upper_bound
        );
    }
    r
}
