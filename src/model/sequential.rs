//! Scene-by-scene generation (issue 23, the task as seed 003 reframed it): the generator takes
//! the previous image and one object to add and draws the next image; a scene is built by
//! adding its objects one at a time, starting from an empty floor. Iterative generation with a
//! discriminator that judges the (previous, next) pair follows GeNeVA (El-Nouby et al., "Tell,
//! Draw, and Repeat: Generating and Modifying Images Based on Continual Linguistic
//! Instruction", ICCV 2019); drawing the addition as a colour layer with a mask composited over
//! the previous image follows LR-GAN (Yang et al., ICLR 2017), which keeps what was there
//! unless the new object covers it.
//!
//! One step: an encoder reads the previous image to a feature vector; a cBN DCGAN network
//! (`DcganGenerator` with C + 1 output channels) sees z and the condition [object to add
//! (one-hot), labels so far (multi-hot, the carried state), the previous image's features] and
//! outputs a colour image and a mask logit; a 3x3 convolution over [that output, the previous
//! image] corrects the mask where the previous image has objects (occlusion); the next image is
//! `prev * (1 - a) + tanh(colour) * a` with `a = sigmoid(mask)`. The empty floor is a fixed
//! image saved with the weights (`floor`, a buffer): the trainer sets it to the per-pixel
//! median of the data's first-step images (one small object each at a random place, so the
//! median is the empty floor), for real i-CLEVR folders as for the renderer's. Step j uses z rotated by `j * z_dim / g_object_layers` (as the layered
//! generator does), so one latent draws a whole scene.
//!
//! The discriminator is the DCGAN discriminator on the pair (previous and next stacked as 2C
//! channels) with 2K conditions [object added, labels so far]: its projection term and
//! auxiliary head judge "the named object was added" and the scene's contents.
//!
//! `forward(z, c)` builds the scene of `c` in label-index order, so sampling, the explorer,
//! `eval` and the diagnostics treat it like any generator; [`SequentialGenerator::scene`]
//! builds it in a given order and returns every step.

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::ops::LeakyRelu;
use crate::model::base_size;
use crate::model::dcgan::DcganGenerator;
use crate::model::layered::{host_rows, on_device};
use crate::model::num_resamples;
use crate::nn::{Conv2d, LayerOpts, Linear, Pass, WeightInit};
use crate::params::{Init, Vb};

/// Condition entries at or below this add no object.
const PRESENT: f64 = 1e-6;
/// Mask logit added where an image has no object to add at a step: sigmoid(-30) ~ 1e-13.
const ABSENT_LOGIT: f64 = -30.0;
/// Length of the previous image's feature vector.
pub const PREV_FEATURES: usize = 64;

/// The config of the pair discriminator: previous and next image stacked (2C channels),
/// conditions [object added, labels so far] (2K).
pub fn pair_config(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        channels: 2 * cfg.channels,
        num_conditions: 2 * cfg.num_conditions,
        g_object_layers: 0,
        ..cfg.clone()
    }
}

/// One object to add: its label and its weight (1 for a present label; a fraction for an
/// interpolated condition, which scales the mask by adding `ln w` to its logit).
pub type Addition = (usize, f64);

#[derive(Debug, Clone)]
pub struct SequentialGenerator {
    /// The previous image down to the base size: Conv(k4, s2, p1) + LeakyReLU each.
    encoder: Vec<Conv2d>,
    /// Flattened encoder output -> [`PREV_FEATURES`].
    encode: Linear,
    /// z (rotated) and [added, so far, features] -> (C + 1, H, W): colour before tanh and
    /// mask logit.
    layer: DcganGenerator,
    /// [layer output, previous image] -> a correction of the mask logit (3x3).
    occlusion: Conv2d,
    /// The empty floor, (1, C, H, W) in [-1, 1] (no gradient; set from the data).
    floor: candle_core::Var,
    z_dim: usize,
    shift: usize,
    channels: usize,
    k: usize,
}

impl SequentialGenerator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let k = cfg.num_conditions;
        let (c, s) = (cfg.channels, cfg.image_size);
        let opts = LayerOpts {
            bias: true,
            spectral_norm: cfg.g_spectral_norm,
            init: WeightInit::Dcgan,
        };
        let width = (cfg.g_ch / 2).max(4);
        let mut encoder = Vec::new();
        let mut cin = c;
        for level in 0..num_resamples(s) {
            let cout = width << level;
            encoder.push(Conv2d::new(
                cin,
                cout,
                4,
                2,
                1,
                opts,
                vb.pp("encoder").pp(level),
            )?);
            cin = cout;
        }
        let s0 = base_size(s);
        let encode = Linear::new(cin * s0 * s0, PREV_FEATURES, opts, vb.pp("encode"))?;
        let layer_cfg = ModelConfig {
            channels: c + 1,
            num_conditions: 2 * k + PREV_FEATURES,
            g_object_layers: 0,
            ..cfg.clone()
        };
        Ok(Self {
            encoder,
            encode,
            layer: DcganGenerator::new(&layer_cfg, vb.pp("layer"))?,
            occlusion: Conv2d::new(2 * c + 1, 1, 3, 1, 1, opts, vb.pp("occlusion"))?,
            floor: vb.buffer("floor", &[1, c, s, s], Init::Const(0.0))?,
            z_dim: cfg.z_dim,
            shift: (cfg.z_dim / cfg.g_object_layers.max(1)).max(1),
            channels: c,
            k,
        })
    }

    /// The empty floor, (1, C, H, W) in [-1, 1].
    pub fn floor(&self) -> Result<Tensor> {
        Ok(self.floor.as_tensor().clone())
    }

    /// Set the empty floor: `values` (C * H * W, CHW, in [-1, 1]).
    pub fn set_floor(&self, values: &[f32]) -> Result<()> {
        let t = self.floor.as_tensor();
        if values.len() != t.elem_count() {
            return Err(Error::Msg(format!(
                "a floor of {} values for a {:?} image",
                values.len(),
                t.dims()
            )));
        }
        let new = Tensor::from_slice(values, t.dims(), t.device())?.to_dtype(t.dtype())?;
        Ok(self.floor.set(&new)?)
    }

    /// z rotated for step `j`: entry d of the result is z[(d + j * shift) mod Z] (what
    /// [`Self::scene`] hands step `j`).
    pub fn rotated(&self, z: &Tensor, j: usize) -> Result<Tensor> {
        let r = (j * self.shift) % self.z_dim;
        if r == 0 {
            return Ok(z.clone());
        }
        Ok(Tensor::cat(
            &[z.narrow(1, r, self.z_dim - r)?, z.narrow(1, 0, r)?],
            1,
        )?)
    }

    /// The previous image's features, (B, F).
    fn encode_prev(&self, prev: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut h = prev.clone();
        for conv in &self.encoder {
            h = conv.forward_act(&h, pass, LeakyRelu::LEAKY)?;
        }
        self.encode.forward(&h.flatten_from(1)?, pass)
    }

    /// One step: prev (B, C, H, W), z (B, Z) (already rotated for the step), added (B, K)
    /// one-hot (or zero), so_far (B, K) including the added object, `log_weight` (B, 1, 1, 1)
    /// added to the mask logit (`None`: 0) -> the next image (B, C, H, W).
    pub fn step(
        &self,
        prev: &Tensor,
        z: &Tensor,
        added: &Tensor,
        so_far: &Tensor,
        log_weight: Option<&Tensor>,
        pass: Pass,
    ) -> Result<Tensor> {
        let ch = self.channels;
        let feats = self.encode_prev(prev, pass)?;
        let cond = Tensor::cat(&[added, so_far, &feats], 1)?;
        let raw = self.layer.forward_raw(z, &cond, pass)?; // (B, C + 1, H, W)
        let fix = self
            .occlusion
            .forward(&Tensor::cat(&[&raw, prev], 1)?, pass)?;
        let mut m = (raw.narrow(1, ch, 1)? + fix)?; // (B, 1, H, W)
        if let Some(lw) = log_weight {
            m = m.broadcast_add(lw)?;
        }
        // a = sigmoid(m) as a two-way softmax against 0 with the max shifted out (no overflow
        // and no NaN gradient for very negative logits).
        let top = m.relu()?.detach();
        let (e0, e1) = (top.neg()?.exp()?, (&m - &top)?.exp()?);
        let a = (&e1 / (&e0 + &e1)?)?;
        let colour = raw.narrow(1, 0, ch)?.tanh()?;
        let keep = a.affine(-1.0, 1.0)?;
        Ok((prev.broadcast_mul(&keep)? + colour.broadcast_mul(&a)?)?)
    }

    /// Build each image's scene from the floor, adding `orders[i]`'s objects in turn; returns
    /// the image after every step (`max_len` tensors of (B, C, H, W); an image with fewer
    /// objects stays as it is in the later steps).
    pub fn scene(&self, z: &Tensor, orders: &[Vec<Addition>], pass: Pass) -> Result<Vec<Tensor>> {
        self.scene_latents(std::slice::from_ref(z), orders, pass)
    }

    /// [`Self::scene`] with a latent per step: step j uses `zs[j]` (the last one for later
    /// steps), rotated as usual, so re-drawing one step's noise leaves the earlier steps as
    /// they were.
    pub fn scene_latents(
        &self,
        zs: &[Tensor],
        orders: &[Vec<Addition>],
        pass: Pass,
    ) -> Result<Vec<Tensor>> {
        let z = zs
            .first()
            .ok_or_else(|| Error::Msg("a scene needs at least one latent".into()))?;
        let b = z.dim(0)?;
        if orders.len() != b {
            return Err(Error::Msg(format!(
                "{} object sequences for {b} latents",
                orders.len()
            )));
        }
        let (k, dt, dev) = (self.k, z.dtype(), z.device());
        if let Some(&(l, _)) = orders.iter().flatten().find(|(l, _)| *l >= k) {
            return Err(Error::Msg(format!(
                "object {l} in a sequence (the model has K = {k})"
            )));
        }
        let fl = self.floor()?;
        let (ch, s) = (self.channels, fl.dim(2)?);
        let mut prev = fl.broadcast_as((b, ch, s, s))?.contiguous()?;
        let n = orders.iter().map(Vec::len).max().unwrap_or(0);
        let mut so_far = vec![0f64; b * k];
        let mut out = Vec::with_capacity(n);
        for j in 0..n {
            let mut added = vec![0f64; b * k];
            let mut lw = vec![ABSENT_LOGIT; b];
            for (i, order) in orders.iter().enumerate() {
                if let Some(&(l, w)) = order.get(j) {
                    added[i * k + l] = 1.0;
                    so_far[i * k + l] = w.min(1.0);
                    lw[i] = w.clamp(PRESENT, 1.0).ln();
                }
            }
            let added = on_device(added, &[b, k], dt, dev)?;
            let sf = on_device(so_far.clone(), &[b, k], dt, dev)?;
            let lw = on_device(lw, &[b, 1, 1, 1], dt, dev)?;
            let zj = &zs[j.min(zs.len() - 1)];
            prev = self.step(&prev, &self.rotated(zj, j)?, &added, &sf, Some(&lw), pass)?;
            out.push(prev.clone());
        }
        Ok(out)
    }

    /// The objects of condition rows in label-index order (entries above [`PRESENT`]).
    fn orders(c: &[Vec<f64>]) -> Vec<Vec<Addition>> {
        c.iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(_, v)| **v > PRESENT)
                    .map(|(l, v)| (l, *v))
                    .collect()
            })
            .collect()
    }

    /// z: (B, Z), c: (B, K) -> (B, C, H, W) in [-1, 1]: each scene built in label-index order
    /// (the floor where c is empty).
    pub fn forward(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let orders = Self::orders(&host_rows(c)?);
        match self.scene(z, &orders, pass)?.pop() {
            Some(last) => Ok(last),
            None => {
                let fl = self.floor()?;
                let (b, s) = (z.dim(0)?, fl.dim(2)?);
                Ok(fl.broadcast_as((b, self.channels, s, s))?.contiguous()?)
            }
        }
    }

    /// The step network's first features for each image's first object (eval mode), (B, F);
    /// zeros for an image without objects.
    pub fn first_features(&self, z: &Tensor, c: &Tensor) -> Result<Tensor> {
        let rows = host_rows(c)?;
        let orders = Self::orders(&rows);
        let b = z.dim(0)?;
        let (k, dt, dev) = (self.k, z.dtype(), z.device());
        let mut added = vec![0f64; b * k];
        for (i, o) in orders.iter().enumerate() {
            if let Some(&(l, _)) = o.first() {
                added[i * k + l] = 1.0;
            }
        }
        let added = on_device(added, &[b, k], dt, dev)?;
        let fl = self.floor()?;
        let (ch, s) = (self.channels, fl.dim(2)?);
        let prev = fl.broadcast_as((b, ch, s, s))?.contiguous()?;
        let feats = self.encode_prev(&prev, Pass::eval())?;
        let cond = Tensor::cat(&[&added, &added, &feats], 1)?;
        let f = self.layer.first_features(z, &cond)?;
        let any: Vec<f64> = orders
            .iter()
            .map(|o| f64::from(u8::from(!o.is_empty())))
            .collect();
        let any = on_device(any, &[b, 1], f.dtype(), dev)?;
        Ok(f.broadcast_mul(&any)?)
    }

    /// The floor as the "previous image" of a batch's first steps, detached, (B, C, H, W).
    pub fn floor_batch(&self, b: usize) -> Result<Tensor> {
        let fl = self.floor()?;
        let (ch, s) = (self.channels, fl.dim(2)?);
        Ok(fl.broadcast_as((b, ch, s, s))?.contiguous()?)
    }

    /// The floor in the rows of `prev` where `first` is 1: a training batch's previous
    /// images, real for later steps and the floor for first steps.
    pub fn with_floor(&self, prev: &Tensor, first: &[bool]) -> Result<Tensor> {
        let b = prev.dim(0)?;
        let mask: Vec<f64> = first.iter().map(|f| f64::from(u8::from(*f))).collect();
        let m = on_device(mask, &[b, 1, 1, 1], prev.dtype(), prev.device())?;
        let fl = self.floor()?;
        Ok((prev.broadcast_mul(&m.affine(-1.0, 1.0)?)? + fl.broadcast_mul(&m)?)?)
    }
}

#[cfg(test)]
mod tests;
