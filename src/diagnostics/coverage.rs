//! Class coverage from the evaluator's predictions on generated images.
//!
//! - [`class_coverage`] (unconditional or any one-hot run): the histogram of argmax classes,
//!   modes covered out of K, and KL(data || generated), the classifier-based mode count and
//!   KL of the stacked-MNIST experiments (Metz et al., "Unrolled Generative Adversarial
//!   Networks", ICLR 2017; Srivastava et al., "VEEGAN", NIPS 2017), with the evaluator in
//!   place of their pretrained classifier and the data's class distribution as reference.
//! - [`confusion`] (conditional one-hot runs): predicted class of G(z, c) against c, per-class
//!   accuracy (the "classification accuracy score" idea: does the image show what was asked).
//! - [`label_hits`] (multi-label runs): per-label hit rate under the course's top-k rule
//!   ([`crate::eval::metrics::topk_accuracy`]), laid out as a colour x shape grid for i-CLEVR
//!   (label id `i` -> colour `i % 8`, shape `i / 8`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::metrics::topk_accuracy;

/// Argmax-class histogram of generated samples against the data's class distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassCoverage {
    pub num_classes: usize,
    /// Generated samples per predicted class (argmax, lowest index on ties).
    pub counts: Vec<usize>,
    pub generated_distribution: Vec<f64>,
    pub data_distribution: Vec<f64>,
    /// The covered rule's fraction of the expected share.
    pub min_share: f64,
    /// Per class: whether it counts as covered (see [`class_coverage`]).
    pub covered: Vec<bool>,
    /// Modes covered x ...
    pub modes_covered: usize,
    /// ... out of the K classes present in the data (`data_distribution > 0`).
    pub modes_present: usize,
    /// `modes_covered / modes_present`.
    pub coverage: f64,
    /// KL(data || smoothed generated) in nats.
    pub kl_data_generated: f64,
    /// Pseudo-count added to every generated class count before the KL.
    pub pseudo_count: f64,
}

/// Index of the largest value (lowest index on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || (v[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

/// Data class distribution from label ids (one id per real sample for one-hot data; each id of
/// a multi-label set counts once). Uniform when no labels are given.
pub fn label_distribution(labels: &[Vec<u16>], num_classes: usize) -> Result<Vec<f64>> {
    let mut c = vec![0usize; num_classes];
    for set in labels {
        for &l in set {
            let l = l as usize;
            if l >= num_classes {
                return Err(Error::Msg(format!(
                    "label id {l} out of range (K = {num_classes})"
                )));
            }
            c[l] += 1;
        }
    }
    let total: usize = c.iter().sum();
    Ok(if total == 0 {
        vec![1.0 / num_classes as f64; num_classes]
    } else {
        c.iter().map(|&v| v as f64 / total as f64).collect()
    })
}

/// Class coverage of generated samples from their evaluator outputs `probs` (one row of K
/// scores each) against the data class distribution `data` (sums to 1).
///
/// Rule: class c, present in the data (`data[c] > 0`), is *covered* when the generator puts at
/// least `min_share` of its expected count there: `count_c >= max(1, min_share * N * data[c])`
/// (so with 10 balanced classes, N = 1000 and `min_share = 0.25`, a class needs 25 samples).
/// Classes absent from the data are not counted. KL is
/// `sum_c data[c] ln(data[c] / q[c])` with `q[c] = (count_c + a) / (N + K a)`, `a` =
/// `pseudo_count` (additive smoothing keeps it finite when a mode is missing; with a = 0.5 and
/// only one of 10 balanced classes generated it is about `0.9 ln(0.1 (N + 5) / 0.5)`).
pub fn class_coverage(
    probs: &[Vec<f32>],
    data: &[f64],
    min_share: f64,
    pseudo_count: f64,
) -> Result<ClassCoverage> {
    let k = data.len();
    if k == 0 || probs.is_empty() {
        return Err(Error::Msg(
            "class coverage: no classes or no predictions".into(),
        ));
    }
    let mut counts = vec![0usize; k];
    for (i, p) in probs.iter().enumerate() {
        if p.len() != k {
            return Err(Error::Msg(format!(
                "class coverage: prediction {i} has {} scores, K = {k}",
                p.len()
            )));
        }
        counts[argmax(p)] += 1;
    }
    let n = probs.len() as f64;
    let covered: Vec<bool> = counts
        .iter()
        .zip(data)
        .map(|(&c, &d)| d > 0.0 && c as f64 >= (min_share * n * d).max(1.0))
        .collect();
    let modes_present = data.iter().filter(|&&d| d > 0.0).count();
    let modes_covered = covered.iter().filter(|&&c| c).count();
    let denom = n + k as f64 * pseudo_count;
    let kl = counts
        .iter()
        .zip(data)
        .filter(|&(_, &d)| d > 0.0)
        .map(|(&c, &d)| d * (d / ((c as f64 + pseudo_count) / denom)).ln())
        .sum::<f64>()
        .max(0.0);
    Ok(ClassCoverage {
        num_classes: k,
        generated_distribution: counts.iter().map(|&c| c as f64 / n).collect(),
        counts,
        data_distribution: data.to_vec(),
        min_share,
        covered,
        modes_covered,
        modes_present,
        coverage: if modes_present == 0 {
            0.0
        } else {
            modes_covered as f64 / modes_present as f64
        },
        kl_data_generated: kl,
        pseudo_count,
    })
}

/// Predicted class against conditioned class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub num_classes: usize,
    /// `matrix[c][p]`: samples conditioned on c that the evaluator calls p.
    pub matrix: Vec<Vec<usize>>,
    /// Per conditioned class: `matrix[c][c] / row sum` (None when never conditioned).
    pub per_class_accuracy: Vec<Option<f64>>,
    /// Trace / total.
    pub accuracy: f64,
}

/// Confusion matrix of `argmax(probs)` against the single conditioned class of each sample.
pub fn confusion(probs: &[Vec<f32>], conditions: &[Vec<u16>], k: usize) -> Result<Confusion> {
    if probs.len() != conditions.len() || probs.is_empty() {
        return Err(Error::Msg(format!(
            "confusion: {} predictions for {} conditions",
            probs.len(),
            conditions.len()
        )));
    }
    let mut matrix = vec![vec![0usize; k]; k];
    for (i, (p, c)) in probs.iter().zip(conditions).enumerate() {
        let &[c] = c.as_slice() else {
            return Err(Error::Msg(format!(
                "confusion: sample {i} has {} condition labels, one-hot needs 1",
                c.len()
            )));
        };
        if c as usize >= k || p.len() != k {
            return Err(Error::Msg(format!(
                "confusion: sample {i}: class {c} / {} scores, K = {k}",
                p.len()
            )));
        }
        matrix[c as usize][argmax(p)] += 1;
    }
    let per_class_accuracy = (0..k)
        .map(|c| {
            let n: usize = matrix[c].iter().sum();
            (n > 0).then(|| matrix[c][c] as f64 / n as f64)
        })
        .collect();
    let trace: usize = (0..k).map(|c| matrix[c][c]).sum();
    Ok(Confusion {
        num_classes: k,
        matrix,
        per_class_accuracy,
        accuracy: trace as f64 / probs.len() as f64,
    })
}

/// Per-label hit rates of a multi-label conditional run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelHits {
    /// Per label: times it was conditioned on.
    pub conditioned: Vec<usize>,
    /// Per label: times it was among the evaluator's top k (k = labels in that condition).
    pub hits: Vec<usize>,
    /// `hits / conditioned` (None when never conditioned).
    pub rate: Vec<Option<f64>>,
    /// All hits / all conditioned labels (the course's accuracy).
    pub accuracy: f64,
    /// `grid[shape][colour]` = rate of label `shape * 8 + colour` (i-CLEVR's 8 colours x 3
    /// shapes); present when K is a multiple of 8.
    pub heat_map: Option<Vec<Vec<Option<f64>>>>,
}

impl LabelHits {
    /// Rates laid out row-major with `columns` labels per row (label `i` at row `i / columns`,
    /// column `i % columns`; cells past K are None).
    pub fn grid(&self, columns: usize) -> Vec<Vec<Option<f64>>> {
        let k = self.rate.len();
        let rows = k.div_ceil(columns.max(1));
        (0..rows)
            .map(|r| {
                (0..columns)
                    .map(|c| self.rate.get(r * columns + c).copied().flatten())
                    .collect()
            })
            .collect()
    }
}

/// Per-label hit rates with the course's top-k rule (see the module doc).
pub fn label_hits(probs: &[Vec<f32>], conditions: &[Vec<u16>]) -> Result<LabelHits> {
    let t = topk_accuracy(probs, conditions)?;
    let mut out = LabelHits {
        conditioned: t.per_label.iter().map(|p| p.0).collect(),
        hits: t.per_label.iter().map(|p| p.1).collect(),
        rate: (0..t.per_label.len()).map(|i| t.label_rate(i)).collect(),
        accuracy: t.accuracy(),
        heat_map: None,
    };
    let k = out.rate.len();
    if k > 0 && k.is_multiple_of(8) {
        out.heat_map = Some(out.grid(8));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onehot_probs(classes: &[usize], k: usize) -> Vec<Vec<f32>> {
        classes
            .iter()
            .map(|&c| {
                let mut p = vec![0.01; k];
                p[c] = 0.9;
                p
            })
            .collect()
    }

    #[test]
    fn one_class_generator_covers_one_mode() {
        // K = 10 balanced classes, N = 1000 generated samples all predicted class 3:
        // modes covered 1 / 10. KL with a = 0.5: q_3 = 1000.5 / 1005, q_other = 0.5 / 1005;
        // KL = 0.1 ln(0.1 / q_3) + 9 * 0.1 ln(0.1 / q_other) = 0.1 ln(0.10045) + 0.9 ln(201).
        let k = 10;
        let data = vec![0.1; k];
        let probs = onehot_probs(&vec![3; 1000], k);
        let c = class_coverage(&probs, &data, 0.25, 0.5).unwrap();
        assert_eq!((c.modes_covered, c.modes_present), (1, 10));
        assert!((c.coverage - 0.1).abs() < 1e-12);
        let want = 0.1 * (0.1f64 / (1000.5 / 1005.0)).ln() + 0.9 * (201.0f64).ln();
        assert!((c.kl_data_generated - want).abs() < 1e-9);
        assert_eq!(c.counts[3], 1000);
        // A balanced generator covers all 10 and has KL 0 (q = p exactly).
        let classes: Vec<usize> = (0..1000).map(|i| i % 10).collect();
        let c = class_coverage(&onehot_probs(&classes, k), &data, 0.25, 0.5).unwrap();
        assert_eq!(c.modes_covered, 10);
        assert!(c.kl_data_generated < 1e-12);
    }

    #[test]
    fn share_rule_and_absent_classes() {
        // Data: classes 0..3 with 0.5, 0.25, 0.25, class 3 absent. N = 100 generated:
        // 80 of class 0, 15 of class 1, 5 of class 2. Expected 50, 25, 25; at min_share 0.25
        // thresholds 12.5, 6.25, 6.25: covered 0, 1, not 2; class 3 is not a mode: 2 / 3.
        let data = vec![0.5, 0.25, 0.25, 0.0];
        let mut classes = vec![0; 80];
        classes.extend([1; 15]);
        classes.extend([2; 5]);
        let c = class_coverage(&onehot_probs(&classes, 4), &data, 0.25, 0.5).unwrap();
        assert_eq!(c.covered, vec![true, true, false, false]);
        assert_eq!((c.modes_covered, c.modes_present), (2, 3));
        let d = label_distribution(&[vec![0], vec![0], vec![1], vec![2]], 4).unwrap();
        assert_eq!(d, data);
        assert!(label_distribution(&[vec![7]], 4).is_err());
    }

    #[test]
    fn confusion_by_hand() {
        // Conditioned 0, 0, 1, 1, 2 -> predicted 0, 1, 1, 1, 0:
        // row 0: [1, 1, 0] (acc 0.5), row 1: [0, 2, 0] (1.0), row 2: [1, 0, 0] (0.0).
        let probs = onehot_probs(&[0, 1, 1, 1, 0], 3);
        let conds = vec![vec![0], vec![0], vec![1], vec![1], vec![2]];
        let c = confusion(&probs, &conds, 3).unwrap();
        assert_eq!(c.matrix, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        assert_eq!(c.per_class_accuracy, vec![Some(0.5), Some(1.0), Some(0.0)]);
        assert!((c.accuracy - 0.6).abs() < 1e-12);
        assert!(confusion(&probs, &conds[..4], 3).is_err());
        assert!(confusion(&probs[..1], &[vec![0, 1]], 3).is_err());
    }

    #[test]
    fn label_hits_heat_map() {
        // K = 24 (i-CLEVR). Two samples: {1 (red cube), 9 (red sphere)} with top-2 = {1, 9}:
        // both hit; {17 (red cylinder)} with top-1 = 0: miss. Red row-wise: cube 1.0,
        // sphere 1.0, cylinder 0.0; every other cell never conditioned (None).
        let mut a = vec![0.0f32; 24];
        a[1] = 0.9;
        a[9] = 0.8;
        let mut b = vec![0.0f32; 24];
        b[0] = 0.9;
        b[17] = 0.1;
        let h = label_hits(&[a, b], &[vec![1, 9], vec![17]]).unwrap();
        assert!((h.accuracy - 2.0 / 3.0).abs() < 1e-12);
        let g = h.heat_map.unwrap();
        assert_eq!((g.len(), g[0].len()), (3, 8));
        assert_eq!(
            (g[0][1], g[1][1], g[2][1]),
            (Some(1.0), Some(1.0), Some(0.0))
        );
        assert_eq!(g[0][0], None);
    }

    #[test]
    fn argmax_ties_and_nan() {
        assert_eq!(argmax(&[0.2, 0.5, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.1, 0.3]), 2);
    }
}
