//! Inverted-dropout masks, sampled by the server from a seeded RNG.
//!
//! Each element is kept with probability 1-p and then scaled by 1/(1-p), or dropped to 0,
//! so the expected activation equals the eval activation. Masks are drawn as a buffer of
//! random `u32`s compared against a threshold: cheaper than one Bernoulli draw per element,
//! and exact to 2^-32 in the drop probability.
//!
//! A mask may have any shape (a channel mask is [rows, C, 1, 1]), and one set of keep/drop
//! draws may fill several tensors with different values: alpha dropout multiplies by one
//! and adds the other.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::prelude::*;

pub struct MaskSampler {
    seed: u64,
    buf: Vec<u32>,
}

/// One mask to draw in a pass. Its leading axis is samples × rows, sample-major, so sample
/// `s` of a `k`-sample pass owns the `s`-th of `k` equal blocks. The draws fill one tensor
/// per `(kept, dropped)` pair of `values`.
pub struct MaskSpec<'a> {
    pub ratio: f32,
    pub shape: &'a [usize],
    pub datum: DatumType,
    pub values: Vec<(f64, f64)>,
}

impl MaskSpec<'_> {
    /// Inverted dropout: kept units scaled by 1/(1-ratio), dropped ones 0.
    pub fn inverted(ratio: f32, shape: &[usize], datum: DatumType) -> MaskSpec<'_> {
        MaskSpec {
            ratio,
            shape,
            datum,
            values: vec![(1.0 / (1.0 - ratio as f64), 0.0)],
        }
    }
}

impl MaskSampler {
    /// ChaCha8 has a fixed, documented stream per seed, so a seed replays on any thread,
    /// machine or rand release.
    pub fn new(seed: u64) -> Self {
        MaskSampler { seed, buf: vec![] }
    }

    /// A single mask of `shape` for dropout ratio `ratio`, in the data type of the tensor
    /// it scales: sample 0 of a one-sample pass.
    pub fn sample(&mut self, ratio: f32, shape: &[usize], datum: DatumType) -> TractResult<Tensor> {
        Ok(self
            .sample_pass(0, 1, &[MaskSpec::inverted(ratio, shape, datum)])?
            .remove(0))
    }

    /// The masks of samples `first .. first + k`, run as one pass: for each spec, one tensor
    /// per pair of values, in order.
    ///
    /// Sample `s` reads words `s·W .. (s+1)·W` of the seed's ChaCha8 stream, where `W` is
    /// one sample's mask elements (site after site). So what sample `s` sees depends only on
    /// the seed, `s` and the batch's rows: not on how the samples are split into passes,
    /// and not on how many samples the request asked for (the first 10 samples of
    /// `mc_samples=50` are the samples of `mc_samples=10`). A pass reads its `k·W` words in
    /// one go.
    pub fn sample_pass(&mut self, first: u64, k: usize, masks: &[MaskSpec]) -> TractResult<Vec<Tensor>> {
        // Per sample: each mask's block length and its offset within the sample's words.
        let mut blocks = Vec::with_capacity(masks.len());
        let mut w = 0usize;
        for m in masks {
            let len: usize = m.shape.iter().product();
            if !len.is_multiple_of(k) {
                anyhow::bail!("a mask of shape {:?} does not split into {k} samples", m.shape);
            }
            blocks.push((len / k, w));
            w += len / k;
        }
        self.buf.resize(w * k, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_word_pos(first as u128 * w as u128);
        rng.fill(&mut self.buf[..]);
        let mut out = vec![];
        for (m, &(block, offset)) in masks.iter().zip(&blocks) {
            let words: Vec<&[u32]> = (0..k)
                .map(|s| &self.buf[s * w + offset..s * w + offset + block])
                .collect();
            let threshold = drop_threshold(m.ratio);
            for &(kept, dropped) in &m.values {
                out.push(match m.datum {
                    DatumType::F32 => fill(m.shape, &words, threshold, kept as f32, dropped as f32),
                    DatumType::F64 => fill(m.shape, &words, threshold, kept, dropped),
                    DatumType::F16 => fill(m.shape, &words, threshold, f16::from_f64(kept), f16::from_f64(dropped)),
                    other => anyhow::bail!("dropout masks for {other:?} are not supported"),
                }?);
            }
        }
        Ok(out)
    }
}

/// Writes the mask straight into the tensor's buffer from the random words, given as
/// consecutive pieces: a branch-free select the compiler vectorises.
fn fill<T: Datum + Copy + tract_num_traits::Zero>(
    shape: &[usize],
    random: &[&[u32]],
    threshold: u32,
    keep: T,
    drop: T,
) -> TractResult<Tensor> {
    anyhow::ensure!(
        random.iter().map(|p| p.len()).sum::<usize>() == shape.iter().product::<usize>(),
        "mask words do not cover the mask of shape {shape:?}: this is a bug"
    );
    // Not zeroed first: every element is written below (checked just above), and zeroing a
    // fresh MC-sized buffer costs as much as filling it.
    // SAFETY: T is a plain float type, and each element is written before the tensor is read.
    let mut t = unsafe { Tensor::uninitialized::<T>(shape)? };
    {
        let mut view = t.try_as_plain_ram_mut()?;
        let mut out = view.as_slice_mut::<T>()?;
        for piece in random {
            let (head, rest) = out.split_at_mut(piece.len());
            for (o, r) in head.iter_mut().zip(*piece) {
                *o = if *r >= threshold { keep } else { drop };
            }
            out = rest;
        }
    }
    Ok(t)
}

/// A uniform u32 below this value means "drop". ONNX ratios are below 1, so the threshold
/// fits in a u32 (the largest f32 below 1 gives 2^32 - 256).
fn drop_threshold(ratio: f32) -> u32 {
    ((ratio as f64) * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_f32(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn same_seed_same_mask_and_values_are_zero_or_scaled() {
        let a = as_f32(&MaskSampler::new(7).sample(0.3, &[64, 32], DatumType::F32).unwrap());
        let b = as_f32(&MaskSampler::new(7).sample(0.3, &[64, 32], DatumType::F32).unwrap());
        let c = as_f32(&MaskSampler::new(8).sample(0.3, &[64, 32], DatumType::F32).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let scale = (1.0 / (1.0 - 0.3f64)) as f32;
        assert!(a.iter().all(|&v| v == 0.0 || v == scale));
    }

    #[test]
    fn drop_share_matches_ratio_within_binomial_bounds() {
        let n = 200_000usize;
        for &p in &[0.1f32, 0.25, 0.5, 0.8] {
            let m = as_f32(&MaskSampler::new(1).sample(p, &[n], DatumType::F32).unwrap());
            let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64;
            let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
            // Five standard deviations: a false failure has probability below 1e-6.
            assert!(
                (dropped - n as f64 * p as f64).abs() < 5.0 * sd,
                "p={p}: dropped {dropped}"
            );
        }
    }

    /// Two sites, B = 3 rows, 5 samples: one pass of 5 or passes of 2 and 3 draw the same
    /// mask for every sample, and sample s depends only on s.
    #[test]
    fn a_sample_mask_does_not_depend_on_how_samples_are_split_into_passes() {
        let pass = |first: u64, k: usize| {
            let (a, b) = ([k * 3, 4], [k * 3, 2]);
            let specs =
                [(0.3, &a[..]), (0.6, &b[..])].map(|(ratio, shape)| MaskSpec::inverted(ratio, shape, DatumType::F32));
            let masks = MaskSampler::new(11).sample_pass(first, k, &specs).unwrap();
            masks.iter().map(as_f32).collect::<Vec<_>>()
        };
        let whole = pass(0, 5);
        let (head, tail) = (pass(0, 2), pass(2, 3));
        for site in 0..2 {
            let joined: Vec<f32> = head[site].iter().chain(&tail[site]).copied().collect();
            assert_eq!(joined, whole[site], "site {site}");
        }
        assert_ne!(whole[0][..12], whole[0][12..24]);
    }

    #[test]
    fn ratio_zero_keeps_everything_at_scale_one() {
        let m = as_f32(&MaskSampler::new(3).sample(0.0, &[1000], DatumType::F32).unwrap());
        assert!(m.iter().all(|&v| v == 1.0));
    }

    fn dropped_share_ok(m: &[f32], p: f64) -> Result<(), String> {
        let n = m.len() as f64;
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64;
        let sd = (n * p * (1.0 - p)).sqrt();
        // Five standard deviations: a false failure has probability below 1e-6.
        if (dropped - n * p).abs() < 5.0 * sd + 1e-9 {
            Ok(())
        } else {
            Err(format!("dropped {dropped} of {n} at p={p}"))
        }
    }

    /// Several sites with different ratios in one pass: each site drops at its own ratio
    /// and scales by its own 1/(1-p), in every sample's block.
    #[test]
    fn each_site_of_a_pass_drops_at_its_own_ratio() {
        let ratios = [0.1f32, 0.5, 0.8, 0.25];
        let k = 4;
        let shapes: Vec<[usize; 2]> = ratios.iter().map(|_| [k * 50, 250]).collect();
        let specs: Vec<MaskSpec> = ratios
            .iter()
            .zip(&shapes)
            .map(|(&ratio, shape)| MaskSpec::inverted(ratio, shape, DatumType::F32))
            .collect();
        let masks = MaskSampler::new(99).sample_pass(3, k, &specs).unwrap();
        for (m, &p) in masks.iter().zip(&ratios) {
            let m = as_f32(m);
            let scale = (1.0 / (1.0 - p as f64)) as f32;
            assert!(m.iter().all(|&v| v == 0.0 || v == scale), "p={p}");
            for block in m.chunks(m.len() / k) {
                dropped_share_ok(block, p as f64).unwrap();
            }
        }
    }

    #[test]
    fn f64_and_f16_masks_and_refused_types() {
        let m = MaskSampler::new(5).sample(0.25, &[4000], DatumType::F64).unwrap();
        let m = m.try_as_plain_ram().unwrap().as_slice::<f64>().unwrap().to_vec();
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        let f32s: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        dropped_share_ok(&f32s, 0.25).unwrap();
        let h = MaskSampler::new(5).sample(0.5, &[4000], DatumType::F16).unwrap();
        let h = h.try_as_plain_ram().unwrap().as_slice::<f16>().unwrap().to_vec();
        assert!(h.iter().all(|&v| v == f16::from_f32(0.0) || v == f16::from_f32(2.0)));
        let f32s: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        dropped_share_ok(&f32s, 0.5).unwrap();
        assert!(MaskSampler::new(5).sample(0.5, &[10], DatumType::I32).is_err());
    }

    #[test]
    fn a_mask_that_does_not_split_into_the_samples_is_refused() {
        let shape = [7usize, 3];
        let spec = MaskSpec::inverted(0.5, &shape, DatumType::F32);
        assert!(MaskSampler::new(1).sample_pass(0, 2, &[spec]).is_err());
    }

    #[test]
    fn drop_thresholds() {
        assert_eq!(drop_threshold(0.0), 0);
        assert_eq!(drop_threshold(0.5), 1 << 31);
        assert_eq!(drop_threshold(0.25), 1 << 30);
        let below_one = f32::from_bits(1.0f32.to_bits() - 1);
        assert_eq!(drop_threshold(below_one), u32::MAX - 255);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Each site's drop share is its ratio within binomial bounds, for any seed, any
        /// first sample and several sites.
        #[test]
        fn drop_share_per_site(seed in proptest::prelude::any::<u64>(), first in 0u64..1_000_000, p1 in 0.05f32..0.95, p2 in 0.05f32..0.95) {
            let (a, b) = ([2 * 2000usize], [2 * 3000usize]);
            let specs = [MaskSpec::inverted(p1, &a, DatumType::F32), MaskSpec::inverted(p2, &b, DatumType::F32)];
            let masks = MaskSampler::new(seed).sample_pass(first, 2, &specs).unwrap();
            for (m, p) in masks.iter().zip([p1, p2]) {
                let m = as_f32(m);
                let scale = (1.0 / (1.0 - p as f64)) as f32;
                proptest::prop_assert!(m.iter().all(|&v| v == 0.0 || v == scale));
                proptest::prop_assert!(dropped_share_ok(&m, p as f64).is_ok(), "{:?}", dropped_share_ok(&m, p as f64));
            }
        }

        /// Different seeds give different masks: seeds differing in any bit, including the
        /// high 32, and the samples of one seed differ from each other.
        #[test]
        fn different_seeds_give_different_masks(seed in proptest::prelude::any::<u64>(), bit in 0u32..64) {
            let other = seed ^ (1u64 << bit);
            let a = as_f32(&MaskSampler::new(seed).sample(0.5, &[256], DatumType::F32).unwrap());
            let b = as_f32(&MaskSampler::new(other).sample(0.5, &[256], DatumType::F32).unwrap());
            // Equal by chance with probability 2^-256.
            proptest::prop_assert_ne!(a, b);
            let shape = [2 * 256usize];
            let spec = MaskSpec::inverted(0.5, &shape, DatumType::F32);
            let two = as_f32(&MaskSampler::new(seed).sample_pass(0, 2, &[spec]).unwrap()[0]);
            proptest::prop_assert_ne!(&two[..256], &two[256..]);
        }
    }
}
