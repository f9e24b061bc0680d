//! The one training loop, shared by the CLI and the explorer.
//!
//! [`TrainLoop`] owns a step from start to end: the update, the step statistics and images/s,
//! the alarm rules and the diagnostics checks, the NaN/Inf guard (a ring of healthy in-memory
//! snapshots, restored by [`NanPolicy`]), the collapse guard (older snapshots, rolled back to
//! when D wins outright: [`crate::config::GuardConfig`]), and the sample wall (built here and
//! nowhere else).
//! What happens with the results is up to [`Sink`]s: [`RunFolder`] writes `metrics.jsonl`,
//! sample grids and checkpoints into a run folder (CLI and explorer alike); the explorer's
//! worker forwards the events to the UI; the CLI prints progress. A checkpoint is written only
//! after a step whose weights are all finite, and `checkpoint::save` refuses non-finite values
//! besides, so nothing non-finite reaches disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::{ModelConfig, OnDWins, TrainConfig};
use crate::data::{ConditionKind, Dataset};
use crate::diagnostics::{Alarm, AlarmKind, SnapshotRing};
use crate::error::{Error, Result};
use crate::export::sheet::{SheetLayout, png_bytes, sample_sheet, save_png_bytes};
use crate::export::tensorboard::EventWriter;
use crate::images::Images;
use crate::model::Generator;
use crate::rng::Rng;
use crate::train::fid::{FidPoint, FidTracker};
use crate::train::monitor::{Check, Monitor, MonitorCost};
use crate::train::{Snapshot, StepKind, StepStats, Trainer};

/// Caption for a condition vector: the names of its active labels.
pub fn caption(cond: &[f32], names: &[String]) -> String {
    let on: Vec<&str> = cond
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(i, _)| names.get(i).map(String::as_str).unwrap_or("?"))
        .collect();
    on.join(", ")
}

/// Rows of the sample wall: every class for one-hot data, the first distinct label sets of
/// the data for multi-hot data (at most `max_rows`), `max_rows` unlabelled rows otherwise.
pub fn wall_rows(data: &dyn Dataset, k: usize, max_rows: usize) -> Vec<(String, Vec<f32>)> {
    let names = data.label_names();
    match data.condition_kind() {
        _ if k == 0 => (0..max_rows).map(|_| (String::new(), vec![])).collect(),
        ConditionKind::OneHot => (0..k)
            .map(|i| {
                let mut v = vec![0.0; k];
                v[i] = 1.0;
                (caption(&v, names), v)
            })
            .collect(),
        _ => {
            let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
            for i in 0..data.len() {
                let v = data.condition(i);
                if !rows.iter().any(|(_, r)| *r == v) {
                    rows.push((caption(&v, names), v));
                }
                if rows.len() == max_rows {
                    break;
                }
            }
            rows
        }
    }
}

/// The fixed-noise sample wall at one step: `rows x cols` images, row-major.
#[derive(Debug, Clone)]
pub struct WallFrame {
    pub step: u64,
    pub rows: usize,
    pub cols: usize,
    pub captions: Vec<String>,
    pub images: Images,
}

impl WallFrame {
    /// The wall of `generator`: one row per condition, `cols` latents per row
    /// ([`Generator::grid`] picks them from `seed`).
    pub fn render(
        generator: &Generator,
        rows: &[(String, Vec<f32>)],
        cols: usize,
        seed: u64,
        step: u64,
    ) -> Result<Self> {
        let conds: Vec<Vec<f32>> = rows.iter().map(|r| r.1.clone()).collect();
        Ok(Self {
            step,
            rows: rows.len(),
            cols,
            captions: rows.iter().map(|r| r.0.clone()).collect(),
            images: generator.grid(&conds, cols, seed)?,
        })
    }

    /// A PNG-ready sheet, row captions on the left when there are any.
    pub fn sheet(&self, scale: u32) -> Result<RgbImage> {
        self.sheet_titled(scale, None)
    }

    /// [`WallFrame::sheet`] with a title line above the grid.
    pub fn sheet_titled(&self, scale: u32, title: Option<String>) -> Result<RgbImage> {
        let captioned = self.captions.iter().any(|c| !c.is_empty());
        let layout = SheetLayout {
            rows: self.rows,
            cols: self.cols,
            scale,
            row_captions: if captioned {
                self.captions.clone()
            } else {
                vec![]
            },
            title,
            ..SheetLayout::default()
        };
        sample_sheet(&self.images, &layout)
    }
}

/// A captioned grid: one row per condition ([`Generator::grid`] picks the latents).
pub fn render_rows(
    generator: &Generator,
    rows: &[(String, Vec<f32>)],
    cols: usize,
    seed: u64,
    scale: u32,
) -> Result<RgbImage> {
    WallFrame::render(generator, rows, cols, seed, 0)?.sheet(scale)
}

/// Noise seed of the fixed sample grid.
pub const WALL_SEED: u64 = 1234;

/// What the loop does when a loss or weight turns NaN/Inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NanPolicy {
    /// Restore the last healthy snapshot and pause (the CLI stops).
    #[default]
    RestorePause,
    /// Restore the last healthy snapshot, halve both learning rates and go on.
    RestoreLowerLr,
}

/// One step's numbers, as the UI plots them and the CLI prints them.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub stats: StepStats,
    /// Real images per second seen by D since the run was (re)started.
    pub images_per_s: f64,
    pub elapsed_s: f64,
    pub step_seconds: f64,
    pub lr_g: f64,
    pub lr_d: f64,
    /// The step of the next diagnostics check, as now expected (None: diagnostics off).
    pub next_check: Option<u64>,
}

/// Generator weights on the CPU, for the explorer's own copy of G.
#[derive(Debug, Clone)]
pub struct GeneratorWeights {
    pub step: u64,
    pub model: ModelConfig,
    pub params: HashMap<String, Tensor>,
    pub state: HashMap<String, Tensor>,
    /// An imported (ONNX) generator has no tensors to copy: the graph itself is shared.
    pub imported: Option<Generator>,
    /// The sampling truncation of the generator they came from ([`Generator::truncation`]).
    pub truncation: Option<f64>,
}

impl GeneratorWeights {
    pub fn of(g: &Generator, step: u64) -> Result<Self> {
        if g.is_imported() {
            return Ok(Self {
                step,
                model: g.cfg.clone(),
                params: HashMap::new(),
                state: HashMap::new(),
                imported: Some(g.clone()),
                truncation: g.truncation(),
            });
        }
        let cpu = |m: HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>> {
            m.into_iter()
                .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.copy()?)))
                .collect()
        };
        Ok(Self {
            step,
            model: g.cfg.clone(),
            params: cpu(g.store.model_tensors())?,
            state: cpu(g.store.state_tensors())?,
            imported: None,
            truncation: g.truncation(),
        })
    }

    /// Build a CPU generator holding these weights (and sampling with their truncation).
    pub fn build(&self) -> Result<Generator> {
        let mut g = match &self.imported {
            Some(g) => g.clone(),
            None => {
                let g = Generator::new(&self.model, Rng::new(0), DType::F32, &Device::Cpu)?;
                self.load_into(&g)?;
                g
            }
        };
        g.set_truncation(self.truncation)?;
        Ok(g)
    }

    /// Copy these weights into `g` (same architecture).
    pub fn load_into(&self, g: &Generator) -> Result<()> {
        if self.imported.is_some() {
            // Same config, same graph: nothing to copy.
            return Ok(());
        }
        let p = PathBuf::from(format!("<generator weights of step {}>", self.step));
        g.store.load(&p, &self.params, true)?;
        g.store.load(&p, &self.state, false)
    }
}

/// A restore after a NaN/Inf, or a rollback after D won outright.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Step at which the NaN/Inf appeared (or the alarm fired).
    pub at: u64,
    /// Step of the snapshot restored.
    pub to: u64,
    /// Whether the policy stops the run (else it goes on with halved learning rates).
    pub paused: bool,
    pub message: String,
}

/// What the loop reports.
#[derive(Debug, Clone)]
pub enum LoopEvent {
    Step(StepEvent),
    Wall(Arc<WallFrame>),
    /// The sampling generator's weights (sent with every wall, to sinks that ask).
    Weights(Arc<GeneratorWeights>),
    Check(Box<Check>),
    /// A FID measurement (`monitor.fid_every`).
    Fid(FidPoint),
    /// Diagnostics switched on (None) or off (why).
    Diagnostics(Option<String>),
    Alarm(Alarm),
    Recovered(Recovery),
    Log(String),
}

/// An observer of the loop.
pub trait Sink {
    fn event(&mut self, ev: &LoopEvent) -> Result<()>;
    /// Whether this sink needs the wall at `step` (beyond the loop's own schedule).
    fn wants_wall(&self, _step: u64, _last: bool) -> bool {
        false
    }
    /// Whether this sink wants [`LoopEvent::Weights`] with every wall.
    fn wants_weights(&self) -> bool {
        false
    }
    /// After every step whose weights are all finite, with the trainer (for checkpoints).
    fn after_step(&mut self, _trainer: &Trainer, _last: bool) -> Result<()> {
        Ok(())
    }
}

/// Loop settings that are not part of the training config (they do not change the weights).
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Rows (caption, condition) and columns of the wall.
    pub rows: Vec<(String, Vec<f32>)>,
    pub wall_cols: usize,
    /// Build the wall every N generator steps (0: only when a sink asks).
    pub wall_every: u64,
    /// Keep a healthy in-memory snapshot every N steps, `ring` of them.
    pub snapshot_every: u64,
    pub ring: usize,
    pub nan_policy: NanPolicy,
    /// Keep the diagnostics' real-image features here between runs
    /// ([`Monitor::with_feature_cache`]); None: compute them every time.
    pub feature_cache: Option<PathBuf>,
}

impl LoopOptions {
    /// The wall of the data (8 columns, at most 8 rows), snapshots every 25 steps, 4 kept.
    pub fn for_trainer(trainer: &Trainer) -> Self {
        Self {
            rows: wall_rows(trainer.data().as_ref(), trainer.cfg.model.num_conditions, 8),
            wall_cols: 8,
            wall_every: 0,
            snapshot_every: 25,
            ring: 4,
            nan_policy: NanPolicy::RestorePause,
            feature_cache: None,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone)]
pub enum StepOutcome {
    /// `last`: the step reached the run's target step or deadline.
    Healthy { last: bool },
    /// A NaN/Inf was undone (see [`Recovery::paused`]).
    Recovered(Recovery),
}

/// When a run ends: at a generator step, at the first step that ends after a wall time or
/// after a stop request (Ctrl-C / SIGTERM in the CLI), or none of them (the explorer runs until
/// paused).
#[derive(Debug, Clone, Copy, Default)]
pub struct Until {
    pub target: Option<u64>,
    pub deadline: Option<Instant>,
    pub stop: Option<&'static AtomicBool>,
}

impl Until {
    fn reached(&self, step: u64) -> bool {
        self.target.is_some_and(|t| step >= t)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
            || self.stop.is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// The training loop: a [`Trainer`] plus everything that watches it.
pub struct TrainLoop {
    pub trainer: Trainer,
    monitor: Monitor,
    /// The full monitor while its fit runs in the background.
    monitor_rx: Option<Receiver<Result<Monitor>>>,
    /// FID every `monitor.fid_every` steps (None: off).
    fid: Option<FidTracker>,
    pub opts: LoopOptions,
    ring: SnapshotRing<Snapshot>,
    /// The collapse guard's snapshots (`guard.snapshot_every` apart) and its rollbacks so far.
    guard_ring: SnapshotRing<Snapshot>,
    rollbacks: u32,
    /// Wall time and step at which images/s is counted from.
    t0: Instant,
    step0: u64,
    /// Training time before `t0` (earlier stretches between a restart and their last
    /// step): "elapsed" counts training, not pauses, and does not reset on Resume.
    trained_before: f64,
    last_step_end: Instant,
    /// See [`Self::stop_when`].
    stop: Option<&'static AtomicBool>,
}

impl TrainLoop {
    /// A loop whose diagnostics (if `cfg.monitor.every > 0`) are fitted now.
    pub fn new(trainer: Trainer, opts: LoopOptions) -> Result<Self> {
        let monitor = Monitor::with_feature_cache(
            &trainer.cfg,
            trainer.data().as_ref(),
            trainer.device(),
            opts.feature_cache.as_deref(),
        )?;
        Self::with_monitor(trainer, opts, monitor, None)
    }

    /// A loop that trains with the alarm rules at once while the evaluator's fit on real
    /// images runs in its own thread; the diagnostics switch on when it is done. Returns why
    /// they are off for now (None when `cfg.monitor.every == 0` means they never will be).
    pub fn with_background_monitor(
        trainer: Trainer,
        opts: LoopOptions,
    ) -> Result<(Self, Option<String>)> {
        let cfg = trainer.cfg.clone();
        let monitor = Monitor::alarms_only(&cfg);
        if cfg.monitor.every == 0 {
            let l = Self::with_monitor(trainer, opts, monitor, None)?;
            return Ok((l, Some("off (every 0 steps)".to_string())));
        }
        let (tx, rx) = mpsc::channel();
        let (data, dev) = (trainer.data().clone(), trainer.device().clone());
        let cache = opts.feature_cache.clone();
        let _ = std::thread::Builder::new()
            .name("ganscope-monitor-fit".into())
            .spawn(move || {
                let m = Monitor::with_feature_cache(&cfg, data.as_ref(), &dev, cache.as_deref());
                let _ = tx.send(m);
            });
        let l = Self::with_monitor(trainer, opts, monitor, Some(rx))?;
        Ok((
            l,
            Some("starting (the evaluator is reading the real images)…".to_string()),
        ))
    }

    fn with_monitor(
        trainer: Trainer,
        opts: LoopOptions,
        monitor: Monitor,
        monitor_rx: Option<Receiver<Result<Monitor>>>,
    ) -> Result<Self> {
        let fid = FidTracker::new(&trainer.cfg, trainer.device())?;
        let mut l = Self {
            fid,
            ring: SnapshotRing::new(opts.ring.max(1)),
            guard_ring: SnapshotRing::new(trainer.cfg.guard.keep.max(1)),
            rollbacks: 0,
            step0: trainer.step,
            trainer,
            monitor,
            monitor_rx,
            opts,
            t0: Instant::now(),
            trained_before: 0.0,
            last_step_end: Instant::now(),
            stop: None,
        };
        l.take_snapshot()?;
        l.take_guard_snapshot()?;
        Ok(l)
    }

    /// Where the diagnostics' time went so far.
    pub fn monitor_cost(&self) -> MonitorCost {
        self.monitor.cost()
    }

    /// The first step after `step` at which a check can run, if diagnostics are on.
    pub fn next_check_after(&self, step: u64) -> Option<u64> {
        self.monitor.next_check_after(step)
    }

    /// Count images/s from now (after a pause); the elapsed training time goes on.
    pub fn restart_clock(&mut self) {
        if self.last_step_end > self.t0 {
            self.trained_before += (self.last_step_end - self.t0).as_secs_f64();
        }
        self.t0 = Instant::now();
        self.step0 = self.trainer.step;
    }

    /// Switch the diagnostics on once the background fit is done.
    pub fn poll_monitor(&mut self, sinks: &mut [&mut dyn Sink]) -> Result<()> {
        let Some(rx) = &self.monitor_rx else {
            return Ok(());
        };
        match rx.try_recv() {
            Ok(Ok(m)) => {
                // The full monitor takes over the alarms-only one's step history.
                let old = std::mem::replace(&mut self.monitor, m);
                self.monitor.carry_over(old);
                self.monitor_rx = None;
                emit(sinks, &LoopEvent::Diagnostics(None))?;
                let cost = self.monitor.cost();
                let msg = format!(
                    "diagnostics on (evaluator fit on real images took {:.1} s{})",
                    cost.fit_seconds,
                    if cost.fit_cached {
                        ", their features from the cache"
                    } else {
                        ""
                    }
                );
                emit(sinks, &LoopEvent::Log(msg))?;
            }
            Ok(Err(e)) => {
                self.monitor_rx = None;
                emit(sinks, &LoopEvent::Diagnostics(Some(format!("off ({e})"))))?;
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => self.monitor_rx = None,
        }
        Ok(())
    }

    /// Replace the trainer's state by a checkpoint folder's (same config); the snapshot ring
    /// starts again from it.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.trainer.load_checkpoint(dir)?;
        self.ring.clear();
        self.guard_ring.clear();
        self.take_snapshot()?;
        self.take_guard_snapshot()?;
        self.restart_clock();
        Ok(())
    }

    /// One step of `kind`, then everything that watches it. When the step reaches `until`,
    /// the sinks are told it is the last one (a sample grid and a checkpoint are due).
    pub fn step(
        &mut self,
        kind: StepKind,
        until: Until,
        sinks: &mut [&mut dyn Sink],
    ) -> Result<StepOutcome> {
        self.poll_monitor(sinks)?;
        let t = Instant::now();
        let stats = match self.trainer.step_kind(kind) {
            Ok(stats) => stats,
            // A NaN/Inf loss: that update was skipped, but the cause (a poisoned weight, an
            // exploding D already updated in this step) is in the state; restore it.
            Err(e @ Error::NonFinite { step, .. }) => {
                emit(sinks, &LoopEvent::Log(e.to_string()))?;
                return self.recover(step, sinks);
            }
            Err(e) => return Err(e),
        };
        let step_seconds = t.elapsed().as_secs_f64();
        let s = self.trainer.step;
        let last = kind != StepKind::DOnly && until.reached(s);
        let mut alarms = self.monitor.on_step(&stats, step_seconds);
        // A NaN can hide in the weights while the losses stay finite (a ReLU after a NaN
        // weight outputs 0), so the weights are checked too: one reduction per tensor.
        let weights_ok = self.trainer.weights_finite()?;
        if !weights_ok {
            let msg = format!(
                "NaN/Inf in the weights after step {s} (losses D {:.4}, G {:.4})",
                stats.d_loss, stats.g_loss
            );
            emit(sinks, &LoopEvent::Log(msg))?;
        }
        let fatal = !weights_ok || alarms.iter().any(|a| a.kind.is_fatal());
        self.last_step_end = Instant::now();
        let since = self.t0.elapsed().as_secs_f64();
        let per_step = (self.trainer.cfg.batch_size * self.trainer.cfg.loss.n_critic) as f64;
        let (lr_g, lr_d) = self.trainer.learning_rates();
        let ev = StepEvent {
            images_per_s: (s - self.step0.min(s)) as f64 * per_step / since.max(1e-9),
            elapsed_s: self.trained_before + since,
            step_seconds,
            stats,
            lr_g,
            lr_d,
            next_check: self.monitor.next_check_after(s),
        };
        emit(sinks, &LoopEvent::Step(ev))?;
        if fatal {
            for a in alarms {
                emit(sinks, &LoopEvent::Alarm(a))?;
            }
            return self.recover(s, sinks);
        }
        let g_step = kind != StepKind::DOnly;
        let guard = self.trainer.cfg.guard;
        if g_step
            && guard.on_d_wins == OnDWins::Rollback
            && let Some(at) = alarms
                .iter()
                .find(|a| matches!(a.kind, AlarmKind::DAccuracyPinned { .. }))
                .map(|a| a.step)
        {
            for a in std::mem::take(&mut alarms) {
                emit(sinks, &LoopEvent::Alarm(a))?;
            }
            if let Some(r) = self.rollback(at, sinks)? {
                return Ok(StepOutcome::Recovered(r));
            }
        }
        if g_step && s.is_multiple_of(self.opts.snapshot_every.max(1)) {
            self.take_snapshot()?;
        }
        if g_step && s.is_multiple_of(guard.snapshot_every.max(1)) {
            self.take_guard_snapshot()?;
        }
        let scheduled = self.opts.wall_every > 0 && s.is_multiple_of(self.opts.wall_every);
        if kind != StepKind::Both || scheduled || sinks.iter().any(|k| k.wants_wall(s, last)) {
            self.send_wall(sinks)?;
        }
        if g_step && self.monitor.due(s) {
            let generator = self.trainer.sampling_generator();
            let (check, more) = self
                .monitor
                .check(s, generator, self.trainer.data().as_ref())?;
            alarms.extend(more);
            emit(sinks, &LoopEvent::Check(Box::new(check)))?;
        }
        if g_step && let Some(fid) = self.fid.as_mut().filter(|f| f.due(s)) {
            let generator = self.trainer.sampling_generator();
            // A failed measurement is reported, not a reason to stop training.
            match fid.measure(s, generator, self.trainer.data().as_ref()) {
                Ok(p) => emit(sinks, &LoopEvent::Fid(p))?,
                Err(e) => emit(sinks, &LoopEvent::Log(format!("FID at step {s}: {e}")))?,
            }
        }
        for a in alarms {
            emit(sinks, &LoopEvent::Alarm(a))?;
        }
        for k in sinks.iter_mut() {
            k.after_step(&self.trainer, last)?;
        }
        Ok(StepOutcome::Healthy { last })
    }

    /// Makes [`Self::run_until`] end at the first generator step that ends after `flag` is set,
    /// as at a deadline: the sinks see that step as the last (the run folder writes its
    /// checkpoint and samples).
    pub fn stop_when(&mut self, flag: &'static AtomicBool) {
        self.stop = Some(flag);
    }

    /// Train until `target` generator steps (or the first step that ends after `deadline`, or
    /// after the [`Self::stop_when`] flag is set).
    /// A NaN/Inf under [`NanPolicy::RestorePause`] stops with an error saying where it
    /// happened and what was restored (the run folder keeps its last healthy checkpoint).
    pub fn run_until(
        &mut self,
        target: u64,
        deadline: Option<Instant>,
        sinks: &mut [&mut dyn Sink],
    ) -> Result<()> {
        self.restart_clock();
        let until = Until {
            target: Some(target),
            deadline,
            stop: self.stop,
        };
        while self.trainer.step < target {
            match self.step(StepKind::Both, until, sinks)? {
                StepOutcome::Healthy { last: true } => break,
                StepOutcome::Recovered(r) if r.paused => {
                    return Err(Error::Msg(format!(
                        "{}; stopped (the run folder keeps its last healthy checkpoint)",
                        r.message
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn take_snapshot(&mut self) -> Result<()> {
        if self.trainer.weights_finite()? {
            let snap = self.trainer.snapshot()?;
            self.ring.push(snap.step, snap);
        }
        Ok(())
    }

    /// A collapse-guard snapshot of now, under [`OnDWins::Rollback`], unless D is winning
    /// outright already or a weight is not finite.
    fn take_guard_snapshot(&mut self) -> Result<()> {
        if self.trainer.cfg.guard.on_d_wins == OnDWins::Rollback
            && !self.monitor.d_wins()
            && self.trainer.weights_finite()?
        {
            let snap = self.trainer.snapshot()?;
            self.guard_ring.push(snap.step, snap);
        }
        Ok(())
    }

    fn recover(&mut self, at: u64, sinks: &mut [&mut dyn Sink]) -> Result<StepOutcome> {
        let Some((to, snap)) = self.ring.latest() else {
            return Err(Error::Msg(format!(
                "NaN/Inf at step {at} and no healthy snapshot to restore"
            )));
        };
        self.trainer.restore(snap)?;
        self.monitor.reset_alarms();
        let (paused, message) = match self.opts.nan_policy {
            NanPolicy::RestorePause => (
                true,
                format!(
                    "NaN/Inf at step {at}: restored the healthy snapshot of step {to} and paused"
                ),
            ),
            NanPolicy::RestoreLowerLr => {
                let (g, d) = self.trainer.learning_rates();
                self.trainer.set_learning_rates(g * 0.5, d * 0.5);
                (
                    false,
                    format!(
                        "NaN/Inf at step {at}: restored the healthy snapshot of step {to}, halved \
                         the learning rates to G {:.2e}, D {:.2e} and went on",
                        g * 0.5,
                        d * 0.5
                    ),
                )
            }
        };
        let r = Recovery {
            at,
            to,
            paused,
            message,
        };
        emit(sinks, &LoopEvent::Recovered(r.clone()))?;
        self.send_wall(sinks)?;
        Ok(StepOutcome::Recovered(r))
    }

    /// Switch the collapse guard mid-run (the explorer's "When D wins"); switched on, it
    /// takes its first snapshot now (the training state as it is, unless D already wins).
    pub fn set_on_d_wins(&mut self, v: OnDWins) -> Result<()> {
        let mut guard = self.trainer.cfg.guard;
        guard.on_d_wins = v;
        guard.validate(&self.trainer.cfg.monitor.diagnostics.alarms)?;
        self.trainer.cfg.guard = guard;
        if v == OnDWins::Rollback {
            self.take_guard_snapshot()?;
        } else {
            self.guard_ring.clear();
        }
        Ok(())
    }

    /// D won outright at step `at` (the alarm fired): under [`OnDWins::Rollback`], restore the
    /// newest guard snapshot taken at or before the first step of the alarm's window, scale
    /// the learning rates and go on. None (after a log line saying why) when the rollbacks are
    /// used up or no snapshot is old enough: the alarm stands and training goes on.
    fn rollback(&mut self, at: u64, sinks: &mut [&mut dyn Sink]) -> Result<Option<Recovery>> {
        let cfg = &self.trainer.cfg;
        let guard = cfg.guard;
        if self.rollbacks >= guard.max_rollbacks {
            let msg = format!(
                "D wins outright at step {at}: no rollback, {} already (guard.max_rollbacks)",
                self.rollbacks
            );
            emit(sinks, &LoopEvent::Log(msg))?;
            return Ok(None);
        }
        // Every step feeds the alarm window, so it began `d_acc_window` steps ago.
        let window = cfg.monitor.diagnostics.alarms.d_acc_window as u64;
        let before = at.saturating_sub(window);
        let Some((to, snap)) = self.guard_ring.latest_at_or_before(before) else {
            let msg = format!(
                "D wins outright at step {at}: no rollback, no guard snapshot from step {before} \
                 or earlier (one every {} steps from the start of this run)",
                guard.snapshot_every
            );
            emit(sinks, &LoopEvent::Log(msg))?;
            return Ok(None);
        };
        self.trainer.restore(snap)?;
        self.guard_ring.truncate_after(to);
        let (g, d) = self.trainer.learning_rates();
        let (g, d) = (g * guard.lr_g_factor, d * guard.lr_d_factor);
        self.trainer.set_learning_rates(g, d);
        self.rollbacks += 1;
        self.monitor.reset_alarms();
        self.ring.clear();
        self.take_snapshot()?;
        let r = Recovery {
            at,
            to,
            paused: false,
            message: format!(
                "D wins outright at step {at}: rolled back to the snapshot of step {to} \
                 (rollback {} of at most {}), learning rates now G {g:.2e}, D {d:.2e}",
                self.rollbacks, guard.max_rollbacks
            ),
        };
        emit(sinks, &LoopEvent::Recovered(r.clone()))?;
        self.send_wall(sinks)?;
        Ok(Some(r))
    }

    /// Build the wall of the sampling generator (and its weights, for sinks that ask).
    pub fn send_wall(&mut self, sinks: &mut [&mut dyn Sink]) -> Result<()> {
        let g = self.trainer.sampling_generator();
        let step = self.trainer.step;
        let frame = WallFrame::render(g, &self.opts.rows, self.opts.wall_cols, WALL_SEED, step)?;
        emit(sinks, &LoopEvent::Wall(Arc::new(frame)))?;
        if sinks.iter().any(|k| k.wants_weights()) {
            let w = Arc::new(GeneratorWeights::of(g, step)?);
            emit(sinks, &LoopEvent::Weights(w))?;
        }
        Ok(())
    }
}

fn emit(sinks: &mut [&mut dyn Sink], ev: &LoopEvent) -> Result<()> {
    for k in sinks.iter_mut() {
        k.event(ev)?;
    }
    Ok(())
}

/// A closure as a sink (progress printing, tests).
pub struct FnSink<F>(pub F);

impl<F: FnMut(&LoopEvent)> Sink for FnSink<F> {
    fn event(&mut self, ev: &LoopEvent) -> Result<()> {
        (self.0)(ev);
        Ok(())
    }
}

/// Writes a run folder, created at its first write: `metrics.jsonl` (a line every
/// `log_every` steps, and every check, alarm and recovery), `samples/step_NNNNNN.png` every
/// `sample_every` steps and at the end, and a checkpoint (with `config.json`) every
/// `checkpoint_every` steps and at the end, and the weights of every `keep_every`th step in
/// `kept/step_NNNNNN/`. After a NaN/Inf restore, the metrics lines of the
/// undone steps are dropped, so the file reads as the run that continues.
/// Room kept for a run folder's samples and metrics beside its checkpoints when free space is
/// checked (16 MiB).
pub const SPACE_FOR_LOGS: u64 = 16 << 20;

pub struct RunFolder {
    pub dir: PathBuf,
    log_every: u64,
    sample_every: u64,
    checkpoint_every: u64,
    keep_every: u64,
    /// Pixel zoom of the sample grids.
    pub scale: u32,
    frame: Option<Arc<WallFrame>>,
    logged: Option<u64>,
    saved: Option<u64>,
    /// The last file written: a sample grid, or the folder after a checkpoint.
    pub wrote: Option<PathBuf>,
    /// Held from the first write on: one writer per run folder.
    lock: Option<checkpoint::RunLock>,
    /// Bytes that must be free when the folder is first locked (0: not checked).
    space_needed: u64,
    /// TensorBoard event file (created at the first write; see [`crate::export::tensorboard`]).
    events: Option<EventWriter>,
}

impl RunFolder {
    /// The schedule of `cfg` (`log_every`, `sample_every`, `checkpoint_every`).
    pub fn new(dir: &Path, cfg: &TrainConfig) -> Self {
        Self {
            dir: dir.to_path_buf(),
            log_every: cfg.log_every,
            sample_every: cfg.sample_every,
            checkpoint_every: cfg.checkpoint_every,
            keep_every: cfg.keep_every,
            scale: 2,
            frame: None,
            logged: None,
            saved: None,
            wrote: None,
            lock: None,
            space_needed: 0,
            events: None,
        }
    }

    /// Check, when the folder is first locked, that `bytes` are free on its filesystem (see
    /// [`checkpoint::check_free_space`]).
    pub fn with_space_needed(mut self, bytes: u64) -> Self {
        self.space_needed = bytes;
        self
    }

    /// Use a lock taken earlier on this folder.
    pub fn with_lock(mut self, lock: checkpoint::RunLock) -> Self {
        self.lock = Some(lock);
        self
    }

    /// Create and lock the folder now (the CLI does so before training: a folder that is
    /// in use or not writable is an error before any work, not at the first save).
    pub fn lock(&mut self) -> Result<()> {
        if self.lock.is_none() {
            let lock = checkpoint::RunLock::acquire(&self.dir)?;
            checkpoint::check_free_space(&self.dir, self.space_needed)?;
            self.lock = Some(lock);
        }
        Ok(())
    }

    /// Step of the last checkpoint this sink wrote.
    pub fn saved_step(&self) -> Option<u64> {
        self.saved
    }

    fn append(&mut self, line: &serde_json::Value) -> Result<()> {
        self.lock()?;
        checkpoint::append_metrics(&self.dir, line)
    }

    /// The TensorBoard event file, opened at the first use.
    fn events(&mut self) -> Result<&mut EventWriter> {
        self.lock()?;
        if self.events.is_none() {
            self.events = Some(EventWriter::create(&self.dir)?);
        }
        self.events
            .as_mut()
            .ok_or_else(|| Error::Msg("tensorboard: no event file".into()))
    }

    /// Every number of `line` (a metrics.jsonl object, nested objects flattened with `/`) as
    /// TensorBoard scalars under `prefix`.
    fn scalars(&mut self, step: u64, prefix: &str, line: &serde_json::Value) -> Result<()> {
        let mut values = Vec::new();
        crate::export::csv::flatten(prefix, line, &mut values);
        values.retain(|(k, _)| !k.ends_with("/step"));
        self.events()?.scalars(step, &values)
    }

    /// Kept weights of the steps a restore undid (after `r.to`) move to
    /// `undone/at_<r.at>[_n]/step_NNNNNN/`: `kept/` then holds the run that goes on, and passing
    /// those steps again keeps the new weights, while nothing already written is lost.
    fn set_aside_kept_after(&mut self, r: &Recovery) -> Result<()> {
        let kept = self.dir.join("kept");
        let Ok(entries) = std::fs::read_dir(&kept) else {
            return Ok(());
        };
        let mut undone: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step: u64 = name.strip_prefix("step_")?.parse().ok()?;
                (step > r.to).then(|| (step, e.path()))
            })
            .collect();
        undone.sort();
        if undone.is_empty() {
            return Ok(());
        }
        self.lock()?;
        // A second rollback from the same step gets its own folder.
        let base = self.dir.join("undone");
        let mut to = base.join(format!("at_{:06}", r.at));
        let mut n = 1;
        while to.exists() {
            n += 1;
            to = base.join(format!("at_{:06}_{n}", r.at));
        }
        std::fs::create_dir_all(&to).map_err(|e| Error::io(&to, e))?;
        for (step, from) in undone {
            let dest = to.join(format!("step_{step:06}"));
            std::fs::rename(&from, &dest).map_err(|e| Error::io(&from, e))?;
        }
        Ok(())
    }

    fn sample_due(&self, step: u64, last: bool) -> bool {
        self.sample_every > 0 && (last || (step > 0 && step.is_multiple_of(self.sample_every)))
    }
}

impl Sink for RunFolder {
    fn event(&mut self, ev: &LoopEvent) -> Result<()> {
        match ev {
            LoopEvent::Step(e) => {
                let s = e.stats.step;
                if self.log_every > 0 && s.is_multiple_of(self.log_every) && self.logged != Some(s)
                {
                    let mut line =
                        serde_json::to_value(&e.stats).map_err(|e| Error::Msg(e.to_string()))?;
                    line["elapsed_s"] = e.elapsed_s.into();
                    line["images_per_s"] = e.images_per_s.into();
                    self.append(&line)?;
                    line["lr_g"] = e.lr_g.into();
                    line["lr_d"] = e.lr_d.into();
                    self.scalars(s, "train", &line)?;
                    self.logged = Some(s);
                }
            }
            LoopEvent::Check(c) => {
                self.append(&serde_json::json!({ "step": c.step, "diagnostics": c }))?;
                let r = &c.report;
                let m = serde_json::json!({
                    "precision": r.prdc.precision,
                    "recall": r.prdc.recall,
                    "density": r.prdc.density,
                    "coverage": r.prdc.coverage,
                    "coverage_real_vs_real": r.prdc_baseline.coverage,
                    "ndb_significant_fraction": r.ndb.significant.iter().filter(|s| **s).count() as f64
                        / r.ndb.k.max(1) as f64,
                    "label_hit_rate": r.label_hits.as_ref().map(|h| h.accuracy),
                    "class_accuracy": r.confusion.as_ref().map(|c| c.accuracy),
                    "diversity_flagged": r.diversity.per_condition.iter().filter(|d| d.flagged).count(),
                    "seconds": c.seconds,
                });
                self.scalars(c.step, "diagnostics", &m)?;
            }
            LoopEvent::Fid(p) => {
                let line = serde_json::json!({ "step": p.step, "fid": p });
                self.append(&line)?;
                self.scalars(p.step, "fid", &line["fid"])?;
            }
            LoopEvent::Alarm(a) => {
                self.append(&serde_json::json!({ "step": a.step, "alarm": a }))?;
            }
            LoopEvent::Recovered(r) => {
                checkpoint::truncate_metrics_after(&self.dir, r.to)?;
                self.set_aside_kept_after(r)?;
                self.append(&serde_json::json!({
                    "step": r.to,
                    "recovered": { "at": r.at, "to": r.to, "message": r.message },
                }))?;
                self.logged = self.logged.filter(|&s| s <= r.to);
                self.saved = self.saved.filter(|&s| s <= r.to);
            }
            LoopEvent::Wall(f) => self.frame = Some(f.clone()),
            _ => {}
        }
        Ok(())
    }

    fn wants_wall(&self, step: u64, last: bool) -> bool {
        self.sample_due(step, last)
    }

    fn after_step(&mut self, trainer: &Trainer, last: bool) -> Result<()> {
        let s = trainer.step;
        if self.sample_due(s, last)
            && let Some(f) = self.frame.as_ref().filter(|f| f.step == s)
        {
            let path = self.dir.join("samples").join(format!("step_{s:06}.png"));
            let sheet = f.sheet(self.scale)?;
            // Encoded once: the sample file and the TensorBoard image share the bytes.
            let png = png_bytes(&sheet)?;
            self.lock()?;
            save_png_bytes(&png, &path)?;
            self.events()?
                .image(s, "samples/wall", &png, sheet.width(), sheet.height())?;
            self.wrote = Some(path);
        }
        // Step 0 (a D-only step before any G step) is not a checkpoint of the schedule.
        let due =
            last || (self.checkpoint_every > 0 && s > 0 && s.is_multiple_of(self.checkpoint_every));
        if due && self.saved != Some(s) {
            self.lock()?;
            trainer.save(&self.dir)?;
            self.saved = Some(s);
            self.wrote = Some(self.dir.clone());
        }
        if self.keep_every > 0 && s > 0 && s.is_multiple_of(self.keep_every) {
            let kept = self.dir.join("kept").join(format!("step_{s:06}"));
            // Written once: a resumed run that passes the step again keeps the first.
            if !kept.join(checkpoint::CONFIG_FILE).exists() {
                self.lock()?;
                trainer.save_weights(&kept)?;
            }
        }
        Ok(())
    }
}
