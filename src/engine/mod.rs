//! The engine: ONNX files become eval and MC plans, and passes run over rows and samples.
//! It knows nothing of requests, protocols or admission.
//!
//! - [`onnx_graph`]: graph surgery before tract sees a file (Dropout to Identity or to a
//!   mask multiply, BatchNorm to running statistics).
//! - [`model`]: eval and MC plans, mode-typed sessions, load-time self-checks.
//! - [`backend`]: what runs a pass of a rewritten graph: tract, or onnxruntime (the
//!   `onnxruntime` feature).
//! - [`plans`], [`trunk`]: plans per batch size; the shared deterministic trunk of MC.
//! - [`decomposed`]: dropout written as random ops (PyTorch's spatial and alpha dropout);
//!   every other random op is refused.
//! - [`kernels`]: the arithmetic a pass may run, so that a row's answer does not depend on
//!   its batch.
//! - [`masks`], [`uncertainty`]: mask sampling and the MC statistics; [`statistics`]:
//!   which of them an answer returns.
//! - [`memory`]: the estimated peak memory of a pass and of an answer.
//! - [`repo`]: the models folder, loaded and reloaded.
//! - [`conformal`]: conformal intervals, prediction sets and referral, and their file.
//! - [`drift_reference`]: the reference sample dataset-shift tests compare served rows with.

pub mod backend;
pub mod conformal;
pub mod cores;
pub mod drift_reference;
pub mod error;
pub mod footprint;
pub mod kernels;
pub mod masks;
pub mod model;
pub mod onnx_graph;
pub mod plans;
pub mod repo;
pub mod row_passes;
pub mod row_summary;
pub mod spec;
pub mod statistics;
pub mod trunk;
pub mod uncertainty;
