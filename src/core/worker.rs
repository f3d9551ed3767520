//! What an inference thread does with a group of jobs the queue hands it: decode each
//! request, plan its passes, run them, and answer every job. The one home of pass planning:
//! which requests share a pass ([`pass_class`] before decoding, [`next_pass`] after), and
//! how many rows or samples a pass holds (the engine's sizing, read here, in the MC draw
//! and in the memory estimate alike).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use crate::core::admission::panic_message;
use crate::core::mode::{McCount, McRequest, Mode};
use crate::core::queue::{Job, PassClass, Pending};
use crate::core::{Answer, Core, McAnswer, adaptive, drift, guarantees, memory_budget};
use crate::engine::conformal::METRIC_SET_LEVEL;
use crate::engine::model::{InputRows, LoadedModel, McOutput, McPart, McSamples, NamedTensor, padded_rows};
use crate::error::Error;

/// The class of a job's pass; None: it runs alone.
pub(crate) fn pass_class(model: &LoadedModel, mode: &Mode) -> Option<PassClass> {
    if !model.merges() {
        return None;
    }
    match mode {
        Mode::Eval => Some(PassClass::Eval),
        Mode::McDropout(mc) => match mc.samples {
            McCount::Fixed(n) => Some(PassClass::Mc(n.get())),
            McCount::Auto { .. } => None,
        },
    }
}

/// A decoded job: its request, and its rows as the model's input tensors.
pub(crate) struct Decoded {
    job: Job,
    batch: InputRows,
}

/// One pass of a worker, typed by what runs in it.
enum Pass {
    /// One request, in as many engine passes as it needs: eval split by rows, MC by
    /// samples (`auto` in chunks).
    Alone(Decoded),
    /// Eval requests, concatenated on the batch axis.
    Eval(Vec<Decoded>),
    /// MC requests of one fixed sample count, each with its own seed, masks and statistics.
    Mc {
        samples: McSamples,
        parts: Vec<(Decoded, McRequest)>,
    },
}

/// What may join a merged pass: the most request rows, from `--max-pass-rows`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassLimits {
    pub max_pass_rows: usize,
}

/// Takes the next pass off `decoded`: its first job, and the following jobs that can share
/// its pass (same pass class, same shape, within the row cap and one pass's memory).
fn next_pass(decoded: &mut Vec<Decoded>, limits: PassLimits) -> Pass {
    let first = decoded.remove(0);
    let model = first.job.model.clone();
    let rows = first.batch.rows();
    // A model whose sums a row's place can move keeps each request where it runs alone
    // (`engine::kernels`); so does a request that fills a pass by itself.
    if !model.merges() || model.row_granularity(&first.batch) > 1 || rows >= limits.max_pass_rows {
        return Pass::Alone(first);
    }
    // A merged pass runs at its padded size, which must fit one pass's memory budget.
    let fits = |rows: usize, batch: &InputRows, samples: usize| match samples {
        1 => model.eval_one_pass(padded_rows(rows)),
        k => model.mc_one_pass(padded_rows(rows), LoadedModel::row_elements(batch), k),
    };
    let shares = |first: &Decoded, d: &Decoded, together: usize, samples: usize| {
        Arc::ptr_eq(&d.job.model, &model)
            && together <= limits.max_pass_rows
            && model.same_pass(&first.batch, &d.batch)
            && fits(together, &d.batch, samples)
    };
    match first.job.mode {
        Mode::Eval if fits(rows, &first.batch, 1) => {
            let parts = gather((first, ()), decoded, |first, d, together| {
                (matches!(d.job.mode, Mode::Eval) && shares(first, d, together, 1)).then_some(())
            });
            match parts.len() {
                1 => Pass::Alone(parts.into_iter().next().expect("one part").0),
                _ => Pass::Eval(parts.into_iter().map(|(d, ())| d).collect()),
            }
        }
        Mode::McDropout(
            request @ McRequest {
                samples: McCount::Fixed(samples),
                ..
            },
        ) if fits(rows, &first.batch, samples.get()) => {
            let parts = gather((first, request), decoded, |first, d, together| match d.job.mode {
                Mode::McDropout(
                    r @ McRequest {
                        samples: McCount::Fixed(n),
                        ..
                    },
                ) if n == samples && shares(first, d, together, n.get()) => Some(r),
                _ => None,
            });
            match parts.len() {
                1 => Pass::Alone(parts.into_iter().next().expect("one part").0),
                _ => Pass::Mc { samples, parts },
            }
        }
        _ => Pass::Alone(first),
    }
}

/// `first`, then every job of `decoded` that `joins` admits (given the first job and the
/// rows the pass would hold with it), in order, with what `joins` said of each; the rest
/// stay in `decoded`.
fn gather<T>(
    first: (Decoded, T),
    decoded: &mut Vec<Decoded>,
    mut joins: impl FnMut(&Decoded, &Decoded, usize) -> Option<T>,
) -> Vec<(Decoded, T)> {
    let mut together = first.0.batch.rows();
    let mut parts = vec![first];
    let mut i = 0;
    while i < decoded.len() {
        match joins(&parts[0].0, &decoded[i], together + decoded[i].batch.rows()) {
            Some(t) => {
                together += decoded[i].batch.rows();
                parts.push((decoded.remove(i), t));
            }
            None => i += 1,
        }
    }
    parts
}

impl Pass {
    /// The jobs of the pass, in order.
    fn jobs(&self) -> Vec<&Decoded> {
        match self {
            Pass::Alone(d) => vec![d],
            Pass::Eval(parts) => parts.iter().collect(),
            Pass::Mc { parts, .. } => parts.iter().map(|(d, _)| d).collect(),
        }
    }

    fn into_jobs(self) -> Vec<Job> {
        match self {
            Pass::Alone(d) => vec![d.job],
            Pass::Eval(parts) => parts.into_iter().map(|d| d.job).collect(),
            Pass::Mc { parts, .. } => parts.into_iter().map(|(d, _)| d.job).collect(),
        }
    }
}

impl Core {
    /// Runs a group of jobs the queue took together (on an inference thread): decodes each,
    /// plans its passes, runs each pass and answers every job.
    pub(crate) fn serve_group(&self, group: Vec<Job>) {
        let mut decoded: Vec<Decoded> = Vec::with_capacity(group.len());
        for mut job in group {
            if job.request.abandoned() {
                continue;
            }
            self.metrics
                .queue_duration
                .with_label_values(&[job.model.name.as_str(), job.mode.label().as_str()])
                .observe(job.enqueued.elapsed().as_secs_f64());
            let model = job.model.clone();
            let batch = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let batch = self.decode(&model, job.request.as_mut())?;
                let granularity = model.row_granularity(&batch);
                let bytes = self
                    .memory
                    .request_bytes(&model, batch.rows(), granularity, &job.mode)?;
                job.request.shrink_reservation(bytes);
                Ok(batch)
            }));
            match batch {
                Ok(Ok(batch)) => decoded.push(Decoded { job, batch }),
                Ok(Err(e)) => self.respond(job, Err(e)),
                Err(panic) => {
                    let e = self.panicked(&*panic);
                    self.respond(job, Err(e))
                }
            }
        }
        let limits = PassLimits {
            max_pass_rows: self.limits.max_pass_rows,
        };
        while !decoded.is_empty() {
            let pass = next_pass(&mut decoded, limits);
            let t = Instant::now();
            let answers = std::panic::catch_unwind(AssertUnwindSafe(|| self.run_pass(&pass)));
            let seconds = t.elapsed().as_secs_f64();
            let jobs = pass.jobs();
            let labels = [jobs[0].job.model.name.as_str(), jobs[0].job.mode.label().as_str()];
            self.metrics
                .batch_rows
                .with_label_values(&labels)
                .observe(jobs.iter().map(|d| d.batch.rows()).sum::<usize>() as f64);
            let timer = self.metrics.inference_duration.with_label_values(&labels);
            let answers = match answers {
                Ok(answers) => answers,
                Err(panic) => {
                    let e = self.panicked(&*panic);
                    jobs.iter().map(|_| Err(e.clone())).collect()
                }
            };
            for (job, answer) in pass.into_jobs().into_iter().zip(answers) {
                timer.observe(seconds);
                self.respond(job, answer);
            }
        }
    }

    /// Runs one pass; per job, its answer.
    fn run_pass(&self, pass: &Pass) -> Vec<Result<Answer, Error>> {
        match pass {
            Pass::Alone(d) => vec![self.alone(&d.job.model, &d.batch, d.job.mode)],
            Pass::Eval(parts) => {
                let model = &parts[0].job.model;
                let batches: Vec<&InputRows> = parts.iter().map(|d| &d.batch).collect();
                let rows = padded_rows(batches.iter().map(|b| b.rows()).sum());
                self.metrics
                    .pass_memory
                    .with_label_values(&[model.name.as_str(), "eval"])
                    .observe(model.eval_pass_bytes(rows) as f64);
                match model.eval_session().run_merged(&batches) {
                    Ok(outputs) => parts
                        .iter()
                        .zip(outputs)
                        .map(|(d, o)| Ok(self.eval_answer(model, d.batch.rows(), o)))
                        .collect(),
                    Err(e) => {
                        let e = Error::from(e);
                        parts.iter().map(|_| Err(e.clone())).collect()
                    }
                }
            }
            Pass::Mc { samples, parts } => {
                let model = &parts[0].0.job.model;
                let mc: Vec<McPart> = parts
                    .iter()
                    .map(|(d, request)| McPart {
                        batch: &d.batch,
                        seed: request.seed,
                        keep_samples: request.return_samples,
                    })
                    .collect();
                let rows = padded_rows(mc.iter().map(|p| p.batch.rows()).sum());
                self.metrics
                    .pass_memory
                    .with_label_values(&[model.name.as_str(), "mc_dropout"])
                    .observe(model.mc_pass_bytes(rows, samples.get()) as f64);
                let outputs = model.mc_session().and_then(|s| s.run_merged(&mc, *samples));
                match outputs {
                    Ok(outputs) => parts
                        .iter()
                        .zip(outputs)
                        .map(|((_, request), outputs)| self.mc_answer(model, *request, outputs, samples.get(), None))
                        .collect(),
                    Err(e) => {
                        let e = Error::from(e);
                        parts.iter().map(|_| Err(e.clone())).collect()
                    }
                }
            }
        }
    }

    /// Encodes and sends a job's answer, counting a panic of its encoder.
    fn respond(&self, job: Job, answer: Result<Answer, Error>) {
        if let Some(panic) = job.request.respond(&job.model, answer) {
            self.panicked_message(&panic);
        }
    }

    fn panicked(&self, panic: &(dyn std::any::Any + Send)) -> Error {
        self.panicked_message(&panic_message(panic))
    }

    fn panicked_message(&self, message: &str) -> Error {
        self.metrics.panics.inc();
        tracing::error!(panic = %message, "inference panicked");
        Error::Internal("inference panicked; the server keeps serving".into())
    }

    /// A request's body, decoded into the model's inputs, within the row limit.
    fn decode(&self, model: &LoadedModel, inputs: &mut dyn Pending) -> Result<InputRows, Error> {
        let batch = model.input_rows(inputs.decode(model)?)?;
        let max_rows = self.limits.max_batch_rows;
        if batch.rows() > max_rows {
            return Err(Error::PayloadTooLarge(format!(
                "batch of {} rows exceeds the limit of {max_rows}",
                batch.rows()
            )));
        }
        Ok(batch)
    }

    /// One request alone: eval, or MC in as many passes as it needs (`auto` included).
    fn alone(&self, model: &LoadedModel, batch: &InputRows, mode: Mode) -> Result<Answer, Error> {
        let answer = match mode {
            Mode::Eval => self.eval_answer(model, batch.rows(), model.eval_session().run(batch)?),
            Mode::McDropout(request) => {
                let (outputs, samples, auto) = adaptive::draw(&model.mc_session()?, batch, request)?;
                self.mc_answer(model, request, outputs, samples, auto)?
            }
        };
        let drawn = match &answer {
            Answer::McDropout(a) => a.samples,
            Answer::Eval(_) => 1,
        };
        let passes = self
            .metrics
            .pass_memory
            .with_label_values(&[model.name.as_str(), mode.label().as_str()]);
        for bytes in memory_budget::pass_bytes(model, batch, &mode, drawn) {
            passes.observe(bytes as f64);
        }
        Ok(answer)
    }

    /// An eval request's answer, its rows recorded by the model's eval drift monitor.
    fn eval_answer(&self, model: &LoadedModel, rows: usize, outputs: Vec<NamedTensor>) -> Answer {
        if let Some(monitor) = self.drift_monitors(&model.name).and_then(|m| m.eval) {
            let probability: Vec<bool> = model.probability_classes.iter().map(Option::is_some).collect();
            self.drift_tester
                .record(&monitor, &drift::Observed::eval(&outputs, &probability), rows);
        }
        Answer::Eval(outputs)
    }

    /// An MC request's answer from its samples' summaries: the calibrated additions, and
    /// the metrics that describe its uncertainty.
    fn mc_answer(
        &self,
        model: &LoadedModel,
        request: McRequest,
        outputs: Vec<McOutput>,
        samples: usize,
        auto: Option<adaptive::AutoOutcome>,
    ) -> Result<Answer, Error> {
        self.metrics
            .mc_samples
            .with_label_values(&[model.name.as_str()])
            .observe(samples as f64);
        for o in &outputs {
            if let Some(e) = &o.stats.entropy {
                let hist = self
                    .metrics
                    .predictive_entropy
                    .with_label_values(&[model.name.as_str(), o.name.as_str()]);
                // One observation per row: a 512×512 map is one image, not 262,144 values.
                let per_row = match &e.summary {
                    Some(summary) => &summary.mean_predictive_entropy,
                    None => &e.predictive_entropy,
                };
                for h in per_row {
                    hist.observe(*h);
                }
            }
        }
        if let Some(monitor) = self.drift_monitors(&model.name).and_then(|m| m.mc) {
            let rows = outputs.first().and_then(|o| o.shape.first()).copied().unwrap_or(0);
            self.drift_tester.record(&monitor, &drift::Observed::mc(&outputs), rows);
        }
        let calibrated = guarantees::compute(model, &outputs)?;
        self.record_calibrated(model, &outputs, &calibrated);
        Ok(Answer::McDropout(McAnswer {
            request,
            samples,
            auto,
            outputs,
            calibrated,
        }))
    }

    /// Counts what a calibrated answer says: the rows referred, and each row's set size.
    fn record_calibrated(
        &self,
        model: &LoadedModel,
        outputs: &[McOutput],
        calibrated: &[Option<guarantees::Calibrated>],
    ) {
        for (o, c) in outputs.iter().zip(calibrated) {
            let labels = [model.name.as_str(), o.name.as_str()];
            let refer = match c {
                Some(guarantees::Calibrated::Sets(sets)) => &sets.refer,
                Some(guarantees::Calibrated::Labels(l)) => &l.refer,
                _ => continue,
            };
            let referred = refer.iter().filter(|r| **r).count();
            self.metrics
                .referrals
                .with_label_values(&labels)
                .inc_by(referred as u64);
            // A multi-label set is per label, not a set of classes: no set size to count.
            let Some(guarantees::Calibrated::Sets(sets)) = c else {
                continue;
            };
            let sizes = self.metrics.prediction_set_size.with_label_values(&labels);
            let at = |(level, _): &&(f64, Vec<Vec<usize>>)| *level == METRIC_SET_LEVEL;
            for row in sets.sets.iter().find(at).map(|(_, rows)| rows).into_iter().flatten() {
                sizes.observe(row.len() as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::Tensor;

    /// A job's request side, for planning only: never decoded or answered here.
    struct Planned;
    impl Pending for Planned {
        fn abandoned(&self) -> bool {
            false
        }
        fn decode(&mut self, _: &LoadedModel) -> Result<Vec<Tensor>, Error> {
            unreachable!("the planner works on decoded jobs")
        }
        fn shrink_reservation(&mut self, _: u64) {}
        fn respond(self: Box<Self>, _: &LoadedModel, _: Result<Answer, Error>) -> Option<String> {
            None
        }
    }

    fn model(name: &str) -> Arc<LoadedModel> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        Arc::new(crate::engine::repo::load_model(name, &dir.join(format!("{name}.onnx"))).unwrap())
    }

    fn mc(samples: usize, seed: u64) -> Mode {
        Mode::McDropout(McRequest {
            samples: McCount::Fixed(McSamples::new(samples).unwrap()),
            seed,
            return_samples: false,
            requested: crate::engine::statistics::Requested::Defaults,
        })
    }

    fn auto() -> Mode {
        Mode::McDropout(McRequest {
            samples: McCount::Auto {
                max: McSamples::new(64).unwrap(),
                se: 0.01,
            },
            seed: 0,
            return_samples: false,
            requested: crate::engine::statistics::Requested::Defaults,
        })
    }

    /// A decoded job of `rows` rows of zeros; `tag` (its seed, for MC) tells jobs apart.
    fn job(model: &Arc<LoadedModel>, mode: Mode, rows: usize) -> Decoded {
        let width: usize = match &model.inputs[0].shape[1] {
            crate::engine::model::Dim::Fixed(n) => *n,
            other => panic!("{other:?}"),
        };
        let batch = model
            .input_rows(vec![Tensor::zero::<f32>(&[rows, width]).unwrap()])
            .unwrap();
        Decoded {
            job: Job {
                class: pass_class(model, &mode),
                model: model.clone(),
                mode,
                enqueued: Instant::now(),
                request: Box::new(Planned),
            },
            batch,
        }
    }

    /// A pass's jobs, as (rows, seed or 0 for eval).
    fn shape(pass: &Pass) -> (&'static str, Vec<(usize, u64)>) {
        let of = |d: &Decoded| {
            let seed = match d.job.mode {
                Mode::McDropout(r) => r.seed,
                Mode::Eval => 0,
            };
            (d.batch.rows(), seed)
        };
        match pass {
            Pass::Alone(d) => ("alone", vec![of(d)]),
            Pass::Eval(parts) => ("eval", parts.iter().map(of).collect()),
            Pass::Mc { parts, .. } => ("mc", parts.iter().map(|(d, _)| of(d)).collect()),
        }
    }

    fn plan(mut decoded: Vec<Decoded>, max_pass_rows: usize) -> Vec<(&'static str, Vec<(usize, u64)>)> {
        let mut passes = vec![];
        while !decoded.is_empty() {
            passes.push(shape(&next_pass(&mut decoded, PassLimits { max_pass_rows })));
        }
        passes
    }

    #[test]
    fn eval_requests_share_a_pass_up_to_the_row_cap_in_arrival_order() {
        let m = model("breast_cancer");
        let jobs = [1, 2, 3, 1].map(|r| job(&m, Mode::Eval, r));
        assert_eq!(
            plan(jobs.into(), 4),
            vec![("eval", vec![(1, 0), (2, 0), (1, 0)]), ("alone", vec![(3, 0)])]
        );
    }

    #[test]
    fn mc_requests_share_a_pass_only_with_the_same_fixed_count() {
        let m = model("breast_cancer");
        let jobs = vec![
            job(&m, mc(20, 1), 1),
            job(&m, mc(12, 2), 1),
            job(&m, auto(), 1),
            job(&m, Mode::Eval, 1),
            job(&m, mc(20, 3), 2),
            job(&m, mc(12, 4), 1),
        ];
        assert_eq!(
            plan(jobs, 256),
            vec![
                ("mc", vec![(1, 1), (2, 3)]),
                ("mc", vec![(1, 2), (1, 4)]),
                ("alone", vec![(1, 0)]),
                ("alone", vec![(1, 0)]),
            ]
        );
    }

    #[test]
    fn requests_of_another_model_never_share_a_pass() {
        let (a, b) = (model("breast_cancer"), model("diabetes"));
        let jobs = vec![job(&a, Mode::Eval, 1), job(&b, Mode::Eval, 1), job(&a, Mode::Eval, 1)];
        assert_eq!(
            plan(jobs, 256),
            vec![("eval", vec![(1, 0), (1, 0)]), ("alone", vec![(1, 0)])]
        );
    }

    /// A merged pass runs at its padded size (the next power of two of its rows), which
    /// must fit one pass's memory budget; a request alone may still split into passes.
    #[test]
    fn a_merged_pass_must_fit_one_pass_of_memory() {
        let m = model("breast_cancer");
        m.set_pass_budget(m.eval_pass_bytes(2));
        let jobs = [1, 1, 1].map(|r| job(&m, Mode::Eval, r));
        assert_eq!(
            plan(jobs.into(), 256),
            vec![("eval", vec![(1, 0), (1, 0)]), ("alone", vec![(1, 0)])]
        );
        m.set_pass_budget(m.mc_pass_bytes(2, 20));
        let jobs = vec![job(&m, mc(20, 1), 1), job(&m, mc(20, 2), 1), job(&m, mc(20, 3), 1)];
        assert_eq!(
            plan(jobs, 256),
            vec![("mc", vec![(1, 1), (1, 2)]), ("alone", vec![(1, 3)])]
        );
    }
}
