//! The desktop explorer (eframe + egui, wgpu renderer). The engine runs in a background
//! thread ([`crate::train::worker::Session`]) and talks to this UI only through typed
//! commands and events; a second thread ([`crate::train::worker::Renderer`]) draws the
//! latent views. One panel per file; every panel is a `*_ui(&mut self, ui)` method.

mod composer;
mod diagnostics_panel;
pub mod dialogs;
mod export_panel;
mod latent;
mod plots;
pub mod train_panel;
pub mod wall;
pub mod wall_gpu;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{DataKind, TrainConfig};
use crate::diagnostics::Alarm;
use crate::train::monitor::Check;
use crate::train::worker::{
    Command, Event, NanPolicy, RenderRequest, Renderer, RunState, Session, SessionInfo,
    SessionSpec, StepEvent, Waker, WallFrame,
};

pub use composer::Composer;
pub use dialogs::{Dialogs, NoDialogs, RfdDialogs};
pub use latent::{InterpState, LatentState};
pub use wall::HeatMode;

/// The preset the explorer starts on.
pub const DEFAULT_PRESET: &str = "iclevr-small";
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
    pub nan_policy: NanPolicy,
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
            nan_policy: NanPolicy::RestorePause,
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
        }
    }
}

/// Where the shipped checkpoints are: the first of `./checkpoints`, `checkpoints/` beside the
/// executable (or three levels up from it: cargo's `target/<profile>/`) and the source tree's
/// that holds the default preset's shipped generator; else the first of them that exists
/// (`./checkpoints` when none does). The binary adds its embedded copy of the default
/// generator when none is found ([`run_native`]'s caller).
pub fn checkpoints_dir() -> PathBuf {
    let mut places = vec![PathBuf::from("checkpoints")];
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        places.push(exe_dir.join("checkpoints"));
        if let Some(root) = exe_dir.ancestors().nth(2) {
            places.push(root.join("checkpoints"));
        }
    }
    places.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints"));
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

/// Launch and latency measurements shown in the status bar.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub launch_to_ready_s: Option<f64>,
    pub launch_to_first_wall_s: Option<f64>,
    /// Slider moved -> image on screen (last, and the mean of the last 20).
    pub slider_to_image_ms: VecDeque<f64>,
    pub forward_ms: Option<f64>,
    /// UI frame build times (ms), last 120.
    pub frame_ms: VecDeque<f64>,
    /// Whole-frame CPU times as eframe measures them (ms), last 120.
    pub frame_cpu_ms: VecDeque<f64>,
}

pub struct GanscopeApp {
    pub settings: Settings,
    /// A Save that would replace something else, waiting for the user's answer: the folder
    /// and what is in it.
    pub save_confirm: Option<(PathBuf, String)>,
    pub session: Option<Session>,
    pub renderer: Renderer,
    pub info: Option<SessionInfo>,
    pub run_state: RunState,
    pub history: Vec<StepEvent>,
    pub frames: VecDeque<Arc<WallFrame>>,
    /// Index into `frames` while scrubbing the timeline; None = live.
    pub scrub: Option<usize>,
    pub last_check: Option<Box<Check>>,
    pub check_series: Vec<CheckPoint>,
    pub alarms: Vec<Alarm>,
    pub log: VecDeque<String>,
    /// How many times each log line came in a row (a line that differs from the one before
    /// only in its numbers replaces it and counts up: a repeating alarm is one line).
    pub log_counts: VecDeque<u32>,
    pub error: Option<String>,
    pub banner: Option<String>,
    pub composer: Composer,
    pub latent: LatentState,
    pub interp: InterpState,
    pub dialogs: Box<dyn Dialogs>,
    pub timings: Timings,
    pub checkpoints: PathBuf,
    /// Where sessions put their run folders (see [`AppOptions::runs`]).
    pub runs: Option<PathBuf>,
    pub wall: wall::WallView,
    pub export_message: Option<String>,
    /// Writes exports in its own thread.
    pub exporter: export_panel::Exporter,
    pub(crate) diag_textures: diagnostics_panel::DiagTextures,
    pub(crate) pending_dialog: Option<(dialogs::Purpose, Receiver<Option<PathBuf>>)>,
    /// A dialog answered nothing: its path field asks for the path.
    pub type_path: Option<dialogs::PathPrompt>,
    pub(crate) lr_edit: (f64, f64),
    pub(crate) n_critic_edit: usize,
    /// The newest generator weights (for exports and principal directions).
    pub last_weights: Option<Arc<crate::train::worker::GeneratorWeights>>,
    pub show_timings: bool,
    started: Instant,
    pub(crate) wake: Waker,
    request_id: u64,
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
            info: None,
            run_state: RunState::Stopped,
            history: Vec::new(),
            frames: VecDeque::new(),
            scrub: None,
            last_check: None,
            check_series: Vec::new(),
            alarms: Vec::new(),
            log: VecDeque::new(),
            log_counts: VecDeque::new(),
            error: None,
            banner: None,
            composer: Composer::default(),
            latent: LatentState::default(),
            interp: InterpState::default(),
            dialogs: opts.dialogs,
            timings: Timings::default(),
            checkpoints: opts.checkpoints,
            runs: opts.runs,
            wall: wall::WallView::new(gpu),
            export_message: None,
            exporter: export_panel::Exporter::spawn(wake.clone()),
            diag_textures: Default::default(),
            pending_dialog: None,
            type_path: None,
            lr_edit: (0.0, 0.0),
            save_confirm: None,
            n_critic_edit: 1,
            last_weights: None,
            show_timings: opts.show_timings,
            started: Instant::now(),
            wake,
            request_id: 0,
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
        if let Some(last) = self.log.back_mut()
            && numbers_masked(last) == numbers_masked(&s)
        {
            *last = s;
            if let Some(n) = self.log_counts.back_mut() {
                *n += 1;
            }
            return;
        }
        if self.log.len() >= 500 {
            self.log.pop_front();
            self.log_counts.pop_front();
        }
        self.log.push_back(s);
        self.log_counts.push_back(1);
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
        cfg.monitor.evaluator = Some(crate::train::monitor::default_evaluator_dir(
            &self.checkpoints,
            cfg,
        ));
    }

    /// (Re)start training from scratch or from a run folder. The old session is dropped
    /// (its thread ends after its current step); nothing waits for it.
    pub fn start_session(&mut self, resume: Option<PathBuf>, run: bool) {
        let cfg = match resume.as_deref().map(crate::train::read_config) {
            Some(Ok(mut c)) => {
                // Data come from the saved run, diagnostics from the explorer.
                self.set_explorer_monitor(&mut c);
                Ok(c)
            }
            Some(Err(e)) => Err(e),
            None => self.session_config(),
        };
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => {
                self.error = Some(e.to_string());
                return;
            }
        };
        let device = match pick_device(&self.settings.device) {
            Ok(d) => d,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
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
        self.session = Some(Session::spawn(spec, self.wake.clone()));
        self.info = None;
        self.history.clear();
        self.frames.clear();
        self.scrub = None;
        self.last_check = None;
        self.check_series.clear();
        self.alarms.clear();
        self.error = None;
        self.banner = None;
        self.run_state = RunState::Loading;
        if self.settings.target > 0 {
            self.send(Command::SetTarget(self.settings.target));
        }
    }

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
        self.poll_exports();
        let results: Vec<_> = self.renderer.results.try_iter().collect();
        for r in results {
            match r {
                Ok(r) => self
                    .latent
                    .on_rendered(r, &mut self.interp, &mut self.timings),
                Err(e) => self.push_log(e),
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Ready(info) => {
                self.timings.launch_to_ready_s = Some(self.started.elapsed().as_secs_f64());
                self.lr_edit = (info.cfg.optim.lr_g, info.cfg.optim.lr_d);
                self.n_critic_edit = info.cfg.loss.n_critic;
                self.composer.reset(&info);
                self.latent.reset(info.cfg.model.z_dim);
                self.interp.reset(&self.latent, &self.composer);
                if let Some(off) = &info.diagnostics_off {
                    self.push_log(format!("diagnostics {off}"));
                }
                self.push_log(format!(
                    "{}: {} on {}, G {} / D {} parameters",
                    info.cfg.preset, info.data_source, info.device, info.g_params, info.d_params,
                ));
                self.info = Some(*info);
            }
            Event::State(s) => self.run_state = s,
            Event::Step(s) => {
                if self.history.len() >= HISTORY_KEPT {
                    self.history.drain(..HISTORY_KEPT / 10);
                }
                self.history.push(*s);
            }
            Event::Wall(f) => {
                if self.timings.launch_to_first_wall_s.is_none() {
                    self.timings.launch_to_first_wall_s =
                        Some(self.started.elapsed().as_secs_f64());
                }
                // Replace a frame of the same step (a re-render after a wall change).
                if self.frames.back().is_some_and(|b| b.step == f.step) {
                    self.frames.pop_back();
                }
                if self.frames.len() >= FRAMES_KEPT {
                    self.frames.pop_front();
                    if let Some(i) = self.scrub.as_mut() {
                        *i = i.saturating_sub(1);
                    }
                }
                self.frames.push_back(f);
            }
            Event::Weights(w) => {
                self.last_weights = Some(w.clone());
                self.renderer.set_weights(w);
                self.request_latent(false);
                self.request_interp();
            }
            Event::Check(c) => {
                let r = &c.report;
                self.check_series.push(CheckPoint {
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
                self.last_check = Some(c);
            }
            Event::Diagnostics(off) => {
                if let Some(why) = &off {
                    self.push_log(format!("diagnostics {why}"));
                }
                if let Some(i) = self.info.as_mut() {
                    i.diagnostics_off = off;
                }
            }
            Event::Alarm(a) => {
                self.push_log(format!("ALARM {}", a.message));
                self.alarms.push(a);
            }
            Event::Recovered(r) => {
                // The steps after the restored snapshot were undone: so are their numbers.
                self.history.retain(|h| h.stats.step <= r.to);
                self.push_log(r.message.clone());
                self.banner = Some(r.message);
            }
            Event::Saved(p) => {
                self.push_log(format!("saved a checkpoint to {}", p.display()));
            }
            Event::Log(s) => self.push_log(s),
            Event::Error(s) => {
                self.push_log(format!("training stopped: {s}"));
                self.error = Some(s);
            }
        }
    }

    fn next_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// Ask the renderer for the explorer image of the current latent and condition.
    /// Ask the renderer for the latent image. `timed`: a user's input (slider, label) asked,
    /// so its latency is measured (a re-render for new weights is not).
    pub fn request_latent(&mut self, timed: bool) {
        if self.info.is_none() {
            return;
        }
        let id = self.next_id();
        let z = self.latent.current_z();
        if timed {
            self.latent.pending.insert(id, Instant::now());
        }
        self.renderer.request(RenderRequest {
            slot: "latent",
            id,
            z: vec![z],
            c: vec![self.composer.cond.clone()],
        });
    }

    /// Ask the renderer for the interpolation strip.
    pub fn request_interp(&mut self) {
        if self.info.is_none() {
            return;
        }
        let id = self.next_id();
        let (z, c) = self
            .interp
            .points(self.settings.interp_steps, self.settings.slerp);
        self.renderer.request(RenderRequest {
            slot: "interp",
            id,
            z,
            c,
        });
    }

    /// The frame the wall shows: the scrubbed one or the newest.
    pub fn shown_frame(&self) -> Option<&Arc<WallFrame>> {
        match self.scrub {
            Some(i) => self.frames.get(i),
            None => self.frames.back(),
        }
    }

    fn status_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let state = match self.run_state {
                RunState::Loading => "loading",
                RunState::Paused => "paused",
                RunState::Running => "training",
                RunState::Stopped => "stopped",
            };
            ui.label(format!("State: {state}"));
            if let Some(s) = self.history.last() {
                ui.separator();
                ui.label(format!(
                    "step {}  {:.0} img/s  {:.2} s/step",
                    s.stats.step, s.images_per_s, s.step_seconds
                ));
            }
            if !self.show_timings {
                return;
            }
            ui.separator();
            let t = &self.timings;
            if let Some(i) = &self.info {
                ui.label(format!(
                    "data + networks built in {:.1} s",
                    i.seconds_to_build
                ));
            }
            if let Some(v) = t.launch_to_first_wall_s {
                ui.label(format!("first samples {v:.1} s after launch"));
            }
            if let Some(ms) = t.slider_to_image_ms.back() {
                ui.separator();
                ui.label(format!("slider->image {ms:.1} ms"));
            }
            let mean = |v: &VecDeque<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
            if !t.frame_ms.is_empty() {
                ui.separator();
                ui.label(format!("UI build {:.1} ms", mean(&t.frame_ms)));
            }
            if !t.frame_cpu_ms.is_empty() {
                let max = t.frame_cpu_ms.iter().cloned().fold(0.0, f64::max);
                ui.separator();
                ui.label(format!(
                    "frame CPU {:.1} ms (max {max:.1})",
                    mean(&t.frame_cpu_ms)
                ));
            }
        });
    }

    fn log_ui(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical()
            .max_height(90.0)
            .stick_to_bottom(true)
            .show(ui, |ui| {
                for (l, n) in self.log.iter().zip(&self.log_counts) {
                    let color = if l.starts_with("ALARM") || l.starts_with("NaN") {
                        egui::Color32::from_rgb(230, 90, 60)
                    } else {
                        ui.visuals().text_color()
                    };
                    let text = if *n > 1 {
                        format!("{l}  (x{n})")
                    } else {
                        l.clone()
                    };
                    ui.label(
                        egui::RichText::new(text)
                            .color(color)
                            .monospace()
                            .size(11.0),
                    );
                }
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
            self.error = Some(format!(
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
        self.poll_dialog();
        self.handle_dropped_files(ui);
        egui::Panel::top("menu").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("ganscope");
                ui.separator();
                for (tab, name) in [
                    (Tab::Wall, "Wall"),
                    (Tab::Explore, "Explore"),
                    (Tab::Diagnostics, "Diagnostics"),
                    (Tab::Plots, "Plots"),
                ] {
                    ui.selectable_value(&mut self.settings.tab, tab, name);
                }
                ui.separator();
                ui.toggle_value(&mut self.settings.show_controls, "Training panel");
                ui.toggle_value(&mut self.settings.show_conditions, "Conditions panel");
            });
        });
        egui::Panel::bottom("status").show(ui, |ui| {
            self.status_ui(ui);
            self.log_ui(ui);
        });
        if self.settings.show_controls {
            egui::Panel::left("training")
                .resizable(true)
                .default_size(270.0)
                .show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| {
                        self.train_ui(ui);
                        ui.separator();
                        self.export_ui(ui);
                    });
                });
        }
        if self.settings.show_conditions {
            egui::Panel::right("conditions")
                .resizable(true)
                .default_size(300.0)
                .show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| self.composer_ui(ui));
                });
        }
        egui::CentralPanel::default().show(ui, |ui| {
            if let Some(e) = self.error.clone() {
                ui.horizontal(|ui| {
                    ui.colored_label(egui::Color32::from_rgb(230, 80, 60), format!("Error: {e}"));
                    if ui.button("Dismiss").clicked() {
                        self.error = None;
                    }
                });
            }
            if let Some(b) = self.banner.clone() {
                ui.horizontal(|ui| {
                    ui.colored_label(egui::Color32::from_rgb(240, 170, 40), b);
                    if ui.button("OK").clicked() {
                        self.banner = None;
                    }
                });
            }
            match self.settings.tab {
                Tab::Wall => self.wall_ui(ui),
                Tab::Explore => self.explore_ui(ui),
                Tab::Diagnostics => self.diagnostics_ui(ui),
                Tab::Plots => self.plots_ui(ui),
            }
        });
        if self.interp.animate && self.settings.tab == Tab::Explore {
            ui.ctx().request_repaint_after(Duration::from_millis(60));
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
                    ..AppOptions::default()
                },
            )))
        }),
    )
}
