//! Live mode-collapse diagnostics (issue 5), engine side: pure, seeded, deterministic
//! functions of evaluator outputs (features and class scores). No GUI code.
//!
//! Measures, one module each:
//! - [`coverage`]: class histogram, modes covered x/K and KL(data || generated); confusion
//!   matrix for one-hot conditional runs; per-label hit rates (colour x shape heat map) for
//!   multi-label runs.
//! - [`ndb`]: NDB (Richardson & Weiss 2018) on k-means bins ([`kmeans`]) fitted once on real
//!   features.
//! - [`prdc`]: precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et
//!   al. 2020) with cached real k-NN radii.
//! - [`diversity`]: intra-condition mean pairwise feature distance, generated vs real.
//! - [`closest`]: closest pairs (birthday-paradox test, Arora & Zhang 2017).
//! - [`alarms`]: rules over the training series and these measures, and a
//!   [`SnapshotRing`](alarms::SnapshotRing) of healthy snapshots.
//!
//! [`Diagnostics`] bundles them: [`Diagnostics::fit`] does the real-side work once (splits the
//! real features into two disjoint halves: a *reference* half for the NDB bins and the k-NN
//! manifold, and a *holdout* half that plays "generated" for the real-vs-real baselines), and
//! [`Diagnostics::check`] scores one generated sample into a serialisable
//! [`DiagnosticsReport`] (one line of `metrics.jsonl`). [`DiagnosticsReport::compute`] does
//! both in one call.

pub mod alarms;
pub mod closest;
pub mod coverage;
pub mod diversity;
pub mod kmeans;
pub mod ndb;
pub mod prdc;

mod dist;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use alarms::{
    Alarm, AlarmConfig, AlarmKind, AlarmMonitor, MeasurePoint, SnapshotRing, StepPoint, StepStats,
};
pub use closest::{ClosestPair, closest_pairs};
pub use coverage::{ClassCoverage, Confusion, LabelHits, class_coverage, confusion, label_hits};
pub use diversity::{Diversity, GroupDiversity, intra_condition_diversity};
pub use kmeans::{KMeans, kmeans};
pub use ndb::{NdbBins, NdbResult, ndb_test};
pub use prdc::{Prdc, RealManifold};

pub use crate::config::DiagnosticsConfig;
use crate::data::ConditionKind;
use crate::error::{Error, Result};
use crate::rng::Rng;

impl DiagnosticsConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("diagnostics: {m}")));
        if self.ndb_bins < 2 {
            return bad(format!("ndb_bins = {} (need >= 2)", self.ndb_bins));
        }
        if !(self.ndb_alpha > 0.0 && self.ndb_alpha < 1.0) {
            return bad(format!(
                "ndb_alpha = {} (need 0 < alpha < 1)",
                self.ndb_alpha
            ));
        }
        if self.pr_k == 0 || self.dc_k == 0 {
            return bad("pr_k and dc_k must be >= 1".into());
        }
        if !(self.coverage_min_share >= 0.0 && self.kl_pseudo_count > 0.0) {
            return bad("coverage_min_share must be >= 0 and kl_pseudo_count > 0".into());
        }
        if self.diversity_flag_ratio.is_nan() || self.diversity_flag_ratio < 0.0 {
            return bad("diversity_flag_ratio must be >= 0".into());
        }
        Ok(())
    }
}

/// What the evaluator's scores mean and how many classes / labels there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// OneHot: softmax over classes (coverage, confusion); MultiHot: per-label sigmoids
    /// (label hit rates); None: no class scores (feature measures only).
    pub kind: ConditionKind,
    pub num_classes: usize,
}

/// One generated sample as the evaluator saw it.
#[derive(Debug, Clone, Copy)]
pub struct Generated<'a> {
    /// Evaluator features, one row per sample.
    pub features: &'a [Vec<f32>],
    /// Evaluator class scores, one row per sample (may be empty: no class measures).
    pub probs: &'a [Vec<f32>],
    /// The condition label ids each sample was generated with (empty: unconditional run).
    pub conditions: &'a [Vec<u16>],
}

/// Milliseconds spent on each part of a check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Real-side work of [`Diagnostics::fit`] (k-means, real radii, real diversity).
    pub fit_ms: f64,
    pub coverage_ms: f64,
    pub ndb_ms: f64,
    pub prdc_ms: f64,
    pub diversity_ms: f64,
    pub closest_ms: f64,
    /// Real-vs-real baselines (0 when cached from an earlier check of the same size).
    pub baseline_ms: f64,
    /// The whole check (not counting fit).
    pub check_ms: f64,
}

/// Every measure for one generated sample, each beside its real-vs-real baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticsReport {
    pub n_generated: usize,
    pub n_real_reference: usize,
    pub n_real_holdout: usize,
    /// Holdout samples used for the baselines (min(n_generated, n_real_holdout)).
    pub baseline_n: usize,
    /// One-hot evaluators: argmax histogram, modes covered, KL.
    pub class_coverage: Option<ClassCoverage>,
    /// One-hot conditional runs.
    pub confusion: Option<Confusion>,
    /// Multi-label conditional runs.
    pub label_hits: Option<LabelHits>,
    pub ndb: NdbResult,
    pub ndb_baseline: NdbResult,
    /// Per NDB bin: index (into the real features given to fit) of its centre image.
    pub ndb_bin_images: Vec<usize>,
    pub prdc: Prdc,
    pub prdc_baseline: Prdc,
    pub diversity: Diversity,
    /// Generated indices.
    pub closest_generated: Vec<ClosestPair>,
    /// Real indices (into the real features given to fit), from the baseline holdout.
    pub closest_real: Vec<ClosestPair>,
    pub timings: Timings,
}

impl DiagnosticsReport {
    /// Fit on `real` (features and label ids, see [`Diagnostics::fit`]) and check `generated`
    /// in one call.
    pub fn compute(
        cfg: &DiagnosticsConfig,
        spec: ClassSpec,
        real: &[Vec<f32>],
        real_labels: &[Vec<u16>],
        generated: Generated<'_>,
    ) -> Result<Self> {
        Diagnostics::fit(cfg.clone(), spec, real, real_labels)?.check(generated)
    }

    /// The numbers the alarm rules read.
    pub fn measure_point(&self, step: u64) -> MeasurePoint {
        MeasurePoint::from_report(step, self)
    }
}

/// Real-vs-real numbers at one sample size.
#[derive(Debug)]
struct Baseline {
    n: usize,
    prdc: Prdc,
    ndb: NdbResult,
    closest: Vec<ClosestPair>,
}

/// The real-side state, built once and reused for every check.
#[derive(Debug)]
pub struct Diagnostics {
    pub cfg: DiagnosticsConfig,
    pub spec: ClassSpec,
    /// Indices (into the real features given to fit) of the reference and holdout halves.
    pub reference: Vec<usize>,
    pub holdout: Vec<usize>,
    /// NDB bins on the reference half; `nearest_real` holds indices into the full real set.
    pub bins: NdbBins,
    /// k-NN radii of the reference half.
    pub manifold: RealManifold,
    /// Data class distribution (all real labels; uniform without labels).
    pub data_distribution: Option<Vec<f64>>,
    /// Real diversity overall and per label, on all real samples.
    pub real_diversity: Vec<GroupDiversity>,
    pub fit_ms: f64,
    holdout_features: Vec<Vec<f32>>,
    baselines: Mutex<Vec<Arc<Baseline>>>,
}

impl Diagnostics {
    /// Splits `real` into two random disjoint halves (seeded: reference = the first
    /// `ceil(n / 2)` of a shuffle, holdout = the rest) and fits on them; see
    /// [`Diagnostics::fit_split`]. `real_labels`: one label-id set per real sample, or empty.
    pub fn fit(
        cfg: DiagnosticsConfig,
        spec: ClassSpec,
        real: &[Vec<f32>],
        real_labels: &[Vec<u16>],
    ) -> Result<Self> {
        let n = real.len();
        let mut perm: Vec<usize> = (0..n).collect();
        Rng::stream(cfg.seed, "diagnostics.split").shuffle(&mut perm);
        let holdout = perm.split_off(n - n / 2);
        Self::fit_split(cfg, spec, real, real_labels, perm, holdout)
    }

    /// Fits with a given split: NDB bins and k-NN radii on `real[reference]`; baselines test
    /// (a prefix of) `real[holdout]` against them. To use a second real sample as holdout,
    /// append it to `real` and pass its indices.
    pub fn fit_split(
        cfg: DiagnosticsConfig,
        spec: ClassSpec,
        real: &[Vec<f32>],
        real_labels: &[Vec<u16>],
        reference: Vec<usize>,
        holdout: Vec<usize>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        cfg.validate()?;
        dist::check_rows(real, "real features")?;
        let n = real.len();
        if !real_labels.is_empty() && real_labels.len() != n {
            return Err(Error::Msg(format!(
                "diagnostics: {} real label sets for {n} real features",
                real_labels.len()
            )));
        }
        let mut seen = vec![false; n];
        for &i in reference.iter().chain(&holdout) {
            if i >= n || std::mem::replace(&mut seen[i], true) {
                return Err(Error::Msg(format!(
                    "diagnostics: real index {i} out of range or in both halves"
                )));
            }
        }
        let kmax = cfg.pr_k.max(cfg.dc_k);
        if reference.len() < cfg.ndb_bins.max(kmax + 1) || holdout.len() <= kmax {
            return Err(Error::Msg(format!(
                "diagnostics: {} reference / {} holdout real samples are too few (need at \
                 least {} and {})",
                reference.len(),
                holdout.len(),
                cfg.ndb_bins.max(kmax + 1),
                kmax + 1
            )));
        }
        let pick = |idx: &[usize]| idx.iter().map(|&i| real[i].clone()).collect::<Vec<_>>();
        let ref_feats = pick(&reference);
        let mut bins = NdbBins::fit(&ref_feats, cfg.ndb_bins, cfg.kmeans_max_iter, cfg.seed)?;
        for i in bins.nearest_real.iter_mut() {
            *i = reference[*i];
        }
        let manifold = RealManifold::new(&ref_feats, cfg.pr_k, cfg.dc_k)?;
        let data_distribution = match spec.kind {
            ConditionKind::None => None,
            _ if spec.num_classes == 0 => None,
            _ => Some(coverage::label_distribution(real_labels, spec.num_classes)?),
        };
        let real_diversity = diversity::group_diversity(real, real_labels, spec.num_classes)?;
        Ok(Self {
            holdout_features: pick(&holdout),
            cfg,
            spec,
            reference,
            holdout,
            bins,
            manifold,
            data_distribution,
            real_diversity,
            fit_ms: t0.elapsed().as_secs_f64() * 1e3,
            baselines: Mutex::new(vec![]),
        })
    }

    /// Real-vs-real numbers for `n` generated samples (cached per size).
    fn baseline(&self, n: usize) -> Result<Arc<Baseline>> {
        let m = n.min(self.holdout_features.len());
        let mut cache = self.baselines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.iter().find(|b| b.n == m) {
            return Ok(Arc::clone(b));
        }
        let sub = &self.holdout_features[..m];
        let prdc = self.manifold.evaluate(sub)?;
        let ndb = self
            .bins
            .test(sub, self.cfg.ndb_alpha, self.cfg.ndb_bonferroni)?;
        let closest = closest_pairs(sub, self.cfg.closest_pairs)?
            .into_iter()
            .map(|p| {
                let (a, b) = (self.holdout[p.i], self.holdout[p.j]);
                ClosestPair {
                    i: a.min(b),
                    j: a.max(b),
                    distance: p.distance,
                }
            })
            .collect();
        let b = Arc::new(Baseline {
            n: m,
            prdc,
            ndb,
            closest,
        });
        if cache.len() >= 4 {
            cache.remove(0);
        }
        cache.push(Arc::clone(&b));
        Ok(b)
    }

    /// Every measure for one generated sample (see [`DiagnosticsReport`]).
    pub fn check(&self, g: Generated<'_>) -> Result<DiagnosticsReport> {
        self.check_with(g, None)
    }

    /// Measure intra-condition diversity on other rows than the evaluator features (pixels,
    /// see [`Diagnostics::check_with`]): the real side's diversity is recomputed on `rows`
    /// (one per real sample given to fit, with the same labels).
    pub fn set_diversity_rows(
        &mut self,
        rows: &[Vec<f32>],
        real_labels: &[Vec<u16>],
    ) -> Result<()> {
        self.real_diversity = diversity::group_diversity(rows, real_labels, self.spec.num_classes)?;
        Ok(())
    }

    /// As [`Diagnostics::check`], with the generated side's intra-condition diversity taken on
    /// `diversity_rows` (one per generated sample) instead of the evaluator features. A label
    /// classifier's features are built to be the same for images with the same labels, so
    /// two different scenes of one condition are close there and a generator that draws one
    /// image per condition looked only a little less diverse than real; in pixels, two real
    /// scenes of one condition differ where their objects stand.
    pub fn check_with(
        &self,
        g: Generated<'_>,
        diversity_rows: Option<&[Vec<f32>]>,
    ) -> Result<DiagnosticsReport> {
        let t0 = Instant::now();
        let n = g.features.len();
        if let Some(r) = diversity_rows
            && r.len() != n
        {
            return Err(Error::Msg(format!(
                "diagnostics: {} diversity rows for {n} generated features",
                r.len()
            )));
        }
        for (what, len) in [
            ("score rows", g.probs.len()),
            ("condition sets", g.conditions.len()),
        ] {
            if len != 0 && len != n {
                return Err(Error::Msg(format!(
                    "diagnostics: {len} {what} for {n} generated features"
                )));
            }
        }
        let k = self.spec.num_classes;
        let conditional = g.conditions.iter().any(|c| !c.is_empty());
        let has_scores = !g.probs.is_empty() && k > 0;
        let mut timings = Timings {
            fit_ms: self.fit_ms,
            ..Timings::default()
        };

        let t = Instant::now();
        let (mut class_cov, mut conf, mut hits) = (None, None, None);
        match self.spec.kind {
            ConditionKind::OneHot if has_scores => {
                let data = self
                    .data_distribution
                    .clone()
                    .unwrap_or_else(|| vec![1.0 / k as f64; k]);
                class_cov = Some(class_coverage(
                    g.probs,
                    &data,
                    self.cfg.coverage_min_share,
                    self.cfg.kl_pseudo_count,
                )?);
                if conditional {
                    conf = Some(confusion(g.probs, g.conditions, k)?);
                }
            }
            ConditionKind::MultiHot if has_scores && conditional => {
                hits = Some(label_hits(g.probs, g.conditions)?);
            }
            _ => {}
        }
        timings.coverage_ms = ms(t);

        let t = Instant::now();
        let ndb = self
            .bins
            .test(g.features, self.cfg.ndb_alpha, self.cfg.ndb_bonferroni)?;
        timings.ndb_ms = ms(t);

        let t = Instant::now();
        let prdc = self.manifold.evaluate(g.features)?;
        timings.prdc_ms = ms(t);

        let t = Instant::now();
        let conds = if conditional { g.conditions } else { &[][..] };
        let gen_div = diversity::group_diversity(diversity_rows.unwrap_or(g.features), conds, k)?;
        let real_div: Vec<GroupDiversity> = if conditional {
            self.real_diversity.clone()
        } else {
            self.real_diversity
                .iter()
                .filter(|d| d.condition.is_none())
                .cloned()
                .collect()
        };
        let diversity = diversity::compare(&gen_div, &real_div, self.cfg.diversity_flag_ratio);
        timings.diversity_ms = ms(t);

        let t = Instant::now();
        let closest_generated = closest_pairs(g.features, self.cfg.closest_pairs)?;
        timings.closest_ms = ms(t);

        let t = Instant::now();
        let base = self.baseline(n)?;
        timings.baseline_ms = ms(t);
        timings.check_ms = ms(t0);

        Ok(DiagnosticsReport {
            n_generated: n,
            n_real_reference: self.reference.len(),
            n_real_holdout: self.holdout.len(),
            baseline_n: base.n,
            class_coverage: class_cov,
            confusion: conf,
            label_hits: hits,
            ndb,
            ndb_baseline: base.ndb.clone(),
            ndb_bin_images: self.bins.nearest_real.clone(),
            prdc,
            prdc_baseline: base.prdc.clone(),
            diversity,
            closest_generated,
            closest_real: base.closest.clone(),
            timings,
        })
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
