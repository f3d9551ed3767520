//! Split-conformal calibration of MC answers: the `<stem>.calibration.json` file, its
//! load-time check against the model file, and the maths that both `mcd-serve calibrate`
//! and serving use.
//!
//! - Regression: the score is |y − mean| / std_total with std_total² = std² + noise, the
//!   noise variance fitted on the calibration set (MC dropout's spread leaves the target's
//!   own noise out). The interval at level 1 − α is mean ± q·std_total, q the
//!   ⌈(n+1)(1−α)⌉-th smallest score.
//! - Probability outputs: LAC sets (Sadinle, Lei and Wasserman 2019; score 1 − p_y), which
//!   have the smallest expected size of all valid sets. APS was tried first and dropped:
//!   without randomisation its score for a confident, correct row is ≈ 1, so on the bundled
//!   models every set at every level held (nearly) all classes; with randomisation the same
//!   request would get different sets. LAC alone can return an empty set (no class
//!   plausible enough); ours always keeps the top class, a superset, so the coverage
//!   guarantee still holds and a clinician is never handed an empty set.
//! - Referral: refer a row when its predictive entropy is above a threshold chosen so that
//!   a one-sided Clopper–Pearson upper bound on the error among accepted calibration rows
//!   stays at or below the target. Thresholds are tested from the most confident end and
//!   the scan stops at the first that fails (fixed-sequence testing, as in Learn-then-Test),
//!   so trying many thresholds does not spend the confidence.
//!
//! [`file`] holds the calibration file and its load-time checks; [`method`] the maths;
//! [`validate`] the invariants a file must hold to be served.

mod file;
mod method;
mod validate;

pub use file::*;
pub use method::*;

#[cfg(test)]
mod tests;
