//! Which runtime runs a model's graphs once the surgery is done.
//!
//! The engine owns everything around a pass: the graph surgery (dropout as mask inputs),
//! the masks and their seeds, batching, the statistics, the self-checks and the memory
//! estimate. A backend only runs a rewritten graph on named input tensors. tract is the
//! default and always built; onnxruntime (the `onnxruntime` cargo feature) loads
//! `libonnxruntime.so` at run time and runs the same rewritten `ModelProto`.
//!
//! tract still types every graph on either backend: the model's interface, the mask
//! shapes and the per-pass memory estimate come from its typed graph, so they are the
//! same whichever backend runs the passes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[cfg(feature = "onnxruntime")]
mod onnxruntime;
#[cfg(feature = "onnxruntime")]
pub use onnxruntime::{OrtGraph, init as init_onnxruntime, set_library as set_onnxruntime_library};

/// A runtime that runs a model's passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Tract,
    Onnxruntime,
}

/// Why this build cannot run onnxruntime; said wherever it is asked for.
pub const NOT_COMPILED: &str = "this mcd-serve was built without the `onnxruntime` cargo feature \
     (build with `cargo build --release --features onnxruntime`, or use the tract backend)";

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Onnxruntime => "onnxruntime",
        }
    }

    /// Err with the reason when this build cannot run the backend at all.
    pub fn compiled(self) -> Result<(), String> {
        match self {
            Backend::Onnxruntime if !cfg!(feature = "onnxruntime") => Err(NOT_COMPILED.to_string()),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tract" => Ok(Backend::Tract),
            "onnxruntime" => Ok(Backend::Onnxruntime),
            other => Err(format!("unknown backend '{other}': expected 'tract' or 'onnxruntime'")),
        }
    }
}

/// Without the feature there is no onnxruntime graph: the type has no value, so every path
/// that would run one is unreachable, and building one says why it cannot.
#[cfg(not(feature = "onnxruntime"))]
pub enum OrtGraph {}

#[cfg(not(feature = "onnxruntime"))]
impl OrtGraph {
    pub fn new(_proto: &tract_onnx::pb::ModelProto, _folder: &std::path::Path) -> Result<OrtGraph, String> {
        Err(NOT_COMPILED.to_string())
    }

    pub fn run(
        &self,
        _inputs: tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
    ) -> tract_onnx::prelude::TractResult<tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>> {
        match *self {}
    }
}

/// Without the feature: the library cannot be loaded, and says why.
#[cfg(not(feature = "onnxruntime"))]
pub fn init_onnxruntime() -> Result<(), String> {
    Err(NOT_COMPILED.to_string())
}

/// Without the feature a library path is kept nowhere: nothing would load it.
#[cfg(not(feature = "onnxruntime"))]
pub fn set_onnxruntime_library(_path: Option<std::path::PathBuf>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in [Backend::Tract, Backend::Onnxruntime] {
            assert_eq!(b.as_str().parse::<Backend>().unwrap(), b);
            assert_eq!(serde_json::to_string(&b).unwrap(), format!("\"{b}\""));
        }
        assert!(
            "ort"
                .parse::<Backend>()
                .unwrap_err()
                .contains("'tract' or 'onnxruntime'")
        );
    }

    #[test]
    fn onnxruntime_is_refused_without_the_feature() {
        assert_eq!(Backend::Onnxruntime.compiled().is_ok(), cfg!(feature = "onnxruntime"));
        assert!(Backend::Tract.compiled().is_ok());
    }
}
