//! Closest pairs: the birthday-paradox test of Arora & Zhang ("Do GANs actually learn the
//! distribution? An empirical study", 2017; Arora, Risteski & Zhang, ICLR 2018).
//!
//! If a batch of s samples reliably contains a near-duplicate pair, the generator's support
//! holds only about s^2 distinguishable images. Arora & Zhang find the candidate pairs by a
//! distance in some embedding and then inspect them by eye; this module returns the `n`
//! pairs `(i, j)`, `i < j`, with the smallest Euclidean feature distance, nearest first (ties
//! by `(i, j)`), for a gallery. The same on real features at the same sample size is the
//! reference: generated pairs far closer than real ones mean duplicates.
//!
//! The search runs on the blocked f32 distances; the best `4 n + 16` candidates are then
//! re-measured exactly (f64) and re-ranked, so a planted exact duplicate always comes out at
//! distance 0.

use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

use super::dist::{self, Mat};
use crate::error::Result;

/// One pair of sample indices (i < j) and their feature distance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosestPair {
    pub i: usize,
    pub j: usize,
    pub distance: f64,
}

/// The `n` closest pairs among `features` (see the module doc); fewer when there are fewer
/// pairs.
pub fn closest_pairs(features: &[Vec<f32>], n: usize) -> Result<Vec<ClosestPair>> {
    if features.len() < 2 || n == 0 {
        return Ok(vec![]);
    }
    let m = Mat::self_centered(features, "closest-pair features")?;
    let cap = 4 * n + 16;
    // Max-heap on (squared distance bits, i, j): non-negative f32 order like their bits.
    let mut heap: BinaryHeap<(u32, usize, usize)> = BinaryHeap::with_capacity(cap + 1);
    dist::for_each_row(&m, &m, |i, row| {
        for (j, &d) in row.iter().enumerate().skip(i + 1) {
            let key = (d.to_bits(), i, j);
            if heap.len() < cap {
                heap.push(key);
            } else if heap.peek().is_some_and(|top| key < *top) {
                heap.pop();
                heap.push(key);
            }
        }
    });
    let mut pairs: Vec<ClosestPair> = heap
        .into_iter()
        .map(|(_, i, j)| ClosestPair {
            i,
            j,
            distance: dist::exact_distance(&features[i], &features[j]),
        })
        .collect();
    pairs.sort_by(|a, b| {
        a.distance
            .total_cmp(&b.distance)
            .then(a.i.cmp(&b.i))
            .then(a.j.cmp(&b.j))
    });
    pairs.truncate(n);
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn finds_planted_duplicates() {
        // 500 N(0, I) points in 32-D, offset by 50 (to stress the f32 norm trick): typical
        // nearest-neighbour distances are ~ 4-6. Plant an exact copy of point 17 at 400 and a
        // near copy of point 3 (shifted by 0.01 in one coordinate) at 250. The two closest
        // pairs must be (17, 400) at exactly 0 and (3, 250) at 0.01, then real pairs at > 1.
        let mut rng = Rng::new(2);
        let mut x: Vec<Vec<f32>> = (0..500)
            .map(|_| {
                rng.normal_vec(32)
                    .into_iter()
                    .map(|v| v as f32 + 50.0)
                    .collect()
            })
            .collect();
        x[400] = x[17].clone();
        x[250] = x[3].clone();
        x[250][5] += 0.01;
        let p = closest_pairs(&x, 5).unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!((p[0].i, p[0].j, p[0].distance), (17, 400, 0.0));
        assert_eq!((p[1].i, p[1].j), (3, 250));
        assert!((p[1].distance - 0.01).abs() < 1e-4, "{p:?}");
        assert!(p[2].distance > 1.0);
        assert!(p.windows(2).all(|w| w[0].distance <= w[1].distance));
        // Brute force agrees on the third pair.
        let mut best = (f64::INFINITY, 0, 0);
        for i in 0..500 {
            for j in i + 1..500 {
                let d = dist::exact_distance(&x[i], &x[j]);
                if (i, j) != (17, 400) && (i, j) != (3, 250) && d < best.0 {
                    best = (d, i, j);
                }
            }
        }
        assert_eq!((p[2].i, p[2].j), (best.1, best.2));
        assert!(closest_pairs(&x[..1], 3).unwrap().is_empty());
        assert_eq!(closest_pairs(&x[..3], 10).unwrap().len(), 3);
    }
}
