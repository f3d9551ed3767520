//! Monte-Carlo summary statistics, accumulated in f64.
//!
//! For each output element: mean, unbiased variance and std over the S samples (Welford's
//! update, so one pass and no catastrophic cancellation). For probability outputs (a
//! distribution along the last axis), per row: predictive entropy H[mean], expected
//! entropy mean_s H[p_s] (aleatoric) and their difference, the mutual information
//! (epistemic, BALD), clamped at 0. Entropies are in nats.

/// Running statistics of one output over MC samples.
pub struct Accumulator {
    count: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
    /// Classes along the last axis, and the per-row sum of sample entropies.
    entropy: Option<(usize, Vec<f64>)>,
    /// ln K, the largest entropy: computed once, not per row and sample.
    max_entropy: f64,
    samples: Option<Vec<f64>>,
}

#[derive(Debug, Clone)]
pub struct EntropyStats {
    pub predictive_entropy: Vec<f64>,
    pub expected_entropy: Vec<f64>,
    pub mutual_information: Vec<f64>,
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
    /// output, None otherwise.
    pub fn new(len: usize, classes: Option<usize>, keep_samples: bool) -> Self {
        let entropy = classes
            .filter(|&k| k > 0 && len.is_multiple_of(k))
            .map(|k| (k, vec![0.0; len / k]));
        let max_entropy = entropy.as_ref().map(|(k, _)| (*k as f64).ln()).unwrap_or(0.0);
        Accumulator {
            max_entropy,
            count: 0,
            mean: vec![0.0; len],
            m2: vec![0.0; len],
            entropy,
            samples: keep_samples.then(Vec::new),
        }
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
        if let Some((k, sums)) = &mut self.entropy {
            for (row, sum) in sample.chunks_exact(*k).zip(sums.iter_mut()) {
                *sum += raw_entropy(row).clamp(0.0, self.max_entropy);
            }
        }
        if let Some(s) = &mut self.samples {
            s.extend_from_slice(sample);
        }
    }

    pub fn finish(self) -> OutputStats {
        let n = self.count;
        let variance: Vec<f64> = if n >= 2 {
            self.m2.iter().map(|m2| (m2 / (n - 1) as f64).max(0.0)).collect()
        } else {
            vec![0.0; self.m2.len()]
        };
        let std = variance.iter().map(|v| v.sqrt()).collect();
        let entropy = self.entropy.map(|(k, sums)| {
            let predictive: Vec<f64> = self.mean.chunks_exact(k).map(entropy).collect();
            let expected: Vec<f64> = sums.iter().map(|s| s / n.max(1) as f64).collect();
            let mutual_information = predictive
                .iter()
                .zip(&expected)
                .map(|(p, e)| (p - e).max(0.0))
                .collect();
            EntropyStats {
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

    proptest! {
        #[test]
        fn statistics_stay_in_their_ranges(
            k in 2usize..8,
            rows in 1usize..4,
            s in 2usize..20,
            logits in proptest::collection::vec(-20.0f64..20.0, 8 * 4 * 20),
        ) {
            let mut acc = Accumulator::new(rows * k, Some(k), false);
            let mut values = vec![];
            for si in 0..s {
                let mut sample = vec![];
                for r in 0..rows {
                    let off = (si * rows + r) * k;
                    sample.extend(softmax(&logits[off..off + k]));
                }
                values.push(sample.clone());
                acc.push(&sample);
            }
            let st = acc.finish();
            let ln_k = (k as f64).ln();
            prop_assert!(st.variance.iter().all(|&v| v >= 0.0));
            let e = st.entropy.unwrap();
            for r in 0..rows {
                prop_assert!((0.0..=ln_k).contains(&e.predictive_entropy[r]));
                prop_assert!((0.0..=ln_k).contains(&e.expected_entropy[r]));
                prop_assert!(e.mutual_information[r] >= 0.0);
            }
            // Welford agrees with the two-pass textbook formula.
            for j in 0..rows * k {
                let mean: f64 = values.iter().map(|v| v[j]).sum::<f64>() / s as f64;
                let var: f64 = values.iter().map(|v| (v[j] - mean).powi(2)).sum::<f64>() / (s - 1) as f64;
                prop_assert!((st.mean[j] - mean).abs() < 1e-12);
                prop_assert!((st.variance[j] - var).abs() < 1e-12);
            }
        }
    }
}
