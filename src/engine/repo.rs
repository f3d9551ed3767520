//! The model repository: every `*.onnx` in a folder, by file stem.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::backend::Backend;
use crate::engine::conformal::Calibrates;
use crate::engine::model::{LoadedModel, ModelConfig};

#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub model: String,
    pub file: PathBuf,
    pub reason: String,
    /// True when an earlier good version of the model keeps serving.
    pub kept_previous: bool,
    /// True when the failure takes readiness: the model was meant to serve and nothing
    /// does. A file that fails at start does; one that appears on a reload and fails never
    /// served, so it does not (nor on later reloads while it keeps failing): the same file
    /// reaches every replica, and readiness would fall across the fleet for a model no
    /// client could use yet.
    pub blocks_readiness: bool,
}

#[derive(Default)]
pub struct ModelRepo {
    pub models: BTreeMap<String, Arc<LoadedModel>>,
    pub failures: Vec<LoadFailure>,
    pub load_times: BTreeMap<String, Duration>,
}

/// `(name, path)` of every `*.onnx` file in `dir`, sorted by name.
pub fn scan(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut found = vec![];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "onnx")
            && path.is_file()
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            found.push((stem.to_string(), path));
        }
    }
    found.sort();
    Ok(found)
}

/// As [`scan`], with the single model of the folder renamed to `model_name` when one is
/// given: KServe names a model after its InferenceService, not after the file its storage
/// initializer wrote (`--model-name={{.Name}}`).
pub fn scan_named(dir: &Path, model_name: Option<&str>) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut found = scan(dir)?;
    if let Some(name) = model_name {
        if found.len() != 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "--model-name names the one model of the folder, but {} holds {} models",
                    dir.display(),
                    found.len()
                ),
            ));
        }
        found[0].0 = name.to_string();
    }
    Ok(found)
}

/// Which model `POST /predict` serves: the one named, else `breast_cancer` when present,
/// else the only one. A folder of several models with none named has no default: the
/// per-model routes serve them all, as Triton and KServe users expect.
pub fn default_model(names: &[String], requested: Option<&str>) -> Result<Option<String>, String> {
    match requested {
        Some(r) if names.iter().any(|n| n == r) => Ok(Some(r.to_string())),
        Some(r) => Err(format!(
            "the default model '{r}' is not among the models found: {names:?}"
        )),
        None if names.is_empty() => Err("no *.onnx models found".into()),
        None if names.iter().any(|n| n == "breast_cancer") => Ok(Some("breast_cancer".into())),
        None if names.len() == 1 => Ok(Some(names[0].clone())),
        None => Ok(None),
    }
}

pub fn config_path(model_path: &Path) -> PathBuf {
    model_path.with_extension("model.json")
}

/// Loads one model and its optional config. A panic inside the ONNX loader (it has
/// `unimplemented!` paths for exotic tensor types) becomes a load error for this file only.
pub fn load_model(name: &str, path: &Path) -> Result<LoadedModel, String> {
    load_model_on(name, path, Backend::Tract)
}

/// As [`load_model`], on `default` unless the model's config names a backend.
pub fn load_model_on(name: &str, path: &Path, default: Backend) -> Result<LoadedModel, String> {
    let cfg_path = config_path(path);
    let config = if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| format!("reading {}: {e}", cfg_path.display()))?;
        serde_json::from_str::<ModelConfig>(&text).map_err(|e| format!("parsing {}: {e}", cfg_path.display()))?
    } else {
        ModelConfig::default()
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| LoadedModel::load_on(name, path, config, default))) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the ONNX loader panicked: {msg}"))
        }
    }
}

/// Attaches the model's calibration and drift reference; a stale or mismatched one fails
/// the load, so it is never silently used.
fn with_calibration(mut m: LoadedModel) -> Result<LoadedModel, String> {
    let outputs: Vec<(&str, Calibrates)> = m
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| (o.name.as_str(), m.calibrates(i)))
        .collect();
    m.calibration = crate::engine::conformal::load(&m.name, &m.path, &outputs, m.config.refer_target_error)?;
    let names: Vec<&str> = outputs.iter().map(|(o, _)| *o).collect();
    m.drift_reference = crate::engine::drift_reference::load(&m.path, m.calibration.as_ref(), &names)?;
    Ok(m)
}

/// Loads every model in `dir`. A file that fails keeps the previous good version, if one
/// is given, serving under its name; other files load regardless.
pub fn load_dir(dir: &Path, previous: Option<&ModelRepo>) -> std::io::Result<ModelRepo> {
    load_folder(dir, None, previous, None, Backend::Tract)
}

/// As [`load_dir`], with the folder's single model served as `model_name` when given, and
/// models whose config names no backend run on `backend`.
///
/// On a reload (`previous` given) nothing that serves is lost to a bad folder:
/// - a file that fails to load, or loads but fails its eval self-checks, keeps its last
///   good version serving, reported as a failure with `kept_previous`;
/// - the model named `keep` (the default model) keeps serving its last version when its
///   file is gone, so `POST /predict` cannot turn into a 404 under a ready server;
/// - a folder with no model at all is refused (an error), as it is at startup.
pub fn load_folder(
    dir: &Path,
    model_name: Option<&str>,
    previous: Option<&ModelRepo>,
    keep: Option<&str>,
    backend: Backend,
) -> std::io::Result<ModelRepo> {
    let found = scan_named(dir, model_name)?;
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no *.onnx models in {}", dir.display()),
        ));
    }
    let mut repo = ModelRepo::default();
    for (name, path) in found {
        let start = Instant::now();
        let old = previous
            .and_then(|p| p.models.get(&name))
            .filter(|m| m.healthy())
            .cloned();
        let loaded =
            inside_folder(dir, &path).and_then(|()| load_model_on(&name, &path, backend).and_then(with_calibration));
        let failure = match loaded {
            Ok(m) if m.healthy() || old.is_none() => {
                repo.load_times.insert(name.clone(), start.elapsed());
                repo.models.insert(name, Arc::new(m));
                continue;
            }
            Ok(m) => format!("the new version failed its self-checks: {}", m.failed_checks()),
            Err(reason) => reason,
        };
        let blocks_readiness = match previous {
            None => true,
            Some(p) => {
                old.is_none()
                    && (p.models.contains_key(&name)
                        || p.failures.iter().any(|f| f.model == name && f.blocks_readiness))
            }
        };
        tracing::error!(model = %name, file = %path.display(), reason = %failure, kept_previous = old.is_some(), blocks_readiness, "model failed to load");
        repo.failures.push(LoadFailure {
            model: name.clone(),
            file: path,
            reason: failure,
            kept_previous: old.is_some(),
            blocks_readiness,
        });
        if let Some(old) = old {
            repo.models.insert(name, old);
        }
    }
    if let Some(name) = keep
        && !repo.models.contains_key(name)
        && !repo.failures.iter().any(|f| f.model == name)
        && let Some(old) = previous.and_then(|p| p.models.get(name))
    {
        let reason = "its file is gone from the models folder; as the default model it keeps serving its last version until the server restarts".to_string();
        tracing::error!(model = %name, %reason, "default model removed");
        repo.failures.push(LoadFailure {
            model: name.to_string(),
            file: old.path.clone(),
            reason,
            kept_previous: true,
            blocks_readiness: false,
        });
        repo.models.insert(name.to_string(), old.clone());
    }
    Ok(repo)
}

/// Refuses a model whose file, or a file beside it that the load reads, is a symbolic
/// link that leaves the models folder: whoever can drop a link in the folder could
/// otherwise make the server read any file it can (`evil.onnx -> /etc/passwd`). Links
/// inside the folder stay allowed; a Kubernetes ConfigMap or Secret volume is made of
/// them (`x -> ..data/x`).
fn inside_folder(dir: &Path, model: &Path) -> Result<(), String> {
    let folder =
        std::fs::canonicalize(dir).map_err(|e| format!("resolving the models folder {}: {e}", dir.display()))?;
    let sidecars = [
        model.to_path_buf(),
        config_path(model),
        crate::engine::conformal::calibration_path(model),
        crate::engine::drift_reference::reference_path(model),
    ];
    for file in sidecars {
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let target = std::fs::canonicalize(&file).map_err(|e| {
            format!(
                "{} is a symbolic link that cannot be resolved ({e}); refused",
                file.display()
            )
        })?;
        if !target.starts_with(&folder) {
            return Err(format!(
                "{} is a symbolic link to {}, outside the models folder {}; refused (a model and its files must live in the folder)",
                file.display(),
                target.display(),
                folder.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link that leaves the folder is refused with its target; one inside it loads.
    #[test]
    fn symlinks_out_of_the_folder_are_refused() {
        let dir = std::env::temp_dir().join(format!("mcd-repo-link-{}", std::process::id()));
        let outside = std::env::temp_dir().join(format!("mcd-repo-outside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not a model").unwrap();
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("..data/inside.onnx"), b"").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), dir.join("evil.onnx")).unwrap();
        std::os::unix::fs::symlink("..data/inside.onnx", dir.join("inside.onnx")).unwrap();
        std::fs::write(dir.join("plain.onnx"), b"").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), dir.join("plain.model.json")).unwrap();
        let e = inside_folder(&dir, &dir.join("evil.onnx")).unwrap_err();
        assert!(e.contains("outside the models folder") && e.contains("secret"), "{e}");
        assert!(inside_folder(&dir, &dir.join("inside.onnx")).is_ok());
        let e = inside_folder(&dir, &dir.join("plain.onnx")).unwrap_err();
        assert!(e.contains("plain.model.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    /// A KServe model mount: one file is served under the InferenceService's name; a
    /// folder of several cannot take one name.
    #[test]
    fn model_name_renames_the_one_model_of_a_mount() {
        let dir = std::env::temp_dir().join(format!("mcd-repo-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), b"").unwrap();
        let named = scan_named(&dir, Some("breast-cancer")).unwrap();
        assert_eq!(named, vec![("breast-cancer".to_string(), dir.join("model.onnx"))]);
        assert_eq!(scan_named(&dir, None).unwrap()[0].0, "model");
        std::fs::write(dir.join("other.onnx"), b"").unwrap();
        let e = scan_named(&dir, Some("breast-cancer")).unwrap_err();
        assert!(e.to_string().contains("holds 2 models"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
