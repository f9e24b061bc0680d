//! The training session behind the explorer: a [`Trainer`] in a background thread, driven by
//! typed [`Command`]s and reporting through typed [`Event`]s that carry CPU data only. After
//! each event the thread calls the `wake` callback (the UI passes `ctx.request_repaint`).
//!
//! Also here: the in-memory ring of healthy snapshots that undoes a NaN/Inf (issue 5), and a
//! second thread, the [`Renderer`], that runs the explorer's generator copy for latent sliders
//! and interpolation so that neither waits for a training step.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TrainConfig};
use crate::data::{self, ConditionKind, Dataset};
use crate::diagnostics::{Alarm, SnapshotRing};
use crate::error::{Error, Result};
use crate::images::Images;
use crate::model::Generator;
use crate::rng::Rng;
use crate::train::monitor::{Check, Monitor};
use crate::train::run::{WALL_SEED, wall_rows};
use crate::train::{Snapshot, StepKind, StepStats, Trainer};

/// Called after every event so the UI wakes up (e.g. `egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What the worker does when a loss or weight turns NaN/Inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NanPolicy {
    /// Restore the last healthy snapshot and pause.
    #[default]
    RestorePause,
    /// Restore the last healthy snapshot, halve both learning rates and go on.
    RestoreLowerLr,
}

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
    pub seconds_to_build: f64,
}

/// One step's numbers as the UI plots them.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub stats: StepStats,
    /// Real images per second seen by D since the run was (re)started.
    pub images_per_s: f64,
    pub elapsed_s: f64,
    pub step_seconds: f64,
    pub lr_g: f64,
    pub lr_d: f64,
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

/// Generator weights on the CPU, for the explorer's own copy of G.
#[derive(Debug, Clone)]
pub struct GeneratorWeights {
    pub step: u64,
    pub model: ModelConfig,
    pub params: HashMap<String, Tensor>,
    pub state: HashMap<String, Tensor>,
}

impl GeneratorWeights {
    pub fn of(g: &Generator, step: u64) -> Result<Self> {
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
        })
    }

    /// Build a CPU generator holding these weights.
    pub fn build(&self) -> Result<Generator> {
        let g = Generator::new(&self.model, Rng::new(0), DType::F32, &Device::Cpu)?;
        self.load_into(&g)?;
        Ok(g)
    }

    /// Copy these weights into `g` (same architecture).
    pub fn load_into(&self, g: &Generator) -> Result<()> {
        let p = PathBuf::from(format!("<generator weights of step {}>", self.step));
        g.store.load(&p, &self.params, true)?;
        g.store.load(&p, &self.state, false)
    }
}

/// A restore after a NaN/Inf.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Step at which the NaN/Inf appeared.
    pub at: u64,
    /// Step of the snapshot restored.
    pub to: u64,
    pub message: String,
}

/// Trainer -> UI.
#[derive(Debug, Clone)]
pub enum Event {
    Ready(Box<SessionInfo>),
    State(RunState),
    Step(Box<StepEvent>),
    Wall(Arc<WallFrame>),
    Weights(Arc<GeneratorWeights>),
    Check(Box<Check>),
    /// Diagnostics switched on (None) or off (why).
    Diagnostics(Option<String>),
    Alarm(Alarm),
    Recovered(Recovery),
    Saved(PathBuf),
    Log(String),
    /// The session failed; the thread has ended. Start a new one to go on.
    Error(String),
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
                let out = Outbox { tx: etx, wake };
                out.send(Event::State(RunState::Loading));
                match Worker::build(spec, &out) {
                    Ok(mut w) => {
                        if let Err(e) = w.run(&rx, &out) {
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

struct Worker {
    trainer: Trainer,
    monitor: Monitor,
    /// The full monitor while its fit runs in the background.
    monitor_rx: Option<Receiver<Result<Monitor>>>,
    spec: SessionSpec,
    rows: Vec<(String, Vec<f32>)>,
    running: bool,
    target: u64,
    ring: SnapshotRing<Snapshot>,
    t0: Instant,
    step0: u64,
}

impl Worker {
    fn build(spec: SessionSpec, out: &Outbox) -> Result<Self> {
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
            if crate::checkpoint::is_weights_folder(dir) {
                out.send(Event::Log(format!(
                    "{} holds weights only (a shipped generator): training on starts Adam \
                     afresh at step {}; Save writes a full run folder elsewhere",
                    dir.display(),
                    trainer.step
                )));
            }
        }
        // The evaluator's fit on real data can take a while: it runs in its own thread and
        // the diagnostics switch on when it is done (training does not wait for it).
        let monitor = Monitor::alarms_only(&cfg);
        let (off, monitor_rx) = if cfg.monitor.every == 0 {
            (Some("off (diagnostics every 0 steps)".to_string()), None)
        } else {
            let (tx, rx) = mpsc::channel();
            let (c, d, dev) = (cfg.clone(), data.clone(), spec.device.clone());
            let _ = std::thread::Builder::new()
                .name("ganscope-monitor-fit".into())
                .spawn(move || {
                    let _ = tx.send(Monitor::new(&c, d.as_ref(), &dev));
                });
            (
                Some("starting: the evaluator is reading the real images…".to_string()),
                Some(rx),
            )
        };
        let rows = wall_rows(data.as_ref(), cfg.model.num_conditions, spec.wall_max_rows);
        let n_ex = 64.min(data.len());
        let (x, _) = data.batch(&(0..n_ex).collect::<Vec<_>>(), &Device::Cpu)?;
        let info = SessionInfo {
            step: trainer.step,
            data_source: data_source(&cfg, data.as_ref()),
            data_len: data.len(),
            label_names: data.label_names().to_vec(),
            condition_kind: data.condition_kind(),
            g_params: trainer.generator.store.num_params(),
            d_params: trainer.discriminator.store.num_params(),
            device: format!("{:?}", spec.device),
            diagnostics_off: off,
            real_examples: Images::from_tensor(&x)?,
            wall_rows: rows.clone(),
            wall_cols: spec.wall_cols,
            seconds_to_build: t0.elapsed().as_secs_f64(),
            cfg: cfg.clone(),
        };
        out.send(Event::Ready(Box::new(info)));
        let mut w = Self {
            monitor_rx,
            target: 0,
            running: spec.run,
            ring: SnapshotRing::new(spec.ring.max(1)),
            step0: trainer.step,
            trainer,
            monitor,
            rows,
            spec,
            t0: Instant::now(),
        };
        w.take_snapshot()?;
        w.send_wall(out)?;
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

    /// Switch the diagnostics on once the background fit is done.
    fn poll_monitor(&mut self, out: &Outbox) {
        let Some(rx) = &self.monitor_rx else { return };
        match rx.try_recv() {
            Ok(Ok(m)) => {
                // The full monitor takes over the alarms-only one's step history.
                let old = std::mem::replace(&mut self.monitor, m);
                self.monitor.carry_over(old);
                self.monitor_rx = None;
                out.send(Event::Diagnostics(None));
                out.send(Event::Log(format!(
                    "diagnostics on (evaluator fit on real images took {:.1} s)",
                    self.monitor.cost().fit_seconds
                )));
            }
            Ok(Err(e)) => {
                self.monitor_rx = None;
                out.send(Event::Diagnostics(Some(e.to_string())));
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => self.monitor_rx = None,
        }
    }

    fn run(&mut self, rx: &Receiver<Command>, out: &Outbox) -> Result<()> {
        loop {
            self.poll_monitor(out);
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
                if self.target > 0 && self.trainer.step >= self.target {
                    self.running = false;
                    out.send(Event::Log(format!(
                        "reached the target step {}",
                        self.target
                    )));
                    out.send(Event::State(RunState::Paused));
                }
            }
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, c: Command, out: &Outbox) -> Result<bool> {
        match c {
            Command::Run => {
                self.running = true;
                self.t0 = Instant::now();
                self.step0 = self.trainer.step;
                out.send(Event::State(RunState::Running));
            }
            Command::Pause => {
                self.running = false;
                out.send(Event::State(RunState::Paused));
            }
            Command::Step(kind) => {
                self.running = false;
                self.step(kind, out)?;
                out.send(Event::State(RunState::Paused));
            }
            Command::SetLearningRates { g, d } => {
                if !(g > 0.0 && d > 0.0 && g.is_finite() && d.is_finite()) {
                    out.send(Event::Log(format!(
                        "learning rates must be positive and finite (got G {g}, D {d})"
                    )));
                } else {
                    self.trainer.set_learning_rates(g, d);
                    out.send(Event::Log(format!("learning rates: G {g:.2e}, D {d:.2e}")));
                }
            }
            Command::SetNCritic(n) => {
                self.trainer.cfg.loss.n_critic = n.max(1);
                out.send(Event::Log(format!("n_critic: {}", n.max(1))));
            }
            Command::SetWallEvery(n) => self.spec.wall_every = n.max(1),
            Command::SetTarget(t) => self.target = t,
            Command::SetWall { rows, cols } => {
                let k = self.trainer.cfg.model.num_conditions;
                if let Some((cap, bad)) = rows.iter().find(|(_, c)| c.len() != k) {
                    out.send(Event::Log(format!(
                        "wall row `{cap}` has {} labels, the model has {k}",
                        bad.len()
                    )));
                } else if !rows.is_empty() {
                    self.rows = rows;
                    self.spec.wall_cols = cols.clamp(1, 32);
                    self.send_wall(out)?;
                }
            }
            Command::SetNanPolicy(p) => self.spec.nan_policy = p,
            Command::Save(dir) => match self.trainer.save(&dir) {
                Ok(()) => out.send(Event::Saved(dir)),
                Err(e) => out.send(Event::Log(format!("saving failed: {e}"))),
            },
            Command::Load(dir) => match self.trainer.load_checkpoint(&dir) {
                Ok(()) => {
                    self.ring.clear();
                    self.take_snapshot()?;
                    out.send(Event::Log(format!(
                        "loaded {} (step {})",
                        dir.display(),
                        self.trainer.step
                    )));
                    self.send_wall(out)?;
                }
                Err(e) => out.send(Event::Log(format!("loading failed, nothing changed: {e}"))),
            },
            Command::InjectNan => {
                if let Some((name, var)) =
                    self.trainer.generator.store.trainable().into_iter().next()
                {
                    let bad = (var.as_tensor().ones_like()? * f64::NAN)?;
                    var.set(&bad)?;
                    out.send(Event::Log(format!("injected NaN into {name}")));
                }
            }
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn step(&mut self, kind: StepKind, out: &Outbox) -> Result<()> {
        let t = Instant::now();
        let stats = match self.trainer.step_kind(kind) {
            Ok(stats) => stats,
            // A NaN/Inf loss: that update was skipped, but the cause (a poisoned weight, an
            // exploding D already updated in this step) is in the state; restore it.
            Err(e @ Error::NonFinite { step, .. }) => {
                out.send(Event::Log(e.to_string()));
                return self.recover(step, out);
            }
            Err(e) => return Err(e),
        };
        let step_seconds = t.elapsed().as_secs_f64();
        let s = self.trainer.step;
        let mut alarms = self.monitor.on_step(&stats, step_seconds);
        // A NaN can hide in the weights while the losses stay finite (a ReLU after a NaN
        // weight outputs 0), so the weights are checked too: one reduction per tensor.
        let weights_ok = self.trainer.weights_finite()?;
        if !weights_ok {
            out.send(Event::Log(format!(
                "NaN/Inf in the weights after step {} (losses D {:.4}, G {:.4})",
                self.trainer.step, stats.d_loss, stats.g_loss
            )));
        }
        let fatal = !weights_ok || alarms.iter().any(|a| a.kind.is_fatal());
        let elapsed = self.t0.elapsed().as_secs_f64();
        let per_step = (self.trainer.cfg.batch_size * self.trainer.cfg.loss.n_critic) as f64;
        let (lr_g, lr_d) = self.trainer.learning_rates();
        out.send(Event::Step(Box::new(StepEvent {
            images_per_s: (s - self.step0.min(s)) as f64 * per_step / elapsed.max(1e-9),
            elapsed_s: elapsed,
            step_seconds,
            stats,
            lr_g,
            lr_d,
        })));
        if fatal {
            for a in alarms {
                out.send(Event::Alarm(a));
            }
            return self.recover(s, out);
        }
        if kind != StepKind::DOnly && s.is_multiple_of(self.spec.snapshot_every.max(1)) {
            self.take_snapshot()?;
        }
        if kind != StepKind::Both || s.is_multiple_of(self.spec.wall_every.max(1)) {
            self.send_wall(out)?;
        }
        if kind != StepKind::DOnly && self.monitor.due(s) {
            let generator = self.trainer.sampling_generator();
            let (check, more) = self
                .monitor
                .check(s, generator, self.trainer.data().as_ref())?;
            alarms.extend(more);
            out.send(Event::Check(Box::new(check)));
        }
        for a in alarms {
            out.send(Event::Alarm(a));
        }
        Ok(())
    }

    /// Keep the current state if all its weights are finite.
    fn take_snapshot(&mut self) -> Result<()> {
        if self.trainer.weights_finite()? {
            let snap = self.trainer.snapshot()?;
            self.ring.push(snap.step, snap);
        }
        Ok(())
    }

    fn recover(&mut self, at: u64, out: &Outbox) -> Result<()> {
        let Some((to, snap)) = self.ring.latest() else {
            self.running = false;
            out.send(Event::State(RunState::Paused));
            return Err(Error::Msg(format!(
                "NaN/Inf at step {at} and no healthy snapshot to restore"
            )));
        };
        self.trainer.restore(snap)?;
        self.monitor.reset_alarms();
        let message = match self.spec.nan_policy {
            NanPolicy::RestorePause => {
                self.running = false;
                format!(
                    "NaN/Inf at step {at}: restored the healthy snapshot of step {to} and paused"
                )
            }
            NanPolicy::RestoreLowerLr => {
                let (g, d) = self.trainer.learning_rates();
                self.trainer.set_learning_rates(g * 0.5, d * 0.5);
                format!(
                    "NaN/Inf at step {at}: restored the healthy snapshot of step {to}, halved the \
                     learning rates to G {:.2e}, D {:.2e} and went on",
                    g * 0.5,
                    d * 0.5
                )
            }
        };
        out.send(Event::Recovered(Recovery { at, to, message }));
        out.send(Event::State(self.state()));
        self.send_wall(out)
    }

    fn send_wall(&mut self, out: &Outbox) -> Result<()> {
        let g = self.trainer.sampling_generator();
        let cols = self.spec.wall_cols;
        let conds: Vec<Vec<f32>> = self.rows.iter().map(|r| r.1.clone()).collect();
        let images = g.grid(&conds, cols, WALL_SEED)?;
        let step = self.trainer.step;
        out.send(Event::Wall(Arc::new(WallFrame {
            step,
            rows: self.rows.len(),
            cols,
            captions: self.rows.iter().map(|r| r.0.clone()).collect(),
            images,
        })));
        out.send(Event::Weights(Arc::new(GeneratorWeights::of(g, step)?)));
        Ok(())
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
                        let res = match &pool {
                            Some(p) => p.install(|| g.generate_from(&r.z, &r.c)),
                            None => g.generate_from(&r.z, &r.c),
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
