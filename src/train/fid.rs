//! FID during training (`monitor.fid_every`): every N generator steps, pytorch-fid's FID
//! ([`crate::eval::fid`], [`crate::eval::frechet`]) between `fid_n_generated` images of the
//! sampling generator (conditions drawn from the data, noise from a stream fixed per step)
//! and `fid_n_real` images of the dataset, whose Inception features are computed once, at the
//! first check. The weights are read when the loop starts, so a missing or wrong file is an
//! error before any training.

use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::eval::fid::{FidInception, tensor_features};
use crate::eval::frechet;
use crate::model::Generator;
use crate::rng::Rng;

/// Images per Inception forward pass.
const BATCH: usize = 25;
/// pool3 (2048 features for the real file).
const BLOCK: usize = 3;

/// One FID measurement, as metrics.jsonl records it (under `fid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FidPoint {
    pub step: u64,
    pub fid: f64,
    /// KID (mean and standard deviation over subsets).
    pub kid: f64,
    pub kid_sd: f64,
    pub n_generated: usize,
    pub n_real: usize,
    /// Wall time of this measurement (the real side's included at the first).
    pub seconds: f64,
}

/// The FID schedule of a training run.
pub struct FidTracker {
    every: u64,
    n_real: usize,
    n_generated: usize,
    seed: u64,
    k: usize,
    net: FidInception,
    real: Option<Vec<Vec<f32>>>,
}

impl FidTracker {
    /// None when `monitor.fid_every` is 0; else the Inception weights read from
    /// `monitor.fid_weights` (an error naming the file if they cannot be).
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Option<Self>> {
        let m = &cfg.monitor;
        if m.fid_every == 0 {
            return Ok(None);
        }
        let path = m.fid_weights.as_ref().ok_or_else(|| {
            Error::Config("monitor.fid_every needs monitor.fid_weights (--fid-weights FILE)".into())
        })?;
        let net = FidInception::load(path, device).map_err(|e| {
            Error::Msg(format!(
                "FID (monitor.fid_every = {}): cannot use pytorch-fid's Inception weights: {e}",
                m.fid_every
            ))
        })?;
        Ok(Some(Self {
            every: m.fid_every,
            n_real: m.fid_n_real,
            n_generated: m.fid_n_generated,
            seed: cfg.seed,
            k: cfg.model.num_conditions,
            net,
            real: None,
        }))
    }

    /// Whether a measurement is due after generator step `step`.
    pub fn due(&self, step: u64) -> bool {
        step > 0 && step.is_multiple_of(self.every)
    }

    /// FID and KID of `generator` against the data at `step`.
    pub fn measure(
        &mut self,
        step: u64,
        generator: &Generator,
        data: &dyn Dataset,
    ) -> Result<FidPoint> {
        let t0 = Instant::now();
        let dev = self.net.device();
        if self.real.is_none() {
            let n = self.n_real.min(data.len());
            let mut idx: Vec<usize> = (0..data.len()).collect();
            Rng::stream(self.seed, "fid.real").shuffle(&mut idx);
            idx.truncate(n);
            let mut feats = Vec::with_capacity(n);
            for chunk in idx.chunks(BATCH) {
                let (x, _) = data.batch(chunk, &dev)?;
                feats.extend(tensor_features(&self.net, &x, BLOCK, BATCH)?);
            }
            self.real = Some(feats);
        }
        let mut rng = Rng::stream(self.seed.wrapping_add(step), "fid.generate");
        let z_dim = generator.cfg.z_dim;
        let mut gen_feats = Vec::with_capacity(self.n_generated);
        let mut done = 0;
        while done < self.n_generated {
            let m = BATCH.min(self.n_generated - done);
            let z: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    rng.normal_vec(z_dim)
                        .into_iter()
                        .map(|v| v as f32)
                        .collect()
                })
                .collect();
            let c: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    if self.k == 0 {
                        vec![]
                    } else {
                        data.condition(rng.below(data.len()))
                    }
                })
                .collect();
            let imgs = generator.generate_from(&z, &c)?;
            gen_feats.extend(tensor_features(
                &self.net,
                &imgs.to_tensor(&dev)?,
                BLOCK,
                BATCH,
            )?);
            done += m;
        }
        let real = self.real.as_deref().unwrap_or_default();
        let fid = frechet::frechet_distance(&gen_feats, real)?;
        let (kid, kid_sd) = frechet::kid(
            &gen_feats,
            real,
            frechet::KID_SUBSETS,
            frechet::KID_SUBSET_SIZE,
            self.seed,
        )?;
        if !(fid.is_finite() && kid.is_finite() && kid_sd.is_finite()) {
            return Err(Error::Msg(format!(
                "FID at step {step} came out non-finite ({fid}, KID {kid})"
            )));
        }
        Ok(FidPoint {
            step,
            fid,
            kid,
            kid_sd,
            n_generated: gen_feats.len(),
            n_real: real.len(),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}
