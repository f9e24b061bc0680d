//! The sample wall panel: the fixed-noise grid (rows = conditions, columns = noise seeds) at
//! integer zoom, drawn by the wgpu shader in `shaders/wall.wgsl` (egui texture fallback),
//! with a heat map of per-pixel variance and a timeline slider over earlier frames.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::wall_gpu::{Atlas, WallCallback};
use super::{AppCommand, PanelCtx};
use crate::images::to_u8;
use crate::train::worker::{Command, WallFrame};

/// What the heat map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeatMode {
    Off,
    /// Variance across the noise seeds of each row (same condition): low = collapse.
    Row,
    /// Variance across the conditions of each column (same noise): where labels act.
    Column,
}

/// Per-pixel standard deviation across a group of cells, mapped to [0, 255]
/// (2 sigma of the [-1, 1] range saturates).
fn group_std(frame: &WallFrame, cells: &[usize]) -> Vec<u8> {
    let im = &frame.images;
    let (c, hw) = (im.channels, im.height * im.width);
    let n = cells.len().max(1) as f32;
    let mut out = vec![0u8; hw];
    for (p, o) in out.iter_mut().enumerate() {
        let mut var = 0f32;
        for ch in 0..c {
            let (mut s, mut s2) = (0f32, 0f32);
            for &i in cells {
                let v = im.image(i)[ch * hw + p];
                s += v;
                s2 += v * v;
            }
            let m = s / n;
            var += (s2 / n - m * m).max(0.0);
        }
        let std = (var / c as f32).sqrt();
        *o = (std * 2.0 * 255.0).clamp(0.0, 255.0) as u8;
    }
    out
}

/// The wall as one RGBA atlas (rows x cols cells); alpha holds the heat map of `heat`.
pub fn build_atlas(frame: &WallFrame, heat: HeatMode, version: u64) -> Atlas {
    let im = &frame.images;
    let (h, w) = (im.height, im.width);
    let (rows, cols) = (frame.rows, frame.cols);
    let (aw, ah) = (cols * w, rows * h);
    let mut rgba = vec![255u8; aw * ah * 4];
    let heat_of = |r: usize, col: usize| -> Option<Vec<u8>> {
        match heat {
            HeatMode::Off => None,
            HeatMode::Row => Some(group_std(
                frame,
                &(0..cols).map(|j| r * cols + j).collect::<Vec<_>>(),
            )),
            HeatMode::Column => Some(group_std(
                frame,
                &(0..rows).map(|i| i * cols + col).collect::<Vec<_>>(),
            )),
        }
    };
    let col_heat: Vec<Option<Vec<u8>>> = if heat == HeatMode::Column {
        (0..cols).map(|j| heat_of(0, j)).collect()
    } else {
        vec![]
    };
    for r in 0..rows {
        let row_heat = if heat == HeatMode::Row {
            heat_of(r, 0)
        } else {
            None
        };
        for j in 0..cols {
            let i = r * cols + j;
            if i >= im.n {
                continue;
            }
            let img = im.image(i);
            let hm = row_heat
                .as_ref()
                .or(col_heat.get(j).and_then(|v| v.as_ref()));
            for y in 0..h {
                for x in 0..w {
                    let p = y * w + x;
                    let o = (((r * h + y) * aw) + j * w + x) * 4;
                    for ch in 0..3 {
                        let src = if im.channels == 1 { 0 } else { ch };
                        rgba[o + ch] = to_u8(img[src * h * w + p]);
                    }
                    rgba[o + 3] = hm.map_or(0, |m| m[p]);
                }
            }
        }
    }
    Atlas {
        version,
        width: aw as u32,
        height: ah as u32,
        rgba,
    }
}

/// The wall panel: the cached atlas (and fallback texture) of the frame on screen, and the
/// zoom it was drawn at.
pub struct WallView {
    pub gpu: bool,
    /// The integer zoom the wall was last drawn at (the fitted one when the setting is 0).
    pub shown_zoom: u32,
    key: Option<(u64, usize, usize, HeatMode)>,
    pub atlas: Option<Arc<Atlas>>,
    texture: Option<egui::TextureHandle>,
    version: u64,
}

impl WallView {
    pub fn new(gpu: bool) -> Self {
        Self {
            gpu,
            shown_zoom: 0,
            key: None,
            atlas: None,
            texture: None,
            version: 0,
        }
    }

    /// Rebuild the atlas when the frame or the heat mode changed.
    pub fn update(&mut self, ctx: &egui::Context, frame: &WallFrame, heat: HeatMode) {
        let key = (frame.step, frame.rows, frame.cols, heat);
        let same_frame = self.key == Some(key)
            && self
                .atlas
                .as_ref()
                .is_some_and(|a| a.width as usize == frame.cols * frame.images.width);
        if same_frame {
            return;
        }
        self.version += 1;
        let atlas = build_atlas(frame, heat, self.version);
        if !self.gpu {
            let rgb: Vec<u8> = atlas
                .rgba
                .chunks(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect();
            let img =
                egui::ColorImage::from_rgb([atlas.width as usize, atlas.height as usize], &rgb);
            self.texture = Some(ctx.load_texture("wall", img, egui::TextureOptions::NEAREST));
        }
        self.atlas = Some(Arc::new(atlas));
        self.key = Some(key);
    }
}

impl WallView {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        let run = ctx.run;
        let n = run.frames.len();
        ui.horizontal(|ui| {
            ui.label("Zoom");
            ui.add(egui::DragValue::new(&mut ctx.settings.zoom).range(0..=12))
                .on_hover_text("integer zoom; 0 = the largest that fits");
            ui.separator();
            ui.label("Heat map");
            egui::ComboBox::from_id_salt("heat")
                .selected_text(match ctx.settings.heat {
                    HeatMode::Off => "off",
                    HeatMode::Row => "variance across seeds (row)",
                    HeatMode::Column => "variance across conditions (column)",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut ctx.settings.heat, HeatMode::Off, "off");
                    ui.selectable_value(
                        &mut ctx.settings.heat,
                        HeatMode::Row,
                        "variance across seeds (row)",
                    );
                    ui.selectable_value(
                        &mut ctx.settings.heat,
                        HeatMode::Column,
                        "variance across conditions (column)",
                    );
                });
            ui.checkbox(&mut ctx.settings.grid_lines, "Grid lines");
            ui.separator();
            ui.label("Columns");
            let cols = ui.add(egui::DragValue::new(&mut ctx.settings.wall_cols).range(1..=16));
            if cols.changed()
                && let Some(info) = &run.info
            {
                let rows = info.wall_rows.clone();
                let cols = ctx.settings.wall_cols;
                ctx.trainer(Command::SetWall { rows, cols });
            }
        });
        if n > 0 {
            ui.horizontal(|ui| {
                let mut idx = run.scrub.unwrap_or(n - 1);
                let step_of = |i: usize| run.frames.get(i).map_or(0, |f| f.step);
                let label = format!("step {}", step_of(idx));
                // A long history gets a long slider: about 2 px per kept frame.
                ui.spacing_mut().slider_width =
                    (n as f32 * 2.0).clamp(95.0, (ui.available_width() - 260.0).max(95.0));
                let r = ui.add(
                    egui::Slider::new(&mut idx, 0..=n - 1)
                        .show_value(false)
                        .text("Timeline"),
                );
                if r.changed() {
                    ctx.send(AppCommand::Scrub(if idx + 1 == n {
                        None
                    } else {
                        Some(idx)
                    }));
                }
                ui.label(label);
                let live = run.scrub.is_none();
                if ui.selectable_label(live, "Live").clicked() {
                    ctx.send(AppCommand::Scrub(None));
                }
                ui.label(format!("({n} frames kept, at most {})", super::FRAMES_KEPT));
            });
        }
        let Some(frame) = run.shown_frame().cloned() else {
            ui.centered_and_justified(|ui| {
                ui.label(match &run.error {
                    Some(_) => "No samples: see the error above.",
                    None => "Building the dataset and the networks…",
                });
            });
            return;
        };
        self.update(ui.ctx(), &frame, ctx.settings.heat);
        let Some(atlas) = self.atlas.clone() else {
            return;
        };
        // Captions get the width of the longest one (at most a third of the panel; longer
        // ones wrap onto more lines), so none is clipped.
        let font = egui::FontId::proportional(12.0);
        let text_color = ui.visuals().text_color();
        let widest = frame
            .captions
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                ui.painter()
                    .layout_no_wrap(c.clone(), font.clone(), text_color)
                    .size()
                    .x
            })
            .fold(0.0f32, f32::max);
        let fit = |caption_w: f32| {
            let avail = ui.available_size() - egui::vec2(caption_w + 8.0, 8.0);
            ((avail.x / atlas.width as f32).min(avail.y / atlas.height as f32))
                .floor()
                .clamp(1.0, 12.0)
        };
        let (caption_w, fitted) = if widest > 0.0 {
            // Full-width captions, unless wrapping them onto two or three lines lets the
            // wall take a larger zoom.
            let full = (widest + 12.0).min(ui.available_width() / 3.0).max(60.0);
            let narrow = full.min(150.0);
            let (zf, zn) = (fit(full), fit(narrow));
            if zn > zf { (narrow, zn) } else { (full, zf) }
        } else {
            (0.0, fit(0.0))
        };
        let zoom = match ctx.settings.zoom {
            0 => fitted,
            z => z as f32,
        };
        self.shown_zoom = zoom as u32;
        let size = egui::vec2(atlas.width as f32 * zoom, atlas.height as f32 * zoom);
        egui::ScrollArea::both().show(ui, |ui| {
            ui.horizontal_top(|ui| {
                if caption_w > 0.0 {
                    let cell_h = size.y / frame.rows.max(1) as f32;
                    ui.vertical(|ui| {
                        // Caption cells line up with the wall's rows: no gaps between them.
                        ui.spacing_mut().item_spacing.y = 0.0;
                        ui.set_width(caption_w);
                        for c in &frame.captions {
                            let (r, _) = ui.allocate_exact_size(
                                egui::vec2(caption_w, cell_h),
                                egui::Sense::hover(),
                            );
                            let mut job = egui::text::LayoutJob::simple(
                                c.clone(),
                                font.clone(),
                                text_color,
                                caption_w - 8.0,
                            );
                            job.halign = egui::Align::RIGHT;
                            let galley = ui.painter().layout_job(job);
                            let at =
                                egui::pos2(r.right() - 6.0, r.center().y - galley.size().y / 2.0);
                            ui.painter().galley(at, galley, text_color);
                        }
                    });
                }
                let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::hover());
                if self.gpu {
                    ui.painter()
                        .add(eframe::egui_wgpu::Callback::new_paint_callback(
                            rect,
                            WallCallback {
                                atlas: atlas.clone(),
                                cols: frame.cols as u32,
                                rows: frame.rows as u32,
                                heat: if ctx.settings.heat == HeatMode::Off {
                                    0.0
                                } else {
                                    0.65
                                },
                                line_px: if ctx.settings.grid_lines { 1.0 } else { 0.0 },
                                rect_points: [rect.width(), rect.height()],
                            },
                        ));
                } else if let Some(t) = &self.texture {
                    let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
                    ui.painter().image(t.id(), rect, uv, egui::Color32::WHITE);
                }
                resp.on_hover_text(format!(
                    "step {}: {} rows x {} seeds, zoom {zoom}x",
                    frame.step, frame.rows, frame.cols
                ));
            });
            if ctx.settings.heat != HeatMode::Off {
                heat_legend(ui);
            }
        });
    }
}

/// The heat map's colour ramp (the shader's `heat_color`), `t` in [0, 1].
pub fn heat_color(t: f32) -> egui::Color32 {
    let c = [
        [0.05, 0.05, 0.35],
        [0.0, 0.6, 0.6],
        [0.95, 0.85, 0.1],
        [0.85, 0.1, 0.05],
    ];
    let (a, b, f) = if t < 0.33 {
        (c[0], c[1], t / 0.33)
    } else if t < 0.66 {
        (c[1], c[2], (t - 0.33) / 0.33)
    } else {
        (c[2], c[3], ((t - 0.66) / 0.34).clamp(0.0, 1.0))
    };
    let mix = |i: usize| ((a[i] + (b[i] - a[i]) * f) * 255.0).round() as u8;
    egui::Color32::from_rgb(mix(0), mix(1), mix(2))
}

/// The colour scale under the wall: per-pixel standard deviation (pixel values in [-1, 1];
/// the ramp saturates at 0.5), blended over the images at 65%.
fn heat_legend(ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        ui.label("std across the group: 0");
        let (rect, _) = ui.allocate_exact_size(egui::vec2(200.0, 12.0), egui::Sense::hover());
        let n = 50;
        for i in 0..n {
            let x0 = rect.left() + rect.width() * i as f32 / n as f32;
            let x1 = rect.left() + rect.width() * (i + 1) as f32 / n as f32;
            let r =
                egui::Rect::from_min_max(egui::pos2(x0, rect.top()), egui::pos2(x1, rect.bottom()));
            ui.painter()
                .rect_filled(r, 0.0, heat_color((i as f32 + 0.5) / n as f32));
        }
        ui.label(">= 0.5 (pixel values in [-1, 1]; blended over the images at 65%)");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::Images;

    #[test]
    fn atlas_layout_and_row_variance() {
        // 2 rows x 2 cols of 1x2 grey images. Row 0: values -1 and 1 in both pixels (std 1 ->
        // 2 sigma saturates at 255); row 1: identical images (std 0).
        let data = vec![-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let frame = WallFrame {
            step: 1,
            rows: 2,
            cols: 2,
            captions: vec![],
            images: Images {
                n: 4,
                channels: 1,
                height: 1,
                width: 2,
                data,
            },
        };
        let a = build_atlas(&frame, HeatMode::Row, 7);
        assert_eq!((a.width, a.height, a.version), (4, 2, 7));
        // Pixel (x=2, y=0) is image 1 (value 1 -> 255), heat 255.
        assert_eq!(&a.rgba[2 * 4..2 * 4 + 4], &[255, 255, 255, 255]);
        // Pixel (0, 1) is image 2 (value 0 -> 128), heat 0.
        let o = 4 * 4;
        assert_eq!(a.rgba[o + 3], 0);
        assert_eq!(a.rgba[o], to_u8(0.0));
        // Column mode: column 0 holds -1 and 0 -> std 0.5 -> 2 sigma = 1 -> 255.
        let c = build_atlas(&frame, HeatMode::Column, 8);
        assert_eq!(c.rgba[3], 255);
    }
}
