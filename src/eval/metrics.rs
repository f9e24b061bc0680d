//! Scores for conditional generators, computed from an evaluator's outputs.
//!
//! - [`topk_accuracy`]: the i-CLEVR course metric. For an image with k true objects take the
//!   k highest-scoring labels and count how many are true; accuracy = all hits / all labels
//!   over the whole set (micro-averaged: one hit is 1/72 on test.json, 1/84 on new_test.json).
//!   For one-hot conditions this is ordinary top-1 accuracy.
//! - [`frechet_distance`] (from [`super::frechet`]): Fréchet distance between Gaussians fitted
//!   to two feature sets (Heusel et al. 2017's formula). On evaluator features it is a
//!   *domain-feature FD*; on pytorch-fid's Inception pool3 features ([`super::fid`]) it is FID.

// Dense matrix code reads best with explicit indices.
#![expect(
    clippy::needless_range_loop,
    reason = "dense matrix code reads best with explicit indices"
)]

use crate::error::{Error, Result};

/// Hits and label counts of the course's top-k scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub hits: usize,
    pub labels: usize,
    /// Per label: (times it was a true label, times it was among the top k).
    pub per_label: Vec<(usize, usize)>,
}

impl TopK {
    pub fn accuracy(&self) -> f64 {
        if self.labels == 0 {
            0.0
        } else {
            self.hits as f64 / self.labels as f64
        }
    }

    /// Hit rate of label `i` (None if it never occurred).
    pub fn label_rate(&self, i: usize) -> Option<f64> {
        let (n, h) = self.per_label[i];
        (n > 0).then(|| h as f64 / n as f64)
    }
}

/// How an unconditional generator spreads over an evaluator's K classes: the histogram of top
/// classes, KL(histogram || uniform) in nats (0 for a perfectly even spread, ln K when one
/// class takes everything) and the classes covered (those with at least a quarter of the
/// uniform share 1/K).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSpread {
    pub counts: Vec<usize>,
    pub kl_uniform: f64,
    pub covered: usize,
}

/// [`ClassSpread`] of probability rows (the top class of each row counts).
pub fn class_spread(probs: &[Vec<f32>], k: usize) -> Result<ClassSpread> {
    if k == 0 || probs.is_empty() {
        return Err(Error::Msg(format!(
            "class spread of {} rows over {k} classes",
            probs.len()
        )));
    }
    let mut counts = vec![0usize; k];
    for p in probs {
        if p.len() != k {
            return Err(Error::Msg(format!(
                "a row of {} scores for {k} classes",
                p.len()
            )));
        }
        let top = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(j, _)| j);
        counts[top] += 1;
    }
    let n = probs.len() as f64;
    let kl_uniform = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            p * (p * k as f64).ln()
        })
        .sum();
    let covered = counts
        .iter()
        .filter(|&&c| c as f64 * 4.0 * k as f64 >= n)
        .count();
    Ok(ClassSpread {
        counts,
        kl_uniform,
        covered,
    })
}

/// The label ids of a condition row: its entries above 0.5 (one for a one-hot row).
pub fn active_labels(cond: &[f32]) -> Vec<u16> {
    cond.iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(j, _)| j as u16)
        .collect()
}

/// `scores`: one row of K scores per image; `truth`: the true label ids of each image.
pub fn topk_accuracy(scores: &[Vec<f32>], truth: &[Vec<u16>]) -> Result<TopK> {
    if scores.len() != truth.len() {
        return Err(Error::Msg(format!(
            "{} score rows for {} label sets",
            scores.len(),
            truth.len()
        )));
    }
    let k_all = scores.first().map_or(0, Vec::len);
    let mut out = TopK {
        hits: 0,
        labels: 0,
        per_label: vec![(0, 0); k_all],
    };
    for (s, t) in scores.iter().zip(truth) {
        if s.len() != k_all {
            return Err(Error::Msg("score rows of different lengths".into()));
        }
        if let Some(&bad) = t.iter().find(|&&l| l as usize >= k_all) {
            return Err(Error::Msg(format!(
                "label id {bad} out of range (K = {k_all})"
            )));
        }
        let k = t.len();
        // Indices of the k highest scores (ties broken by the lower index, like torch.topk
        // on distinct values; NaN ranks lowest).
        let mut idx: Vec<usize> = (0..k_all).collect();
        idx.sort_by(|&a, &b| {
            let (x, y) = (s[a], s[b]);
            y.partial_cmp(&x)
                .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
                .then(a.cmp(&b))
        });
        let top = &idx[..k.min(k_all)];
        for &l in t {
            out.per_label[l as usize].0 += 1;
            if top.contains(&(l as usize)) {
                out.per_label[l as usize].1 += 1;
                out.hits += 1;
            }
        }
        out.labels += k;
    }
    Ok(out)
}

pub use super::frechet::frechet_distance;

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations:
/// returns (eigenvalues, eigenvectors as columns).
pub fn sym_eigen(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    let mut v = vec![vec![0.0; n]; n];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let scale: f64 = (0..n).map(|i| a[i][i] * a[i][i]).sum::<f64>().max(1e-300);
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn class_spread_by_hand() {
        let row = |j: usize| {
            let mut r = vec![0.1f32; 4];
            r[j] = 0.7;
            r
        };
        // Even over 4 classes: KL 0, all covered.
        let even: Vec<_> = (0..8).map(|i| row(i % 4)).collect();
        let s = super::class_spread(&even, 4).unwrap();
        assert_eq!((s.counts.clone(), s.covered), (vec![2, 2, 2, 2], 4));
        assert!(s.kl_uniform.abs() < 1e-12);
        // One class only: KL = ln 4, one covered.
        let one: Vec<_> = (0..8).map(|_| row(2)).collect();
        let s = super::class_spread(&one, 4).unwrap();
        assert!((s.kl_uniform - 4f64.ln()).abs() < 1e-12);
        assert_eq!(s.covered, 1);
        // Shares 1/2, 1/4, 3/16, 1/16 of 16 images: KL = sum p ln(4p)
        // = 0.5 ln 2 + 0 + 0.1875 ln 0.75 + 0.0625 ln 0.25 = 0.20321...; the last class holds
        // exactly a quarter of the uniform share (1/16) and counts as covered.
        let mut v = vec![];
        for (j, c) in [(0, 8), (1, 4), (2, 3), (3, 1)] {
            v.extend((0..c).map(|_| row(j)));
        }
        let s = super::class_spread(&v, 4).unwrap();
        let want = 0.5 * 2f64.ln() + 0.1875 * 0.75f64.ln() + 0.0625 * 0.25f64.ln();
        assert!((s.kl_uniform - want).abs() < 1e-12, "{}", s.kl_uniform);
        assert_eq!(s.covered, 4);
        assert!(super::class_spread(&[], 4).is_err());
        assert!(super::class_spread(&[vec![0.5, 0.5]], 4).is_err());
    }

    use super::*;

    #[test]
    fn course_topk_arithmetic_by_hand() {
        // Three images, K = 4, 1 + 2 + 3 = 6 labels in total.
        // img0 truth {2}: top-1 = 2 -> 1 hit.
        // img1 truth {0, 1}: scores rank 3 > 0 > 1 > 2, top-2 = {3, 0} -> 1 hit (0).
        // img2 truth {1, 2, 3}: top-3 = {0, 1, 3} -> 2 hits (1, 3).
        // accuracy = (1 + 1 + 2) / 6 = 0.6667 (micro-averaged, not the mean of 1, 0.5, 0.67).
        let scores = vec![
            vec![0.1, 0.2, 0.9, 0.3],
            vec![0.8, 0.5, 0.1, 0.95],
            vec![0.9, 0.7, 0.2, 0.6],
        ];
        let truth = vec![vec![2], vec![0, 1], vec![1, 2, 3]];
        let r = topk_accuracy(&scores, &truth).unwrap();
        assert_eq!((r.hits, r.labels), (4, 6));
        assert!((r.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        // Per label: 0 true once, hit once; 1 twice, hit once (img2); 2 twice, hit once (img0);
        // 3 once, hit once.
        assert_eq!(r.per_label, vec![(1, 1), (2, 1), (2, 1), (1, 1)]);
        assert_eq!(r.label_rate(1), Some(0.5));
        // test.json has 72 labels: one hit more or less moves accuracy by 1/72.
        assert!(topk_accuracy(&scores, &truth[..2]).is_err());
        assert!(topk_accuracy(&[vec![0.0; 2]], &[vec![5]]).is_err());
    }

    #[test]
    fn jacobi_eigen_reconstructs() {
        let a = vec![
            vec![4.0, 1.0, 0.0],
            vec![1.0, 3.0, 0.5],
            vec![0.0, 0.5, 2.0],
        ];
        let (w, v) = sym_eigen(&a);
        for i in 0..3 {
            for j in 0..3 {
                let back: f64 = (0..3).map(|k| v[i][k] * w[k] * v[j][k]).sum();
                assert!((back - a[i][j]).abs() < 1e-10);
            }
        }
    }
}
