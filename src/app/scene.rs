//! The Scene tab (issue 23): build an i-CLEVR scene one object at a time with a sequential
//! generator. Start from the empty floor, add an object (picked here, or the composer's
//! ticked labels), see the new image beside the previous one, undo, re-roll the noise of the
//! last step, export the sequence as a strip PNG or a GIF.
//!
//! Each step has its own noise seed, so re-rolling the last step leaves the earlier images as
//! they were. The renderer thread draws the whole sequence (floor + steps) for every change.

use super::latent::texture_of;
use super::{AppCommand, Composer, PanelCtx};
use crate::config::Arch;
use crate::images::Images;
use crate::model::latent_truncated;
use crate::train::worker::Rendered;

/// The scene being built and its images.
#[derive(Default)]
pub struct ScenePanel {
    /// Labels added, in order.
    pub order: Vec<usize>,
    /// The noise seed of each step.
    pub seeds: Vec<u64>,
    /// The next fresh seed (re-rolls and new steps take it and count on).
    pub next_seed: u64,
    /// The label the "Add" button adds.
    pub pick: usize,
    /// Floor + one image per step, for `images_for`.
    pub images: Option<Images>,
    /// The order the images were drawn for (they may lag behind `order` for a moment).
    pub images_for: Vec<usize>,
    pub images_step: u64,
    pub textures: Vec<egui::TextureHandle>,
    pub dirty: bool,
}

impl ScenePanel {
    /// A new session: an empty scene.
    pub fn reset(&mut self) {
        self.order.clear();
        self.seeds.clear();
        self.images = None;
        self.images_for.clear();
        self.textures.clear();
    }

    /// Latents for the renderer: one per step, truncated like the latent panel's.
    pub fn latents(&self, z_dim: usize, truncation: Option<f64>) -> Vec<Vec<f32>> {
        self.seeds
            .iter()
            .map(|&s| latent_truncated(z_dim, s, truncation))
            .collect()
    }

    fn fresh_seed(&mut self) -> u64 {
        self.next_seed += 1;
        // Far from the small seeds the wall and the latent panel use.
        1_000_000 + self.next_seed
    }

    /// Add `label` (ignored if already in the scene or the scene is full).
    pub fn add(&mut self, label: usize, max_objects: usize) -> bool {
        if self.order.contains(&label) || self.order.len() >= max_objects {
            return false;
        }
        let s = self.fresh_seed();
        self.order.push(label);
        self.seeds.push(s);
        true
    }

    pub fn undo(&mut self) -> bool {
        self.seeds.pop();
        self.order.pop().is_some()
    }

    /// A new noise seed for the last step.
    pub fn reroll(&mut self) -> bool {
        if self.seeds.is_empty() {
            return false;
        }
        let s = self.fresh_seed();
        if let Some(last) = self.seeds.last_mut() {
            *last = s;
        }
        true
    }

    pub fn on_rendered(&mut self, r: Rendered, order: Vec<usize>) {
        self.images = Some(r.images);
        self.images_for = order;
        self.images_step = r.step;
        self.dirty = true;
    }

    /// Column captions of the drawn images: "floor", "+ red cube", ...
    pub fn captions(&self, names: &[String]) -> Vec<String> {
        crate::explore::scene_captions(names, &self.images_for)
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, composer: &Composer) {
        ui.heading("Scene: one object at a time");
        let Some(info) = &ctx.run.info else {
            ui.label("(no session yet)");
            return;
        };
        let m = &info.cfg.model;
        if m.arch != Arch::Sequential {
            ui.label(format!(
                "This generator ({}) draws a whole scene at once. Scene mode needs a sequential \
                 generator, which adds one object to the previous image: choose the preset \
                 iclevr-sequential-small (or iclevr-sequential) in the training panel and \
                 start, or open a sequential run folder.",
                info.cfg.preset
            ));
            return;
        }
        let names = m.label_names.clone();
        let max_objects = m.g_object_layers.max(1);
        let mut changed = false;
        ui.horizontal(|ui| {
            egui::ComboBox::from_id_salt("scene-pick")
                .selected_text(names.get(self.pick).cloned().unwrap_or_default())
                .show_ui(ui, |ui| {
                    for (i, n) in names.iter().enumerate() {
                        ui.selectable_value(&mut self.pick, i, n);
                    }
                });
            let full = self.order.len() >= max_objects;
            if ui
                .add_enabled(
                    !full && !self.order.contains(&self.pick),
                    egui::Button::new("Add"),
                )
                .on_hover_text("add this object to the scene")
                .clicked()
            {
                changed |= self.add(self.pick, max_objects);
            }
            let ticked: Vec<usize> = composer
                .cond
                .iter()
                .enumerate()
                .filter(|(i, v)| **v > 0.5 && !self.order.contains(i))
                .map(|(i, _)| i)
                .collect();
            if ui
                .add_enabled(
                    !ticked.is_empty() && !full,
                    egui::Button::new("Add the composer's labels"),
                )
                .on_hover_text("add the labels ticked in the conditions panel, in label order")
                .clicked()
            {
                for l in ticked {
                    changed |= self.add(l, max_objects);
                }
            }
            if ui
                .add_enabled(!self.order.is_empty(), egui::Button::new("Undo"))
                .clicked()
            {
                changed |= self.undo();
            }
            if ui
                .add_enabled(!self.order.is_empty(), egui::Button::new("Re-roll last"))
                .on_hover_text("new noise for the last step; the earlier images stay")
                .clicked()
            {
                changed |= self.reroll();
            }
            if ui
                .add_enabled(!self.order.is_empty(), egui::Button::new("Clear"))
                .clicked()
            {
                self.reset();
                changed = true;
            }
        });
        if changed || (self.images.is_none() && ctx.run.last_weights.is_some()) {
            ctx.send(AppCommand::RenderScene);
        }
        if self.dirty {
            self.dirty = false;
            if let Some(im) = &self.images {
                self.textures = (0..im.n)
                    .filter_map(|i| texture_of(ui.ctx(), &format!("scene{i}"), im, i))
                    .collect();
            }
        }
        let Some(im) = &self.images else {
            ui.label("(drawing the floor...)");
            return;
        };
        let captions = self.captions(&names);
        let zoom = ctx.settings.latent_zoom.max(1) as f32;
        let big = egui::vec2(im.width as f32 * zoom, im.height as f32 * zoom);
        let n = self.textures.len();
        ui.add_space(4.0);
        // The previous image and the new one, side by side.
        ui.horizontal(|ui| {
            for (k, label) in [
                (n.saturating_sub(2), "previous"),
                (n.saturating_sub(1), "new"),
            ] {
                if n < 2 && label == "previous" {
                    continue;
                }
                if let Some(t) = self.textures.get(k) {
                    ui.vertical(|ui| {
                        ui.label(format!(
                            "{label}: {}",
                            captions.get(k).map(String::as_str).unwrap_or("")
                        ));
                        ui.add(egui::Image::new((t.id(), big)));
                    });
                }
            }
        });
        ui.label(format!(
            "Weights of step {}; {} of at most {max_objects} objects",
            self.images_step,
            self.images_for.len()
        ));
        ui.separator();
        ui.label("The sequence");
        let small = egui::vec2(im.width as f32 * 2.0, im.height as f32 * 2.0);
        ui.horizontal_wrapped(|ui| {
            for (t, c) in self.textures.iter().zip(&captions) {
                ui.vertical(|ui| {
                    ui.add(egui::Image::new((t.id(), small)));
                    ui.small(c);
                });
            }
        });
        ui.horizontal(|ui| {
            if ui.button("Export strip PNG").clicked() {
                ctx.send(AppCommand::ExportScene { gif: false });
            }
            if ui.button("Export GIF").clicked() {
                ctx.send(AppCommand::ExportScene { gif: true });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_undo_and_reroll_keep_one_seed_per_step() {
        let mut s = ScenePanel::default();
        assert!(s.add(3, 3));
        assert!(!s.add(3, 3), "a label twice");
        assert!(s.add(7, 3));
        let before = s.seeds.clone();
        assert!(s.reroll());
        assert_eq!(
            s.seeds[0], before[0],
            "re-roll keeps the earlier steps' noise"
        );
        assert_ne!(s.seeds[1], before[1]);
        assert!(s.add(1, 3));
        assert!(!s.add(2, 3), "full at 3 objects");
        assert_eq!(s.order, vec![3, 7, 1]);
        assert!(s.undo());
        assert_eq!((s.order.len(), s.seeds.len()), (2, 2));
        assert_eq!(s.latents(5, None).len(), 2);
        s.reset();
        assert!(!s.undo() && !s.reroll());
    }
}
