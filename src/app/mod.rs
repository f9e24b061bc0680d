//! The desktop explorer (eframe + egui, wgpu renderer). The engine runs in a background
//! thread ([`crate::train::worker::Session`]) and talks to this UI only through typed
//! commands and events; a second thread ([`crate::train::worker::Renderer`]) draws the
//! latent views. One panel per file; each panel is a struct that owns its state and draws
//! itself with `fn ui(&mut self, ui, ctx: &mut PanelCtx)`: it reads the session's data
//! ([`RunView`]) and the settings, and sends [`AppCommand`]s, which [`GanscopeApp::apply`]
//! carries out in one place at the end of the frame (rerun's command sender is the model).

mod commands;
mod composer;
mod diagnostics_panel;
pub mod dialogs;
mod export_panel;
mod latent;
mod plots;
mod scene;
mod status;
pub mod train_panel;
pub mod wall;
pub mod wall_gpu;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{DataKind, OnDWins, TrainConfig};
use crate::diagnostics::Alarm;
use crate::train::monitor::Check;
use crate::train::run::LoopEvent;
use crate::train::worker::{
    Command, Event, NanPolicy, RenderRequest, Rendered, Renderer, RunState, SAME_FRAME_WAIT,
    Session, SessionInfo, SessionSpec, StepEvent, Waker, WallFrame,
};

pub use commands::{AppCommand, PanelCtx};
pub use composer::Composer;
pub use diagnostics_panel::DiagnosticsPanel;
pub use dialogs::{Dialogs, NoDialogs, PathPrompt, Purpose, RfdDialogs};
pub use export_panel::ExportPanel;
pub use latent::{InterpState, LatentPanel};
pub use plots::PlotsPanel;
pub use scene::ScenePanel;
pub use status::StatusBar;
pub use train_panel::TrainPanel;
pub use wall::{HeatMode, WallView};

/// The preset the explorer starts on: the scene-building i-CLEVR generator at 32x32, which
/// learns more in 15 minutes on a 2-core CPU than the one-shot `iclevr-small` (README, "The
/// default recipe") and whose shipped generator is the best at that size.
pub const DEFAULT_PRESET: &str = "iclevr-sequential-small";
/// Frames of the wall kept for the timeline.
pub const FRAMES_KEPT: usize = 240;
/// Step events kept for the plots.
pub const HISTORY_KEPT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tab {
    Wall,
    Explore,
    Diagnostics,
    Plots,
    /// Build a scene one object at a time (sequential generators).
    Scene,
}

/// The user's choices, restored on the next launch (eframe persistence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub preset: String,
    /// Dataset folder or file; empty = the preset's built-in or usual location.
    pub data_path: String,
    pub device: String,
    pub tab: Tab,
    /// Integer zoom of the wall (0 = largest that fits).
    pub zoom: u32,
    pub latent_zoom: u32,
    pub wall_every: u64,
    pub wall_cols: usize,
    pub heat: HeatMode,
    pub grid_lines: bool,
    pub show_controls: bool,
    pub show_conditions: bool,
    /// Pause at this generator step (0 = none).
    pub target: u64,
    /// Diagnostics every N steps (0 = off).
    pub diagnostics_every: u64,
    /// The diagnostics' evaluator: an evaluator folder or a PyTorch checkpoint (`.pth`, the
    /// course's i-CLEVR evaluator); empty = the shipped one for the data.
    pub evaluator_path: String,
    /// pytorch-fid's FID every N steps (0 = off, or as the opened run's config says).
    pub fid_every: u64,
    /// pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`).
    pub fid_weights: String,
    pub nan_policy: NanPolicy,
    /// When D wins outright: alarm only or roll back (None: as the preset or run says).
    pub on_d_wins: Option<OnDWins>,
    pub checkpoint_path: String,
    pub export_path: String,
    pub export_scale: u32,
    /// The history GIF uses every n-th kept wall frame.
    pub gif_stride: usize,
    pub interp_steps: usize,
    pub slerp: bool,
    /// The last launch ran (false until one has been saved: the first launch opens a shipped
    /// checkpoint, if any).
    pub launched_before: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            preset: DEFAULT_PRESET.into(),
            data_path: String::new(),
            device: "auto".into(),
            tab: Tab::Wall,
            zoom: 0,
            latent_zoom: 4,
            wall_every: 10,
            wall_cols: 8,
            heat: HeatMode::Off,
            grid_lines: true,
            show_controls: true,
            show_conditions: true,
            target: 0,
            // The check interval's floor: `monitor.max_share` spaces the checks out further
            // when they are slow next to training (a CPU i-CLEVR run: every few hundred steps).
            diagnostics_every: 50,
            evaluator_path: String::new(),
            fid_every: 0,
            fid_weights: String::new(),
            nan_policy: NanPolicy::RestorePause,
            on_d_wins: None,
            checkpoint_path: "runs/explorer".into(),
            export_path: "exports".into(),
            export_scale: 2,
            gif_stride: 1,
            interp_steps: 8,
            slerp: true,
            launched_before: false,
        }
    }
}

/// How the app starts (tests start paused, without dialogs and without settings).
pub struct AppOptions {
    /// Start a session at launch.
    pub autostart: bool,
    /// Start it running (else paused).
    pub run: bool,
    pub dialogs: Box<dyn Dialogs>,
    /// Use these settings instead of the stored ones.
    pub settings: Option<Settings>,
    /// Folder holding shipped checkpoints and evaluators.
    pub checkpoints: PathBuf,
    /// Show measured times in the status bar (snapshot tests turn them off).
    pub show_timings: bool,
    /// Open this run folder (config.json + checkpoint) paused instead of the usual start.
    pub open: Option<PathBuf>,
    /// Each session writes metrics.jsonl, sample grids and periodic checkpoints into a new
    /// folder `<runs>/<preset>-<UTC time>` (created at its first step); None: no run folder.
    pub runs: Option<PathBuf>,
    /// Keep the diagnostics' real-image features here between sessions (the window uses
    /// [`crate::train::monitor::user_feature_cache`]); None: fit them every session.
    pub feature_cache: Option<PathBuf>,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            autostart: true,
            run: true,
            dialogs: Box::new(RfdDialogs),
            settings: None,
            checkpoints: checkpoints_dir(),
            show_timings: true,
            open: None,
            runs: Some(PathBuf::from("runs")),
            feature_cache: None,
        }
    }
}

/// Where the shipped checkpoints are: the first of `./checkpoints`, `checkpoints/` beside the
/// executable (or three levels up from it: cargo's `target/<profile>/`) and the source tree's
/// that holds the default preset's shipped generator; else the first of them that exists
/// (`./checkpoints` when none does). The binary adds its embedded copy of the default
/// generator when none is found ([`run_native`]'s caller).
pub fn checkpoints_dir() -> PathBuf {
    let places = crate::checkpoint::checkpoint_roots();
    places
        .iter()
        .find(|p| has_shipped_default(p))
        .or_else(|| places.iter().find(|p| p.is_dir()))
        .unwrap_or(&places[0])
        .clone()
}

/// True when `dir` holds the default preset's shipped generator.
pub fn has_shipped_default(dir: &Path) -> bool {
    dir.join(DEFAULT_PRESET).join("config.json").is_file()
}

/// Series the plots draw from each diagnostics check.
#[derive(Debug, Clone)]
pub struct CheckPoint {
    pub step: u64,
    pub accuracy: Option<f64>,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    pub ndb_significant: usize,
    pub seconds: f64,
}

/// Launch and frame-time measurements shown in the status bar (the slider's latency is the
/// latent panel's: [`LatentPanel::slider_to_image_ms`]).
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub launch_to_ready_s: Option<f64>,
    pub launch_to_first_wall_s: Option<f64>,
    /// UI frame build times (ms), last 120.
    pub frame_ms: VecDeque<f64>,
    /// Whole-frame CPU times as eframe measures them (ms), last 120.
    pub frame_cpu_ms: VecDeque<f64>,
}

/// The session's data as the UI knows it: filled from the trainer's events in one place
/// ([`GanscopeApp::poll`]), read by every panel through [`PanelCtx::run`].
pub struct RunView {
    pub info: Option<SessionInfo>,
    pub run_state: RunState,
    pub history: Vec<StepEvent>,
    pub frames: VecDeque<Arc<WallFrame>>,
    /// Index into `frames` while scrubbing the timeline; None = live.
    pub scrub: Option<usize>,
    pub last_check: Option<Box<Check>>,
    pub check_series: Vec<CheckPoint>,
    /// FID measurements (`monitor.fid_every`).
    pub fid_series: Vec<crate::train::fid::FidPoint>,
    pub alarms: Vec<Alarm>,
    /// The newest generator weights (for exports and principal directions).
    pub last_weights: Option<Arc<crate::train::worker::GeneratorWeights>>,
    pub error: Option<String>,
    pub banner: Option<String>,
}

impl Default for RunView {
    fn default() -> Self {
        Self {
            info: None,
            run_state: RunState::Stopped,
            history: Vec::new(),
            frames: VecDeque::new(),
            scrub: None,
            last_check: None,
            check_series: Vec::new(),
            fid_series: Vec::new(),
            alarms: Vec::new(),
            last_weights: None,
            error: None,
            banner: None,
        }
    }
}

impl RunView {
    /// The frame the wall shows: the scrubbed one or the newest.
    pub fn shown_frame(&self) -> Option<&Arc<WallFrame>> {
        match self.scrub {
            Some(i) => self.frames.get(i),
            None => self.frames.back(),
        }
    }

    /// The running session's preset name ("run" before one is ready).
    pub fn preset(&self) -> String {
        self.info
            .as_ref()
            .map_or("run".to_string(), |i| i.cfg.preset.clone())
    }
}

pub struct GanscopeApp {
    pub settings: Settings,
    /// What the trainer has told the UI.
    pub run: RunView,
    pub session: Option<Session>,
    pub renderer: Renderer,
    pub dialogs: Box<dyn Dialogs>,
    pending_dialog: Option<(Purpose, Receiver<Option<PathBuf>>)>,
    /// A dialog answered nothing: its path field asks for the path.
    pub prompt: Option<PathPrompt>,
    /// Commands the panels sent this frame, applied by [`Self::apply`].
    commands: Vec<AppCommand>,
    // The panels, each owning its state.
    pub train: TrainPanel,
    pub export: ExportPanel,
    pub composer: Composer,
    pub latent: LatentPanel,
    pub scene: ScenePanel,
    pub wall: WallView,
    pub diagnostics: DiagnosticsPanel,
    pub plots: PlotsPanel,
    pub status: StatusBar,
    pub timings: Timings,
    pub checkpoints: PathBuf,
    /// Where sessions put their run folders (see [`AppOptions::runs`]).
    pub runs: Option<PathBuf>,
    pub show_timings: bool,
    started: Instant,
    wake: Waker,
    request_id: u64,
    /// Scene requests in flight: id -> the order drawn.
    scene_requests: std::collections::HashMap<u64, Vec<usize>>,
    /// Where sessions keep the diagnostics' real-image features ([`AppOptions::feature_cache`]).
    feature_cache: Option<PathBuf>,
    /// The explorer-image request that this frame's input sent (see [`SAME_FRAME_WAIT`]).
    awaiting: Option<u64>,
    /// How long a frame waits for it: [`SAME_FRAME_WAIT`] (tests set more, so that a loaded
    /// machine cannot make them depend on timing).
    pub same_frame_wait: Duration,
}

impl GanscopeApp {
    /// The app as eframe creates it: stored settings, rfd dialogs, autostart (or the run
    /// folder `open`).
    pub fn new(cc: &eframe::CreationContext<'_>, open: Option<PathBuf>) -> Self {
        Self::with_options(
            cc,
            AppOptions {
                open,
                ..AppOptions::default()
            },
        )
    }

    pub fn with_options(cc: &eframe::CreationContext<'_>, opts: AppOptions) -> Self {
        let settings = opts.settings.unwrap_or_else(|| {
            cc.storage
                .and_then(|s| eframe::get_value::<Settings>(s, eframe::APP_KEY))
                .unwrap_or_default()
        });
        let gpu = wall_gpu::install(cc.wgpu_render_state.as_ref());
        let ctx = cc.egui_ctx.clone();
        let wake: Waker = Arc::new(move || ctx.request_repaint());
        let mut app = Self {
            renderer: Renderer::spawn(wake.clone()),
            session: None,
            run: RunView::default(),
            dialogs: opts.dialogs,
            pending_dialog: None,
            prompt: None,
            commands: Vec::new(),
            train: TrainPanel::default(),
            export: ExportPanel::spawn(wake.clone()),
            composer: Composer::default(),
            latent: LatentPanel::default(),
            scene: ScenePanel::default(),
            wall: WallView::new(gpu),
            diagnostics: DiagnosticsPanel::default(),
            plots: PlotsPanel,
            status: StatusBar::default(),
            timings: Timings::default(),
            checkpoints: opts.checkpoints,
            runs: opts.runs,
            feature_cache: opts.feature_cache,
            show_timings: opts.show_timings,
            started: Instant::now(),
            wake,
            request_id: 0,
            scene_requests: Default::default(),
            awaiting: None,
            same_frame_wait: SAME_FRAME_WAIT,
            settings,
        };
        if let Some(dir) = opts.open {
            app.push_log(format!(
                "opened {} (paused: press Resume to train on)",
                dir.display()
            ));
            app.start_session(Some(dir), false);
        } else if opts.autostart {
            let shipped = app.checkpoints.join(&app.settings.preset);
            if !app.settings.launched_before && shipped.join("config.json").is_file() {
                app.push_log(format!(
                    "opened the shipped checkpoint {} (paused: Resume trains on, Start trains from scratch)",
                    shipped.display()
                ));
                app.start_session(Some(shipped), false);
            } else {
                app.start_session(None, opts.run);
            }
        }
        app
    }

    pub fn push_log(&mut self, s: String) {
        self.status.push(s);
    }

    /// The config a new session would use: the preset, with the data path and the
    /// explorer's diagnostics settings.
    pub fn session_config(&self) -> crate::error::Result<TrainConfig> {
        let mut cfg = TrainConfig::preset(&self.settings.preset)?;
        let path = self.settings.data_path.trim();
        if !path.is_empty() {
            cfg.data.path = Some(PathBuf::from(path));
        }
        self.set_explorer_monitor(&mut cfg);
        Ok(cfg)
    }

    /// Diagnostics follow the explorer's settings and its checkpoints folder.
    fn set_explorer_monitor(&self, cfg: &mut TrainConfig) {
        cfg.monitor.every = self.settings.diagnostics_every;
        // A smaller sample than the CLI's default keeps a check to a few seconds on a CPU.
        cfg.monitor.n_real = 1000;
        cfg.monitor.n_generated = 500;
        let chosen = self.settings.evaluator_path.trim();
        cfg.monitor.evaluator = Some(if chosen.is_empty() {
            crate::train::monitor::default_evaluator_dir(&self.checkpoints, cfg)
        } else {
            PathBuf::from(chosen)
        });
        // FID when asked for here (an opened run otherwise keeps its own setting); without
        // weights the session refuses to start with the config's message.
        if self.settings.fid_every > 0 {
            cfg.monitor.fid_every = self.settings.fid_every;
            let w = self.settings.fid_weights.trim();
            cfg.monitor.fid_weights = (!w.is_empty()).then(|| PathBuf::from(w));
        }
    }

    /// (Re)start training from scratch or from a run folder. The old session is dropped
    /// (its thread ends after its current step); nothing waits for it.
    pub fn start_session(&mut self, resume: Option<PathBuf>, run: bool) {
        let cfg = match resume.as_deref().map(crate::train::read_config) {
            Some(Ok(mut c)) => {
                // Data come from the saved run, diagnostics from the explorer.
                self.set_explorer_monitor(&mut c);
                // The training panel names the opened run's preset (so Start trains that
                // family from scratch), when it is one of the named presets.
                if TrainConfig::preset(&c.preset).is_ok() {
                    self.settings.preset = c.preset.clone();
                }
                Ok(c)
            }
            Some(Err(e)) => Err(e),
            None => self.session_config(),
        };
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => {
                self.run.error = Some(e.to_string());
                return;
            }
        };
        let device = match pick_device(&self.settings.device) {
            Ok(d) => d,
            Err(e) => {
                self.run.error = Some(e);
                return;
            }
        };
        let mut cfg = cfg;
        if let Some(v) = self.settings.on_d_wins {
            cfg.guard.on_d_wins = v;
        }
        let mut spec = SessionSpec::new(cfg, device);
        spec.resume = resume;
        spec.run = run;
        spec.wall_every = self.settings.wall_every.max(1);
        spec.wall_cols = self.settings.wall_cols.clamp(1, 16);
        spec.nan_policy = self.settings.nan_policy;
        spec.adapt_to_data = spec.resume.is_none() && !self.settings.data_path.trim().is_empty();
        spec.run_dir = self
            .runs
            .as_deref()
            .map(|root| train_panel::new_run_folder_in(root, &spec.cfg.preset));
        spec.feature_cache = self.feature_cache.clone();
        self.session = Some(Session::spawn(spec, self.wake.clone()));
        self.run = RunView {
            run_state: RunState::Loading,
            ..RunView::default()
        };
        if self.settings.target > 0 {
            self.send(Command::SetTarget(self.settings.target));
        }
    }

    /// A command to the training session (a log line when there is none).
    pub fn send(&mut self, c: Command) {
        let ok = self.session.as_ref().is_some_and(|s| s.send(c));
        if !ok {
            self.push_log("no training session: press Start".into());
        }
    }

    /// Apply everything the threads sent since the last frame.
    pub fn poll(&mut self) {
        let mut events = Vec::new();
        if let Some(s) = &self.session {
            events.extend(s.events.try_iter());
        }
        for e in events {
            self.on_event(e);
        }
        for m in self.export.poll() {
            self.push_log(m);
        }
        let results: Vec<_> = self.renderer.results.try_iter().collect();
        for r in results {
            self.on_rendered(r);
        }
        if let Some(r) = self.latent.poll_directions() {
            self.run.error = Some(format!("principal directions: {r}"));
        }
        self.poll_dialog();
    }

    /// One answer of the renderer thread, handed to the panel that asked.
    fn on_rendered(&mut self, r: std::result::Result<Rendered, String>) {
        match r {
            Ok(r) if r.slot == "scene" => {
                let order = self.scene_requests.remove(&r.id).unwrap_or_default();
                // Older requests were dropped by the renderer.
                self.scene_requests.retain(|id, _| *id > r.id);
                self.scene.on_rendered(r, order);
            }
            Ok(r) => self.latent.on_rendered(r),
            Err(e) => self.push_log(e),
        }
    }

    /// Wait up to `budget` for the renderer's answer to the explorer-image request `id` (sent
    /// by this frame's input), handling whatever arrives meanwhile. True when it arrived: the
    /// caller then runs the frame's UI pass again so the image is painted in this frame rather
    /// than after the next wake-up. A slow forward pass (a 64-pixel G while training) simply
    /// misses the budget and arrives through the usual wake-up.
    pub fn await_latent(&mut self, id: u64, budget: Duration) -> bool {
        let deadline = Instant::now() + budget;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.renderer.results.recv_timeout(left) {
                Ok(r) => {
                    let answered = matches!(&r, Ok(x) if x.slot == "latent" && x.id >= id);
                    self.on_rendered(r);
                    if answered {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        let run = &mut self.run;
        match e {
            Event::Ready(info) => {
                self.timings.launch_to_ready_s = Some(self.started.elapsed().as_secs_f64());
                self.train.on_ready(&info);
                self.composer.reset(&info);
                self.latent.reset(
                    info.cfg.model.z_dim,
                    info.cfg.sampling.truncation,
                    &self.composer,
                );
                self.scene.reset();
                if let Some(off) = &info.diagnostics_off {
                    self.status.push(format!("diagnostics {off}"));
                }
                self.status.push(format!(
                    "{}: {} on {}, G {} / D {} parameters",
                    info.cfg.preset, info.data_source, info.device, info.g_params, info.d_params,
                ));
                run.info = Some(*info);
            }
            Event::State(s) => run.run_state = s,
            Event::Loop(LoopEvent::Step(s)) => {
                if run.history.len() >= HISTORY_KEPT {
                    run.history.drain(..HISTORY_KEPT / 10);
                }
                run.history.push(s);
            }
            Event::Loop(LoopEvent::Wall(f)) => {
                if self.timings.launch_to_first_wall_s.is_none() {
                    self.timings.launch_to_first_wall_s =
                        Some(self.started.elapsed().as_secs_f64());
                }
                // Replace a frame of the same step (a re-render after a wall change).
                if run.frames.back().is_some_and(|b| b.step == f.step) {
                    run.frames.pop_back();
                }
                if run.frames.len() >= FRAMES_KEPT {
                    run.frames.pop_front();
                    if let Some(i) = run.scrub.as_mut() {
                        *i = i.saturating_sub(1);
                    }
                }
                run.frames.push_back(f);
            }
            Event::Loop(LoopEvent::Weights(w)) => {
                run.last_weights = Some(w.clone());
                self.renderer.set_weights(w);
                self.request_latent(false);
                self.request_interp();
                if self.settings.tab == Tab::Scene {
                    self.request_scene();
                }
            }
            Event::Loop(LoopEvent::Check(c)) => {
                let r = &c.report;
                run.check_series.push(CheckPoint {
                    step: c.step,
                    accuracy: r
                        .label_hits
                        .as_ref()
                        .map(|h| h.accuracy)
                        .or(r.confusion.as_ref().map(|c| c.accuracy)),
                    precision: r.prdc.precision,
                    recall: r.prdc.recall,
                    density: r.prdc.density,
                    coverage: r.prdc.coverage,
                    ndb_significant: r.ndb.significant.iter().filter(|s| **s).count(),
                    seconds: c.seconds,
                });
                run.last_check = Some(c);
            }
            Event::Loop(LoopEvent::Fid(p)) => {
                self.status.push(format!(
                    "FID {:.2} at step {} ({} generated vs {} real images, {:.0} s)",
                    p.fid, p.step, p.n_generated, p.n_real, p.seconds
                ));
                run.fid_series.push(p);
            }
            Event::Loop(LoopEvent::Diagnostics(off)) => {
                if let Some(why) = &off {
                    self.status.push(format!("diagnostics {why}"));
                }
                if let Some(i) = run.info.as_mut() {
                    i.diagnostics_off = off;
                }
            }
            Event::Loop(LoopEvent::Alarm(a)) => {
                self.status.push(format!("ALARM {}", a.message));
                run.alarms.push(a);
            }
            Event::Loop(LoopEvent::Recovered(r)) => {
                // The steps after the restored snapshot were undone: so are their numbers.
                run.history.retain(|h| h.stats.step <= r.to);
                run.fid_series.retain(|p| p.step <= r.to);
                self.status.push(r.message.clone());
                run.banner = Some(r.message);
            }
            Event::Saved(p) => {
                self.status
                    .push(format!("saved a checkpoint to {}", p.display()));
            }
            Event::Loop(LoopEvent::Log(s)) => self.status.push(s),
            Event::Error(s) => {
                self.status.push(format!("training stopped: {s}"));
                run.error = Some(s);
            }
        }
    }

    /// Carry out the panels' commands of this frame, in the order they were sent. The one
    /// place where a panel's action changes the app, the session or another panel.
    pub fn apply(&mut self) {
        // A command may queue more (a dialog answer opens a dataset, ...): loop until empty.
        while !self.commands.is_empty() {
            let commands = std::mem::take(&mut self.commands);
            for c in commands {
                self.apply_one(c);
            }
        }
    }

    fn apply_one(&mut self, c: AppCommand) {
        match c {
            AppCommand::Trainer(c) => self.send(c),
            AppCommand::Start { resume, run } => self.start_session(resume, run),
            AppCommand::Stop => {
                self.session = None;
                self.run.run_state = RunState::Stopped;
                self.push_log("stopped (the last step finishes in the background)".into());
            }
            AppCommand::OpenDataset(p) => self.open_dataset(&p),
            AppCommand::Ask {
                purpose,
                folder,
                title,
            } => {
                let rx = if folder {
                    self.dialogs.pick_folder(title)
                } else {
                    self.dialogs.pick_file(title)
                };
                self.pending_dialog = Some((purpose, rx));
            }
            AppCommand::Log(s) => self.push_log(s),
            AppCommand::Error(e) => self.run.error = Some(e),
            AppCommand::DismissError => self.run.error = None,
            AppCommand::DismissBanner => self.run.banner = None,
            AppCommand::RenderLatent { timed } => self.request_latent(timed),
            AppCommand::RenderInterp => self.request_interp(),
            AppCommand::RenderScene => self.request_scene(),
            AppCommand::ExportScene { gif } => {
                let names = self
                    .run
                    .info
                    .as_ref()
                    .map(|i| i.cfg.model.label_names.clone());
                let r = self.export.scene(
                    &self.scene,
                    &names.unwrap_or_default(),
                    gif,
                    &self.run,
                    &self.settings,
                );
                if let Some(m) = self.export.report_submit(r) {
                    self.push_log(m);
                }
            }
            AppCommand::SetEndpoint { b } => {
                let e = self.latent.endpoint(&self.composer);
                if b {
                    self.latent.interp.b = e;
                } else {
                    self.latent.interp.a = e;
                }
                self.request_interp();
            }
            AppCommand::ApplyLatent(s) => match self.latent.apply(s, &mut self.composer) {
                Ok(()) => self.request_latent(true),
                Err(e) => self.run.error = Some(e),
            },
            AppCommand::FindDirections => match self.run.last_weights.clone() {
                Some(w) => {
                    self.latent
                        .find_directions(w, self.composer.cond.clone(), self.wake.clone())
                }
                None => self.push_log("no generator weights yet".into()),
            },
            AppCommand::Scrub(i) => self.run.scrub = i,
            AppCommand::LoadConditionList => {
                let mut sent = Vec::new();
                self.composer.load_list(&mut sent);
                self.commands.extend(sent);
            }
            AppCommand::ExportInterp { gif } => {
                let r =
                    self.export
                        .interpolation(&self.latent.interp, gif, &self.run, &self.settings);
                if let Some(m) = self.export.report_submit(r) {
                    self.push_log(m);
                }
            }
        }
    }

    /// Apply a dialog's answer when it arrives.
    fn poll_dialog(&mut self) {
        let Some((purpose, rx)) = &self.pending_dialog else {
            return;
        };
        let purpose = *purpose;
        let answer = match rx.try_recv() {
            Ok(a) => a,
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => None,
        };
        self.pending_dialog = None;
        let Some(path) = answer else {
            self.push_log(
                "no path chosen (cancelled, or no file dialog available here: type the path \
                 into the field instead)"
                    .into(),
            );
            // The field for this path takes the focus and says what to do.
            self.prompt = Some(PathPrompt {
                purpose,
                focused: false,
            });
            return;
        };
        let text = path.display().to_string();
        match purpose {
            Purpose::OpenDataset => self.open_dataset(&path),
            Purpose::OpenCheckpoint => {
                self.settings.checkpoint_path = text;
                self.start_session(Some(path), false);
            }
            Purpose::SaveCheckpoint => {
                self.settings.checkpoint_path = text;
                self.send(Command::Save(path));
            }
            Purpose::ExportFolder => self.settings.export_path = text,
            Purpose::ConditionList => {
                self.composer.list_path = text;
                self.commands.push(AppCommand::LoadConditionList);
                self.apply();
            }
        }
    }

    fn next_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// Ask the renderer for the latent image. `timed`: a user's input (slider, label) asked,
    /// so its latency is measured (a re-render for new weights is not).
    pub fn request_latent(&mut self, timed: bool) {
        if self.run.info.is_none() {
            return;
        }
        let id = self.next_id();
        let z = self.latent.current_z();
        if timed {
            self.latent.pending.insert(id, Instant::now());
            self.awaiting = Some(id);
        }
        self.renderer.request(RenderRequest {
            slot: "latent",
            id,
            z: vec![z],
            c: vec![self.composer.cond.clone()],
            scene: None,
        });
    }

    /// Ask the renderer for the scene sequence (floor + each step).
    pub fn request_scene(&mut self) {
        let Some(info) = &self.run.info else {
            return;
        };
        if info.cfg.model.arch != crate::config::Arch::Sequential {
            return;
        }
        let z = self
            .scene
            .latents(info.cfg.model.z_dim, self.latent.truncation);
        let id = self.next_id();
        self.scene_requests.insert(id, self.scene.order.clone());
        self.renderer.request(RenderRequest {
            slot: "scene",
            id,
            z,
            c: vec![],
            scene: Some(self.scene.order.clone()),
        });
    }

    /// Ask the renderer for the interpolation strip.
    pub fn request_interp(&mut self) {
        if self.run.info.is_none() {
            return;
        }
        let id = self.next_id();
        let (z, c) = self
            .latent
            .interp
            .points(self.settings.interp_steps, self.settings.slerp);
        self.renderer.request(RenderRequest {
            slot: "interp",
            id,
            z,
            c,
            scene: None,
        });
    }

    fn handle_dropped_files(&mut self, ui: &egui::Ui) {
        let dropped: Vec<PathBuf> = ui.ctx().input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if let Some(p) = dropped.into_iter().next() {
            self.open_dataset(&p);
        }
    }

    /// Point the explorer at a dataset folder (or file) and restart on it.
    pub fn open_dataset(&mut self, path: &Path) {
        let kind = crate::data::detect_kind(path);
        let Some(kind) = kind else {
            self.run.error = Some(format!(
                "{}: not a dataset ganscope knows (MNIST/Fashion IDX, CIFAR-10 binary, an \
                 i-CLEVR folder with objects.json, an attribute folder with cartoon_attr.txt, \
                 or one subfolder per class)",
                path.display()
            ));
            return;
        };
        let current = TrainConfig::preset(&self.settings.preset)
            .map(|c| c.data.kind)
            .ok();
        if current != Some(kind) {
            self.settings.preset = preset_for(kind).into();
        }
        self.settings.data_path = path.display().to_string();
        self.push_log(format!("dataset {} ({kind:?})", path.display()));
        self.start_session(None, true);
    }
}

/// `s` with every run of digits (and the points and signs inside numbers) replaced by `#`:
/// two log lines that differ only in their numbers compare equal.
pub fn numbers_masked(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_number = false;
    for ch in s.chars() {
        let numeric = ch.is_ascii_digit() || (in_number && matches!(ch, '.' | 'e' | '-' | '+'));
        if numeric {
            if !in_number {
                out.push('#');
            }
        } else {
            out.push(ch);
        }
        in_number = numeric;
    }
    out
}

/// The first preset whose data kind is `kind`.
pub fn preset_for(kind: DataKind) -> &'static str {
    crate::config::PRESETS
        .iter()
        .map(|p| p.0)
        .find(|name| TrainConfig::preset(name).is_ok_and(|c| c.data.kind == kind))
        .unwrap_or(DEFAULT_PRESET)
}

/// cpu / cuda / metal / auto (see [`crate::device::open`]).
pub fn pick_device(name: &str) -> std::result::Result<Device, String> {
    crate::device::open(name, |_| {}).map_err(|e| e.to_string())
}

impl eframe::App for GanscopeApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let t0 = Instant::now();
        // eframe's measure of the previous frame (UI + tessellation + paint submission).
        if let Some(cpu) = frame.info().cpu_usage {
            if self.timings.frame_cpu_ms.len() >= 120 {
                self.timings.frame_cpu_ms.pop_front();
            }
            self.timings.frame_cpu_ms.push_back(cpu as f64 * 1e3);
        }
        self.poll();
        self.handle_dropped_files(ui);
        let mut ctx = PanelCtx {
            settings: &mut self.settings,
            run: &self.run,
            prompt: &mut self.prompt,
            commands: &mut self.commands,
            has_session: self.session.is_some(),
            checkpoints: &self.checkpoints,
            show_timings: self.show_timings,
        };
        egui::Panel::top("menu").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("ganscope");
                ui.separator();
                for (tab, name) in [
                    (Tab::Wall, "Wall"),
                    (Tab::Explore, "Explore"),
                    (Tab::Diagnostics, "Diagnostics"),
                    (Tab::Plots, "Plots"),
                    (Tab::Scene, "Scene"),
                ] {
                    ui.selectable_value(&mut ctx.settings.tab, tab, name);
                }
                ui.separator();
                ui.toggle_value(&mut ctx.settings.show_controls, "Training panel");
                ui.toggle_value(&mut ctx.settings.show_conditions, "Conditions panel");
            });
        });
        egui::Panel::bottom("status").show(ui, |ui| {
            self.status.ui(ui, &ctx, &self.timings, &self.latent);
        });
        if ctx.settings.show_controls {
            egui::Panel::left("training")
                .resizable(true)
                .default_size(270.0)
                .show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| {
                        self.train.ui(ui, &mut ctx);
                        ui.separator();
                        self.export.ui(ui, &mut ctx, &self.composer);
                    });
                });
        }
        if ctx.settings.show_conditions {
            egui::Panel::right("conditions")
                .resizable(true)
                .default_size(300.0)
                .show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| {
                        self.composer.ui(ui, &mut ctx);
                        if ctx.run.info.is_some() {
                            ui.separator();
                            self.latent.sliders_ui(ui, &mut ctx, &self.composer);
                        }
                    });
                });
        }
        egui::CentralPanel::default().show(ui, |ui| {
            messages_ui(ui, &mut ctx);
            match ctx.settings.tab {
                Tab::Wall => self.wall.ui(ui, &mut ctx),
                Tab::Explore => self.latent.explore_ui(ui, &mut ctx, &self.composer),
                Tab::Diagnostics => self.diagnostics.ui(ui, &mut ctx, &self.composer),
                Tab::Plots => self.plots.ui(ui, &mut ctx),
                Tab::Scene => self.scene.ui(ui, &mut ctx, &self.composer),
            }
        });
        if self.latent.interp.animate && self.settings.tab == Tab::Explore {
            ui.ctx().request_repaint_after(Duration::from_millis(60));
        }
        self.apply();
        if let Some(id) = self.awaiting.take()
            && self.settings.tab == Tab::Explore
            && self.await_latent(id, self.same_frame_wait)
        {
            ui.ctx()
                .request_discard("the explorer image for this frame's input arrived");
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if self.timings.frame_ms.len() >= 120 {
            self.timings.frame_ms.pop_front();
        }
        self.timings.frame_ms.push_back(ms);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        let mut s = self.settings.clone();
        s.launched_before = true;
        eframe::set_value(storage, eframe::APP_KEY, &s);
    }
}

/// The error and banner lines above the central panel, each with its dismiss button.
fn messages_ui(ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
    if let Some(e) = &ctx.run.error {
        ui.horizontal(|ui| {
            ui.colored_label(egui::Color32::from_rgb(230, 80, 60), format!("Error: {e}"));
            if ui.button("Dismiss").clicked() {
                ctx.send(AppCommand::DismissError);
            }
        });
    }
    if let Some(b) = &ctx.run.banner {
        ui.horizontal(|ui| {
            ui.colored_label(egui::Color32::from_rgb(240, 170, 40), b);
            if ui.button("OK").clicked() {
                ctx.send(AppCommand::DismissBanner);
            }
        });
    }
}

/// Open the explorer window (the binary's no-subcommand path), optionally on a run folder.
pub fn run_native(open: Option<PathBuf>, checkpoints: PathBuf) -> eframe::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([800.0, 500.0])
            .with_title("ganscope")
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native(
        "ganscope",
        options,
        Box::new(|cc| {
            Ok(Box::new(GanscopeApp::with_options(
                cc,
                AppOptions {
                    open,
                    checkpoints,
                    feature_cache: crate::train::monitor::user_feature_cache(),
                    ..AppOptions::default()
                },
            )))
        }),
    )
}
