//! Seeded k-means: greedy k-means++ seeding (Arthur & Vassilvitskii, "k-means++: The
//! Advantages of Careful Seeding", SODA 2007; the greedy variant draws `2 + ln k` candidates
//! per centre and keeps the one that lowers the potential most, as scikit-learn does) followed
//! by Lloyd iterations until no assignment changes or `max_iter` is reached.
//!
//! An empty cluster (possible when points repeat) is re-seeded at the point farthest from its
//! own centroid, so k-means always returns `k` centroids. Everything random comes from the
//! seeded [`Rng`], so the same input and seed give the same bins.

use super::dist::{self, Mat};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A fitted k-means model, centroids in the input feature space.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    pub centroids: Vec<Vec<f32>>,
    /// Cluster of each input row.
    pub assignments: Vec<usize>,
    /// Sum of squared distances of the rows to their centroids.
    pub inertia: f64,
    /// Lloyd iterations run (each: update centroids, reassign).
    pub iterations: usize,
    /// Whether the last iteration changed no assignment.
    pub converged: bool,
}

/// k-means of `features` into `k` clusters, seeded (see the module doc).
pub fn kmeans(features: &[Vec<f32>], k: usize, max_iter: usize, seed: u64) -> Result<KMeans> {
    dist::check_rows(features, "k-means input")?;
    let center = dist::mean(features);
    let x = Mat::centered(features, &center, "k-means input")?;
    let fit = kmeans_mat(
        &x,
        k,
        max_iter,
        &mut Rng::stream(seed, "diagnostics.kmeans"),
    )?;
    let centroids = (0..k)
        .map(|c| {
            fit.centroids
                .row(c)
                .iter()
                .zip(&center)
                .map(|(v, m)| v + m)
                .collect()
        })
        .collect();
    Ok(KMeans {
        centroids,
        assignments: fit.assignments,
        inertia: fit.inertia,
        iterations: fit.iterations,
        converged: fit.converged,
    })
}

/// k-means on an already centred matrix; centroids in the same (centred) space.
pub(crate) struct MatFit {
    pub centroids: Mat,
    pub assignments: Vec<usize>,
    pub inertia: f64,
    pub iterations: usize,
    pub converged: bool,
}

pub(crate) fn kmeans_mat(x: &Mat, k: usize, max_iter: usize, rng: &mut Rng) -> Result<MatFit> {
    if k == 0 || k > x.n {
        return Err(Error::Msg(format!(
            "k-means: cannot make {k} clusters from {} points",
            x.n
        )));
    }
    let mut centroids = seed_plus_plus(x, k, rng);
    let mut near = dist::nearest(x, &centroids);
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        iterations += 1;
        centroids = update(x, k, &near);
        let next = dist::nearest(x, &centroids);
        let same = next.iter().zip(&near).all(|(a, b)| a.0 == b.0);
        near = next;
        if same {
            converged = true;
            break;
        }
    }
    Ok(MatFit {
        centroids,
        assignments: near.iter().map(|p| p.0).collect(),
        inertia: near.iter().map(|p| p.1 as f64).sum(),
        iterations,
        converged,
    })
}

/// Greedy k-means++ seeding.
fn seed_plus_plus(x: &Mat, k: usize, rng: &mut Rng) -> Mat {
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = rng.below(x.n);
    let mut chosen = vec![first];
    let mut min_d2: Vec<f64> = Vec::with_capacity(x.n);
    dist::for_each_row(x, &x.select(&[first]), |_, r| min_d2.push(r[0] as f64));
    while chosen.len() < k {
        let total: f64 = min_d2.iter().sum();
        let cands: Vec<usize> = (0..trials)
            .map(|_| {
                if total <= 0.0 {
                    return rng.below(x.n);
                }
                let mut u = rng.uniform() * total;
                for (i, &v) in min_d2.iter().enumerate() {
                    if u < v {
                        return i;
                    }
                    u -= v;
                }
                // Round-off walked past the end: the last point with mass.
                min_d2.iter().rposition(|&v| v > 0.0).unwrap_or(x.n - 1)
            })
            .collect();
        // Potential (sum of min squared distances) if each candidate were added.
        let mut pot = vec![0.0f64; trials];
        let mut cand_d2 = vec![Vec::with_capacity(x.n); trials];
        dist::for_each_row(x, &x.select(&cands), |i, r| {
            for t in 0..trials {
                let v = (r[t] as f64).min(min_d2[i]);
                pot[t] += v;
                cand_d2[t].push(v);
            }
        });
        let best = (0..trials)
            .min_by(|&a, &b| pot[a].total_cmp(&pot[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        chosen.push(cands[best]);
        min_d2 = std::mem::take(&mut cand_d2[best]);
    }
    x.select(&chosen)
}

/// Centroids as the means of their points; an empty cluster gets the point farthest from its
/// current centroid (each such point used once).
fn update(x: &Mat, k: usize, near: &[(usize, f32)]) -> Mat {
    let d = x.d;
    let mut sums = vec![0.0f64; k * d];
    let mut counts = vec![0usize; k];
    for (i, &(c, _)) in near.iter().enumerate() {
        counts[c] += 1;
        for (s, &v) in sums[c * d..(c + 1) * d].iter_mut().zip(x.row(i)) {
            *s += v as f64;
        }
    }
    let mut data = vec![0f32; k * d];
    let mut far: Vec<usize> = (0..x.n).collect();
    // Farthest first; ties by index so the order is deterministic.
    far.sort_by(|&a, &b| near[b].1.total_cmp(&near[a].1).then(a.cmp(&b)));
    let mut far = far.into_iter().filter(|&i| counts[near[i].0] > 1);
    for c in 0..k {
        let out = &mut data[c * d..(c + 1) * d];
        if counts[c] > 0 {
            let n = counts[c] as f64;
            for (o, s) in out.iter_mut().zip(&sums[c * d..(c + 1) * d]) {
                *o = (s / n) as f32;
            }
        } else if let Some(i) = far.next() {
            out.copy_from_slice(x.row(i));
        }
    }
    Mat::from_data(data, d)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `per` points around each of `means`, with N(0, sigma^2) noise per coordinate.
    pub(crate) fn clusters(
        rng: &mut Rng,
        means: &[Vec<f32>],
        per: usize,
        sigma: f32,
    ) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut x = vec![];
        let mut y = vec![];
        for _ in 0..per {
            for (c, m) in means.iter().enumerate() {
                let z = rng.normal_vec(m.len());
                x.push(
                    m.iter()
                        .zip(z)
                        .map(|(&a, b)| a + sigma * b as f32)
                        .collect(),
                );
                y.push(c);
            }
        }
        (x, y)
    }

    /// `k` cluster means in `d` dimensions: `scale` times the first `k` unit vectors (pairwise
    /// distance `scale * sqrt(2)`), needs `k <= d`.
    pub(crate) fn simplex_means(k: usize, d: usize, scale: f32) -> Vec<Vec<f32>> {
        (0..k)
            .map(|c| {
                let mut m = vec![0.0; d];
                m[c] = scale;
                m
            })
            .collect()
    }

    #[test]
    fn recovers_planted_clusters() {
        // 6 clusters in 16-D, means 10 * e_c (pairwise distance 14.1), noise sigma = 0.5
        // (within-cluster distances ~ 0.5 * sqrt(2 * 16) = 2.8). The clusters are far apart,
        // so k = 6 must put each cluster in its own bin (purity 1) with each centroid
        // within ~ 0.5 * sqrt(16 / 100) = 0.2 of its true mean (the mean of 100 points),
        // assert < 0.5.
        let mut rng = Rng::new(11);
        let means = simplex_means(6, 16, 10.0);
        let (x, y) = clusters(&mut rng, &means, 100, 0.5);
        let fit = kmeans(&x, 6, 100, 3).unwrap();
        assert!(fit.converged);
        let mut bin_of = [None; 6];
        for (&c, &b) in y.iter().zip(&fit.assignments) {
            match bin_of[c] {
                None => bin_of[c] = Some(b),
                Some(prev) => assert_eq!(prev, b, "cluster {c} split"),
            }
        }
        let mut bins: Vec<usize> = bin_of.iter().map(|b| b.unwrap()).collect();
        for (c, &b) in bins.iter().enumerate() {
            let err = dist::exact_distance(&fit.centroids[b], &means[c]);
            assert!(err < 0.5, "cluster {c}: centroid off by {err}");
        }
        bins.sort();
        assert_eq!(bins, (0..6).collect::<Vec<_>>());
        // Deterministic for a seed.
        assert_eq!(kmeans(&x, 6, 100, 3).unwrap(), fit);
    }

    #[test]
    fn repeated_points_and_bad_k() {
        // 3 distinct points, each 5 times, k = 3: inertia 0, every cluster non-empty.
        let x: Vec<Vec<f32>> = (0..15).map(|i| vec![(i % 3) as f32, 1.0]).collect();
        let fit = kmeans(&x, 3, 50, 0).unwrap();
        assert!(fit.inertia < 1e-9);
        let mut used = fit.assignments.clone();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 3);
        assert!(kmeans(&x, 16, 50, 0).is_err());
        assert!(kmeans(&x, 0, 50, 0).is_err());
    }
}
