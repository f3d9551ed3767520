//! Starting, reloading and stopping the server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::ServeArgs;
use crate::core::Core;
use crate::engine::repo;
use crate::front::http::router;

/// Serves on `listener` until `shutdown` resolves, then drains: readiness turns 503,
/// in-flight requests finish, and the function returns.
///
/// The listener is bound before models load, so liveness answers at once and readiness
/// answers 503 until every model has loaded and passed its self-checks.
pub async fn serve(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let names: Vec<String> = repo::scan(&args.models)
        .with_context(|| format!("reading the models folder {}", args.models.display()))?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let default = repo::default_model(&names, args.default_model.as_deref()).map_err(anyhow::Error::msg)?;
    let state = Core::new(default, args.limits());
    tracing::info!(addr = %listener.local_addr()?, models = ?names, default_model = %state.default_model, "listening; loading models");

    let loader = state.clone();
    let dir = args.models.clone();
    tokio::task::spawn_blocking(move || match repo::load_dir(&dir, None) {
        Ok(r) => loader.install(r),
        Err(e) => tracing::error!(error = %e, "reading the models folder failed"),
    });
    spawn_reload_on_sighup(state.clone(), args.models.clone());

    let drain = Duration::from_secs_f64(args.shutdown_drain_secs.max(0.0));
    let stopping = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutdown requested: readiness is now 503; finishing in-flight requests");
            stopping.begin_shutdown();
            tokio::time::sleep(drain).await;
        })
        .await?;
    tracing::info!("all requests finished; exiting");
    Ok(())
}

/// SIGHUP reloads the models folder. A model that fails to reload keeps its last good
/// version serving.
fn spawn_reload_on_sighup(state: Arc<Core>, dir: std::path::PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading models");
            let st = state.clone();
            let dir = dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let previous = st.repo();
                match repo::load_dir(&dir, previous.as_deref()) {
                    Ok(r) => st.install(r),
                    Err(e) => tracing::error!(error = %e, "reload failed; keeping the loaded models"),
                }
            })
            .await;
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
