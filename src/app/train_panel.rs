//! The training panel: preset, data, device, run / pause / single steps, learning rates,
//! n_critic, target step with progress and ETA, NaN policy, checkpoints.

use std::path::PathBuf;

use super::dialogs::{Purpose, path_field, prompt_note};
use super::{AppCommand, PanelCtx};
use crate::config::{OnDWins, PRESETS};
use crate::train::StepKind;
use crate::train::worker::{Command, NanPolicy, RunState, SessionInfo};

/// The training panel's own state: the learning-rate and n_critic edits (applied with a
/// button) and a guarded Save waiting for the user's answer.
#[derive(Debug, Default)]
pub struct TrainPanel {
    pub lr_edit: (f64, f64),
    pub n_critic_edit: usize,
    /// A Save that would replace something else, waiting for the user's answer: the folder
    /// and what is in it.
    pub save_confirm: Option<(PathBuf, String)>,
}

impl TrainPanel {
    /// A new session is ready: the edits start from its settings.
    pub fn on_ready(&mut self, info: &SessionInfo) {
        self.lr_edit = (info.cfg.optim.lr_g, info.cfg.optim.lr_d);
        self.n_critic_edit = info.cfg.loss.n_critic;
        self.save_confirm = None;
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        ui.heading("Training");
        egui::Grid::new("train_setup")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("Preset");
                egui::ComboBox::from_id_salt("preset")
                    .selected_text(ctx.settings.preset.clone())
                    .width(170.0)
                    .show_ui(ui, |ui| {
                        for (name, about) in PRESETS {
                            ui.selectable_value(&mut ctx.settings.preset, name.to_string(), *name)
                                .on_hover_text(*about);
                        }
                    });
                ui.end_row();
                ui.label("Device");
                egui::ComboBox::from_id_salt("device")
                    .selected_text(ctx.settings.device.clone())
                    .show_ui(ui, |ui| {
                        for d in ["auto", "cpu", "cuda", "metal"] {
                            ui.selectable_value(&mut ctx.settings.device, d.to_string(), d);
                        }
                    });
                ui.end_row();
                ui.label("Data");
                let r = path_field(
                    ui,
                    ctx.prompt,
                    Purpose::OpenDataset,
                    &mut ctx.settings.data_path,
                    "built-in / usual place",
                    170.0,
                );
                if r.lost_focus()
                    && ui.input(|i| i.key_pressed(egui::Key::Enter))
                    && !ctx.settings.data_path.trim().is_empty()
                {
                    let p = PathBuf::from(ctx.settings.data_path.trim());
                    ctx.send(AppCommand::OpenDataset(p));
                }
                ui.end_row();
            });
        prompt_note(ui, ctx.prompt, Purpose::OpenDataset);
        ui.horizontal(|ui| {
            if ui
                .button("Open dataset…")
                .on_hover_text("a folder or file; you can also drop a folder onto the window")
                .clicked()
            {
                ctx.send(AppCommand::Ask {
                    purpose: Purpose::OpenDataset,
                    folder: true,
                    title: "Open a dataset folder",
                });
            }
            if ui.button("Built-in data").clicked() {
                ctx.settings.data_path.clear();
            }
        });
        ui.horizontal(|ui| {
            if ui
                .button("Start")
                .on_hover_text("a new run of the preset on the data above (from scratch)")
                .clicked()
            {
                ctx.send(AppCommand::Start {
                    resume: None,
                    run: true,
                });
            }
            let shipped = ctx.checkpoints.join(&ctx.settings.preset);
            if shipped.join("config.json").is_file()
                && ui
                    .button("Shipped")
                    .on_hover_text(format!(
                        "open the trained generator shipped for this preset ({}), paused; \
                         Resume trains on from it",
                        shipped.display()
                    ))
                    .clicked()
            {
                ctx.log(format!(
                    "opened the shipped checkpoint {} (paused: press Resume to train on)",
                    shipped.display()
                ));
                ctx.send(AppCommand::Start {
                    resume: Some(shipped),
                    run: false,
                });
            }
            if ui
                .add_enabled(ctx.has_session, egui::Button::new("Stop"))
                .clicked()
            {
                ctx.send(AppCommand::Stop);
            }
        });
        ui.separator();
        let live = ctx.has_session && ctx.run.run_state != RunState::Loading;
        ui.add_enabled_ui(live, |ui| {
            ui.horizontal(|ui| {
                if ctx.run.run_state == RunState::Running {
                    if ui.button("Pause").clicked() {
                        ctx.trainer(Command::Pause);
                    }
                } else if ui.button("Resume").clicked() {
                    ctx.trainer(Command::Run);
                }
                ui.label("Step:");
                if ui
                    .button("D")
                    .on_hover_text("one discriminator update")
                    .clicked()
                {
                    ctx.trainer(Command::Step(StepKind::DOnly));
                }
                if ui
                    .button("G")
                    .on_hover_text("one generator update")
                    .clicked()
                {
                    ctx.trainer(Command::Step(StepKind::GOnly));
                }
                if ui
                    .button("Both")
                    .on_hover_text("n_critic D updates, then one G update")
                    .clicked()
                {
                    ctx.trainer(Command::Step(StepKind::Both));
                }
            });
            egui::Grid::new("train_knobs")
                .num_columns(2)
                .show(ui, |ui| {
                    ui.label("LR G");
                    ui.add(
                        egui::DragValue::new(&mut self.lr_edit.0)
                            .speed(1e-6)
                            .range(1e-7..=1e-1)
                            .custom_formatter(|v, _| format!("{v:.2e}")),
                    );
                    ui.end_row();
                    ui.label("LR D");
                    ui.add(
                        egui::DragValue::new(&mut self.lr_edit.1)
                            .speed(1e-6)
                            .range(1e-7..=1e-1)
                            .custom_formatter(|v, _| format!("{v:.2e}")),
                    );
                    ui.end_row();
                    ui.label("n_critic");
                    ui.add(egui::DragValue::new(&mut self.n_critic_edit).range(1..=20));
                    ui.end_row();
                });
            ui.horizontal(|ui| {
                if ui.button("Apply").clicked() {
                    let (g, d) = self.lr_edit;
                    ctx.trainer(Command::SetLearningRates { g, d });
                    ctx.trainer(Command::SetNCritic(self.n_critic_edit));
                }
                if ui
                    .button("D LR x10")
                    .on_hover_text("push the run towards collapse (to watch the alarms)")
                    .clicked()
                {
                    self.lr_edit.1 *= 10.0;
                    let (g, d) = self.lr_edit;
                    ctx.trainer(Command::SetLearningRates { g, d });
                }
            });
            egui::Grid::new("train_targets")
                .num_columns(2)
                .show(ui, |ui| {
                    ui.label("Target step");
                    let t = ui.add(egui::DragValue::new(&mut ctx.settings.target).speed(10));
                    if t.changed() {
                        ctx.trainer(Command::SetTarget(ctx.settings.target));
                    }
                    ui.end_row();
                    ui.label("Wall every");
                    let w = ui.add(
                        egui::DragValue::new(&mut ctx.settings.wall_every)
                            .range(1..=1000)
                            .suffix(" steps"),
                    );
                    if w.changed() {
                        ctx.trainer(Command::SetWallEvery(ctx.settings.wall_every));
                    }
                    ui.end_row();
                    ui.label("Diagnostics every");
                    ui.add(
                        egui::DragValue::new(&mut ctx.settings.diagnostics_every)
                            .range(0..=100_000)
                            .suffix(" steps"),
                    )
                    .on_hover_text("takes effect at the next Start; 0 = off");
                    ui.end_row();
                    ui.label("Evaluator");
                    ui.add(
                        egui::TextEdit::singleline(&mut ctx.settings.evaluator_path)
                            .hint_text("shipped")
                            .desired_width(110.0),
                    )
                    .on_hover_text(
                        "the diagnostics' evaluator: empty = the shipped one for this data; or \
                         an evaluator folder, or a PyTorch .pth file (the course's i-CLEVR \
                         evaluator, for 64x64 generators). Takes effect at the next Start",
                    );
                    ui.end_row();
                    ui.label("FID every");
                    ui.add(
                        egui::DragValue::new(&mut ctx.settings.fid_every)
                            .range(0..=1_000_000)
                            .suffix(" steps"),
                    )
                    .on_hover_text(
                        "pytorch-fid's FID (and KID) every N steps, plotted under Plots; 0 = \
                         off. About 2 minutes per measurement on a 2-core CPU. Takes effect at \
                         the next Start",
                    );
                    ui.end_row();
                    ui.label("FID weights");
                    ui.add(
                        egui::TextEdit::singleline(&mut ctx.settings.fid_weights)
                            .hint_text("pt_inception…pth")
                            .desired_width(110.0),
                    )
                    .on_hover_text(
                        "pytorch-fid's Inception weights, pt_inception-2015-12-05-6726825d.pth \
                         (not shipped: pytorch-fid downloads it from its GitHub release)",
                    );
                    ui.end_row();
                    ui.label("On NaN/Inf");
                    let before = ctx.settings.nan_policy;
                    egui::ComboBox::from_id_salt("nan_policy")
                        .selected_text(match ctx.settings.nan_policy {
                            NanPolicy::RestorePause => "restore + pause",
                            NanPolicy::RestoreLowerLr => "restore + halve LR",
                        })
                        .show_ui(ui, |ui| {
                            ui.selectable_value(
                                &mut ctx.settings.nan_policy,
                                NanPolicy::RestorePause,
                                "restore + pause",
                            );
                            ui.selectable_value(
                                &mut ctx.settings.nan_policy,
                                NanPolicy::RestoreLowerLr,
                                "restore + halve LR",
                            );
                        });
                    if before != ctx.settings.nan_policy {
                        ctx.trainer(Command::SetNanPolicy(ctx.settings.nan_policy));
                    }
                    ui.end_row();
                    ui.label("When D wins");
                    let before = ctx.settings.on_d_wins;
                    let name = |v: Option<OnDWins>| match v {
                        None => "as the preset says",
                        Some(OnDWins::Alarm) => "alarm only",
                        Some(OnDWins::Rollback) => "roll back + halve D's LR",
                    };
                    egui::ComboBox::from_id_salt("on_d_wins")
                        .selected_text(name(ctx.settings.on_d_wins))
                        .show_ui(ui, |ui| {
                            for v in [None, Some(OnDWins::Alarm), Some(OnDWins::Rollback)] {
                                ui.selectable_value(&mut ctx.settings.on_d_wins, v, name(v));
                            }
                        })
                        .response
                        .on_hover_text(
                            "When the \"D accuracy pinned\" alarm fires (D wins every batch, the \
                             usual prelude to a collapse): only raise it, or go back to a \
                             snapshot of the whole training state from before the alarm's \
                             window (one is kept every 1000 steps, the newest 3) with D's \
                             learning rate halved, at most 3 times",
                        );
                    if before != ctx.settings.on_d_wins
                        && let Some(v) = ctx.settings.on_d_wins
                    {
                        ctx.trainer(Command::SetOnDWins(v));
                    }
                    ui.end_row();
                });
        });
        progress_ui(ui, ctx);
        run_folder_ui(ui, ctx);
        ui.separator();
        ui.label("Checkpoint folder");
        for p in [Purpose::OpenCheckpoint, Purpose::SaveCheckpoint] {
            prompt_note(ui, ctx.prompt, p);
        }
        let purpose = match *ctx.prompt {
            Some(p) if p.purpose == Purpose::SaveCheckpoint => Purpose::SaveCheckpoint,
            _ => Purpose::OpenCheckpoint,
        };
        let typed = PathBuf::from(ctx.settings.checkpoint_path.trim());
        let abs = std::path::absolute(&typed).unwrap_or(typed);
        path_field(
            ui,
            ctx.prompt,
            purpose,
            &mut ctx.settings.checkpoint_path,
            "a run folder",
            240.0,
        )
        .on_hover_text(abs.display().to_string());
        ui.horizontal(|ui| {
            if ui.add_enabled(live, egui::Button::new("Save")).clicked() {
                let p = PathBuf::from(ctx.settings.checkpoint_path.trim());
                let conflict = ctx
                    .run
                    .info
                    .as_ref()
                    .and_then(|i| save_conflict(&p, &i.cfg));
                match conflict {
                    Some(why) => self.save_confirm = Some((p, why)),
                    None => ctx.trainer(Command::Save(p)),
                }
            }
            if ui
                .button("Open")
                .on_hover_text("open the run folder above")
                .clicked()
            {
                let p = PathBuf::from(ctx.settings.checkpoint_path.trim());
                ctx.send(AppCommand::Start {
                    resume: Some(p),
                    run: false,
                });
            }
            if ui.button("Browse…").clicked() {
                ctx.send(AppCommand::Ask {
                    purpose: Purpose::OpenCheckpoint,
                    folder: true,
                    title: "Open a run folder",
                });
            }
        });
        self.save_confirm_ui(ui, ctx);
        egui::CollapsingHeader::new("Debug")
            .id_salt("train_debug")
            .show(ui, |ui| {
                if ui
                    .small_button("Inject NaN")
                    .on_hover_text("poison one G weight to see the NaN guard restore the run")
                    .clicked()
                {
                    ctx.trainer(Command::InjectNan);
                }
            });
    }

    /// The question a guarded Save asks: overwrite, save into a new folder, or cancel.
    fn save_confirm_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        let Some((dir, why)) = self.save_confirm.clone() else {
            return;
        };
        let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
        ui.colored_label(
            egui::Color32::from_rgb(240, 170, 40),
            format!("{} {why}. Saving there replaces it.", abs.display()),
        );
        ui.horizontal(|ui| {
            let fresh = new_run_folder(&ctx.run.preset());
            if ui
                .button("Save to a new folder")
                .on_hover_text(fresh.display().to_string())
                .clicked()
            {
                ctx.settings.checkpoint_path = fresh.display().to_string();
                self.save_confirm = None;
                ctx.trainer(Command::Save(fresh));
            }
            if ui.button("Replace").clicked() {
                self.save_confirm = None;
                ctx.trainer(Command::Save(dir.clone()));
            }
            if ui.button("Cancel").clicked() {
                self.save_confirm = None;
            }
        });
    }
}

/// Where this session's metrics, sample grids and periodic checkpoints go.
fn run_folder_ui(ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
    let Some(info) = &ctx.run.info else { return };
    let Some(dir) = &info.run_dir else { return };
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
    let hover = format!(
        "metrics.jsonl every {} steps, sample grids every {} and a checkpoint every {} \
         steps while training (created at the first step)",
        info.cfg.log_every, info.cfg.sample_every, info.cfg.checkpoint_every
    );
    let mut failed = None;
    ui.horizontal_wrapped(|ui| {
        ui.label("Run folder:");
        ui.monospace(abs.display().to_string()).on_hover_text(hover);
        if ui
            .small_button("Copy path")
            .on_hover_text("copy the folder's absolute path")
            .clicked()
        {
            ui.ctx().copy_text(abs.display().to_string());
        }
        if ui
            .small_button("Reveal")
            .on_hover_text("show the folder in the file manager")
            .clicked()
        {
            failed = super::dialogs::reveal(&abs).err();
        }
    });
    if let Some(e) = failed {
        ctx.log(e);
    }
}

/// Step, speed and, towards a target step, a progress bar with the ETA.
fn progress_ui(ui: &mut egui::Ui, ctx: &PanelCtx<'_>) {
    let history = &ctx.run.history;
    let Some(last) = history.last() else {
        return;
    };
    let step = last.stats.step;
    let target = ctx.settings.target;
    ui.label(format!(
        "Step {step} · {:.0} img/s · {:.0} s elapsed",
        last.images_per_s, last.elapsed_s
    ));
    if target > step {
        // ETA from the mean of the last 20 steps.
        let recent: Vec<f64> = history
            .iter()
            .rev()
            .take(20)
            .map(|s| s.step_seconds)
            .collect();
        let per = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        let eta = (target - step) as f64 * per;
        ui.add(
            egui::ProgressBar::new(step as f32 / target as f32)
                .text(format!("{step}/{target} · ETA {}", fmt_duration(eta))),
        );
    }
}

pub fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Why saving the session with config `cfg` into `dir` would replace something else (None
/// when the folder is new, empty, or holds a run of the same preset, data and networks, which
/// a save continues; its previous checkpoint stays as `*.prev`).
pub fn save_conflict(dir: &std::path::Path, cfg: &crate::config::TrainConfig) -> Option<String> {
    if crate::checkpoint::is_weights_folder(dir) {
        return Some("holds a shipped generator (weights only)".into());
    }
    let config = dir.join(crate::checkpoint::CONFIG_FILE);
    if !config.exists() {
        let has_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        return has_files.then(|| "is not empty and is not a run folder".into());
    }
    let theirs = match std::fs::read(&config)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::config::TrainConfig>(&b).ok())
    {
        Some(c) => c,
        None => return Some("holds a config.json that cannot be read".into()),
    };
    // The trainer fills in label names the preset leaves empty: those alone do not differ.
    let (mut a, mut b) = (theirs.model.clone(), cfg.model.clone());
    if a.label_names.is_empty() || b.label_names.is_empty() {
        (a.label_names, b.label_names) = (vec![], vec![]);
    }
    let same_nets = a == b;
    let same = theirs.preset == cfg.preset
        && theirs.data.kind == cfg.data.kind
        && theirs.data.path == cfg.data.path
        && same_nets;
    (!same).then(|| {
        format!(
            "holds another run ({} on {:?} data{})",
            theirs.preset,
            theirs.data.kind,
            if same_nets { "" } else { ", other networks" }
        )
    })
}

/// `runs/<preset>-<UTC date and time>`, for a save that must not replace anything.
pub fn new_run_folder(preset: &str) -> PathBuf {
    new_run_folder_in(std::path::Path::new("runs"), preset)
}

/// `<root>/<preset>-<UTC date and time>`, with `-2`, `-3`, ... when that exists already.
pub fn new_run_folder_in(root: &std::path::Path, preset: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let base = format!(
        "{preset}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let mut dir = root.join(&base);
    let mut n = 2;
    while dir.exists() {
        dir = root.join(format!("{base}-{n}"));
        n += 1;
    }
    dir
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates_by_hand() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        // 2000-03-01 is day 11017; 2026-12-02 is day 20789.
        assert_eq!(super::civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(super::civil_from_days(20_789), (2026, 12, 2));
        assert_eq!(super::civil_from_days(-1), (1969, 12, 31));
    }
}
