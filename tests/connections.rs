//! Connections that hold the server without finishing a request (issue 25, F6): idle,
//! slow header senders, stalled bodies on REST, and stalled HTTP/2 connections on gRPC,
//! each closed after its timeout. The timeouts are set to 1 s; a test waits up to 20 s for
//! the close, so a server without the timeout fails it, and prints the time it measured.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mcd_serve::config::ServeArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far above the 1 s timeouts: a connection still open after this was never closed.
const NEVER: Duration = Duration::from_secs(20);

fn args() -> ServeArgs {
    let mut args = ServeArgs::for_models(models_dir());
    args.header_read_timeout_secs = 1.0;
    args.idle_timeout_secs = 1.0;
    args.body_read_timeout_secs = 1.0;
    args.grpc_keepalive_secs = 1.0;
    args
}

/// Reads until the server closes the connection (EOF or reset); everything read, and how
/// long after `since` it closed. Panics if it stays open for [`NEVER`].
async fn read_until_closed(stream: &mut TcpStream, since: Instant) -> (Vec<u8>, Duration) {
    let mut got = vec![];
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(NEVER, stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "the connection was still open {NEVER:?} later; read so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, since.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let s = TestServer::start(args()).await;
    let mut stream = TcpStream::connect(addr(&s.base)).await.unwrap();
    let (got, took) = read_until_closed(&mut stream, Instant::now()).await;
    println!("idle new connection closed after {took:?}");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(
        took >= Duration::from_millis(900),
        "closed before the idle timeout: {took:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let s = TestServer::start(args()).await;
    let mut stream = TcpStream::connect(addr(&s.base)).await.unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();
    let (got, took) = read_until_closed(&mut stream, answered).await;
    println!("idle keep-alive connection closed {took:?} after its request");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn a_slow_header_sender_is_closed_after_the_header_read_timeout() {
    let s = TestServer::start(args()).await;
    let mut stream = TcpStream::connect(addr(&s.base)).await.unwrap();
    let started = Instant::now();
    stream.write_all(b"GET /health/live HTTP/1.1\r\n").await.unwrap();
    // One header byte every 100 ms, never the blank line: progress, but no request.
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut chunk = [0u8; 1024];
    let took = loop {
        match tokio::time::timeout(NEVER, reader.read(&mut chunk)).await {
            Err(_) => panic!("a slow header sender was still connected {NEVER:?} later"),
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => {}
        }
    };
    trickle.abort();
    println!("slow header sender closed after {took:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_its_connection_closed() {
    let s = TestServer::start(args()).await;
    let mut stream = TcpStream::connect(addr(&s.base)).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"inputs\": [[")
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut stream, started).await;
    println!("stalled body answered and closed after {took:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = &text[text.find("\r\n\r\n").expect("a whole answer") + 4..];
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    assert_eq!(body["error_type"], "body_timeout", "{body}");
    // The connection still serves other clients' requests on other connections.
    assert_eq!(s.get("/health/live").await.0, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_grpc_connection_that_sends_no_preface_is_closed() {
    let (s, url) = start_with_grpc(args()).await;
    let mut stream = TcpStream::connect(addr(&url)).await.unwrap();
    let (_, took) = read_until_closed(&mut stream, Instant::now()).await;
    println!("gRPC connection without a preface closed after {took:?}");
    s.stop().await;
}

/// A client that completes the HTTP/2 handshake and then stops reading (it never answers
/// the server's PING): the keepalive closes it.
#[tokio::test]
async fn a_stalled_http2_connection_on_grpc_is_closed_by_the_keepalive() {
    let (s, url) = start_with_grpc(args()).await;
    let mut stream = TcpStream::connect(addr(&url)).await.unwrap();
    let started = Instant::now();
    // The client preface and an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut stream, started).await;
    println!(
        "stalled HTTP/2 connection closed after {took:?} ({} bytes from the server)",
        got.len()
    );
    // The server's SETTINGS came, then its PINGs (type 6), then the close.
    assert!(got.len() >= 9 && got[3] == 4, "{got:?}");
    s.stop().await;
}

#[tokio::test]
async fn out_of_range_connection_timeouts_stop_startup() {
    for (flag, value) in [
        ("--header-read-timeout-secs", "0"),
        ("--idle-timeout-secs", "-1"),
        ("--body-read-timeout-secs", "inf"),
        ("--grpc-keepalive-secs", "100000"),
    ] {
        let arg = format!("{flag}={value}");
        let cli = <mcd_serve::config::Cli as clap::Parser>::try_parse_from(["mcd-serve", arg.as_str()]).unwrap();
        let wrong = cli.serve.check().expect_err(flag);
        assert!(wrong.contains(flag), "{wrong}");
    }
}
