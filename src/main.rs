//! `ganscope`: the desktop explorer (no arguments) and the headless CLI.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ganscope::config::{PRESETS, TrainConfig};
use ganscope::data::{self, Dataset};
use ganscope::export::sheet::save_png;
use ganscope::train::{Trainer, read_config, run};

#[derive(Parser)]
#[command(
    name = "ganscope",
    version,
    about = "Explore and train conditional GANs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Open the explorer on this run folder (config.json + checkpoint), paused.
    #[arg(long)]
    open: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a preset (or resume a run) headless.
    Train(TrainArgs),
    /// Draw a captioned sample sheet from a run's newest checkpoint.
    Sample(SampleArgs),
    /// List the named presets.
    Presets,
    /// Train or inspect evaluator classifiers.
    #[command(subcommand)]
    Evaluator(EvaluatorCommand),
    /// Score a run's generator with an evaluator (course top-k accuracy, domain-feature FD).
    Eval(EvalArgs),
    /// Write a run's newest generator and discriminator as a weights-only folder (config.json,
    /// generator.safetensors, discriminator.safetensors; no optimizer state), the form in
    /// which generators ship in checkpoints/.
    Ship(ShipArgs),
    /// Generate datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Time training iterations (dcgan64, cdcgan28, wgangp-critic64, iclevr-sagan), on the CPU
    /// unless --device says otherwise.
    Bench(BenchArgs),
    /// Mutation-fuzz the file readers (IDX, CIFAR, i-CLEVR JSON, attribute lists, config and
    /// latent JSON, checkpoints, PNG): a reader may refuse an input, never panic.
    Fuzz(FuzzArgs),
}

#[derive(clap::Args)]
struct FuzzArgs {
    /// A target name, or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Seconds per target.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save crashing inputs here.
    #[arg(long)]
    crashes: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// One of dcgan64, cdcgan28, wgangp-critic64, iclevr-sagan (all when omitted).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    batch: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Worker threads (default: the machine's).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda, metal or auto (cuda and metal need a binary built with that feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Render a synthetic i-CLEVR folder (PNGs + train.json + objects.json).
    Iclevr(IclevrArgs),
}

#[derive(clap::Args)]
struct IclevrArgs {
    #[arg(long)]
    out: PathBuf,
    /// Number of scenes; each gives three images (_0, _1, _2 with 1, 2, 3 objects).
    #[arg(long, default_value_t = data::SYNTHETIC_SCENES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    n_scenes: usize,
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..=512))]
    size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Render exactly the label sets of this train.json (e.g. the real one) instead of sampling.
    #[arg(long)]
    train_json: Option<PathBuf>,
    /// Also write a captioned contact sheet of the first 24 images (8 scenes x 3 steps).
    #[arg(long)]
    sheet: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EvaluatorCommand {
    /// Train an evaluator on a dataset and save it (with its held-out accuracy) to --out.
    Train(EvaluatorTrainArgs),
    /// Score a saved evaluator on a dataset (every image; top-k accuracy as the course counts).
    Score(EvaluatorScoreArgs),
}

#[derive(clap::Args)]
struct EvaluatorTrainArgs {
    /// Dataset kind: mnist, fashion-mnist, iclevr, cifar10.
    #[arg(long)]
    kind: String,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    epochs: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    width: Option<usize>,
    /// Stride of the first convolution (default: 2 for 64-pixel images, else 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4))]
    stem_stride: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    limit: Option<usize>,
    /// Synthetic i-CLEVR (no --data): render this many scenes (3 images each) instead of 6003.
    #[arg(long, conflicts_with_all = ["data", "limit"], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    n_scenes: Option<usize>,
    /// Image side for formats that are resized (i-CLEVR, image folders).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..=512))]
    size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct EvaluatorScoreArgs {
    /// Evaluator folder (evaluator.json + evaluator.safetensors).
    #[arg(long)]
    evaluator: PathBuf,
    /// Dataset kind: mnist, fashion-mnist, iclevr, cifar10.
    #[arg(long)]
    kind: String,
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use only the first N images.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    limit: Option<usize>,
    /// Synthetic i-CLEVR (no --data): render this many scenes (3 images each).
    #[arg(long, conflicts_with_all = ["data", "limit"], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    n_scenes: Option<usize>,
    /// Synthetic i-CLEVR: renderer seed (training uses 0; another seed gives unseen scenes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct ShipArgs {
    /// The run folder to take the newest checkpoint from.
    #[arg(long)]
    run: PathBuf,
    /// The new folder (refused if it holds a run's optimizer state).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    run: PathBuf,
    /// Condition lists (JSON, i-CLEVR test.json style); repeatable. Class models default to
    /// every class.
    #[arg(long)]
    conditions: Vec<PathBuf>,
    /// Number of noise seeds per condition list.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    seeds: u64,
    /// Class models without --conditions: images per class and seed.
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    per_class: usize,
    /// Unconditional models: images per seed whose predicted classes make the histogram.
    #[arg(long, default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_000_000))]
    n: usize,
    /// Evaluator folder (default checkpoints/evaluator-<dataset>).
    #[arg(long)]
    evaluator: Option<PathBuf>,
    /// Real images for the Fréchet distance (default: the run's dataset, if it can be opened).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Real images used for the Fréchet distance.
    #[arg(long, default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_000_000))]
    n_real: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Preset name (see `ganscope presets`); ignored with --resume.
    #[arg(long, default_value = "mnist-cdcgan")]
    preset: String,
    /// Start from a full config.json instead of a preset (flags still override it).
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Dataset path (directory or file); by default the usual places are searched.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Train until this many generator steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Wall-time budget in minutes, counted from the start of the command (data loading
    /// included): stop after the step that crosses it, with a checkpoint and a sample grid.
    #[arg(long)]
    minutes: Option<f64>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    lr_g: Option<f64>,
    #[arg(long)]
    lr_d: Option<f64>,
    #[arg(long)]
    n_critic: Option<usize>,
    /// Use only the first N images.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    limit: Option<usize>,
    /// Write a sample grid every N steps.
    #[arg(long)]
    sample_every: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Run folder (default runs/<preset>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the mode-collapse diagnostics every N steps (needs an evaluator).
    #[arg(long)]
    diagnostics_every: Option<u64>,
    /// Most of the wall time the diagnostics may take (default 0.08; 1 = check at every
    /// multiple of --diagnostics-every, however long the checks take).
    #[arg(long)]
    diagnostics_max_share: Option<f64>,
    /// Evaluator folder for the diagnostics (default checkpoints/evaluator-<dataset>).
    #[arg(long)]
    evaluator: Option<PathBuf>,
    /// Continue the run in this folder (its config.json; flags override steps, rates, intervals).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Override any config field by its dotted path, e.g. `--set loss.mode_seeking=1
    /// --set ema.decay=0.999 --set model.aux_head=true` (the value is JSON; a bare word is
    /// taken as a string). Repeatable; new runs only.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct SampleArgs {
    /// Run folder with config.json and a checkpoint.
    #[arg(long)]
    run: PathBuf,
    /// JSON list of conditions: label-name lists (i-CLEVR test.json style) or class names/ids.
    #[arg(long)]
    conditions: Option<PathBuf>,
    /// One class, by index or name.
    #[arg(long)]
    class: Option<String>,
    /// Comma-separated label names, e.g. "red cube,blue sphere".
    #[arg(long)]
    labels: Option<String>,
    /// A latent JSON copied from the explorer ("Copy latent"): draws exactly that image.
    #[arg(long)]
    latent: Option<PathBuf>,
    /// Samples per condition (columns).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Integer zoom.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    scale: u32,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    ganscope::tune_allocator();
    // Gradient penalties need candle's gradient graphs kept: set before any thread starts.
    if let Err(e) = ganscope::grad::enable_exact_second_order() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        None => ganscope::app::run_native(cli.open, shipped_checkpoints())
            .map_err(|e| anyhow::anyhow!("could not open the explorer window: {e}")),
        Some(Command::Presets) => {
            for (name, desc) in PRESETS {
                println!("{name:<20} {desc}");
            }
            Ok(())
        }
        Some(Command::Train(a)) => train(a),
        Some(Command::Sample(a)) => sample(a),
        Some(Command::Evaluator(EvaluatorCommand::Train(a))) => evaluator_train(a),
        Some(Command::Evaluator(EvaluatorCommand::Score(a))) => evaluator_score(a),
        Some(Command::Eval(a)) => eval(a),
        Some(Command::Ship(a)) => ship(a),
        Some(Command::Fuzz(a)) => fuzz(a),
        Some(Command::Data(DataCommand::Iclevr(a))) => render_iclevr(a),
        Some(Command::Bench(a)) => device(&a.device).and_then(|device| {
            ganscope::bench::run(&ganscope::bench::BenchOptions {
                model: a.model,
                batch: a.batch,
                iters: a.iters,
                warmup: a.warmup,
                threads: a.threads,
                device,
            })
            .map(|_| ())
            .map_err(Into::into)
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The compute device named on the command line. `cuda` and `metal` need a binary built with
/// that cargo feature (clear error otherwise); `auto` takes the first usable accelerator the
/// binary was built for and falls back to the CPU (saying why) when none opens.
fn device(name: &str) -> Result<Device> {
    Ok(ganscope::device::open(name, |e| {
        eprintln!("note: {e}; trying the next device")
    })?)
}

fn has_checkpoint(dir: &Path) -> bool {
    ganscope::checkpoint::FILES
        .iter()
        .any(|f| dir.join(f).exists() || dir.join(format!("{f}.prev")).exists())
}

fn train(a: TrainArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let deadline = match a.minutes {
        Some(m) if m.is_finite() && m > 0.0 => {
            Some(started + std::time::Duration::from_secs_f64(m * 60.0))
        }
        Some(m) => bail!("--minutes must be a positive number, not {m}"),
        None => None,
    };
    let dev = device(&a.device)?;
    let (mut cfg, out) = match &a.resume {
        // A shipped (weights-only) folder is not written into: training on from it goes to a
        // new run folder.
        Some(dir) if ganscope::checkpoint::is_weights_folder(dir) => {
            let Some(out) = a.out.clone() else {
                bail!(
                    "{} holds shipped weights (no optimizer state): train on from them into a new run folder with --out DIR",
                    dir.display()
                );
            };
            if has_checkpoint(&out) {
                bail!(
                    "{} already holds a checkpoint: choose another --out",
                    out.display()
                );
            }
            (read_config(dir)?, out)
        }
        Some(dir) => (read_config(dir)?, dir.clone()),
        None => {
            let cfg = match &a.config {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let cfg: TrainConfig = serde_json::from_str(&text)
                        .with_context(|| format!("parsing {}", p.display()))?;
                    cfg
                }
                None => TrainConfig::preset(&a.preset)?,
            };
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.preset));
            if has_checkpoint(&out) {
                bail!(
                    "{} already holds a checkpoint: continue it with --resume {0}, or choose another --out",
                    out.display()
                );
            }
            (cfg, out)
        }
    };
    if a.resume.is_none() {
        if let Some(s) = a.seed {
            cfg.seed = s;
        }
        if let Some(b) = a.batch {
            cfg.batch_size = b;
        }
        if let Some(n) = a.n_critic {
            cfg.loss.n_critic = n;
        }
        if let Some(l) = a.limit {
            cfg.data.limit = Some(l);
        }
        cfg = ganscope::config::apply_overrides(cfg, &a.set)?;
    } else if a.seed.is_some()
        || a.batch.is_some()
        || a.n_critic.is_some()
        || a.limit.is_some()
        || !a.set.is_empty()
    {
        bail!(
            "--seed, --batch, --n-critic, --limit and --set cannot change when resuming (exact resume)"
        );
    }
    if let Some(p) = &a.data {
        cfg.data.path = Some(p.clone());
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
    }
    if let Some(v) = a.lr_g {
        cfg.optim.lr_g = v;
    }
    if let Some(v) = a.lr_d {
        cfg.optim.lr_d = v;
    }
    if let Some(v) = a.sample_every {
        cfg.sample_every = v;
    }
    if let Some(v) = a.checkpoint_every {
        cfg.checkpoint_every = v;
    }
    if let Some(v) = a.diagnostics_every {
        cfg.monitor.every = v;
    }
    if let Some(v) = a.diagnostics_max_share {
        cfg.monitor.max_share = v;
    }
    if let Some(p) = &a.evaluator {
        cfg.monitor.evaluator = Some(p.clone());
    }
    cfg.validate()?;
    // One writer per run folder, and a folder that cannot be written is an error now, not at
    // the first save after training (and before a resume truncates its metrics).
    let lock = ganscope::checkpoint::RunLock::acquire(&out)
        .with_context(|| format!("opening the run folder {}", out.display()))?;
    let t = std::time::Instant::now();
    let ds = data::open(&cfg.data, cfg.model.image_size).context("opening the dataset")?;
    eprintln!(
        "data: {} images {:?} from {} ({:.2} s)",
        ds.len(),
        ds.image_shape(),
        ds.source,
        t.elapsed().as_secs_f64()
    );
    let ds: Arc<dyn Dataset> = Arc::new(ds);
    let trainer = match &a.resume {
        Some(dir) => {
            let tr = Trainer::resume_with(dir, cfg.clone(), ds, &dev)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            for note in &tr.load_notes {
                eprintln!("checkpoint: {note}");
            }
            if out == *dir {
                for line in ganscope::checkpoint::set_aside_rejected(dir)? {
                    eprintln!("checkpoint: {line}");
                }
                let dropped = ganscope::checkpoint::truncate_metrics_after(dir, tr.step)?;
                if dropped > 0 {
                    eprintln!("metrics.jsonl: dropped {dropped} unreadable lines");
                }
                eprintln!("resumed at step {}", tr.step);
            } else {
                eprintln!(
                    "training on from the shipped weights of {} (step {}, fresh optimizer state) into {}",
                    dir.display(),
                    tr.step,
                    out.display()
                );
            }
            tr
        }
        None => Trainer::new(cfg.clone(), ds, &dev)?,
    };
    eprintln!(
        "{}: G {} params, D {} params, device {}, out {}",
        cfg.preset,
        trainer.generator.store.num_params(),
        trainer.discriminator.store.num_params(),
        ganscope::device::name(&dev),
        out.display()
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let target = cfg.steps;
    let pb = ProgressBar::new(target);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(trainer.step);
    // Without a terminal the bar is hidden (and so is its println): log plain lines instead.
    let tty = std::io::stderr().is_terminal();
    let say = |line: String| {
        if tty {
            pb.println(line);
        } else {
            eprintln!("{line}");
        }
    };
    let mut progress = run::FnSink(|ev: &run::LoopEvent| match ev {
        run::LoopEvent::Step(p) => {
            let st = &p.stats;
            pb.set_position(st.step);
            pb.set_message(format!(
                "{:.0} img/s  D {:.3}  G {:.3}  D(x) {:+.2}  D(G(z)) {:+.2}",
                p.images_per_s, st.d_loss, st.g_loss, st.d_real, st.d_fake
            ));
            if st.step % 100 == 0 || st.step == target {
                say(format!(
                    "step {:>6}  {:.1} s  {:.0} img/s  D {:.4}  G {:.4}  D(x) {:+.3}  D(G(z)) {:+.3}{}",
                    st.step,
                    p.elapsed_s,
                    p.images_per_s,
                    st.d_loss,
                    st.g_loss,
                    st.d_real,
                    st.d_fake,
                    st.gp.map(|g| format!("  GP {g:.3}")).unwrap_or_default()
                ));
            }
        }
        run::LoopEvent::Alarm(a) => say(format!("ALARM {}", a.message)),
        run::LoopEvent::Recovered(r) => say(r.message.clone()),
        run::LoopEvent::Log(m) => say(m.clone()),
        run::LoopEvent::Check(c) => {
            let r = &c.report;
            say(format!(
                "diagnostics at step {} ({:.2} s, {:.1}% of the run so far): NDB {}/{} (real-vs-real {}), precision {:.2} recall {:.2} density {:.2} coverage {:.2} (real-vs-real coverage {:.2}){}",
                c.step,
                c.seconds,
                100.0 * c.share,
                r.ndb.n_significant,
                r.ndb.k,
                r.ndb_baseline.n_significant,
                r.prdc.precision,
                r.prdc.recall,
                r.prdc.density,
                r.prdc.coverage,
                r.prdc_baseline.coverage,
                r.class_coverage
                    .as_ref()
                    .map(|cc| format!(", modes {}/{}", cc.modes_covered, cc.modes_present))
                    .unwrap_or_default()
            ));
        }
        _ => {}
    });
    let mut folder = run::RunFolder::new(&out, &cfg).with_lock(lock);
    let opts = run::LoopOptions::for_trainer(&trainer);
    let mut lp = run::TrainLoop::new(trainer, opts).context("setting up the diagnostics")?;
    let res = lp.run_until(target, deadline, &mut [&mut folder, &mut progress]);
    pb.finish();
    let cost = lp.monitor_cost();
    let trainer = lp.trainer;
    res.with_context(|| match folder.saved_step() {
        Some(s) => format!(
            "training stopped; the last checkpoint in {} is of step {s}",
            out.display()
        ),
        None => format!(
            "training stopped; nothing was saved in {} by this run",
            out.display()
        ),
    })?;
    if cost.checks > 0 || cost.fit_seconds > 0.0 {
        eprintln!(
            "diagnostics: fit {:.1} s, {} checks {:.1} s ({:.1} s each), training {:.1} s: checks took {:.1}% of checks + training; {} due checks postponed (monitor.max_share {})",
            cost.fit_seconds,
            cost.checks,
            cost.check_seconds,
            cost.check_seconds / cost.checks.max(1) as f64,
            cost.train_seconds,
            100.0 * cost.share(),
            cost.postponed,
            cfg.monitor.max_share
        );
    }
    eprintln!("done: {} steps in {}", trainer.step, out.display());
    Ok(())
}

/// Parse one label list / class reference into a condition vector.
fn parse_condition(names: &[String], items: &[String], one_hot: bool) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; names.len()];
    for it in items {
        let it = it.trim();
        let idx = names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(it))
            .or_else(|| it.parse::<usize>().ok().filter(|&i| i < names.len()));
        match idx {
            Some(i) if v[i] > 0.5 => bail!("label `{it}` is given twice"),
            Some(i) => v[i] = 1.0,
            None => bail!("unknown label `{it}` (known: {})", names.join(", ")),
        }
    }
    // i-CLEVR (24 object labels) scenes hold 1 to 3 objects.
    if names.len() == ganscope::data::iclevr::OBJECT_NAMES.len()
        && names
            .iter()
            .zip(ganscope::data::iclevr::OBJECT_NAMES)
            .all(|(a, b)| a == b)
        && !(1..=3).contains(&items.len())
    {
        bail!(
            "an i-CLEVR condition holds 1 to 3 objects, this one {}",
            items.len()
        );
    }
    if one_hot && items.len() != 1 {
        bail!(
            "this model takes exactly one class per condition, got {}",
            items.len()
        );
    }
    Ok(v)
}

fn sample(a: SampleArgs) -> Result<()> {
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

/// A condition list file: a JSON list whose entries are label lists (i-CLEVR test.json
/// style) or single class names / ids; an empty list is an error.
fn read_condition_file(p: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list", p.display()))?;
    if list.is_empty() {
        bail!("{}: the list holds no conditions", p.display());
    }
    Ok(list
        .iter()
        .map(|item| match item {
            serde_json::Value::Array(xs) => xs.iter().map(json_label).collect(),
            x => vec![json_label(x)],
        })
        .collect())
}

fn json_label(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn data_kind(name: &str) -> Result<ganscope::config::DataKind> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| anyhow::anyhow!("unknown dataset kind `{name}` (mnist, fashion-mnist, iclevr, cifar10, class-folder, attributes)"))
}

fn evaluator_train(a: EvaluatorTrainArgs) -> Result<()> {
    use ganscope::eval::classifier::{EvaluatorConfig, train_evaluator};
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
    let (model, acc) = train_evaluator(&cfg, &ds, &dev, Some(&a.out), |p| {
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
fn open_eval_data(
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

fn evaluator_score(a: EvaluatorScoreArgs) -> Result<()> {
    use ganscope::eval::classifier::{Classifier, score_on};
    let dev = device(&a.device)?;
    let ev = Classifier::load(&a.evaluator, &dev)
        .with_context(|| format!("loading the evaluator from {}", a.evaluator.display()))?;
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
    Ok(())
}

/// The explorer's default generator (`checkpoints/iclevr-small`) and its 32-px evaluator,
/// compiled into the binary so that the first launch opens a trained generator wherever the
/// binary runs (about 15 MB; the library and its tests do not carry them).
const EMBEDDED: &[(&str, &[u8])] = &[
    (
        "iclevr-small/config.json",
        include_bytes!("../checkpoints/iclevr-small/config.json"),
    ),
    (
        "iclevr-small/generator.safetensors",
        include_bytes!("../checkpoints/iclevr-small/generator.safetensors"),
    ),
    (
        "iclevr-small/discriminator.safetensors",
        include_bytes!("../checkpoints/iclevr-small/discriminator.safetensors"),
    ),
    (
        "iclevr-small/CARD.md",
        include_bytes!("../checkpoints/iclevr-small/CARD.md"),
    ),
    (
        "evaluator-iclevr-32/evaluator.json",
        include_bytes!("../checkpoints/evaluator-iclevr-32/evaluator.json"),
    ),
    (
        "evaluator-iclevr-32/evaluator.safetensors",
        include_bytes!("../checkpoints/evaluator-iclevr-32/evaluator.safetensors"),
    ),
    (
        "evaluator-iclevr-32/CARD.md",
        include_bytes!("../checkpoints/evaluator-iclevr-32/CARD.md"),
    ),
];

/// The checkpoints folder the explorer uses: one on disk that holds the default generator
/// (`./checkpoints`, beside the executable, the source tree), else the embedded copy, written
/// once into `$XDG_CACHE_HOME/ganscope` (or `~/.cache/ganscope`). If that cannot be written,
/// the explorer starts without a shipped generator and says why.
fn shipped_checkpoints() -> PathBuf {
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

fn extract_embedded() -> Result<PathBuf> {
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

fn fuzz(a: FuzzArgs) -> Result<()> {
    use ganscope::fuzz;
    let targets: Vec<&str> = if a.target == "all" {
        fuzz::TARGETS.to_vec()
    } else {
        vec![a.target.as_str()]
    };
    let mut crashed = 0;
    for t in targets {
        let budget = fuzz::Budget::Time(std::time::Duration::from_secs(a.seconds));
        let r = fuzz::run(t, budget, a.seed, a.crashes.as_deref())?;
        println!(
            "{:<18} {:>9} execs in {:>6.1} s ({:>7.0}/s): {} accepted, {} refused, {} crashes",
            r.target,
            r.execs,
            r.seconds,
            r.execs as f64 / r.seconds.max(1e-9),
            r.accepted,
            r.refused,
            r.crashes.len()
        );
        for (msg, saved) in &r.crashes {
            let at = saved
                .as_ref()
                .map(|p| format!(" (input: {})", p.display()))
                .unwrap_or_default();
            println!("  crash: {msg}{at}");
        }
        crashed += r.crashes.len();
    }
    if crashed > 0 {
        bail!("{crashed} crashes");
    }
    Ok(())
}

fn ship(a: ShipArgs) -> Result<()> {
    use ganscope::checkpoint;
    let cfg = read_config(&a.run)?;
    let set = checkpoint::load_latest(&a.run, &Device::Cpu)
        .with_context(|| format!("reading the checkpoint of {}", a.run.display()))?;
    for note in &set.notes {
        eprintln!("note: {note}");
    }
    let [g, d, _] = &set.files;
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
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    use ganscope::eval::classifier::Classifier;
    use ganscope::eval::metrics::{frechet_distance, topk_accuracy};
    let dev = device(&a.device)?;
    let (g, cfg, step) = ganscope::train::load_generator(&a.run, &dev)?;
    println!("{} at step {step}", a.run.display());
    let m = &cfg.model;
    let ev_dir = a
        .evaluator
        .clone()
        .unwrap_or_else(|| cfg.monitor.evaluator_dir(&cfg));
    let ev = Classifier::load(&ev_dir, &dev)
        .with_context(|| format!("loading the evaluator from {}", ev_dir.display()))?;
    // An unconditional generator has no labels of its own: only the geometry must match.
    let want = if m.num_conditions == 0 {
        &ev.cfg.label_names
    } else {
        &m.label_names
    };
    ev.check_fits(&ev_dir, m.channels, m.image_size, want)?;
    let names = &m.label_names;
    let one_hot = m.condition_kind == ganscope::data::ConditionKind::OneHot;
    let mut lists: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    for p in &a.conditions {
        lists.push((p.display().to_string(), read_condition_file(p)?));
    }
    let mut gen_feats = Vec::new();
    if m.num_conditions == 0 {
        if !lists.is_empty() {
            bail!(
                "{} is unconditional: --conditions does not apply",
                a.run.display()
            );
        }
        gen_feats = eval_class_histogram(&g, &ev, a.n, a.seeds, &dev)?;
    } else if lists.is_empty() {
        if !one_hot {
            bail!("give --conditions (e.g. test.json) for a multi-label model");
        }
        if a.per_class == 0 {
            bail!("--per-class must be at least 1");
        }
        let all: Vec<Vec<String>> = (0..m.num_conditions)
            .flat_map(|i| vec![vec![i.to_string()]; a.per_class])
            .collect();
        lists.push((format!("every class x {}", a.per_class), all));
    }
    for (name, items) in &lists {
        let conds: Vec<Vec<f32>> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                parse_condition(names, it, one_hot).with_context(|| format!("{name}: entry {i}"))
            })
            .collect::<Result<_>>()?;
        let truth: Vec<Vec<u16>> = conds
            .iter()
            .map(|c| {
                c.iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.5)
                    .map(|(j, _)| j as u16)
                    .collect()
            })
            .collect();
        let mut accs = Vec::new();
        let mut per_label = vec![(0usize, 0usize); names.len()];
        for seed in 0..a.seeds {
            let imgs = g.generate(conds.len(), &conds, seed * 1_000_003)?;
            let (scores, feats) = ev.predict(&imgs.to_tensor(&dev)?)?;
            let r = topk_accuracy(&scores, &truth)?;
            accs.push(r.accuracy());
            for (acc, (n, h)) in per_label.iter_mut().zip(&r.per_label) {
                acc.0 += n;
                acc.1 += h;
            }
            gen_feats.extend(feats);
        }
        let (mean, sd) = mean_sd(&accs);
        println!(
            "{name}: top-k accuracy {mean:.4} +- {sd:.4} over {} seeds ({} labels each)",
            a.seeds,
            truth.iter().map(Vec::len).sum::<usize>()
        );
        let rates: Vec<String> = per_label
            .iter()
            .zip(names)
            .filter(|((n, _), _)| *n > 0)
            .map(|((n, h), l)| format!("{l} {:.2}", *h as f64 / *n as f64))
            .collect();
        println!("  per-label hit rate: {}", rates.join(", "));
    }
    let mut dc = cfg.data.clone();
    if let Some(p) = &a.data {
        dc.path = Some(p.clone());
    }
    match data::open(&dc, m.image_size) {
        Ok(ds) => {
            let n = a.n_real.min(ds.len());
            let mut idx: Vec<usize> = (0..ds.len()).collect();
            ganscope::rng::Rng::new(7).shuffle(&mut idx);
            let (x, _) = ds.batch(&idx[..n], &dev)?;
            let (_, real_feats) = ev.predict(&x)?;
            let fd = frechet_distance(&gen_feats, &real_feats)?;
            println!(
                "domain-feature FD (evaluator features, not FID): {fd:.3} ({} generated vs {n} real images)",
                gen_feats.len()
            );
        }
        Err(e) => println!("domain-feature FD skipped: cannot open the real data ({e})"),
    }
    Ok(())
}

/// Mean and sample standard deviation over seeds (sd 0 for a single seed).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let sd =
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt();
    (mean, sd)
}

/// An unconditional generator against a class evaluator: for each seed, the histogram of the
/// evaluator's top class over `n` images, the classes covered (at least a quarter of the
/// uniform share) and KL(histogram || uniform) in nats; mean +- sd over the seeds. Returns the
/// evaluator features of every image (for the Fréchet distance).
fn eval_class_histogram(
    g: &ganscope::model::Generator,
    ev: &ganscope::eval::classifier::Classifier,
    n: usize,
    seeds: u64,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    if n == 0 || seeds == 0 {
        bail!("--n and --seeds must be at least 1");
    }
    let names = ev.cfg.label_names.clone();
    let k = names.len();
    if k < 2 {
        bail!("the evaluator has {k} classes: no histogram to judge");
    }
    let mut feats_all = Vec::new();
    let (mut kls, mut covered) = (Vec::new(), Vec::new());
    let mut total = vec![0usize; k];
    for seed in 0..seeds {
        let mut probs = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let m = 500.min(n - i);
            let z: Vec<Vec<f32>> = (i..i + m).map(|j| g.latent(seed * 1_000_003, j)).collect();
            let imgs = g.generate_from(&z, &vec![vec![]; m])?;
            let (p, feats) = ev.predict(&imgs.to_tensor(dev)?)?;
            probs.extend(p);
            feats_all.extend(feats);
            i += m;
        }
        let s = ganscope::eval::metrics::class_spread(&probs, k)?;
        kls.push(s.kl_uniform);
        covered.push(s.covered as f64);
        for (t, h) in total.iter_mut().zip(&s.counts) {
            *t += h;
        }
    }
    let (kl, kl_sd) = mean_sd(&kls);
    let (cov, cov_sd) = mean_sd(&covered);
    println!(
        "class histogram over {n} images x {seeds} seeds: KL(histogram || uniform) {kl:.4} +- {kl_sd:.4} nats, classes covered {cov:.1} +- {cov_sd:.1} of {k}"
    );
    let all = n as f64 * seeds as f64;
    let shares: Vec<String> = total
        .iter()
        .zip(&names)
        .map(|(c, l)| format!("{l} {:.3}", *c as f64 / all))
        .collect();
    println!("  shares: {}", shares.join(", "));
    Ok(feats_all)
}

fn render_iclevr(a: IclevrArgs) -> Result<()> {
    use ganscope::data::{iclevr, render};
    let labels = match &a.train_json {
        Some(p) => Some(iclevr::read_train_labels(
            p,
            &iclevr::default_object_names(),
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let n = render::write_iclevr_folder(&a.out, a.n_scenes, a.size, a.seed, labels.as_deref())?;
    let s = t0.elapsed().as_secs_f64();
    println!(
        "wrote {n} images ({}x{}) to {} in {s:.1} s ({:.0} images/s, rendering and PNG encoding)",
        a.size,
        a.size,
        a.out.display(),
        n as f64 / s
    );
    if let Some(p) = &a.sheet {
        use ganscope::data::Dataset;
        let ds = render::synthetic_dataset(8, a.size, a.seed, labels.as_deref());
        let n = ds.len().min(24);
        let idx: Vec<usize> = (0..n).collect();
        let (x, _) = ds.batch(&idx, &Device::Cpu)?;
        let imgs = ganscope::images::Images::from_tensor(&x)?;
        // One row per scene (its three steps), captioned with the full scene's objects.
        let rows = n / 3;
        let layout = ganscope::export::sheet::SheetLayout {
            rows,
            cols: 3,
            scale: 2,
            row_captions: (0..rows)
                .map(|r| ganscope::train::run::caption(&ds.condition(r * 3 + 2), ds.label_names()))
                .collect(),
            col_captions: vec!["_0".into(), "_1".into(), "_2".into()],
            title: Some(format!("synthetic i-CLEVR, seed {}", a.seed)),
            ..Default::default()
        };
        save_png(&ganscope::export::sheet::sample_sheet(&imgs, &layout)?, p)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
