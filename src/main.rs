use std::time::Duration;

use clap::Parser;
use mcd_serve::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Healthcheck { url, timeout_secs }) => {
            return match mcd_serve::commands::healthcheck::probe(&url, Duration::from_secs_f64(timeout_secs)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    std::process::exit(1);
                }
            };
        }
        Some(Command::Calibrate(args)) => return mcd_serve::commands::calibrate::run(&args),
        None => {}
    }
    let args = cli.serve;
    mcd_serve::core::memory_budget::configure_allocator();
    mcd_serve::logs::init(args.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&args.addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.addr))?;
            let grpc = match args.grpc_addr.trim() {
                "" => None,
                addr => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("binding the gRPC address {addr}: {e}"))?,
                ),
            };
            let metrics = match args.metrics_addr.trim() {
                "" => None,
                addr => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("binding the metrics address {addr}: {e}"))?,
                ),
            };
            let listeners = mcd_serve::server::Listeners {
                http: listener,
                grpc,
                metrics,
            };
            mcd_serve::server::serve_listeners(args, listeners, mcd_serve::server::shutdown_signal()).await
        })
}
