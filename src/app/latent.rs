//! Latent sliders (the first dimensions of z and GANSpace-style principal directions),
//! copy / paste of the latent as JSON, and the interpolation view (A -> B in latent and
//! condition, lerp or slerp, shown as a strip and animated, exported as PNG and GIF).

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use super::{Composer, GanscopeApp, Timings};
use crate::explore::{LatentSpec, interpolate, latent_directions, lerp_at};
use crate::images::Images;
use crate::model::latent;
use crate::train::worker::Rendered;

/// Principal directions (unit vectors, explained share), or why they failed.
pub type DirectionsResult = Result<Vec<(Vec<f32>, f64)>, String>;

/// Sliders for z[0..SLIDERS].
pub const SLIDERS: usize = 8;
/// Principal directions offered.
pub const DIRECTIONS: usize = 6;

#[derive(Default)]
pub struct LatentState {
    pub seed: u64,
    /// The base latent (from the seed, or pasted).
    pub base: Vec<f32>,
    /// Edits of z[0..SLIDERS] (absolute values).
    pub dims: Vec<f32>,
    /// Principal directions and their explained share; coefficients along them.
    pub directions: Vec<(Vec<f32>, f64)>,
    pub coeffs: Vec<f32>,
    pub directions_rx: Option<Receiver<DirectionsResult>>,
    pub image: Option<Images>,
    pub image_step: u64,
    pub texture: Option<egui::TextureHandle>,
    pub texture_dirty: bool,
    /// Request id -> when it was sent (for the slider -> image latency).
    pub pending: HashMap<u64, Instant>,
    pub shown_latency: Option<(Instant, f64)>,
    pub paste: String,
}

impl LatentState {
    pub fn reset(&mut self, z_dim: usize) {
        if self.base.len() != z_dim {
            self.base = latent(z_dim, self.seed);
        }
        self.dims = self.base.iter().take(SLIDERS).copied().collect();
        self.directions.clear();
        self.coeffs.clear();
        self.image = None;
    }

    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.base = latent(self.base.len(), seed);
        self.dims = self.base.iter().take(SLIDERS).copied().collect();
        self.coeffs.iter_mut().for_each(|c| *c = 0.0);
    }

    /// The latent on screen: base, slider dims, plus the direction offsets.
    pub fn current_z(&self) -> Vec<f32> {
        let mut z = self.base.clone();
        for (i, v) in self.dims.iter().enumerate() {
            if let Some(x) = z.get_mut(i) {
                *x = *v;
            }
        }
        for ((d, _), c) in self.directions.iter().zip(&self.coeffs) {
            for (x, u) in z.iter_mut().zip(d) {
                *x += c * u;
            }
        }
        z
    }

    pub fn on_rendered(&mut self, r: Rendered, interp: &mut InterpState, t: &mut Timings) {
        match r.slot {
            "latent" => {
                if let Some(sent) = self.pending.remove(&r.id) {
                    // Older requests were dropped by the renderer: forget them.
                    self.pending.retain(|id, _| *id > r.id);
                    self.shown_latency = Some((sent, r.seconds * 1e3));
                }
                t.forward_ms = Some(r.seconds * 1e3);
                self.image = Some(r.images);
                self.image_step = r.step;
                self.texture_dirty = true;
            }
            "interp" => {
                interp.strip = Some(r.images);
                interp.strip_dirty = true;
            }
            _ => {}
        }
    }
}

/// One end of an interpolation.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    pub z: Vec<f32>,
    pub c: Vec<f32>,
    pub caption: String,
}

#[derive(Default)]
pub struct InterpState {
    pub a: Endpoint,
    pub b: Endpoint,
    pub strip: Option<Images>,
    pub strip_dirty: bool,
    pub textures: Vec<egui::TextureHandle>,
    pub animate: bool,
    pub started: Option<Instant>,
}

impl InterpState {
    /// A = the explorer's latent and condition; B = seed 1 with the same condition.
    pub fn reset(&mut self, l: &LatentState, c: &Composer) {
        self.a = Endpoint {
            z: l.current_z(),
            c: c.cond.clone(),
            caption: c.caption(),
        };
        self.b = Endpoint {
            z: latent(l.base.len(), l.seed.wrapping_add(1)),
            c: c.cond.clone(),
            caption: c.caption(),
        };
        self.strip = None;
    }

    /// Latents (lerp or slerp) and conditions (always lerp) of the `n` steps.
    pub fn points(&self, n: usize, slerp: bool) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let n = n.max(2);
        let z = interpolate(&self.a.z, &self.b.z, n, slerp);
        let c = (0..n)
            .map(|i| lerp_at(&self.a.c, &self.b.c, i as f32 / (n - 1) as f32))
            .collect();
        (z, c)
    }
}

/// An egui texture of image `i` (nearest filtering for crisp integer zoom).
pub fn texture_of(
    ctx: &egui::Context,
    name: &str,
    im: &Images,
    i: usize,
) -> Option<egui::TextureHandle> {
    let rgb = im.rgb8(i).ok()?;
    let img = egui::ColorImage::from_rgb([im.width, im.height], &rgb);
    Some(ctx.load_texture(name, img, egui::TextureOptions::NEAREST))
}

impl GanscopeApp {
    /// Sliders in the conditions panel (they drive the Explore tab's image).
    pub(crate) fn latent_sliders_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Latent");
        if self.info.is_none() {
            return;
        }
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.label("Seed");
            let mut seed = self.latent.seed;
            if ui.add(egui::DragValue::new(&mut seed)).changed() {
                self.latent.set_seed(seed);
                changed = true;
            }
            if ui.button("Randomise").clicked() {
                let s = (Instant::now().elapsed().as_nanos() as u64)
                    ^ self
                        .latent
                        .seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(1);
                self.latent.set_seed(s % 1_000_000);
                changed = true;
            }
            if ui.button("Reset").clicked() {
                let s = self.latent.seed;
                self.latent.set_seed(s);
                changed = true;
            }
        });
        for i in 0..self.latent.dims.len() {
            let r = ui.add(
                egui::Slider::new(&mut self.latent.dims[i], -3.0..=3.0).text(format!("z[{i}]")),
            );
            changed |= r.changed();
        }
        ui.horizontal(|ui| {
            ui.label("Interpolation:");
            if ui
                .button("Set A")
                .on_hover_text("interpolation start")
                .clicked()
            {
                self.interp.a = self.endpoint();
                self.request_interp();
            }
            if ui
                .button("Set B")
                .on_hover_text("interpolation end")
                .clicked()
            {
                self.interp.b = self.endpoint();
                self.request_interp();
            }
        });
        ui.horizontal(|ui| {
            ui.label("Principal directions");
            let busy = self.latent.directions_rx.is_some();
            if ui
                .add_enabled(!busy, egui::Button::new("Find"))
                .on_hover_text(
                    "PCA of G's first feature layer over 256 sampled latents (GANSpace), \
                     for the current condition",
                )
                .clicked()
            {
                self.find_directions();
            }
            if busy {
                ui.spinner();
            }
        });
        self.poll_directions();
        for i in 0..self.latent.directions.len() {
            let share = self.latent.directions[i].1;
            let r = ui.add(
                egui::Slider::new(&mut self.latent.coeffs[i], -6.0..=6.0).text(format!(
                    "PC{} ({:.0}%)",
                    i + 1,
                    share * 100.0
                )),
            );
            changed |= r.changed();
        }
        ui.horizontal(|ui| {
            if ui
                .button("Copy latent")
                .on_hover_text("JSON for `ganscope sample --latent FILE`")
                .clicked()
            {
                let spec = self.latent_spec();
                ui.ctx().copy_text(spec.to_json());
                self.push_log("latent copied to the clipboard as JSON".into());
            }
            if ui
                .button("Paste")
                .on_hover_text("apply the JSON in the box below")
                .clicked()
            {
                match LatentSpec::from_json(&self.latent.paste, "pasted latent") {
                    Ok(s) => self.apply_latent(s),
                    Err(e) => self.error = Some(e.to_string()),
                }
                changed = true;
            }
        });
        ui.add(
            egui::TextEdit::multiline(&mut self.latent.paste)
                .hint_text("paste latent JSON here")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        if changed {
            self.request_latent(true);
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            z: self.latent.current_z(),
            c: self.composer.cond.clone(),
            caption: self.composer.caption(),
        }
    }

    pub fn latent_spec(&self) -> LatentSpec {
        LatentSpec {
            preset: self
                .info
                .as_ref()
                .map(|i| i.cfg.preset.clone())
                .unwrap_or_default(),
            step: self.latent.image_step,
            z: self.latent.current_z(),
            condition: self.composer.cond.clone(),
            labels: self
                .composer
                .caption()
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    pub fn apply_latent(&mut self, s: LatentSpec) {
        let zd = self.latent.base.len();
        if s.z.len() != zd || s.condition.len() != self.composer.cond.len() {
            self.error = Some(format!(
                "pasted latent: {} values and {} labels, this model has {zd} and {}",
                s.z.len(),
                s.condition.len(),
                self.composer.cond.len()
            ));
            return;
        }
        self.latent.base = s.z;
        self.latent.dims = self.latent.base.iter().take(SLIDERS).copied().collect();
        self.latent.coeffs.iter_mut().for_each(|c| *c = 0.0);
        self.composer.cond = s.condition;
    }

    fn find_directions(&mut self) {
        let Some(w) = self.last_weights.clone() else {
            self.push_log("no generator weights yet".into());
            return;
        };
        let c = self.composer.cond.clone();
        let (tx, rx) = mpsc::channel();
        let ctx_wake = self.wake.clone();
        std::thread::spawn(move || {
            let res = w
                .build()
                .and_then(|g| latent_directions(&g, &c, 256, DIRECTIONS, 7))
                .map_err(|e| e.to_string());
            let _ = tx.send(res);
            ctx_wake();
        });
        self.latent.directions_rx = Some(rx);
    }

    fn poll_directions(&mut self) {
        let Some(rx) = &self.latent.directions_rx else {
            return;
        };
        match rx.try_recv() {
            Ok(Ok(d)) => {
                self.latent.coeffs = vec![0.0; d.len()];
                self.latent.directions = d;
                self.latent.directions_rx = None;
            }
            Ok(Err(e)) => {
                self.error = Some(format!("principal directions: {e}"));
                self.latent.directions_rx = None;
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => self.latent.directions_rx = None,
        }
    }

    /// The Explore tab: the latent image, then the interpolation strip.
    pub(crate) fn explore_ui(&mut self, ui: &mut egui::Ui) {
        if self.latent.texture_dirty {
            self.latent.texture_dirty = false;
            if let Some(im) = &self.latent.image {
                self.latent.texture = texture_of(ui.ctx(), "latent", im, 0);
            }
            if let Some((sent, fwd)) = self.latent.shown_latency.take() {
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                let t = &mut self.timings.slider_to_image_ms;
                if t.len() >= 20 {
                    t.pop_front();
                }
                t.push_back(ms);
                self.timings.forward_ms = Some(fwd);
            }
        }
        ui.horizontal(|ui| {
            ui.label("Zoom");
            ui.add(egui::DragValue::new(&mut self.settings.latent_zoom).range(1..=12));
            if let Some(ms) = self
                .timings
                .slider_to_image_ms
                .back()
                .filter(|_| self.show_timings)
            {
                ui.label(format!(
                    "slider->image {ms:.1} ms (G forward {:.1} ms)",
                    self.timings.forward_ms.unwrap_or(0.0)
                ));
            }
        });
        ui.horizontal(|ui| {
            if let (Some(t), Some(im)) = (&self.latent.texture, &self.latent.image) {
                let z = self.settings.latent_zoom.max(1) as f32;
                let size = egui::vec2(im.width as f32 * z, im.height as f32 * z);
                ui.add(egui::Image::new((t.id(), size))).on_hover_text(
                    "the explorer image (latent sliders and conditions on the right)",
                );
            } else {
                ui.label("(no image yet)");
            }
            ui.vertical(|ui| {
                ui.label(format!("Condition: {}", self.composer.caption()));
                ui.label(format!("Weights of step {}", self.latent.image_step));
            });
        });
        ui.separator();
        self.interp_ui(ui);
    }

    fn interp_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Interpolation");
        ui.label(format!(
            "A: {}   ->   B: {}",
            self.interp.a.caption, self.interp.b.caption
        ));
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.label("Steps");
            changed |= ui
                .add(egui::Slider::new(&mut self.settings.interp_steps, 2..=16))
                .changed();
            changed |= ui.checkbox(&mut self.settings.slerp, "slerp").changed();
            ui.checkbox(&mut self.interp.animate, "Animate");
            if ui.button("Render").clicked() {
                changed = true;
            }
        });
        if changed {
            self.request_interp();
        }
        if self.interp.strip_dirty {
            self.interp.strip_dirty = false;
            if let Some(im) = &self.interp.strip {
                self.interp.textures = (0..im.n)
                    .filter_map(|i| texture_of(ui.ctx(), &format!("interp{i}"), im, i))
                    .collect();
            }
        }
        let Some(im) = &self.interp.strip else {
            ui.label("(set A and B in the conditions panel, then Render)");
            return;
        };
        let z = self.settings.latent_zoom.clamp(1, 3) as f32;
        let size = egui::vec2(im.width as f32 * z, im.height as f32 * z);
        ui.horizontal_wrapped(|ui| {
            for t in &self.interp.textures {
                ui.add(egui::Image::new((t.id(), size)));
            }
        });
        if self.interp.animate && !self.interp.textures.is_empty() {
            let started = *self.interp.started.get_or_insert_with(Instant::now);
            let n = self.interp.textures.len();
            // Ping-pong at about 8 frames per second.
            let k = (started.elapsed().as_secs_f64() * 8.0) as usize % (2 * n - 2).max(1);
            let i = if k < n { k } else { 2 * n - 2 - k };
            let big = size * 2.0;
            ui.add(egui::Image::new((self.interp.textures[i].id(), big)));
        }
        ui.horizontal(|ui| {
            if ui.button("Export strip PNG").clicked() {
                self.export_interp(false);
            }
            if ui.button("Export GIF").clicked() {
                self.export_interp(true);
            }
        });
    }
}
