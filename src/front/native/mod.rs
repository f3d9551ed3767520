//! The native REST API: `/predict`, `/models/{name}/predict`, `/models`, `/models/{name}`.
//!
//! A predict request's mode travels in its query: no `mc_samples` is eval, `mc_samples=N`
//! is MC dropout. This module only maps the query onto the core's mode parameters, wraps
//! the body, and encodes the core's answer as nested JSON.

pub mod decode;
pub mod encode;

/// The decoder under the path `src/calibrate.rs` imports it from.
pub mod json {
    pub use super::decode::parse_request;
}

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::core::calibrated::Calibrated;
use crate::core::mode::{ModeLabel, ModeParams, Param};
use crate::core::{Answer, Core, Inputs, Protocol};
use crate::engine::calibration::level_key;
use crate::engine::model::LoadedModel;
use crate::error::Error;
use crate::front::extract::Path;
use crate::front::rest::{self, JsonBytes, body_error};
use decode::parse_request;
use encode::{floats_to_json, nest, tensor_to_json};

pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/predict", post(predict_default))
        .route("/models/{name}/predict", post(predict_named))
        .route("/models", get(list_models))
        .route("/models/{name}", get(model_metadata))
}

async fn predict_default(
    State(core): State<Arc<Core>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    predict(core, None, query, body).await
}

async fn predict_named(
    State(core): State<Arc<Core>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    predict(core, Some(name), query, body).await
}

/// A native JSON body: `{"inputs": <nested array>}` or `{"inputs": {"<name>": ...}}`.
struct JsonBody(Bytes);

impl Inputs for JsonBody {
    fn rows_bound(&self) -> usize {
        // Cheap upper bound before parsing: rows cannot outnumber '[' characters.
        self.0.iter().filter(|&&b| b == b'[').count()
    }

    fn decode(self, model: &LoadedModel) -> Result<Vec<tract_onnx::prelude::Tensor>, Error> {
        parse_request(model, &self.0)
    }
}

/// The query string's pairs, percent-decoded, as mode parameters (text values: the core
/// reads them).
fn mode_params(query: Option<&str>) -> Result<ModeParams, (ModeLabel, Error)> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
        (
            ModeLabel::Eval,
            Error::InvalidParameter(format!("query string is malformed: {e}")),
        )
    })?;
    let mut params = ModeParams::default();
    let mut refused = None;
    for (k, v) in pairs {
        if let Err(e) = params.set(&k, Param::Str(v), "query parameter") {
            refused.get_or_insert(e);
        }
    }
    match refused {
        Some(e) => Err((params.label(), e)),
        None => Ok(params),
    }
}

async fn predict(
    core: Arc<Core>,
    model: Option<String>,
    query: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let decoded = mode_params(query.as_deref()).and_then(|params| match body {
        Ok(body) => Ok((params, JsonBody(body), encode)),
        Err(rejection) => Err((params.label(), body_error(&core, rejection))),
    });
    rest::predict(&core, Protocol::Native, model, decoded).await
}

/// The native answer, serialised on the worker pool.
fn encode(model: &LoadedModel, answer: Answer) -> Result<JsonBytes, Error> {
    let mut out = serde_json::Map::new();
    let body = match answer {
        Answer::Eval(outputs) => {
            for o in &outputs {
                out.insert(o.name.clone(), tensor_to_json(&o.tensor)?);
            }
            json!({"model": model.name, "mode": "eval", "outputs": out})
        }
        Answer::McDropout(answer) => {
            for (o, calibrated) in answer.outputs.into_iter().zip(&answer.calibrated) {
                let s = &o.stats;
                let mut entry = serde_json::Map::new();
                entry.insert("mean".into(), floats_to_json(&o.shape, &s.mean));
                entry.insert("variance".into(), floats_to_json(&o.shape, &s.variance));
                entry.insert("std".into(), floats_to_json(&o.shape, &s.std));
                if let Some(e) = &s.entropy {
                    let rows_shape = &o.shape[..o.shape.len() - 1];
                    entry.insert(
                        "predictive_entropy".into(),
                        floats_to_json(rows_shape, &e.predictive_entropy),
                    );
                    entry.insert(
                        "expected_entropy".into(),
                        floats_to_json(rows_shape, &e.expected_entropy),
                    );
                    entry.insert(
                        "mutual_information".into(),
                        floats_to_json(rows_shape, &e.mutual_information),
                    );
                }
                if let Some(raw) = &s.samples {
                    let mut shape = vec![s.count];
                    shape.extend(&o.shape);
                    entry.insert("samples".into(), floats_to_json(&shape, raw));
                }
                if let Some(c) = calibrated {
                    calibrated_json(&mut entry, &o.shape, c);
                }
                out.insert(o.name, Value::Object(entry));
            }
            let mut body = json!({
                "model": model.name,
                "mode": "mc_dropout",
                "mc_samples": answer.samples,
                "seed": answer.request.seed,
            });
            if let Some(auto) = answer.auto {
                body["mc_converged"] = auto.converged.into();
                body["mc_se"] = auto.se.into();
                body["mc_max"] = auto.max.into();
            }
            body["outputs"] = Value::Object(out);
            body
        }
    };
    serde_json::to_vec(&body)
        .map(JsonBytes)
        .map_err(|e| Error::Internal(format!("encoding the answer: {e}")))
}

/// A calibrated output's fields: `intervals` keyed by level, each bound shaped like the
/// mean; or `prediction_sets` keyed by level (class indices per row), `refer` per row and
/// the threshold and target behind it.
fn calibrated_json(entry: &mut serde_json::Map<String, Value>, shape: &[usize], c: &Calibrated) {
    match c {
        Calibrated::Intervals(levels) => {
            let mut by_level = serde_json::Map::new();
            for l in levels {
                by_level.insert(
                    level_key(l.level),
                    json!({"lower": floats_to_json(shape, &l.lower), "upper": floats_to_json(shape, &l.upper)}),
                );
            }
            entry.insert("intervals".into(), Value::Object(by_level));
        }
        Calibrated::Sets(sets) => {
            let rows_shape = &shape[..shape.len().saturating_sub(1)];
            let mut by_level = serde_json::Map::new();
            for (level, rows) in &sets.sets {
                let mut rows = rows.iter().map(|set| json!(set));
                by_level.insert(level_key(*level), nest(rows_shape, &mut rows));
            }
            entry.insert("prediction_sets".into(), Value::Object(by_level));
            let mut refer = sets.refer.iter().map(|r| Value::Bool(*r));
            entry.insert("refer".into(), nest(rows_shape, &mut refer));
            entry.insert("refer_threshold".into(), json!(sets.refer_threshold));
            entry.insert("refer_target_error".into(), json!(sets.refer_target_error));
        }
    }
}

async fn list_models(State(core): State<Arc<Core>>) -> Result<Response, Error> {
    let repo = core
        .repo()
        .ok_or_else(|| Error::NotReady("models are still loading".into()))?;
    let models: Vec<Value> = repo
        .models
        .values()
        .map(|m| {
            json!({
                "name": m.name,
                "default": core.default_model.as_deref() == Some(m.name.as_str()),
                "healthy": m.healthy(),
                "mc_available": m.mc_unavailable_reason().is_none(),
                "dropout_sites": m.sampling_sites(),
                "description": m.config.description,
            })
        })
        .collect();
    Ok(
        axum::Json(json!({"default_model": core.default_model, "models": models, "load_failures": repo.failures}))
            .into_response(),
    )
}

async fn model_metadata(State(core): State<Arc<Core>>, Path(name): Path<String>) -> Result<Response, Error> {
    let repo = core.repo();
    let load_failure = repo.as_ref().and_then(|r| r.failures.iter().find(|f| f.model == name));
    let m = match core.model(Some(&name)) {
        Ok(m) => m,
        // A model that never loaded: the error, with the failure itself to read.
        Err(e) => {
            return Ok(match load_failure {
                Some(f) => (
                    e.status(),
                    axum::Json(
                        json!({"error": e.to_string(), "error_type": e.error_type(), "name": name, "load_failure": f}),
                    ),
                )
                    .into_response(),
                None => e.into_response(),
            });
        }
    };
    Ok(axum::Json(json!({
        "name": m.name,
        "file": m.path.file_name().map(|f| f.to_string_lossy()),
        "description": m.config.description,
        "default": core.default_model.as_deref() == Some(m.name.as_str()),
        "inputs": m.inputs,
        "outputs": m.outputs,
        "probability_outputs": m.probability_output_names(),
        "batch_dim": m.batch_symbol,
        "dropout_sites": m.sites,
        "graph_fixes": m.fixes,
        "self_checks": m.checks,
        "healthy": m.healthy(),
        "mc_available": m.mc_unavailable_reason().is_none(),
        "mc_unavailable_reason": m.mc_unavailable_reason(),
        "max_mc_samples": core.limits.max_mc_samples,
        "refer_target_error": m.calibration.as_ref().map(|c| c.refer_target),
        "calibration": m.calibration.as_ref().map(|c| json!({
            "file": c.path.file_name().map(|f| f.to_string_lossy()),
            "summary": c.file,
        })),
        "load_failure": load_failure,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn query_keys_are_percent_decoded_before_the_mode_is_read() {
        let p = mode_params(Some("mc%5Fsamples=5&seed=1")).unwrap();
        assert_eq!(p.label(), ModeLabel::McDropout);
        let (label, e) = mode_params(Some("mc_samples=5&mc_sample=1")).unwrap_err();
        assert_eq!(label, ModeLabel::McDropout);
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::core::mode::{Mode, decide};
    use axum::http::StatusCode;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any query string: mode parameters, or a 422; never a panic.
        #[test]
        fn any_query_is_read_or_a_422(q in "[a-z_%&=;+0-9A-F.\\-]{0,40}", raw in ".{0,20}") {
            for q in [q.as_str(), raw.as_str()] {
                if let Err((_, e)) = mode_params(Some(q)) {
                    prop_assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY, "{}", e);
                }
            }
        }

        /// A well-formed MC query, with its keys and values percent-encoded or not, decides
        /// the mode it says.
        #[test]
        fn mc_queries_decide_what_they_say(n in 2usize..100, seed in any::<u64>(), ret in any::<bool>(), encode in any::<bool>()) {
            let key = |k: &str| if encode { k.replace('_', "%5F") } else { k.to_string() };
            let q = format!("{}={n}&{}={seed}&{}={ret}", key("mc_samples"), key("seed"), key("return_samples"));
            let params = mode_params(Some(&q)).map_err(|(_, e)| e).unwrap();
            prop_assert_eq!(params.label(), ModeLabel::McDropout);
            let Ok(Mode::McDropout(mc)) = decide(&params, 100) else {
                return Err(TestCaseError::fail("not MC"));
            };
            prop_assert_eq!((mc.samples.bound(), mc.seed, mc.return_samples), (n, seed, ret));
        }
    }
}
