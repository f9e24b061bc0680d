#![expect(clippy::unwrap_used, reason = "tests may unwrap")]
use super::*;

/// `feats` of tests/python/frechet_reference.py: row i, column j
/// sin(0.9 i + 1.7 j + 0.013 i j + phase) (1 + 0.1 j) + shift j, in f64 rounded to f32.
fn feats(n: usize, d: usize, phase: f64, shift: f64) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..d)
                .map(|j| {
                    let (i, j) = (i as f64, j as f64);
                    ((0.9 * i + 1.7 * j + 0.013 * i * j + phase).sin() * (1.0 + 0.1 * j)
                        + shift * j) as f32
                })
                .collect()
        })
        .collect()
}

fn close(got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs(),
        "got {got}, want {want} (relative {:e})",
        (got - want).abs() / want.abs()
    );
}

#[test]
fn frechet_distance_matches_pytorch_fid_and_scipy() {
    // Numbers from tests/python/frechet_reference.py (numpy 2, scipy 1.17, pytorch-fid 0.3.0):
    // pytorch-fid's calculate_frechet_distance (scipy sqrtm of S1 S2), and the same formula
    // with tr sqrt(S1 S2) as the nuclear norm of F1 F2^T by numpy's SVD.
    // More rows than dimensions (full-rank covariances, the pivoted-Cholesky path).
    let got = frechet_distance(&feats(40, 6, 0.0, 0.0), &feats(40, 6, 0.5, 0.05)).unwrap();
    close(got, 0.135_521_614_599_804_6, 1e-9);
    close(got, 0.135_521_614_601_422_87, 1e-9);
    // Fewer rows than dimensions (singular covariances, like 500 images in 2048 dimensions),
    // with singular values of F1 F2^T from 8.8 down to 8e-8: those below sqrt(eps) are
    // round-off for scipy's sqrtm and for the squared matrix alike (1e-7 of the value).
    let got = frechet_distance(&feats(7, 12, 0.0, 0.0), &feats(7, 12, 0.5, 0.05)).unwrap();
    close(got, 1.457_325_163_591_349_3, 1e-7);
    close(got, 1.457_324_946_090_651, 3e-7);
    // The same set: 0.
    let a = feats(40, 6, 0.0, 0.0);
    assert!(frechet_distance(&a, &a).unwrap() < 1e-9);
}

#[test]
fn frechet_from_near_singular_statistics_matches_scipy() {
    // S1 = B B^T + 1e-9 I with B 8 x 3 (rank 3 plus a ridge), S2 = C C^T + 1e-3 I.
    let s1 = Mat {
        rows: 8,
        cols: 8,
        data: (0..64)
            .map(|p| {
                let (r, c) = (p / 8, p % 8);
                let b = |k: usize, j: usize| (0.7 * k as f64 + 1.3 * j as f64).cos();
                (0..3).map(|j| b(r, j) * b(c, j)).sum::<f64>() + if r == c { 1e-9 } else { 0.0 }
            })
            .collect(),
    };
    let s2 = Mat {
        rows: 8,
        cols: 8,
        data: (0..64)
            .map(|p| {
                let (r, c) = (p / 8, p % 8);
                let m = |k: usize, j: usize| (0.4 * k as f64 * (j + 1) as f64 + 0.2).sin();
                (0..8).map(|j| m(r, j) * m(c, j)).sum::<f64>() + if r == c { 1e-3 } else { 0.0 }
            })
            .collect(),
    };
    let mu1: Vec<f64> = (0..8).map(|i| 0.1 * i as f64).collect();
    let mu2: Vec<f64> = (0..8).map(|i| (i as f64).cos()).collect();
    let got = frechet_from_stats(&mu1, &s1, &mu2, &s2).unwrap();
    close(got, 27.561_149_061_885_43, 1e-10);
    close(got, 27.561_149_061_657_73, 1e-10);
    // mean_cov agrees with the feature path.
    let (a, b) = (feats(40, 6, 0.0, 0.0), feats(40, 6, 0.5, 0.05));
    let ((m1, c1), (m2, c2)) = (mean_cov(&a).unwrap(), mean_cov(&b).unwrap());
    let via_stats = frechet_from_stats(&m1, &c1, &m2, &c2).unwrap();
    close(via_stats, frechet_distance(&a, &b).unwrap(), 1e-9);
    assert!(frechet_from_stats(&m1, &c1, &mu2, &s2).is_err());
}

#[test]
fn known_gaussians_and_bad_input() {
    // Shifted by (3, 4): FD = 25 exactly (equal covariances).
    let mut rng = crate::rng::Rng::new(1);
    let a: Vec<Vec<f32>> = (0..500)
        .map(|_| rng.normal_vec(2).into_iter().map(|v| v as f32).collect())
        .collect();
    let b: Vec<Vec<f32>> = a.iter().map(|v| vec![v[0] + 3.0, v[1] + 4.0]).collect();
    assert!((frechet_distance(&a, &b).unwrap() - 25.0).abs() < 1e-3);
    // Scaled by 2: the covariances commute, tr(S1 + 4 S1 - 2 sqrt(4 S1^2)) = tr S1, plus
    // |mu|^2.
    let c: Vec<Vec<f32>> = a.iter().map(|v| vec![2.0 * v[0], 2.0 * v[1]]).collect();
    let (mu, s1) = mean_cov(&a).unwrap();
    let want = s1.trace() + mu[0] * mu[0] + mu[1] * mu[1];
    close(frechet_distance(&a, &c).unwrap(), want, 1e-9);
    let e = frechet_distance(&a[..1], &b).err().unwrap().to_string();
    assert!(e.contains("at least 2"), "{e}");
    let e = frechet_distance(&[vec![f32::NAN, 0.0], vec![0.0, 0.0]], &b)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("non-finite"), "{e}");
    assert!(frechet_distance(&a, &feats(4, 3, 0.0, 0.0)).is_err());
}

#[test]
fn eigenvalues_of_a_known_matrix() {
    // Eigenvalues of the 1-D Laplacian tridiag(-1, 2, -1) of size n: 2 - 2 cos(k pi / (n + 1)),
    // here given as a dense matrix permuted by a fixed reordering (not tridiagonal).
    let n = 9;
    let perm = [4, 0, 7, 2, 8, 1, 6, 3, 5];
    let mut a = Mat {
        rows: n,
        cols: n,
        data: vec![0.0; n * n],
    };
    for i in 0..n {
        a.data[perm[i] * n + perm[i]] = 2.0;
        if i + 1 < n {
            a.data[perm[i] * n + perm[i + 1]] = -1.0;
            a.data[perm[i + 1] * n + perm[i]] = -1.0;
        }
    }
    let mut got = sym_eigenvalues(&a).unwrap();
    got.sort_by(f64::total_cmp);
    for (k, g) in got.iter().enumerate() {
        let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
        assert!((g - want).abs() < 1e-12, "{got:?}");
    }
    // A rank-1 PSD matrix: one eigenvalue |v|^2, the rest 0; its factor has one row.
    let v = [1.0, 2.0, -2.0];
    let s = Mat {
        rows: 3,
        cols: 3,
        data: (0..9).map(|p| v[p / 3] * v[p % 3]).collect(),
    };
    let f = psd_factor(&s).unwrap();
    assert_eq!(f.rows, 1);
    let mut e = sym_eigenvalues(&s).unwrap();
    e.sort_by(f64::total_cmp);
    assert!(e[0].abs() < 1e-12 && e[1].abs() < 1e-12 && (e[2] - 9.0).abs() < 1e-12);
}

#[test]
fn kid_matches_the_unbiased_mmd_of_torch_fidelity() {
    // tests/python/frechet_reference.py: the unbiased MMD^2 with kernel (x.y / d + 1)^3 on
    // the whole sets; every subset of the full size is the whole set, so the spread is 0.
    let (a, b) = (feats(30, 6, 0.0, 0.0), feats(30, 6, 0.5, 0.05));
    let (mean, sd) = kid(&a, &b, 5, 1000, 3).unwrap();
    close(mean, -0.187_018_211_606_942_32, 1e-9);
    assert!(sd < 1e-12);
    // Subsets of 10: scattered around the full-set value, and the same for the same seed.
    let (m10, sd10) = kid(&a, &b, 50, 10, 3).unwrap();
    assert!(
        sd10 > 0.0 && (m10 - mean).abs() < 3.0 * sd10,
        "{m10} +- {sd10}"
    );
    assert_eq!(kid(&a, &b, 50, 10, 3).unwrap(), (m10, sd10));
    assert!(kid(&a[..1], &b, 5, 10, 3).is_err());
}
