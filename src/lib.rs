//! mcd-serve: ONNX models over HTTP, with Monte-Carlo-dropout uncertainty.
//!
//! - [`onnx_graph`]: graph surgery before tract sees a file (Dropout to Identity or to a
//!   mask multiply, BatchNorm to running statistics).
//! - [`model`]: eval and MC plans, mode-typed sessions, load-time self-checks.
//! - [`masks`], [`uncertainty`]: mask sampling and the MC statistics.
//! - [`repo`], [`http`], [`server`], [`metrics`], [`config`]: the service around them.

pub mod config;
pub mod error;
pub mod healthcheck;
pub mod http;
pub mod masks;
pub mod metrics;
pub mod model;
pub mod onnx_graph;
pub mod plans;
pub mod repo;
pub mod server;
pub mod tensor_json;
pub mod trunk;
pub mod uncertainty;
