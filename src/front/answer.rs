//! What the native answer and the OIP answer's parameters both say: the mode, and for MC
//! dropout the run (samples, seed, and how `mc_samples=auto` ended).

use serde::Serialize;
use utoipa::ToSchema;

use crate::core::McAnswer;

/// `"eval"`: one deterministic forward pass, dropout off.
#[derive(Serialize, ToSchema)]
pub enum EvalMode {
    #[serde(rename = "eval")]
    Eval,
}

/// `"mc_dropout"`: stochastic passes and their statistics.
#[derive(Serialize, ToSchema)]
pub enum McMode {
    #[serde(rename = "mc_dropout")]
    McDropout,
}

/// The MC dropout run behind an answer.
#[derive(Serialize, ToSchema)]
pub struct McRun {
    /// The number of passes made.
    #[schema(minimum = 2)]
    pub mc_samples: usize,
    /// The seed of the dropout masks: the same seed, samples and input give the same
    /// answer. Drawn when the request gave none.
    pub seed: u64,
    /// With `mc_samples=auto`: whether the standard error reached `mc_se` before `mc_max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_converged: Option<bool>,
    /// With `mc_samples=auto`: the standard-error target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_se: Option<f64>,
    /// With `mc_samples=auto`: the most passes allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_max: Option<usize>,
}

impl McRun {
    pub fn of(answer: &McAnswer) -> McRun {
        McRun {
            mc_samples: answer.samples,
            seed: answer.request.seed,
            mc_converged: answer.auto.map(|a| a.converged),
            mc_se: answer.auto.map(|a| a.se),
            mc_max: answer.auto.map(|a| a.max),
        }
    }
}
