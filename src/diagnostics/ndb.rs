//! NDB, the number of statistically different bins (Richardson & Weiss, "On GANs and GMMs",
//! NeurIPS 2018, section 4).
//!
//! Computed exactly as follows:
//! 1. [`NdbBins::fit`]: k-means with K clusters (seeded greedy k-means++ and Lloyd, see
//!    [`super::kmeans`]) on the real features, once. Each bin keeps its centroid, its real
//!    count and proportion `p_r = n_r / N_r`, and the index of the real sample nearest its
//!    centroid (the picture the explorer shows for the bin).
//! 2. [`NdbBins::test`]: every generated feature goes to the bin of its nearest centroid
//!    (Euclidean), giving `p_g = n_g / N_g`. Per bin, a two-proportion z-test with the pooled
//!    proportion `p = (n_r + n_g) / (N_r + N_g)`:
//!    `z = (p_g - p_r) / sqrt(p (1 - p) (1 / N_r + 1 / N_g))` (z = 0 when both counts are 0),
//!    two-sided p-value `2 (1 - Phi(|z|))`. A bin is *statistically different* when its
//!    p-value is below alpha (0.05 by default), i.e. `|z| > z_crit = Phi^-1(1 - alpha / 2)`
//!    (1.96). NDB is the number of such bins, NDB/K its fraction.
//!
//! Multiple comparisons: like the paper, by default **no** correction is applied, so two
//! samples from one distribution still score about `alpha * K` bins (2.5 of 50 at alpha =
//! 0.05); that expected floor is why each NDB is shown beside its real-vs-real baseline.
//! `bonferroni = true` tests each bin at `alpha / K` instead.
//!
//! Beyond the paper's NDB the result splits the significant bins into *under*-represented
//! (`p_g < p_r`: dropped or thinned modes) and *over*-represented ones, and gives the
//! Jensen-Shannon divergence between the two bin histograms (natural log, so at most ln 2),
//! which the paper reports alongside NDB.

use serde::{Deserialize, Serialize};

use super::dist::{self, Mat};
use super::kmeans::kmeans_mat;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Bins fitted once on real features.
#[derive(Debug, Clone)]
pub struct NdbBins {
    /// Bin centres in the input feature space.
    pub centroids: Vec<Vec<f32>>,
    pub real_counts: Vec<usize>,
    pub real_proportions: Vec<f64>,
    pub n_real: usize,
    /// Per bin: index (into the features given to `fit`) of the real sample nearest its centre.
    pub nearest_real: Vec<usize>,
    /// Per bin: Euclidean distance from that sample to the centre.
    pub nearest_real_distance: Vec<f64>,
    /// Lloyd iterations k-means ran and whether it converged.
    pub iterations: usize,
    pub converged: bool,
    center: Vec<f32>,
    cmat: Mat,
}

/// Outcome of one NDB test of a sample against the bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NdbResult {
    /// Number of bins K.
    pub k: usize,
    pub n_real: usize,
    pub n_generated: usize,
    pub alpha: f64,
    pub bonferroni: bool,
    /// |z| above which a bin is significant.
    pub z_critical: f64,
    pub real_proportions: Vec<f64>,
    pub generated_proportions: Vec<f64>,
    /// Per bin `(p_g - p_r) / se`: negative where the generator under-fills the bin.
    pub z: Vec<f64>,
    pub p_values: Vec<f64>,
    pub significant: Vec<bool>,
    /// NDB: the number of significant bins.
    pub n_significant: usize,
    /// Significant bins with `p_g < p_r` (dropped / thinned modes) and with `p_g > p_r`.
    pub n_under: usize,
    pub n_over: usize,
    /// NDB / K.
    pub ndb_over_k: f64,
    /// Jensen-Shannon divergence of the bin histograms (nats).
    pub js_divergence: f64,
}

impl NdbBins {
    /// k-means with `k` bins on `real` (see the module doc), seeded.
    pub fn fit(real: &[Vec<f32>], k: usize, max_iter: usize, seed: u64) -> Result<Self> {
        dist::check_rows(real, "NDB real features")?;
        let center = dist::mean(real);
        let x = Mat::centered(real, &center, "NDB real features")?;
        let fit = kmeans_mat(&x, k, max_iter, &mut Rng::stream(seed, "diagnostics.ndb"))?;
        let mut real_counts = vec![0usize; k];
        for &a in &fit.assignments {
            real_counts[a] += 1;
        }
        let n_real = real.len();
        let nearest = dist::nearest(&fit.centroids, &x);
        let centroids = (0..k)
            .map(|c| {
                let row = fit.centroids.row(c);
                row.iter().zip(&center).map(|(v, m)| v + m).collect()
            })
            .collect::<Vec<Vec<f32>>>();
        let nearest_real: Vec<usize> = nearest.iter().map(|p| p.0).collect();
        let nearest_real_distance = nearest_real
            .iter()
            .enumerate()
            .map(|(c, &i)| dist::exact_distance(&real[i], &centroids[c]))
            .collect();
        Ok(Self {
            centroids,
            real_proportions: real_counts
                .iter()
                .map(|&c| c as f64 / n_real as f64)
                .collect(),
            real_counts,
            n_real,
            nearest_real,
            nearest_real_distance,
            iterations: fit.iterations,
            converged: fit.converged,
            center,
            cmat: fit.centroids,
        })
    }

    pub fn k(&self) -> usize {
        self.centroids.len()
    }

    /// Bin (nearest centroid) of each feature vector.
    pub fn assign(&self, features: &[Vec<f32>]) -> Result<Vec<usize>> {
        let m = Mat::centered(features, &self.center, "NDB features")?;
        Ok(dist::nearest(&m, &self.cmat)
            .into_iter()
            .map(|p| p.0)
            .collect())
    }

    /// Bin counts of `features`.
    pub fn counts(&self, features: &[Vec<f32>]) -> Result<Vec<usize>> {
        let mut c = vec![0; self.k()];
        for b in self.assign(features)? {
            c[b] += 1;
        }
        Ok(c)
    }

    /// The NDB test of `features` against the real bins (see the module doc).
    pub fn test(&self, features: &[Vec<f32>], alpha: f64, bonferroni: bool) -> Result<NdbResult> {
        let counts = self.counts(features)?;
        ndb_test(&self.real_counts, &counts, alpha, bonferroni)
    }
}

/// The NDB z-tests on two bin histograms (real counts, generated counts); see the module doc.
pub fn ndb_test(
    real_counts: &[usize],
    gen_counts: &[usize],
    alpha: f64,
    bonferroni: bool,
) -> Result<NdbResult> {
    let k = real_counts.len();
    if k == 0 || gen_counts.len() != k {
        return Err(Error::Msg(format!(
            "NDB: {} real bins vs {} generated bins",
            k,
            gen_counts.len()
        )));
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::Config(format!("NDB alpha {alpha} not in (0, 1)")));
    }
    let n_r: usize = real_counts.iter().sum();
    let n_g: usize = gen_counts.iter().sum();
    if n_r == 0 || n_g == 0 {
        return Err(Error::Msg("NDB: an empty sample".into()));
    }
    let level = if bonferroni { alpha / k as f64 } else { alpha };
    let z_critical = normal_quantile(1.0 - level / 2.0);
    let (nr, ng) = (n_r as f64, n_g as f64);
    let mut out = NdbResult {
        k,
        n_real: n_r,
        n_generated: n_g,
        alpha,
        bonferroni,
        z_critical,
        real_proportions: Vec::with_capacity(k),
        generated_proportions: Vec::with_capacity(k),
        z: Vec::with_capacity(k),
        p_values: Vec::with_capacity(k),
        significant: Vec::with_capacity(k),
        n_significant: 0,
        n_under: 0,
        n_over: 0,
        ndb_over_k: 0.0,
        js_divergence: 0.0,
    };
    for (&cr, &cg) in real_counts.iter().zip(gen_counts) {
        let (pr, pg) = (cr as f64 / nr, cg as f64 / ng);
        let p = (cr + cg) as f64 / (nr + ng);
        let se = (p * (1.0 - p) * (1.0 / nr + 1.0 / ng)).sqrt();
        let z = if se > 0.0 { (pg - pr) / se } else { 0.0 };
        let pv = two_sided_p(z);
        let sig = pv < level;
        if sig {
            out.n_significant += 1;
            if pg < pr {
                out.n_under += 1;
            } else {
                out.n_over += 1;
            }
        }
        let m = 0.5 * (pr + pg);
        let kl = |a: f64| if a > 0.0 { a * (a / m).ln() } else { 0.0 };
        out.js_divergence += 0.5 * (kl(pr) + kl(pg));
        out.real_proportions.push(pr);
        out.generated_proportions.push(pg);
        out.z.push(z);
        out.p_values.push(pv);
        out.significant.push(sig);
    }
    out.ndb_over_k = out.n_significant as f64 / k as f64;
    Ok(out)
}

/// Complementary error function, |relative error| < 1.2e-7 everywhere (the Chebyshev fit of
/// Numerical Recipes, 2nd ed., section 6.2, `erfcc`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Two-sided p-value of a standard normal statistic: `P(|Z| >= |z|) = erfc(|z| / sqrt 2)`.
pub fn two_sided_p(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
}

/// Standard normal quantile `Phi^-1(q)` for q in (0, 1), by bisection on [`erfc`].
pub fn normal_quantile(q: f64) -> f64 {
    let cdf = |x: f64| 0.5 * erfc(-x / std::f64::consts::SQRT_2);
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::super::kmeans::tests::{clusters, simplex_means};
    use super::*;

    #[test]
    fn normal_tables() {
        // Textbook values: z_0.975 = 1.959964, z_0.995 = 2.575829; P(|Z| > 1.96) = 0.04999.
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.995) - 2.575_829).abs() < 1e-5);
        assert!((two_sided_p(1.959_964) - 0.05).abs() < 1e-6);
        assert!((two_sided_p(0.0) - 1.0).abs() < 1e-6);
        assert!((erfc(-1.0) - (2.0 - 0.157_299_207)).abs() < 1e-6);
    }

    #[test]
    fn z_test_by_hand() {
        // Bin A: real 30 / 100, generated 10 / 100. Pooled p = 40 / 200 = 0.2,
        // se = sqrt(0.2 * 0.8 * (1/100 + 1/100)) = sqrt(0.0032) = 0.056569,
        // z = (0.1 - 0.3) / 0.056569 = -3.5355 -> significant, under-represented.
        // Bin B: 70 vs 90: same |z| (the complement), over-represented.
        let r = ndb_test(&[30, 70], &[10, 90], 0.05, false).unwrap();
        assert!((r.z[0] + 3.535_534).abs() < 1e-5, "{:?}", r.z);
        assert!((r.z[1] - 3.535_534).abs() < 1e-5);
        assert_eq!((r.n_significant, r.n_under, r.n_over), (2, 1, 1));
        assert_eq!(r.ndb_over_k, 1.0);
        // JS of (0.3, 0.7) vs (0.1, 0.9): m = (0.2, 0.8);
        // 0.5 [0.3 ln 1.5 + 0.7 ln 0.875] + 0.5 [0.1 ln 0.5 + 0.9 ln 1.125] = 0.02678.
        let js = 0.5 * (0.3 * 1.5f64.ln() + 0.7 * 0.875f64.ln())
            + 0.5 * (0.1 * 0.5f64.ln() + 0.9 * 1.125f64.ln());
        assert!((r.js_divergence - js).abs() < 1e-12);
        // 30 vs 25 of 100: z = -0.05 / sqrt(0.275 * 0.725 / 50) = -0.7931 -> not significant.
        let r = ndb_test(&[30, 70], &[25, 75], 0.05, false).unwrap();
        assert_eq!(r.n_significant, 0);
        // Bonferroni with K = 2 tests at 0.025: z_crit = Phi^-1(0.9875) = 2.2414.
        let r = ndb_test(&[30, 70], &[10, 90], 0.05, true).unwrap();
        assert!((r.z_critical - 2.241_403).abs() < 1e-5);
        assert!(ndb_test(&[1, 2], &[1], 0.05, false).is_err());
        assert!(ndb_test(&[1, 2], &[0, 0], 0.05, false).is_err());
    }

    #[test]
    fn one_class_generator_drops_k_minus_1_bins() {
        // K = 10 well-separated clusters (means 10 e_c in 16-D, sigma 0.5), 100 real points
        // each, and K = 10 bins: k-means puts one bin on each cluster (as in the k-means
        // test), so p_r = 0.1 per bin. A "generator" whose 500 samples all come from cluster
        // 3 fills bin(3) with p_g = 1 and leaves the 9 others at p_g = 0. For an empty bin,
        // pooled p = 100 / 1500, se = sqrt(p (1-p) (1/1000 + 1/500)) = 0.01366,
        // z = -0.1 / 0.01366 = -7.3 -> all 9 significant and under; the full bin has
        // z = +0.9 / sqrt(0.4 * 0.6 * 0.003) = +33.5 -> significant, over.
        // So NDB = K = 10, of which K - 1 = 9 dropped modes.
        let mut rng = Rng::new(21);
        let means = simplex_means(10, 16, 10.0);
        let (real, _) = clusters(&mut rng, &means, 100, 0.5);
        let bins = NdbBins::fit(&real, 10, 100, 0).unwrap();
        assert!(bins.real_counts.iter().all(|&c| c == 100), "{bins:?}");
        let (gen_, _) = clusters(&mut rng, &means[3..4], 500, 0.5);
        let r = bins.test(&gen_, 0.05, false).unwrap();
        assert_eq!((r.n_significant, r.n_under, r.n_over), (10, 9, 1));
        assert!((r.ndb_over_k - 1.0).abs() < 1e-12);
        // Each bin's picture is a real sample of its own cluster, near the centre
        // (distance ~ sigma sqrt(16) = 2 or less; cluster means are 14 apart).
        let assign = bins.assign(&real).unwrap();
        for c in 0..10 {
            assert_eq!(assign[bins.nearest_real[c]], c);
            assert!(bins.nearest_real_distance[c] < 2.5);
        }
    }

    #[test]
    fn real_against_real_is_near_zero() {
        // Two independent samples of one 20-cluster mixture (sigma 1.5 so clusters are blobs
        // k-means must split arbitrarily), K = 50 bins fitted on the first. Without a
        // correction the expected NDB is alpha * K = 2.5 false positives, Binomial(50, 0.05)
        // (P(X >= 8) ~ 0.001); assert <= 7. With Bonferroni the expected count is 0.05.
        let mut rng = Rng::new(8);
        let means = simplex_means(20, 24, 6.0);
        let (a, _) = clusters(&mut rng, &means, 60, 1.5);
        let (b, _) = clusters(&mut rng, &means, 60, 1.5);
        let bins = NdbBins::fit(&a, 50, 100, 1).unwrap();
        let r = bins.test(&b, 0.05, false).unwrap();
        assert!(r.n_significant <= 7, "NDB {} of 50", r.n_significant);
        let rb = bins.test(&b, 0.05, true).unwrap();
        assert!(rb.n_significant <= 1);
        assert!(r.js_divergence < 0.05, "JS {}", r.js_divergence);
    }
}
