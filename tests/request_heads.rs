//! Requests refused for their head, over a raw TCP socket (issue 25, F8): what reaches the
//! app is answered with a JSON error; what hyper refuses before a request exists is
//! answered by hyper with an empty body, and the README lists those cases.

mod common;

use std::time::Duration;

use common::*;
use mcd_serve::config::ServeArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection; the status and the body of the answer.
async fn raw(base: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    // The server may answer and close before reading all of a large head.
    let _ = stream.write_all(request).await;
    let mut got = vec![];
    let mut chunk = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk)).await {
            Err(_) => panic!("no answer, and the connection stayed open"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The first 200 characters of an answer, for a failure message.
fn short(body: &str) -> String {
    body.chars().take(200).collect()
}

fn error_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON: {body:?}: {e}"));
    v["error_type"]
        .as_str()
        .unwrap_or_else(|| panic!("no error_type in {v}"))
        .to_string()
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n").into_bytes()
}

#[tokio::test]
async fn heads_over_our_limits_get_json_414_and_431() {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    // A 10 KB model name: past our URI limit, within hyper's.
    let name = "m".repeat(10_000);
    let (status, body) = raw(&s.base, &get(&format!("/models/{name}"), "")).await;
    assert_eq!(
        (status, error_type(&body).as_str()),
        (414, "uri_too_long"),
        "{}",
        short(&body)
    );
    // 2000 query parameters (~15 KB).
    let query: Vec<String> = (0..2000).map(|i| format!("p{i}=1")).collect();
    let (status, body) = raw(&s.base, &get(&format!("/predict?{}", query.join("&")), "")).await;
    assert_eq!(
        (status, error_type(&body).as_str()),
        (414, "uri_too_long"),
        "{}",
        short(&body)
    );
    // A 1 MiB Authorization header.
    let auth = format!("authorization: Bearer {}\r\n", "k".repeat(1 << 20));
    let (status, body) = raw(&s.base, &get("/models", &auth)).await;
    assert_eq!(
        (status, error_type(&body).as_str()),
        (431, "headers_too_large"),
        "{body}"
    );
    // 90 headers of 1 KB: under hyper's count, over our bytes.
    let many: String = (0..90).map(|i| format!("x-h{i}: {}\r\n", "v".repeat(1000))).collect();
    let (status, body) = raw(&s.base, &get("/models", &many)).await;
    assert_eq!(
        (status, error_type(&body).as_str()),
        (431, "headers_too_large"),
        "{body}"
    );
    s.stop().await;
}

/// The cases hyper answers before there is a request for the app to see, with the status
/// and empty body the README documents.
#[tokio::test]
async fn heads_hyper_refuses_get_the_documented_status() {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a 100 KB model name (URI over 65534 bytes)",
            get(&format!("/models/{}", "m".repeat(100_000)), ""),
            414,
        ),
        (
            "10000 query parameters",
            get(
                &format!(
                    "/predict?{}",
                    (0..10_000).map(|i| format!("p{i}=1")).collect::<Vec<_>>().join("&")
                ),
                "",
            ),
            414,
        ),
        (
            "10000 headers",
            get(
                "/models",
                &(0..10_000).map(|i| format!("x-h{i}: v\r\n")).collect::<String>(),
            ),
            431,
        ),
        (
            "a 3 MiB header (over the 2 MiB head buffer)",
            get("/models", &format!("x-big: {}\r\n", "v".repeat(3 << 20))),
            431,
        ),
        ("a bare CR in a header", get("/models", "x-a: b\rc\r\n"), 400),
        (
            "two Content-Lengths",
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}".to_vec(),
            400,
        ),
        ("a garbage request line", b"\x01\x02 garbage\r\n\r\n".to_vec(), 400),
    ];
    for (what, request, expected) in cases {
        let (status, body) = raw(&s.base, &request).await;
        assert_eq!(status, expected, "{what}: {}", short(&body));
        assert!(
            body.is_empty(),
            "{what}: hyper's answer has a body now: {}",
            short(&body)
        );
    }
    s.stop().await;
}
