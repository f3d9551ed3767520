//! The OIP view of a model's outputs, shared by the REST and gRPC front ends.
//!
//! Eval answers carry each model output under its own name. MC answers carry the mean
//! under the output's name, and the statistics as derived outputs `y.variance`, `y.std`,
//! for categorical and Bernoulli outputs `y.predictive_entropy`, `y.expected_entropy` and
//! `y.mutual_information` (one value per position: shaped like `y` without its class axes,
//! or like `y` for a Bernoulli output), for those with more than one position a row the
//! per-row scores `y.summary.mean_predictive_entropy` (`max_`, and the same for
//! `mutual_information`), and `y.samples` when asked for. A model
//! with a calibration adds, for a regression output, `y.interval_0.95_lower` and
//! `y.interval_0.95_upper` per level (FP64, shaped like `y`; ±inf where unbounded), and for
//! a probability output `y.set_0.95` per level, a BOOL membership mask shaped like `y`
//! (sets are ragged, a mask is a tensor), and `y.refer` (BOOL, one per row); for a
//! multi-label output `y.set_0.95` is shaped like `y` with a last axis of 2: whether
//! "absent" and whether "present" is in each label's set.

use serde_json::Value;
use tract_onnx::prelude::*;

use crate::core::guarantees::Calibrated;
use crate::core::tensors::{DataType, f32_bytes, f64_bytes, tensor_bytes};
use crate::core::view::{Dim, LoadedModel, OutputKind, TensorSpec};
use crate::core::view::{OutputCalibration, Statistic, level_key};
use crate::core::{Answer, MODEL_VERSION};
use crate::error::Error;
use crate::front::answer::{EvalMode, McMode, McRun};
use crate::front::oip::types::{
    AnswerParameters, EvalParameters, McParameters, ModelMetadata, ModelParameters, TensorMetadata,
    TensorMetadataParameters,
};

/// Derived MC outputs: per element, per row, and the raw samples.
const STATS: [&str; 2] = ["variance", "std"];
const ENTROPIES: [&str; 3] = ["predictive_entropy", "expected_entropy", "mutual_information"];
const SAMPLES: &str = "samples";
fn summary_name(output: &str, statistic: &str) -> String {
    format!("{output}.summary.{statistic}")
}
const REFER: &str = "refer";

fn interval_name(output: &str, level: f64, bound: &str) -> String {
    format!("{output}.interval_{}_{bound}", level_key(level))
}

fn set_name(output: &str, level: f64) -> String {
    format!("{output}.set_{}", level_key(level))
}

/// One output as the protocol describes it: name, datatype, shape (-1 for a variable
/// dim), and whether only MC answers carry it.
pub struct OutputMeta {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub mc_only: bool,
}

fn dims(shape: &[Dim]) -> Vec<i64> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as i64,
            Dim::Symbol(_) => -1,
        })
        .collect()
}

/// The datatype of a model input or output on the wire (BYTES for a string tensor).
pub fn datatype(spec: &TensorSpec) -> Result<DataType, Error> {
    DataType::of(spec.datum).ok_or_else(|| {
        Error::Internal(format!(
            "'{}' has type {}, which the protocol cannot carry",
            spec.name, spec.dtype
        ))
    })
}

/// The MC mean keeps a float output's precision class: FP32 for FP16/FP32 outputs (what a
/// client of the eval answer expects under that name), FP64 otherwise. Every derived
/// statistic is FP64, as the server accumulates it.
fn mean_datatype(spec: &TensorSpec) -> DataType {
    match spec.datum {
        DatumType::F16 | DatumType::F32 => DataType::F32,
        _ => DataType::F64,
    }
}

/// The inputs, as model metadata lists them.
pub fn input_meta(model: &LoadedModel) -> Result<Vec<(String, DataType, Vec<i64>)>, Error> {
    model
        .inputs
        .iter()
        .map(|s| Ok((s.name.clone(), datatype(s)?, dims(&s.shape))))
        .collect()
}

/// Every output an answer of this model can carry, in answer order.
pub fn output_meta(model: &LoadedModel) -> Result<Vec<OutputMeta>, Error> {
    let mc = model.mc_unavailable_reason().is_none();
    let mut out = vec![];
    for (spec, kind) in model.outputs.iter().zip(&model.output_kinds) {
        let shape = dims(&spec.shape);
        out.push(OutputMeta {
            name: spec.name.clone(),
            datatype: datatype(spec)?,
            shape: shape.clone(),
            mc_only: false,
        });
        if !mc {
            continue;
        }
        for suffix in STATS {
            out.push(OutputMeta {
                name: format!("{}.{suffix}", spec.name),
                datatype: DataType::F64,
                shape: shape.clone(),
                mc_only: true,
            });
        }
        let rows = shape[..shape.len().saturating_sub(1)].to_vec();
        if let Some(positions) = kind.positions(&shape) {
            for suffix in ENTROPIES {
                out.push(OutputMeta {
                    name: format!("{}.{suffix}", spec.name),
                    datatype: DataType::F64,
                    shape: positions.clone(),
                    mc_only: true,
                });
            }
            // A summary where a row may have more than one position (a dim of -1 may).
            if positions.iter().skip(1).any(|&d| d != 1) {
                let structures = match kind {
                    OutputKind::Categorical { classes, .. } => classes.map_or(-1, |k| k as i64),
                    _ => 1,
                };
                for suffix in model.summary_statistics(kind) {
                    let mut shape = positions[..1].to_vec();
                    if suffix.starts_with("volume_") {
                        shape.push(structures);
                    }
                    out.push(OutputMeta {
                        name: summary_name(&spec.name, suffix),
                        datatype: DataType::F64,
                        shape,
                        mc_only: true,
                    });
                }
            }
        }
        let mc_only = |name: String, datatype: DataType, shape: Vec<i64>| OutputMeta {
            name,
            datatype,
            shape,
            mc_only: true,
        };
        match model.calibration.as_ref().and_then(|c| c.output(&spec.name)) {
            Some(OutputCalibration::Regression(r)) => {
                for l in &r.intervals {
                    for bound in ["lower", "upper"] {
                        out.push(mc_only(
                            interval_name(&spec.name, l.level, bound),
                            DataType::F64,
                            shape.clone(),
                        ));
                    }
                }
            }
            Some(OutputCalibration::Probabilities(p)) => {
                for l in &p.sets {
                    out.push(mc_only(set_name(&spec.name, l.level), DataType::Bool, shape.clone()));
                }
                out.push(mc_only(format!("{}.{REFER}", spec.name), DataType::Bool, rows));
            }
            Some(OutputCalibration::Labels(p)) => {
                // Per label, whether "absent" and whether "present" is in its set.
                let mut pairs = shape.clone();
                pairs.push(2);
                for l in &p.sets {
                    out.push(mc_only(set_name(&spec.name, l.level), DataType::Bool, pairs.clone()));
                }
                out.push(mc_only(format!("{}.{REFER}", spec.name), DataType::Bool, rows));
            }
            None => {}
        }
        let mut samples = vec![-1];
        samples.extend(&shape);
        out.push(OutputMeta {
            name: format!("{}.{SAMPLES}", spec.name),
            datatype: DataType::F64,
            shape: samples,
            mc_only: true,
        });
    }
    Ok(out)
}

/// The model metadata document of the REST front end (`GET /v2/models/{m}`).
pub fn metadata(model: &LoadedModel) -> Result<ModelMetadata<'_>, Error> {
    let inputs = input_meta(model)?
        .into_iter()
        .map(|(name, dt, shape)| TensorMetadata {
            name,
            datatype: dt.as_str(),
            shape,
            parameters: None,
        })
        .collect();
    let outputs = output_meta(model)?
        .into_iter()
        .map(|o| TensorMetadata {
            name: o.name,
            datatype: o.datatype.as_str(),
            shape: o.shape,
            parameters: o.mc_only.then_some(TensorMetadataParameters { mc_only: true }),
        })
        .collect();
    Ok(ModelMetadata {
        name: &model.name,
        versions: vec![MODEL_VERSION],
        platform: PLATFORM,
        inputs,
        outputs,
        parameters: ModelParameters {
            mc_available: model.mc_unavailable_reason().is_none(),
            dropout_sites: model.sampling_sites(),
            calibrated: model.calibration.is_some(),
            refer_target_error: model.calibration.as_ref().map(|c| c.refer_target),
            output_kinds: model.output_kinds_by_name(),
        },
    })
}

pub const PLATFORM: &str = "onnx";

/// One output of an answer, ready to encode.
pub struct OutTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: OutData,
}

pub enum OutData {
    /// An eval output as the model produced it.
    Tensor(Tensor),
    /// Statistics, sent as FP32 or FP64 by `datatype`.
    Floats(Vec<f64>),
    /// Set membership and referral flags.
    Bools(Vec<bool>),
}

impl OutTensor {
    /// Little-endian bytes, as the binary extension and gRPC's raw contents carry them.
    pub fn bytes(&self) -> Result<Vec<u8>, Error> {
        Ok(match &self.data {
            OutData::Tensor(t) => tensor_bytes(t)?.1,
            OutData::Floats(v) if self.datatype == DataType::F32 => f32_bytes(v),
            OutData::Floats(v) => f64_bytes(v),
            OutData::Bools(v) => v.iter().map(|b| *b as u8).collect(),
        })
    }

    /// Flat JSON values.
    pub fn json(&self) -> Result<Value, Error> {
        let number = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        Ok(match &self.data {
            OutData::Floats(v) if self.datatype == DataType::F32 => {
                Value::Array(v.iter().map(|&x| number(x as f32 as f64)).collect())
            }
            OutData::Floats(v) => Value::Array(v.iter().map(|&x| number(x)).collect()),
            OutData::Bools(v) => Value::Array(v.iter().map(|&b| Value::Bool(b)).collect()),
            OutData::Tensor(t) => {
                let internal = |e: TractError| Error::Internal(format!("encoding output '{}': {e}", self.name));
                if t.datum_type() == DatumType::Bool {
                    let view = t.try_as_plain_ram().map_err(internal)?;
                    Value::Array(
                        view.as_slice::<bool>()
                            .map_err(internal)?
                            .iter()
                            .map(|b| Value::Bool(*b))
                            .collect(),
                    )
                } else if t.datum_type().is_integer() {
                    let c = t.cast_to::<i64>().map_err(internal)?;
                    let view = c.try_as_plain_ram().map_err(internal)?;
                    let values = view.as_slice::<i64>().map_err(internal)?;
                    Value::Array(values.iter().map(|x| Value::Number((*x).into())).collect())
                } else {
                    let values = crate::core::view::to_f64(t).map_err(internal)?;
                    Value::Array(values.into_iter().map(number).collect())
                }
            }
        })
    }
}

/// The answer's outputs, each model output followed by its MC statistics, and the
/// response parameters (mode, and for MC the sample count and seed).
pub fn answer_outputs(model: &LoadedModel, answer: Answer) -> Result<(Vec<OutTensor>, AnswerParameters), Error> {
    match answer {
        Answer::Eval(outputs) => {
            let out = outputs
                .into_iter()
                .zip(&model.outputs)
                .map(|(o, spec)| {
                    Ok(OutTensor {
                        name: o.name,
                        datatype: datatype(spec)?,
                        shape: o.tensor.shape().to_vec(),
                        data: OutData::Tensor(o.tensor),
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            Ok((out, AnswerParameters::Eval(EvalParameters { mode: EvalMode::Eval })))
        }
        Answer::McDropout(answer) => {
            let run = McRun::of(&answer);
            let mut out = vec![];
            let (requested, return_samples) = (answer.request.requested, answer.request.return_samples);
            let outputs = answer.outputs.into_iter().zip(&model.outputs).zip(&answer.calibrated);
            for (i, ((o, spec), calibrated)) in outputs.enumerate() {
                let returned = model.returned(i, requested, return_samples);
                let s = o.stats;
                let bools = |name: String, shape: Vec<usize>, values: Vec<bool>| OutTensor {
                    name,
                    datatype: DataType::Bool,
                    shape,
                    data: OutData::Bools(values),
                };
                let floats = |name: String, shape: Vec<usize>, values: Vec<f64>| OutTensor {
                    name,
                    datatype: DataType::F64,
                    shape,
                    data: OutData::Floats(values),
                };
                if returned.has(Statistic::Mean) {
                    out.push(OutTensor {
                        name: o.name.clone(),
                        datatype: mean_datatype(spec),
                        shape: o.shape.clone(),
                        data: OutData::Floats(s.mean),
                    });
                }
                // The same names, in the same order, as output_meta() lists.
                for (stat, values) in [(Statistic::Variance, s.variance), (Statistic::Std, s.std)] {
                    if returned.has(stat) {
                        out.push(floats(format!("{}.{}", o.name, stat.name()), o.shape.clone(), values));
                    }
                }
                if let Some(e) = s.entropy {
                    let per_position = [
                        (Statistic::PredictiveEntropy, e.predictive_entropy),
                        (Statistic::ExpectedEntropy, e.expected_entropy),
                        (Statistic::MutualInformation, e.mutual_information),
                    ];
                    for (stat, values) in per_position.into_iter().filter(|(stat, _)| returned.has(*stat)) {
                        out.push(floats(format!("{}.{}", o.name, stat.name()), e.shape.clone(), values));
                    }
                    if let Some(summary) = e.summary.as_ref().filter(|_| returned.has(Statistic::Summary)) {
                        for (statistic, shape, values) in summary.named() {
                            out.push(floats(
                                summary_name(&o.name, statistic),
                                shape.to_vec(),
                                values.to_vec(),
                            ));
                        }
                    }
                }
                let rows = o.shape[..o.shape.len().saturating_sub(1)].to_vec();
                match calibrated {
                    Some(Calibrated::Intervals(levels)) => {
                        for l in levels {
                            for (bound, values) in [("lower", &l.lower), ("upper", &l.upper)] {
                                let name = interval_name(&o.name, l.level, bound);
                                out.push(floats(name, o.shape.clone(), values.clone()));
                            }
                        }
                    }
                    Some(Calibrated::Sets(sets)) => {
                        for (level, per_row) in &sets.sets {
                            let mut mask = vec![false; per_row.len() * sets.classes];
                            for (r, set) in per_row.iter().enumerate() {
                                for &k in set {
                                    mask[r * sets.classes + k] = true;
                                }
                            }
                            out.push(bools(set_name(&o.name, *level), o.shape.clone(), mask));
                        }
                        out.push(bools(format!("{}.{REFER}", o.name), rows, sets.refer.clone()));
                    }
                    Some(Calibrated::Labels(l)) => {
                        let mut pairs = o.shape.clone();
                        pairs.push(2);
                        for (level, per_label) in &l.sets {
                            let mask = per_label
                                .iter()
                                .flat_map(|set| [set.contains(&0), set.contains(&1)])
                                .collect();
                            out.push(bools(set_name(&o.name, *level), pairs.clone(), mask));
                        }
                        out.push(bools(format!("{}.{REFER}", o.name), rows, l.refer.clone()));
                    }
                    None => {}
                }
                if let Some(raw) = s.samples.filter(|_| returned.has(Statistic::Samples)) {
                    let mut shape = vec![s.count];
                    shape.extend(&o.shape);
                    out.push(floats(format!("{}.{SAMPLES}", o.name), shape, raw));
                }
            }
            let params = AnswerParameters::McDropout(McParameters {
                mode: McMode::McDropout,
                run,
            });
            Ok((out, params))
        }
    }
}

/// Keeps the requested outputs, in the order asked (None: all of them). A name that no
/// answer of this model carries, or that only another mode's answer carries, is refused.
pub fn select<R>(
    model: &LoadedModel,
    outputs: Vec<OutTensor>,
    requested: Option<Vec<R>>,
    name_of: impl Fn(&R) -> &str,
) -> Result<Vec<(OutTensor, Option<R>)>, Error> {
    let Some(requested) = requested else {
        return Ok(outputs.into_iter().map(|o| (o, None)).collect());
    };
    let mut outputs: Vec<Option<OutTensor>> = outputs.into_iter().map(Some).collect();
    let mut chosen = vec![];
    for r in requested {
        let name = name_of(&r);
        match outputs.iter().position(|o| o.as_ref().is_some_and(|o| o.name == name)) {
            Some(i) => chosen.push((outputs[i].take().expect("found above"), Some(r))),
            None => {
                let meta = output_meta(model)?;
                return Err(match meta.iter().find(|m| m.name == name) {
                    Some(m) if m.mc_only && name.ends_with(SAMPLES) => Error::InvalidParameter(format!(
                        "output '{name}' needs the request parameters mc_samples and return_samples=true"
                    )),
                    Some(m) if m.mc_only => Error::ModeMismatch(format!(
                        "output '{name}' is an MC dropout statistic: add the request parameter mc_samples"
                    )),
                    Some(_) => Error::InvalidParameter(format!("output '{name}' is requested twice")),
                    None => Error::InvalidValue(format!(
                        "model '{}' has no output '{name}'; its outputs are {}",
                        model.name,
                        meta.iter()
                            .map(|m| format!("'{}'", m.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                });
            }
        }
    }
    Ok(chosen)
}
