//! Export: the wall (or a condition list x seeds) as a captioned sample sheet PNG at a chosen
//! scale, the wall's training history as a GIF (every frame captioned with its step, a frame
//! stride), the interpolation strip as PNG and GIF (captioned with A, B and t).
//!
//! The UI thread only gathers what is on screen (frames, weights, the strip: CPU data it
//! already holds) into an [`ExportJob`]; the rendering, the generator's forward pass for a
//! condition list and the GIF encoding run in the [`Exporter`]'s own thread, which reports
//! progress and wakes the UI.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use super::dialogs::{Purpose, path_field, prompt_note};
use super::latent::InterpState;
use super::{AppCommand, Composer, PanelCtx, RunView, ScenePanel, Settings};
use crate::error::{Error, Result};
use crate::export::gif::save_gif_with_progress;
use crate::export::sheet::{SheetLayout, sample_sheet, save_png};
use crate::images::Images;
use crate::train::run::{WALL_SEED, caption};
use crate::train::worker::{GeneratorWeights, Waker, WallFrame};

/// Something to write, with everything it needs (no reference to the UI's state).
pub enum ExportJob {
    WallPng {
        frame: Arc<WallFrame>,
        scale: u32,
        path: PathBuf,
    },
    /// Frames of the wall, each titled with its step.
    HistoryGif {
        frames: Vec<Arc<WallFrame>>,
        scale: u32,
        delay_ms: u32,
        path: PathBuf,
    },
    /// Conditions (rows) x the wall's noise seeds, rendered with these weights.
    ListSheet {
        weights: Arc<GeneratorWeights>,
        items: Vec<Vec<f32>>,
        captions: Vec<String>,
        cols: usize,
        scale: u32,
        path: PathBuf,
    },
    /// A strip of images (the interpolation, a scene's steps): a PNG row with a caption
    /// under each image, or a GIF of them.
    Strip {
        /// "interpolation" or "scene".
        what: &'static str,
        strip: Images,
        captions: Vec<String>,
        title: String,
        gif: bool,
        delay_ms: u32,
        scale: u32,
        path: PathBuf,
    },
}

impl ExportJob {
    fn what(&self) -> &'static str {
        match self {
            ExportJob::WallPng { .. } => "wall PNG",
            ExportJob::HistoryGif { .. } => "wall history GIF",
            ExportJob::ListSheet { .. } => "condition list sheet",
            ExportJob::Strip {
                what: "scene",
                gif: true,
                ..
            } => "scene GIF",
            ExportJob::Strip { what: "scene", .. } => "scene strip PNG",
            ExportJob::Strip { gif: true, .. } => "interpolation GIF",
            ExportJob::Strip { .. } => "interpolation PNG",
        }
    }

    /// Write the file, reporting `(done, total)` work units.
    pub fn run(self, progress: &mut dyn FnMut(usize, usize)) -> Result<PathBuf> {
        match self {
            ExportJob::WallPng { frame, scale, path } => {
                save_png(&frame.sheet(scale)?, &path)?;
                Ok(path)
            }
            ExportJob::HistoryGif {
                frames,
                scale,
                delay_ms,
                path,
            } => {
                // Rendering the sheets is half the work, encoding the other half.
                let n = frames.len();
                let mut sheets = Vec::with_capacity(n);
                for (i, f) in frames.iter().enumerate() {
                    sheets.push(f.sheet_titled(scale, Some(format!("step {}", f.step)))?);
                    progress(i + 1, 2 * n);
                }
                save_gif_with_progress(&sheets, delay_ms, &path, &mut |d, _| {
                    progress(n + d, 2 * n)
                })?;
                Ok(path)
            }
            ExportJob::ListSheet {
                weights,
                items,
                captions,
                cols,
                scale,
                path,
            } => {
                progress(0, 2);
                let g = weights.build()?;
                let frame = WallFrame {
                    step: weights.step,
                    rows: items.len(),
                    cols,
                    captions,
                    images: g.grid(&items, cols, WALL_SEED)?,
                };
                progress(1, 2);
                save_png(&frame.sheet(scale)?, &path)?;
                Ok(path)
            }
            ExportJob::Strip {
                strip,
                captions,
                title,
                gif,
                delay_ms,
                scale,
                path,
                ..
            } => {
                let n = strip.n;
                let t = |i: usize| captions.get(i).cloned().unwrap_or_default();
                if gif {
                    let mut frames = Vec::with_capacity(n);
                    for i in 0..n {
                        let one = Images {
                            n: 1,
                            data: strip.image(i).to_vec(),
                            ..strip.clone()
                        };
                        let layout = SheetLayout {
                            col_captions: vec![t(i)],
                            ..SheetLayout::grid(1, 1).with_scale(scale * 2)
                        };
                        frames.push(sample_sheet(&one, &layout)?);
                    }
                    save_gif_with_progress(&frames, delay_ms, &path, progress)?;
                } else {
                    let layout = SheetLayout {
                        col_captions: (0..n).map(t).collect(),
                        title: Some(title),
                        ..SheetLayout::grid(1, n).with_scale(scale)
                    };
                    save_png(&sample_sheet(&strip, &layout)?, &path)?;
                }
                Ok(path)
            }
        }
    }
}

/// What the export thread reports.
#[derive(Debug, Clone)]
pub enum ExportMsg {
    Started(&'static str),
    Progress { done: usize, total: usize },
    Done(std::result::Result<PathBuf, String>),
}

/// The export thread: one job at a time, in order.
pub struct Exporter {
    tx: Sender<ExportJob>,
    rx: Receiver<ExportMsg>,
    /// The job running now and its progress, as last reported.
    pub busy: Option<(&'static str, usize, usize)>,
    /// Jobs sent and not finished.
    pending: usize,
}

impl Exporter {
    pub fn spawn(wake: Waker) -> Self {
        let (tx, jobs) = mpsc::channel::<ExportJob>();
        let (mtx, rx) = mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("ganscope-export".into())
            .spawn(move || {
                for job in jobs {
                    let send = |m: ExportMsg| {
                        let _ = mtx.send(m);
                        wake();
                    };
                    send(ExportMsg::Started(job.what()));
                    let mut last = std::time::Instant::now();
                    let r = job.run(&mut |done, total| {
                        // At most about 20 progress messages a second.
                        if last.elapsed().as_millis() >= 50 || done == total {
                            last = std::time::Instant::now();
                            send(ExportMsg::Progress { done, total });
                        }
                    });
                    send(ExportMsg::Done(r.map_err(|e| e.to_string())));
                }
            });
        Self {
            tx,
            rx,
            busy: None,
            pending: 0,
        }
    }

    pub fn submit(&mut self, job: ExportJob) -> Result<()> {
        self.tx
            .send(job)
            .map_err(|_| Error::Msg("the export thread has ended".into()))?;
        self.pending += 1;
        Ok(())
    }

    pub fn is_busy(&self) -> bool {
        self.pending > 0
    }

    /// Finished jobs since the last call (progress is kept in `busy`).
    pub fn poll(&mut self) -> Vec<std::result::Result<PathBuf, String>> {
        let mut done = vec![];
        for m in self.rx.try_iter() {
            match m {
                ExportMsg::Started(what) => self.busy = Some((what, 0, 1)),
                ExportMsg::Progress { done, total } => {
                    if let Some(b) = &mut self.busy {
                        (b.1, b.2) = (done, total);
                    }
                }
                ExportMsg::Done(r) => {
                    self.pending = self.pending.saturating_sub(1);
                    self.busy = None;
                    done.push(r);
                }
            }
        }
        done
    }
}

/// The export panel: its export thread and the last message (written file or error).
pub struct ExportPanel {
    /// Writes exports in its own thread.
    pub exporter: Exporter,
    pub message: Option<String>,
}

impl ExportPanel {
    pub fn spawn(wake: Waker) -> Self {
        Self {
            exporter: Exporter::spawn(wake),
            message: None,
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, composer: &Composer) {
        ui.heading("Export");
        ui.horizontal(|ui| {
            ui.label("Folder");
            path_field(
                ui,
                ctx.prompt,
                Purpose::ExportFolder,
                &mut ctx.settings.export_path,
                "a folder",
                140.0,
            );
            if ui.button("…").clicked() {
                ctx.send(AppCommand::Ask {
                    purpose: Purpose::ExportFolder,
                    folder: true,
                    title: "Export folder",
                });
            }
            if ui
                .button("Reveal")
                .on_hover_text("show the export folder in the file manager")
                .clicked()
            {
                let dir = std::path::absolute(ctx.settings.export_path.trim())
                    .unwrap_or_else(|_| PathBuf::from(ctx.settings.export_path.trim()));
                if let Err(e) = super::dialogs::reveal(&dir) {
                    ctx.log(e);
                }
            }
        });
        prompt_note(ui, ctx.prompt, Purpose::ExportFolder);
        ui.horizontal(|ui| {
            ui.label("Scale");
            ui.add(egui::DragValue::new(&mut ctx.settings.export_scale).range(1..=8));
            ui.label("GIF stride");
            ui.add(egui::DragValue::new(&mut ctx.settings.gif_stride).range(1..=50))
                .on_hover_text("the history GIF uses every n-th kept wall frame (and the newest)");
        });
        let idle = !self.exporter.is_busy();
        let mut submitted = None;
        if ui
            .add_enabled(idle, egui::Button::new("Wall as PNG"))
            .clicked()
        {
            submitted = Some(self.wall_png(ctx.run, ctx.settings));
        }
        if ui
            .add_enabled(idle, egui::Button::new("Wall history as GIF"))
            .on_hover_text("the kept wall frames, each titled with its step")
            .clicked()
        {
            submitted = Some(self.history_gif(ctx.run, ctx.settings));
        }
        let has_list = composer.list.is_some();
        if ui
            .add_enabled(
                idle && has_list,
                egui::Button::new("Condition list x seeds as PNG"),
            )
            .on_hover_text("every condition of the loaded list (rows) x the wall's seeds")
            .clicked()
        {
            submitted = Some(self.list_sheet(composer, ctx.run, ctx.settings));
        }
        if let Some(m) = submitted.and_then(|r| self.report_submit(r)) {
            ctx.log(m);
        }
        if let Some((what, done, total)) = self.exporter.busy {
            ui.add(
                egui::ProgressBar::new(done as f32 / total.max(1) as f32)
                    .text(format!("writing the {what}…")),
            );
        }
        if let Some(m) = &self.message {
            ui.label(m);
        }
    }

    /// Take in finished exports (called every frame); returns the log lines.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = vec![];
        for r in self.exporter.poll() {
            let m = match r {
                Ok(p) => {
                    let abs = std::path::absolute(&p).unwrap_or(p);
                    format!("wrote {}", abs.display())
                }
                Err(e) => format!("export failed: {e}"),
            };
            self.message = Some(m.clone());
            lines.push(m);
        }
        lines
    }

    /// A job that could not be submitted: the message (also for the log), if any.
    pub fn report_submit(&mut self, r: Result<()>) -> Option<String> {
        let e = r.err()?;
        let m = format!("export failed: {e}");
        self.message = Some(m.clone());
        Some(m)
    }

    fn export_file(run: &RunView, settings: &Settings, stem: &str, ext: &str) -> PathBuf {
        let step = run.shown_frame().map_or(0, |f| f.step);
        Path::new(settings.export_path.trim())
            .join(format!("{}-{stem}-step{step:06}.{ext}", run.preset()))
    }

    /// The wall frame on screen as a PNG sheet (written by the export thread).
    pub fn wall_png(&mut self, run: &RunView, settings: &Settings) -> Result<()> {
        let frame = run
            .shown_frame()
            .cloned()
            .ok_or_else(|| Error::Msg("no wall frame yet".into()))?;
        let job = ExportJob::WallPng {
            frame,
            scale: settings.export_scale.max(1),
            path: Self::export_file(run, settings, "wall", "png"),
        };
        self.exporter.submit(job)
    }

    /// Every `gif_stride`-th kept frame of the wall (and the newest) as an animated GIF.
    pub fn history_gif(&mut self, run: &RunView, settings: &Settings) -> Result<()> {
        let Some(last) = run.frames.back().cloned() else {
            return Err(Error::Msg("no wall frames yet".into()));
        };
        // Frames of one wall layout only (the newest one's).
        let same: Vec<Arc<WallFrame>> = run
            .frames
            .iter()
            .filter(|f| f.rows == last.rows && f.cols == last.cols)
            .cloned()
            .collect();
        let stride = settings.gif_stride.max(1);
        let mut frames: Vec<Arc<WallFrame>> = same.iter().step_by(stride).cloned().collect();
        if frames.last().is_none_or(|f| f.step != last.step) {
            frames.push(last);
        }
        let job = ExportJob::HistoryGif {
            frames,
            scale: settings.export_scale.max(1),
            delay_ms: 150,
            path: Self::export_file(run, settings, "history", "gif"),
        };
        self.exporter.submit(job)
    }

    /// The composer's loaded condition list (rows) x the wall's noise seeds (columns).
    pub fn list_sheet(
        &mut self,
        composer: &Composer,
        run: &RunView,
        settings: &Settings,
    ) -> Result<()> {
        let list = composer
            .list
            .clone()
            .ok_or_else(|| Error::Msg("no condition list loaded".into()))?;
        let weights = run
            .last_weights
            .clone()
            .ok_or_else(|| Error::Msg("no generator weights yet".into()))?;
        let cols = settings.wall_cols.max(1);
        let captions = list
            .items
            .iter()
            .map(|c| caption(c, &composer.names))
            .collect();
        let stem = format!("{}-x{cols}", list.name.trim_end_matches(".json"));
        let job = ExportJob::ListSheet {
            weights,
            items: list.items,
            captions,
            cols,
            scale: settings.export_scale.max(1),
            path: Self::export_file(run, settings, &stem, "png"),
        };
        self.exporter.submit(job)
    }

    /// The interpolation strip as a PNG row or a GIF.
    pub fn interpolation(
        &mut self,
        interp: &InterpState,
        gif: bool,
        run: &RunView,
        settings: &Settings,
    ) -> Result<()> {
        let strip: Images = interp
            .strip
            .clone()
            .ok_or_else(|| Error::Msg("no interpolation rendered yet".into()))?;
        let title = format!(
            "A: {}  ->  B: {}",
            or_none(&interp.a.caption),
            or_none(&interp.b.caption)
        );
        let ext = if gif { "gif" } else { "png" };
        let n = strip.n;
        let job = ExportJob::Strip {
            what: "interpolation",
            captions: (0..n)
                .map(|i| format!("t={:.2}", i as f64 / (n.max(2) - 1) as f64))
                .collect(),
            strip,
            title,
            gif,
            delay_ms: 120,
            scale: settings.export_scale.max(1),
            path: Self::export_file(run, settings, "interpolation", ext),
        };
        self.exporter.submit(job)
    }

    /// The Scene tab's sequence (floor + each step) as a PNG row or a GIF.
    pub fn scene(
        &mut self,
        scene: &ScenePanel,
        names: &[String],
        gif: bool,
        run: &RunView,
        settings: &Settings,
    ) -> Result<()> {
        let strip = scene
            .images
            .clone()
            .ok_or_else(|| Error::Msg("no scene drawn yet".into()))?;
        let captions = scene.captions(names);
        let title = format!("scene, weights of step {}", scene.images_step);
        let ext = if gif { "gif" } else { "png" };
        let job = ExportJob::Strip {
            what: "scene",
            strip,
            captions,
            title,
            gif,
            delay_ms: 800,
            scale: settings.export_scale.max(1),
            path: Self::export_file(run, settings, "scene", ext),
        };
        self.exporter.submit(job)
    }
}

fn or_none(caption: &str) -> &str {
    if caption.is_empty() {
        "(no labels)"
    } else {
        caption
    }
}
