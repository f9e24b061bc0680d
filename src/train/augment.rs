//! Differentiable augmentation of every image the discriminator sees, real and generated
//! alike (DiffAugment: Zhao, Liu, Lin, Zhu & Han, "Differentiable Augmentation for
//! Data-Efficient GAN Training", NeurIPS 2020).
//!
//! Two of the paper's three policies: `translation` (shift each image by a random whole
//! number of pixels, up to a fraction of its side, filling with zeros) and `cutout` (zero a
//! random square of a fraction of the side). The paper's `color` policy is left out on
//! purpose: it shifts brightness and saturation, and i-CLEVR's labels are colours.
//!
//! Both are linear maps of the image that depend only on random numbers drawn from the
//! trainer's stream, so gradients reach G through them (a gather and a mask).

use candle_core::Tensor;

pub use crate::config::AugmentConfig;
use crate::error::Result;
use crate::rng::Rng;

impl AugmentConfig {
    pub fn is_off(&self) -> bool {
        self.translation <= 0.0 && self.cutout <= 0.0
    }
}

/// Largest shift in pixels for an image of side `side`.
fn max_shift(frac: f64, side: usize) -> i64 {
    (frac * side as f64).round().max(0.0) as i64
}

/// Augment a batch (B, C, H, W). Draws from `rng` only for the policies that are on, so a
/// run with augmentation off keeps the random stream it had before augmentation existed.
pub fn augment(x: &Tensor, cfg: &AugmentConfig, rng: &mut Rng) -> Result<Tensor> {
    let mut x = x.clone();
    if cfg.translation > 0.0 {
        x = translate(&x, cfg.translation, rng)?;
    }
    if cfg.cutout > 0.0 {
        x = cutout(&x, cfg.cutout, rng)?;
    }
    Ok(x)
}

/// Each image shifted by its own (dy, dx) in [-r, r], zeros where the shift uncovers it.
pub fn translate(x: &Tensor, frac: f64, rng: &mut Rng) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let r = max_shift(frac, h.max(w));
    if r == 0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let shifts: Vec<(i64, i64)> = (0..b)
        .map(|_| {
            let dy = rng.below((2 * r + 1) as usize) as i64 - r;
            let dx = rng.below((2 * r + 1) as usize) as i64 - r;
            (dy, dx)
        })
        .collect();
    translate_by(x, &shifts)
}

/// Image i moved by `shifts[i] = (dy, dx)`: out[y][x] = in[y - dy][x - dx], 0 outside.
pub fn translate_by(x: &Tensor, shifts: &[(i64, i64)]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let n = b * c * h * w;
    // Index n points at one appended zero.
    let mut idx = Vec::with_capacity(n);
    for (i, &(dy, dx)) in shifts.iter().enumerate().take(b) {
        for ch in 0..c {
            let base = (i * c + ch) * h * w;
            for y in 0..h as i64 {
                for xx in 0..w as i64 {
                    let (sy, sx) = (y - dy, xx - dx);
                    let inside = (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx);
                    idx.push(if inside {
                        (base + sy as usize * w + sx as usize) as u32
                    } else {
                        n as u32
                    });
                }
            }
        }
    }
    let flat = Tensor::cat(
        &[&x.flatten_all()?, &Tensor::zeros(1, x.dtype(), x.device())?],
        0,
    )?;
    let idx = Tensor::from_vec(idx, n, x.device())?;
    Ok(flat.index_select(&idx, 0)?.reshape((b, c, h, w))?)
}

/// Each image with a square of side `frac * side` (centre anywhere in the image, clipped at
/// the border) set to zero.
pub fn cutout(x: &Tensor, frac: f64, rng: &mut Rng) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (sh, sw) = (
        (frac * h as f64).round() as usize,
        (frac * w as f64).round() as usize,
    );
    if sh == 0 || sw == 0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let mut mask = vec![1f32; b * h * w];
    for i in 0..b {
        let cy = rng.below(h) as i64;
        let cx = rng.below(w) as i64;
        let (y0, x0) = (cy - sh as i64 / 2, cx - sw as i64 / 2);
        for y in y0.max(0)..(y0 + sh as i64).min(h as i64) {
            for xx in x0.max(0)..(x0 + sw as i64).min(w as i64) {
                mask[i * h * w + y as usize * w + xx as usize] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// sum |a - b|
    fn abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn img(b: usize, c: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f64> = (0..b * c * h * w).map(|i| i as f64 + 1.0).collect();
        Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn translation_moves_pixels_and_fills_zeros() {
        // 1x1x3x3 image 1..9 moved down by 1 and left by 1:
        // out[y][x] = in[y-1][x+1]:  [0 0 0; 2 3 0; 5 6 0]
        let x = img(1, 1, 3, 3);
        let y = translate_by(&x, &[(1, -1)]).unwrap();
        let v: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0., 0., 0., 2., 3., 0., 5., 6., 0.]);
        // No shift is the identity; each image of a batch gets its own shift.
        let x = img(2, 2, 2, 2);
        let y = translate_by(&x, &[(0, 0), (0, 1)]).unwrap();
        let v: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&v[..8], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        assert_eq!(&v[8..], &[0., 9., 0., 11., 0., 13., 0., 15.]);
    }

    #[test]
    fn augmentations_are_differentiable() {
        // loss = sum(aug(x) * r): d loss / dx is the transpose of the augmentation applied
        // to r. For a translation, grad[src] = r[dst] where src = dst - shift; for cutout,
        // grad = r * mask. Checked against central finite differences of the same draws.
        let dev = Device::Cpu;
        let x0 = Tensor::from_vec(
            (0..2 * 3 * 8 * 8)
                .map(|i| ((i * 37) % 11) as f64 / 11.0 - 0.5)
                .collect(),
            (2, 3, 8, 8),
            &dev,
        )
        .unwrap();
        let r = Tensor::from_vec(
            (0..2 * 3 * 8 * 8)
                .map(|i| ((i * 13) % 7) as f64 - 3.0)
                .collect(),
            (2, 3, 8, 8),
            &dev,
        )
        .unwrap();
        let cfg = AugmentConfig {
            translation: 0.25,
            cutout: 0.5,
        };
        let loss = |x: &Tensor| -> f64 {
            let mut rng = Rng::new(7);
            (augment(x, &cfg, &mut rng).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let v = Var::from_tensor(&x0).unwrap();
        let mut rng = Rng::new(7);
        let l = (augment(v.as_tensor(), &cfg, &mut rng).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = l.backward().unwrap();
        let g: Vec<f64> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let mut nonzero = 0;
        for i in (0..base.len()).step_by(5) {
            let mut p = base.clone();
            p[i] += 1e-3;
            let mut m = base.clone();
            m[i] -= 1e-3;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (2, 3, 8, 8), &dev).unwrap();
            let fd = (loss(&t(p)) - loss(&t(m))) / 2e-3;
            assert!((fd - g[i]).abs() < 1e-6, "pixel {i}: fd {fd} grad {}", g[i]);
            nonzero += usize::from(g[i] != 0.0);
        }
        // The augmentation must actually have done something, and not zeroed everything.
        assert!(nonzero > 10, "{nonzero}");
        let mut rng = Rng::new(7);
        let y = augment(&x0, &cfg, &mut rng).unwrap();
        assert!(abs_diff(&y, &x0) > 1.0);
    }

    #[test]
    fn off_draws_nothing() {
        let x = img(2, 1, 4, 4);
        let mut a = Rng::new(3);
        let y = augment(&x, &AugmentConfig::default(), &mut a).unwrap();
        assert_eq!(a.state(), Rng::new(3).state());
        assert_eq!(abs_diff(&y, &x), 0.0);
    }

    #[test]
    fn cutout_zeroes_a_square() {
        // Side 0.5 of 8 = 4: between 4 (clipped at a corner: 2x2) and 16 zeros per plane.
        let x = img(4, 1, 8, 8);
        let y = cutout(&x, 0.5, &mut Rng::new(1)).unwrap();
        let v: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..4 {
            let z = v[i * 64..(i + 1) * 64]
                .iter()
                .filter(|&&p| p == 0.0)
                .count();
            assert!((4..=16).contains(&z), "image {i}: {z} zeros");
        }
    }
}
