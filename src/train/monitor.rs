//! Live diagnostics during training: every `every` steps, a bounded sample of generated
//! images is scored by the evaluator and compared with real images (coverage, NDB, PRDC,
//! diversity, closest pairs, see [`crate::diagnostics`]); alarm rules watch both the step
//! statistics and these measures. The CLI writes the reports to `metrics.jsonl`; the explorer
//! draws the same reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

pub use crate::config::MonitorConfig;
use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::diagnostics::{
    Alarm, AlarmMonitor, ClassSpec, Diagnostics, DiagnosticsReport, Generated, StepPoint,
};
use crate::error::{Error, Result};
use crate::eval::classifier::{Classifier, label_ids};
use crate::images::Images;
use crate::model::Generator;
use crate::rng::Rng;
use crate::train::StepStats;

impl MonitorConfig {
    /// The evaluator folder this config points at: `evaluator` when set, else the default
    /// evaluator of the run's data and size ([`default_evaluator_dir`]) in the first of
    /// [`checkpoint_roots`](crate::checkpoint::checkpoint_roots) that holds one (so `eval` and
    /// `train` find the shipped evaluators from any folder), else `./checkpoints`' (which
    /// [`load_evaluator`] then reports as missing).
    pub fn evaluator_dir(&self, cfg: &TrainConfig) -> PathBuf {
        match &self.evaluator {
            Some(p) => p.clone(),
            None => find_evaluator(&crate::checkpoint::checkpoint_roots(), cfg),
        }
    }
}

/// The default evaluator for `cfg` in `roots`: `evaluator-<kind>-<size>` in the first root
/// that has one, else `evaluator-<kind>` in the first root that has one (as
/// [`default_evaluator_dir`] prefers the sized folder in one root), else the first root's
/// [`default_evaluator_dir`] (to be reported missing).
pub fn find_evaluator(roots: &[PathBuf], cfg: &TrainConfig) -> PathBuf {
    let has = |d: &PathBuf| d.join(crate::eval::classifier::CONFIG_FILE).is_file();
    evaluator_names(cfg)
        .iter()
        .find_map(|n| roots.iter().map(|r| r.join(n)).find(has))
        .unwrap_or_else(|| {
            let first = roots
                .first()
                .map_or(Path::new("checkpoints"), |r| r.as_path());
            default_evaluator_dir(first, cfg)
        })
}

/// [`Classifier::load`] of an evaluator folder, with an error that says what was looked for
/// when the folder is not there: the data kind and image size, the folder names tried and
/// how to give one.
pub fn load_evaluator(dir: &Path, cfg: &TrainConfig, device: &Device) -> Result<Classifier> {
    let is_pth = dir.extension().is_some_and(|e| e == "pth");
    if !is_pth && !dir.exists() {
        let (kind, size) = (cfg.data.kind.name(), cfg.model.image_size);
        let looked = if cfg.monitor.evaluator.is_some() {
            format!("{} (monitor.evaluator)", dir.display())
        } else {
            let roots: Vec<String> = crate::checkpoint::checkpoint_roots()
                .iter()
                .map(|r| r.display().to_string())
                .collect();
            let [sized, plain] = evaluator_names(cfg);
            format!("{sized} and {plain} in {}", roots.join(", "))
        };
        return Err(Error::Config(format!(
            "no evaluator for {size}x{size} {kind} images: looked for {looked}; give one with \
             --evaluator DIR (or train one: `ganscope evaluator train --kind {kind} --size {size}`)"
        )));
    }
    Classifier::load(dir, device)
}

/// One row of pixel values per image of `data` (CHW images of `shape` back to back) for the
/// intra-condition diversity, average-pooled by an integer factor down to at most 32 pixels a
/// side (a 64-pixel image: 2x2 blocks).
pub fn pixel_rows(data: &[f32], shape: (usize, usize, usize)) -> Vec<Vec<f32>> {
    let (c, h, w) = shape;
    let f = if h > 32 && h.is_multiple_of(32) && w.is_multiple_of(h / 32) {
        h / 32
    } else {
        1
    };
    let (oh, ow) = (h / f, w / f);
    let len = c * h * w;
    let scale = 1.0 / (f * f) as f32;
    data.chunks_exact(len.max(1))
        .map(|img| {
            let mut row = vec![0f32; c * oh * ow];
            for ci in 0..c {
                for y in 0..oh * f {
                    for x in 0..ow * f {
                        row[(ci * oh + y / f) * ow + x / f] += img[(ci * h + y) * w + x] * scale;
                    }
                }
            }
            row
        })
        .collect()
}

/// The evaluator for a run's data and image size under `root`: `evaluator-<kind>-<size>`
/// (e.g. `evaluator-iclevr-32`) where it exists, else `evaluator-<kind>` (the dataset's own
/// size). Loading checks that the evaluator's size is the generator's: images are never
/// resized to fit an evaluator.
pub fn default_evaluator_dir(root: &std::path::Path, cfg: &TrainConfig) -> PathBuf {
    let [sized, plain] = evaluator_names(cfg);
    let sized = root.join(sized);
    if sized.join(crate::eval::classifier::CONFIG_FILE).is_file() {
        sized
    } else {
        root.join(plain)
    }
}

/// The default evaluator folder names for a run, preferred first: `evaluator-<kind>-<size>`,
/// `evaluator-<kind>`.
fn evaluator_names(cfg: &TrainConfig) -> [String; 2] {
    let kind = cfg.data.kind.name();
    [
        format!("evaluator-{kind}-{}", cfg.model.image_size),
        format!("evaluator-{kind}"),
    ]
}

/// One diagnostics check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub step: u64,
    /// Wall time of the whole check (generation + evaluator + measures).
    pub seconds: f64,
    /// Training wall time since the previous check (or since the monitor started).
    pub train_seconds: f64,
    /// The checks' share of (checks + training) wall time over the run so far.
    pub share: f64,
    /// Training seconds the next check waits for (`max_share` applied to this one's time).
    pub next_after_train_seconds: f64,
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
    cost: MonitorCost,
    /// Steps reported through [`Monitor::on_step`] (for the mean step time).
    steps_seen: u64,
}

/// Where the monitor's time went (wall seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MonitorCost {
    /// Evaluator + real-side fit (once).
    pub fit_seconds: f64,
    /// The real images' evaluator features came from the feature cache (see
    /// [`Monitor::with_feature_cache`]).
    pub fit_cached: bool,
    pub checks: u64,
    pub check_seconds: f64,
    /// Training steps reported through [`Monitor::on_step`].
    pub train_seconds: f64,
    /// Training since the last check, and that check's duration.
    pub since_check: f64,
    pub last_check: f64,
    /// Due checks postponed by `max_share`.
    pub postponed: u64,
}

impl MonitorCost {
    /// Checks / (checks + training): the share of throughput the diagnostics took.
    pub fn share(&self) -> f64 {
        let total = self.check_seconds + self.train_seconds;
        if total > 0.0 {
            self.check_seconds / total
        } else {
            0.0
        }
    }

    /// Training seconds still needed before one more check (taking as long as the last one)
    /// keeps the checks within `max_share` of checks + training over the whole run. The first
    /// check runs as soon as it is due; the ones after it make up for it.
    pub fn wait_seconds(&self, max_share: f64) -> f64 {
        if max_share >= 1.0 || self.checks == 0 {
            return 0.0;
        }
        let s = max_share.max(1e-6);
        let need = (self.check_seconds + self.last_check) * (1.0 - s) / s;
        (need - self.train_seconds).max(0.0)
    }

    fn affordable(&self, max_share: f64) -> bool {
        self.wait_seconds(max_share) <= 0.0
    }
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
            cost: MonitorCost::default(),
            steps_seen: 0,
        }
    }

    /// Load the evaluator and fit the real side (when `every > 0`).
    pub fn new(cfg: &TrainConfig, data: &dyn Dataset, device: &Device) -> Result<Self> {
        Self::with_feature_cache(cfg, data, device, None)
    }

    /// [`Monitor::new`], keeping the real images' evaluator features in `cache` (a folder;
    /// see [`user_feature_cache`]) between runs. Computing them is nearly all of the fit
    /// (1000 images at 32x32 through the 32-pixel evaluator: 4 s on this 2-core machine, 15 s
    /// while the explorer trains beside it); a run that reuses them starts its checks at
    /// once. The file is named by a hash of everything the features depend on: the
    /// evaluator's files, the chosen real images' pixels and labels, the device and this
    /// build's version, so other data, another evaluator or a retrained one never hit it. A
    /// missing, unreadable or damaged file is recomputed and rewritten; a cache that cannot be
    /// written leaves the run as it was without one.
    pub fn with_feature_cache(
        cfg: &TrainConfig,
        data: &dyn Dataset,
        device: &Device,
        cache: Option<&Path>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let mut m = Self::alarms_only(cfg);
        if cfg.monitor.every == 0 {
            return Ok(m);
        }
        if cfg.monitor.max_share.is_nan() || cfg.monitor.max_share <= 0.0 {
            return Err(Error::Config(format!(
                "monitor.max_share = {} (need > 0; 1 or more = no limit)",
                cfg.monitor.max_share
            )));
        }
        cfg.monitor.diagnostics.validate()?;
        let dir = cfg.monitor.evaluator_dir(cfg);
        let mut ev = load_evaluator(&dir, cfg, device)?;
        ev.set_tta_hflip(cfg.monitor.tta_hflip)?;
        let (c, h, _) = data.image_shape();
        ev.check_fits(&dir, c, h, data.label_names())?;
        let n = cfg.monitor.n_real.min(data.len());
        let mut idx: Vec<usize> = (0..data.len()).collect();
        Rng::stream(cfg.seed, "monitor.real").shuffle(&mut idx);
        idx.truncate(n);
        let labels: Vec<Vec<u16>> = idx.iter().map(|&i| label_ids(data, i)).collect();
        // Pixel rows for the intra-condition diversity (see `Diagnostics::check_with`), and
        // the feature cache's key.
        let mut key = cache.map(|_| feature_key(&dir, device));
        let mut rows = Vec::with_capacity(n);
        for chunk in idx.chunks(256) {
            let (x, _) = data.batch(chunk, device)?;
            let im = Images::from_tensor(&x)?;
            if let Some(k) = key.as_mut() {
                let pixels = crate::checkpoint::data_hash(bytemuck::cast_slice(&im.data));
                k.extend_from_slice(&pixels.to_le_bytes());
            }
            rows.extend(pixel_rows(&im.data, (im.channels, im.height, im.width)));
        }
        let file = cache.zip(key).map(|(c, mut k)| {
            for l in &labels {
                k.extend_from_slice(&(l.len() as u64).to_le_bytes());
                for v in l {
                    k.extend_from_slice(&v.to_le_bytes());
                }
            }
            c.join(format!("{:016x}.bin", crate::checkpoint::data_hash(&k)))
        });
        let cached = file.as_deref().and_then(|f| read_features(f, n).ok());
        m.cost.fit_cached = cached.is_some();
        let feats = match cached {
            Some(f) => f,
            None => {
                let mut feats = Vec::with_capacity(n);
                for chunk in idx.chunks(256) {
                    let (x, _) = data.batch(chunk, device)?;
                    feats.extend(ev.features(&x)?);
                }
                if let Some(f) = &file {
                    // A cache that cannot be written costs the next run the fit, nothing else.
                    let _ = write_features(f, &feats);
                }
                feats
            }
        };
        let spec = ClassSpec {
            kind: ev.cfg.kind,
            num_classes: ev.cfg.label_names.len(),
        };
        let mut diag = Diagnostics::fit(cfg.monitor.diagnostics.clone(), spec, &feats, &labels)?;
        diag.set_diversity_rows(&rows, &labels)?;
        m.evaluator = Some((ev, diag));
        m.real_idx = idx;
        m.cost.fit_seconds = t0.elapsed().as_secs_f64();
        Ok(m)
    }

    /// Alarm rules on one step's statistics; `seconds` is the step's wall time (it counts
    /// towards the training time that `max_share` weighs the checks against).
    pub fn on_step(&mut self, stats: &StepStats, seconds: f64) -> Vec<Alarm> {
        self.steps_seen += 1;
        self.cost.train_seconds += seconds;
        self.cost.since_check += seconds;
        self.alarms.push_step(&StepPoint::from(stats))
    }

    /// Take over the step history of the monitor this one replaces (the explorer trains with
    /// an alarms-only monitor while this one's fit runs): the alarm rules' windows and the
    /// training time the checks' share is weighed against.
    pub fn carry_over(&mut self, old: Monitor) {
        self.alarms = old.alarms;
        self.cost.train_seconds += old.cost.train_seconds;
        self.cost.since_check += old.cost.since_check;
        self.steps_seen += old.steps_seen;
    }

    /// Time spent so far (fit, checks, training).
    pub fn cost(&self) -> MonitorCost {
        self.cost
    }

    /// The step after `step` at which the next check is expected, if diagnostics are on: the
    /// next multiple of `every`, or, while `max_share` postpones checks, the first multiple
    /// of `every` after the training still needed (at the mean step time so far).
    pub fn next_check_after(&self, step: u64) -> Option<u64> {
        let every = self.cfg.every;
        if self.evaluator.is_none() || every == 0 {
            return None;
        }
        let wait = self.cost.wait_seconds(self.cfg.max_share);
        let per_step = self.cost.train_seconds / self.steps_seen.max(1) as f64;
        let ahead = if wait > 0.0 && per_step > 0.0 {
            (wait / per_step).ceil() as u64
        } else {
            0
        };
        Some((step + ahead.max(1)).div_ceil(every) * every)
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

    /// Whether the "D accuracy pinned" rule holds now.
    pub fn d_wins(&self) -> bool {
        self.alarms.d_wins()
    }

    /// Whether a check is due after `step`: a multiple of `every`, unless the checks would
    /// take more than `max_share` of the wall time (then it is postponed and counted).
    pub fn due(&mut self, step: u64) -> bool {
        if !(self.evaluator.is_some() && self.cfg.every > 0 && step.is_multiple_of(self.cfg.every))
        {
            return false;
        }
        if self.cost.affordable(self.cfg.max_share) {
            return true;
        }
        self.cost.postponed += 1;
        false
    }

    /// Generate `n_generated` images (conditions drawn from the data, `seeds_per_condition`
    /// latents each, noise from a stream fixed per step), score them and run every measure;
    /// also feeds the alarm rules.
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
        let mut cond_i = 0;
        while done < n {
            let m = 256.min(n - done);
            let mut z = Vec::with_capacity(m);
            let mut c = Vec::with_capacity(m);
            for t in done..done + m {
                z.push(
                    rng.normal_vec(z_dim)
                        .into_iter()
                        .map(|v| v as f32)
                        .collect(),
                );
                // A new condition every `seeds_per_condition` images.
                if t % self.cfg.seeds_per_condition.max(1) == 0 {
                    cond_i = rng.below(data.len());
                }
                let i = cond_i;
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
        let (ch, h, w) = shape;
        let rows = pixel_rows(&generated, shape);
        let report = diag.check_with(
            Generated {
                features: &feats,
                probs: &probs,
                conditions: &conds,
            },
            Some(&rows),
        )?;
        let alarms = self.alarms.push_measures(&report.measure_point(step));
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
        let seconds = t0.elapsed().as_secs_f64();
        let train_seconds = self.cost.since_check;
        self.cost.checks += 1;
        self.cost.check_seconds += seconds;
        self.cost.last_check = seconds;
        self.cost.since_check = 0.0;
        Ok((
            Check {
                step,
                seconds,
                train_seconds,
                share: self.cost.share(),
                next_after_train_seconds: self.cost.wait_seconds(self.cfg.max_share),
                report,
                gallery,
            },
            alarms,
        ))
    }
}

/// The folder where runs keep the real images' evaluator features
/// ([`Monitor::with_feature_cache`]): `$XDG_CACHE_HOME/ganscope/real-features`, else
/// `~/.cache/ganscope/real-features`; None when neither variable is set.
pub fn user_feature_cache() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("ganscope").join("real-features"))
}

/// The start of the feature cache's key: the build, the device and the evaluator's files (a
/// folder's files in name order, or the one `.pth` file), each file as its name and
/// [`crate::checkpoint::data_hash`]. The caller appends hashes of the data and names the file
/// by the hash of the whole.
fn feature_key(evaluator: &Path, device: &Device) -> Vec<u8> {
    let mut k = Vec::new();
    k.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    k.extend_from_slice(format!("{:?}", device.location()).as_bytes());
    let mut files = vec![];
    if evaluator.is_dir() {
        if let Ok(rd) = std::fs::read_dir(evaluator) {
            files = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        }
        files.sort();
    } else {
        files.push(evaluator.to_path_buf());
    }
    for f in files.iter().filter(|f| f.is_file()) {
        k.extend_from_slice(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        // Unreadable: the key still differs from a readable file's.
        let bytes = std::fs::read(f).unwrap_or_default();
        k.extend_from_slice(&crate::checkpoint::data_hash(&bytes).to_le_bytes());
    }
    k
}

const FEATURES_MAGIC: &[u8; 8] = b"GSRFEAT1";

/// Features as `magic, n (u64), dim (u64), n * dim f32`, little-endian; refuses anything
/// non-finite or ragged.
fn write_features(path: &Path, feats: &[Vec<f32>]) -> Result<()> {
    let dim = feats.first().map_or(0, |f| f.len());
    if feats
        .iter()
        .any(|f| f.len() != dim || f.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::Msg(format!(
            "{}: features not written (ragged or not finite)",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(24 + feats.len() * dim * 4);
    bytes.extend_from_slice(FEATURES_MAGIC);
    bytes.extend_from_slice(&(feats.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(dim as u64).to_le_bytes());
    for v in feats.iter().flatten() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Msg(format!("{}: {e}", parent.display())))?;
    }
    crate::checkpoint::write_atomic(path, &bytes)
}

/// The features [`write_features`] wrote, if the file holds exactly `n` finite rows.
fn read_features(path: &Path, n: usize) -> Result<Vec<Vec<f32>>> {
    let bad = |why: &str| Error::Msg(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(&e.to_string()))?;
    if bytes.len() < 24 || &bytes[..8] != FEATURES_MAGIC {
        return Err(bad("not a feature file"));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (rows, dim) = (word(8), word(16));
    let body = rows
        .checked_mul(dim)
        .and_then(|x| x.checked_mul(4))
        .and_then(|x| x.checked_add(24));
    if rows != n as u64 || dim == 0 || body != Some(bytes.len() as u64) {
        return Err(bad("wrong size"));
    }
    let vals: Vec<f32> = bytes[24..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if vals.iter().any(|v| !v.is_finite()) {
        return Err(bad("non-finite feature"));
    }
    Ok(vals.chunks(dim as usize).map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::{Monitor, MonitorCost};
    use crate::config::TrainConfig;
    use crate::train::StepStats;

    #[test]
    fn carry_over_keeps_the_alarm_window_and_training_time() {
        // D accuracy 1.0 at every step, window 200, no warm-up: the pinned alarm fires at the
        // 200th step. 150 steps go to the first monitor, 50 to its replacement: with the
        // history carried over it fires at step 200; a fresh one would need 200 of its own.
        let mut cfg = TrainConfig::mnist_cdcgan();
        cfg.monitor.diagnostics.alarms.warmup_steps = 0;
        let stats = |step| StepStats {
            step,
            d_acc_real: 1.0,
            d_acc_fake: 1.0,
            // A moving G loss, so that the flat-loss rule stays quiet.
            g_loss: step as f64 * 0.01,
            ..StepStats::default()
        };
        let mut old = Monitor::alarms_only(&cfg);
        for step in 1..=150 {
            assert!(old.on_step(&stats(step), 0.5).is_empty());
        }
        let mut fresh = Monitor::alarms_only(&cfg);
        let mut new = Monitor::alarms_only(&cfg);
        new.carry_over(old);
        assert_eq!(new.cost().train_seconds, 75.0);
        assert_eq!(new.cost().since_check, 75.0);
        let fired: Vec<u64> = (151..=200)
            .flat_map(|s| new.on_step(&stats(s), 0.5))
            .map(|a| a.step)
            .collect();
        assert_eq!(fired, vec![200]);
        assert!((151..=200).all(|s| fresh.on_step(&stats(s), 0.5).is_empty()));
    }

    #[test]
    fn share_limit_arithmetic() {
        // One check of 8 s so far, after 50 s of training. Another 8 s check keeps the run
        // within 8% once (8 + 8) / (8 + 8 + T) <= 0.08, i.e. T >= 16 * 0.92 / 0.08 = 184 s of
        // training in all: 134 s more.
        let mut c = MonitorCost {
            checks: 1,
            check_seconds: 8.0,
            last_check: 8.0,
            train_seconds: 50.0,
            ..MonitorCost::default()
        };
        assert!((c.wait_seconds(0.08) - 134.0).abs() < 1e-9);
        c.train_seconds = 183.9;
        assert!(!c.affordable(0.08));
        c.train_seconds = 184.0 + 1e-9;
        assert!(c.affordable(0.08));
        // With that second check the run stands at 16 / (16 + 184) = 8%.
        let after = MonitorCost {
            checks: 2,
            check_seconds: 16.0,
            ..c
        };
        assert!((after.share() - 0.08).abs() < 1e-9);
        // No check yet, or no limit: always.
        assert!(MonitorCost::default().affordable(0.01));
        assert!(
            MonitorCost {
                train_seconds: 0.0,
                ..c
            }
            .affordable(1.0)
        );
        assert_eq!(MonitorCost::default().share(), 0.0);
    }
}
