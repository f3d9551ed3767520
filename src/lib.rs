//! mcd-serve: ONNX models over HTTP, with Monte-Carlo-dropout uncertainty.

pub mod error;
pub mod masks;
pub mod model;
pub mod onnx_graph;
pub mod uncertainty;
