//! The diagnostics panel: alarms, the latest check's measures beside their real-vs-real
//! baselines, per-label hit rates as a colour x shape heat map (i-CLEVR) or per-class
//! accuracy / coverage bars, NDB bins with the significant ones marked and each bin's centre
//! image, intra-condition diversity, and the closest generated and real pairs.

use egui_plot::{Bar, BarChart, Legend, Plot};

use super::latent::texture_of;
use super::{Composer, PanelCtx};
use crate::images::Images;

/// The diagnostics panel: the textures of the latest check's images (rebuilt once per check).
#[derive(Default)]
pub struct DiagnosticsPanel {
    step: Option<u64>,
    ndb: Vec<egui::TextureHandle>,
    gen_pairs: Vec<egui::TextureHandle>,
    real_pairs: Vec<egui::TextureHandle>,
}

fn textures(ctx: &egui::Context, name: &str, im: &Option<Images>) -> Vec<egui::TextureHandle> {
    match im {
        Some(im) => (0..im.n)
            .filter_map(|i| texture_of(ctx, &format!("{name}{i}"), im, i))
            .collect(),
        None => vec![],
    }
}

fn heat_colour(v: f64) -> egui::Color32 {
    // red (0) -> yellow (0.5) -> green (1)
    let v = v.clamp(0.0, 1.0) as f32;
    let (r, g) = if v < 0.5 {
        (1.0, v * 2.0)
    } else {
        (2.0 - v * 2.0, 1.0)
    };
    egui::Color32::from_rgb((r * 200.0) as u8, (g * 180.0) as u8, 40)
}

impl DiagnosticsPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>, composer: &Composer) {
        let run = ctx.run;
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.heading("Alarms");
            if run.alarms.is_empty() {
                ui.label("None so far.");
            }
            for a in run.alarms.iter().rev().take(8) {
                ui.colored_label(
                    egui::Color32::from_rgb(230, 90, 60),
                    a.message.clone(),
                );
            }
            ui.separator();
            let Some(check) = run.last_check.clone() else {
                match run.info.as_ref().and_then(|i| i.diagnostics_off.clone()) {
                    Some(why) => ui.label(format!("Diagnostics: {why}")),
                    None => ui.label(match run.history.last().and_then(|h| h.next_check) {
                        Some(s) => format!(
                            "No check yet: the next one is expected at step {s} (checks are \
                             spaced so that they take at most their share of the time)."
                        ),
                        None => "No check yet.".to_string(),
                    }),
                };
                return;
            };
            if self.step != Some(check.step) {
                let egui_ctx = ui.ctx().clone();
                *self = DiagnosticsPanel {
                    step: Some(check.step),
                    ndb: textures(&egui_ctx, "ndb", &check.gallery.ndb_centres),
                    gen_pairs: textures(&egui_ctx, "gpair", &check.gallery.closest_generated),
                    real_pairs: textures(&egui_ctx, "rpair", &check.gallery.closest_real),
                };
            }
            let r = &check.report;
            ui.heading(format!(
                "Check at step {} ({} generated vs {} real, {:.2} s)",
                check.step, r.n_generated, r.n_real_reference, check.seconds
            ));
            let next = match run.history.last().and_then(|h| h.next_check) {
                Some(s) => format!("expected at step {s}"),
                None => "off".to_string(),
            };
            ui.label(format!(
                "Checks so far: {:.1}% of checks + training ({:.0} s of training before this \
                 one). To stay within its share the next check waits for {:.0} s of training, \
                 at a multiple of {} steps: {next}.",
                100.0 * check.share,
                check.train_seconds,
                check.next_after_train_seconds,
                // The running session's interval (the setting applies from the next Start).
                run.info.as_ref().map_or(0, |i| i.cfg.monitor.every)
            ));
            egui::Grid::new("diag_numbers").striped(true).show(ui, |ui| {
                ui.label("measure");
                ui.label("generated");
                ui.label(format!("real vs real (n={})", r.baseline_n))
                    .on_hover_text(
                        "the same measures between two disjoint samples of real images of this \
                         size: what a perfect generator would score at this sample size",
                    );
                ui.end_row();
                let rows = [
                    ("precision", r.prdc.precision, r.prdc_baseline.precision),
                    ("recall", r.prdc.recall, r.prdc_baseline.recall),
                    ("density", r.prdc.density, r.prdc_baseline.density),
                    ("coverage", r.prdc.coverage, r.prdc_baseline.coverage),
                ];
                for (name, g, b) in rows {
                    ui.label(name);
                    ui.label(format!("{g:.3}"));
                    ui.label(format!("{b:.3}"));
                    ui.end_row();
                }
                let sig = |v: &[bool]| v.iter().filter(|s| **s).count();
                ui.label("NDB significant bins");
                ui.label(format!("{}/{}", sig(&r.ndb.significant), r.ndb.k));
                ui.label(format!("{}/{}", sig(&r.ndb_baseline.significant), r.ndb_baseline.k));
                ui.end_row();
                if let Some(h) = &r.label_hits {
                    ui.label("label hit rate (top-k)");
                    ui.label(format!("{:.3}", h.accuracy));
                    ui.label("");
                    ui.end_row();
                }
                if let Some(c) = &r.confusion {
                    ui.label("class accuracy");
                    ui.label(format!("{:.3}", c.accuracy));
                    ui.label("");
                    ui.end_row();
                }
                if let Some(c) = &r.class_coverage {
                    ui.label("modes covered");
                    ui.label(format!("{}/{}", c.modes_covered, c.modes_present));
                    ui.label("");
                    ui.end_row();
                }
                // Per-label groups (the pooled "all samples" group is not a condition);
                // an unconditional model has only the pooled one.
                let groups = &r.diversity.per_condition;
                let labelled: Vec<_> = groups.iter().filter(|c| c.condition.is_some()).collect();
                let shown = if labelled.is_empty() {
                    groups.iter().collect()
                } else {
                    labelled
                };
                let flagged = shown.iter().filter(|c| c.flagged).count();
                ui.label(if shown.iter().any(|c| c.condition.is_some()) {
                    "diversity: labels flagged"
                } else {
                    "diversity: flagged"
                });
                ui.label(format!("{flagged}/{}", shown.len()));
                ui.label(format!("ratio < {:.2}", r.diversity.threshold));
                ui.end_row();
            });
            if let Some(h) = &r.label_hits {
                ui.separator();
                ui.label("Per-label hit rate (red = the generator fails this label)");
                let names = composer.names.clone();
                if composer.is_iclevr() {
                    egui::Grid::new("hits_grid").show(ui, |ui| {
                        ui.label("");
                        for s in ["cube", "sphere", "cylinder"] {
                            ui.label(s);
                        }
                        ui.end_row();
                        for (colour, cells) in &composer.grid {
                            ui.label(colour);
                            for cell in cells {
                                let v = cell.and_then(|i| h.rate.get(i).copied().flatten());
                                let (rect, resp) = ui.allocate_exact_size(
                                    egui::vec2(56.0, 20.0),
                                    egui::Sense::hover(),
                                );
                                let fill = v.map_or(egui::Color32::from_gray(60), heat_colour);
                                ui.painter().rect_filled(rect, 2.0, fill);
                                ui.painter().text(
                                    rect.center(),
                                    egui::Align2::CENTER_CENTER,
                                    v.map_or("n/a".into(), |v| format!("{v:.2}")),
                                    egui::FontId::monospace(11.0),
                                    egui::Color32::BLACK,
                                );
                                if let Some(i) = cell {
                                    resp.on_hover_text(format!(
                                        "{}: {} conditioned, {} hits",
                                        names.get(*i).map_or("?", |s| s.as_str()),
                                        h.conditioned[*i],
                                        h.hits[*i]
                                    ));
                                }
                            }
                            ui.end_row();
                        }
                    });
                } else {
                    let bars: Vec<Bar> = h
                        .rate
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            Bar::new(i as f64, v.unwrap_or(0.0)).fill(heat_colour(v.unwrap_or(0.0)))
                        })
                        .collect();
                    Plot::new("hits")
                        .height(140.0)
                        .show(ui, |p| p.bar_chart(BarChart::new("hit rate", bars)));
                }
            }
            if let Some(c) = &r.confusion {
                ui.separator();
                ui.label("Per-class accuracy of evaluator(G(z, c)) against c");
                let bars: Vec<Bar> = c
                    .per_class_accuracy
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Bar::new(i as f64, v.unwrap_or(0.0)).fill(heat_colour(v.unwrap_or(0.0))))
                    .collect();
                Plot::new("confusion")
                    .height(140.0)
                    .include_y(1.0)
                    .show(ui, |p| p.bar_chart(BarChart::new("accuracy", bars)));
            }
            if let Some(c) = &r.class_coverage {
                ui.separator();
                ui.label("Predicted-class histogram vs the data's (modes covered)");
                let g: Vec<Bar> = c
                    .generated_distribution
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Bar::new(i as f64 - 0.2, *v).width(0.4))
                    .collect();
                let d: Vec<Bar> = c
                    .data_distribution
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Bar::new(i as f64 + 0.2, *v).width(0.4))
                    .collect();
                Plot::new("coverage")
                    .height(140.0)
                    .legend(Legend::default())
                    .show(ui, |p| {
                        p.bar_chart(BarChart::new("generated", g));
                        p.bar_chart(BarChart::new("data", d));
                    });
            }
            ui.separator();
            ui.label(format!(
                "NDB: share of samples per k-means bin (K = {}), generated vs real; red = \
                 significantly different (alpha {})",
                r.ndb.k, r.ndb.alpha
            ));
            let bars: Vec<Bar> = r
                .ndb
                .generated_proportions
                .iter()
                .zip(&r.ndb.real_proportions)
                .zip(&r.ndb.significant)
                .enumerate()
                .map(|(i, ((g, real), s))| {
                    Bar::new(i as f64, g - real).fill(if *s {
                        egui::Color32::from_rgb(220, 60, 50)
                    } else {
                        egui::Color32::from_rgb(90, 140, 200)
                    })
                })
                .collect();
            Plot::new("ndb")
                .height(150.0)
                .show(ui, |p| p.bar_chart(BarChart::new("generated - real share", bars)));
            let sig: Vec<usize> = (0..r.ndb.k).filter(|i| r.ndb.significant[*i]).collect();
            if !sig.is_empty() && !self.ndb.is_empty() {
                ui.label("Centres of the significant bins (nearest real image), with generated - real share:");
                ui.horizontal_wrapped(|ui| {
                    for i in sig.iter().take(24) {
                        if let Some(t) = self.ndb.get(*i) {
                            ui.vertical(|ui| {
                                ui.add(egui::Image::new((t.id(), egui::vec2(48.0, 48.0))));
                                let d = r.ndb.generated_proportions[*i] - r.ndb.real_proportions[*i];
                                ui.label(egui::RichText::new(format!("{d:+.3}")).small());
                            });
                        }
                    }
                });
            }
            ui.separator();
            let flagged: Vec<_> = r.diversity.per_condition.iter().filter(|d| d.flagged).collect();
            ui.label(format!(
                "Intra-condition diversity: {} of {} conditions less diverse than real",
                flagged.len(),
                r.diversity.per_condition.len()
            ));
            for d in flagged.iter().take(10) {
                let name = d
                    .condition
                    .and_then(|c| composer.names.get(c as usize).cloned())
                    .unwrap_or_else(|| "all".into());
                ui.colored_label(
                    egui::Color32::from_rgb(230, 90, 60),
                    format!(
                        "{name}: generated {:.3} vs real {:.3} (ratio {:.2})",
                        d.generated.unwrap_or(0.0),
                        d.real.unwrap_or(0.0),
                        d.ratio.unwrap_or(0.0)
                    ),
                );
            }
            ui.separator();
            ui.label("Closest pairs (birthday-paradox test): generated, then real for reference");
            for (what, tex, pairs) in [
                ("generated", &self.gen_pairs, &r.closest_generated),
                ("real", &self.real_pairs, &r.closest_real),
            ] {
                ui.horizontal_wrapped(|ui| {
                    ui.label(what);
                    for (k, p) in pairs.iter().enumerate().take(6) {
                        ui.vertical(|ui| {
                            ui.horizontal(|ui| {
                                for t in tex.iter().skip(2 * k).take(2) {
                                    ui.add(egui::Image::new((t.id(), egui::vec2(40.0, 40.0))));
                                }
                            });
                            ui.label(egui::RichText::new(format!("d = {:.3}", p.distance)).small());
                        });
                    }
                });
            }
        });
    }
}
