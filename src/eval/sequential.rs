//! Scoring a scene built one object at a time (`model.arch = sequential`, issue 23): how much
//! of the previous image a step keeps.
//!
//! On training scenes rendered by ganscope's own renderer, the pixels that show the previous
//! objects (and their shadows) are known exactly: where the previous image differs from the
//! renderer's empty floor. A step that adds one object should leave them alone, except where
//! the new object covers them, which the real next image shows too. So the measure is the
//! mean absolute change on those pixels, for G's next image (G adding the labelled object to
//! the real previous image) beside the real next image's; and the share of all pixels that
//! change visibly, generated beside real.

use candle_core::{Device, Tensor};

use crate::data::{Dataset, SceneStep};
use crate::error::{Error, Result};
use crate::images::from_u8;
use crate::model::Generator;
use crate::nn::Pass;
use crate::rng::Rng;

/// A pixel belongs to the previous objects when some channel differs from the floor by more
/// than this (in [-1, 1] units: about 10 of 255).
pub const OBJECT_THRESHOLD: f32 = 0.08;
/// A pixel changes visibly between two images when some channel moves by more than this.
pub const CHANGE_THRESHOLD: f32 = 0.08;

/// What a step keeps of the previous image, generated beside real.
#[derive(Debug, Clone, PartialEq)]
pub struct Preservation {
    /// Steps measured (additions to a previous image, not first objects).
    pub steps: usize,
    /// Pixels of previous objects measured, over all steps.
    pub object_pixels: usize,
    /// Mean |next - previous| over the previous objects' pixels and channels: G's next.
    pub object_change_generated: f64,
    /// The same for the real next image (occlusion by the new object, its shadow).
    pub object_change_real: f64,
    /// Share of pixels whose largest channel change exceeds [`CHANGE_THRESHOLD`]: G's next.
    pub changed_share_generated: f64,
    /// The same for the real next image (the new object and its shadow).
    pub changed_share_real: f64,
}

/// Measure up to `n` additions of `data` (chosen with `seed`; only steps with a previous
/// image) with `g`'s step network on CPU in eval mode, one latent per step from `seed`.
/// `floor` is the renderer's empty floor at the data's size (CHW bytes), the ground truth of
/// where the previous objects are.
pub fn preservation(
    g: &Generator,
    data: &dyn Dataset,
    floor: &[u8],
    n: usize,
    seed: u64,
) -> Result<Preservation> {
    let net = g.sequential().ok_or_else(|| {
        Error::Msg(format!(
            "preservation is measured on a sequential generator (model.arch sequential), not {:?}",
            g.cfg.arch
        ))
    })?;
    let (c, h, w) = data.image_shape();
    if floor.len() != c * h * w {
        return Err(Error::Msg(format!(
            "the floor image has {} values, the data's images {c}x{h}x{w}",
            floor.len()
        )));
    }
    let mut steps: Vec<(usize, usize)> = (0..data.len())
        .filter_map(|i| match data.scene_step(i) {
            Some(SceneStep::After { previous }) => Some((i, previous)),
            _ => None,
        })
        .collect();
    if steps.is_empty() {
        return Err(Error::Msg(
            "no image of the data is an addition to a previous one (no scene steps)".into(),
        ));
    }
    Rng::stream(seed, "eval.preservation").shuffle(&mut steps);
    steps.truncate(n.max(1));
    let k = g.cfg.num_conditions;
    let dev = Device::Cpu;
    let dt = g.store.dtype();
    let plane = c * h * w;
    let (mut obj_px, mut gen_sum, mut real_sum) = (0usize, 0f64, 0f64);
    let (mut gen_changed, mut real_changed) = (0usize, 0usize);
    for chunk in steps.chunks(64) {
        let b = chunk.len();
        let mut prev = Vec::with_capacity(b * plane);
        let mut added = Vec::with_capacity(b * k);
        let mut so_far = Vec::with_capacity(b * k);
        for &(i, p) in chunk {
            prev.extend(data.image_u8(p).iter().map(|&v| from_u8(v)));
            let (now, before) = (data.condition(i), data.condition(p));
            added.extend(now.iter().zip(&before).map(|(a, b)| a - b));
            so_far.extend(now);
        }
        let z: Vec<f32> = (0..b).flat_map(|j| g.latent(seed, j)).collect();
        let t = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dt)?)
        };
        let next = net.step(
            &t(prev.clone(), &[b, c, h, w])?,
            &t(z, &[b, g.cfg.z_dim])?,
            &t(added, &[b, k])?,
            &t(so_far, &[b, k])?,
            None,
            Pass::eval(),
        )?;
        let next: Vec<f32> = next
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for (j, &(i, _)) in chunk.iter().enumerate() {
            let pv = &prev[j * plane..(j + 1) * plane];
            let gv = &next[j * plane..(j + 1) * plane];
            let rv: Vec<f32> = data.image_u8(i).iter().map(|&v| from_u8(v)).collect();
            for y in 0..h * w {
                let at = |img: &[f32], ch: usize| img[ch * h * w + y];
                let object = (0..c).any(|ch| {
                    (at(pv, ch) - from_u8(floor[ch * h * w + y])).abs() > OBJECT_THRESHOLD
                });
                let moved = |img: &[f32]| {
                    (0..c)
                        .map(|ch| (at(img, ch) - at(pv, ch)).abs())
                        .fold(0f32, f32::max)
                };
                if moved(gv) > CHANGE_THRESHOLD {
                    gen_changed += 1;
                }
                if moved(&rv) > CHANGE_THRESHOLD {
                    real_changed += 1;
                }
                if object {
                    obj_px += 1;
                    for ch in 0..c {
                        gen_sum += f64::from((at(gv, ch) - at(pv, ch)).abs());
                        real_sum += f64::from((at(&rv, ch) - at(pv, ch)).abs());
                    }
                }
            }
        }
    }
    let total_px = (steps.len() * h * w) as f64;
    let per_obj = (obj_px * c).max(1) as f64;
    Ok(Preservation {
        steps: steps.len(),
        object_pixels: obj_px,
        object_change_generated: gen_sum / per_obj,
        object_change_real: real_sum / per_obj,
        changed_share_generated: gen_changed as f64 / total_px,
        changed_share_real: real_changed as f64 / total_px,
    })
}

#[cfg(test)]
mod tests;
