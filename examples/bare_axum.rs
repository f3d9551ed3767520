//! The HTTP baseline for `bench/run`: a bare axum 0.8 server whose POST handlers read and
//! discard the request body (no parsing, no model) and answer a fixed JSON body the size of
//! the real server's answer. Same runtime as the server (tokio multi-threaded, one worker
//! per core), so the load test's ratio server / bare-axum is the server's own overhead:
//! JSON parsing, validation, admission, the hand-off to inference, inference, response
//! building, metrics and logging.
//!
//! `cargo run --release --example bare_axum -- 127.0.0.1:PORT [ANSWER]`
//!
//! - no ANSWER: `POST /predict` answers the server's eval answer for a breast_cancer row;
//! - ANSWER a file: `POST /predict` answers its contents;
//! - ANSWER a folder: `POST /models/{name}/predict` answers `ANSWER/{name}.eval.json`, or
//!   `ANSWER/{name}.mc.json` when the query string names `mc_samples` (bench/bench.py writes
//!   the real server's answers there, per model and mode). An unknown name is a 404.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

/// The real server's answer to `POST /predict` with the first breast_cancer reference row.
const DEFAULT_ANSWER: &str =
    r#"{"mode":"eval","model":"breast_cancer","outputs":{"probabilities":[[0.9999998807907104,7.50474029587167e-8]]}}"#;

fn read(path: &std::path::Path) -> &'static str {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Box::leak(text.trim_end().to_string().into_boxed_str())
}

/// Per model: (eval answer, MC answer).
fn answers_in(dir: &std::path::Path) -> HashMap<String, (&'static str, &'static str)> {
    let mut answers = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("listing the answers").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
        if let Some(name) = file.strip_suffix(".eval.json") {
            let mc = path.with_file_name(format!("{name}.mc.json"));
            answers.insert(name.to_string(), (read(&path), read(&mc)));
        }
    }
    assert!(!answers.is_empty(), "no NAME.eval.json in {}", dir.display());
    answers
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18090".into());
    assert!(
        addr.starts_with("127.") || addr.starts_with("localhost:") || addr.starts_with("[::1]:"),
        "bare_axum only listens on loopback, got {addr}"
    );
    let arg = args.next().map(std::path::PathBuf::from);
    let app = match arg {
        Some(dir) if dir.is_dir() => {
            let answers: &'static HashMap<String, (&'static str, &'static str)> = Box::leak(Box::new(answers_in(&dir)));
            eprintln!("bare_axum: answers for {:?}", answers.keys().collect::<Vec<_>>());
            let predict = move |Path(name): Path<String>, RawQuery(query): RawQuery, body: Bytes| async move {
                drop(body);
                match answers.get(&name) {
                    Some((eval, mc)) => {
                        let mc_mode = query.is_some_and(|q| q.contains("mc_samples"));
                        (
                            [(header::CONTENT_TYPE, "application/json")],
                            if mc_mode { *mc } else { *eval },
                        )
                            .into_response()
                    }
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            };
            Router::new().route("/models/{name}/predict", post(predict))
        }
        other => {
            let answer = other.as_deref().map(read).unwrap_or(DEFAULT_ANSWER);
            eprintln!("bare_axum: answer {} bytes", answer.len());
            let predict = move |body: Bytes| async move {
                drop(body);
                ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
            };
            Router::new().route("/predict", post(predict))
        }
    };
    let app = app.route("/health/ready", get(|| async { "ready" }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("binding");
    eprintln!("bare_axum listening on {addr}");
    axum::serve(listener, app).await.expect("serving");
}
