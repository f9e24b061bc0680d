//! The condition composer: i-CLEVR's 24 labels as an 8-colour x 3-shape grid of toggles
//! (at most 3 objects), a class picker with names for class datasets, one toggle per
//! attribute for attribute sets, and condition lists (`test.json`, `new_test.json`) to
//! step through or put on the wall.

use std::path::Path;

use super::dialogs::{Purpose, path_field, prompt_note};
use super::{AppCommand, PanelCtx};
use crate::data::ConditionKind;
use crate::train::run::caption;
use crate::train::worker::{Command, SessionInfo};

/// i-CLEVR scenes hold one to three objects.
pub const MAX_OBJECTS: usize = 3;

const SHAPES: [&str; 3] = ["cube", "sphere", "cylinder"];

/// CLEVR's colours (RGB) for the swatches.
fn clevr_rgb(name: &str) -> Option<[u8; 3]> {
    Some(match name {
        "gray" => [87, 87, 87],
        "red" => [173, 35, 35],
        "blue" => [42, 75, 215],
        "green" => [29, 105, 20],
        "brown" => [129, 74, 25],
        "purple" => [129, 38, 192],
        "cyan" => [41, 208, 208],
        "yellow" => [255, 238, 51],
        _ => return None,
    })
}

/// A loaded list of conditions.
#[derive(Debug, Clone, Default)]
pub struct ConditionList {
    pub name: String,
    pub items: Vec<Vec<f32>>,
    pub index: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Composer {
    pub names: Vec<String>,
    pub kind: Option<ConditionKind>,
    /// The condition the explorer draws with.
    pub cond: Vec<f32>,
    /// Colour rows of the i-CLEVR grid: (colour, [label index per shape]).
    pub grid: Vec<(String, [Option<usize>; 3])>,
    pub message: Option<String>,
    pub list: Option<ConditionList>,
    pub list_path: String,
}

impl Composer {
    /// Set up for a session's labels; starts on the first label (or class 0).
    pub fn reset(&mut self, info: &SessionInfo) {
        self.names = info.label_names.clone();
        self.kind = Some(info.condition_kind);
        let k = info.cfg.model.num_conditions;
        self.cond = vec![0.0; k];
        // One-hot: class 0. Multi-hot: the wall's first row, a label set of the data itself
        // (for i-CLEVR a training condition), not an arbitrary first label.
        match info.wall_rows.first() {
            Some((_, c)) if info.condition_kind == ConditionKind::MultiHot && c.len() == k => {
                self.cond = c.clone();
            }
            _ if k > 0 => self.cond[0] = 1.0,
            _ => {}
        }
        self.grid = iclevr_grid(&self.names);
        self.message = None;
        self.list = None;
    }

    pub fn is_iclevr(&self) -> bool {
        self.kind == Some(ConditionKind::MultiHot) && !self.grid.is_empty()
    }

    /// Toggle label `i`; refuses a 4th i-CLEVR object and says why. Returns true on change.
    pub fn toggle(&mut self, i: usize) -> bool {
        if i >= self.cond.len() {
            return false;
        }
        match self.kind {
            Some(ConditionKind::OneHot) => {
                self.cond.iter_mut().for_each(|v| *v = 0.0);
                self.cond[i] = 1.0;
            }
            _ => {
                let on = self.cond[i] > 0.5;
                let count = self.cond.iter().filter(|v| **v > 0.5).count();
                if !on && self.is_iclevr() && count >= MAX_OBJECTS {
                    self.message = Some(format!(
                        "at most {MAX_OBJECTS} objects: i-CLEVR scenes hold 1 to 3, so the \
                         generator never saw a 4th (untick one first)"
                    ));
                    return false;
                }
                self.cond[i] = if on { 0.0 } else { 1.0 };
            }
        }
        self.message = None;
        true
    }

    pub fn caption(&self) -> String {
        caption(&self.cond, &self.names)
    }
}

/// Rows of (colour, label per shape) when every name reads "<colour> <shape>".
fn iclevr_grid(names: &[String]) -> Vec<(String, [Option<usize>; 3])> {
    let mut rows: Vec<(String, [Option<usize>; 3])> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut parts = n.split_whitespace();
        let (Some(colour), Some(shape), None) = (parts.next(), parts.next(), parts.next()) else {
            return vec![];
        };
        let Some(s) = SHAPES.iter().position(|x| *x == shape) else {
            return vec![];
        };
        match rows.iter_mut().find(|r| r.0 == colour) {
            Some(r) => r.1[s] = Some(i),
            None => {
                let mut cells = [None; 3];
                cells[s] = Some(i);
                rows.push((colour.to_string(), cells));
            }
        }
    }
    rows
}

/// A toggle drawn as a shape icon, labelled for screen readers (and tests) by `name`.
fn shape_toggle(
    ui: &mut egui::Ui,
    on: bool,
    shape: usize,
    rgb: [u8; 3],
    name: &str,
) -> egui::Response {
    let size = egui::vec2(30.0, 26.0);
    let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click());
    let vis = ui.style().interact_selectable(&resp, on);
    let p = ui.painter();
    p.rect(
        rect,
        4.0,
        if on {
            vis.bg_fill
        } else {
            egui::Color32::TRANSPARENT
        },
        vis.bg_stroke,
        egui::StrokeKind::Inside,
    );
    let c = egui::Color32::from_rgb(rgb[0], rgb[1], rgb[2]);
    let fill = if on { c } else { c.gamma_multiply(0.35) };
    let stroke = egui::Stroke::new(1.0, egui::Color32::from_gray(if on { 240 } else { 140 }));
    let centre = rect.center();
    match shape {
        0 => {
            let r = egui::Rect::from_center_size(centre, egui::vec2(14.0, 14.0));
            p.rect(r, 1.0, fill, stroke, egui::StrokeKind::Inside);
        }
        1 => {
            p.circle(centre, 7.5, fill, stroke);
        }
        _ => {
            let r = egui::Rect::from_center_size(centre, egui::vec2(13.0, 13.0));
            p.rect(r, 0.0, fill, egui::Stroke::NONE, egui::StrokeKind::Inside);
            let top = egui::Rect::from_center_size(r.center_top(), egui::vec2(13.0, 5.0));
            p.add(egui::Shape::ellipse_filled(
                top.center(),
                egui::vec2(6.5, 2.5),
                fill,
            ));
            p.add(egui::Shape::ellipse_stroke(
                top.center(),
                egui::vec2(6.5, 2.5),
                stroke,
            ));
            p.line_segment([r.left_top(), r.left_bottom()], stroke);
            p.line_segment([r.right_top(), r.right_bottom()], stroke);
            p.add(egui::Shape::ellipse_stroke(
                r.center_bottom(),
                egui::vec2(6.5, 2.5),
                stroke,
            ));
        }
    }
    resp.widget_info(|| egui::WidgetInfo::selected(egui::Role::CheckBox, true, on, name));
    resp.on_hover_text(name)
}

/// The conditions panel: the composer owns the condition and the loaded list.
impl Composer {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        ui.heading("Conditions");
        if ctx.run.info.is_none() {
            ui.label("(waiting for the session)");
            return;
        }
        let mut changed = false;
        if self.is_iclevr() {
            ui.label("Objects (1 to 3):");
            egui::Grid::new("iclevr_grid")
                .spacing([4.0, 4.0])
                .show(ui, |ui| {
                    ui.label("");
                    for s in SHAPES {
                        ui.label(egui::RichText::new(s).small());
                    }
                    ui.end_row();
                    for r in 0..self.grid.len() {
                        let (colour, cells) = self.grid[r].clone();
                        let rgb = clevr_rgb(&colour).unwrap_or([128, 128, 128]);
                        ui.horizontal(|ui| {
                            let (sw, _) = ui
                                .allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                            ui.painter().rect_filled(
                                sw,
                                2.0,
                                egui::Color32::from_rgb(rgb[0], rgb[1], rgb[2]),
                            );
                            ui.label(&colour);
                        });
                        for (s, cell) in cells.iter().enumerate() {
                            match cell {
                                Some(i) => {
                                    let on = self.cond[*i] > 0.5;
                                    let name = self.names[*i].clone();
                                    if shape_toggle(ui, on, s, rgb, &name).clicked() {
                                        changed |= self.toggle(*i);
                                    }
                                }
                                None => {
                                    ui.label("");
                                }
                            }
                        }
                        ui.end_row();
                    }
                });
        } else {
            match self.kind {
                Some(ConditionKind::OneHot) => {
                    ui.label("Class:");
                    for i in 0..self.names.len() {
                        let on = self.cond[i] > 0.5;
                        // "3: dress", but "3" rather than "3: 3" for digit classes.
                        let label = &self.names[i];
                        let name = if *label == i.to_string() {
                            label.clone()
                        } else {
                            format!("{i}: {label}")
                        };
                        if ui.radio(on, name).clicked() {
                            changed |= self.toggle(i);
                        }
                    }
                }
                Some(ConditionKind::MultiHot) => {
                    ui.label("Attributes:");
                    for i in 0..self.names.len() {
                        let mut on = self.cond[i] > 0.5;
                        if ui.checkbox(&mut on, self.names[i].clone()).changed() {
                            changed |= self.toggle(i);
                        }
                    }
                }
                _ => {
                    ui.label("Unconditional model: no labels.");
                }
            }
        }
        if let Some(m) = &self.message {
            ui.colored_label(egui::Color32::from_rgb(230, 140, 40), m);
        }
        ui.label(format!("Now: {}", self.caption()));
        if ui
            .button("Clear")
            .on_hover_text("untick every label (a model may need at least one)")
            .clicked()
        {
            self.cond.iter_mut().for_each(|v| *v = 0.0);
            changed = true;
        }
        ui.separator();
        self.list_ui(ui, ctx, &mut changed);
        if changed {
            ctx.send(AppCommand::RenderLatent { timed: true });
        }
    }

    fn list_ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, changed: &mut bool) {
        ui.label(if self.is_iclevr() {
            "Condition list (test.json / new_test.json):"
        } else {
            "Condition list (.json, one label list per entry):"
        });
        ui.horizontal(|ui| {
            path_field(
                ui,
                ctx.prompt,
                Purpose::ConditionList,
                &mut self.list_path,
                "path to a .json list",
                170.0,
            );
            if ui.button("Load").clicked() {
                ctx.send(AppCommand::LoadConditionList);
            }
            if ui.button("…").on_hover_text("browse").clicked() {
                ctx.send(AppCommand::Ask {
                    purpose: Purpose::ConditionList,
                    folder: false,
                    title: "Open a condition list",
                });
            }
        });
        prompt_note(ui, ctx.prompt, Purpose::ConditionList);
        let Some(list) = self.list.as_mut() else {
            return;
        };
        let n = list.items.len();
        ui.horizontal(|ui| {
            if ui.button("Prev").clicked() && list.index > 0 {
                list.index -= 1;
                *changed = true;
            }
            ui.label(format!("{} {}/{}", list.name, list.index + 1, n));
            if ui.button("Next").clicked() && list.index + 1 < n {
                list.index += 1;
                *changed = true;
            }
        });
        if *changed {
            self.cond = list.items[list.index].clone();
        }
        if ui
            .button("Put the list on the wall")
            .on_hover_text("the first 16 conditions as wall rows")
            .clicked()
        {
            let names = self.names.clone();
            let rows: Vec<(String, Vec<f32>)> = list
                .items
                .iter()
                .take(16)
                .map(|c| (caption(c, &names), c.clone()))
                .collect();
            let cols = ctx.settings.wall_cols;
            ctx.trainer(Command::SetWall { rows, cols });
        }
    }

    /// Read the list at `list_path` (label-name lists or class names / ids); what follows
    /// (a log line and a new image, or the error) goes to `out`.
    pub fn load_list(&mut self, out: &mut Vec<AppCommand>) {
        let path = self.list_path.trim().to_string();
        match read_condition_list(Path::new(&path), &self.names) {
            Ok(items) if !items.is_empty() => {
                let name = Path::new(&path)
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                out.push(AppCommand::Log(format!(
                    "loaded {} conditions from {path}",
                    items.len()
                )));
                self.cond = items[0].clone();
                self.list = Some(ConditionList {
                    name,
                    items,
                    index: 0,
                });
                out.push(AppCommand::RenderLatent { timed: true });
            }
            Ok(_) => out.push(AppCommand::Error(format!("{path}: the list is empty"))),
            Err(e) => out.push(AppCommand::Error(e.to_string())),
        }
    }
}

/// A JSON list of label-name lists (i-CLEVR `test.json`) as multi-hot vectors over `names`.
pub fn read_condition_list(path: &Path, names: &[String]) -> crate::error::Result<Vec<Vec<f32>>> {
    let ids = crate::data::iclevr::read_conditions(path, names)?;
    Ok(ids
        .into_iter()
        .map(|l| {
            let mut v = vec![0.0; names.len()];
            for i in l {
                v[i as usize] = 1.0;
            }
            v
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_parses_iclevr_names_and_refuses_a_fourth_object() {
        let names: Vec<String> = crate::data::iclevr::OBJECT_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect();
        let grid = iclevr_grid(&names);
        assert_eq!(grid.len(), 8);
        assert!(grid.iter().all(|r| r.1.iter().all(|c| c.is_some())));
        let mut c = Composer {
            names: names.clone(),
            kind: Some(ConditionKind::MultiHot),
            cond: vec![0.0; 24],
            grid,
            ..Default::default()
        };
        assert!(c.toggle(0) && c.toggle(1) && c.toggle(2));
        assert!(!c.toggle(3));
        assert!(c.message.as_deref().unwrap().contains("at most 3"));
        assert!(c.toggle(2), "unticking is always allowed");
        assert!(c.toggle(3));
        assert!(iclevr_grid(&["a b c".to_string()]).is_empty());
    }
}
