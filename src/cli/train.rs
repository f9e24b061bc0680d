//! `ganscope train`: a preset (or a resumed run) trained headless through the one training loop.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use ganscope::config::TrainConfig;
use ganscope::data::{self, Dataset};
use ganscope::train::{Trainer, read_config, run};

use super::*;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Preset name (see `ganscope presets`); ignored with --resume.
    #[arg(long, default_value = "mnist-cdcgan")]
    pub(crate) preset: String,
    /// Start from a full config.json instead of a preset (flags still override it).
    #[arg(long, conflicts_with = "resume")]
    pub(crate) config: Option<PathBuf>,
    /// Dataset path (directory or file); by default the usual places are searched.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Train until this many generator steps.
    #[arg(long)]
    pub(crate) steps: Option<u64>,
    /// Wall-time budget in minutes, counted from the start of the command (data loading
    /// included): stop after the step that crosses it, with a checkpoint and a sample grid
    /// (Ctrl-C / SIGTERM stop the same way; a second one exits at once).
    #[arg(long)]
    pub(crate) minutes: Option<f64>,
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    #[arg(long)]
    pub(crate) lr_g: Option<f64>,
    #[arg(long)]
    pub(crate) lr_d: Option<f64>,
    #[arg(long)]
    pub(crate) n_critic: Option<usize>,
    /// Use only the first N images.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) limit: Option<usize>,
    /// Write a sample grid every N steps.
    #[arg(long)]
    pub(crate) sample_every: Option<u64>,
    #[arg(long)]
    pub(crate) checkpoint_every: Option<u64>,
    /// Keep the weights of every Nth step in `<out>/kept/step_NNNNNN/` (weights-only folders
    /// for `eval --run`; 0 = off).
    #[arg(long)]
    pub(crate) keep_every: Option<u64>,
    /// When D wins outright (the "D accuracy pinned" alarm): `alarm` only, or `rollback` to the
    /// newest guard snapshot before the alarm's window with D's learning rate halved (the
    /// `guard` section of the config; may change when resuming).
    #[arg(long, value_parser = ["alarm", "rollback"])]
    pub(crate) on_d_wins: Option<String>,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// Run folder (default runs/<preset>).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Run the mode-collapse diagnostics every N steps (needs an evaluator).
    #[arg(long)]
    pub(crate) diagnostics_every: Option<u64>,
    /// Most of the wall time the diagnostics may take (default 0.08; 1 = check at every
    /// multiple of --diagnostics-every, however long the checks take).
    #[arg(long)]
    pub(crate) diagnostics_max_share: Option<f64>,
    /// Evaluator folder for the diagnostics (default checkpoints/evaluator-<dataset>).
    #[arg(long)]
    pub(crate) evaluator: Option<PathBuf>,
    /// pytorch-fid's FID every N generator steps, written to metrics.jsonl (and CSV,
    /// TensorBoard, the explorer's plots); needs --fid-weights. Costly on a CPU (see README).
    #[arg(long)]
    pub(crate) fid_every: Option<u64>,
    /// pytorch-fid's weights file, pt_inception-2015-12-05-6726825d.pth (not shipped).
    #[arg(long, value_name = "FILE")]
    pub(crate) fid_weights: Option<PathBuf>,
    /// Continue the run in this folder (its config.json; flags override steps, rates, intervals).
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// Override any config field by its dotted path, e.g. `--set loss.mode_seeking=1
    /// --set ema.decay=0.999 --set model.aux_head=true` (the value is JSON; a bare word is
    /// taken as a string). Repeatable; new runs only, or training on from shipped weights
    /// (`--resume checkpoints/NAME --out DIR`).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub(crate) set: Vec<String>,
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let deadline = match a.minutes {
        Some(m) if m.is_finite() && m > 0.0 => {
            Some(started + std::time::Duration::from_secs_f64(m * 60.0))
        }
        Some(m) => bail!("--minutes must be a positive number, not {m}"),
        None => None,
    };
    let dev = device(&a.device)?;
    // `from_weights`: training on from shipped weights starts a new run (fresh optimizer
    // state), so its recipe may change (`--set loss.mode_seeking=0`); an exact resume keeps
    // the run's.
    let (mut cfg, out, from_weights) = match &a.resume {
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
            (read_config(dir)?, out, true)
        }
        Some(dir) => (read_config(dir)?, dir.clone(), false),
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
            (cfg, out, false)
        }
    };
    if from_weights {
        cfg = ganscope::config::apply_overrides(cfg, &a.set)?;
    }
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
        || (!a.set.is_empty() && !from_weights)
    {
        bail!(
            "--seed, --batch, --n-critic, --limit and --set cannot change when resuming (exact resume); \
             --set can when training on from shipped weights into a new --out folder"
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
    if let Some(v) = a.keep_every {
        cfg.keep_every = v;
    }
    if let Some(v) = &a.on_d_wins {
        cfg.guard.on_d_wins = match v.as_str() {
            "rollback" => ganscope::config::OnDWins::Rollback,
            _ => ganscope::config::OnDWins::Alarm,
        };
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
    if let Some(v) = a.fid_every {
        cfg.monitor.fid_every = v;
    }
    if let Some(p) = &a.fid_weights {
        cfg.monitor.fid_weights = Some(p.clone());
    }
    cfg.validate()?;
    if cfg.monitor.fid_every > 0
        && let Some(p) = &cfg.monitor.fid_weights
        && !p.is_file()
    {
        bail!(
            "--fid-weights {}: no such file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth; not shipped, pytorch-fid downloads it from {})",
            p.display(),
            ganscope::eval::fid::FID_WEIGHTS_URL
        );
    }
    if cfg.model.arch == ganscope::config::Arch::Onnx {
        bail!(
            "{}: an imported PyTorch generator (arch onnx) cannot be trained here (no \
             discriminator, no trainable weights); use sample, eval or the explorer with it",
            a.resume
                .as_deref()
                .or(a.config.as_deref())
                .map_or_else(|| "this config".into(), |p| p.display().to_string())
        );
    }
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
    if trainer.step >= cfg.steps {
        bail!(
            "the run is already at step {}: --steps is the total number of generator steps to \
             train to, so give more than {0} (nothing was trained or written)",
            trainer.step
        );
    }
    eprintln!(
        "{}: G {} params, D {} params, device {}, out {}",
        cfg.preset,
        trainer.generator.store.num_params(),
        trainer.discriminator.store.num_params(),
        ganscope::device::name(&dev),
        out.display()
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // A save holds up to three checkpoint sets (previous, current, being written); a resumed
    // folder already holds two of them.
    let sets = if a.resume.as_deref() == Some(out.as_path()) {
        1
    } else {
        3
    };
    ganscope::checkpoint::check_free_space(
        &out,
        sets * trainer.checkpoint_bytes() + run::SPACE_FOR_LOGS,
    )
    .with_context(|| format!("checking the run folder {}", out.display()))?;
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
        run::LoopEvent::Fid(p) => say(format!(
            "FID at step {}: {:.3} (KID {:.5} +- {:.5}; {} generated vs {} real images, {:.1} s)",
            p.step, p.fid, p.kid, p.kid_sd, p.n_generated, p.n_real, p.seconds
        )),
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
    let mut opts = run::LoopOptions::for_trainer(&trainer);
    opts.feature_cache = ganscope::train::monitor::user_feature_cache();
    let mut lp = run::TrainLoop::new(trainer, opts).context("setting up the diagnostics")?;
    lp.stop_when(stop_requested());
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
            "diagnostics: fit {:.1} s{}, {} checks {:.1} s ({:.1} s each), training {:.1} s: checks took {:.1}% of checks + training; {} due checks postponed (monitor.max_share {})",
            cost.fit_seconds,
            if cost.fit_cached {
                " (real features from the cache)"
            } else {
                ""
            },
            cost.checks,
            cost.check_seconds,
            cost.check_seconds / cost.checks.max(1) as f64,
            cost.train_seconds,
            100.0 * cost.share(),
            cost.postponed,
            cfg.monitor.max_share
        );
    }
    if stop_requested().load(Ordering::Relaxed) {
        eprintln!(
            "stopped on request after step {}; go on with `ganscope train --resume {}`",
            trainer.step,
            out.display()
        );
    }
    eprintln!("done: {} steps in {}", trainer.step, out.display());
    Ok(())
}

/// Set by the first Ctrl-C / SIGTERM (SIGHUP too on Unix): the loop finishes the step it is in
/// and ends as at `--minutes`, with a checkpoint and a sample grid. A second one exits at once
/// (status 130) without writing anything; a checkpoint on disk is whole either way (written
/// atomically).
fn stop_requested() -> &'static AtomicBool {
    static STOP: AtomicBool = AtomicBool::new(false);
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        let set = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "\nsecond stop request: exiting now (the last checkpoint stays as it is)"
                );
                std::process::exit(130);
            }
            eprintln!(
                "\nstop requested: finishing this step, then a checkpoint and samples \
                 (once more to exit at once)"
            );
        });
        if let Err(e) = set {
            eprintln!("note: Ctrl-C will not save a checkpoint ({e})");
        }
    });
    &STOP
}
