//! What a front end may know of a model, read-only: its name, its inputs' and outputs'
//! specs, its self-checks and its calibration's levels. Front ends import these from here
//! and never from the engine, so the engine's insides can move without touching a
//! protocol, and `tools/module_graph.py` can check that no arrow skips the core.

pub use crate::engine::conformal::{self, CalibrationFile, OutputCalibration, level_key};
pub use crate::engine::model::{CheckResult, LoadedModel, McOutput, Passes};
pub use crate::engine::onnx_graph::DropoutSite;
pub use crate::engine::repo::{LoadFailure, ModelRepo, load_model};
pub use crate::engine::spec::{Dim, OutputKind, TensorSpec, shape_string, to_f64};
pub use crate::engine::statistics::{StatSet, Statistic};
pub use crate::engine::uncertainty::EntropyStats;
