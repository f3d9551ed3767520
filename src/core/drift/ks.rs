//! The two-sample Kolmogorov–Smirnov test, two-sided, as `scipy.stats.ks_2samp` computes
//! it with its default `method='auto'`: the statistic D = sup |F₁ − F₂| over the pooled
//! values, and the exact p-value P(D' ≥ D) under the permutation null (every interleaving
//! of the two samples equally likely) when both samples hold at most [`MAX_EXACT`] values.
//! Beyond that the p-value is the Kolmogorov limit `Q(√(n₁n₂/(n₁+n₂))·D)`, which is
//! scipy's older `mode='asymp'` (scipy ≥ 1.5 uses `kstwo.sf(D, round(en))` there; the
//! two agree to about 1/√en).
//!
//! Ties are allowed, as in scipy: the statistic is taken between distinct values, and the
//! p-value is the continuous one (conservative under ties).

/// The largest sample size whose p-value is exact (scipy's `MAX_AUTO_N`).
pub const MAX_EXACT: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsResult {
    pub statistic: f64,
    pub p_value: f64,
}

/// The test of `a` against `reference`; `reference` must be sorted ascending (the
/// monitor sorts it once). `a` is sorted here. An empty sample gives D = 0, p = 1.
pub fn ks_2samp_sorted_reference(a: &mut [f64], reference: &[f64]) -> KsResult {
    a.sort_by(f64::total_cmp);
    let (n1, n2) = (a.len(), reference.len());
    if n1 == 0 || n2 == 0 {
        return KsResult {
            statistic: 0.0,
            p_value: 1.0,
        };
    }
    // D in lattice units: |i·n2 − j·n1| over the pooled order, at each distinct value.
    let (mut i, mut j, mut h) = (0usize, 0usize, 0u64);
    while i < n1 || j < n2 {
        let x = match (a.get(i), reference.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => unreachable!(),
        };
        while i < n1 && a[i] <= x {
            i += 1;
        }
        while j < n2 && reference[j] <= x {
            j += 1;
        }
        h = h.max((i as u64 * n2 as u64).abs_diff(j as u64 * n1 as u64));
    }
    let statistic = h as f64 / (n1 as f64 * n2 as f64);
    let p_value = if n1.max(n2) <= MAX_EXACT {
        exact_p(n1, n2, h)
    } else {
        kolmogorov_sf((n1 as f64 * n2 as f64 / (n1 + n2) as f64).sqrt() * statistic)
    };
    KsResult { statistic, p_value }
}

/// `ks_2samp(a, b)` for unsorted samples.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> KsResult {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    b.sort_by(f64::total_cmp);
    ks_2samp_sorted_reference(&mut a, &b)
}

/// P(a uniformly random interleaving of n1 and n2 values reaches |i·n2 − j·n1| ≥ h):
/// the walk from (0, 0) to (n1, n2) steps right with probability (n1−i)/(n1−i+n2−j), so
/// every path is equally likely; the probability of staying strictly inside the band is
/// carried along the anti-diagonals in f64 (no binomials, no overflow). O(n1·n2).
pub fn exact_p(n1: usize, n2: usize, h: u64) -> f64 {
    if h == 0 {
        return 1.0;
    }
    let inside = |i: usize, j: usize| (i as u64 * n2 as u64).abs_diff(j as u64 * n1 as u64) < h;
    // row[j]: probability of being at (i, j) having stayed inside, for the current i.
    let mut row = vec![0.0f64; n2 + 1];
    row[0] = 1.0;
    for j in 1..=n2 {
        let from = row[j - 1] * (n2 - (j - 1)) as f64 / (n1 + n2 - (j - 1)) as f64;
        row[j] = if inside(0, j) { from } else { 0.0 };
    }
    for i in 1..=n1 {
        let mut next = vec![0.0f64; n2 + 1];
        for j in 0..=n2 {
            if !inside(i, j) {
                continue;
            }
            // From (i−1, j) by a step in `a`; from (i, j−1) by a step in the reference.
            let left = n1 + n2 - (i - 1) - j;
            let mut p = row[j] * (n1 - (i - 1)) as f64 / left as f64;
            if j > 0 {
                let left = n1 + n2 - i - (j - 1);
                p += next[j - 1] * (n2 - (j - 1)) as f64 / left as f64;
            }
            next[j] = p;
        }
        row = next;
    }
    (1.0 - row[n2]).clamp(0.0, 1.0)
}

/// The Kolmogorov distribution's survival function Q(x) = 2 Σ (−1)^(k−1) e^(−2k²x²).
pub fn kolmogorov_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < 0.2 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * x * x).exp();
        sum += if k as u64 % 2 == 1 { term } else { -term };
        if term < 1e-18 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    include!("ks_tests.rs");
}
