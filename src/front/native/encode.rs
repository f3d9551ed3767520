//! The core's answer as the native JSON answer, serialised on the worker pool.

use crate::core::guarantees::Calibrated;
use crate::core::view::level_key;
use crate::core::view::{EntropyStats, LoadedModel, McOutput, StatSet, Statistic};
use crate::core::{Answer, McAnswer};
use crate::error::Error;
use crate::front::answer::{EvalMode, McMode, McRun};
use crate::front::rest::{JsonBytes, to_json};
use crate::front::values::{Leaves, Nested};

use super::answer::{self, ByName, EvalAnswer, Interval, PredictAnswer};

pub fn encode(model: &LoadedModel, answer: Answer) -> Result<JsonBytes, Error> {
    let answer = match &answer {
        Answer::Eval(outputs) => {
            let outputs = outputs
                .iter()
                .map(|o| {
                    let values =
                        Nested::tensor(&o.tensor).map_err(|e| Error::Internal(format!("encoding output: {e}")))?;
                    Ok((o.name.as_str(), values))
                })
                .collect::<Result<_, Error>>()?;
            PredictAnswer::Eval(EvalAnswer {
                model: &model.name,
                mode: EvalMode::Eval,
                outputs: ByName(outputs),
            })
        }
        Answer::McDropout(mc) => PredictAnswer::McDropout(mc_answer(model, mc)),
    };
    to_json(&answer)
}

fn mc_answer<'a>(model: &'a LoadedModel, mc: &'a McAnswer) -> answer::McAnswer<'a> {
    let outputs = mc
        .outputs
        .iter()
        .zip(&mc.calibrated)
        .enumerate()
        .map(|(i, (o, calibrated))| {
            let returned = model.returned(i, mc.request.requested, mc.request.return_samples);
            (o.name.as_str(), mc_output(o, returned, calibrated.as_ref()))
        })
        .collect();
    answer::McAnswer {
        model: &model.name,
        mode: McMode::McDropout,
        run: McRun::of(mc),
        outputs: ByName(outputs),
    }
}

fn mc_output<'a>(o: &'a McOutput, returned: StatSet, calibrated: Option<&'a Calibrated>) -> answer::McOutput<'a> {
    let s = &o.stats;
    let shape = &o.shape[..];
    // Per-row values of a last-axis probability output: its shape without that axis.
    let rows = &shape[..shape.len().saturating_sub(1)];
    let entropy = s.entropy.as_ref();
    let per_element = |stat: Statistic, values: &'a [f64]| returned.has(stat).then(|| Nested::floats(shape, values));
    let per_position = |stat: Statistic, values: fn(&EntropyStats) -> &[f64]| {
        entropy
            .filter(|_| returned.has(stat))
            .map(|e| Nested::floats(&e.shape, values(e)))
    };
    let mut out = answer::McOutput {
        mean: per_element(Statistic::Mean, &s.mean),
        variance: per_element(Statistic::Variance, &s.variance),
        std: per_element(Statistic::Std, &s.std),
        predictive_entropy: per_position(Statistic::PredictiveEntropy, |e| &e.predictive_entropy),
        expected_entropy: per_position(Statistic::ExpectedEntropy, |e| &e.expected_entropy),
        mutual_information: per_position(Statistic::MutualInformation, |e| &e.mutual_information),
        summary: entropy
            .and_then(|e| e.summary.as_ref())
            .filter(|_| returned.has(Statistic::Summary))
            .map(|r| {
                let named = r.named().into_iter();
                ByName(named.map(|(n, shape, v)| (n, Nested::floats(shape, v))).collect())
            }),
        samples: s
            .samples
            .as_ref()
            .filter(|_| returned.has(Statistic::Samples))
            .map(|raw| {
                let shape: Vec<usize> = [s.count].iter().chain(shape).copied().collect();
                Nested::new(shape, Leaves::Floats(raw.into()))
            }),
        intervals: None,
        prediction_sets: None,
        refer: None,
        refer_threshold: None,
        refer_target_error: None,
    };
    match calibrated {
        Some(Calibrated::Intervals(levels)) => {
            let by_level = levels.iter().map(|l| {
                let bounds = Interval {
                    lower: Nested::floats(shape, &l.lower),
                    upper: Nested::floats(shape, &l.upper),
                };
                (level_key(l.level), bounds)
            });
            out.intervals = Some(ByName(by_level.collect()));
        }
        Some(Calibrated::Sets(sets)) => {
            let by_level = sets
                .sets
                .iter()
                .map(|(level, per_row)| (level_key(*level), Nested::new(rows, Leaves::Sets(per_row))));
            out.prediction_sets = Some(ByName(by_level.collect()));
            out.refer = Some(Nested::new(rows, Leaves::Bools(sets.refer[..].into())));
            out.refer_threshold = Some(sets.refer_threshold);
            out.refer_target_error = Some(sets.refer_target_error);
        }
        Some(Calibrated::Labels(l)) => {
            let by_level = l
                .sets
                .iter()
                .map(|(level, per_label)| (level_key(*level), Nested::new(shape, Leaves::Sets(per_label))));
            out.prediction_sets = Some(ByName(by_level.collect()));
            out.refer = Some(Nested::new(rows, Leaves::Bools(l.refer[..].into())));
            out.refer_threshold = Some(l.refer_threshold);
            out.refer_target_error = Some(l.refer_target_error);
        }
        None => {}
    }
    out
}
