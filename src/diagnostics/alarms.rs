//! Alarms: a small rule engine over the training series and the diagnostic measures, and a
//! bounded ring of healthy snapshots to restore from.
//!
//! Rules (thresholds in [`AlarmConfig`]):
//! - [`AlarmKind::NonFinite`]: a loss or other logged value of a step is NaN or infinite.
//! - [`AlarmKind::DAccuracyPinned`]: D's accuracy `(acc_real + acc_fake) / 2`, averaged over
//!   the last `d_acc_window` logged steps, is at least `d_acc_pinned` (D wins every batch, G
//!   gets no useful gradient; the common prelude to collapse).
//! - [`AlarmKind::GLossFlat`]: the population variance of the G loss over the last
//!   `g_flat_window` logged steps is below `g_flat_var_eps` (G has stopped learning).
//! - [`AlarmKind::ModesLost`]: class coverage (modes covered / K) below
//!   `min_class_coverage`.
//! - [`AlarmKind::CoverageLow`]: Naeem coverage below `min_coverage_vs_baseline` times its
//!   real-vs-real baseline.
//! - [`AlarmKind::NdbHigh`]: NDB / K above `max_ndb_fraction`.
//! - [`AlarmKind::DiversityLow`]: some condition's diversity is flagged.
//!
//! Every rule but NaN/Inf stays silent before `warmup_steps`: an untrained generator covers
//! nothing and its D wins every batch, which says nothing about collapse yet. A rule still
//! true after the warm-up fires at its first point after it.
//!
//! Windows count logged points, not steps. [`AlarmMonitor`] raises an alarm when its rule
//! *becomes* true and stays quiet while it remains true (re-arming once it clears), so a
//! pinned D gives one alarm, not one per step; [`scan`] runs a monitor over a whole series.
//! Nothing here touches the trainer: it reads plain numbers ([`StepPoint`], [`MeasurePoint`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::DiagnosticsReport;
pub use crate::config::AlarmConfig;

/// Numbers from one training step (one or more D updates, then one G update), as the trainer
/// reports them (`crate::train` re-exports this type).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub step: u64,
    pub d_loss: f64,
    pub g_loss: f64,
    /// Mean D logit (critic value) on the last real and fake batches.
    pub d_real: f64,
    pub d_fake: f64,
    /// Fraction of real logits > 0 and of fake logits < 0 (D's "accuracy"; 0.5 is ideal).
    pub d_acc_real: f64,
    pub d_acc_fake: f64,
    /// Gradient penalty (WGAN-GP) before multiplying by lambda.
    pub gp: Option<f64>,
    /// R1 penalty before multiplying by gamma / 2.
    pub r1: Option<f64>,
    /// ACGAN auxiliary losses.
    pub aux_d: Option<f64>,
    pub aux_g: Option<f64>,
    /// How well D's auxiliary head reads the conditions (the course's top-k hit rate: for a
    /// row with k labels, the share of them among its k highest logits; top-1 for one-hot
    /// conditions): on the real batch (D's classifier), and on G's batch against the
    /// conditions G was asked for (how much of them D finds in the fakes).
    pub aux_acc_real: Option<f64>,
    pub aux_acc_fake: Option<f64>,
    /// Global L2 norm of D's gradient (last D update, penalties included) and of G's (the
    /// G update), before the optimiser step.
    #[serde(default)]
    pub d_grad_norm: f64,
    #[serde(default)]
    pub g_grad_norm: f64,
}

/// One logged training step, as plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    pub step: u64,
    pub d_loss: f64,
    pub g_loss: f64,
    /// D accuracy on real and on fake batches (None if not measured).
    pub d_acc_real: Option<f64>,
    pub d_acc_fake: Option<f64>,
    /// Other values checked for NaN / Inf (penalties, auxiliary losses, weight norms...).
    pub other: Vec<(String, f64)>,
}

impl From<&StepStats> for StepPoint {
    fn from(s: &StepStats) -> Self {
        let mut other = vec![
            ("d_real".to_string(), s.d_real),
            ("d_fake".to_string(), s.d_fake),
            ("d_grad_norm".to_string(), s.d_grad_norm),
            ("g_grad_norm".to_string(), s.g_grad_norm),
        ];
        for (name, v) in [
            ("gp", s.gp),
            ("r1", s.r1),
            ("aux_d", s.aux_d),
            ("aux_g", s.aux_g),
            ("aux_acc_real", s.aux_acc_real),
            ("aux_acc_fake", s.aux_acc_fake),
        ] {
            if let Some(v) = v {
                other.push((name.to_string(), v));
            }
        }
        Self {
            step: s.step,
            d_loss: s.d_loss,
            g_loss: s.g_loss,
            d_acc_real: Some(s.d_acc_real),
            d_acc_fake: Some(s.d_acc_fake),
            other,
        }
    }
}

/// The diagnostic numbers the alarm rules read (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeasurePoint {
    pub step: u64,
    /// Modes covered / K.
    pub class_coverage: Option<f64>,
    /// Naeem coverage and its real-vs-real baseline.
    pub coverage: Option<f64>,
    pub coverage_baseline: Option<f64>,
    /// NDB / K.
    pub ndb_fraction: Option<f64>,
    /// Flagged diversity groups (label id, None = all samples) and the smallest ratio.
    pub diversity_flagged: Vec<Option<u16>>,
    pub diversity_min_ratio: Option<f64>,
}

impl MeasurePoint {
    pub fn from_report(step: u64, r: &DiagnosticsReport) -> Self {
        Self {
            step,
            class_coverage: r.class_coverage.as_ref().map(|c| c.coverage),
            coverage: Some(r.prdc.coverage),
            coverage_baseline: Some(r.prdc_baseline.coverage),
            ndb_fraction: Some(r.ndb.ndb_over_k),
            diversity_flagged: r
                .diversity
                .per_condition
                .iter()
                .filter(|c| c.flagged)
                .map(|c| c.condition)
                .collect(),
            diversity_min_ratio: r.diversity.min_ratio,
        }
    }
}

/// What an alarm is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AlarmKind {
    NonFinite {
        names: Vec<String>,
    },
    DAccuracyPinned {
        mean_accuracy: f64,
        window: usize,
    },
    GLossFlat {
        variance: f64,
        window: usize,
    },
    ModesLost {
        class_coverage: f64,
    },
    CoverageLow {
        coverage: f64,
        baseline: f64,
    },
    NdbHigh {
        ndb_fraction: f64,
    },
    DiversityLow {
        conditions: Vec<Option<u16>>,
        min_ratio: Option<f64>,
    },
}

impl AlarmKind {
    /// Rule identity (alarms of one rule share it, whatever their numbers).
    fn rule(&self) -> usize {
        match self {
            AlarmKind::NonFinite { .. } => 0,
            AlarmKind::DAccuracyPinned { .. } => 1,
            AlarmKind::GLossFlat { .. } => 2,
            AlarmKind::ModesLost { .. } => 3,
            AlarmKind::CoverageLow { .. } => 4,
            AlarmKind::NdbHigh { .. } => 5,
            AlarmKind::DiversityLow { .. } => 6,
        }
    }

    /// True for alarms after which the run should be restored (its state is corrupt).
    pub fn is_fatal(&self) -> bool {
        matches!(self, AlarmKind::NonFinite { .. })
    }
}

const RULES: usize = 7;

/// A raised alarm: the step it fired at, what it is, and a sentence for the log / UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    pub step: u64,
    pub kind: AlarmKind,
    pub message: String,
}

fn alarm(step: u64, kind: AlarmKind, cfg: &AlarmConfig) -> Alarm {
    let message = match &kind {
        AlarmKind::NonFinite { names } => {
            format!("step {step}: NaN/Inf in {}", names.join(", "))
        }
        AlarmKind::DAccuracyPinned {
            mean_accuracy,
            window,
        } => format!(
            "step {step}: D accuracy pinned at {:.1}% over the last {window} logged steps \
             (alarm at >= {:.1}%; 50% is ideal): D is winning outright",
            100.0 * mean_accuracy,
            100.0 * cfg.d_acc_pinned
        ),
        AlarmKind::GLossFlat { variance, window } => format!(
            "step {step}: G loss flat over the last {window} logged steps (variance {variance:.2e} \
             < {:.1e}): G has stopped learning",
            cfg.g_flat_var_eps
        ),
        AlarmKind::ModesLost { class_coverage } => format!(
            "step {step}: class coverage {:.0}% (< {:.0}%): the generator has dropped modes",
            100.0 * class_coverage,
            100.0 * cfg.min_class_coverage
        ),
        AlarmKind::CoverageLow { coverage, baseline } => format!(
            "step {step}: feature-space coverage {coverage:.3} vs real baseline {baseline:.3} \
             (< {:.0}% of it): parts of the data are not generated",
            100.0 * cfg.min_coverage_vs_baseline
        ),
        AlarmKind::NdbHigh { ndb_fraction } => format!(
            "step {step}: NDB/K = {ndb_fraction:.2} (> {:.2}): many k-means bins differ from real",
            cfg.max_ndb_fraction
        ),
        AlarmKind::DiversityLow {
            conditions,
            min_ratio,
        } => {
            let names: Vec<String> = conditions
                .iter()
                .map(|c| c.map_or("all samples".to_string(), |l| format!("label {l}")))
                .collect();
            format!(
                "step {step}: generated samples far less diverse than real ones for {} \
                 (lowest generated/real ratio {})",
                names.join(", "),
                min_ratio.map_or("n/a".to_string(), |r| format!("{r:.2}"))
            )
        }
    };
    Alarm {
        step,
        kind,
        message,
    }
}

/// Evaluates the rules as points arrive (see the module doc).
#[derive(Debug, Clone)]
pub struct AlarmMonitor {
    pub cfg: AlarmConfig,
    recent: VecDeque<StepPoint>,
    active: [bool; RULES],
}

impl AlarmMonitor {
    pub fn new(cfg: AlarmConfig) -> Self {
        Self {
            cfg,
            recent: VecDeque::new(),
            active: [false; RULES],
        }
    }

    /// Forget the window and re-arm every rule (e.g. after restoring a snapshot).
    pub fn reset(&mut self) {
        self.recent.clear();
        self.active = [false; RULES];
    }

    /// Whether the "D accuracy pinned" rule holds now (D is winning outright).
    pub fn d_wins(&self) -> bool {
        self.active[1]
    }

    /// Apply one rule's verdict: an alarm only on its rising edge (and, but for NaN/Inf,
    /// not during the warm-up, which leaves the rule armed).
    fn edge(&mut self, rule: usize, hit: Option<AlarmKind>, step: u64, out: &mut Vec<Alarm>) {
        if rule != 0 && step < self.cfg.warmup_steps {
            return;
        }
        match hit {
            Some(kind) => {
                debug_assert_eq!(kind.rule(), rule);
                if !self.active[rule] {
                    self.active[rule] = true;
                    out.push(alarm(step, kind, &self.cfg));
                }
            }
            None => self.active[rule] = false,
        }
    }

    /// Feed one logged step; returns the alarms it raises.
    pub fn push_step(&mut self, p: &StepPoint) -> Vec<Alarm> {
        let mut out = vec![];
        let mut bad: Vec<String> = [("d_loss", p.d_loss), ("g_loss", p.g_loss)]
            .into_iter()
            .chain(p.d_acc_real.map(|v| ("d_acc_real", v)))
            .chain(p.d_acc_fake.map(|v| ("d_acc_fake", v)))
            .filter(|(_, v)| !v.is_finite())
            .map(|(n, _)| n.to_string())
            .collect();
        bad.extend(
            p.other
                .iter()
                .filter(|(_, v)| !v.is_finite())
                .map(|(n, _)| n.clone()),
        );
        let non_finite = (!bad.is_empty()).then_some(AlarmKind::NonFinite { names: bad });
        self.edge(0, non_finite, p.step, &mut out);

        let keep = self.cfg.d_acc_window.max(self.cfg.g_flat_window).max(1);
        self.recent.push_back(p.clone());
        while self.recent.len() > keep {
            self.recent.pop_front();
        }

        let w = self.cfg.d_acc_window;
        let pinned = if w > 0 && self.recent.len() >= w {
            let accs: Vec<f64> = self
                .recent
                .iter()
                .rev()
                .take(w)
                .filter_map(|q| match (q.d_acc_real, q.d_acc_fake) {
                    (Some(a), Some(b)) => Some(0.5 * (a + b)),
                    (Some(a), None) | (None, Some(a)) => Some(a),
                    _ => None,
                })
                .collect();
            let mean = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
            (accs.len() == w && mean >= self.cfg.d_acc_pinned).then_some(
                AlarmKind::DAccuracyPinned {
                    mean_accuracy: mean,
                    window: w,
                },
            )
        } else {
            None
        };
        self.edge(1, pinned, p.step, &mut out);

        let w = self.cfg.g_flat_window;
        let flat = if w > 1 && self.recent.len() >= w {
            let g: Vec<f64> = self.recent.iter().rev().take(w).map(|q| q.g_loss).collect();
            let mean = g.iter().sum::<f64>() / w as f64;
            let var = g.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / w as f64;
            // A NaN variance is the NaN rule's business, not this one's.
            (var < self.cfg.g_flat_var_eps).then_some(AlarmKind::GLossFlat {
                variance: var,
                window: w,
            })
        } else {
            None
        };
        self.edge(2, flat, p.step, &mut out);
        out
    }

    /// Feed one diagnostics check; returns the alarms it raises.
    pub fn push_measures(&mut self, m: &MeasurePoint) -> Vec<Alarm> {
        let c = &self.cfg;
        let modes = m
            .class_coverage
            .filter(|&v| v < c.min_class_coverage)
            .map(|v| AlarmKind::ModesLost { class_coverage: v });
        let cov = match (m.coverage, m.coverage_baseline) {
            (Some(v), Some(b)) if v < c.min_coverage_vs_baseline * b => {
                Some(AlarmKind::CoverageLow {
                    coverage: v,
                    baseline: b,
                })
            }
            _ => None,
        };
        let ndb = m
            .ndb_fraction
            .filter(|&v| v > c.max_ndb_fraction)
            .map(|v| AlarmKind::NdbHigh { ndb_fraction: v });
        let div =
            (c.diversity && !m.diversity_flagged.is_empty()).then(|| AlarmKind::DiversityLow {
                conditions: m.diversity_flagged.clone(),
                min_ratio: m.diversity_min_ratio,
            });
        let mut out = vec![];
        self.edge(3, modes, m.step, &mut out);
        self.edge(4, cov, m.step, &mut out);
        self.edge(5, ndb, m.step, &mut out);
        self.edge(6, div, m.step, &mut out);
        out
    }
}

/// Every alarm a monitor with `cfg` raises over a whole series of steps.
pub fn scan(series: &[StepPoint], cfg: &AlarmConfig) -> Vec<Alarm> {
    let mut m = AlarmMonitor::new(cfg.clone());
    series.iter().flat_map(|p| m.push_step(p)).collect()
}

/// A bounded ring of the most recent healthy snapshots (oldest dropped first).
#[derive(Debug, Clone)]
pub struct SnapshotRing<T> {
    cap: usize,
    items: VecDeque<(u64, T)>,
}

impl<T> SnapshotRing<T> {
    /// A ring holding at most `capacity` snapshots (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            cap: capacity.max(1),
            items: VecDeque::with_capacity(capacity.max(1)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Store a healthy snapshot taken at `step`; returns the one evicted to make room.
    pub fn push(&mut self, step: u64, snapshot: T) -> Option<(u64, T)> {
        let evicted = if self.items.len() == self.cap {
            self.items.pop_front()
        } else {
            None
        };
        self.items.push_back((step, snapshot));
        evicted
    }

    /// The newest snapshot and its step.
    pub fn latest(&self) -> Option<(u64, &T)> {
        self.items.back().map(|(s, t)| (*s, t))
    }

    /// Remove and return the newest snapshot (to go further back if it too proves bad).
    pub fn pop_latest(&mut self) -> Option<(u64, T)> {
        self.items.pop_back()
    }

    /// The newest snapshot taken at or before `step`.
    pub fn latest_at_or_before(&self, step: u64) -> Option<(u64, &T)> {
        self.items
            .iter()
            .rev()
            .find(|(s, _)| *s <= step)
            .map(|(s, t)| (*s, t))
    }

    /// Drop snapshots taken after `step` (e.g. after restoring an earlier one).
    pub fn truncate_after(&mut self, step: u64) {
        while self.items.back().is_some_and(|(s, _)| *s > step) {
            self.items.pop_back();
        }
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// Oldest to newest.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.items.iter().map(|(s, t)| (*s, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Default thresholds without the warm-up (these series start at step 0).
    fn no_warmup() -> AlarmConfig {
        AlarmConfig {
            warmup_steps: 0,
            ..AlarmConfig::default()
        }
    }

    /// A healthy-looking series: D accuracy uniform in [0.45, 0.85], G loss 1.5 +- 0.3.
    fn healthy(n: usize, seed: u64) -> Vec<StepPoint> {
        let mut rng = Rng::new(seed);
        (0..n as u64)
            .map(|step| StepPoint {
                step,
                d_loss: 1.2 + 0.2 * rng.uniform(),
                g_loss: 1.5 + 0.3 * (2.0 * rng.uniform() - 1.0),
                d_acc_real: Some(0.45 + 0.4 * rng.uniform()),
                d_acc_fake: Some(0.45 + 0.4 * rng.uniform()),
                other: vec![("gp".into(), 0.1)],
            })
            .collect()
    }

    #[test]
    fn healthy_series_is_quiet() {
        // Mean D accuracy 0.65 (never near 0.95), G loss variance 0.3^2 / 3 = 0.03 (far
        // above 1e-6), all finite: no rule can fire.
        assert!(scan(&healthy(1000, 1), &AlarmConfig::default()).is_empty());
    }

    #[test]
    fn nan_fires_once_per_episode() {
        // NaN in g_loss at step 30 and Inf in "gp" at 31: one alarm at 30 (the rule stays
        // active through 31); finite again at 32; NaN d_loss at 40 fires again.
        let mut s = healthy(50, 2);
        s[30].g_loss = f64::NAN;
        s[31].other[0].1 = f64::INFINITY;
        s[40].d_loss = f64::NAN;
        let a = scan(&s, &AlarmConfig::default());
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(a[0].step, 30);
        assert_eq!(
            a[0].kind,
            AlarmKind::NonFinite {
                names: vec!["g_loss".into()]
            }
        );
        assert!(a[0].message.contains("step 30") && a[0].message.contains("g_loss"));
        assert!(a[0].kind.is_fatal());
        assert_eq!(a[1].step, 40);
    }

    #[test]
    fn pinned_d_accuracy() {
        // 100 healthy points (accuracy a_i, mean ~0.65), then accuracy 1.0. Window 200,
        // threshold 0.95: the first 199 points cannot fire (window not full), and the window
        // of the last 200 reaches mean >= 0.95 once x points of 1.0 outweigh the 200 - x
        // healthy ones: (x + sum of the last 200 - x healthy) / 200 >= 0.95. Computed below
        // from the actual series; it must fire once, at that step, between 100 + 170 and
        // 100 + 190 (with healthy mean 0.65: x >= 200 - 0.05 * 200 / 0.35 = 171.4).
        let mut s = healthy(100, 3);
        for step in 100..400u64 {
            s.push(StepPoint {
                step,
                d_acc_real: Some(1.0),
                d_acc_fake: Some(1.0),
                ..s[(step % 100) as usize].clone()
            });
        }
        let acc: Vec<f64> = s
            .iter()
            .map(|p| 0.5 * (p.d_acc_real.unwrap() + p.d_acc_fake.unwrap()))
            .collect();
        let want = (199..400)
            .find(|&i| acc[i + 1 - 200..=i].iter().sum::<f64>() / 200.0 >= 0.95)
            .unwrap() as u64;
        assert!((270..=290).contains(&want), "{want}");
        let a = scan(&s, &no_warmup());
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].step, want);
        assert!(matches!(a[0].kind, AlarmKind::DAccuracyPinned { .. }));
        assert!(a[0].message.contains(&format!("step {want}")));
    }

    #[test]
    fn flat_g_loss() {
        // 100 healthy points, then G loss exactly 5.0. Window 50: the last 50 are all 5.0
        // first at point 100 + 49 = 149 (variance 0 < 1e-6); before that the window holds at
        // least one healthy value (<= 1.8, so >= 3.2 below 5.0): variance >= 3.2^2 * 49 / 2500
        // = 0.2 with a single one.
        let mut s = healthy(100, 4);
        for step in 100..300u64 {
            s.push(StepPoint {
                step,
                g_loss: 5.0,
                ..s[(step % 100) as usize].clone()
            });
        }
        let cfg = AlarmConfig {
            g_flat_window: 50,
            ..no_warmup()
        };
        let a = scan(&s, &cfg);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].step, 149);
        assert!(matches!(a[0].kind, AlarmKind::GLossFlat { window: 50, .. }));
    }

    #[test]
    fn measure_rules_fire_on_rising_edges() {
        let mut m = AlarmMonitor::new(no_warmup());
        let good = MeasurePoint {
            step: 100,
            class_coverage: Some(1.0),
            coverage: Some(0.95),
            coverage_baseline: Some(0.97),
            ndb_fraction: Some(0.06),
            diversity_flagged: vec![],
            diversity_min_ratio: Some(0.9),
        };
        assert!(m.push_measures(&good).is_empty());
        // Collapse: 1 of 10 modes, coverage 0.1 of baseline 0.97 (< 0.5 x), NDB/K 1.0,
        // label 3 flagged: all four rules fire, once.
        let bad = MeasurePoint {
            step: 200,
            class_coverage: Some(0.1),
            coverage: Some(0.1),
            ndb_fraction: Some(1.0),
            diversity_flagged: vec![Some(3)],
            diversity_min_ratio: Some(0.05),
            ..good.clone()
        };
        let a = m.push_measures(&bad);
        assert_eq!(a.len(), 4, "{a:?}");
        assert!(
            a.iter()
                .all(|x| x.step == 200 && x.message.contains("step 200"))
        );
        assert!(a[3].message.contains("label 3"));
        assert!(
            m.push_measures(&MeasurePoint {
                step: 300,
                ..bad.clone()
            })
            .is_empty()
        );
        assert!(m.push_measures(&good).is_empty());
        assert_eq!(m.push_measures(&bad).len(), 4);
    }

    #[test]
    fn warmup_silences_all_but_nan() {
        // Default warm-up 500. D accuracy 1.0 from step 0: the window (200) is full and
        // pinned from step 199, but the first alarm is at step 500, the first step out of the
        // warm-up. A NaN at step 50 fires at once. A collapsed check at step 400 is silent,
        // the same at step 600 fires (the rule stayed armed).
        let cfg = AlarmConfig::default();
        assert_eq!(cfg.warmup_steps, 500);
        let mut s = healthy(700, 5);
        for p in &mut s {
            p.d_acc_real = Some(1.0);
            p.d_acc_fake = Some(1.0);
        }
        s[50].g_loss = f64::NAN;
        let a = scan(&s, &cfg);
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!((a[0].step, a[0].kind.is_fatal()), (50, true));
        assert_eq!(a[1].step, 500);
        assert!(matches!(a[1].kind, AlarmKind::DAccuracyPinned { .. }));
        let mut m = AlarmMonitor::new(cfg);
        let bad = MeasurePoint {
            step: 400,
            ndb_fraction: Some(1.0),
            ..MeasurePoint::default()
        };
        assert!(m.push_measures(&bad).is_empty());
        let a = m.push_measures(&MeasurePoint { step: 600, ..bad });
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(matches!(a[0].kind, AlarmKind::NdbHigh { .. }));
    }

    #[test]
    fn from_step_stats() {
        let s = StepStats {
            step: 7,
            g_loss: f64::NAN,
            gp: Some(f64::INFINITY),
            ..StepStats::default()
        };
        let a = AlarmMonitor::new(AlarmConfig::default()).push_step(&StepPoint::from(&s));
        assert_eq!(
            a[0].kind,
            AlarmKind::NonFinite {
                names: vec!["g_loss".into(), "gp".into()]
            }
        );
    }

    #[test]
    fn snapshot_ring() {
        let mut r = SnapshotRing::new(3);
        assert!(r.is_empty() && r.latest().is_none());
        for step in [10u64, 20, 30] {
            assert_eq!(r.push(step, format!("s{step}")), None);
        }
        // Full: pushing 40 evicts the oldest (10).
        assert_eq!(r.push(40, "s40".into()), Some((10, "s10".into())));
        assert_eq!(r.len(), 3);
        assert_eq!(r.latest(), Some((40, &"s40".to_string())));
        assert_eq!(r.latest_at_or_before(35), Some((30, &"s30".to_string())));
        assert_eq!(r.latest_at_or_before(5), None);
        assert_eq!(r.pop_latest(), Some((40, "s40".into())));
        r.truncate_after(20);
        assert_eq!(r.iter().map(|(s, _)| s).collect::<Vec<_>>(), vec![20]);
        assert_eq!(SnapshotRing::<u8>::new(0).capacity(), 1);
    }
}
