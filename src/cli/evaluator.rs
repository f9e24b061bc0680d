//! `ganscope evaluator train | score`: the evaluator classifiers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use ganscope::data::{self, Dataset};

use super::*;

#[derive(Subcommand)]
pub(crate) enum EvaluatorCommand {
    /// Train an evaluator on a dataset and save it (with its held-out accuracy) to --out.
    Train(EvaluatorTrainArgs),
    /// Score a saved evaluator on a dataset (every image; top-k accuracy as the course counts).
    Score(EvaluatorScoreArgs),
}

#[derive(clap::Args)]
pub(crate) struct EvaluatorTrainArgs {
    /// Dataset kind: mnist, fashion-mnist, iclevr, cifar10.
    #[arg(long)]
    pub(crate) kind: String,
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub(crate) epochs: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    pub(crate) width: Option<usize>,
    /// Stride of the first convolution (default: 2 for 64-pixel images, else 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4))]
    pub(crate) stem_stride: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) limit: Option<usize>,
    /// Synthetic i-CLEVR (no --data): render this many scenes (3 images each) instead of 6003.
    #[arg(long, conflicts_with_all = ["data", "limit"], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub(crate) n_scenes: Option<usize>,
    /// Image side for formats that are resized (i-CLEVR, image folders).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..=512))]
    pub(crate) size: usize,
    /// Peak learning rate of the cosine schedule (default 1e-3).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Fine-tune: start from this saved evaluator's weights (same network: size, width, stem)
    /// with fresh Adam moments, instead of a random initialisation.
    #[arg(long, value_name = "DIR")]
    pub(crate) init: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
}

#[derive(clap::Args)]
pub(crate) struct EvaluatorScoreArgs {
    /// Evaluator folder (evaluator.json + evaluator.safetensors), or a PyTorch checkpoint of
    /// the course's i-CLEVR evaluator (`checkpoint.pth`, read as is).
    #[arg(long)]
    pub(crate) evaluator: PathBuf,
    /// Dataset kind: mnist, fashion-mnist, iclevr, cifar10.
    #[arg(long)]
    pub(crate) kind: String,
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Use only the first N images.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) limit: Option<usize>,
    /// Synthetic i-CLEVR (no --data): render this many scenes (3 images each).
    #[arg(long, conflicts_with_all = ["data", "limit"], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub(crate) n_scenes: Option<usize>,
    /// Synthetic i-CLEVR: renderer seed (training uses 0; another seed gives unseen scenes).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Score with test-time mirroring (the mean of each image's and its mirror image's label
    /// probabilities), whatever the evaluator's `tta_hflip` says.
    #[arg(long)]
    pub(crate) tta_hflip: bool,
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
}

pub(crate) fn data_kind(name: &str) -> Result<ganscope::config::DataKind> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| anyhow::anyhow!("unknown dataset kind `{name}` (mnist, fashion-mnist, iclevr, cifar10, class-folder, attributes)"))
}

pub(crate) fn evaluator_train(a: EvaluatorTrainArgs) -> Result<()> {
    use ganscope::eval::classifier::{EvaluatorConfig, train_evaluator_from};
    let dev = device(&a.device)?;
    let kind = data_kind(&a.kind)?;
    let t0 = std::time::Instant::now();
    let ds = open_eval_data(kind, a.data.as_deref(), a.limit, a.n_scenes, 0, a.size)?;
    let mut cfg = EvaluatorConfig::for_data(&ds);
    if let Some(e) = a.epochs {
        cfg.epochs = e;
    }
    if let Some(w) = a.width {
        cfg.width = w;
    }
    if a.stem_stride.is_some() {
        cfg.stem_stride = a.stem_stride;
    }
    if let Some(lr) = a.lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            bail!("--lr must be in (0, 1), not {lr}");
        }
        cfg.lr = lr;
    }
    if a.init.as_deref() == Some(a.out.as_path()) {
        bail!(
            "--init {} is also --out: fine-tuning writes to another folder",
            a.out.display()
        );
    }
    eprintln!(
        "evaluator: {} images {:?} from {} ({:.1} s), device {}, {:?}",
        ds.len(),
        ds.image_shape(),
        ds.source,
        t0.elapsed().as_secs_f64(),
        ganscope::device::name(&dev),
        cfg
    );
    let t0 = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (model, acc) =
        train_evaluator_from(&cfg, &ds, &dev, Some(&a.out), a.init.as_deref(), |p| {
            if let Some(h) = p.holdout_accuracy {
                eprintln!(
                    "epoch {} held-out top-k accuracy {:.4} ({:.0} s)",
                    p.epoch + 1,
                    h,
                    t0.elapsed().as_secs_f64()
                );
            } else if p.step % 50 == 0 && (tty || p.step % 200 == 0) {
                eprintln!(
                    "epoch {} step {}/{} loss {:.4} ({:.0} s)",
                    p.epoch + 1,
                    p.step,
                    p.steps_per_epoch,
                    p.loss,
                    t0.elapsed().as_secs_f64()
                );
            }
        })?;
    model.save(&a.out)?;
    let card = format!(
        "# Evaluator: {kind}\n\nCommand: `ganscope evaluator train --kind {kind} --out {out}{extra}`\n\n\
         Data: {n} images from `{src}`; the last {hold:.0}% held out.\n\n\
         Held-out accuracy (course top-k scoring; top-1 for class data): **{acc:.4}** ({hits}/{labels} labels).\n\n\
         Network: ResNet-18-style, width {w}, stem stride {stem}, {params} parameters; {epochs} epochs, {secs:.0} s on {dev}.\n",
        kind = a.kind,
        out = a.out.display(),
        extra = [
            a.data.as_ref().map(|d| format!(" --data {}", d.display())),
            a.epochs.map(|e| format!(" --epochs {e}")),
            a.width.map(|w| format!(" --width {w}")),
            a.stem_stride.map(|s| format!(" --stem-stride {s}")),
            a.limit.map(|l| format!(" --limit {l}")),
            a.n_scenes.map(|n| format!(" --n-scenes {n}")),
            (a.size != 64).then(|| format!(" --size {}", a.size)),
            a.lr.map(|l| format!(" --lr {l}")),
            a.init.as_ref().map(|d| format!(" --init {}", d.display())),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
        n = ds.len(),
        src = ds.source,
        hold = cfg.holdout * 100.0,
        acc = acc.accuracy(),
        hits = acc.hits,
        labels = acc.labels,
        w = cfg.width,
        stem = cfg.stem_stride(),
        dev = ganscope::device::name(&dev),
        params = model.store.num_params(),
        epochs = cfg.epochs,
        secs = t0.elapsed().as_secs_f64(),
    );
    ganscope::checkpoint::write_atomic(&a.out.join("CARD.md"), card.as_bytes())?;
    println!(
        "held-out accuracy {:.4}; saved to {}",
        acc.accuracy(),
        a.out.display()
    );
    Ok(())
}

/// A dataset for evaluator training or scoring. `n_scenes` and `seed` are for the synthetic
/// i-CLEVR default (no path) only.
pub(crate) fn open_eval_data(
    kind: ganscope::config::DataKind,
    path: Option<&Path>,
    limit: Option<usize>,
    n_scenes: Option<usize>,
    seed: u64,
    size: usize,
) -> Result<data::InMemoryDataset> {
    use ganscope::config::DataKind;
    let synthetic = kind == DataKind::Iclevr && path.is_none();
    if !synthetic && (n_scenes.is_some() || seed != 0) {
        bail!("--n-scenes and --seed are for the synthetic i-CLEVR set (--kind iclevr, no --data)");
    }
    if n_scenes == Some(0) {
        bail!("--n-scenes must be at least 1");
    }
    let dc = ganscope::config::DataConfig {
        kind,
        path: path.map(Path::to_path_buf),
        // The synthetic set renders limit / 3 scenes (rounded up), then keeps `limit` images.
        limit: n_scenes.map(|n| n * data::render::STEPS).or(limit),
        synthetic_seed: seed,
    };
    data::open(&dc, size).context("opening the dataset")
}

pub(crate) fn evaluator_score(a: EvaluatorScoreArgs) -> Result<()> {
    use ganscope::eval::classifier::{Classifier, label_ids, score_on};
    let dev = device(&a.device)?;
    let mut ev = Classifier::load(&a.evaluator, &dev)
        .with_context(|| format!("loading the evaluator from {}", a.evaluator.display()))?;
    if a.tta_hflip {
        ev.set_tta_hflip(true)
            .with_context(|| format!("--tta-hflip with {}", a.evaluator.display()))?;
    }
    let kind = data_kind(&a.kind)?;
    let t0 = std::time::Instant::now();
    let ds = open_eval_data(
        kind,
        a.data.as_deref(),
        a.limit,
        a.n_scenes,
        a.seed,
        ev.cfg.image_size,
    )?;
    let (c, h, _) = ds.image_shape();
    ev.check_fits(&a.evaluator, c, h, ds.label_names())?;
    eprintln!(
        "data: {} images {:?} from {} ({:.1} s), device {}",
        ds.len(),
        ds.image_shape(),
        ds.source,
        t0.elapsed().as_secs_f64(),
        ganscope::device::name(&dev)
    );
    let t1 = std::time::Instant::now();
    let idx: Vec<usize> = (0..ds.len()).collect();
    let acc = score_on(&ev, &ds, &idx)?;
    println!(
        "top-k accuracy {:.4} ({}/{} labels, {} images, {:.1} s)",
        acc.accuracy(),
        acc.hits,
        acc.labels,
        ds.len(),
        t1.elapsed().as_secs_f64()
    );
    // Where the misses are: per label, and (multi-label data) by the number of true labels.
    let names = ds.label_names();
    let rates: Vec<String> = (0..acc.per_label.len())
        .filter_map(|i| {
            let rate = acc.label_rate(i)?;
            let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
            Some(format!("{name} {rate:.3}"))
        })
        .collect();
    println!("  per-label hit rate: {}", rates.join(", "));
    let counts: Vec<usize> = idx.iter().map(|&i| label_ids(&ds, i).len()).collect();
    let most = counts.iter().copied().max().unwrap_or(0);
    if most > 1 {
        for n in 1..=most {
            let sub: Vec<usize> = idx.iter().copied().filter(|&i| counts[i] == n).collect();
            if sub.is_empty() {
                continue;
            }
            let a = score_on(&ev, &ds, &sub)?;
            println!(
                "  images with {n} label(s): {:.4} ({}/{} labels, {} images)",
                a.accuracy(),
                a.hits,
                a.labels,
                sub.len()
            );
        }
    }
    Ok(())
}
