//! Dense feature matrices and blocked squared Euclidean distances.
//!
//! All O(n^2) measures go through [`for_each_row`]: the rows of one set are taken in blocks
//! of [`BLOCK`], their dot products with every row of the other set come from one f32 matrix
//! product (`gemm`, single-threaded so results do not depend on the thread count), and
//! `|a - b|^2 = |a|^2 + |b|^2 - 2 a.b` turns them into squared distances. Memory stays at
//! `BLOCK x n` floats however large the sets are.
//!
//! The norm trick loses precision when points lie far from the origin relative to their
//! spacing (f32 cancellation), so every matrix is stored *centred* on a chosen point (the
//! reference set's mean, or a group's own mean); distances are translation-invariant, so
//! this changes nothing but the round-off.

use crate::error::{Error, Result};

/// Rows per block of the distance computation.
pub(crate) const BLOCK: usize = 128;

/// Row-major `n x d` matrix of centred f32 features with cached squared row norms.
#[derive(Debug, Clone)]
pub(crate) struct Mat {
    pub n: usize,
    pub d: usize,
    pub data: Vec<f32>,
    pub sq: Vec<f32>,
}

/// Checks that `rows` is non-empty, of one positive dimension, and finite; returns `d`.
pub(crate) fn check_rows(rows: &[Vec<f32>], what: &str) -> Result<usize> {
    let d = rows
        .first()
        .map(Vec::len)
        .ok_or_else(|| Error::Msg(format!("{what}: no feature vectors")))?;
    if d == 0 {
        return Err(Error::Msg(format!(
            "{what}: feature vectors of dimension 0"
        )));
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len() != d {
            return Err(Error::Msg(format!(
                "{what}: feature vector {i} has dimension {}, the first has {d}",
                r.len()
            )));
        }
        if r.iter().any(|v| !v.is_finite()) {
            return Err(Error::Msg(format!(
                "{what}: feature vector {i} contains NaN or Inf"
            )));
        }
    }
    Ok(d)
}

/// Mean of the rows (accumulated in f64).
pub(crate) fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let d = rows.first().map_or(0, Vec::len);
    let mut m = vec![0.0f64; d];
    for r in rows {
        for (a, &v) in m.iter_mut().zip(r) {
            *a += v as f64;
        }
    }
    let n = rows.len().max(1) as f64;
    m.into_iter().map(|v| (v / n) as f32).collect()
}

fn sq_norm(r: &[f32]) -> f32 {
    r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32
}

impl Mat {
    /// The rows minus `center`, after checking them (see [`check_rows`]) against
    /// `center.len()`.
    pub fn centered(rows: &[Vec<f32>], center: &[f32], what: &str) -> Result<Self> {
        let d = check_rows(rows, what)?;
        if d != center.len() {
            return Err(Error::Msg(format!(
                "{what}: features of dimension {d}, the reference features have {}",
                center.len()
            )));
        }
        let mut data = Vec::with_capacity(rows.len() * d);
        for r in rows {
            data.extend(r.iter().zip(center).map(|(x, c)| x - c));
        }
        Ok(Self::from_data(data, d))
    }

    /// The rows centred on their own mean.
    pub fn self_centered(rows: &[Vec<f32>], what: &str) -> Result<Self> {
        check_rows(rows, what)?;
        Self::centered(rows, &mean(rows), what)
    }

    pub fn from_data(data: Vec<f32>, d: usize) -> Self {
        assert!(d > 0 && data.len().is_multiple_of(d));
        let sq = data.chunks_exact(d).map(sq_norm).collect();
        Self {
            n: data.len() / d,
            d,
            data,
            sq,
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }

    /// The chosen rows, in the given order.
    pub fn select(&self, idx: &[usize]) -> Self {
        let mut data = Vec::with_capacity(idx.len() * self.d);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Self {
            n: idx.len(),
            d: self.d,
            data,
            sq: idx.iter().map(|&i| self.sq[i]).collect(),
        }
    }
}

/// `dst (m x n) = a (m x k, row-major) * b^T` where `b` is `n x k` row-major, on the calling
/// thread (the kernels' strided product: b^T's element (p, j) is `b[j k + p]`).
fn gemm_abt(m: usize, n: usize, k: usize, dst: &mut [f32], a: &[f32], b: &[f32]) {
    crate::kernels::matmul::matmul_in(false, m, n, k, dst, (n, 1), false, a, (k, 1), b, (1, k));
}

/// Calls `f(i, row)` for every row `i` of `a`, where `row[j]` is the squared Euclidean
/// distance from `a_i` to `b_j` (clamped at 0). Rows come in order; `f` may overwrite them.
pub(crate) fn for_each_row(a: &Mat, b: &Mat, mut f: impl FnMut(usize, &mut [f32])) {
    assert_eq!(a.d, b.d, "feature dimensions differ");
    let mut buf = vec![0f32; BLOCK.min(a.n) * b.n];
    for start in (0..a.n).step_by(BLOCK) {
        let m = BLOCK.min(a.n - start);
        let dst = &mut buf[..m * b.n];
        gemm_abt(
            m,
            b.n,
            a.d,
            dst,
            &a.data[start * a.d..(start + m) * a.d],
            &b.data,
        );
        for r in 0..m {
            let i = start + r;
            let row = &mut dst[r * b.n..(r + 1) * b.n];
            let sa = a.sq[i];
            for (v, &sb) in row.iter_mut().zip(&b.sq) {
                *v = (sa + sb - 2.0 * *v).max(0.0);
            }
            f(i, row);
        }
    }
}

/// For every row of `a`: the index of the nearest row of `b` (lowest index on ties) and the
/// squared distance to it.
pub(crate) fn nearest(a: &Mat, b: &Mat) -> Vec<(usize, f32)> {
    let mut out = Vec::with_capacity(a.n);
    for_each_row(a, b, |_, row| {
        let mut best = (usize::MAX, f32::INFINITY);
        for (j, &v) in row.iter().enumerate() {
            if v < best.1 {
                best = (j, v);
            }
        }
        out.push(best);
    });
    out
}

/// For every row of `m`: the squared distance to its `k`-th nearest *other* row (the point
/// itself excluded; equal to the (k+1)-th smallest distance with the point included, as in
/// the reference implementations). Needs `m.n > k >= 1`.
pub(crate) fn knn_radii_sq(m: &Mat, k: usize) -> Vec<f32> {
    knn_radii_sq2(m, k, k).0
}

/// [`knn_radii_sq`] for two values of k from one distance pass.
pub(crate) fn knn_radii_sq2(m: &Mat, ka: usize, kb: usize) -> (Vec<f32>, Vec<f32>) {
    let (lo, hi) = (ka.min(kb), ka.max(kb));
    assert!(lo >= 1 && m.n > hi);
    let (mut r_lo, mut r_hi) = (Vec::with_capacity(m.n), Vec::with_capacity(m.n));
    for_each_row(m, m, |i, row| {
        row[i] = f32::INFINITY;
        let (below, v, _) = row.select_nth_unstable_by(hi - 1, f32::total_cmp);
        r_hi.push(*v);
        if lo < hi {
            // The lo-th smallest is among the hi - 1 values below the hi-th.
            let (_, w, _) = below.select_nth_unstable_by(lo - 1, f32::total_cmp);
            r_lo.push(*w);
        }
    });
    if lo == hi {
        r_lo = r_hi.clone();
    }
    if ka <= kb { (r_lo, r_hi) } else { (r_hi, r_lo) }
}

/// Exact Euclidean distance of two feature vectors (f64 accumulation).
pub(crate) fn exact_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rows(rng: &mut Rng, n: usize, d: usize, offset: f32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                rng.normal_vec(d)
                    .into_iter()
                    .map(|v| v as f32 + offset)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn blocked_distances_match_direct() {
        // 300 rows cross 3 blocks (128 + 128 + 44); compare against f64 direct distances.
        // Features sit at offset 100 from the origin; centring keeps the f32 norm trick
        // accurate to ~1e-4 relative.
        let mut rng = Rng::new(5);
        let a = rows(&mut rng, 300, 17, 100.0);
        let b = rows(&mut rng, 70, 17, 100.0);
        let c = mean(&a);
        let (ma, mb) = (
            Mat::centered(&a, &c, "a").unwrap(),
            Mat::centered(&b, &c, "b").unwrap(),
        );
        let mut seen = 0;
        for_each_row(&ma, &mb, |i, row| {
            assert_eq!(i, seen);
            seen += 1;
            for (j, &v) in row.iter().enumerate() {
                let want = exact_distance(&a[i], &b[j]).powi(2);
                assert!(
                    (v as f64 - want).abs() < 1e-4 * want.max(1.0),
                    "{v} vs {want}"
                );
            }
        });
        assert_eq!(seen, 300);
        let nn = nearest(&mb, &ma);
        for (j, &(i, _)) in nn.iter().enumerate() {
            let best = (0..a.len())
                .min_by(|&x, &y| {
                    exact_distance(&b[j], &a[x]).total_cmp(&exact_distance(&b[j], &a[y]))
                })
                .unwrap();
            assert_eq!(i, best);
        }
    }

    #[test]
    fn knn_radius_excludes_self() {
        // Points 0, 1, 3, 7 on a line, k = 2 (second-nearest *other* point):
        // 0: others at 1, 3, 7 -> 3, d^2 = 9;  1: at 1, 2, 6 -> 2, d^2 = 4;
        // 3: at 2, 3, 4 -> 3, d^2 = 9;         7: at 4, 6, 7 -> 6, d^2 = 36.
        let pts: Vec<Vec<f32>> = [0.0, 1.0, 3.0, 7.0].iter().map(|&v| vec![v]).collect();
        let m = Mat::self_centered(&pts, "p").unwrap();
        let r = knn_radii_sq(&m, 2);
        let want = [9.0, 4.0, 9.0, 36.0];
        for (g, w) in r.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{r:?}");
        }
        // k = 1 (nearest other point): 1, 1, 4, 16; both from one pass, in either order.
        let (a, b) = knn_radii_sq2(&m, 2, 1);
        assert_eq!(a, r);
        for (g, w) in b.iter().zip([1.0, 1.0, 4.0, 16.0]) {
            assert!((g - w).abs() < 1e-4, "{b:?}");
        }
        assert_eq!(knn_radii_sq2(&m, 1, 2), (b, a));
    }

    #[test]
    fn rejects_bad_rows() {
        assert!(check_rows(&[], "x").is_err());
        assert!(check_rows(&[vec![1.0], vec![1.0, 2.0]], "x").is_err());
        assert!(check_rows(&[vec![f32::NAN]], "x").is_err());
        assert!(Mat::centered(&[vec![1.0, 2.0]], &[0.0], "x").is_err());
    }
}
