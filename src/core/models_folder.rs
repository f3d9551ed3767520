//! The models folder as the server sees it: the names it holds, the default model, and
//! loading it into the core at start and again on SIGHUP. A reload keeps every model whose
//! file did not change, and a model that fails to reload keeps its last good version.

use std::path::Path;

use crate::core::Core;
use crate::engine::repo;

/// The model names in `dir` (only `only`, with `--model-name`), without loading anything.
pub fn model_names(dir: &Path, only: Option<&str>) -> std::io::Result<Vec<String>> {
    Ok(repo::scan_named(dir, only)?.into_iter().map(|(n, _)| n).collect())
}

/// The default model among `names`: the one asked for, or the only one.
pub fn default_model(names: &[String], requested: Option<&str>) -> Result<Option<String>, String> {
    repo::default_model(names, requested)
}

impl Core {
    /// Loads the whole folder (at start) and installs what loaded.
    pub fn load_folder(&self, dir: &Path, only: Option<&str>) {
        match repo::load_folder(dir, only, None, None, self.limits.backend) {
            Ok(r) => self.install(r),
            Err(e) => tracing::error!(error = %e, "reading the models folder failed"),
        }
    }

    /// Reloads the folder, reusing unchanged models and keeping the last good version of
    /// any that fails; counts and returns the outcome (`ok`, `partial`, `refused`).
    pub fn reload_folder(&self, dir: &Path, only: Option<&str>) -> &'static str {
        let previous = self.repo();
        let keep = self.default_model.as_deref();
        let result = match repo::load_folder(dir, only, previous.as_deref(), keep, self.limits.backend) {
            Ok(r) => {
                let partial = !r.failures.is_empty();
                self.install(r);
                if partial { "partial" } else { "ok" }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the loaded models");
                "refused"
            }
        };
        self.metrics.reloads.with_label_values(&[result]).inc();
        result
    }
}
