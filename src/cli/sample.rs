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
    /// Build a scene one object at a time (sequential models, `model.arch sequential`): a
    /// label to add, repeatable, in order (e.g. --scene "red cube" --scene "blue sphere").
    /// The sheet's rows are `--n` noise seeds, its columns the floor and each step.
    #[arg(long)]
    pub(crate) scene: Vec<String>,
    /// With --scene: also an animated GIF of the first row's steps.
    #[arg(long, requires = "scene")]
    pub(crate) gif: Option<PathBuf>,
    /// Samples per condition (columns).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub(crate) n: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Truncation trick: redraw every latent entry beyond +-T (BigGAN); 0 = off. Default: the
    /// run's `sampling.truncation` (off unless its config.json sets it).
    #[arg(long, value_name = "T")]
    pub(crate) truncation: Option<f64>,
    /// Integer zoom.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) scale: u32,
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// The sample sheet (PNG).
    #[arg(long, required_unless_present = "npy")]
    pub(crate) out: Option<PathBuf>,
    /// Also (or only) the images as a NumPy float32 array in [-1, 1], N x C x H x W (N x H x W
    /// for one channel), conditions in order, `--n` samples each; with conditions, the
    /// N x K condition vectors go to FILE with `.npy` replaced by `.conditions.npy`.
    #[arg(long)]
    pub(crate) npy: Option<PathBuf>,
}

pub(crate) fn sample(a: SampleArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let (mut g, cfg, step) = ganscope::train::load_generator(&a.run, &dev)?;
    set_truncation(&mut g, a.truncation)?;
    if let Some(p) = &a.latent {
        let spec = ganscope::explore::LatentSpec::read(p)?;
        spec.check(&g, &p.display().to_string())?;
        let images = g.generate_from(
            std::slice::from_ref(&spec.z),
            std::slice::from_ref(&spec.condition),
        )?;
        if let Some(out) = &a.out {
            let layout = ganscope::export::sheet::SheetLayout::grid(1, 1).with_scale(a.scale);
            save_png(
                &ganscope::export::sheet::sample_sheet(&images, &layout)?,
                out,
            )?;
            eprintln!(
                "wrote {} (the latent of {}, weights of step {step})",
                out.display(),
                p.display()
            );
        }
        if let Some(npy) = &a.npy {
            write_npy(npy, &images, std::slice::from_ref(&spec.condition))?;
        }
        return Ok(());
    }
    if !a.scene.is_empty() {
        return sample_scene(&a, &g, step);
    }
    let m = &cfg.model;
    let names = &m.label_names;
    let one_hot = m.condition_kind == ganscope::data::ConditionKind::OneHot;
    // Each condition as a list of label names (or class ids).
    // ... with where it came from, for error messages.
    let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
    if let Some(p) = &a.conditions {
        let list = read_condition_file(p)?;
        wanted.extend(
            list.into_iter()
                .enumerate()
                .map(|(i, c)| (format!("{}: entry {i}", p.display()), c)),
        );
    }
    if let Some(c) = &a.class {
        wanted.push(("--class".into(), vec![c.clone()]));
    }
    if let Some(l) = &a.labels {
        let items = l.split(',').map(|s| s.trim().to_string()).collect();
        wanted.push(("--labels".into(), items));
    }
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    for (from, items) in &wanted {
        let v = parse_condition(names, items, one_hot).with_context(|| from.clone())?;
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
    let frame = run::WallFrame::render(&g, &rows, a.n, a.seed, 0)?;
    let what = if m.num_conditions == 0 {
        format!("{} x {} unconditional samples", rows.len(), a.n)
    } else {
        format!("{} conditions x {} samples", rows.len(), a.n)
    };
    if let Some(out) = &a.out {
        save_png(&frame.sheet(a.scale)?, out)?;
        eprintln!("wrote {} ({what}, step {step})", out.display());
    }
    if let Some(npy) = &a.npy {
        // Row-major like the sheet: condition 0's samples, then condition 1's, ...
        let conds: Vec<Vec<f32>> = rows
            .iter()
            .flat_map(|(_, c)| std::iter::repeat_n(c.clone(), a.n))
            .collect();
        write_npy(npy, &frame.images, &conds)?;
    }
    Ok(())
}

/// `images` as an N x C x H x W (N x H x W for one channel) float32 array in [-1, 1] at
/// `path`, and the conditions (N x K, when K > 0) beside it as `<stem>.conditions.npy`.
fn write_npy(
    path: &std::path::Path,
    images: &ganscope::images::Images,
    conds: &[Vec<f32>],
) -> Result<()> {
    use ganscope::export::npy::save_npy_f32;
    let im = images;
    let shape: Vec<usize> = if im.channels == 1 {
        vec![im.n, im.height, im.width]
    } else {
        vec![im.n, im.channels, im.height, im.width]
    };
    let data: Vec<f32> = im.data.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
    save_npy_f32(path, &shape, &data).with_context(|| format!("writing {}", path.display()))?;
    let k = conds.first().map_or(0, Vec::len);
    if k == 0 {
        eprintln!("wrote {} (float32 {shape:?} in [-1, 1])", path.display());
        return Ok(());
    }
    let cpath = conditions_path(path);
    let flat: Vec<f32> = conds.iter().flatten().copied().collect();
    save_npy_f32(&cpath, &[conds.len(), k], &flat)
        .with_context(|| format!("writing {}", cpath.display()))?;
    eprintln!(
        "wrote {} (float32 {shape:?} in [-1, 1]) and {} ({} x {k} conditions)",
        path.display(),
        cpath.display(),
        conds.len()
    );
    Ok(())
}

/// `x.npy` -> `x.conditions.npy` (any other name gets `.conditions.npy` appended).
fn conditions_path(path: &std::path::Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name.strip_suffix(".npy").unwrap_or(&name);
    path.with_file_name(format!("{stem}.conditions.npy"))
}

/// `sample --scene ...`: the scene built one object at a time, `--n` rows.
fn sample_scene(a: &SampleArgs, g: &ganscope::model::Generator, step: u64) -> Result<()> {
    use ganscope::export::sheet::{SheetLayout, sample_sheet};
    if g.sequential().is_none() {
        bail!(
            "--scene builds a scene one object at a time: {} is not a sequential model \
             (model.arch {:?}; train one with --preset iclevr-sequential-small)",
            a.run.display(),
            g.cfg.arch
        );
    }
    if a.npy.is_some() || a.conditions.is_some() || a.labels.is_some() || a.class.is_some() {
        bail!("--scene takes no --npy, --conditions, --labels or --class");
    }
    let names = &g.cfg.label_names;
    // Every label checked by name, no repeats, 1 to 3 objects for i-CLEVR.
    parse_condition(names, &a.scene, false).context("--scene")?;
    let order: Vec<usize> = a
        .scene
        .iter()
        .map(|l| {
            let l = l.trim();
            names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(l))
                .or_else(|| l.parse::<usize>().ok())
                .context("--scene: unknown label")
        })
        .collect::<Result<_>>()?;
    let (images, captions) = ganscope::explore::scene_strip(g, &order, a.n, a.seed)?;
    let cols = order.len() + 1;
    let mut layout = SheetLayout::grid(a.n, cols).with_scale(a.scale);
    layout.col_captions = captions;
    let Some(out) = &a.out else {
        bail!("give --out for the scene's sheet");
    };
    save_png(&sample_sheet(&images, &layout)?, out)?;
    eprintln!(
        "wrote {} ({} rows x the floor and {} steps, step {step})",
        out.display(),
        a.n,
        order.len()
    );
    if let Some(gif) = &a.gif {
        let frames = (0..cols)
            .map(|c| {
                let one = ganscope::images::Images {
                    n: 1,
                    data: images.image(c).to_vec(),
                    ..images.clone()
                };
                sample_sheet(&one, &SheetLayout::grid(1, 1).with_scale(a.scale))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        ganscope::export::gif::save_gif(&frames, 800, gif)?;
        eprintln!("wrote {} ({cols} frames)", gif.display());
    }
    Ok(())
}
