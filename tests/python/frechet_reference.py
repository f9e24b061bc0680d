"""Reference numbers for the Rust tests of src/eval/frechet.rs (issue 22, part 3).

Feature sets are made by a formula the Rust test repeats (computed in float64, stored as
float32 like pytorch-fid's activations); the Fréchet distance is pytorch-fid's
`calculate_frechet_distance` (numpy mean, np.cov, scipy.linalg.sqrtm of the product), printed
beside an exact value from eigenvalues (scipy.linalg.eigh); KID is the unbiased polynomial-kernel
MMD^2 of torch-fidelity (kernel (x.y / d + 1)^3) on whole sets.

Run: python3 tests/python/frechet_reference.py   (numpy, scipy; pytorch-fid if installed,
else the same formula inline). The printed numbers are the ones in src/eval/frechet/tests.rs.
"""

import numpy as np
from scipy import linalg

try:
    from pytorch_fid.fid_score import calculate_frechet_distance
except ImportError:  # the same formula
    def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        covmean = covmean.real
        diff = mu1 - mu2
        return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def feats(n, d, phase, shift):
    """Row i, column j: sin(0.9 i + 1.7 j + 0.013 i j + phase) (1 + 0.1 j) + shift j."""
    i = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(d, dtype=np.float64)[None, :]
    # float32 values in a float64 array, like pytorch-fid's activations (np.empty defaults to
    # float64; a float32 array would make np.mean accumulate in float32).
    return (np.sin(0.9 * i + 1.7 * j + 0.013 * i * j + phase) * (1 + 0.1 * j)
            + shift * j).astype(np.float32).astype(np.float64)


def stats(x):
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def exact_fd(mu1, s1, mu2, s2):
    w, u = linalg.eigh(s1)
    r = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    ev = linalg.eigvalsh(r @ s2 @ r)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()


def near_singular():
    """S1 = B B^T + 1e-9 I (B 8x3: rank 3 plus a tiny ridge), S2 = C C^T + 1e-3 I."""
    k = np.arange(8, dtype=np.float64)[:, None]
    b = np.cos(0.7 * k + 1.3 * np.arange(3)[None, :])
    c = np.sin(0.4 * k * np.arange(1, 9)[None, :] + 0.2)
    s1 = b @ b.T + 1e-9 * np.eye(8)
    s2 = c @ c.T + 1e-3 * np.eye(8)
    mu1 = 0.1 * np.arange(8)
    mu2 = np.cos(np.arange(8))
    return mu1, s1, mu2, s2


def kid_full(x, y):
    d = x.shape[1]
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def main():
    np.set_printoptions(precision=17)
    for name, (n, d) in [("tall", (40, 6)), ("wide", (7, 12))]:
        a, b = feats(n, d, 0.0, 0.0), feats(n, d, 0.5, 0.05)
        m1, s1 = stats(a)
        m2, s2 = stats(b)
        # tr sqrt(S1 S2) as the nuclear norm of F1 F2^T by SVD (no squaring: the most accurate).
        f1 = (a - m1) / np.sqrt(n - 1)
        f2 = (b - m2) / np.sqrt(n - 1)
        nuc = np.linalg.svd(f1 @ f2.T, compute_uv=False).sum()
        diff = m1 - m2
        svd_fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * nuc
        print(f"{name} n={n} d={d}: pytorch-fid {calculate_frechet_distance(m1, s1, m2, s2)!r}"
              f" exact {exact_fd(m1, s1, m2, s2)!r} svd {svd_fd!r}")
    mu1, s1, mu2, s2 = near_singular()
    print(f"near-singular stats: pytorch-fid {calculate_frechet_distance(mu1, s1, mu2, s2)!r}"
          f" exact {exact_fd(mu1, s1, mu2, s2)!r}")
    print(f"kid n=30 d=6: {kid_full(feats(30, 6, 0.0, 0.0), feats(30, 6, 0.5, 0.05))!r}")


if __name__ == "__main__":
    main()
