//! Object-layer generator: every label of the condition is drawn as its own layer (colour and a
//! mask logit) by one shared DCGAN generator, and the layers are composited over a learned
//! background by a per-pixel softmax. Layered generation in the spirit of LR-GAN (Yang, Kannan,
//! Batra & Parikh, "LR-GAN: Layered Recursive Generative Adversarial Networks for Image
//! Generation", ICLR 2017), without its spatial transformers: each layer is drawn at full size,
//! so the shared network places its object itself.
//!
//! A layer's network sees the one label it draws (one-hot) and the whole condition (what else is
//! in the scene), through conditional BatchNorm and the embedding concatenated to its latent
//! (`DcganGenerator` with 2K conditions and C + 1 output channels). Layer j of an image uses z
//! rotated by `j * z_dim / g_object_layers`, so its own chunk of z comes first and the other
//! layers' chunks follow in a fixed order (the layers of an image can avoid each other).
//!
//! A condition entry `p` in (0, 1) (an interpolation between conditions) weighs its layer by
//! adding `ln p` to its mask logit; entries <= 1e-6 draw nothing. With no label at all the image
//! is the background.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::dcgan::DcganGenerator;
use crate::nn::Pass;
use crate::params::{Init, Vb};

/// Condition entries at or below this draw no layer.
const PRESENT: f64 = 1e-6;
/// Mask logit of the padding layers (images with fewer labels than the batch's most):
/// exp(-30) ~ 1e-13 of the weight.
const ABSENT_LOGIT: f64 = -30.0;

#[derive(Debug, Clone)]
pub struct LayeredGenerator {
    /// Draws one layer: z (rotated) and [one-hot label, c] -> (C + 1, H, W), colour before
    /// tanh and mask logit.
    layer: DcganGenerator,
    /// The background's colour before tanh, (1, C, H, W).
    background: Tensor,
    z_dim: usize,
    /// Rotation of z per layer.
    shift: usize,
    channels: usize,
    k: usize,
}

/// c: (B, K) on any device as rows of f64 on the host (Metal has no f64: convert on the CPU).
pub(crate) fn host_rows(c: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(c.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec2()?)
}

/// f64 values as a tensor of `dt` on `dev`, converted on the CPU (exact for f64 tests, and
/// no f64 tensor on a device without f64).
pub(crate) fn on_device(v: Vec<f64>, shape: &[usize], dt: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?)
}

/// Where the layers of a batch come from: one row per (image, present label).
struct Layout {
    /// Image of each layer.
    image: Vec<usize>,
    /// Label of each layer.
    label: Vec<usize>,
    /// ln of the condition entry of each layer.
    log_weight: Vec<f64>,
    /// Position of the layer within its image (0, 1, ..).
    slot: Vec<usize>,
    /// Most layers in one image.
    max_slots: usize,
}

impl Layout {
    fn new(c: &[Vec<f64>]) -> Self {
        let mut l = Layout {
            image: vec![],
            label: vec![],
            log_weight: vec![],
            slot: vec![],
            max_slots: 0,
        };
        for (b, row) in c.iter().enumerate() {
            let mut j = 0;
            for (k, &v) in row.iter().enumerate() {
                if v > PRESENT {
                    l.image.push(b);
                    l.label.push(k);
                    l.log_weight.push(v.min(1.0).ln());
                    l.slot.push(j);
                    j += 1;
                }
            }
            l.max_slots = l.max_slots.max(j);
        }
        l
    }

    /// For each of `b` images x `max_slots` positions, the row of its layer among the `M`
    /// layers, or `M` (the padding row) where the image has fewer layers.
    fn pick(&self, b: usize, dev: &Device) -> Result<Tensor> {
        let (m, n) = (self.image.len(), self.max_slots);
        let mut pick = vec![m as u32; b * n];
        for i in 0..m {
            pick[self.image[i] * n + self.slot[i]] = i as u32;
        }
        Ok(Tensor::from_vec(pick, b * n, dev)?)
    }
}

impl LayeredGenerator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let k = cfg.num_conditions;
        let layer_cfg = ModelConfig {
            channels: cfg.channels + 1,
            num_conditions: 2 * k,
            g_object_layers: 0,
            ..cfg.clone()
        };
        let s = cfg.image_size;
        Ok(Self {
            layer: DcganGenerator::new(&layer_cfg, vb.pp("layer"))?,
            background: vb.param("background", &[1, cfg.channels, s, s], Init::Const(0.0))?,
            z_dim: cfg.z_dim,
            shift: (cfg.z_dim / cfg.g_object_layers.max(1)).max(1),
            channels: cfg.channels,
            k,
        })
    }

    /// The layer network's inputs: rotated latents (M, Z) and conditions (M, 2K).
    fn layer_inputs(&self, z: &Tensor, lay: &Layout, c: &[Vec<f64>]) -> Result<(Tensor, Tensor)> {
        let (zd, k) = (self.z_dim, self.k);
        let m = lay.image.len();
        let mut idx = Vec::with_capacity(m * zd);
        let mut cond = Vec::with_capacity(m * 2 * k);
        for i in 0..m {
            let (b, j) = (lay.image[i], lay.slot[i]);
            let rot = j * self.shift;
            idx.extend((0..zd).map(|d| (b * zd + (d + rot) % zd) as u32));
            let mut own = vec![0f64; k];
            own[lay.label[i]] = 1.0;
            cond.extend(own);
            cond.extend_from_slice(&c[b]);
        }
        let dev = z.device();
        let idx = Tensor::from_vec(idx, m * zd, dev)?;
        let zs = z.flatten_all()?.index_select(&idx, 0)?.reshape((m, zd))?;
        let cond = on_device(cond, &[m, 2 * k], z.dtype(), dev)?;
        Ok((zs, cond))
    }

    /// z: (B, Z), c: (B, K) -> (B, C, H, W) in [-1, 1]
    pub fn forward(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let b = z.dim(0)?;
        let cv = host_rows(c)?;
        let lay = Layout::new(&cv);
        let bg = self.background.tanh()?; // (1, C, H, W)
        let (ch, s) = (self.channels, bg.dim(2)?);
        if lay.image.is_empty() {
            return Ok(bg.broadcast_as((b, ch, s, s))?.contiguous()?);
        }
        let m = lay.image.len();
        let (zs, cond) = self.layer_inputs(z, &lay, &cv)?;
        let raw = self.layer.forward_raw(&zs, &cond, pass)?; // (M, C + 1, H, W)
        let dev = raw.device();
        let dt = raw.dtype();
        let lw = on_device(lay.log_weight.clone(), &[m, 1, 1, 1], dt, dev)?;
        let layers = Tensor::cat(
            &[
                raw.narrow(1, 0, ch)?.tanh()?,
                raw.narrow(1, ch, 1)?.broadcast_add(&lw)?,
            ],
            1,
        )?; // (M, C + 1, H, W)
        // Row M: the padding layer (no colour, no weight).
        let pad = Tensor::cat(
            &[
                Tensor::zeros((1, ch, s, s), dt, dev)?,
                on_device(vec![ABSENT_LOGIT; s * s], &[1, 1, s, s], dt, dev)?,
            ],
            1,
        )?;
        let layers = Tensor::cat(&[&layers, &pad], 0)?; // (M + 1, C + 1, H, W)
        let n = lay.max_slots;
        let layers = layers
            .index_select(&lay.pick(b, dev)?, 0)?
            .reshape((b, n, ch + 1, s, s))?;
        let back = Tensor::cat(&[&bg, &Tensor::zeros((1, 1, s, s), dt, dev)?], 1)?
            .unsqueeze(0)?
            .broadcast_as((b, 1, ch + 1, s, s))?;
        let all = Tensor::cat(&[&back, &layers], 1)?; // (B, N + 1, C + 1, H, W)
        let logits = all.narrow(2, ch, 1)?; // (B, N + 1, 1, H, W)
        // Softmax over the layers; the max is a constant shift (no gradient through it).
        let top = logits.max_keepdim(1)?.detach();
        let e = logits.broadcast_sub(&top)?.exp()?;
        let w = e.broadcast_div(&e.sum_keepdim(1)?)?;
        let img = all.narrow(2, 0, ch)?.broadcast_mul(&w)?.sum(1)?; // (B, C, H, W)
        Ok(img)
    }

    /// The layer network's first features for each image's layers, padded with zeros to the
    /// batch's most layers and concatenated: (B, N * F).
    pub fn first_features(&self, z: &Tensor, c: &Tensor) -> Result<Tensor> {
        let b = z.dim(0)?;
        let cv = host_rows(c)?;
        let lay = Layout::new(&cv);
        if lay.image.is_empty() {
            return Ok(Tensor::zeros((b, 1), z.dtype(), z.device())?);
        }
        let (zs, cond) = self.layer_inputs(z, &lay, &cv)?;
        let f = self.layer.first_features(&zs, &cond)?; // (M, F)
        let fd = f.dim(1)?;
        // Row M: zeros for the padding positions.
        let f = Tensor::cat(&[&f, &Tensor::zeros((1, fd), f.dtype(), f.device())?], 0)?;
        let picked = f.index_select(&lay.pick(b, f.device())?, 0)?;
        Ok(picked.reshape((b, lay.max_slots * fd))?)
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;
    use crate::config::Conditioning;
    use crate::data::ConditionKind;
    use crate::params::ParamStore;
    use crate::rng::Rng;
    use candle_core::Device;

    fn cfg() -> ModelConfig {
        ModelConfig {
            image_size: 32,
            channels: 3,
            num_conditions: 4,
            condition_kind: ConditionKind::MultiHot,
            conditioning: Conditioning::Projection,
            z_dim: 6,
            cond_embed: 3,
            g_ch: 4,
            g_cond_bn: true,
            g_object_layers: 3,
            ..ModelConfig::default()
        }
    }

    fn build(dt: DType) -> (ParamStore, LayeredGenerator) {
        let store = ParamStore::new(Rng::new(7), dt, &Device::Cpu);
        let g = LayeredGenerator::new(&cfg(), store.root("gen")).unwrap();
        // A background that is not flat, so that it shows in the composite.
        let bg = store.get("gen.background").unwrap();
        let v: Vec<f64> = (0..3 * 32 * 32)
            .map(|i| ((i % 7) as f64 - 3.0) * 0.2)
            .collect();
        bg.set(
            &Tensor::from_vec(v, (1, 3, 32, 32), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        (store, g)
    }

    fn z(b: usize) -> Tensor {
        let v: Vec<f64> = Rng::new(3).normal_vec(b * 6);
        Tensor::from_vec(v, (b, 6), &Device::Cpu).unwrap()
    }

    /// The composite computed by hand: per pixel, weights softmax(0 for the background,
    /// logit + ln p for each present label's layer), colours tanh of the raw output.
    fn by_hand(g: &LayeredGenerator, z: &Tensor, c: &[Vec<f64>]) -> Vec<f64> {
        let (b, zd, k, s) = (c.len(), 6, 4, 32);
        let zv: Vec<Vec<f64>> = z.to_vec2().unwrap();
        let bg: Vec<f64> = g
            .background
            .tanh()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut out = vec![0f64; b * 3 * s * s];
        for img in 0..b {
            // This image's layers, each run through the layer network alone.
            let mut layers = vec![];
            for (j, lab) in (0..k).filter(|&l| c[img][l] > PRESENT).enumerate() {
                let rot: Vec<f64> = (0..zd).map(|d| zv[img][(d + j * 2) % zd]).collect();
                let mut cond = vec![0f64; k];
                cond[lab] = 1.0;
                cond.extend(&c[img]);
                let zt = Tensor::from_vec(rot, (1, zd), &Device::Cpu).unwrap();
                let ct = Tensor::from_vec(cond, (1, 2 * k), &Device::Cpu).unwrap();
                let raw: Vec<f64> = g
                    .layer
                    .forward_raw(&zt, &ct, Pass::eval())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                layers.push((raw, c[img][lab].ln()));
            }
            for p in 0..s * s {
                let mut logits = vec![0.0];
                logits.extend(layers.iter().map(|(r, lw)| r[3 * s * s + p] + lw));
                let top = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                for ch in 0..3 {
                    let mut v = e[0] * bg[ch * s * s + p];
                    for (i, (r, _)) in layers.iter().enumerate() {
                        v += e[i + 1] * r[ch * s * s + p].tanh();
                    }
                    out[((img * 3) + ch) * s * s + p] = v / sum;
                }
            }
        }
        out
    }

    #[test]
    fn the_composite_matches_a_hand_computation() {
        let (_store, g) = build(DType::F64);
        // Images with 2, 1, 3 and no labels, and one interpolated condition (weights 0.3/0.7).
        let c = vec![
            vec![1.0, 0.0, 1.0, 0.0],
            vec![0.0, 1.0, 0.0, 0.0],
            vec![1.0, 1.0, 0.0, 1.0],
            vec![0.0, 0.0, 0.0, 0.0],
            vec![0.3, 0.0, 0.0, 0.7],
        ];
        let zt = z(c.len());
        let ct = Tensor::from_vec(c.concat(), (c.len(), 4), &Device::Cpu).unwrap();
        let got: Vec<f64> = g
            .forward(&zt, &ct, Pass::eval())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = by_hand(&g, &zt, &c);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "largest difference {worst}");
        // The label-free image is the background; every value is a colour in [-1, 1].
        let bg: Vec<f64> = g
            .background
            .tanh()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // (to 1e-12: the padding layers of a batch with more labels weigh exp(-30) each)
        let off = got[3 * 3072..4 * 3072]
            .iter()
            .zip(&bg)
            .map(|(a, b)| (a - b).abs());
        assert!(off.fold(0.0, f64::max) < 1e-12);
        assert!(got.iter().all(|v| v.abs() <= 1.0));
        // A second layer changes the image: labels drawn, not ignored.
        assert!(
            got[..3072]
                .iter()
                .zip(&bg)
                .any(|(a, b)| (a - b).abs() > 1e-3)
        );
    }

    #[test]
    fn layers_of_one_image_get_different_latents_and_images_stay_independent() {
        let (_store, g) = build(DType::F64);
        let c = vec![vec![1.0, 1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0, 0.0]];
        let lay = Layout::new(&c);
        assert_eq!(
            (lay.image.clone(), lay.slot.clone(), lay.max_slots),
            (vec![0, 0, 1], vec![0, 1, 0], 2)
        );
        let zt = z(2);
        let (zs, _) = g.layer_inputs(&zt, &lay, &c).unwrap();
        let zs: Vec<Vec<f64>> = zs.to_vec2().unwrap();
        let zv: Vec<Vec<f64>> = zt.to_vec2().unwrap();
        // Layer 1 of image 0 sees z rotated by z_dim / g_object_layers = 2.
        assert_eq!(zs[0], zv[0]);
        assert_eq!(
            zs[1],
            vec![zv[0][2], zv[0][3], zv[0][4], zv[0][5], zv[0][0], zv[0][1]]
        );
        assert_eq!(zs[2], zv[1]);
        // In eval mode, image 1 does not depend on what image 0 holds.
        let one = |c0: Vec<f64>| -> Vec<f64> {
            let ct = Tensor::from_vec([c0, c[1].clone()].concat(), (2, 4), &Device::Cpu).unwrap();
            let out = g.forward(&zt, &ct, Pass::eval()).unwrap();
            out.get(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (one(vec![1.0, 1.0, 1.0, 0.0]), one(vec![0.0, 0.0, 0.0, 1.0]));
        let off = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(off < 1e-12, "image 1 changed by {off}");
        // First features: each image's layers side by side, zeros where it has fewer.
        let ct = Tensor::from_vec(c.concat(), (2, 4), &Device::Cpu).unwrap();
        let f: Vec<Vec<f64>> = g.first_features(&zt, &ct).unwrap().to_vec2().unwrap();
        let half = f[0].len() / 2;
        assert!(f[0][..half].iter().any(|v| *v != 0.0) && f[0][half..].iter().any(|v| *v != 0.0));
        assert!(f[1][half..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn gradients_match_finite_differences() {
        // d sum(r * G(z, c)) / d theta for the background and the layer network's last
        // weights, against central differences (f64, training mode: batch statistics).
        let (store, g) = build(DType::F64);
        let c = [vec![1.0, 0.0, 1.0, 0.0], vec![0.0, 0.0, 0.0, 0.6]];
        let zt = z(2);
        let ct = Tensor::from_vec(c.concat(), (2, 4), &Device::Cpu).unwrap();
        let r = Tensor::from_vec(
            Rng::new(9).normal_vec(2 * 3 * 32 * 32),
            (2, 3, 32, 32),
            &Device::Cpu,
        )
        .unwrap();
        crate::model::test_util::assert_param_gradients(
            &store,
            &["gen.background", "gen.layer.out.weight"],
            1e-5,
            || {
                (g.forward(&zt, &ct, Pass::train()).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            },
        );
    }
}
