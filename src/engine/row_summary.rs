//! One score per row (an image, a volume, a sequence) of an output with more than one
//! position a row: what a referral or a worklist reads, where a map is too much.
//!
//! - the mean and the largest predictive entropy and mutual information over the row;
//! - the same means over the foreground only: positions whose mean's most probable class is
//!   not the model's `background_class` (categorical), or whose mean p is ≥ 0.5 (Bernoulli).
//!   MONAI Label's epistemic score drops the background likewise. NaN (null in JSON) for a
//!   row without foreground;
//! - per structure (a class; the mask, for a Bernoulli output), the segmented volume in
//!   positions across samples: positions whose sample argmax is that class (or whose sample
//!   p is ≥ 0.5), its mean, std and coefficient of variation (ivadomed's structure-volume
//!   uncertainty; NaN where the mean volume is 0).

use crate::engine::uncertainty::EntropyLayout;

#[derive(Debug, Clone, PartialEq)]
pub struct RowSummary {
    pub mean_predictive_entropy: Vec<f64>,
    pub max_predictive_entropy: Vec<f64>,
    pub mean_mutual_information: Vec<f64>,
    pub max_mutual_information: Vec<f64>,
    /// Foreground means of predictive entropy and mutual information, where defined.
    pub foreground: Option<[Vec<f64>; 2]>,
    pub volumes: Volumes,
    rows: [usize; 1],
}

/// Per row and structure (row-major, [rows, structures]): the segmented volume's mean, std
/// (unbiased) and coefficient of variation across samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Volumes {
    pub shape: [usize; 2],
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub cv: Vec<f64>,
}

/// The summary statistics an answer carries, in answer order; the last three are shaped
/// [rows, structures], the others [rows].
pub fn statistics(foreground: bool) -> Vec<&'static str> {
    let mut names = vec![
        "mean_predictive_entropy",
        "max_predictive_entropy",
        "mean_mutual_information",
        "max_mutual_information",
    ];
    if foreground {
        names.extend([
            "foreground_mean_predictive_entropy",
            "foreground_mean_mutual_information",
        ]);
    }
    names.extend(["volume_mean", "volume_std", "volume_cv"]);
    names
}

impl RowSummary {
    /// The summary of `rows` rows of per-position values, or None with one position a row
    /// (the values are then their own summary). `foreground` marks each position.
    pub fn of(
        rows: usize,
        predictive: &[f64],
        mutual_information: &[f64],
        foreground: Option<&[bool]>,
        volumes: Volumes,
    ) -> Option<RowSummary> {
        if rows == 0 || !predictive.len().is_multiple_of(rows) || predictive.len() / rows < 2 {
            return None;
        }
        let per_row = predictive.len() / rows;
        let mean = |v: &[f64]| -> Vec<f64> {
            v.chunks_exact(per_row)
                .map(|r| r.iter().sum::<f64>() / per_row as f64)
                .collect()
        };
        let max = |v: &[f64]| -> Vec<f64> {
            v.chunks_exact(per_row)
                .map(|r| r.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
                .collect()
        };
        let masked_mean = |v: &[f64], mask: &[bool]| -> Vec<f64> {
            v.chunks_exact(per_row)
                .zip(mask.chunks_exact(per_row))
                .map(|(r, m)| {
                    let (sum, n) = r
                        .iter()
                        .zip(m)
                        .filter(|(_, f)| **f)
                        .fold((0.0, 0usize), |(s, n), (x, _)| (s + x, n + 1));
                    if n == 0 { f64::NAN } else { sum / n as f64 }
                })
                .collect()
        };
        Some(RowSummary {
            mean_predictive_entropy: mean(predictive),
            max_predictive_entropy: max(predictive),
            mean_mutual_information: mean(mutual_information),
            max_mutual_information: max(mutual_information),
            foreground: foreground.map(|m| [masked_mean(predictive, m), masked_mean(mutual_information, m)]),
            volumes,
            rows: [rows],
        })
    }

    /// Each statistic by name, with its shape, in the order [`statistics`] gives.
    pub fn named(&self) -> Vec<(&'static str, &[usize], &[f64])> {
        let rows = &self.rows[..];
        let mut out: Vec<(&'static str, &[usize], &[f64])> = vec![
            ("mean_predictive_entropy", rows, &self.mean_predictive_entropy),
            ("max_predictive_entropy", rows, &self.max_predictive_entropy),
            ("mean_mutual_information", rows, &self.mean_mutual_information),
            ("max_mutual_information", rows, &self.max_mutual_information),
        ];
        if let Some([pe, mi]) = &self.foreground {
            out.push(("foreground_mean_predictive_entropy", rows, pe));
            out.push(("foreground_mean_mutual_information", rows, mi));
        }
        let v = &self.volumes;
        out.extend([
            ("volume_mean", &v.shape[..], &v.mean[..]),
            ("volume_std", &v.shape[..], &v.std[..]),
            ("volume_cv", &v.shape[..], &v.cv[..]),
        ]);
        out
    }
}

/// Which positions are foreground, from the mean over samples: for a categorical output
/// only with a `background` class; for a Bernoulli output, p ≥ 0.5.
pub fn foreground(layout: EntropyLayout, mean: &[f64], background: Option<usize>) -> Option<Vec<bool>> {
    match layout {
        EntropyLayout::Bernoulli => Some(mean.iter().map(|&p| p >= 0.5).collect()),
        EntropyLayout::Categorical { classes, inner } => {
            let background = background.filter(|&b| b < classes)?;
            let mut out = Vec::with_capacity(mean.len() / classes);
            for block in mean.chunks_exact(classes * inner) {
                let top = argmax(block, classes, inner);
                out.extend(top.iter().map(|&c| c != background));
            }
            Some(out)
        }
    }
}

/// Per position of one block, the class with the largest value (the first, on ties).
fn argmax(block: &[f64], classes: usize, inner: usize) -> Vec<usize> {
    let mut best = block[..inner].to_vec();
    let mut top = vec![0; inner];
    for c in 1..classes {
        for (i, &x) in block[c * inner..(c + 1) * inner].iter().enumerate() {
            if x > best[i] {
                best[i] = x;
                top[i] = c;
            }
        }
    }
    top
}

/// Each sample's volume per row and structure, summed over samples.
#[derive(Debug, Clone)]
pub struct VolumeCounter {
    layout: EntropyLayout,
    structures: usize,
    per_row: usize,
    count: usize,
    sum: Vec<f64>,
    sum_squares: Vec<f64>,
}

impl VolumeCounter {
    /// For `positions` positions in `rows` rows.
    pub fn new(layout: EntropyLayout, rows: usize, positions: usize) -> VolumeCounter {
        let structures = match layout {
            EntropyLayout::Categorical { classes, .. } => classes,
            EntropyLayout::Bernoulli => 1,
        };
        VolumeCounter {
            layout,
            structures,
            per_row: positions / rows.max(1),
            count: 0,
            sum: vec![0.0; rows * structures],
            sum_squares: vec![0.0; rows * structures],
        }
    }

    pub fn push(&mut self, sample: &[f64]) {
        let mut counts = vec![0u64; self.sum.len()];
        let per_row = self.per_row.max(1);
        match self.layout {
            EntropyLayout::Bernoulli => {
                for (j, &p) in sample.iter().enumerate() {
                    if p >= 0.5 {
                        counts[j / per_row] += 1;
                    }
                }
            }
            EntropyLayout::Categorical { classes, inner } => {
                for (b, block) in sample.chunks_exact(classes * inner).enumerate() {
                    for (i, c) in argmax(block, classes, inner).into_iter().enumerate() {
                        let row = (b * inner + i) / per_row;
                        counts[row * classes + c] += 1;
                    }
                }
            }
        }
        for ((s, q), &c) in self.sum.iter_mut().zip(&mut self.sum_squares).zip(&counts) {
            *s += c as f64;
            *q += (c * c) as f64;
        }
        self.count += 1;
    }

    /// Counts and their squares are integers far below 2^53: the sums are exact, and the
    /// variance from them loses nothing.
    pub fn finish(self) -> Volumes {
        let n = self.count.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std: Vec<f64> = self
            .sum_squares
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                if self.count < 2 {
                    0.0
                } else {
                    ((q - n * m * m) / (n - 1.0)).max(0.0).sqrt()
                }
            })
            .collect();
        let cv = std
            .iter()
            .zip(&mean)
            .map(|(s, m)| if *m > 0.0 { s / m } else { f64::NAN })
            .collect();
        Volumes {
            shape: [self.sum.len() / self.structures.max(1), self.structures],
            mean,
            std,
            cv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of two pixels, three classes along axis 1 ([2, 3, 2]); two samples.
    #[test]
    fn categorical_volumes_and_foreground_by_hand() {
        let layout = EntropyLayout::Categorical { classes: 3, inner: 2 };
        let mut v = VolumeCounter::new(layout, 2, 4);
        // Row 0: pixel 0 is class 1 in both samples, pixel 1 class 0 then 2.
        // Row 1: pixel 0 is class 2 both times, pixel 1 class 2 then 1.
        v.push(&[
            0.1, 0.7, 0.8, 0.2, 0.1, 0.1, /* row 1 */ 0.1, 0.1, 0.2, 0.2, 0.7, 0.7,
        ]);
        v.push(&[
            0.1, 0.1, 0.8, 0.2, 0.1, 0.7, /* row 1 */ 0.1, 0.1, 0.2, 0.8, 0.7, 0.1,
        ]);
        let vol = v.finish();
        assert_eq!(vol.shape, [2, 3]);
        assert_eq!(vol.mean, vec![0.5, 1.0, 0.5, 0.0, 0.5, 1.5]);
        let s = std::f64::consts::FRAC_1_SQRT_2; // counts 1 and 0: std √(1/2)
        assert_eq!(vol.std, vec![s, 0.0, s, 0.0, s, s]);
        assert!(vol.cv[3].is_nan());
        assert!((vol.cv[5] - s / 1.5).abs() < 1e-15);

        // Foreground: background class 0; row 0's pixel 1 has class 0 on average.
        let mean = [0.1, 0.4, 0.8, 0.2, 0.1, 0.4, 0.1, 0.1, 0.2, 0.5, 0.7, 0.4];
        let fg = foreground(layout, &mean, Some(0)).unwrap();
        assert_eq!(fg, vec![true, false, true, true]);
        assert!(foreground(layout, &mean, None).is_none());
        let vols = VolumeCounter::new(layout, 2, 4).finish();
        let s = RowSummary::of(2, &[0.5, 1.0, 0.2, 0.4], &[0.1, 0.3, 0.0, 0.2], Some(&fg), vols).unwrap();
        assert_eq!(s.mean_predictive_entropy, vec![0.75, 0.30000000000000004]);
        assert_eq!(s.max_mutual_information, vec![0.3, 0.2]);
        let [pe, mi] = s.foreground.unwrap();
        assert_eq!(pe, vec![0.5, 0.30000000000000004]);
        assert_eq!(mi, vec![0.1, 0.1]);
    }

    #[test]
    fn bernoulli_volumes_and_a_row_without_foreground() {
        let mut v = VolumeCounter::new(EntropyLayout::Bernoulli, 2, 4);
        v.push(&[0.9, 0.5, 0.1, 0.2]);
        v.push(&[0.9, 0.4, 0.3, 0.2]);
        v.push(&[0.9, 0.6, 0.3, 0.6]);
        let vol = v.finish();
        assert_eq!(vol.shape, [2, 1]);
        assert_eq!(vol.mean, vec![5.0 / 3.0, 1.0 / 3.0]);
        let var0: f64 = [2.0f64, 1.0, 2.0].iter().map(|c| (c - 5.0 / 3.0).powi(2)).sum::<f64>() / 2.0;
        assert!((vol.std[0] - var0.sqrt()).abs() < 1e-15);
        let fg = foreground(EntropyLayout::Bernoulli, &[0.9, 0.5, 0.2, 0.3], None).unwrap();
        let s = RowSummary::of(2, &[0.3, 0.7, 0.5, 0.6], &[0.1, 0.2, 0.1, 0.1], Some(&fg), vol).unwrap();
        let [pe, _] = s.foreground.as_ref().unwrap();
        assert_eq!(pe[0], 0.5);
        assert!(pe[1].is_nan());
        let names: Vec<&str> = s.named().iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, statistics(true));
    }
}
