//! Live diagnostics during training: every `every` steps, a bounded sample of generated
//! images is scored by the evaluator and compared with real images (coverage, NDB, PRDC,
//! diversity, closest pairs, see [`crate::diagnostics`]); alarm rules watch both the step
//! statistics and these measures. The CLI writes the reports to `metrics.jsonl`; the explorer
//! draws the same reports.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::diagnostics::{
    Alarm, AlarmMonitor, ClassSpec, Diagnostics, DiagnosticsConfig, DiagnosticsReport, Generated,
    StepPoint,
};
use crate::error::{Error, Result};
use crate::eval::classifier::{Classifier, label_ids};
use crate::images::Images;
use crate::model::Generator;
use crate::rng::Rng;
use crate::train::StepStats;

/// When and on how many samples diagnostics run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MonitorConfig {
    /// Run the diagnostics every N generator steps (0 = never; the alarms on step statistics
    /// run at every step regardless).
    pub every: u64,
    /// Evaluator folder; `None` = `checkpoints/evaluator-<data kind>`.
    pub evaluator: Option<PathBuf>,
    /// Real images whose evaluator features are computed once.
    pub n_real: usize,
    /// Generated images per check.
    pub n_generated: usize,
    pub diagnostics: DiagnosticsConfig,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            every: 0,
            evaluator: None,
            n_real: 2000,
            n_generated: 1000,
            diagnostics: DiagnosticsConfig::default(),
        }
    }
}

impl MonitorConfig {
    /// The evaluator folder this config points at.
    pub fn evaluator_dir(&self, cfg: &TrainConfig) -> PathBuf {
        self.evaluator.clone().unwrap_or_else(|| {
            PathBuf::from("checkpoints").join(format!("evaluator-{}", cfg.data.kind.name()))
        })
    }
}

/// One diagnostics check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub step: u64,
    /// Wall time of the whole check (generation + evaluator + measures).
    pub seconds: f64,
    pub report: DiagnosticsReport,
    /// Pictures for the explorer (not written to metrics.jsonl).
    #[serde(skip)]
    pub gallery: Gallery,
}

/// The images behind a check's indices: each NDB bin's centre (the real image nearest to
/// it), and the closest generated and real pairs, two images per pair.
#[derive(Debug, Clone, Default)]
pub struct Gallery {
    pub ndb_centres: Option<Images>,
    pub closest_generated: Option<Images>,
    pub closest_real: Option<Images>,
}

/// Evaluator, real-side state and alarm rules of one run.
pub struct Monitor {
    cfg: MonitorConfig,
    seed: u64,
    k: usize,
    evaluator: Option<(Classifier, Diagnostics)>,
    alarms: AlarmMonitor,
    /// Dataset indices of the real features given to the diagnostics' fit.
    real_idx: Vec<usize>,
}

impl Monitor {
    /// Alarms only (no evaluator needed).
    pub fn alarms_only(cfg: &TrainConfig) -> Self {
        Self {
            cfg: cfg.monitor.clone(),
            seed: cfg.seed,
            k: cfg.model.num_conditions,
            evaluator: None,
            alarms: AlarmMonitor::new(cfg.monitor.diagnostics.alarms.clone()),
            real_idx: vec![],
        }
    }

    /// Load the evaluator and fit the real side (when `every > 0`).
    pub fn new(cfg: &TrainConfig, data: &dyn Dataset, device: &Device) -> Result<Self> {
        let mut m = Self::alarms_only(cfg);
        if cfg.monitor.every == 0 {
            return Ok(m);
        }
        cfg.monitor.diagnostics.validate()?;
        let dir = cfg.monitor.evaluator_dir(cfg);
        let ev = Classifier::load(&dir, device)?;
        let (c, h, _) = data.image_shape();
        ev.check_fits(&dir, c, h, data.label_names())?;
        let n = cfg.monitor.n_real.min(data.len());
        let mut idx: Vec<usize> = (0..data.len()).collect();
        Rng::stream(cfg.seed, "monitor.real").shuffle(&mut idx);
        idx.truncate(n);
        let mut feats = Vec::with_capacity(n);
        for chunk in idx.chunks(256) {
            let (x, _) = data.batch(chunk, device)?;
            feats.extend(ev.predict(&x)?.1);
        }
        let labels: Vec<Vec<u16>> = idx.iter().map(|&i| label_ids(data, i)).collect();
        let spec = ClassSpec {
            kind: ev.cfg.kind,
            num_classes: ev.cfg.label_names.len(),
        };
        let diag = Diagnostics::fit(cfg.monitor.diagnostics.clone(), spec, &feats, &labels)?;
        m.evaluator = Some((ev, diag));
        m.real_idx = idx;
        Ok(m)
    }

    /// Alarm rules on one step's statistics.
    pub fn on_step(&mut self, stats: &StepStats) -> Vec<Alarm> {
        self.alarms.push_step(&StepPoint::from(stats))
    }

    /// Real images for indices into the real features of the fit.
    fn real_images(
        &self,
        data: &dyn Dataset,
        idx: &[usize],
        dev: &Device,
    ) -> Result<Option<Images>> {
        let ids: Vec<usize> = idx
            .iter()
            .filter_map(|&i| self.real_idx.get(i).copied())
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let (x, _) = data.batch(&ids, dev)?;
        Ok(Some(Images::from_tensor(&x)?))
    }

    /// Forget the alarm rules' recent history (after a restore).
    pub fn reset_alarms(&mut self) {
        self.alarms.reset();
    }

    /// Whether a check is due after `step`.
    pub fn due(&self, step: u64) -> bool {
        self.evaluator.is_some() && self.cfg.every > 0 && step.is_multiple_of(self.cfg.every)
    }

    /// Generate `n_generated` images (conditions drawn from the data, noise from a stream
    /// fixed per step), score them and run every measure; also feeds the alarm rules.
    pub fn check(
        &mut self,
        step: u64,
        generator: &Generator,
        data: &dyn Dataset,
    ) -> Result<(Check, Vec<Alarm>)> {
        let Some((ev, diag)) = &self.evaluator else {
            return Err(Error::Msg("diagnostics are off (monitor.every = 0)".into()));
        };
        let t0 = Instant::now();
        let mut rng = Rng::stream(self.seed.wrapping_add(step), "monitor.generate");
        let n = self.cfg.n_generated;
        let z_dim = generator.cfg.z_dim;
        let mut feats = Vec::with_capacity(n);
        let mut probs = Vec::with_capacity(n);
        let mut conds = Vec::with_capacity(n);
        let mut generated: Vec<f32> = Vec::new();
        let mut shape = (0, 0, 0);
        let dev = generator.device().clone();
        let mut done = 0;
        while done < n {
            let m = 256.min(n - done);
            let mut z = Vec::with_capacity(m);
            let mut c = Vec::with_capacity(m);
            for _ in 0..m {
                z.push(
                    rng.normal_vec(z_dim)
                        .into_iter()
                        .map(|v| v as f32)
                        .collect(),
                );
                let i = rng.below(data.len());
                let cond = if self.k == 0 {
                    vec![]
                } else {
                    data.condition(i)
                };
                conds.push(if self.k == 0 {
                    vec![]
                } else {
                    label_ids(data, i)
                });
                c.push(cond);
            }
            let imgs: Images = generator.generate_from(&z, &c)?;
            let (p, f) = ev.predict(&imgs.to_tensor(&dev)?)?;
            shape = (imgs.channels, imgs.height, imgs.width);
            generated.extend_from_slice(&imgs.data);
            probs.extend(p);
            feats.extend(f);
            done += m;
        }
        let report = diag.check(Generated {
            features: &feats,
            probs: &probs,
            conditions: &conds,
        })?;
        let alarms = self.alarms.push_measures(&report.measure_point(step));
        let (ch, h, w) = shape;
        let len = ch * h * w;
        let pick_generated = |idx: &mut dyn Iterator<Item = usize>| -> Images {
            let mut data = Vec::new();
            let mut k = 0;
            for i in idx {
                data.extend_from_slice(&generated[i * len..(i + 1) * len]);
                k += 1;
            }
            Images {
                n: k,
                channels: ch,
                height: h,
                width: w,
                data,
            }
        };
        let gallery = Gallery {
            ndb_centres: self.real_images(data, &report.ndb_bin_images, &dev)?,
            closest_generated: Some(pick_generated(
                &mut report.closest_generated.iter().flat_map(|p| [p.i, p.j]),
            )),
            closest_real: self.real_images(
                data,
                &report
                    .closest_real
                    .iter()
                    .flat_map(|p| [p.i, p.j])
                    .collect::<Vec<_>>(),
                &dev,
            )?,
        };
        Ok((
            Check {
                step,
                seconds: t0.elapsed().as_secs_f64(),
                report,
                gallery,
            },
            alarms,
        ))
    }
}
