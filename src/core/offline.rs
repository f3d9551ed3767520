//! A model run outside the server, one labelled row at a time: what `mcd-serve calibrate`
//! drives. Rows come in the native API's input format (read by [`json_inputs`]), pass the
//! same input checks as a request, and run through the same eval and MC sessions the
//! workers use, so a calibration measures the answers the server gives.

use std::path::Path;

use serde_json::Value;

use crate::core::json_inputs;
use crate::engine::model::{InputRows, LoadedModel, McOutput, McSamples, NamedTensor};
use crate::engine::repo;
use crate::error::Error;

pub struct OfflineModel {
    model: LoadedModel,
}

impl OfflineModel {
    /// Loads `path` as the server would (with its `<stem>.model.json`, and self-checks).
    pub fn load(name: &str, path: &Path) -> Result<OfflineModel, String> {
        repo::load_model(name, path).map(|model| OfflineModel { model })
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// One row in the native API's input format (`inputs` as a native request's
    /// `"inputs"`), checked as a request's are.
    pub fn row(&self, inputs: Value) -> Result<InputRows, Error> {
        let rows = self.model.input_rows(json_inputs::parse_inputs(&self.model, inputs)?)?;
        if rows.rows() != 1 {
            return Err(Error::InvalidValue(format!(
                "each line holds one row; this one holds {}",
                rows.rows()
            )));
        }
        Ok(rows)
    }

    /// MC dropout on a row: `samples` passes with the masks of `seed`.
    pub fn mc(&self, row: &InputRows, samples: usize, seed: u64) -> Result<Vec<McOutput>, Error> {
        let samples = McSamples::new(samples)
            .ok_or_else(|| Error::InvalidValue(format!("mc_samples must be at least 2, got {samples}")))?;
        Ok(self.model.mc_session()?.run(row, samples, seed, false)?)
    }

    /// The eval answer on a row.
    pub fn eval(&self, row: &InputRows) -> Result<Vec<NamedTensor>, Error> {
        Ok(self.model.eval_session().run(row)?)
    }
}
