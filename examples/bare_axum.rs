//! The HTTP baseline for `bench/run`: a bare axum 0.8 server whose POST handler reads and
//! discards the request body (no parsing, no model) and answers a fixed JSON body — by
//! default one the size of the real server's eval answer for a breast_cancer row. Same
//! runtime as the server (tokio multi-threaded, one worker per core), so the load test's
//! ratio server / bare-axum is the server's own overhead: JSON parsing, validation,
//! admission, the worker hand-off, inference, response building, metrics and logging.
//!
//! `cargo run --release --example bare_axum -- 127.0.0.1:PORT [answer.json]`

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

/// The real server's answer to `POST /predict` with the first breast_cancer reference row.
const DEFAULT_ANSWER: &str =
    r#"{"mode":"eval","model":"breast_cancer","outputs":{"probabilities":[[0.9999998807907104,7.50474029587167e-8]]}}"#;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18090".into());
    assert!(
        addr.starts_with("127.") || addr.starts_with("localhost:") || addr.starts_with("[::1]:"),
        "bare_axum only listens on loopback, got {addr}"
    );
    let answer: &'static str = match args.next() {
        Some(path) => {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
            Box::leak(text.trim_end().to_string().into_boxed_str())
        }
        None => DEFAULT_ANSWER,
    };
    let predict = move |body: Bytes| async move {
        drop(body);
        ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
    };
    let app = Router::new()
        .route("/predict", post(predict))
        .route("/health/ready", get(|| async { "ready" }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("binding");
    eprintln!("bare_axum listening on {addr}, answer {} bytes", answer.len());
    axum::serve(listener, app).await.expect("serving");
}
