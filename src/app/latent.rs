//! Latent sliders (the first dimensions of z and GANSpace-style principal directions),
//! copy / paste of the latent as JSON, and the interpolation view (A -> B in latent and
//! condition, lerp or slerp, shown as a strip and animated, exported as PNG and GIF).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use super::{AppCommand, Composer, PanelCtx};
use crate::explore::{LatentSpec, interpolate, latent_directions, lerp_at};
use crate::images::Images;
use crate::model::latent_truncated;
use crate::train::worker::{GeneratorWeights, Rendered, Waker};

/// Principal directions (unit vectors, explained share), or why they failed.
pub type DirectionsResult = Result<Vec<(Vec<f32>, f64)>, String>;

/// Sliders for z[0..SLIDERS].
pub const SLIDERS: usize = 8;
/// Principal directions offered.
pub const DIRECTIONS: usize = 6;

/// The latent panel: the sliders (in the conditions panel) and the Explore tab (the image,
/// then the interpolation strip). It owns the latent, the principal directions (found by a
/// named worker thread), the rendered images and the slider's latency.
#[derive(Default)]
pub struct LatentPanel {
    pub seed: u64,
    /// The truncation trick's threshold for latents drawn from a seed (`None` = plain
    /// N(0, I)); the wall follows it too (`Command::SetTruncation`).
    pub truncation: Option<f64>,
    /// The threshold the control shows while truncation is off.
    pub truncation_edit: f64,
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
    /// Slider moved -> image on screen (ms), the last 20.
    pub slider_to_image_ms: VecDeque<f64>,
    /// The generator's forward pass for the last image (ms).
    pub forward_ms: Option<f64>,
    pub paste: String,
    pub interp: InterpState,
}

impl LatentPanel {
    /// A new session with latents of `z_dim`; the interpolation starts at the image on
    /// screen.
    pub fn reset(&mut self, z_dim: usize, truncation: Option<f64>, composer: &Composer) {
        if self.base.len() != z_dim || truncation != self.truncation {
            self.truncation = truncation;
            self.base = self.seed_latent(z_dim, self.seed);
        }
        self.dims = self.base.iter().take(SLIDERS).copied().collect();
        self.directions.clear();
        self.coeffs.clear();
        self.image = None;
        let (a, b) = InterpState::ends(self, composer);
        (self.interp.a, self.interp.b) = (a, b);
        self.interp.strip = None;
    }

    /// The latent of a seed at the panel's truncation.
    pub fn seed_latent(&self, z_dim: usize, seed: u64) -> Vec<f32> {
        latent_truncated(z_dim, seed, self.truncation)
    }

    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.base = self.seed_latent(self.base.len(), seed);
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

    pub fn on_rendered(&mut self, r: Rendered) {
        match r.slot {
            "latent" => {
                if let Some(sent) = self.pending.remove(&r.id) {
                    // Older requests were dropped by the renderer: forget them.
                    self.pending.retain(|id, _| *id > r.id);
                    self.shown_latency = Some((sent, r.seconds * 1e3));
                }
                self.forward_ms = Some(r.seconds * 1e3);
                self.image = Some(r.images);
                self.image_step = r.step;
                self.texture_dirty = true;
            }
            "interp" => {
                self.interp.strip = Some(r.images);
                self.interp.strip_dirty = true;
            }
            _ => {}
        }
    }

    /// The image on screen as an interpolation end.
    pub fn endpoint(&self, composer: &Composer) -> Endpoint {
        Endpoint {
            z: self.current_z(),
            c: composer.cond.clone(),
            caption: composer.caption(),
        }
    }

    /// The latent on screen as JSON-able data (`ganscope sample --latent FILE`).
    pub fn spec(&self, preset: String, composer: &Composer) -> LatentSpec {
        LatentSpec {
            preset,
            step: self.image_step,
            z: self.current_z(),
            condition: composer.cond.clone(),
            labels: composer
                .caption()
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// Take a pasted latent (z and the composer's condition), or say why it does not fit.
    pub fn apply(&mut self, s: LatentSpec, composer: &mut Composer) -> Result<(), String> {
        let zd = self.base.len();
        if s.z.len() != zd || s.condition.len() != composer.cond.len() {
            return Err(format!(
                "pasted latent: {} values and {} labels, this model has {zd} and {}",
                s.z.len(),
                s.condition.len(),
                composer.cond.len()
            ));
        }
        self.base = s.z;
        self.dims = self.base.iter().take(SLIDERS).copied().collect();
        self.coeffs.iter_mut().for_each(|c| *c = 0.0);
        composer.cond = s.condition;
        Ok(())
    }

    /// Principal directions of `weights` for condition `c`, in a named worker thread (the
    /// result arrives through [`Self::poll_directions`]; `wake` repaints the UI).
    pub fn find_directions(&mut self, weights: Arc<GeneratorWeights>, c: Vec<f32>, wake: Waker) {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("ganscope-directions".into())
            .spawn(move || {
                let res = weights
                    .build()
                    .and_then(|g| latent_directions(&g, &c, 256, DIRECTIONS, 7))
                    .map_err(|e| e.to_string());
                let _ = tx.send(res);
                wake();
            });
        if spawned.is_ok() {
            self.directions_rx = Some(rx);
        }
    }

    /// Take in finished directions; returns the error of a failed search.
    pub fn poll_directions(&mut self) -> Option<String> {
        let rx = self.directions_rx.as_ref()?;
        match rx.try_recv() {
            Ok(Ok(d)) => {
                self.coeffs = vec![0.0; d.len()];
                self.directions = d;
                self.directions_rx = None;
                None
            }
            Ok(Err(e)) => {
                self.directions_rx = None;
                Some(e)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.directions_rx = None;
                None
            }
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
    /// The first ends: A = the explorer's latent and condition; B = the next seed with the
    /// same condition.
    pub fn ends(l: &LatentPanel, c: &Composer) -> (Endpoint, Endpoint) {
        let a = l.endpoint(c);
        let b = Endpoint {
            z: l.seed_latent(l.base.len(), l.seed.wrapping_add(1)),
            ..a.clone()
        };
        (a, b)
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

impl LatentPanel {
    /// The truncation control: a checkbox and its threshold. A change redraws the seed's
    /// latent and asks the session to sample its wall the same way; returns whether the
    /// latent changed.
    fn truncation_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) -> bool {
        if self.truncation_edit <= 0.0 {
            self.truncation_edit = 1.0;
        }
        let (lo, hi) = crate::config::TRUNCATION_RANGE;
        let mut on = self.truncation.is_some();
        let mut t = self.truncation.unwrap_or(self.truncation_edit);
        let mut edited = false;
        ui.horizontal(|ui| {
            edited |= ui
                .checkbox(&mut on, "Truncation")
                .on_hover_text(
                    "the truncation trick (BigGAN): latent entries beyond +-t are drawn again;                      smaller t gives cleaner, less varied samples. Applies to the seed's latent                      and to the wall; training is not affected",
                )
                .changed();
            edited |= ui
                .add_enabled(
                    on,
                    egui::DragValue::new(&mut t)
                        .range(lo.max(0.1)..=hi.min(4.0))
                        .speed(0.02)
                        .fixed_decimals(2),
                )
                .changed();
        });
        if !edited {
            return false;
        }
        self.truncation_edit = t;
        self.truncation = on.then_some(t);
        let seed = self.seed;
        self.set_seed(seed);
        ctx.send(AppCommand::Trainer(
            crate::train::worker::Command::SetTruncation(self.truncation),
        ));
        true
    }

    /// Sliders in the conditions panel (they drive the Explore tab's image).
    pub fn sliders_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, composer: &Composer) {
        ui.heading("Latent");
        let Some(info) = &ctx.run.info else {
            return;
        };
        let preset = info.cfg.preset.clone();
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.label("Seed");
            let mut seed = self.seed;
            if ui.add(egui::DragValue::new(&mut seed)).changed() {
                self.set_seed(seed);
                changed = true;
            }
            if ui.button("Randomise").clicked() {
                let s = (Instant::now().elapsed().as_nanos() as u64)
                    ^ self
                        .seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(1);
                self.set_seed(s % 1_000_000);
                changed = true;
            }
            if ui.button("Reset").clicked() {
                let s = self.seed;
                self.set_seed(s);
                changed = true;
            }
        });
        changed |= self.truncation_ui(ui, ctx);
        for i in 0..self.dims.len() {
            let r =
                ui.add(egui::Slider::new(&mut self.dims[i], -3.0..=3.0).text(format!("z[{i}]")));
            changed |= r.changed();
        }
        ui.horizontal(|ui| {
            ui.label("Interpolation:");
            if ui
                .button("Set A")
                .on_hover_text("interpolation start")
                .clicked()
            {
                ctx.send(AppCommand::SetEndpoint { b: false });
            }
            if ui
                .button("Set B")
                .on_hover_text("interpolation end")
                .clicked()
            {
                ctx.send(AppCommand::SetEndpoint { b: true });
            }
        });
        ui.horizontal(|ui| {
            ui.label("Principal directions");
            let busy = self.directions_rx.is_some();
            if ui
                .add_enabled(!busy, egui::Button::new("Find"))
                .on_hover_text(
                    "PCA of G's first feature layer over 256 sampled latents (GANSpace), \
                     for the current condition",
                )
                .clicked()
            {
                ctx.send(AppCommand::FindDirections);
            }
            if busy {
                ui.spinner();
            }
        });
        for i in 0..self.directions.len() {
            let share = self.directions[i].1;
            let r = ui.add(
                egui::Slider::new(&mut self.coeffs[i], -6.0..=6.0).text(format!(
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
                ui.ctx()
                    .copy_text(self.spec(preset.clone(), composer).to_json());
                ctx.log("latent copied to the clipboard as JSON");
            }
            if ui
                .button("Paste")
                .on_hover_text("apply the JSON in the box below")
                .clicked()
            {
                match LatentSpec::from_json(&self.paste, "pasted latent") {
                    Ok(s) => ctx.send(AppCommand::ApplyLatent(s)),
                    Err(e) => ctx.send(AppCommand::Error(e.to_string())),
                }
            }
        });
        ui.add(
            egui::TextEdit::multiline(&mut self.paste)
                .hint_text("paste latent JSON here")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        if changed {
            ctx.send(AppCommand::RenderLatent { timed: true });
        }
    }

    /// The Explore tab: the latent image, then the interpolation strip.
    pub fn explore_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, composer: &Composer) {
        if self.texture_dirty {
            self.texture_dirty = false;
            if let Some(im) = &self.image {
                self.texture = texture_of(ui.ctx(), "latent", im, 0);
            }
            if let Some((sent, fwd)) = self.shown_latency.take() {
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                let t = &mut self.slider_to_image_ms;
                if t.len() >= 20 {
                    t.pop_front();
                }
                t.push_back(ms);
                self.forward_ms = Some(fwd);
            }
        }
        ui.horizontal(|ui| {
            ui.label("Zoom");
            ui.add(egui::DragValue::new(&mut ctx.settings.latent_zoom).range(1..=12));
            if let Some(ms) = self.slider_to_image_ms.back().filter(|_| ctx.show_timings) {
                ui.label(format!(
                    "slider->image {ms:.1} ms (G forward {:.1} ms)",
                    self.forward_ms.unwrap_or(0.0)
                ));
            }
        });
        ui.horizontal(|ui| {
            if let (Some(t), Some(im)) = (&self.texture, &self.image) {
                let z = ctx.settings.latent_zoom.max(1) as f32;
                let size = egui::vec2(im.width as f32 * z, im.height as f32 * z);
                ui.add(egui::Image::new((t.id(), size))).on_hover_text(
                    "the explorer image (latent sliders and conditions on the right)",
                );
            } else {
                ui.label("(no image yet)");
            }
            ui.vertical(|ui| {
                ui.label(format!("Condition: {}", composer.caption()));
                ui.label(format!("Weights of step {}", self.image_step));
            });
        });
        ui.separator();
        self.interp_ui(ui, ctx);
    }

    fn interp_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        let interp = &mut self.interp;
        ui.heading("Interpolation");
        ui.label(format!(
            "A: {}   ->   B: {}",
            interp.a.caption, interp.b.caption
        ));
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.label("Steps");
            changed |= ui
                .add(egui::Slider::new(&mut ctx.settings.interp_steps, 2..=16))
                .changed();
            changed |= ui.checkbox(&mut ctx.settings.slerp, "slerp").changed();
            ui.checkbox(&mut interp.animate, "Animate");
            if ui.button("Render").clicked() {
                changed = true;
            }
        });
        if changed {
            ctx.send(AppCommand::RenderInterp);
        }
        if interp.strip_dirty {
            interp.strip_dirty = false;
            if let Some(im) = &interp.strip {
                interp.textures = (0..im.n)
                    .filter_map(|i| texture_of(ui.ctx(), &format!("interp{i}"), im, i))
                    .collect();
            }
        }
        let Some(im) = &interp.strip else {
            ui.label("(set A and B in the conditions panel, then Render)");
            return;
        };
        let z = ctx.settings.latent_zoom.clamp(1, 3) as f32;
        let size = egui::vec2(im.width as f32 * z, im.height as f32 * z);
        ui.horizontal_wrapped(|ui| {
            for t in &interp.textures {
                ui.add(egui::Image::new((t.id(), size)));
            }
        });
        if interp.animate && !interp.textures.is_empty() {
            let started = *interp.started.get_or_insert_with(Instant::now);
            let n = interp.textures.len();
            // Ping-pong at about 8 frames per second.
            let k = (started.elapsed().as_secs_f64() * 8.0) as usize % (2 * n - 2).max(1);
            let i = if k < n { k } else { 2 * n - 2 - k };
            let big = size * 2.0;
            ui.add(egui::Image::new((interp.textures[i].id(), big)));
        }
        ui.horizontal(|ui| {
            if ui.button("Export strip PNG").clicked() {
                ctx.send(AppCommand::ExportInterp { gif: false });
            }
            if ui.button("Export GIF").clicked() {
                ctx.send(AppCommand::ExportInterp { gif: true });
            }
        });
    }
}
