//! `GET /models/{name}/drift`: what the model's drift monitor has seen (`core::drift`).

use serde::Serialize;
use utoipa::ToSchema;

use crate::core::Core;
use crate::core::drift::DriftReport;
use crate::core::view::LoadedModel;

#[derive(Serialize, ToSchema)]
pub struct DriftAnswer {
    pub model: String,
    /// Whether any of the model's rows (MC or eval) are tested for dataset shift.
    pub monitored: bool,
    /// Why not, when not monitored.
    pub reason: Option<String>,
    /// The monitor of MC rows: window, α and its Bonferroni threshold, the statistics,
    /// the reference (size, file, date, MC samples), the current window's rows, counts,
    /// and the last windows' tests (most recent first).
    #[schema(value_type = Option<Object>)]
    pub drift: Option<DriftReport>,
    /// The monitor of eval rows (top-class probability, or each element's value), as
    /// `drift`.
    #[schema(value_type = Option<Object>)]
    pub eval_drift: Option<DriftReport>,
}

impl DriftAnswer {
    pub fn new(core: &Core, m: &LoadedModel) -> DriftAnswer {
        let monitors = core.drift_monitors(&m.name).unwrap_or_default();
        let reason = match (&m.drift_reference, &m.calibration) {
            _ if !monitors.is_empty() => None,
            (Some(_), _) => Some("drift monitoring is off (a drift window of 0)".to_string()),
            (None, None) => Some(
                "the model has no drift reference: no calibration file, and no <stem>.drift-reference.json \
                 (`mcd-serve calibrate` makes one from unlabelled rows)"
                    .to_string(),
            ),
            (None, Some(_)) => Some(
                "its calibration file holds no drift reference (made before drift detection); re-run `mcd-serve calibrate`"
                    .to_string(),
            ),
        };
        DriftAnswer {
            model: m.name.clone(),
            monitored: !monitors.is_empty(),
            reason,
            drift: monitors.mc.map(|m| m.report()),
            eval_drift: monitors.eval.map(|m| m.report()),
        }
    }
}
