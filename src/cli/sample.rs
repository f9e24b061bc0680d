//! `ganscope sample`: a captioned sample sheet from a run's newest checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use ganscope::export::sheet::save_png;
use ganscope::train::run;

use super::*;

#[derive(clap::Args)]
pub(crate) struct SampleArgs {
    /// Run folder with config.json and a checkpoint.
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// JSON list of conditions: label-name lists (i-CLEVR test.json style) or class names/ids.
    #[arg(long)]
    pub(crate) conditions: Option<PathBuf>,
    /// One class, by index or name.
    #[arg(long)]
    pub(crate) class: Option<String>,
    /// Comma-separated label names, e.g. "red cube,blue sphere".
    #[arg(long)]
    pub(crate) labels: Option<String>,
    /// A latent JSON copied from the explorer ("Copy latent"): draws exactly that image.
    #[arg(long)]
    pub(crate) latent: Option<PathBuf>,
    /// Samples per condition (columns).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub(crate) n: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Integer zoom.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) scale: u32,
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn sample(a: SampleArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let (g, cfg, step) = ganscope::train::load_generator(&a.run, &dev)?;
    if let Some(p) = &a.latent {
        let spec = ganscope::explore::LatentSpec::read(p)?;
        spec.check(&g, &p.display().to_string())?;
        let images = g.generate_from(
            std::slice::from_ref(&spec.z),
            std::slice::from_ref(&spec.condition),
        )?;
        let layout = ganscope::export::sheet::SheetLayout::grid(1, 1).with_scale(a.scale);
        save_png(
            &ganscope::export::sheet::sample_sheet(&images, &layout)?,
            &a.out,
        )?;
        eprintln!(
            "wrote {} (the latent of {}, weights of step {step})",
            a.out.display(),
            p.display()
        );
        return Ok(());
    }
    let m = &cfg.model;
    let names = &m.label_names;
    let one_hot = m.condition_kind == ganscope::data::ConditionKind::OneHot;
    // Each condition as a list of label names (or class ids).
    let mut wanted: Vec<Vec<String>> = Vec::new();
    if let Some(p) = &a.conditions {
        wanted.extend(read_condition_file(p)?);
    }
    if let Some(c) = &a.class {
        wanted.push(vec![c.clone()]);
    }
    if let Some(l) = &a.labels {
        wanted.push(l.split(',').map(|s| s.trim().to_string()).collect());
    }
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    for (i, items) in wanted.iter().enumerate() {
        let v = parse_condition(names, items, one_hot).with_context(|| format!("condition {i}"))?;
        rows.push((ganscope::train::run::caption(&v, names), v));
    }
    if rows.is_empty() {
        if m.num_conditions == 0 {
            rows = (0..a.n).map(|_| (String::new(), vec![])).collect();
        } else if one_hot {
            for i in 0..m.num_conditions {
                let v = parse_condition(names, &[i.to_string()], true)?;
                rows.push((ganscope::train::run::caption(&v, names), v));
            }
        } else {
            bail!("give --conditions, --labels or --class for a multi-label model");
        }
    }
    let img = run::render_rows(&g, &rows, a.n, a.seed, a.scale)?;
    save_png(&img, &a.out)?;
    let what = if m.num_conditions == 0 {
        format!("{} x {} unconditional samples", rows.len(), a.n)
    } else {
        format!("{} conditions x {} samples", rows.len(), a.n)
    };
    eprintln!("wrote {} ({what}, step {step})", a.out.display());
    Ok(())
}
