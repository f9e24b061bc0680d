//! The training loop shared by the CLI (and the explorer): steps, metrics lines, sample
//! grids and checkpoints written into a run folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;

use crate::checkpoint;
use crate::data::{ConditionKind, Dataset};
use crate::diagnostics::Alarm;
use crate::error::Result;
use crate::export::sheet::{SheetLayout, sample_sheet, save_png};
use crate::model::Generator;
use crate::train::monitor::{Check, Monitor, MonitorCost};
use crate::train::{StepStats, Trainer};

/// Caption for a condition vector: the names of its active labels.
pub fn caption(cond: &[f32], names: &[String]) -> String {
    let on: Vec<&str> = cond
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(i, _)| names.get(i).map(String::as_str).unwrap_or("?"))
        .collect();
    on.join(", ")
}

/// Rows of the sample wall: every class for one-hot data, the first distinct label sets of
/// the data for multi-hot data (at most `max_rows`), `max_rows` unlabelled rows otherwise.
pub fn wall_rows(data: &dyn Dataset, k: usize, max_rows: usize) -> Vec<(String, Vec<f32>)> {
    let names = data.label_names();
    match data.condition_kind() {
        _ if k == 0 => (0..max_rows).map(|_| (String::new(), vec![])).collect(),
        ConditionKind::OneHot => (0..k)
            .map(|i| {
                let mut v = vec![0.0; k];
                v[i] = 1.0;
                (caption(&v, names), v)
            })
            .collect(),
        _ => {
            let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
            for i in 0..data.len() {
                let v = data.condition(i);
                if !rows.iter().any(|(_, r)| *r == v) {
                    rows.push((caption(&v, names), v));
                }
                if rows.len() == max_rows {
                    break;
                }
            }
            rows
        }
    }
}

/// A captioned grid: one row per condition ([`Generator::grid`] picks the latents).
pub fn render_rows(
    generator: &Generator,
    rows: &[(String, Vec<f32>)],
    cols: usize,
    seed: u64,
    scale: u32,
) -> Result<RgbImage> {
    let conds: Vec<Vec<f32>> = rows.iter().map(|r| r.1.clone()).collect();
    let images = generator.grid(&conds, cols, seed)?;
    let captioned = rows.iter().any(|(c, _)| !c.is_empty());
    let layout = SheetLayout {
        rows: rows.len(),
        cols,
        scale,
        row_captions: if captioned {
            rows.iter().map(|r| r.0.clone()).collect()
        } else {
            vec![]
        },
        ..SheetLayout::default()
    };
    sample_sheet(&images, &layout)
}

/// Progress as seen by a caller of [`train_until`].
#[derive(Debug, Clone)]
pub struct Progress {
    pub stats: StepStats,
    pub target: u64,
    /// Real images per second seen by D over the steps of this call.
    pub images_per_s: f64,
    pub elapsed_s: f64,
    /// A file written at this step (sample grid or checkpoint), if any.
    pub wrote: Option<PathBuf>,
    /// Alarms raised at this step.
    pub alarms: Vec<Alarm>,
    /// The diagnostics check run at this step, if any.
    pub check: Option<Check>,
}

/// Noise seed of the fixed sample grid.
pub const WALL_SEED: u64 = 1234;

/// Train until `trainer.step == target`, writing into `out`: a metrics line every
/// `log_every` steps, `samples/step_NNNNNN.png` every `sample_every`, a checkpoint every
/// `checkpoint_every` and at the end. Returns where the diagnostics' time went.
pub fn train_until(
    trainer: &mut Trainer,
    out: &Path,
    target: u64,
    on_step: impl FnMut(&Progress),
) -> Result<MonitorCost> {
    train_until_deadline(trainer, out, target, None, on_step)
}

/// As [`train_until`], but also stops at the first step that ends after `deadline` (a wall
/// time budget), writing the sample grid and the checkpoint of that step.
pub fn train_until_deadline(
    trainer: &mut Trainer,
    out: &Path,
    target: u64,
    deadline: Option<Instant>,
    mut on_step: impl FnMut(&Progress),
) -> Result<MonitorCost> {
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let t0 = Instant::now();
    let start = trainer.step;
    let cfg = trainer.cfg.clone();
    let rows = wall_rows(trainer.data().as_ref(), cfg.model.num_conditions, 8);
    let images_per_step = (cfg.batch_size * cfg.loss.n_critic) as f64;
    let mut monitor = Monitor::new(&cfg, trainer.data().as_ref(), trainer.device())?;
    while trainer.step < target {
        let t_step = Instant::now();
        let stats = trainer.train_step()?;
        let s = trainer.step;
        let mut alarms = monitor.on_step(&stats, t_step.elapsed().as_secs_f64());
        let mut check = None;
        if monitor.due(s) {
            let (c, more) =
                monitor.check(s, trainer.sampling_generator(), trainer.data().as_ref())?;
            let line = serde_json::json!({ "step": s, "diagnostics": &c });
            checkpoint::append_metrics(out, &line)?;
            alarms.extend(more);
            check = Some(c);
        }
        for a in &alarms {
            let line = serde_json::json!({ "step": s, "alarm": a });
            checkpoint::append_metrics(out, &line)?;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let images_per_s = (s - start) as f64 * images_per_step / elapsed.max(1e-9);
        let mut wrote = None;
        let last = s == target || deadline.is_some_and(|d| Instant::now() >= d);
        if cfg.log_every > 0 && s.is_multiple_of(cfg.log_every) {
            let mut line =
                serde_json::to_value(&stats).map_err(|e| crate::Error::Msg(e.to_string()))?;
            line["elapsed_s"] = elapsed.into();
            line["images_per_s"] = images_per_s.into();
            checkpoint::append_metrics(out, &line)?;
        }
        if cfg.sample_every > 0 && (s.is_multiple_of(cfg.sample_every) || last) {
            let path = out.join("samples").join(format!("step_{s:06}.png"));
            save_png(
                &render_rows(trainer.sampling_generator(), &rows, 8, WALL_SEED, 2)?,
                &path,
            )?;
            wrote = Some(path);
        }
        if (cfg.checkpoint_every > 0 && s.is_multiple_of(cfg.checkpoint_every)) || last {
            trainer.save(out)?;
            wrote = Some(out.to_path_buf());
        }
        on_step(&Progress {
            stats,
            target,
            images_per_s,
            elapsed_s: elapsed,
            wrote,
            alarms,
            check,
        });
        if last {
            break;
        }
    }
    Ok(monitor.cost())
}
