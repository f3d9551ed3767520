//! The native REST API: `/predict`, `/models/{name}/predict`, `/models`, `/models/{name}`,
//! `/models/{name}/drift`.
//!
//! A predict request's mode travels in its query: no `mc_samples` is eval, `mc_samples=N`
//! is MC dropout. This module only maps the query onto the core's mode parameters, wraps
//! the body, and encodes the core's answer as nested JSON.

pub mod answer;
pub mod decode;
pub mod drift;
pub mod encode;
pub mod models;

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

use crate::core::mode::{ModeLabel, ModeParams, Param};
use crate::core::view::LoadedModel;
use crate::core::{Core, Inputs, Protocol};
use crate::error::Error;
use crate::front::extract::Path;
use crate::front::rest::{self, ErrorBody, body_error};
use decode::parse_request;
use encode::encode;
use models::{ModelList, ModelMetadata, ModelRefusal};

pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/predict", post(predict_default))
        .route("/models/{name}/predict", post(predict_named))
        .route("/models", get(list_models))
        .route("/models/{name}", get(model_metadata))
        .route("/models/{name}/drift", get(model_drift))
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
    fn rows_bound(&self, model: &LoadedModel) -> usize {
        // Cheap upper bounds before parsing: rows cannot outnumber '[' characters, nor the
        // body's numbers divided by the numbers a row needs (a number is followed by a ',' or
        // closes an array). The first alone counts an image's nested arrays: 677 "rows" for
        // one 3x224x224 image, whose reservation then took the whole memory budget while it
        // was decoded, and every concurrent request got 429.
        let (mut brackets, mut commas) = (0usize, 0usize);
        for &b in self.0.iter() {
            match b {
                b'[' => brackets += 1,
                b',' => commas += 1,
                _ => {}
            }
        }
        brackets.min((commas + brackets) / model.input_values_per_row())
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

async fn list_models(State(core): State<Arc<Core>>) -> Result<Response, Error> {
    let repo = core
        .repo()
        .ok_or_else(|| Error::NotReady("models are still loading".into()))?;
    Ok(axum::Json(ModelList::new(&core, &repo)).into_response())
}

async fn model_metadata(State(core): State<Arc<Core>>, Path(name): Path<String>) -> Result<Response, Error> {
    let repo = core.repo();
    let load_failure = repo.as_ref().and_then(|r| r.failures.iter().find(|f| f.model == name));
    let m = match core.model(Some(&name)) {
        Ok(m) => m,
        // A model that never loaded: the error, with the failure itself to read.
        Err(e) => {
            return Ok(match load_failure {
                Some(f) => {
                    let refusal = ModelRefusal {
                        error: ErrorBody::from(&e),
                        name: Some(&name),
                        load_failure: Some(f.into()),
                    };
                    (e.status(), axum::Json(refusal)).into_response()
                }
                None => e.into_response(),
            });
        }
    };
    Ok(axum::Json(ModelMetadata::new(&core, &m, load_failure)).into_response())
}

/// The model's drift monitor: its last windows' tests, or why it has none.
async fn model_drift(State(core): State<Arc<Core>>, Path(name): Path<String>) -> Result<Response, Error> {
    let m = core.model(Some(&name))?;
    Ok(axum::Json(drift::DriftAnswer::new(&core, &m)).into_response())
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

#[cfg(test)]
mod rows_bound_tests {
    use super::*;
    use crate::core::Inputs;

    /// The bound before decoding is the rows, not the nested arrays of an image: three
    /// 1x8x8 digits are 28 '[' (a bound of 28 rows reserved memory for 28); and it never
    /// falls under the rows, with other numbers in the body or with named inputs.
    #[test]
    fn a_native_body_bounds_its_rows_by_its_numbers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let model = crate::core::view::load_model("digits_cnn", &dir.join("digits_cnn.onnx")).unwrap();
        let image = |v: f32| vec![vec![vec![v; 8]; 8]];
        for rows in [1usize, 3, 7] {
            let images: Vec<_> = (0..rows).map(|r| image(r as f32)).collect();
            for body in [
                serde_json::json!({ "inputs": images }),
                serde_json::json!({ "inputs": { "image": images }, "note": [1, 2, 3] }),
            ] {
                let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
                let brackets = bytes.iter().filter(|&&b| b == b'[').count();
                let bound = JsonBody(bytes).rows_bound(&model);
                // Commas between sibling arrays count too: over by at most the arrays a row
                // holds per number (9 per 64 here).
                assert!(
                    bound >= rows && bound <= rows + rows.div_ceil(4) && bound < brackets,
                    "{rows} rows: bound {bound} ({brackets} '[')"
                );
            }
        }
    }
}
