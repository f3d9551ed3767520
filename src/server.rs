//! Starting, reloading and stopping the server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::ServeArgs;
use crate::core::Core;
use crate::core::auth::ApiKeys;
use crate::core::models_folder::{default_model, model_names};
use crate::engine::backend::Backend;
use crate::front::http::{metrics_router, router, router_without_metrics};
use crate::front::{connections, grpc, grpc_preface};

/// Serves HTTP on `listener` until `shutdown` resolves, then drains (see [`serve_all`]).
/// The gRPC service is not started: this is the entry point of tests and embedders that
/// bind only an HTTP port.
pub async fn serve(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_all(args, listener, None, shutdown).await
}

/// Serves the REST APIs on `http` and, when given, the OIP gRPC service on `grpc`, until
/// `shutdown` resolves. Then both drain together: readiness turns 503 (gRPC health:
/// NOT_SERVING) for `--shutdown-drain-secs` while both listeners stay open, then they
/// close and in-flight requests finish before the function returns.
///
/// The listeners are bound before models load, so liveness answers at once and readiness
/// answers 503 until every model has loaded and passed its self-checks.
pub async fn serve_all(
    args: ServeArgs,
    http: TcpListener,
    grpc: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listeners = Listeners {
        http,
        grpc,
        metrics: None,
    };
    serve_listeners(args, listeners, shutdown).await
}

/// The sockets the server answers on, bound by the caller (port 0 in tests).
pub struct Listeners {
    /// Native and OIP REST, health, and `/metrics` unless `metrics` is given.
    pub http: TcpListener,
    /// OIP gRPC and `grpc.health.v1`.
    pub grpc: Option<TcpListener>,
    /// `/metrics` alone (`--metrics-addr`), for a port only the scraper reaches.
    pub metrics: Option<TcpListener>,
}

/// As [`serve_all`], with every listener the configuration asks for.
pub async fn serve_listeners(
    args: ServeArgs,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.check().map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
    // Process-wide, as tract's executor is: a second server in the same process (tests)
    // keeps the first one's pool.
    crate::engine::cores::set_pass_threads(args.pass_threads());
    crate::engine::backend::set_onnxruntime_library(args.ort_lib.clone());
    if args.backend == Backend::Onnxruntime {
        // Loaded now, so that a missing or wrong library stops the server with the reason
        // instead of failing every model.
        crate::engine::backend::init_onnxruntime().map_err(|e| anyhow::anyhow!("--backend onnxruntime: {e}"))?;
    }
    let Listeners { http, grpc, metrics } = listeners;
    let names = model_names(&args.models, args.model_name.as_deref())
        .with_context(|| format!("reading the models folder {}", args.models.display()))?;
    let default = default_model(&names, args.default_model.as_deref()).map_err(anyhow::Error::msg)?;
    let keys = match &args.api_key_file {
        None => ApiKeys::open(),
        Some(path) => ApiKeys::from_file(path).map_err(anyhow::Error::msg)?,
    };
    let core = Core::new(default, args.limits(), keys);
    let addr_of = |l: &Option<TcpListener>| -> anyhow::Result<String> {
        Ok(match l {
            Some(l) => l.local_addr()?.to_string(),
            None => "off".into(),
        })
    };
    let (grpc_addr, metrics_addr) = (addr_of(&grpc)?, addr_of(&metrics)?);
    tracing::info!(
        addr = %http.local_addr()?,
        grpc_addr = %grpc_addr,
        metrics_addr = %metrics_addr,
        api_keys = core.keys.required(),
        models = ?names,
        default_model = core.default_model.as_deref().unwrap_or("(none)"),
        "listening; loading models"
    );

    let loader = core.clone();
    let dir = args.models.clone();
    let model_name = args.model_name.clone();
    tokio::task::spawn_blocking(move || loader.load_folder(&dir, model_name.as_deref()));
    spawn_reload_on_sighup(core.clone(), args.models.clone(), args.model_name.clone());

    // One stop signal for both listeners, after the drain window.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = Duration::from_secs_f64(args.shutdown_drain_secs);
    let stopping = core.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: readiness is now 503; finishing in-flight requests");
        stopping.begin_shutdown();
        tokio::time::sleep(drain).await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let timeouts = args.connection_timeouts();
    let grpc_task = match grpc {
        None => None,
        Some(listener) => {
            let health = grpc::health(core.clone()).await;
            let keepalive = Duration::from_secs_f64(args.grpc_keepalive_secs);
            // No Nagle: an answer larger than one segment otherwise waits for the client's
            // delayed ACK (measured: MC-50 answers took 44 ms each).
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let server = tonic::transport::Server::builder()
                // A client that stops answering pings (gone, or stalled) is disconnected.
                .http2_keepalive_interval(Some(keepalive))
                .http2_keepalive_timeout(Some(keepalive))
                .layer(crate::front::grpc_decode::UndecodableLayer { core: core.clone() })
                .layer(crate::front::body_budget::GrpcBodyLayer { core: core.clone() })
                .layer(crate::front::large_answers::TrimLargeLayer)
                .add_service(health)
                .add_service(grpc::service(core.clone()))
                .serve_with_incoming_shutdown(
                    grpc_preface::Incoming::new(incoming, timeouts.header_read),
                    stopped(stop_rx.clone()),
                );
            Some(tokio::spawn(server))
        }
    };
    let metrics_task = metrics.map(|listener| {
        tokio::spawn(connections::serve(
            listener,
            metrics_router(core.clone()),
            timeouts,
            stop_rx.clone(),
        ))
    });
    let main_router = if metrics_task.is_some() {
        router_without_metrics(core)
    } else {
        router(core)
    };
    connections::serve(http, main_router, timeouts, stop_rx).await;
    if let Some(task) = metrics_task {
        task.await.context("the metrics server task")?;
    }
    if let Some(task) = grpc_task {
        task.await.context("the gRPC server task")??;
    }
    tracing::info!("all requests finished; exiting");
    Ok(())
}

/// SIGHUP reloads the models folder. A model that fails to reload keeps its last good
/// version serving.
fn spawn_reload_on_sighup(state: Arc<Core>, dir: std::path::PathBuf, model_name: Option<String>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading models");
            if state.keys.required() {
                match state.keys.reload() {
                    Ok(n) => tracing::info!(keys = n, "API keys reloaded"),
                    Err(e) => tracing::error!(error = %e, "API key reload failed; the keys in force stay"),
                }
            }
            let st = state.clone();
            let dir = dir.clone();
            let model_name = model_name.clone();
            let _ = tokio::task::spawn_blocking(move || st.reload_folder(&dir, model_name.as_deref())).await;
        }
    });
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
