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
//! holding every sample whose condition set contains `l`. Within a label group, only pairs
//! of samples with the *same whole condition* count: for one-hot data that is the class
//! (every pair); for multi-label data, two scenes with exactly the same objects. (Counting
//! every pair of scenes that merely share object `l` measured the variety of the *other*
//! objects, so a generator drawing one image per condition was never flagged.) Generated
//! samples are grouped by the condition they were *given* (the monitor draws several
//! latents per condition), real samples by their labels. The ratio is generated / real; a
//! group is flagged when the ratio is below the threshold (0.5 by default). A group with no
//! such pair on either side has no value and no flag.
//!
//! Scenes with more objects differ more between two draws of the same condition, and the
//! two sides need not hold the same mix (the real pairs with equal conditions are mostly
//! one-object scenes; the monitor draws conditions of every size). So a label group keeps
//! its distances per condition size, and the ratio compares like with like: both sides are
//! averaged over the sizes they share, weighted by the generated side's pair counts.

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
    /// Label groups: the same-condition distances per condition size (number of labels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_size: Vec<SizeDiversity>,
}

/// Same-condition pairs of one condition size within a label group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeDiversity {
    /// Labels per condition.
    pub size: usize,
    pub pairs: usize,
    pub mean_distance: f64,
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
    let (sum, pairs) = pairwise_distance_sum(features)?;
    Ok((pairs > 0).then(|| sum / pairs as f64))
}

/// Sum of the pairwise Euclidean distances of `features` and the number of pairs.
fn pairwise_distance_sum(features: &[Vec<f32>]) -> Result<(f64, usize)> {
    if features.len() < 2 {
        if features.len() == 1 {
            dist::check_rows(features, "diversity features")?;
        }
        return Ok((0.0, 0));
    }
    // Centred on the group's own mean: the f32 norm trick stays accurate even for a group
    // packed tightly far from the origin (a collapsed generator).
    let m = Mat::self_centered(features, "diversity features")?;
    let mut sum = 0.0f64;
    dist::for_each_row(&m, &m, |i, row| {
        sum += row[i + 1..].iter().map(|&d| (d as f64).sqrt()).sum::<f64>();
    });
    Ok((sum, m.n * (m.n - 1) / 2))
}

/// Mean distance over the pairs of `idx` whose whole condition sets are equal (every pair
/// when `conditions` is empty), overall and per condition size. None without such a pair.
fn same_condition_distance(
    features: &[Vec<f32>],
    conditions: &[Vec<u16>],
    idx: &[usize],
) -> Result<(Option<f64>, Vec<SizeDiversity>)> {
    let mut by_set: std::collections::BTreeMap<&[u16], Vec<Vec<f32>>> = Default::default();
    for &i in idx {
        let key: &[u16] = conditions.get(i).map_or(&[], |c| c.as_slice());
        by_set.entry(key).or_default().push(features[i].clone());
    }
    // size -> (sum, pairs)
    let mut sizes: std::collections::BTreeMap<usize, (f64, usize)> = Default::default();
    let (mut sum, mut pairs) = (0.0, 0);
    for (set, rows) in &by_set {
        let (s, p) = pairwise_distance_sum(rows)?;
        sum += s;
        pairs += p;
        if p > 0 {
            let e = sizes.entry(set.len()).or_default();
            e.0 += s;
            e.1 += p;
        }
    }
    let by_size = sizes
        .into_iter()
        .map(|(size, (s, p))| SizeDiversity {
            size,
            pairs: p,
            mean_distance: s / p as f64,
        })
        .collect();
    Ok(((pairs > 0).then(|| sum / pairs as f64), by_size))
}

/// Both sides' distances averaged over the condition sizes they share, weighted by the
/// generated pair counts; None when they share none.
fn size_matched(generated: &[SizeDiversity], real: &[SizeDiversity]) -> Option<(f64, f64)> {
    let (mut g, mut r, mut w) = (0.0, 0.0, 0.0);
    for a in generated {
        if let Some(b) = real.iter().find(|b| b.size == a.size) {
            let wt = a.pairs as f64;
            g += wt * a.mean_distance;
            r += wt * b.mean_distance;
            w += wt;
        }
    }
    (w > 0.0).then(|| (g / w, r / w))
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
            let (mean_distance, by_size) = if gi == 0 {
                let rows: Vec<Vec<f32>> = idx.iter().map(|&i| features[i].clone()).collect();
                (mean_pairwise_distance(&rows)?, vec![])
            } else {
                same_condition_distance(features, conditions, idx)?
            };
            Ok(GroupDiversity {
                condition: (gi > 0).then(|| (gi - 1) as u16),
                n: idx.len(),
                mean_distance,
                by_size,
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
            let (gv, rv) = match r.and_then(|r| size_matched(&g.by_size, &r.by_size)) {
                Some((a, b)) => (Some(a), Some(b)),
                None => (g.mean_distance, r.and_then(|r| r.mean_distance)),
            };
            let ratio = match (gv, rv) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            ConditionDiversity {
                condition: g.condition,
                n_generated: g.n,
                n_real: r.map_or(0, |r| r.n),
                generated: gv,
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

    #[test]
    fn multi_label_generator_that_ignores_z_is_flagged_everywhere() {
        // 6 labels; real scenes hold 1 or 2 labels, features = sum of per-label means + noise
        // (same objects, other places: unit noise). A generator that ignores z gives every
        // sample of one condition the same features (its 4 latents per condition agree);
        // different conditions still differ, so the old per-label grouping (all scenes that
        // contain l) saw plenty of spread and flagged nothing. Now every label is flagged;
        // a generator that varies with z like the data is flagged nowhere.
        let k = 6;
        let mut rng = Rng::new(4);
        let mean = |set: &[u16]| -> Vec<f32> {
            let mut v = vec![0f32; 8];
            for &l in set {
                v[l as usize] += 5.0;
            }
            v
        };
        let noisy = |set: &[u16], s: f32, rng: &mut Rng| -> Vec<f32> {
            mean(set)
                .iter()
                .zip(rng.normal_vec(8))
                .map(|(m, z)| m + s * z as f32)
                .collect()
        };
        let sets: Vec<Vec<u16>> = (0..k as u16)
            .flat_map(|a| (a..k as u16).map(move |b| if a == b { vec![a] } else { vec![a, b] }))
            .collect();
        let (mut real, mut rl) = (vec![], vec![]);
        for i in 0..600 {
            let s = &sets[i % sets.len()];
            real.push(noisy(s, 1.0, &mut rng));
            rl.push(s.clone());
        }
        let (mut frozen, mut varied, mut gc) = (vec![], vec![], vec![]);
        for i in 0..40 {
            let s = &sets[(i * 5) % sets.len()];
            for _ in 0..4 {
                frozen.push(mean(s));
                varied.push(noisy(s, 1.0, &mut rng));
                gc.push(s.clone());
            }
        }
        let d = intra_condition_diversity(&frozen, &gc, &real, &rl, k, 0.5).unwrap();
        let labels: Vec<_> = d.per_condition.iter().skip(1).collect();
        assert_eq!(labels.len(), k);
        for c in &labels {
            assert!(c.flagged, "{c:?}");
            assert!(c.ratio.unwrap() < 0.01, "{c:?}");
        }
        let d = intra_condition_diversity(&varied, &gc, &real, &rl, k, 0.5).unwrap();
        assert_eq!(d.n_flagged, 0, "{d:?}");
        for c in d.per_condition.iter().skip(1) {
            assert!((c.ratio.unwrap() - 1.0).abs() < 0.3, "{c:?}");
        }
    }

    #[test]
    fn sizes_are_compared_like_with_like() {
        // Label 0. Real: condition {0} three times, pairwise 1 apart (a unit triangle);
        // condition {0, 1} twice, 4 apart. Unmatched mean over equal-condition pairs:
        // (3 * 1 + 4) / 4 = 1.75. Generated: {0} twice 1 apart, {0, 1} twice 4 apart: as
        // varied as real size for size, but its unmatched mean is 2.5 (ratio 1.43). Matched
        // with the generated pair counts (1 and 1): 2.5 against 2.5, ratio 1.
        let tri = vec![
            vec![0.0f32, 0.0],
            vec![1.0, 0.0],
            vec![0.5, 3f32.sqrt() / 2.0],
        ];
        let mut real = tri.clone();
        let mut rl = vec![vec![0u16]; 3];
        real.extend([vec![10.0, 0.0], vec![14.0, 0.0]]);
        rl.extend([vec![0u16, 1], vec![0u16, 1]]);
        let gen_ = vec![
            vec![0.0f32, 0.0],
            vec![1.0, 0.0],
            vec![10.0, 0.0],
            vec![14.0, 0.0],
        ];
        let gc = vec![vec![0u16], vec![0], vec![0, 1], vec![0, 1]];
        let d = intra_condition_diversity(&gen_, &gc, &real, &rl, 3, 0.5).unwrap();
        let c0 = &d.per_condition[1];
        assert!((c0.ratio.unwrap() - 1.0).abs() < 1e-6, "{c0:?}");
        assert!((c0.generated.unwrap() - 2.5).abs() < 1e-6, "{c0:?}");
        assert!((c0.real.unwrap() - 2.5).abs() < 1e-6, "{c0:?}");
        // Label 2 has no pairs on either side: no value, no flag.
        assert_eq!(d.per_condition[3].ratio, None);
    }
}
