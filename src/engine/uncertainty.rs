//! Monte-Carlo summary statistics, accumulated in f64.
//!
//! For each output element: mean, unbiased variance and std over the S samples (Welford's
//! update, so one pass and no catastrophic cancellation). For probability outputs, per
//! position: predictive entropy H[mean], expected entropy mean_s H[p_s] (aleatoric) and
//! their difference, the mutual information (epistemic, BALD), clamped at 0. A position is
//! one distribution: a row of a last-axis softmax, a pixel of a segmentation's class axis,
//! an element of a Bernoulli (sigmoid) output. Entropies are in nats.

use crate::engine::row_summary::{self, RowSummary, VolumeCounter};

/// How one sample's values hold its distributions (see `OutputKind::layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntropyLayout {
    /// Row-major blocks of `classes × inner` values: class `c` of position `i` of a block
    /// is at `c·inner + i` (inner = 1 for a last-axis distribution).
    Categorical { classes: usize, inner: usize },
    /// Every element is the probability of its own event: H(p) = −p ln p − (1−p) ln(1−p).
    Bernoulli,
}

impl EntropyLayout {
    fn positions(self, len: usize) -> Option<usize> {
        match self {
            EntropyLayout::Categorical { classes, inner } => {
                let block = classes.checked_mul(inner)?;
                (classes > 0 && inner > 0 && len.is_multiple_of(block)).then(|| len / classes)
            }
            EntropyLayout::Bernoulli => Some(len),
        }
    }

    /// The largest entropy of one position: ln K, or ln 2.
    fn max_entropy(self) -> f64 {
        match self {
            EntropyLayout::Categorical { classes, .. } => (classes as f64).ln().max(0.0),
            EntropyLayout::Bernoulli => std::f64::consts::LN_2,
        }
    }

    /// Adds each position's entropy of `p` (clamped to [0, max]) to `out`.
    fn add_entropies(self, p: &[f64], out: &mut [f64], max: f64) {
        match self {
            EntropyLayout::Categorical { classes, inner: 1 } => {
                for (row, o) in p.chunks_exact(classes).zip(out.iter_mut()) {
                    *o += raw_entropy(row).clamp(0.0, max);
                }
            }
            EntropyLayout::Categorical { classes, inner } => {
                // Block by block, class-major, so that memory is read in order.
                let mut h = vec![0.0; inner];
                for (block, o) in p.chunks_exact(classes * inner).zip(out.chunks_exact_mut(inner)) {
                    h.iter_mut().for_each(|x| *x = 0.0);
                    for class in block.chunks_exact(inner) {
                        for (hi, &x) in h.iter_mut().zip(class) {
                            if x > 0.0 {
                                *hi -= x * x.ln();
                            }
                        }
                    }
                    for (oi, hi) in o.iter_mut().zip(&h) {
                        *oi += hi.clamp(0.0, max);
                    }
                }
            }
            EntropyLayout::Bernoulli => {
                for (o, &x) in out.iter_mut().zip(p) {
                    *o += bernoulli_entropy(x);
                }
            }
        }
    }
}

/// Running statistics of one output over MC samples.
pub struct Accumulator {
    count: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
    /// The layout, the per-position sum of sample entropies, and the shape those positions
    /// take in an answer.
    entropy: Option<(EntropyLayout, Vec<f64>, Vec<usize>)>,
    /// The largest entropy of a position: computed once, not per position and sample.
    max_entropy: f64,
    samples: Option<Vec<f64>>,
    /// Each row's segmented volumes, where a row has more than one position.
    volumes: Option<VolumeCounter>,
    /// The class whose positions are not foreground (categorical outputs).
    background: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct EntropyStats {
    /// The shape of each statistic below: the output's without its class axes (or the
    /// output's own, for a Bernoulli output); its first dim is the rows.
    pub shape: Vec<usize>,
    pub predictive_entropy: Vec<f64>,
    pub expected_entropy: Vec<f64>,
    pub mutual_information: Vec<f64>,
    /// Per row, for outputs with more than one position per row.
    pub summary: Option<RowSummary>,
}

#[derive(Debug, Clone)]
pub struct OutputStats {
    pub mean: Vec<f64>,
    pub variance: Vec<f64>,
    pub std: Vec<f64>,
    pub entropy: Option<EntropyStats>,
    /// All samples, sample-major, when asked for.
    pub samples: Option<Vec<f64>>,
    pub count: usize,
}

impl Accumulator {
    /// `len` elements per sample; `classes` is the size of the last axis for a probability
    /// output, None otherwise. The positions take the shape [len / classes].
    pub fn new(len: usize, classes: Option<usize>, keep_samples: bool) -> Self {
        let layout = classes.map(|classes| EntropyLayout::Categorical { classes, inner: 1 });
        let positions = classes.filter(|&k| k > 0).map(|k| vec![len / k]).unwrap_or_default();
        Self::with_layout(len, layout, positions, keep_samples)
    }

    /// `len` elements per sample, read as `layout` says; `positions` is the shape the
    /// per-position statistics take (its first dim the rows). No entropies when the layout
    /// does not fit `len`, or the shape does not hold its positions.
    pub fn with_layout(len: usize, layout: Option<EntropyLayout>, positions: Vec<usize>, keep_samples: bool) -> Self {
        let entropy = layout.and_then(|l| {
            let n = l.positions(len)?;
            (positions.iter().product::<usize>() == n).then(|| (l, vec![0.0; n], positions))
        });
        let max_entropy = entropy.as_ref().map(|(l, _, _)| l.max_entropy()).unwrap_or(0.0);
        let volumes = entropy.as_ref().and_then(|(layout, sums, shape)| {
            let rows = *shape.first()?;
            (rows > 0 && sums.len() / rows >= 2).then(|| VolumeCounter::new(*layout, rows, sums.len()))
        });
        Accumulator {
            volumes,
            background: None,
            max_entropy,
            count: 0,
            mean: vec![0.0; len],
            m2: vec![0.0; len],
            entropy,
            samples: keep_samples.then(Vec::new),
        }
    }

    /// Names the class that is background, for the summary's foreground means.
    pub fn with_background(mut self, background: Option<usize>) -> Self {
        self.background = background;
        self
    }

    pub fn push(&mut self, sample: &[f64]) {
        assert_eq!(sample.len(), self.mean.len(), "sample length mismatch: this is a bug");
        self.count += 1;
        let n = self.count as f64;
        for ((m, m2), &x) in self.mean.iter_mut().zip(self.m2.iter_mut()).zip(sample) {
            let delta = x - *m;
            *m += delta / n;
            *m2 += delta * (x - *m);
        }
        if let Some((layout, sums, _)) = &mut self.entropy {
            layout.add_entropies(sample, sums, self.max_entropy);
        }
        if let Some(v) = &mut self.volumes {
            v.push(sample);
        }
        if let Some(s) = &mut self.samples {
            s.extend_from_slice(sample);
        }
    }

    /// The largest std/√n over the elements: how far each mean may still move.
    pub fn max_standard_error(&self) -> f64 {
        if self.count < 2 {
            return f64::INFINITY;
        }
        let n = self.count as f64;
        let largest = self.m2.iter().cloned().fold(0.0, f64::max);
        (largest / (n - 1.0) / n).max(0.0).sqrt()
    }

    pub fn finish(self) -> OutputStats {
        let n = self.count;
        let variance: Vec<f64> = if n >= 2 {
            self.m2.iter().map(|m2| (m2 / (n - 1) as f64).max(0.0)).collect()
        } else {
            vec![0.0; self.m2.len()]
        };
        let std = variance.iter().map(|v| v.sqrt()).collect();
        let max_entropy = self.max_entropy;
        let (volumes, background, mean) = (self.volumes, self.background, &self.mean);
        let entropy = self.entropy.map(|(layout, sums, shape)| {
            let mut predictive = vec![0.0; sums.len()];
            layout.add_entropies(&self.mean, &mut predictive, max_entropy);
            let expected: Vec<f64> = sums.iter().map(|s| s / n.max(1) as f64).collect();
            let mutual_information = predictive
                .iter()
                .zip(&expected)
                .map(|(p, e)| (p - e).max(0.0))
                .collect::<Vec<f64>>();
            let rows = shape.first().copied().unwrap_or(1);
            EntropyStats {
                summary: volumes.and_then(|v| {
                    let fg = row_summary::foreground(layout, mean, background);
                    RowSummary::of(rows, &predictive, &mutual_information, fg.as_deref(), v.finish())
                }),
                shape,
                predictive_entropy: predictive,
                expected_entropy: expected,
                mutual_information,
            }
        });
        OutputStats {
            mean: self.mean,
            variance,
            std,
            entropy,
            samples: self.samples,
            count: n,
        }
    }
}

/// Shannon entropy in nats of a probability vector, with 0·ln 0 = 0. Rounding can put a
/// float32 softmax a hair outside the simplex, so the result is clamped to [0, ln K].
pub fn entropy(p: &[f64]) -> f64 {
    raw_entropy(p).clamp(0.0, (p.len() as f64).ln().max(0.0))
}

fn raw_entropy(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

/// H(p) = −p ln p − (1−p) ln(1−p) in nats, with p clamped to [0, 1] (a float32 sigmoid
/// can round a hair outside) and 0·ln 0 = 0.
pub fn bernoulli_entropy(p: f64) -> f64 {
    let p = p.clamp(0.0, 1.0);
    let term = |x: f64| if x > 0.0 { -x * x.ln() } else { 0.0 };
    (term(p) + term(1.0 - p)).clamp(0.0, std::f64::consts::LN_2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn softmax(logits: &[f64]) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn closed_forms_on_small_example() {
        let mut acc = Accumulator::new(2, Some(2), true);
        acc.push(&[1.0, 0.0]);
        acc.push(&[0.0, 1.0]);
        let s = acc.finish();
        assert_eq!(s.mean, vec![0.5, 0.5]);
        assert_eq!(s.variance, vec![0.5, 0.5]); // ((0.5)^2 * 2) / (2 - 1)
        let e = s.entropy.unwrap();
        assert!((e.predictive_entropy[0] - 2f64.ln()).abs() < 1e-15);
        assert_eq!(e.expected_entropy[0], 0.0);
        assert!((e.mutual_information[0] - 2f64.ln()).abs() < 1e-15);
        assert_eq!(s.samples.unwrap(), vec![1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn identical_samples_have_zero_variance_and_zero_mutual_information() {
        let p = softmax(&[0.3, -1.0, 2.0]);
        let mut acc = Accumulator::new(3, Some(3), false);
        for _ in 0..10 {
            acc.push(&p);
        }
        let s = acc.finish();
        assert!(s.variance.iter().all(|&v| v == 0.0));
        let e = s.entropy.unwrap();
        assert!(e.mutual_information[0].abs() < 1e-12);
        assert!((e.predictive_entropy[0] - entropy(&p)).abs() < 1e-12);
    }

    /// Two-pass f64 reference: mean, then the sum of squared deviations / (n - 1), both on
    /// values shifted by the first one (exact for close values), so that the reference
    /// keeps its digits under a large common offset.
    fn two_pass(values: &[Vec<f64>], j: usize) -> (f64, f64) {
        let n = values.len() as f64;
        let shift = values[0][j];
        let d_mean = values.iter().map(|v| v[j] - shift).sum::<f64>() / n;
        let var = values.iter().map(|v| (v[j] - shift - d_mean).powi(2)).sum::<f64>() / (n - 1.0);
        (shift + d_mean, var)
    }

    /// Entropies computed straight from the samples, with no clamping: H[mean of p_s],
    /// mean of H[p_s], and their difference.
    fn direct_entropies(values: &[Vec<f64>], k: usize, row: usize) -> (f64, f64, f64) {
        let h = |p: &[f64]| -> f64 { p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum() };
        let n = values.len() as f64;
        let mean: Vec<f64> = (0..k)
            .map(|c| values.iter().map(|v| v[row * k + c]).sum::<f64>() / n)
            .collect();
        let predictive = h(&mean);
        let expected = values.iter().map(|v| h(&v[row * k..(row + 1) * k])).sum::<f64>() / n;
        (predictive, expected, predictive - expected)
    }

    #[test]
    fn one_sample_has_zero_variance_and_its_own_entropy() {
        let p = softmax(&[0.5, 1.5]);
        let mut acc = Accumulator::new(2, Some(2), false);
        acc.push(&p);
        let s = acc.finish();
        assert_eq!(s.count, 1);
        assert_eq!(s.mean, p);
        assert_eq!(s.variance, vec![0.0, 0.0]);
        let e = s.entropy.unwrap();
        assert!((e.expected_entropy[0] - entropy(&p)).abs() < 1e-15);
        assert!(s.samples.is_none());
    }

    #[test]
    fn no_entropy_unless_the_classes_divide_the_output() {
        assert!(Accumulator::new(6, Some(4), false).finish().entropy.is_none());
        assert!(Accumulator::new(6, Some(0), false).finish().entropy.is_none());
        assert!(Accumulator::new(6, None, false).finish().entropy.is_none());
        let e = Accumulator::new(6, Some(3), false).finish().entropy.unwrap();
        assert_eq!(e.predictive_entropy.len(), 2);
    }

    #[test]
    fn entropy_closed_forms_and_clamping_outside_the_simplex() {
        assert!((entropy(&[0.25; 4]) - 4f64.ln()).abs() < 1e-15);
        assert!((entropy(&[0.5, 0.5, 0.0]) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
        // A float32 softmax a hair outside the simplex: -1.0000001·ln(1.0000001) < 0.
        assert_eq!(entropy(&[1.000_000_1, 0.0]), 0.0);
        // Mass above one in every class: the raw sum exceeds ln K.
        assert_eq!(entropy(&[0.3, 0.3]), 2f64.ln());
        assert_eq!(entropy(&[1.0]), 0.0);
    }

    /// A sample whose entropy rounds outside [0, ln K] counts as the bound in the expected
    /// entropy, as it does in the predictive one.
    #[test]
    fn expected_entropy_clamps_each_sample() {
        let mut acc = Accumulator::new(2, Some(2), false);
        acc.push(&[0.3, 0.3]); // raw entropy 0.722 > ln 2
        acc.push(&[1.000_000_1, 0.0]); // raw entropy < 0
        let e = acc.finish().entropy.unwrap();
        assert!((e.expected_entropy[0] - 2f64.ln() / 2.0).abs() < 1e-15);
    }

    proptest! {
        /// Welford against a two-pass f64 reference on values with a large common offset,
        /// where the textbook sum-of-squares formula loses every digit: relative error of
        /// the variance within 1e-6 for offsets up to 1e7 times the spread.
        #[test]
        fn welford_matches_a_two_pass_reference_under_large_offsets(
            offset in prop_oneof![Just(0.0f64), -1e9f64..1e9, Just(-1e9f64)],
            scale in prop_oneof![Just(1e-3f64), Just(1.0f64), Just(1e3f64)],
            noise in proptest::collection::vec(-1.0f64..1.0, 2..60),
            len in 1usize..4,
        ) {
            let values: Vec<Vec<f64>> = noise
                .iter()
                .enumerate()
                .map(|(i, z)| (0..len).map(|j| offset + scale * z * (j as f64 + 1.0) + (i % 3) as f64 * scale * 0.1).collect())
                .collect();
            let mut acc = Accumulator::new(len, None, true);
            for v in &values {
                acc.push(v);
            }
            let st = acc.finish();
            prop_assert_eq!(st.count, values.len());
            prop_assert_eq!(st.samples.as_ref().unwrap().len(), values.len() * len);
            for j in 0..len {
                let (mean, var) = two_pass(&values, j);
                // f64 holds the offset to 2^-52 of itself: that bounds what any method can do.
                let ulp = offset.abs() * f64::EPSILON;
                prop_assert!((st.mean[j] - mean).abs() <= 1e-12 * mean.abs().max(scale) + 4.0 * ulp, "mean {} vs {}", st.mean[j], mean);
                let tol = 1e-6 * var + 1e-9 * scale * scale + 64.0 * ulp * scale;
                prop_assert!((st.variance[j] - var).abs() <= tol, "var {} vs {} (offset {offset}, scale {scale})", st.variance[j], var);
                prop_assert_eq!(st.std[j], st.variance[j].sqrt());
            }
        }

        /// Entropies and mutual information against a direct computation from the samples
        /// (no clamping in the reference, so a sign or a swapped term shows).
        #[test]
        fn entropies_match_a_direct_computation_from_the_samples(
            k in 2usize..8,
            rows in 1usize..4,
            s in 2usize..20,
            temperature in prop_oneof![Just(0.1f64), Just(1.0f64), Just(10.0f64)],
            logits in proptest::collection::vec(-5.0f64..5.0, 8 * 4 * 20),
        ) {
            let mut acc = Accumulator::new(rows * k, Some(k), false);
            let mut values = vec![];
            for si in 0..s {
                let mut sample = vec![];
                for r in 0..rows {
                    let off = (si * rows + r) * k;
                    let l: Vec<f64> = logits[off..off + k].iter().map(|x| x * temperature).collect();
                    sample.extend(softmax(&l));
                }
                values.push(sample.clone());
                acc.push(&sample);
            }
            let st = acc.finish();
            let e = st.entropy.unwrap();
            for r in 0..rows {
                let (predictive, expected, mi) = direct_entropies(&values, k, r);
                prop_assert!((e.predictive_entropy[r] - predictive).abs() < 1e-12, "H[mean] {} vs {}", e.predictive_entropy[r], predictive);
                prop_assert!((e.expected_entropy[r] - expected).abs() < 1e-12, "E[H] {} vs {}", e.expected_entropy[r], expected);
                prop_assert!((e.mutual_information[r] - mi).abs() < 1e-12, "MI {} vs {}", e.mutual_information[r], mi);
            }
            for j in 0..rows * k {
                let (mean, var) = two_pass(&values, j);
                prop_assert!((st.mean[j] - mean).abs() < 1e-12);
                prop_assert!((st.variance[j] - var).abs() < 1e-12);
            }
        }
    }
}
