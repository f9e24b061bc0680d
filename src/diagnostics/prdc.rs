//! k-NN manifold measures in feature space.
//!
//! - Precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric for
//!   Assessing Generative Models", NeurIPS 2019). Each point of a set gets the ball reaching
//!   its k-th nearest neighbour in that set (k = 3 by default, the point itself not counted);
//!   the union of the balls estimates the set's manifold. Precision = fraction of generated
//!   points inside some real ball; recall = fraction of real points inside some generated
//!   ball.
//! - Density and coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for
//!   Generative Models", ICML 2020), with real balls only (k = 5 by default):
//!   density = `1 / (k M) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]` (M generated points Y,
//!   real points X; about 1 when the two distributions match, can exceed 1), coverage =
//!   fraction of real points whose ball contains at least one generated point (about
//!   `1 - 2^-k`, 0.97 for k = 5, for two equal-size samples of one distribution).
//!
//! Reading them together matters: a generator collapsed onto a cluster's *centre* keeps
//! coverage high in high dimension (the centre lies inside most of the cluster's k-NN balls;
//! 0.998 in a 32-D test with 100 points per cluster) while recall drops to 0 and density
//! soars (~20 there); one collapsed onto a typical sample loses coverage too (0.05).
//!
//! Balls are closed (`d <= radius`, as in Kynkäänniemi's equation 1; Naeem's reference code
//! uses `<`, which differs only on exact ties). Distances are Euclidean on the raw features.
//! [`RealManifold`] keeps the real radii so each check only computes generated-vs-generated
//! (for the recall radii) and generated-vs-real distances, in one pass each.

use serde::{Deserialize, Serialize};

use super::dist::{self, Mat};
use crate::error::{Error, Result};

/// The four numbers of one comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prdc {
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    /// Neighbourhood sizes used for precision / recall and for density / coverage.
    pub k_pr: usize,
    pub k_dc: usize,
    pub n_real: usize,
    pub n_generated: usize,
}

/// Real features with their cached k-NN radii, built once.
#[derive(Debug, Clone)]
pub struct RealManifold {
    pub k_pr: usize,
    pub k_dc: usize,
    center: Vec<f32>,
    real: Mat,
    radii_pr_sq: Vec<f32>,
    radii_dc_sq: Vec<f32>,
}

impl RealManifold {
    /// Radii of the k_pr-th and k_dc-th nearest neighbours of every real point (needs more
    /// than max(k_pr, k_dc) points).
    pub fn new(real: &[Vec<f32>], k_pr: usize, k_dc: usize) -> Result<Self> {
        dist::check_rows(real, "real features")?;
        if k_pr == 0 || k_dc == 0 || real.len() <= k_pr.max(k_dc) {
            return Err(Error::Msg(format!(
                "k-NN manifold: {} real points, k = {k_pr} / {k_dc} (need k >= 1 and more \
                 points than k)",
                real.len()
            )));
        }
        let center = dist::mean(real);
        let m = Mat::centered(real, &center, "real features")?;
        let (radii_pr_sq, radii_dc_sq) = dist::knn_radii_sq2(&m, k_pr, k_dc);
        Ok(Self {
            k_pr,
            k_dc,
            center,
            real: m,
            radii_pr_sq,
            radii_dc_sq,
        })
    }

    pub fn n_real(&self) -> usize {
        self.real.n
    }

    /// Real k_pr-NN radii (Euclidean).
    pub fn radii_pr(&self) -> Vec<f32> {
        self.radii_pr_sq.iter().map(|v| v.sqrt()).collect()
    }

    /// Real k_dc-NN radii (Euclidean).
    pub fn radii_dc(&self) -> Vec<f32> {
        self.radii_dc_sq.iter().map(|v| v.sqrt()).collect()
    }

    /// Precision, recall, density and coverage of `generated` against the real set (needs
    /// more than k_pr generated points for their recall radii).
    pub fn evaluate(&self, generated: &[Vec<f32>]) -> Result<Prdc> {
        let g = Mat::centered(generated, &self.center, "generated features")?;
        if g.n <= self.k_pr {
            return Err(Error::Msg(format!(
                "recall needs more than k = {} generated points, got {}",
                self.k_pr, g.n
            )));
        }
        let gen_radii_sq = dist::knn_radii_sq(&g, self.k_pr);
        let nr = self.real.n;
        let mut precise = 0usize;
        let mut density_hits = 0usize;
        let mut recalled = vec![false; nr];
        let mut nearest_gen = vec![f32::INFINITY; nr];
        dist::for_each_row(&g, &self.real, |i, row| {
            let rg = gen_radii_sq[i];
            let mut inside = 0usize;
            for (j, &d) in row.iter().enumerate() {
                inside += (d <= self.radii_pr_sq[j]) as usize;
                density_hits += (d <= self.radii_dc_sq[j]) as usize;
                recalled[j] |= d <= rg;
                if d < nearest_gen[j] {
                    nearest_gen[j] = d;
                }
            }
            precise += (inside > 0) as usize;
        });
        let covered = nearest_gen
            .iter()
            .zip(&self.radii_dc_sq)
            .filter(|(d, r)| d <= r)
            .count();
        let ng = g.n as f64;
        Ok(Prdc {
            precision: precise as f64 / ng,
            recall: recalled.iter().filter(|&&r| r).count() as f64 / nr as f64,
            density: density_hits as f64 / (self.k_dc as f64 * ng),
            coverage: covered as f64 / nr as f64,
            k_pr: self.k_pr,
            k_dc: self.k_dc,
            n_real: nr,
            n_generated: g.n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn gauss(rng: &mut Rng, n: usize, d: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| rng.normal_vec(d).into_iter().map(|v| v as f32).collect())
            .collect()
    }

    #[test]
    fn identical_distributions_score_near_one() {
        // Three independent samples of N(0, I) in 4-D, 600 each. A = reference, B and C play
        // "generated". With one distribution on both sides:
        // - density has expectation exactly 1 (each real ball holds on average k of the
        //   generated points' share, Naeem et al. sec. 3.1): assert |density - 1| < 0.1;
        // - coverage has expectation 1 - prod_{i<k} (N-1-i)/(M+N-1-i) ~ 1 - 2^-5 = 0.969 for
        //   M = N (Naeem et al. Lemma 1): assert within 0.03;
        // - precision and recall sit near 1 in low dimension (k-NN balls of 600 points cover
        //   a 4-D Gaussian apart from its thin tails): assert > 0.9;
        // - B and C are exchangeable, so C's numbers match the real-vs-real baseline B's
        //   within sampling noise (binomial sd ~ sqrt(0.05 * 0.95 / 600) ~ 0.01): assert 0.04.
        let mut rng = Rng::new(4);
        let (a, b, c) = (
            gauss(&mut rng, 600, 4),
            gauss(&mut rng, 600, 4),
            gauss(&mut rng, 600, 4),
        );
        let m = RealManifold::new(&a, 3, 5).unwrap();
        let base = m.evaluate(&b).unwrap();
        let r = m.evaluate(&c).unwrap();
        for p in [&base, &r] {
            assert!((p.density - 1.0).abs() < 0.1, "{p:?}");
            assert!((p.coverage - (1.0 - 0.5f64.powi(5))).abs() < 0.03, "{p:?}");
            assert!(p.precision > 0.9 && p.recall > 0.9, "{p:?}");
        }
        assert!((r.precision - base.precision).abs() < 0.04);
        assert!((r.recall - base.recall).abs() < 0.04);
        assert!((r.coverage - base.coverage).abs() < 0.04);
        assert!((r.density - base.density).abs() < 0.1);
    }

    #[test]
    fn collapsed_generator_has_low_recall_and_coverage() {
        // Real: N(0, I) in 4-D (600 points). Generator: 600 points within 0.01 of the single
        // point (0.5, 0, 0, 0). The generated balls are ~0.01 wide, so recall counts only real
        // points within ~0.01 of that point (essentially none; assert < 0.05). Coverage counts
        // real points whose 5-NN ball (radius ~0.6 here) reaches the point: those within ~0.6
        // of it, a few percent of the mass (assert < 0.1). Precision stays high (the point
        // lies inside the real manifold, > 0.9) and density ~ (balls containing the point) / 5
        // is finite: the classic "high fidelity, no diversity" signature.
        let mut rng = Rng::new(6);
        let real = gauss(&mut rng, 600, 4);
        let gen_: Vec<Vec<f32>> = gauss(&mut rng, 600, 4)
            .into_iter()
            .map(|v| {
                let mut w: Vec<f32> = v.iter().map(|x| 0.01 * x / 2.0).collect();
                w[0] += 0.5;
                w
            })
            .collect();
        let r = RealManifold::new(&real, 3, 5)
            .unwrap()
            .evaluate(&gen_)
            .unwrap();
        assert!(r.recall < 0.05, "{r:?}");
        assert!(r.coverage < 0.1, "{r:?}");
        assert!(r.precision > 0.9, "{r:?}");
    }

    #[test]
    fn radii_by_hand_and_errors() {
        // Real points 0, 1, 3, 7 on a line, k = 1: radii 1, 1, 2, 4. One generated point at
        // 2.5 is inside the ball of 3 (|2.5 - 3| = 0.5 <= 2) -> precision 1; with k = 1 its
        // density counts balls holding it: 3's only (|2.5-1| = 1.5 > 1, |2.5-7| = 4.5 > 4) ->
        // 1 / (1 * 1). Need 2 generated points for a recall radius: add 9 (radius 6.5 between
        // them, so real points within 6.5 of 2.5 (0, 1, 3, 7) or of 9 (3, 7) -> recall 1).
        // Coverage: real balls containing a generated point: 3's (2.5) and 7's (|9-7|=2 <= 4)
        // -> 2 / 4. Precision: 2.5 in 3's ball, 9 in 7's ball -> 1. Density: 2.5 -> 1 ball,
        // 9 -> 1 ball (7's) -> 2 / (1 * 2) = 1.
        let real: Vec<Vec<f32>> = [0.0, 1.0, 3.0, 7.0].iter().map(|&v| vec![v]).collect();
        let m = RealManifold::new(&real, 1, 1).unwrap();
        let radii = m.radii_pr();
        for (g, w) in radii.iter().zip([1.0, 1.0, 2.0, 4.0]) {
            assert!((g - w).abs() < 1e-5, "{radii:?}");
        }
        let r = m.evaluate(&[vec![2.5], vec![9.0]]).unwrap();
        assert_eq!(
            (r.precision, r.recall, r.density, r.coverage),
            (1.0, 1.0, 1.0, 0.5)
        );
        assert!(m.evaluate(&[vec![2.5]]).is_err());
        assert!(RealManifold::new(&real[..3], 3, 5).is_err());
        assert!(m.evaluate(&[vec![1.0, 2.0], vec![0.0, 0.0]]).is_err());
    }
}
