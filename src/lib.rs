//! mcd-serve: ONNX models served with Monte-Carlo-dropout uncertainty.
//!
//! Three layers, one folder each:
//! - [`engine`]: ONNX files become eval and MC plans; passes, masks and statistics.
//! - [`core`]: the one predict path every protocol calls: model lookup, the mode decision
//!   and its guards, admission, the worker pool, timeouts, inference and metrics.
//! - [`front`]: the protocols, which only decode requests and encode answers.
//!
//! Around them: [`error`] (the one error type), [`config`], [`logs`], [`server`], and [`commands`]
//! (the `calibrate` and `healthcheck` subcommands).

pub mod commands;
pub mod config;
pub mod core;
pub mod engine;
pub mod error;
pub mod front;
pub mod logs;
pub mod server;
