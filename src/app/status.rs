//! The status bar: run state, step and speed, launch and frame timings, and the log (a line
//! that repeats with other numbers counts up instead of scrolling).

use std::collections::VecDeque;

use super::{LatentPanel, PanelCtx, Timings, numbers_masked};
use crate::train::worker::RunState;

/// Log lines kept.
const LOG_KEPT: usize = 500;

#[derive(Default)]
pub struct StatusBar {
    pub log: VecDeque<String>,
    /// How many times each log line came in a row (a line that differs from the one before
    /// only in its numbers replaces it and counts up: a repeating alarm is one line).
    pub log_counts: VecDeque<u32>,
}

impl StatusBar {
    pub fn push(&mut self, s: String) {
        if let Some(last) = self.log.back_mut()
            && numbers_masked(last) == numbers_masked(&s)
        {
            *last = s;
            if let Some(n) = self.log_counts.back_mut() {
                *n += 1;
            }
            return;
        }
        if self.log.len() >= LOG_KEPT {
            self.log.pop_front();
            self.log_counts.pop_front();
        }
        self.log.push_back(s);
        self.log_counts.push_back(1);
    }

    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        ctx: &PanelCtx<'_>,
        timings: &Timings,
        latent: &LatentPanel,
    ) {
        self.state_ui(ui, ctx, timings, latent);
        self.log_ui(ui);
    }

    fn state_ui(&self, ui: &mut egui::Ui, ctx: &PanelCtx<'_>, t: &Timings, latent: &LatentPanel) {
        let run = ctx.run;
        ui.horizontal_wrapped(|ui| {
            let state = match run.run_state {
                RunState::Loading => "loading",
                RunState::Paused => "paused",
                RunState::Running => "training",
                RunState::Stopped => "stopped",
            };
            ui.label(format!("State: {state}"));
            if let Some(s) = run.history.last() {
                ui.separator();
                ui.label(format!(
                    "step {}  {:.0} img/s  {:.2} s/step",
                    s.stats.step, s.images_per_s, s.step_seconds
                ));
            }
            if !ctx.show_timings {
                return;
            }
            ui.separator();
            if let Some(i) = &run.info {
                ui.label(format!(
                    "data + networks built in {:.1} s",
                    i.seconds_to_build
                ));
            }
            if let Some(v) = t.launch_to_first_wall_s {
                ui.label(format!("first samples {v:.1} s after launch"));
            }
            if let Some(ms) = latent.slider_to_image_ms.back() {
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

    fn log_ui(&self, ui: &mut egui::Ui) {
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
}
