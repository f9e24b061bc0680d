//! The training session behind the explorer: a [`Trainer`] in a background thread, driven by
//! typed [`Command`]s and reporting through typed [`Event`]s that carry CPU data only. After
//! each event the thread calls the `wake` callback (the UI passes `ctx.request_repaint`).
//!
//! The steps themselves (NaN guard, alarms, diagnostics, wall) are the one training loop's,
//! [`TrainLoop`]; the session's run folder is written by its [`RunFolder`] sink. Also here: a
//! second thread, the [`Renderer`], that runs the explorer's generator copy for latent sliders
//! and interpolation so that neither waits for a training step.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::config::{OnDWins, TrainConfig};
use crate::data::{self, ConditionKind, Dataset};
use crate::error::{Error, Result};
use crate::images::Images;
use crate::model::Generator;
pub use crate::train::run::{GeneratorWeights, NanPolicy, Recovery, StepEvent, WallFrame};
use crate::train::run::{
    LoopEvent, LoopOptions, RunFolder, SPACE_FOR_LOGS, Sink, StepOutcome, TrainLoop, Until,
    wall_rows,
};
use crate::train::{StepKind, Trainer};

/// Called after every event so the UI wakes up (e.g. `egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// UI -> trainer.
#[derive(Debug, Clone)]
pub enum Command {
    /// Train continuously (until the target step, if one is set).
    Run,
    Pause,
    /// One step of the given kind (also while paused).
    Step(StepKind),
    SetLearningRates {
        g: f64,
        d: f64,
    },
    SetNCritic(usize),
    /// Re-render the wall every N generator steps.
    SetWallEvery(u64),
    /// Pause when this generator step is reached (0 = no target).
    SetTarget(u64),
    /// Rows (caption, condition) and columns (noise seeds) of the wall.
    SetWall {
        rows: Vec<(String, Vec<f32>)>,
        cols: usize,
    },
    SetNanPolicy(NanPolicy),
    /// What the loop does when D wins outright (see [`crate::config::GuardConfig`]).
    SetOnDWins(OnDWins),
    /// Sample the wall (and what the weights snapshots build) with the truncation trick at
    /// this threshold (`None` = off); see [`crate::model::latent_truncated`].
    SetTruncation(Option<f64>),
    /// Write a checkpoint (and config.json) into this folder.
    Save(PathBuf),
    /// Replace the state by the newest checkpoint of this folder (same config).
    Load(PathBuf),
    /// Poison one generator weight with NaN (a test and demo of the NaN guard).
    InjectNan,
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Loading,
    Paused,
    Running,
    Stopped,
}

/// What the UI needs to know about a session once it is built.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub cfg: TrainConfig,
    pub step: u64,
    pub data_source: String,
    pub data_len: usize,
    pub label_names: Vec<String>,
    pub condition_kind: ConditionKind,
    pub g_params: usize,
    pub d_params: usize,
    pub device: String,
    /// Why diagnostics are off, when they are.
    pub diagnostics_off: Option<String>,
    /// A few real images (for the diagnostics' reference galleries).
    pub real_examples: Images,
    pub wall_rows: Vec<(String, Vec<f32>)>,
    pub wall_cols: usize,
    /// Where the session writes metrics.jsonl, sample grids and periodic checkpoints.
    pub run_dir: Option<PathBuf>,
    pub seconds_to_build: f64,
}

/// Trainer -> UI.
#[derive(Debug, Clone)]
pub enum Event {
    Ready(Box<SessionInfo>),
    State(RunState),
    /// What the one training loop reports (steps, walls, weights, checks, alarms, logs),
    /// forwarded as is.
    Loop(LoopEvent),
    Saved(PathBuf),
    /// The session failed; the thread has ended. Start a new one to go on.
    Error(String),
}

impl Event {
    /// A log line.
    pub fn log(s: String) -> Self {
        Event::Loop(LoopEvent::Log(s))
    }
}

/// How to build a session.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub cfg: TrainConfig,
    pub device: Device,
    /// Resume from this run folder's newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Start running at once (else paused).
    pub run: bool,
    pub wall_every: u64,
    pub wall_cols: usize,
    pub wall_max_rows: usize,
    /// Take a healthy snapshot every N steps, keeping `ring` of them.
    pub snapshot_every: u64,
    pub ring: usize,
    pub nan_policy: NanPolicy,
    /// Fit channels and labels of the model to the dataset (a folder the user opened).
    pub adapt_to_data: bool,
    /// Write metrics.jsonl, sample grids and a checkpoint every `cfg.checkpoint_every` steps
    /// into this folder (created at the first write).
    pub run_dir: Option<PathBuf>,
    /// Keep the diagnostics' real-image features here between sessions (see
    /// [`crate::train::monitor::Monitor::with_feature_cache`]).
    pub feature_cache: Option<PathBuf>,
}

impl SessionSpec {
    pub fn new(cfg: TrainConfig, device: Device) -> Self {
        Self {
            wall_every: cfg.sample_every.clamp(1, 50),
            cfg,
            device,
            resume: None,
            run: true,
            wall_cols: 8,
            wall_max_rows: 8,
            snapshot_every: 25,
            ring: 4,
            nan_policy: NanPolicy::default(),
            adapt_to_data: false,
            run_dir: None,
            feature_cache: None,
        }
    }
}

/// The UI's end of a session.
pub struct Session {
    tx: Sender<Command>,
    pub events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    /// Start the worker thread. It builds the dataset and the trainer, sends
    /// [`Event::Ready`], then follows commands.
    pub fn spawn(spec: SessionSpec, wake: Waker) -> Self {
        let (tx, rx) = mpsc::channel();
        let (etx, events) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ganscope-trainer".into())
            .spawn(move || {
                let mut out = Outbox { tx: etx, wake };
                out.send(Event::State(RunState::Loading));
                if spec.cfg.model.arch == crate::config::Arch::Onnx {
                    if let Err(e) = view_imported(spec, &rx, &mut out) {
                        out.send(Event::Error(e.to_string()));
                    }
                    out.send(Event::State(RunState::Stopped));
                    return;
                }
                match Worker::build(spec, &mut out) {
                    Ok(mut w) => {
                        if let Err(e) = w.run(&rx, &mut out) {
                            out.send(Event::Error(e.to_string()));
                        }
                    }
                    Err(e) => out.send(Event::Error(e.to_string())),
                }
                out.send(Event::State(RunState::Stopped));
            })
            .ok();
        Self { tx, events, thread }
    }

    /// Send a command; false when the worker has ended.
    pub fn send(&self, c: Command) -> bool {
        self.tx.send(c).is_ok()
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        // The thread finishes its current step and exits; it is not joined so that the UI
        // never waits for a slow step.
    }
}

struct Outbox {
    tx: Sender<Event>,
    wake: Waker,
}

impl Outbox {
    fn send(&self, e: Event) {
        let _ = self.tx.send(e);
        (self.wake)();
    }
}

/// The loop's events, forwarded to the UI.
impl Sink for Outbox {
    fn event(&mut self, ev: &LoopEvent) -> Result<()> {
        self.send(Event::Loop(ev.clone()));
        Ok(())
    }

    fn wants_weights(&self) -> bool {
        true
    }
}

/// The session's run folder as a sink that never stops training: its first error is kept
/// (and the folder then left alone) for the worker to report.
struct Tolerant<'a> {
    inner: Option<&'a mut RunFolder>,
    failed: Option<Error>,
}

impl Tolerant<'_> {
    fn guard(&mut self, f: impl FnOnce(&mut RunFolder) -> Result<()>) -> Result<()> {
        if let Some(folder) = self.inner.as_deref_mut()
            && let Err(e) = f(folder)
        {
            self.failed = Some(e);
            self.inner = None;
        }
        Ok(())
    }
}

impl Sink for Tolerant<'_> {
    fn event(&mut self, ev: &LoopEvent) -> Result<()> {
        self.guard(|f| f.event(ev))
    }

    fn wants_wall(&self, step: u64, last: bool) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|f| f.wants_wall(step, last))
    }

    fn after_step(&mut self, trainer: &Trainer, last: bool) -> Result<()> {
        self.guard(|f| f.after_step(trainer, last))
    }
}

struct Worker {
    lp: TrainLoop,
    /// The session's run folder (metrics.jsonl, sample grids, periodic checkpoints).
    folder: Option<RunFolder>,
    running: bool,
    target: u64,
}

impl Worker {
    fn build(spec: SessionSpec, out: &mut Outbox) -> Result<Self> {
        let t0 = Instant::now();
        let mut cfg = spec.cfg.clone();
        cfg.validate()?;
        let data: Arc<dyn Dataset> = Arc::new(data::open(&cfg.data, cfg.model.image_size)?);
        if spec.adapt_to_data {
            let m = &mut cfg.model;
            m.channels = data.image_shape().0;
            m.num_conditions = data.num_conditions();
            m.condition_kind = data.condition_kind();
            m.label_names = data.label_names().to_vec();
            if m.num_conditions == 0 {
                m.conditioning = crate::config::Conditioning::None;
            }
            cfg.validate()?;
        }
        let mut trainer = Trainer::new(cfg.clone(), data.clone(), &spec.device)?;
        if let Some(dir) = &spec.resume {
            trainer.load_checkpoint(dir)?;
            for note in &trainer.load_notes {
                out.send(Event::log(format!("checkpoint: {note}")));
            }
            if crate::checkpoint::is_weights_folder(dir) {
                out.send(Event::log(format!(
                    "{} holds weights only (a shipped generator): training on starts Adam \
                     afresh at step {}; Save writes a full run folder elsewhere",
                    dir.display(),
                    trainer.step
                )));
            }
        }
        let rows = wall_rows(data.as_ref(), cfg.model.num_conditions, spec.wall_max_rows);
        let opts = LoopOptions {
            rows: rows.clone(),
            wall_cols: spec.wall_cols,
            wall_every: spec.wall_every.max(1),
            snapshot_every: spec.snapshot_every,
            ring: spec.ring,
            nan_policy: spec.nan_policy,
            feature_cache: spec.feature_cache.clone(),
        };
        // The explorer's run folder holds up to three checkpoint sets during a save, plus
        // samples and metrics.
        let space_needed = 3 * trainer.checkpoint_bytes() + SPACE_FOR_LOGS;
        let info_base = (
            trainer.step,
            trainer.generator.store.num_params(),
            trainer.discriminator.store.num_params(),
        );
        // The evaluator's fit on real data can take a while: it runs in its own thread and
        // the diagnostics switch on when it is done (training does not wait for it).
        let (lp, off) = TrainLoop::with_background_monitor(trainer, opts)?;
        let n_ex = 64.min(data.len());
        let (x, _) = data.batch(&(0..n_ex).collect::<Vec<_>>(), &Device::Cpu)?;
        let info = SessionInfo {
            step: info_base.0,
            data_source: data_source(&cfg, data.as_ref()),
            data_len: data.len(),
            label_names: data.label_names().to_vec(),
            condition_kind: data.condition_kind(),
            g_params: info_base.1,
            d_params: info_base.2,
            device: format!("{:?}", spec.device),
            diagnostics_off: off,
            real_examples: Images::from_tensor(&x)?,
            wall_rows: rows,
            wall_cols: spec.wall_cols,
            run_dir: spec.run_dir.clone(),
            seconds_to_build: t0.elapsed().as_secs_f64(),
            cfg: cfg.clone(),
        };
        out.send(Event::Ready(Box::new(info)));
        let mut w = Self {
            folder: spec
                .run_dir
                .as_deref()
                .map(|d| RunFolder::new(d, &cfg).with_space_needed(space_needed)),
            lp,
            target: 0,
            running: spec.run,
        };
        w.lp.send_wall(&mut [out])?;
        out.send(Event::State(w.state()));
        Ok(w)
    }

    fn state(&self) -> RunState {
        if self.running {
            RunState::Running
        } else {
            RunState::Paused
        }
    }

    fn run(&mut self, rx: &Receiver<Command>, out: &mut Outbox) -> Result<()> {
        loop {
            self.lp.poll_monitor(&mut [out])?;
            // While paused, block on commands (waking now and then to notice a dead UI).
            let cmd = if self.running {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            if let Some(c) = cmd {
                if !self.handle(c, out)? {
                    return Ok(());
                }
                continue;
            }
            if self.running {
                self.step(StepKind::Both, out)?;
                if self.target > 0 && self.lp.trainer.step >= self.target {
                    self.running = false;
                    out.send(Event::log(format!(
                        "reached the target step {}",
                        self.target
                    )));
                    out.send(Event::State(RunState::Paused));
                }
            }
        }
    }

    /// One step through the loop, into the UI and the session's run folder. A failing run
    /// folder (disk full, removed, locked by another process) is reported and switched off;
    /// training goes on.
    fn step(&mut self, kind: StepKind, out: &mut Outbox) -> Result<()> {
        let mut folder = Tolerant {
            inner: self.folder.as_mut(),
            failed: None,
        };
        let outcome = self
            .lp
            .step(kind, Until::default(), &mut [out, &mut folder])?;
        if let Some(e) = folder.failed {
            let dir = self.folder.take().map(|f| f.dir).unwrap_or_default();
            out.send(Event::log(format!(
                "writing the run folder {} failed, it is no longer written: {e}",
                dir.display()
            )));
        }
        if let StepOutcome::Recovered(r) = outcome {
            if r.paused {
                self.running = false;
            }
            out.send(Event::State(self.state()));
        }
        Ok(())
    }

    /// Returns false on shutdown.
    fn handle(&mut self, c: Command, out: &mut Outbox) -> Result<bool> {
        match c {
            Command::Run => {
                self.running = true;
                self.lp.restart_clock();
                out.send(Event::State(RunState::Running));
            }
            Command::Pause => {
                self.running = false;
                out.send(Event::State(RunState::Paused));
            }
            Command::Step(kind) => {
                self.running = false;
                let before = self.lp.trainer.step;
                self.step(kind, out)?;
                // A single step shows its result (D-only and G-only steps always send the
                // wall; a "Both" step only on the wall's schedule).
                let s = self.lp.trainer.step;
                let every = self.lp.opts.wall_every.max(1);
                if kind == StepKind::Both && s != before && !s.is_multiple_of(every) {
                    self.lp.send_wall(&mut [out])?;
                }
                out.send(Event::State(RunState::Paused));
            }
            Command::SetLearningRates { g, d } => {
                if !(g > 0.0 && d > 0.0 && g.is_finite() && d.is_finite()) {
                    out.send(Event::log(format!(
                        "learning rates must be positive and finite (got G {g}, D {d})"
                    )));
                } else {
                    self.lp.trainer.set_learning_rates(g, d);
                    out.send(Event::log(format!("learning rates: G {g:.2e}, D {d:.2e}")));
                }
            }
            Command::SetNCritic(n) => {
                self.lp.trainer.cfg.loss.n_critic = n.max(1);
                out.send(Event::log(format!("n_critic: {}", n.max(1))));
            }
            Command::SetWallEvery(n) => self.lp.opts.wall_every = n.max(1),
            Command::SetTruncation(t) => match self.lp.trainer.set_sampling_truncation(t) {
                Ok(()) => {
                    out.send(Event::log(truncation_note(t)));
                    self.lp.send_wall(&mut [out])?;
                }
                Err(e) => out.send(Event::log(format!("truncation: {e}"))),
            },
            Command::SetTarget(t) => self.target = t,
            Command::SetWall { rows, cols } => {
                let k = self.lp.trainer.cfg.model.num_conditions;
                if let Some((cap, bad)) = rows.iter().find(|(_, c)| c.len() != k) {
                    out.send(Event::log(format!(
                        "wall row `{cap}` has {} labels, the model has {k}",
                        bad.len()
                    )));
                } else if !rows.is_empty() {
                    self.lp.opts.rows = rows;
                    self.lp.opts.wall_cols = cols.clamp(1, 32);
                    self.lp.send_wall(&mut [out])?;
                }
            }
            Command::SetNanPolicy(p) => self.lp.opts.nan_policy = p,
            Command::SetOnDWins(v) => match self.lp.set_on_d_wins(v) {
                Ok(()) => out.send(Event::log(match v {
                    OnDWins::Alarm => "when D wins outright: alarm only".to_string(),
                    OnDWins::Rollback => format!(
                        "when D wins outright: roll back to a snapshot from before the alarm \
                         (one every {} steps, from step {} on) and scale D's rate by {}",
                        self.lp.trainer.cfg.guard.snapshot_every,
                        self.lp.trainer.step,
                        self.lp.trainer.cfg.guard.lr_d_factor
                    ),
                })),
                Err(e) => out.send(Event::log(format!("collapse guard: {e}"))),
            },
            Command::Save(dir) => {
                // The session's own run folder is locked by its sink already; any other
                // folder is locked for the save (a CLI run training there refuses it).
                let own = self.folder.as_ref().is_some_and(|f| f.dir == dir);
                let res = if own {
                    self.folder
                        .as_mut()
                        .map_or(Ok(()), |f| f.lock())
                        .and_then(|()| self.lp.trainer.save(&dir))
                } else {
                    crate::checkpoint::RunLock::acquire(&dir)
                        .and_then(|_lock| self.lp.trainer.save(&dir))
                };
                match res {
                    Ok(()) => out.send(Event::Saved(dir)),
                    Err(e) => out.send(Event::log(format!("saving failed: {e}"))),
                }
            }
            Command::Load(dir) => match self.lp.load_checkpoint(&dir) {
                Ok(()) => {
                    for note in &self.lp.trainer.load_notes {
                        out.send(Event::log(format!("checkpoint: {note}")));
                    }
                    out.send(Event::log(format!(
                        "loaded {} (step {})",
                        dir.display(),
                        self.lp.trainer.step
                    )));
                    self.lp.send_wall(&mut [out])?;
                }
                Err(e) => out.send(Event::log(format!("loading failed, nothing changed: {e}"))),
            },
            Command::InjectNan => {
                if let Some(name) = self.lp.trainer.inject_nan()? {
                    out.send(Event::log(format!("injected NaN into {name}")));
                }
            }
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }
}

/// A session for a generator imported from PyTorch (`arch: onnx`, `ganscope import`): no
/// trainer, no discriminator. It sends the session info, the wall and the generator (for the
/// composer, sliders, principal directions, interpolation and exports), re-renders the wall
/// when asked, and answers training commands with a log line saying why not.
fn view_imported(spec: SessionSpec, rx: &Receiver<Command>, out: &mut Outbox) -> Result<()> {
    let t0 = Instant::now();
    let dir = spec.resume.clone().ok_or_else(|| {
        Error::Config(
            "an imported generator (arch onnx) opens from its run folder (ganscope import)".into(),
        )
    })?;
    let (g, saved, _) = crate::train::load_generator(&dir, &Device::Cpu)?;
    // The explorer's monitor settings, the saved model.
    let cfg = TrainConfig {
        model: saved.model.clone(),
        ..spec.cfg.clone()
    };
    let m = &cfg.model;
    // Real images and label sets for the wall when the dataset opens; the label names alone
    // otherwise (the generator needs no data).
    let (data, data_note): (data::InMemoryDataset, Option<String>) =
        match data::open(&cfg.data, m.image_size) {
            Ok(d) => (d, None),
            Err(e) => (
                data::InMemoryDataset {
                    source: "none".into(),
                    channels: m.channels,
                    height: m.image_size,
                    width: m.image_size,
                    pixels: vec![],
                    kind: m.condition_kind,
                    label_names: m.label_names.clone(),
                    labels: vec![],
                    steps: vec![],
                },
                Some(format!(
                    "the dataset did not open ({e}); the wall shows single labels"
                )),
            ),
        };
    let mut rows = wall_rows(&data, m.num_conditions, spec.wall_max_rows);
    if rows.is_empty() {
        rows = (0..m.num_conditions.min(spec.wall_max_rows))
            .map(|i| {
                let mut v = vec![0.0; m.num_conditions];
                v[i] = 1.0;
                (m.label_names.get(i).cloned().unwrap_or_default(), v)
            })
            .collect();
    }
    let n_ex = 64.min(data.len());
    let real_examples = if n_ex > 0 {
        let (x, _) = data.batch(&(0..n_ex).collect::<Vec<_>>(), &Device::Cpu)?;
        Images::from_tensor(&x)?
    } else {
        Images {
            n: 0,
            channels: m.channels,
            height: m.image_size,
            width: m.image_size,
            data: vec![],
        }
    };
    let info = SessionInfo {
        step: 0,
        data_source: data_source(&cfg, &data),
        data_len: data.len(),
        label_names: m.label_names.clone(),
        condition_kind: m.condition_kind,
        g_params: 0,
        d_params: 0,
        device: "CPU (ONNX, tract)".into(),
        diagnostics_off: (cfg.monitor.every == 0 || data.is_empty()).then(|| {
            "are off for this imported generator (no check interval set, or no real data to \
             compare with); score it with ganscope eval"
                .into()
        }),
        real_examples,
        wall_rows: rows.clone(),
        wall_cols: spec.wall_cols,
        run_dir: None,
        seconds_to_build: t0.elapsed().as_secs_f64(),
        cfg: cfg.clone(),
    };
    out.send(Event::Ready(Box::new(info)));
    let (mut rows, mut cols) = (rows, spec.wall_cols);
    let mut g = g;
    let send_wall =
        |out: &mut Outbox, g: &Generator, rows: &[(String, Vec<f32>)], cols: usize| -> Result<()> {
            let frame = WallFrame::render(g, rows, cols, crate::train::run::WALL_SEED, 0)?;
            out.send(Event::Loop(LoopEvent::Wall(Arc::new(frame))));
            let w = GeneratorWeights::of(g, 0)?;
            out.send(Event::Loop(LoopEvent::Weights(Arc::new(w))));
            Ok(())
        };
    let why = format!(
        "{} holds a generator imported from PyTorch: explore it (composer, sliders, \
         directions, interpolation, exports); it cannot be trained here",
        dir.display()
    );
    out.send(Event::log(why.clone()));
    if let Some(n) = data_note {
        out.send(Event::log(n));
    }
    send_wall(out, &g, &rows, cols)?;
    out.send(Event::State(RunState::Paused));
    // The imported generator does not change: one check of the mode-collapse diagnostics
    // (evaluator, real-data fit, every measure), as a training run has at its checks.
    if cfg.monitor.every > 0 && !data.is_empty() {
        let checked = crate::train::monitor::Monitor::new(&cfg, &data, &Device::Cpu)
            .and_then(|mut mon| mon.check(0, &g, &data));
        match checked {
            Ok((check, alarms)) => {
                out.send(Event::Loop(LoopEvent::Check(Box::new(check))));
                for a in alarms {
                    out.send(Event::Loop(LoopEvent::Alarm(a)));
                }
            }
            Err(e) => out.send(Event::log(format!(
                "diagnostics of the imported generator: {e}"
            ))),
        }
    }
    loop {
        let c = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        match c {
            Command::Run | Command::Step(_) | Command::InjectNan => {
                out.send(Event::log(why.clone()));
                out.send(Event::State(RunState::Paused));
            }
            Command::Save(d) | Command::Load(d) => out.send(Event::log(format!(
                "{}: nothing saved or loaded; the imported run folder {} is the generator \
                 (copy that folder to keep it)",
                d.display(),
                dir.display()
            ))),
            Command::SetWall { rows: r, cols: c } => {
                let k = m.num_conditions;
                if let Some((cap, bad)) = r.iter().find(|(_, c)| c.len() != k) {
                    out.send(Event::log(format!(
                        "wall row `{cap}` has {} labels, the model has {k}",
                        bad.len()
                    )));
                } else if !r.is_empty() {
                    rows = r;
                    cols = c.clamp(1, 32);
                    send_wall(out, &g, &rows, cols)?;
                }
            }
            Command::SetTruncation(t) => match g.set_truncation(t) {
                Ok(()) => {
                    out.send(Event::log(truncation_note(t)));
                    send_wall(out, &g, &rows, cols)?;
                }
                Err(e) => out.send(Event::log(format!("truncation: {e}"))),
            },
            Command::Pause
            | Command::SetLearningRates { .. }
            | Command::SetNCritic(_)
            | Command::SetWallEvery(_)
            | Command::SetTarget(_)
            | Command::SetNanPolicy(_)
            | Command::SetOnDWins(_) => {}
            Command::Shutdown => return Ok(()),
        }
    }
}

/// The log line after a truncation change.
fn truncation_note(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("sampling with the truncation trick: latent entries within +-{t}"),
        None => "sampling from the full N(0, I) (no truncation)".into(),
    }
}

fn data_source(cfg: &TrainConfig, data: &dyn Dataset) -> String {
    let kind = cfg.data.kind.name();
    let (c, h, w) = data.image_shape();
    let place = match &cfg.data.path {
        Some(p) => p.display().to_string(),
        None => "built-in".into(),
    };
    format!("{kind} ({place}), {} images {c}x{h}x{w}", data.len())
}

/// A request to the [`Renderer`]: images for these latents and conditions.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    /// Which view asked (each keeps only its newest answer).
    pub slot: &'static str,
    pub id: u64,
    pub z: Vec<Vec<f32>>,
    pub c: Vec<Vec<f32>>,
    /// A scene built one object at a time (sequential generators): these labels in order,
    /// `z` one latent per step, `c` unused; the answer is the floor and every step.
    pub scene: Option<Vec<usize>>,
}

/// The renderer's answer.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub slot: &'static str,
    pub id: u64,
    /// Step of the weights used.
    pub step: u64,
    pub images: Images,
    pub seconds: f64,
}

enum RenderMsg {
    Weights(Arc<GeneratorWeights>),
    Request(RenderRequest),
}

/// How long a frame waits, after its input asked for a new explorer image, for the renderer's
/// answer before painting. When the answer comes in time (a 32x32 G's forward pass takes
/// 1-7 ms here) the UI pass runs again with it (`egui::Context::request_discard`), so the
/// image is painted in the frame that handled the slider (`GanscopeApp::await_latent`)
/// instead of one frame later. Half a 60 Hz frame: a frame that waits in vain is still in
/// time for the next refresh.
pub const SAME_FRAME_WAIT: std::time::Duration = std::time::Duration::from_millis(8);

/// A thread holding a CPU copy of G that answers [`RenderRequest`]s, newest first: requests
/// that were overtaken by a newer one for the same slot are dropped unanswered.
pub struct Renderer {
    tx: Sender<RenderMsg>,
    pub results: Receiver<std::result::Result<Rendered, String>>,
}

impl Renderer {
    pub fn spawn(wake: Waker) -> Self {
        let (tx, rx) = mpsc::channel::<RenderMsg>();
        let (rtx, results) = mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("ganscope-renderer".into())
            .spawn(move || {
                // Its own one-thread pool: in the global rayon pool, the explorer's forward
                // passes would queue behind the training thread's convolutions.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(|_| "ganscope-renderer-pool".into())
                    .build()
                    .ok();
                let mut current: Option<(Generator, u64)> = None;
                while let Ok(first) = rx.recv() {
                    // Drain: newest weights, newest request per slot.
                    let mut pending: Vec<RenderRequest> = Vec::new();
                    let mut weights = None;
                    for m in std::iter::once(first).chain(rx.try_iter()) {
                        match m {
                            RenderMsg::Weights(w) => weights = Some(w),
                            RenderMsg::Request(r) => {
                                pending.retain(|p| p.slot != r.slot);
                                pending.push(r);
                            }
                        }
                    }
                    if let Some(w) = weights {
                        let same = current.as_ref().is_some_and(|(g, _)| g.cfg == w.model);
                        let res = if same {
                            let (g, s) = current.as_mut().expect("checked");
                            w.load_into(g).map(|_| *s = w.step)
                        } else {
                            w.build().map(|g| current = Some((g, w.step)))
                        };
                        if let Err(e) = res {
                            let _ = rtx.send(Err(format!("renderer: {e}")));
                        }
                    }
                    for r in pending {
                        let Some((g, step)) = &current else {
                            let _ = rtx.send(Err("renderer: no generator weights yet".into()));
                            continue;
                        };
                        let t = Instant::now();
                        let draw = || match &r.scene {
                            Some(order) => g.scene_per_step(&r.z, order),
                            None => g.generate_from(&r.z, &r.c),
                        };
                        let res = match &pool {
                            Some(p) => p.install(draw),
                            None => draw(),
                        };
                        let res = res.map(|images| Rendered {
                            slot: r.slot,
                            id: r.id,
                            step: *step,
                            images,
                            seconds: t.elapsed().as_secs_f64(),
                        });
                        let _ = rtx.send(res.map_err(|e| e.to_string()));
                        wake();
                    }
                }
            });
        Self { tx, results }
    }

    pub fn set_weights(&self, w: Arc<GeneratorWeights>) {
        let _ = self.tx.send(RenderMsg::Weights(w));
    }

    pub fn request(&self, r: RenderRequest) {
        let _ = self.tx.send(RenderMsg::Request(r));
    }
}
