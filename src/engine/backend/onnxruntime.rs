//! The onnxruntime backend: the rewritten graph, encoded back to ONNX bytes, run by ONNX
//! Runtime through the `ort` crate, with `libonnxruntime.so` loaded at run time.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::{TensorElementType, TensorRef, ValueType};
use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

/// The library path given by `--ort-lib` / `MCD_ORT_LIB`, set once at startup.
static LIBRARY: Mutex<Option<PathBuf>> = Mutex::new(None);
/// ONNX Runtime allows one environment per process, and `ort` keeps the first library it
/// loads: so the first attempt decides, and a failure is kept and repeated (with its
/// reason) to every model that asks, until the server restarts with a good path.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The library to load: `path` when given, else `$ORT_DYLIB_PATH` (the `ort` crate's own
/// variable) at the time of loading.
pub fn set_library(path: Option<PathBuf>) {
    *LIBRARY.lock().expect("library lock poisoned: this is a bug") = path;
}

fn library() -> Result<PathBuf, String> {
    if let Some(p) = LIBRARY.lock().expect("library lock poisoned: this is a bug").clone() {
        return Ok(p);
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(
            "no onnxruntime library given: set --ort-lib or MCD_ORT_LIB (or ORT_DYLIB_PATH) to the path of \
                  libonnxruntime.so.1.31.1 (README, \"Backends\")"
                .to_string(),
        ),
    }
}

/// Loads the library and creates the environment, once; Err with the reason (a missing
/// file, a version older than 1.31) otherwise. Never panics: `ort` would panic if its first
/// API call had to find the library itself, so it is always given one here first.
pub fn init() -> Result<(), String> {
    environment().map(|_| ())
}

fn environment() -> Result<&'static Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = library()?;
            let threads = crate::engine::cores::pass_threads();
            let loaded = std::panic::catch_unwind(|| {
                let builder = ort::init_from(&path).map_err(|e| e.to_string())?.with_name("mcd-serve");
                // `--pass-threads` above 1: every session runs on one global intra-op pool
                // of that many threads (the caller's included), so a pass that runs alone
                // has every core, and passes that run together share the same threads
                // instead of each bringing a pool (engine::cores). Spinning off: an idle
                // pool must not burn the cores tract's passes need.
                let builder = if threads > 1 {
                    let pool = ort::environment::GlobalThreadPoolOptions::default()
                        .with_intra_threads(threads)
                        .and_then(|p| p.with_inter_threads(1))
                        .and_then(|p| p.with_spin_control(false))
                        .map_err(|e| e.to_string())?;
                    builder.with_global_thread_pool(pool)
                } else {
                    builder
                };
                builder.build().map_err(|e| e.to_string())
            });
            let env = match loaded {
                Ok(r) => r,
                Err(_) => Err("the library panicked while loading".to_string()),
            }
            .map_err(|e| format!("loading onnxruntime from {}: {e}", path.display()))?;
            tracing::info!(library = %path.display(), "onnxruntime loaded");
            Ok(env)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One rewritten graph on onnxruntime. `Session::run` takes `&mut self` (parts of ONNX
/// Runtime are not thread safe), so idle sessions wait in a pool: a worker takes one, and
/// opens another only when every session is busy. The pool grows to the number of workers
/// that run the model at once, each session holding its own copy of the weights.
pub struct OrtGraph {
    /// The encoded graph, to open more sessions from.
    bytes: Vec<u8>,
    /// Where external weights are read from (the model's folder).
    folder: PathBuf,
    inputs: Vec<String>,
    outputs: Vec<String>,
    idle: Mutex<Vec<Session>>,
}

impl OrtGraph {
    /// Opens a first session on `proto`: a graph onnxruntime cannot run is refused here, at
    /// load, with onnxruntime's reason.
    pub fn new(proto: &ModelProto, folder: &Path) -> Result<OrtGraph, String> {
        let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        // The order tract gives its inputs in: the graph's inputs that are not weights.
        let inputs: Vec<String> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(|i| i.name.clone())
            .collect();
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let bytes = proto.encode_to_vec();
        let graph = OrtGraph {
            bytes,
            folder: folder.to_path_buf(),
            inputs,
            outputs,
            idle: Mutex::new(vec![]),
        };
        let session = graph.open()?;
        let mut have: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let mut want: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            return Err(format!("onnxruntime sees the inputs {have:?}, the server {want:?}"));
        }
        graph
            .idle
            .lock()
            .expect("session pool poisoned: this is a bug")
            .push(session);
        Ok(graph)
    }

    fn open(&self) -> Result<Session, String> {
        let env = environment()?;
        let folder = self.folder.to_string_lossy();
        let built = (|| -> ort::Result<Session> {
            Session::builder(env)?
                .with_optimization_level(GraphOptimizationLevel::Level3)?
                // One thread per pass when there is no global pool (`--pass-threads 1`):
                // the server's workers are the parallelism, and ONNX Runtime's default (a
                // spinning pool per session, one thread per core) would fight them for the
                // cores. With the global pool (see `environment`) this is not used.
                .with_intra_threads(1)?
                .with_intra_op_spinning(false)?
                // ONNX Runtime logs every graph rewrite at info level (hundreds of lines
                // per model): the server's log keeps its warnings and errors.
                .with_log_level(ort::logging::LogLevel::Warning)?
                // Bytes carry no path: external weights (`<file>.onnx.data`) are found
                // relative to this folder, as tract finds them.
                .with_config_entry("session.model_external_initializers_file_folder_path", folder.as_ref())?
                .commit_from_memory(&self.bytes)
        })();
        built.map_err(|e| format!("onnxruntime cannot open the graph: {e}"))
    }

    /// Runs one pass: `inputs` in tract's input order (the model's inputs, then the masks).
    pub fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if inputs.len() != self.inputs.len() {
            anyhow::bail!("{} inputs given, the graph has {}", inputs.len(), self.inputs.len());
        }
        let idle = self.idle.lock().expect("session pool poisoned: this is a bug").pop();
        let mut session = match idle {
            Some(s) => s,
            None => self.open().map_err(anyhow::Error::msg)?,
        };
        let result = self.run_on(&mut session, &inputs);
        self.idle
            .lock()
            .expect("session pool poisoned: this is a bug")
            .push(session);
        result
    }

    fn run_on(&self, session: &mut Session, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, t) in self.inputs.iter().zip(inputs) {
            feed.push((Cow::Borrowed(name.as_str()), borrowed(t)?));
        }
        let outputs = session.run(feed).map_err(|e| anyhow::anyhow!("onnxruntime: {e}"))?;
        // Copied out before the next run: the outputs borrow the session.
        self.outputs
            .iter()
            .map(|name| {
                let value = outputs
                    .get(name.as_str())
                    .ok_or_else(|| anyhow::anyhow!("onnxruntime gave no output '{name}'"))?;
                Ok(owned(value)?.into_tvalue())
            })
            .collect()
    }
}

/// A view of a tract tensor for onnxruntime, without a copy.
fn borrowed(t: &Tensor) -> TractResult<SessionInputValue<'_>> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let ram = t.try_as_plain_ram()?;
    macro_rules! view {
        ($ty:ty) => {
            TensorRef::from_array_view((shape, ram.as_slice::<$ty>()?))
                .map_err(|e| anyhow::anyhow!("onnxruntime input: {e}"))?
                .into()
        };
    }
    Ok(match t.datum_type() {
        DatumType::F32 => view!(f32),
        DatumType::F64 => view!(f64),
        DatumType::I64 => view!(i64),
        DatumType::I32 => view!(i32),
        DatumType::I16 => view!(i16),
        DatumType::I8 => view!(i8),
        DatumType::U8 => view!(u8),
        DatumType::U16 => view!(u16),
        DatumType::U32 => view!(u32),
        DatumType::U64 => view!(u64),
        DatumType::Bool => view!(bool),
        other => anyhow::bail!("the onnxruntime backend does not pass {other:?} tensors"),
    })
}

/// An onnxruntime output as a tract tensor (copied: the output lives in the session).
fn owned(value: &ort::value::DynValue) -> TractResult<Tensor> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => anyhow::bail!("the onnxruntime backend reads tensors only, not {other:?}"),
    };
    macro_rules! copy {
        ($ty:ty) => {{
            let (shape, data) = value
                .try_extract_tensor::<$ty>()
                .map_err(|e| anyhow::anyhow!("onnxruntime output: {e}"))?;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            Tensor::from_shape(&dims, data)?
        }};
    }
    Ok(match ty {
        TensorElementType::Float32 => copy!(f32),
        TensorElementType::Float64 => copy!(f64),
        TensorElementType::Int64 => copy!(i64),
        TensorElementType::Int32 => copy!(i32),
        TensorElementType::Int16 => copy!(i16),
        TensorElementType::Int8 => copy!(i8),
        TensorElementType::Uint8 => copy!(u8),
        TensorElementType::Uint16 => copy!(u16),
        TensorElementType::Uint32 => copy!(u32),
        TensorElementType::Uint64 => copy!(u64),
        TensorElementType::Bool => copy!(bool),
        other => anyhow::bail!("the onnxruntime backend does not read {other:?} outputs"),
    })
}
