//! `ganscope ship`, and the shipped default generator embedded in the binary.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use ganscope::train::read_config;

#[derive(clap::Args)]
pub(crate) struct ShipArgs {
    /// The run folder to take the newest checkpoint from, or one of its kept steps
    /// (`RUN/kept/step_NNNNNN`, written by `train --keep-every`).
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// The new folder (refused if it holds a run's optimizer state).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Also copy the run's sample grid of the shipped step (`samples/step_NNNNNN.png`) to
    /// OUT/samples.png, replacing one there; an error, before anything is written, if the run
    /// has no grid at that step.
    #[arg(long)]
    pub(crate) sheet: bool,
    /// Measure the generator's BatchNorm statistics again before writing it ("standing
    /// statistics", BigGAN): over ROWS rows of the run's training conditions (for a
    /// sequential model, scene steps on the generator's own previous images) with fresh
    /// latents, in batches of the run's `batch_size`. The weights are unchanged. The run's
    /// sample grid does not show these statistics, so --sheet is refused with it (draw the
    /// sheet with `ganscope sample`).
    #[arg(long, value_name = "ROWS", conflicts_with = "sheet")]
    pub(crate) standing_stats: Option<usize>,
    /// With --standing-stats: the seed of its latents and draws.
    #[arg(long, default_value_t = 0, requires = "standing_stats")]
    pub(crate) standing_seed: u64,
}

/// The explorer's default generator (`checkpoints/iclevr-sequential-small`), the one-shot
/// `checkpoints/iclevr-small` (one click away in the training panel) and their 32-px evaluator,
/// compiled into the binary so that the first launch opens a trained generator wherever the
/// binary runs (about 18 MB; the library and its tests do not carry them).
pub(crate) const EMBEDDED: &[(&str, &[u8])] = &[
    (
        "iclevr-sequential-small/config.json",
        include_bytes!("../../checkpoints/iclevr-sequential-small/config.json"),
    ),
    (
        "iclevr-sequential-small/generator.safetensors",
        include_bytes!("../../checkpoints/iclevr-sequential-small/generator.safetensors"),
    ),
    (
        "iclevr-sequential-small/discriminator.safetensors",
        include_bytes!("../../checkpoints/iclevr-sequential-small/discriminator.safetensors"),
    ),
    (
        "iclevr-sequential-small/CARD.md",
        include_bytes!("../../checkpoints/iclevr-sequential-small/CARD.md"),
    ),
    (
        "iclevr-small/config.json",
        include_bytes!("../../checkpoints/iclevr-small/config.json"),
    ),
    (
        "iclevr-small/generator.safetensors",
        include_bytes!("../../checkpoints/iclevr-small/generator.safetensors"),
    ),
    (
        "iclevr-small/discriminator.safetensors",
        include_bytes!("../../checkpoints/iclevr-small/discriminator.safetensors"),
    ),
    (
        "iclevr-small/CARD.md",
        include_bytes!("../../checkpoints/iclevr-small/CARD.md"),
    ),
    (
        "evaluator-iclevr-32/evaluator.json",
        include_bytes!("../../checkpoints/evaluator-iclevr-32/evaluator.json"),
    ),
    (
        "evaluator-iclevr-32/evaluator.safetensors",
        include_bytes!("../../checkpoints/evaluator-iclevr-32/evaluator.safetensors"),
    ),
    (
        "evaluator-iclevr-32/CARD.md",
        include_bytes!("../../checkpoints/evaluator-iclevr-32/CARD.md"),
    ),
];

/// The checkpoints folder the explorer uses: one on disk that holds the default generator
/// (`./checkpoints`, beside the executable, the source tree), else the embedded copy, written
/// once into `$XDG_CACHE_HOME/ganscope` (or `~/.cache/ganscope`). If that cannot be written,
/// the explorer starts without a shipped generator and says why.
pub(crate) fn shipped_checkpoints() -> PathBuf {
    let found = ganscope::app::checkpoints_dir();
    if ganscope::app::has_shipped_default(&found) {
        return found;
    }
    match extract_embedded() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("note: the embedded default generator could not be unpacked: {e:#}");
            found
        }
    }
}

pub(crate) fn extract_embedded() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let total: usize = EMBEDDED.iter().map(|(_, b)| b.len()).sum();
    // A new build with other weights gets its own folder (the size and a checksum differ).
    let sum = EMBEDDED
        .iter()
        .flat_map(|(_, b)| b.iter())
        .fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b));
    let dir = cache.join("ganscope").join(format!(
        "shipped-{}-{total}-{sum:08x}",
        env!("CARGO_PKG_VERSION")
    ));
    for (name, bytes) in EMBEDDED {
        let path = dir.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            continue;
        }
        let parent = path.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        ganscope::checkpoint::write_atomic(&path, bytes)?;
    }
    Ok(dir)
}

pub(crate) fn ship(a: ShipArgs) -> Result<()> {
    use ganscope::checkpoint;
    let cfg = read_config(&a.run)?;
    // A kept step (`<run>/kept/step_NNNNNN`, weights only, chosen on training conditions)
    // ships as it is; its sample grid is the run's.
    let kept = checkpoint::is_weights_folder(&a.run);
    let set = if kept {
        checkpoint::load_weights(&a.run, &Device::Cpu)
    } else {
        checkpoint::load_latest(&a.run, &Device::Cpu)
    }
    .with_context(|| format!("reading the checkpoint of {}", a.run.display()))?;
    for note in &set.notes {
        eprintln!("note: {note}");
    }
    let [g, d, _] = &set.files;
    let run_root = match a.run.parent() {
        Some(k) if kept && k.file_name().is_some_and(|n| n == "kept") => {
            k.parent().unwrap_or(k).to_path_buf()
        }
        _ => a.run.clone(),
    };
    let grid = run_root
        .join("samples")
        .join(format!("step_{:06}.png", set.step));
    if a.sheet && !grid.is_file() {
        bail!(
            "--sheet: {} has no sample grid at step {} ({} does not exist; `train \
             --sample-every N` writes one every N steps); nothing was written",
            a.run.display(),
            set.step,
            grid.display()
        );
    }
    let standing = match a.standing_stats {
        Some(rows) => Some(standing_generator(&a, &cfg, &set, rows)?),
        None => None,
    };
    let g = standing.as_ref().unwrap_or(g);
    checkpoint::save_weights(&a.out, set.step, g, d)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let json = serde_json::to_vec_pretty(&cfg)?;
    checkpoint::write_atomic(&a.out.join(checkpoint::CONFIG_FILE), &json)?;
    let size: u64 = [checkpoint::GENERATOR, checkpoint::DISCRIMINATOR]
        .iter()
        .filter_map(|&r| std::fs::metadata(checkpoint::file_path(&a.out, r)).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "wrote step {} of {} to {} ({:.1} MB of weights)",
        set.step,
        a.run.display(),
        a.out.display(),
        size as f64 / 1e6
    );
    if a.sheet {
        let to = a.out.join("samples.png");
        let bytes = std::fs::read(&grid).with_context(|| format!("reading {}", grid.display()))?;
        checkpoint::write_atomic(&to, &bytes)?;
        println!("copied {} to {}", grid.display(), to.display());
    } else if grid.is_file() {
        println!(
            "the run's sample grid at this step: {} (`--sheet` copies it to samples.png)",
            grid.display()
        );
    }
    Ok(())
}

/// The generator tensors `g` (read from `path`) with standing statistics measured on the
/// run's training data (`ship --standing-stats`).
fn standing_generator(
    a: &ShipArgs,
    cfg: &ganscope::config::TrainConfig,
    set: &ganscope::checkpoint::CheckpointSet,
    rows: usize,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let (path, g) = (&set.paths[0], &set.files[0]);
    use ganscope::train::standing::{StandingOptions, standing_statistics, training_orders};
    let gen_ = ganscope::model::Generator::new(
        &cfg.model,
        ganscope::rng::Rng::new(0),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    gen_.store
        .load(path, g, true)
        .with_context(|| format!("reading {}", path.display()))?;
    // Spectral-norm vectors as sampling has them (`load_generator`), before measuring.
    ganscope::train::restore_spectral_norm(&gen_, set)?;
    let ds = ganscope::data::open(&cfg.data, cfg.model.image_size).with_context(|| {
        format!(
            "--standing-stats measures on the run's training data ({}): it cannot be opened",
            a.run.display()
        )
    })?;
    let sequential = gen_.sequential().is_some();
    let orders = training_orders(&ds, sequential)?;
    let opts = StandingOptions {
        rows,
        batch_size: cfg.batch_size,
        seed: a.standing_seed,
    };
    let t = std::time::Instant::now();
    let r = standing_statistics(&gen_, &orders, opts)
        .with_context(|| format!("standing statistics for {}", a.run.display()))?;
    println!(
        "standing statistics: {} BatchNorm layers measured again over {} {} ({} batches of {}, \
         from {} training {}; {:.1} s)",
        r.layers,
        r.rows,
        if sequential { "scene steps" } else { "images" },
        r.batches,
        cfg.batch_size,
        orders.len(),
        if sequential { "scenes" } else { "images" },
        t.elapsed().as_secs_f64()
    );
    Ok(gen_.store.model_tensors())
}
