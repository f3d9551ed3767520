//! `GET /models/{name}/drift`: what the model's drift monitor has seen (`core::drift`).

use serde::Serialize;
use utoipa::ToSchema;

use crate::core::Core;
use crate::core::drift::DriftReport;
use crate::core::view::LoadedModel;

#[derive(Serialize, ToSchema)]
pub struct DriftAnswer {
    pub model: String,
    /// Whether the model's MC rows are tested for dataset shift.
    pub monitored: bool,
    /// Why not, when not monitored.
    pub reason: Option<String>,
    /// The monitor: window, α and its Bonferroni threshold, the statistics, the reference
    /// (size, file, date), the current window's rows, counts, and the last windows' tests
    /// (most recent first).
    #[schema(value_type = Option<Object>)]
    pub drift: Option<DriftReport>,
}

impl DriftAnswer {
    pub fn new(core: &Core, m: &LoadedModel) -> DriftAnswer {
        let monitor = core.drift_monitor(&m.name);
        let reason = match (&monitor, &m.calibration) {
            (Some(_), _) => None,
            (None, None) => Some("the model has no calibration file, so no drift reference".to_string()),
            (None, Some(c)) if c.file.drift_reference.is_empty() => Some(
                "its calibration file holds no drift reference (made before drift detection); re-run `mcd-serve calibrate`"
                    .to_string(),
            ),
            (None, Some(_)) => Some("drift monitoring is off (a drift window of 0)".to_string()),
        };
        DriftAnswer {
            model: m.name.clone(),
            monitored: monitor.is_some(),
            reason,
            drift: monitor.map(|m| m.report()),
        }
    }
}
