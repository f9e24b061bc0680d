//! Intra-condition diversity: are samples of one condition as varied as real images of it?
//!
//! For a group of feature vectors the diversity is the mean pairwise Euclidean distance
//! `2 / (n (n - 1)) sum_{i<j} |f_i - f_j|` (an unbiased U-statistic, so groups of different
//! sizes compare fairly). This is the feature-space analogue of the intra-class diversity
//! checks in e.g. Odena et al., "Conditional Image Synthesis with Auxiliary Classifier GANs"
//! (ICML 2017, per-class MS-SSIM of samples against training images), and it catches the
//! collapse a perfect class histogram hides: a conditional G that draws one image per class.
//!
//! Groups: "all samples" (`condition = None`) always; then one group per label id `l`
//! holding every sample whose condition set contains `l` (for one-hot data: the class;
//! for multi-label data: every scene containing that object). Generated samples are grouped
//! by the condition they were *given*, real samples by their labels. The ratio is
//! generated / real; a group is flagged when the ratio is below the threshold (0.5 by
//! default). A group with fewer than 2 samples on either side has no value and no flag.

use serde::{Deserialize, Serialize};

use super::dist::{self, Mat};
use crate::error::{Error, Result};

/// Mean pairwise distance of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDiversity {
    /// Label id of the group; None = all samples.
    pub condition: Option<u16>,
    pub n: usize,
    /// None when n < 2.
    pub mean_distance: Option<f64>,
}

/// One condition's generated vs real diversity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionDiversity {
    pub condition: Option<u16>,
    pub n_generated: usize,
    pub n_real: usize,
    pub generated: Option<f64>,
    pub real: Option<f64>,
    /// generated / real.
    pub ratio: Option<f64>,
    pub flagged: bool,
}

/// Diversity of every group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diversity {
    pub threshold: f64,
    pub per_condition: Vec<ConditionDiversity>,
    /// Flagged groups.
    pub n_flagged: usize,
    /// Smallest ratio over all groups.
    pub min_ratio: Option<f64>,
}

/// Mean pairwise Euclidean distance of `features` (None for fewer than 2).
pub fn mean_pairwise_distance(features: &[Vec<f32>]) -> Result<Option<f64>> {
    if features.len() < 2 {
        if features.len() == 1 {
            dist::check_rows(features, "diversity features")?;
        }
        return Ok(None);
    }
    // Centred on the group's own mean: the f32 norm trick stays accurate even for a group
    // packed tightly far from the origin (a collapsed generator).
    let m = Mat::self_centered(features, "diversity features")?;
    let mut sum = 0.0f64;
    dist::for_each_row(&m, &m, |i, row| {
        sum += row[i + 1..].iter().map(|&d| (d as f64).sqrt()).sum::<f64>();
    });
    let n = m.n as f64;
    Ok(Some(sum / (n * (n - 1.0) / 2.0)))
}

/// Groups of sample indices: all, then one per label id in `0..num_classes`.
fn groups(conditions: &[Vec<u16>], n: usize, num_classes: usize) -> Result<Vec<Vec<usize>>> {
    let mut g = vec![(0..n).collect::<Vec<_>>()];
    if num_classes > 0 && !conditions.is_empty() {
        if conditions.len() != n {
            return Err(Error::Msg(format!(
                "diversity: {} condition sets for {n} samples",
                conditions.len()
            )));
        }
        g.resize(num_classes + 1, vec![]);
        for (i, set) in conditions.iter().enumerate() {
            for &l in set {
                let l = l as usize;
                if l >= num_classes {
                    return Err(Error::Msg(format!(
                        "diversity: label id {l} out of range (K = {num_classes})"
                    )));
                }
                if g[l + 1].last() != Some(&i) {
                    g[l + 1].push(i);
                }
            }
        }
    }
    Ok(g)
}

/// Diversity of `features` overall and per label (`conditions` empty: overall only).
pub fn group_diversity(
    features: &[Vec<f32>],
    conditions: &[Vec<u16>],
    num_classes: usize,
) -> Result<Vec<GroupDiversity>> {
    let gs = groups(conditions, features.len(), num_classes)?;
    gs.iter()
        .enumerate()
        .map(|(gi, idx)| {
            let rows: Vec<Vec<f32>> = idx.iter().map(|&i| features[i].clone()).collect();
            Ok(GroupDiversity {
                condition: (gi > 0).then(|| (gi - 1) as u16),
                n: idx.len(),
                mean_distance: mean_pairwise_distance(&rows)?,
            })
        })
        .collect()
}

/// Generated against real group diversities (matched by condition; generated groups with no
/// real counterpart get no ratio).
pub fn compare(generated: &[GroupDiversity], real: &[GroupDiversity], threshold: f64) -> Diversity {
    let per_condition: Vec<ConditionDiversity> = generated
        .iter()
        .map(|g| {
            let r = real.iter().find(|r| r.condition == g.condition);
            let rv = r.and_then(|r| r.mean_distance);
            let ratio = match (g.mean_distance, rv) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            ConditionDiversity {
                condition: g.condition,
                n_generated: g.n,
                n_real: r.map_or(0, |r| r.n),
                generated: g.mean_distance,
                real: rv,
                ratio,
                flagged: ratio.is_some_and(|x| x < threshold),
            }
        })
        .collect();
    Diversity {
        threshold,
        n_flagged: per_condition.iter().filter(|c| c.flagged).count(),
        min_ratio: per_condition
            .iter()
            .filter_map(|c| c.ratio)
            .min_by(f64::total_cmp),
        per_condition,
    }
}

/// Both sides at once: see the module doc.
pub fn intra_condition_diversity(
    generated: &[Vec<f32>],
    gen_conditions: &[Vec<u16>],
    real: &[Vec<f32>],
    real_labels: &[Vec<u16>],
    num_classes: usize,
    threshold: f64,
) -> Result<Diversity> {
    // Real groups per label only when the generated side is conditional too.
    let real_labels = if gen_conditions.is_empty() {
        &[][..]
    } else {
        real_labels
    };
    Ok(compare(
        &group_diversity(generated, gen_conditions, num_classes)?,
        &group_diversity(real, real_labels, num_classes)?,
        threshold,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn mean_distance_by_hand() {
        // Points 0, 1, 3 on a line: pairs 1, 3, 2 -> mean 2.
        let p: Vec<Vec<f32>> = [0.0, 1.0, 3.0].iter().map(|&v| vec![v]).collect();
        assert!((mean_pairwise_distance(&p).unwrap().unwrap() - 2.0).abs() < 1e-6);
        assert_eq!(mean_pairwise_distance(&p[..1]).unwrap(), None);
    }

    #[test]
    fn collapsed_class_is_flagged() {
        // 3 classes, real: 100 samples per class from N(mu_c, I) in 8-D; mean pairwise
        // distance within a class ~ sqrt(2 * 8) = 4 (a bit less: E|X| for chi_8 is 2.74 *
        // sqrt 2 = 3.88). Generated: classes 0 and 2 drawn like the real ones (ratio ~ 1),
        // class 1 all within 0.01 of one point (distance ~ 0.01 * 3.88 -> ratio ~ 0.01):
        // exactly class 1 is flagged at threshold 0.5. The "all" group mixes classes, so
        // its ratio stays near 1 (the collapse is invisible there), not flagged.
        let mut rng = Rng::new(9);
        let mu =
            |c: usize| -> Vec<f32> { (0..8).map(|i| if i == c { 6.0 } else { 0.0 }).collect() };
        let mut sample = |c: usize, s: f32| -> Vec<f32> {
            mu(c)
                .iter()
                .zip(rng.normal_vec(8))
                .map(|(m, z)| m + s * z as f32)
                .collect()
        };
        let (mut real, mut rl, mut gen_, mut gc) = (vec![], vec![], vec![], vec![]);
        for i in 0..300 {
            let c = i % 3;
            real.push(sample(c, 1.0));
            rl.push(vec![c as u16]);
            gen_.push(sample(c, if c == 1 { 0.01 } else { 1.0 }));
            gc.push(vec![c as u16]);
        }
        let d = intra_condition_diversity(&gen_, &gc, &real, &rl, 3, 0.5).unwrap();
        assert_eq!(d.per_condition.len(), 4);
        let flagged: Vec<Option<u16>> = d
            .per_condition
            .iter()
            .filter(|c| c.flagged)
            .map(|c| c.condition)
            .collect();
        assert_eq!(flagged, vec![Some(1)]);
        let c1 = &d.per_condition[2];
        assert!(c1.ratio.unwrap() < 0.02, "{c1:?}");
        for c in [0, 2] {
            let r = d.per_condition[c + 1].ratio.unwrap();
            assert!((r - 1.0).abs() < 0.1, "class {c}: {r}");
        }
        assert!((d.per_condition[1].real.unwrap() - 3.88).abs() < 0.2);
        // Unconditional: one "all" group; a generator collapsed to one point is flagged.
        let collapsed: Vec<Vec<f32>> = (0..50).map(|i| vec![1.0 + 1e-4 * i as f32; 8]).collect();
        let d = intra_condition_diversity(&collapsed, &[], &real, &rl, 3, 0.5).unwrap();
        assert_eq!(d.per_condition.len(), 1);
        assert!(d.per_condition[0].flagged);
    }
}
