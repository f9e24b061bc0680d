//! Latent-space tools shared by the explorer and the CLI: a latent + condition as JSON (so a
//! `ganscope sample --latent` call reproduces the image on screen), lerp / slerp
//! interpolation, and principal latent directions in the manner of GANSpace (Härkönen et al.,
//! "GANSpace: Discovering Interpretable GAN Controls", NeurIPS 2020): PCA of G's first
//! feature layer over sampled latents, each component carried back to z by regression.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::metrics::sym_eigen;
use crate::model::Generator;
use crate::rng::Rng;

/// One image's inputs: what "copy latent" puts on the clipboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentSpec {
    /// Preset of the run it came from (informational).
    #[serde(default)]
    pub preset: String,
    /// Training step of the weights on screen (informational).
    #[serde(default)]
    pub step: u64,
    pub z: Vec<f32>,
    /// Condition vector (one-hot, multi-hot or attributes; empty for unconditional models).
    #[serde(default)]
    pub condition: Vec<f32>,
    /// Names of the active labels (informational).
    #[serde(default)]
    pub labels: Vec<String>,
}

impl LatentSpec {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parse pasted or saved JSON; `what` names the source in errors.
    pub fn from_json(text: &str, what: &str) -> Result<Self> {
        let s: Self = serde_json::from_str(text)
            .map_err(|e| Error::Msg(format!("{what}: not a latent JSON ({e})")))?;
        if s.z.iter().chain(&s.condition).any(|v| !v.is_finite()) {
            return Err(Error::Msg(format!("{what}: the latent holds a NaN or Inf")));
        }
        Ok(s)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::checkpoint::read_regular(path)
            .and_then(|b| {
                String::from_utf8(b)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Check lengths against a generator.
    pub fn check(&self, g: &Generator, what: &str) -> Result<()> {
        let (zd, k) = (g.cfg.z_dim, g.cfg.num_conditions);
        if self.z.len() != zd || self.condition.len() != k {
            return Err(Error::Msg(format!(
                "{what}: latent of length {} with {} labels, the model wants {zd} and {k}",
                self.z.len(),
                self.condition.len()
            )));
        }
        Ok(())
    }
}

/// `n` points from `a` to `b` inclusive; slerp follows the great circle between the two
/// directions with the norm interpolated linearly (falls back to lerp for (anti)parallel
/// vectors).
pub fn interpolate(a: &[f32], b: &[f32], n: usize, slerp: bool) -> Vec<Vec<f32>> {
    let n = n.max(2);
    (0..n)
        .map(|i| {
            let t = i as f32 / (n - 1) as f32;
            if slerp {
                slerp_at(a, b, t)
            } else {
                lerp_at(a, b, t)
            }
        })
        .collect()
}

pub fn lerp_at(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + (y - x) * t).collect()
}

pub fn slerp_at(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    let na = a.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    if na < 1e-12 || nb < 1e-12 {
        return lerp_at(a, b, t);
    }
    let dot = a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>() / (na * nb);
    let omega = dot.clamp(-1.0, 1.0).acos();
    let so = omega.sin();
    if so.abs() < 1e-6 {
        return lerp_at(a, b, t);
    }
    let t = t as f64;
    let (wa, wb) = (((1.0 - t) * omega).sin() / so, (t * omega).sin() / so);
    let norm = na + (nb - na) * t;
    a.iter()
        .zip(b)
        .map(|(x, y)| ((wa * (*x as f64) / na + wb * (*y as f64) / nb) * norm) as f32)
        .collect()
}

/// Column captions of a scene's sequence: "floor", then "+ red cube", ... for `order`.
pub fn scene_captions(names: &[String], order: &[usize]) -> Vec<String> {
    let mut c = vec!["floor".to_string()];
    c.extend(order.iter().map(|&l| {
        format!(
            "+ {}",
            names
                .get(l)
                .cloned()
                .unwrap_or_else(|| format!("label {l}"))
        )
    }));
    c
}

/// A scene built one object at a time (sequential generators), `n` times: row j uses the
/// latent `latent(seed, j)`; its columns are the floor and the image after each object of
/// `order` (label indices, in the order they are added). Returns the images row by row
/// (n x (1 + order.len())) and the column captions ("floor", "+ red cube", ...).
pub fn scene_strip(
    g: &Generator,
    order: &[usize],
    n: usize,
    seed: u64,
) -> Result<(crate::images::Images, Vec<String>)> {
    let names = &g.cfg.label_names;
    if let Some(&bad) = order.iter().find(|&&l| l >= g.cfg.num_conditions) {
        return Err(Error::Msg(format!(
            "label {bad} in a scene (the model has K = {})",
            g.cfg.num_conditions
        )));
    }
    let z: Vec<Vec<f32>> = (0..n).map(|j| g.latent(seed, j)).collect();
    let steps = g.scene_from(&z, &vec![order.to_vec(); n])?;
    let first = &steps[0];
    let mut data = Vec::with_capacity(n * steps.len() * first.image_len());
    for row in 0..n {
        for s in &steps {
            data.extend_from_slice(s.image(row));
        }
    }
    let captions = scene_captions(names, order);
    Ok((
        crate::images::Images {
            n: n * steps.len(),
            channels: first.channels,
            height: first.height,
            width: first.width,
            data,
        },
        captions,
    ))
}

/// Principal latent directions: `k` unit vectors in z-space, strongest first, with the share
/// of first-layer variance each explains. `n` latents (with condition `c`) are pushed through
/// G's first feature layer; PCA of those activations via the n x n Gram matrix; component j's
/// scores x_j are regressed on z (u_j = Z^T x_j / |x_j|^2, since the scores are orthogonal),
/// then normalised.
pub fn latent_directions(
    g: &Generator,
    c: &[f32],
    n: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<(Vec<f32>, f64)>> {
    let zd = g.cfg.z_dim;
    if c.len() != g.cfg.num_conditions {
        return Err(Error::Msg(format!(
            "condition of length {} (the model has K = {})",
            c.len(),
            g.cfg.num_conditions
        )));
    }
    let n = n.max(k + 2);
    let mut rng = Rng::stream(seed, "explore.directions");
    let z: Vec<Vec<f32>> = (0..n)
        .map(|_| rng.normal_vec(zd).into_iter().map(|v| v as f32).collect())
        .collect();
    let dev = g.device();
    let zt = Tensor::from_vec(z.concat(), (n, zd), dev)?;
    let ct = Tensor::from_vec(c.repeat(n), (n, c.len()), dev)?;
    let f = g.first_features(&zt, &ct)?.to_dtype(DType::F64)?; // (n, F)
    let f = f.broadcast_sub(&f.mean_keepdim(0)?)?;
    let gram: Vec<Vec<f64>> = f.matmul(&f.t()?)?.to_vec2()?; // (n, n)
    let (vals, vecs) = sym_eigen(&gram);
    let total: f64 = vals.iter().filter(|v| **v > 0.0).sum::<f64>().max(1e-30);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]));
    let mut out = Vec::with_capacity(k);
    for &j in order.iter().take(k) {
        if vals[j] <= 1e-12 * total {
            break;
        }
        // Scores of component j: x = sqrt(lambda) * v_j; u = Z^T x / |x|^2 = Z^T v / sqrt(lambda).
        let mut u = vec![0f64; zd];
        for (i, zi) in z.iter().enumerate() {
            let w = vecs[i][j];
            for (d, zv) in zi.iter().enumerate() {
                u[d] += w * *zv as f64;
            }
        }
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
        out.push((
            u.iter().map(|x| (x / norm) as f32).collect(),
            vals[j] / total,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_keeps_norm_between_orthogonal_unit_vectors() {
        // a = e1, b = e2: slerp(t) = (cos(t pi/2), sin(t pi/2)), norm 1 throughout; lerp's
        // midpoint has norm sqrt(0.5).
        let (a, b) = (vec![1.0, 0.0], vec![0.0, 1.0]);
        let s = interpolate(&a, &b, 3, true);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((s[1][0] - h).abs() < 1e-6 && (s[1][1] - h).abs() < 1e-6);
        assert_eq!(s[0], a);
        assert!((s[2][0]).abs() < 1e-6 && (s[2][1] - 1.0).abs() < 1e-6);
        let l = interpolate(&a, &b, 3, false);
        assert_eq!(l[1], vec![0.5, 0.5]);
    }

    #[test]
    fn latent_json_round_trip_and_errors() {
        let s = LatentSpec {
            preset: "p".into(),
            step: 3,
            z: vec![0.5, -1.0],
            condition: vec![1.0, 0.0],
            labels: vec!["a".into()],
        };
        assert_eq!(LatentSpec::from_json(&s.to_json(), "clip").unwrap(), s);
        let e = LatentSpec::from_json("{\"z\": [1, 2", "clipboard").unwrap_err();
        assert!(
            e.to_string().starts_with("clipboard: not a latent JSON"),
            "{e}"
        );
    }
}
