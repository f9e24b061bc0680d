//! Export: the wall (or a condition list x seeds) as a captioned sample sheet PNG at a chosen
//! scale, the wall's training history as a GIF, the interpolation strip as PNG and GIF.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::GanscopeApp;
use super::dialogs::Purpose;
use crate::error::{Error, Result};
use crate::export::gif::save_gif;
use crate::export::sheet::{SheetLayout, sample_sheet, save_png};
use crate::images::Images;
use crate::train::run::{WALL_SEED, caption};
use crate::train::worker::WallFrame;

/// A frame of the wall as a captioned sheet.
pub fn wall_sheet(frame: &WallFrame, scale: u32) -> Result<RgbImage> {
    let captioned = frame.captions.iter().any(|c| !c.is_empty());
    let layout = SheetLayout {
        rows: frame.rows,
        cols: frame.cols,
        scale,
        row_captions: if captioned {
            frame.captions.clone()
        } else {
            vec![]
        },
        ..SheetLayout::default()
    };
    sample_sheet(&frame.images, &layout)
}

impl GanscopeApp {
    pub(crate) fn export_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Export");
        ui.horizontal(|ui| {
            ui.label("Folder");
            ui.add(egui::TextEdit::singleline(&mut self.settings.export_path).desired_width(140.0));
            if ui.button("…").clicked() {
                self.ask(Purpose::ExportFolder, true, "Export folder");
            }
        });
        ui.horizontal(|ui| {
            ui.label("Scale");
            ui.add(egui::DragValue::new(&mut self.settings.export_scale).range(1..=8));
        });
        if ui.button("Wall as PNG").clicked() {
            let r = self.export_wall_png();
            self.report_export(r);
        }
        if ui.button("Wall history as GIF").clicked() {
            let r = self.export_history_gif();
            self.report_export(r);
        }
        let has_list = self.composer.list.is_some();
        if ui
            .add_enabled(has_list, egui::Button::new("Condition list x seeds as PNG"))
            .on_hover_text("every condition of the loaded list (rows) x the wall's seeds")
            .clicked()
        {
            let r = self.export_list_sheet();
            self.report_export(r);
        }
        if let Some(m) = &self.export_message {
            ui.label(egui::RichText::new(m).small());
        }
    }

    fn report_export(&mut self, r: Result<PathBuf>) {
        let m = match r {
            Ok(p) => format!("wrote {}", p.display()),
            Err(e) => format!("export failed: {e}"),
        };
        self.push_log(m.clone());
        self.export_message = Some(m);
    }

    fn export_file(&self, stem: &str, ext: &str) -> PathBuf {
        let step = self.shown_frame().map_or(0, |f| f.step);
        let preset = self
            .info
            .as_ref()
            .map_or("run".to_string(), |i| i.cfg.preset.clone());
        Path::new(self.settings.export_path.trim())
            .join(format!("{preset}-{stem}-step{step:06}.{ext}"))
    }

    /// The wall frame on screen as a PNG sheet; returns the path written.
    pub fn export_wall_png(&mut self) -> Result<PathBuf> {
        let frame = self
            .shown_frame()
            .cloned()
            .ok_or_else(|| Error::Msg("no wall frame yet".into()))?;
        let path = self.export_file("wall", "png");
        save_png(
            &wall_sheet(&frame, self.settings.export_scale.max(1))?,
            &path,
        )?;
        Ok(path)
    }

    /// Every kept frame of the wall as an animated GIF.
    pub fn export_history_gif(&mut self) -> Result<PathBuf> {
        if self.frames.is_empty() {
            return Err(Error::Msg("no wall frames yet".into()));
        }
        let scale = self.settings.export_scale.max(1);
        // Frames of one wall layout only (the newest one's).
        let last = self.frames.back().cloned().expect("checked");
        let sheets: Vec<RgbImage> = self
            .frames
            .iter()
            .filter(|f| f.rows == last.rows && f.cols == last.cols)
            .map(|f| wall_sheet(f, scale))
            .collect::<Result<_>>()?;
        let path = self.export_file("history", "gif");
        save_gif(&sheets, 150, &path)?;
        Ok(path)
    }

    /// The loaded condition list (rows) x the wall's noise seeds (columns).
    pub fn export_list_sheet(&mut self) -> Result<PathBuf> {
        let list = self
            .composer
            .list
            .clone()
            .ok_or_else(|| Error::Msg("no condition list loaded".into()))?;
        let w = self
            .last_weights
            .clone()
            .ok_or_else(|| Error::Msg("no generator weights yet".into()))?;
        let g = w.build()?;
        let cols = self.settings.wall_cols.max(1);
        let images = g.grid(&list.items, cols, WALL_SEED)?;
        let frame = WallFrame {
            step: w.step,
            rows: list.items.len(),
            cols,
            captions: list
                .items
                .iter()
                .map(|c| caption(c, &self.composer.names))
                .collect(),
            images,
        };
        let stem = format!("{}-x{cols}", list.name.trim_end_matches(".json"));
        let path = self.export_file(&stem, "png");
        save_png(
            &wall_sheet(&frame, self.settings.export_scale.max(1))?,
            &path,
        )?;
        Ok(path)
    }

    pub(crate) fn export_interp(&mut self, gif: bool) {
        let r = (|| -> Result<PathBuf> {
            let strip: Images = self
                .interp
                .strip
                .clone()
                .ok_or_else(|| Error::Msg("no interpolation rendered yet".into()))?;
            let scale = self.settings.export_scale.max(1);
            if gif {
                let frames: Vec<RgbImage> = (0..strip.n)
                    .map(|i| {
                        let one = Images {
                            n: 1,
                            data: strip.image(i).to_vec(),
                            ..strip.clone()
                        };
                        sample_sheet(&one, &SheetLayout::grid(1, 1).with_scale(scale * 2))
                    })
                    .collect::<Result<_>>()?;
                let path = self.export_file("interpolation", "gif");
                save_gif(&frames, 120, &path)?;
                Ok(path)
            } else {
                let layout = SheetLayout::grid(1, strip.n).with_scale(scale);
                let path = self.export_file("interpolation", "png");
                save_png(&sample_sheet(&strip, &layout)?, &path)?;
                Ok(path)
            }
        })();
        self.report_export(r);
    }
}
