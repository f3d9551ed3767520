//! Every flag reads its `MCD_*` environment variable (README, Configuration). One test in
//! its own binary: it sets the process environment, which no other test may see.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use mcd_serve::config::{Cli, Command, LogFormat};

#[test]
fn every_flag_reads_its_mcd_environment_variable() {
    let vars = [
        ("MCD_MODELS", "/srv/models"),
        ("MCD_ADDR", "127.0.0.1:9999"),
        ("MCD_GRPC_ADDR", "127.0.0.1:9998"),
        ("MCD_MODEL_NAME", "breast-cancer"),
        ("MCD_DEFAULT_MODEL", "diabetes"),
        ("MCD_MAX_MC_SAMPLES", "77"),
        ("MCD_MAX_INFLIGHT_COST", "1234"),
        ("MCD_MAX_BATCH_ROWS", "12"),
        ("MCD_MAX_MEMORY_BYTES", "268435456"),
        ("MCD_MAX_RETURNED_SAMPLES", "5000"),
        ("MCD_REQUEST_TIMEOUT_SECS", "2.5"),
        ("MCD_BODY_LIMIT_BYTES", "4096"),
        ("MCD_WORKERS", "3"),
        ("MCD_PASS_THREADS", "5"),
        ("MCD_MAX_BATCH_DELAY_US", "250"),
        ("MCD_MAX_PASS_ROWS", "64"),
        ("MCD_LOG_FORMAT", "json"),
        ("MCD_SHUTDOWN_DRAIN_SECS", "0.25"),
        ("MCD_HEALTHCHECK_URL", "http://127.0.0.1:1/ready"),
        ("MCD_HEALTHCHECK_TIMEOUT_SECS", "0.5"),
        ("MCD_API_KEY_FILE", "/run/secrets/keys"),
        ("MCD_METRICS_ADDR", "127.0.0.1:9997"),
        ("MCD_DRIFT_WINDOW", "50"),
        ("MCD_DRIFT_ALPHA", "0.05"),
        ("MCD_HEADER_READ_TIMEOUT_SECS", "7.5"),
        ("MCD_IDLE_TIMEOUT_SECS", "11"),
        ("MCD_BODY_READ_TIMEOUT_SECS", "13"),
        ("MCD_GRPC_KEEPALIVE_SECS", "17"),
        ("MCD_BACKEND", "onnxruntime"),
        ("MCD_ORT_LIB", "/opt/ort/libonnxruntime.so.1.31.1"),
    ];
    for (k, v) in vars {
        // SAFETY: the only test of this binary; nothing else reads the environment meanwhile.
        unsafe { std::env::set_var(k, v) };
    }
    let serve = Cli::parse_from(["mcd-serve"]).serve;
    assert_eq!(serve.models, PathBuf::from("/srv/models"));
    assert_eq!(serve.addr, "127.0.0.1:9999");
    assert_eq!(serve.grpc_addr, "127.0.0.1:9998");
    assert_eq!(serve.model_name.as_deref(), Some("breast-cancer"));
    assert_eq!(serve.default_model.as_deref(), Some("diabetes"));
    assert_eq!(serve.max_mc_samples, 77);
    assert_eq!(serve.max_inflight_cost, 1234);
    assert_eq!(serve.max_batch_rows, 12);
    assert_eq!(serve.max_memory_bytes, 256 << 20);
    assert_eq!(serve.max_returned_samples, 5000);
    assert_eq!(serve.request_timeout_secs, 2.5);
    assert_eq!(serve.body_limit_bytes, 4096);
    assert_eq!(serve.workers, Some(3));
    assert_eq!(serve.pass_threads, Some(5));
    assert_eq!(serve.pass_threads(), 5);
    assert_eq!(serve.log_format, LogFormat::Json);
    assert_eq!(serve.shutdown_drain_secs, 0.25);
    assert_eq!(serve.api_key_file, Some(PathBuf::from("/run/secrets/keys")));
    assert_eq!(serve.metrics_addr, "127.0.0.1:9997");
    assert_eq!((serve.drift_window, serve.drift_alpha), (50, 0.05));
    let timeouts = serve.connection_timeouts();
    assert_eq!(timeouts.header_read, Duration::from_millis(7500));
    assert_eq!(timeouts.idle, Duration::from_secs(11));
    assert_eq!(timeouts.body_read, Duration::from_secs(13));
    assert_eq!(serve.grpc_keepalive_secs, 17.0);
    assert_eq!(serve.backend, mcd_serve::engine::backend::Backend::Onnxruntime);
    assert_eq!(serve.ort_lib, Some(PathBuf::from("/opt/ort/libonnxruntime.so.1.31.1")));
    let limits = serve.limits();
    assert_eq!(limits.request_timeout, Duration::from_millis(2500));
    assert_eq!(limits.workers, 3);
    assert_eq!(limits.max_batch_delay, Duration::from_micros(250));
    assert_eq!(limits.max_pass_rows, 64);
    assert_eq!((limits.drift.window, limits.drift.alpha), (50, 0.05));
    assert_eq!(limits.backend, mcd_serve::engine::backend::Backend::Onnxruntime);
    match Cli::parse_from(["mcd-serve", "healthcheck"]).command {
        Some(Command::Healthcheck { url, timeout_secs }) => {
            assert_eq!(url, "http://127.0.0.1:1/ready");
            assert_eq!(timeout_secs, 0.5);
        }
        other => panic!("{other:?}"),
    }
    // A flag beats its variable.
    assert_eq!(
        Cli::parse_from(["mcd-serve", "--max-batch-rows", "5"])
            .serve
            .max_batch_rows,
        5
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // Every flag of the server and of `healthcheck` has a variable, set above and listed in
    // the README's table (`--help` is clap's own).
    let cli = Cli::command();
    let healthcheck = cli.find_subcommand("healthcheck").expect("the healthcheck subcommand");
    for arg in cli.get_arguments().chain(healthcheck.get_arguments()) {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("flag --{id} has no MCD_* variable"));
        let env = env.to_str().unwrap();
        assert!(vars.iter().any(|(k, _)| *k == env), "{env} (--{id}) is not tested here");
        assert!(
            readme.contains(&format!("`{env}`")),
            "README's table does not list {env} (--{id})"
        );
    }
    // Every MCD_* variable the README lists was covered here.
    for word in readme.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("MCD_") && word != "MCD_REQUIRE_SHARED" && word != "MCD_SHARED_MODELS" {
            assert!(
                vars.iter().any(|(k, _)| *k == word),
                "README names {word}, untested here"
            );
        }
    }
}
