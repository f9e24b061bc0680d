//! The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., "GANs
//! Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017)
//! and the kernel inception distance (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018).
//!
//! FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), S the sample covariances (divided by
//! n - 1, numpy's `np.cov`). pytorch-fid takes `scipy.linalg.sqrtm(S1 @ S2)` (retrying with
//! 1e-6 added to both diagonals when that is not finite); here the trace comes without the
//! non-symmetric square root: with any factors S1 = F1^T F1 and S2 = F2^T F2, the eigenvalues
//! of S1 S2 are those of (F1 F2^T)(F1 F2^T)^T (symmetric, positive semi-definite), so
//! tr sqrt(S1 S2) = sum sqrt(max(eig, 0)), the nuclear norm of F1 F2^T. With n <= d features
//! (500 images, 2048 dimensions) the factor is the centred features / sqrt(n - 1) and the
//! eigenproblem is n x n; with more, a pivoted Cholesky factor of the covariance. Eigenvalues
//! by Householder tridiagonalisation and implicit QL; products through candle's f64 matmul.
//!
//! KID: the unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, averaged over random
//! subsets (torch-fidelity's defaults: 100 subsets of 1000, here at most the smaller set).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A dense row-major matrix of f64.
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.rows, self.cols),
            &Device::Cpu,
        )?)
    }

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        Ok(Self {
            rows,
            cols,
            data: t.flatten_all()?.to_vec1::<f64>()?,
        })
    }

    /// self @ other^T.
    pub fn mul_t(&self, other: &Mat) -> Result<Mat> {
        let b = other.tensor()?.t()?.contiguous()?;
        Mat::from_tensor(&self.tensor()?.matmul(&b)?)
    }

    /// self^T @ self.
    fn gram_t(&self) -> Result<Mat> {
        let a = self.tensor()?;
        Mat::from_tensor(&a.t()?.contiguous()?.matmul(&a)?)
    }

    fn trace(&self) -> f64 {
        (0..self.rows.min(self.cols))
            .map(|i| self.data[i * self.cols + i])
            .sum()
    }
}

/// Mean and centred rows (f64) of a feature set; errors on fewer than 2 rows, rows of
/// different lengths, or non-finite values.
fn centred(feats: &[Vec<f32>], what: &str) -> Result<(Vec<f64>, Mat)> {
    let n = feats.len();
    if n < 2 {
        return Err(Error::Msg(format!(
            "{what}: need at least 2 feature vectors, got {n}"
        )));
    }
    let d = feats[0].len();
    let mut mu = vec![0.0; d];
    for f in feats {
        if f.len() != d {
            return Err(Error::Msg(format!(
                "{what}: feature vectors of lengths {d} and {}",
                f.len()
            )));
        }
        if f.iter().any(|v| !v.is_finite()) {
            return Err(Error::Msg(format!("{what}: a non-finite feature value")));
        }
        for (m, &v) in mu.iter_mut().zip(f) {
            *m += v as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let mut data = Vec::with_capacity(n * d);
    for f in feats {
        data.extend(f.iter().zip(&mu).map(|(&v, m)| v as f64 - m));
    }
    Ok((
        mu,
        Mat {
            rows: n,
            cols: d,
            data,
        },
    ))
}

/// Mean and sample covariance (divided by n - 1) of rows of equal length.
pub fn mean_cov(feats: &[Vec<f32>]) -> Result<(Vec<f64>, Mat)> {
    let (mu, x) = centred(feats, "mean and covariance")?;
    let mut s = x.gram_t()?;
    let k = 1.0 / (x.rows - 1) as f64;
    s.data.iter_mut().for_each(|v| *v *= k);
    Ok((mu, s))
}

/// A factor F (r x d) with F^T F = s for a symmetric positive semi-definite d x d `s`, by
/// Cholesky with diagonal pivoting, stopped when the largest remaining diagonal is below
/// d * machine epsilon * the largest diagonal (the rank is r).
pub fn psd_factor(s: &Mat) -> Result<Mat> {
    let d = s.rows;
    if s.cols != d {
        return Err(Error::Msg(format!(
            "a covariance of {} x {}",
            s.rows, s.cols
        )));
    }
    if s.data.iter().any(|v| !v.is_finite()) {
        return Err(Error::Msg("a covariance with non-finite entries".into()));
    }
    let mut diag: Vec<f64> = (0..d).map(|i| s.data[i * d + i]).collect();
    if diag.iter().any(|&v| v < 0.0) {
        return Err(Error::Msg(
            "a covariance with a negative diagonal entry".into(),
        ));
    }
    let top = diag.iter().cloned().fold(0.0, f64::max);
    let tol = d as f64 * f64::EPSILON * top;
    let mut picked = vec![false; d];
    let mut rows: Vec<f64> = Vec::new();
    let mut r = 0;
    while r < d {
        let Some((j, &dj)) = diag
            .iter()
            .enumerate()
            .filter(|(i, _)| !picked[*i])
            .max_by(|a, b| a.1.total_cmp(b.1))
        else {
            break;
        };
        if dj <= tol || dj <= 0.0 {
            break;
        }
        let mut row = s.data[j * d..(j + 1) * d].to_vec();
        for l in 0..r {
            let prev = &rows[l * d..(l + 1) * d];
            let c = prev[j];
            if c != 0.0 {
                for (x, p) in row.iter_mut().zip(prev) {
                    *x -= c * p;
                }
            }
        }
        let piv = dj.sqrt();
        for (i, x) in row.iter_mut().enumerate() {
            *x = if picked[i] { 0.0 } else { *x / piv };
        }
        row[j] = piv;
        picked[j] = true;
        for (i, x) in row.iter().enumerate() {
            if !picked[i] {
                diag[i] -= x * x;
            }
        }
        diag[j] = 0.0;
        rows.extend(row);
        r += 1;
    }
    Ok(Mat {
        rows: r,
        cols: d,
        data: rows,
    })
}

/// Eigenvalues of a symmetric matrix (unordered): Householder reduction to tridiagonal form,
/// then the implicit QL algorithm with Wilkinson-style shifts.
pub fn sym_eigenvalues(a: &Mat) -> Result<Vec<f64>> {
    let n = a.rows;
    if a.cols != n {
        return Err(Error::Msg(format!(
            "eigenvalues of a {} x {} matrix",
            a.rows, a.cols
        )));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut m = a.data.clone();
    let mut d = vec![0.0; n];
    // e[i] couples i and i + 1.
    let mut e = vec![0.0; n];
    let mut v = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(1) {
        d[k] = m[k * n + k];
        let lo = k + 1;
        let norm = (lo..n).map(|i| m[i * n + k].powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            e[k] = 0.0;
            continue;
        }
        let x0 = m[lo * n + k];
        let alpha = if x0 > 0.0 { -norm } else { norm };
        for i in lo..n {
            v[i] = m[i * n + k];
        }
        v[lo] -= alpha;
        let vv: f64 = (lo..n).map(|i| v[i] * v[i]).sum();
        e[k] = alpha;
        if vv == 0.0 {
            continue;
        }
        let beta = 2.0 / vv;
        // A22 <- H A22 H with H = I - beta v v^T: p = beta A22 v, q = p - (beta v.p / 2) v,
        // A22 -= v q^T + q v^T.
        for i in lo..n {
            let row = &m[i * n + lo..i * n + n];
            p[i] = beta * row.iter().zip(&v[lo..n]).map(|(a, b)| a * b).sum::<f64>();
        }
        let kk = 0.5 * beta * (lo..n).map(|i| v[i] * p[i]).sum::<f64>();
        for i in lo..n {
            p[i] -= kk * v[i];
        }
        for i in lo..n {
            let (vi, qi) = (v[i], p[i]);
            let row = &mut m[i * n + lo..i * n + n];
            for ((x, vj), qj) in row.iter_mut().zip(&v[lo..n]).zip(&p[lo..n]) {
                *x -= vi * qj + qi * vj;
            }
        }
    }
    d[n - 1] = m[(n - 1) * n + n - 1];
    e[n - 1] = 0.0;
    // Implicit QL on (d, e).
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut mm = l;
            while mm + 1 < n {
                let dd = d[mm].abs() + d[mm + 1].abs();
                if e[mm].abs() <= f64::EPSILON * dd {
                    break;
                }
                mm += 1;
            }
            if mm == l {
                break;
            }
            iter += 1;
            if iter > 100 {
                return Err(Error::Msg(
                    "the eigenvalue iteration did not converge".into(),
                ));
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[mm] - d[l] + e[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut pp) = (1.0, 1.0, 0.0);
            let mut deflated = false;
            let mut i = mm;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= pp;
                    e[mm] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - pp;
                r = (d[i] - g) * s + 2.0 * c * b;
                pp = s * r;
                d[i + 1] = g + pp;
                g = c * r - b;
            }
            if deflated {
                continue;
            }
            d[l] -= pp;
            e[l] = g;
            e[mm] = 0.0;
        }
    }
    Ok(d)
}

/// tr sqrt(S1 S2) for S1 = f1^T f1 and S2 = f2^T f2: the nuclear norm of f1 f2^T.
pub fn trace_sqrt_product(f1: &Mat, f2: &Mat) -> Result<f64> {
    if f1.cols != f2.cols {
        return Err(Error::Msg(format!(
            "features of dimensions {} and {}",
            f1.cols, f2.cols
        )));
    }
    if f1.rows == 0 || f2.rows == 0 {
        return Ok(0.0);
    }
    let c = f1.mul_t(f2)?;
    let g = if c.rows <= c.cols {
        c.mul_t(&c)?
    } else {
        c.gram_t()?
    };
    // Singular values of f1 f2^T below sqrt(machine epsilon) times the largest are not
    // resolved through the squared matrix (nor by scipy's sqrtm): they come out as
    // sqrt(round-off), some 1e-7 of the trace, far below FID's sampling noise.
    Ok(sym_eigenvalues(&g)?
        .into_iter()
        .map(|l| l.max(0.0).sqrt())
        .sum())
}

/// The Fréchet distance from means and covariances (d x d), as pytorch-fid's
/// `calculate_frechet_distance` defines it; clamped at 0 against round-off.
pub fn frechet_from_stats(mu1: &[f64], s1: &Mat, mu2: &[f64], s2: &Mat) -> Result<f64> {
    let d = mu1.len();
    if mu2.len() != d || [s1.rows, s1.cols, s2.rows, s2.cols] != [d; 4] {
        return Err(Error::Msg(format!(
            "statistics of different dimensions ({d} and {}, covariances {}x{} and {}x{})",
            mu2.len(),
            s1.rows,
            s1.cols,
            s2.rows,
            s2.cols
        )));
    }
    let tr = trace_sqrt_product(&psd_factor(s1)?, &psd_factor(s2)?)?;
    finish(mu1, mu2, s1.trace() + s2.trace(), tr)
}

fn finish(mu1: &[f64], mu2: &[f64], traces: f64, tr_sqrt: f64) -> Result<f64> {
    let mean_term: f64 = mu1.iter().zip(mu2).map(|(x, y)| (x - y) * (x - y)).sum();
    let fd = mean_term + traces - 2.0 * tr_sqrt;
    if !fd.is_finite() {
        return Err(Error::Msg(format!("the Fréchet distance came out {fd}")));
    }
    Ok(fd.max(0.0))
}

/// A feature set as the Fréchet distance needs it: mean, a covariance factor, tr S.
struct Fitted {
    mu: Vec<f64>,
    factor: Mat,
    trace: f64,
}

fn fit(feats: &[Vec<f32>], what: &str) -> Result<Fitted> {
    let (mu, mut x) = centred(feats, what)?;
    let k = 1.0 / ((x.rows - 1) as f64).sqrt();
    x.data.iter_mut().for_each(|v| *v *= k);
    let trace = x.data.iter().map(|v| v * v).sum();
    // More rows than dimensions: a d x d problem instead of an n x n one.
    let factor = if x.rows > x.cols {
        psd_factor(&x.gram_t()?)?
    } else {
        x
    };
    Ok(Fitted { mu, factor, trace })
}

/// The Fréchet distance between Gaussians fitted to two feature sets (rows), pytorch-fid's
/// `calculate_frechet_distance(*stats(a), *stats(b))` up to round-off; at least 2 rows each.
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f64> {
    let fa = fit(a, "first feature set")?;
    let fb = fit(b, "second feature set")?;
    if fa.mu.len() != fb.mu.len() {
        return Err(Error::Msg(format!(
            "feature sets of dimensions {} and {}",
            fa.mu.len(),
            fb.mu.len()
        )));
    }
    let tr = trace_sqrt_product(&fa.factor, &fb.factor)?;
    finish(&fa.mu, &fb.mu, fa.trace + fb.trace, tr)
}

/// KID's defaults (torch-fidelity's `kid_subsets`, `kid_subset_size`).
pub const KID_SUBSETS: usize = 100;
pub const KID_SUBSET_SIZE: usize = 1000;
/// At most this many features per set enter KID's kernel matrix (a seeded sample if more).
const KID_POOL: usize = 2000;

/// Kernel inception distance: mean and standard deviation over `subsets` random subsets of
/// `subset_size` rows of each set (at most the smaller set's size) of the unbiased MMD^2 with
/// the kernel (x.y / d + 1)^3. Subsets are drawn with `seed`.
pub fn kid(
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let (n1, n2) = (a.len(), b.len());
    if n1 < 2 || n2 < 2 || subsets == 0 {
        return Err(Error::Msg(format!(
            "KID needs at least 2 rows per set and 1 subset ({n1} and {n2} rows, {subsets} subsets)"
        )));
    }
    let mut rng = crate::rng::Rng::new(seed);
    let mut pool = |n: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        if n > KID_POOL {
            rng.shuffle(&mut idx);
            idx.truncate(KID_POOL);
        }
        idx
    };
    let (ia, ib) = (pool(n1), pool(n2));
    let d = a[0].len();
    let rows: Vec<&Vec<f32>> = ia
        .iter()
        .map(|&i| &a[i])
        .chain(ib.iter().map(|&i| &b[i]))
        .collect();
    if rows
        .iter()
        .any(|r| r.len() != d || r.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::Msg(
            "KID: feature vectors of different lengths or non-finite values".into(),
        ));
    }
    let x = Mat {
        rows: rows.len(),
        cols: d,
        data: rows
            .iter()
            .flat_map(|r| r.iter().map(|&v| v as f64))
            .collect(),
    };
    let n = x.rows;
    let mut k = x.mul_t(&x)?;
    k.data
        .iter_mut()
        .for_each(|v| *v = (*v / d as f64 + 1.0).powi(3));
    let (pa, pb) = (ia.len(), ib.len());
    let m = subset_size.min(pa).min(pb).max(2);
    let mut ra: Vec<usize> = (0..pa).collect();
    let mut rb: Vec<usize> = (pa..n).collect();
    let mut vals = Vec::with_capacity(subsets);
    let mut rng = crate::rng::Rng::new(seed.wrapping_add(1));
    for _ in 0..subsets {
        rng.shuffle(&mut ra);
        rng.shuffle(&mut rb);
        let (sa, sb) = (&ra[..m], &rb[..m]);
        let within = |s: &[usize]| -> f64 {
            let mut t = 0.0;
            for (p, &i) in s.iter().enumerate() {
                for &j in &s[p + 1..] {
                    t += k.data[i * n + j];
                }
            }
            2.0 * t
        };
        let mut cross = 0.0;
        for &i in sa {
            for &j in sb {
                cross += k.data[i * n + j];
            }
        }
        let mf = m as f64;
        vals.push((within(sa) + within(sb)) / (mf * (mf - 1.0)) - 2.0 * cross / (mf * mf));
    }
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
    Ok((mean, sd))
}

#[cfg(test)]
#[path = "frechet/tests.rs"]
mod tests;
