//! Plots (egui_plot): D and G losses, D(real) / D(fake) (or the critic values), D accuracy,
//! gradient penalty, gradient norms, FID (when the run has `monitor.fid_every`), and the
//! evaluator's accuracy and feature-space measures per check.

use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::PanelCtx;

/// At most this many points per line (older steps are thinned evenly).
const MAX_POINTS: usize = 4000;

fn thin<T>(v: &[T]) -> impl Iterator<Item = &T> {
    let stride = v.len().div_ceil(MAX_POINTS).max(1);
    v.iter().step_by(stride)
}

/// The plots panel (it keeps no state of its own: egui_plot keeps the views).
#[derive(Debug, Default)]
pub struct PlotsPanel;

impl PlotsPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &mut PanelCtx<'_>) {
        let run = ctx.run;
        if run.history.is_empty() {
            ui.label("No steps yet.");
            return;
        }
        let h = &run.history;
        let series =
            |f: &dyn Fn(&crate::train::worker::StepEvent) -> Option<f64>| -> Vec<[f64; 2]> {
                thin(h)
                    .filter_map(|s| {
                        f(s).filter(|v| v.is_finite())
                            .map(|v| [s.stats.step as f64, v])
                    })
                    .collect()
            };
        let height = ((ui.available_height() - 40.0) / 3.0).max(120.0);
        let link = egui::Id::unique("plots_x");
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.columns(2, |cols| {
                cols[0].label("Losses");
                Plot::new("losses")
                    .height(height)
                    .legend(Legend::default())
                    .link_axis(link, [true, false])
                    .show(&mut cols[0], |p| {
                        p.line(Line::new(
                            "D loss",
                            PlotPoints::from(series(&|s| Some(s.stats.d_loss))),
                        ));
                        p.line(Line::new(
                            "G loss",
                            PlotPoints::from(series(&|s| Some(s.stats.g_loss))),
                        ));
                    });
                cols[1].label("D(real) / D(fake) (mean logit or critic value)");
                Plot::new("d_out")
                    .height(height)
                    .legend(Legend::default())
                    .link_axis(link, [true, false])
                    .show(&mut cols[1], |p| {
                        p.line(Line::new(
                            "D(real)",
                            PlotPoints::from(series(&|s| Some(s.stats.d_real))),
                        ));
                        p.line(Line::new(
                            "D(fake)",
                            PlotPoints::from(series(&|s| Some(s.stats.d_fake))),
                        ));
                        p.line(Line::new(
                            "gap",
                            PlotPoints::from(series(&|s| Some(s.stats.d_real - s.stats.d_fake))),
                        ));
                    });
            });
            ui.columns(2, |cols| {
                cols[0].label("D accuracy (0.5 is ideal); the auxiliary head's label hit rate (1 is ideal)");
                Plot::new("d_acc")
                    .height(height)
                    .legend(Legend::default())
                    .include_y(0.0)
                    .include_y(1.0)
                    .link_axis(link, [true, false])
                    .show(&mut cols[0], |p| {
                        p.line(Line::new(
                            "on real",
                            PlotPoints::from(series(&|s| Some(s.stats.d_acc_real))),
                        ));
                        p.line(Line::new(
                            "on fake",
                            PlotPoints::from(series(&|s| Some(s.stats.d_acc_fake))),
                        ));
                        // An auxiliary head's top-k hit rate: how well D reads the labels.
                        let aux_real = series(&|s| s.stats.aux_acc_real);
                        if !aux_real.is_empty() {
                            p.line(Line::new("aux reads real", PlotPoints::from(aux_real)));
                            p.line(Line::new(
                                "aux reads fake",
                                PlotPoints::from(series(&|s| s.stats.aux_acc_fake)),
                            ));
                        }
                    });
                cols[1].label("Penalties and learning rates");
                Plot::new("gp")
                    .height(height)
                    .legend(Legend::default())
                    .link_axis(link, [true, false])
                    .show(&mut cols[1], |p| {
                        let gp = series(&|s| s.stats.gp);
                        if !gp.is_empty() {
                            p.line(Line::new("gradient penalty", PlotPoints::from(gp)));
                        }
                        let r1 = series(&|s| s.stats.r1);
                        if !r1.is_empty() {
                            p.line(Line::new("R1", PlotPoints::from(r1)));
                        }
                        let aux = series(&|s| s.stats.aux_d);
                        if !aux.is_empty() {
                            p.line(Line::new("aux (D)", PlotPoints::from(aux)));
                        }
                        p.line(Line::new(
                            "LR D x1000",
                            PlotPoints::from(series(&|s| Some(s.lr_d * 1e3))),
                        ));
                        p.line(Line::new(
                            "LR G x1000",
                            PlotPoints::from(series(&|s| Some(s.lr_g * 1e3))),
                        ));
                    });
            });
            ui.label("Gradient norms, log10 of the global L2 norm (a vanishing G gradient or an exploding D one shows here first)");
            Plot::new("grad_norms")
                .height(height * 0.7)
                .legend(Legend::default())
                .link_axis(link, [true, false])
                .show(ui, |p| {
                    let log = |v: f64| (v > 0.0).then(|| v.log10());
                    p.line(Line::new(
                        "D",
                        PlotPoints::from(series(&|s| log(s.stats.d_grad_norm))),
                    ));
                    p.line(Line::new(
                        "G",
                        PlotPoints::from(series(&|s| log(s.stats.g_grad_norm))),
                    ));
                });
            let fid_every = run.info.as_ref().map_or(0, |i| i.cfg.monitor.fid_every);
            if !run.fid_series.is_empty() || fid_every > 0 {
                ui.label(format!(
                    "FID (pytorch-fid's Inception pool3, every {fid_every} steps; lower is better)"
                ));
                if run.fid_series.is_empty() {
                    ui.label("No FID yet (the first one also reads the real images).");
                } else {
                    let fs = &run.fid_series;
                    Plot::new("fid")
                        .height(height * 0.7)
                        .legend(Legend::default())
                        .include_y(0.0)
                        .link_axis(link, [true, false])
                        .show(ui, |p| {
                            p.line(Line::new(
                                "FID",
                                PlotPoints::from(
                                    fs.iter()
                                        .map(|f| [f.step as f64, f.fid])
                                        .collect::<Vec<_>>(),
                                ),
                            ));
                            p.line(Line::new(
                                "KID x1000",
                                PlotPoints::from(
                                    fs.iter()
                                        .map(|f| [f.step as f64, f.kid * 1e3])
                                        .collect::<Vec<_>>(),
                                ),
                            ));
                        });
                }
            }
            ui.label("Evaluator (per diagnostics check)");
            if run.check_series.is_empty() {
                ui.label("No diagnostics checks yet (an evaluator for this data is needed).");
                return;
            }
            let cs = &run.check_series;
            let pts = |f: &dyn Fn(&super::CheckPoint) -> Option<f64>| -> Vec<[f64; 2]> {
                cs.iter()
                    .filter_map(|c| f(c).map(|v| [c.step as f64, v]))
                    .collect()
            };
            Plot::new("evaluator")
                .height(height)
                .legend(Legend::default())
                .include_y(0.0)
                .include_y(1.0)
                .link_axis(link, [true, false])
                .show(ui, |p| {
                    p.line(Line::new(
                        "accuracy",
                        PlotPoints::from(pts(&|c| c.accuracy)),
                    ));
                    p.line(Line::new(
                        "precision",
                        PlotPoints::from(pts(&|c| Some(c.precision))),
                    ));
                    p.line(Line::new(
                        "recall",
                        PlotPoints::from(pts(&|c| Some(c.recall))),
                    ));
                    p.line(Line::new(
                        "coverage",
                        PlotPoints::from(pts(&|c| Some(c.coverage))),
                    ));
                    p.line(Line::new(
                        "density",
                        PlotPoints::from(pts(&|c| Some(c.density))),
                    ));
                });
        });
    }
}
