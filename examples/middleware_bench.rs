//! What each HTTP layer costs per request: the router with every layer the server runs,
//! and with each one left out, called in-process (`tower::ServiceExt::oneshot`, no
//! sockets) on an eval request for breast_cancer and on `GET /health/live`.
//!
//! Cost is the process's CPU time per request (every thread, the inference pool
//! included: CLOCK_PROCESS_CPUTIME_ID), so other processes on the machine do not
//! count; the configurations run in interleaved rounds and the table gives medians over
//! rounds. Logging is set up as the server's default (text, `info`), written to nowhere.
//!
//! `cargo run --release --example middleware_bench [-- ROUNDS REQUESTS_PER_ROUND]`

use std::path::Path;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use mcd_serve::config::ServeArgs;
use mcd_serve::core::Core;
use mcd_serve::core::auth::ApiKeys;
use mcd_serve::front::http::{Middleware, router_with};
use tower::ServiceExt;

const ROW: &str = "[13.46,28.21,85.89,562.1,0.07517,0.04726,0.01271,0.01117,0.1421,0.05763,0.1689,1.15,1.4,14.91,\
0.004942,0.01203,0.007508,0.005179,0.01442,0.001684,14.69,35.63,97.11,680.6,0.1108,0.1457,0.07934,0.05781,0.2694,0.07061]";

/// CPU nanoseconds used by every thread of this process so far. (Not the sum of
/// /proc/self/task/*/schedstat: a running thread's figure there moves only at scheduler
/// ticks, too coarse for microseconds.)
fn cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn request(eval: bool) -> Request<Body> {
    if eval {
        Request::post("/predict")
            .header("content-type", "application/json")
            .body(Body::from(format!("{{\"inputs\": [{ROW}]}}")))
            .unwrap()
    } else {
        Request::get("/health/live").body(Body::empty()).unwrap()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(21, |s| s.parse().expect("ROUNDS"));
    let per_round: usize = args.next().map_or(2000, |s| s.parse().expect("REQUESTS_PER_ROUND"));
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let args = ServeArgs::for_models(&dir);
        let core = Core::new(Some("breast_cancer".into()), args.limits(), ApiKeys::open());
        core.install(mcd_serve::engine::repo::load_dir(&dir, None).unwrap());
        let server = Middleware::SERVER;
        let configs: Vec<(&str, Middleware)> = vec![
            ("the server (RequestLayer + CatchPanicLayer)", server),
            ("without RequestLayer", Middleware { request: false, ..server }),
            ("without CatchPanicLayer", Middleware { catch_panic: false, ..server }),
            (
                "no layers",
                Middleware {
                    request: false,
                    catch_panic: false,
                },
            ),
        ];
        let routers: Vec<Router> = configs.iter().map(|(_, m)| router_with(core.clone(), *m)).collect();
        // [config][eval?] -> per-round CPU and wall µs per request
        let mut cpu = vec![[vec![], vec![]]; configs.len()];
        let mut wall = vec![[vec![], vec![]]; configs.len()];
        for round in 0..rounds + 1 {
            for (i, router) in routers.iter().enumerate() {
                for (k, eval) in [false, true].into_iter().enumerate() {
                    let (c0, t0) = (cpu_ns(), Instant::now());
                    for _ in 0..per_round {
                        let response = router.clone().oneshot(request(eval)).await.unwrap();
                        assert!(response.status().is_success(), "{}", response.status());
                        axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
                    }
                    // Round 0 warms up and is not counted.
                    if round > 0 {
                        cpu[i][k].push((cpu_ns() - c0) as f64 / 1e3 / per_round as f64);
                        wall[i][k].push(t0.elapsed().as_secs_f64() * 1e6 / per_round as f64);
                    }
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base: Vec<f64> = (0..2).map(|k| median(&mut cpu[0][k].clone())).collect();
        println!("{rounds} rounds of {per_round} requests per configuration and request; medians over rounds.\n");
        println!("| layers | CPU per `GET /health/live` | difference | CPU per eval `POST /predict` | difference | wall per eval |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (i, (name, _)) in configs.iter().enumerate() {
            let h = median(&mut cpu[i][0]);
            let e = median(&mut cpu[i][1]);
            let w = median(&mut wall[i][1]);
            println!(
                "| {name} | {h:.2} µs | {:+.2} µs | {e:.2} µs | {:+.2} µs | {w:.2} µs |",
                h - base[0],
                e - base[1]
            );
        }
    });
}
