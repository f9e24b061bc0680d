//! `ganscope`: the desktop explorer (no arguments) and the headless CLI.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use ganscope::config::PRESETS;

mod cli;
use cli::*;

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
    Train(Box<TrainArgs>),
    /// Draw a captioned sample sheet from a run's newest checkpoint.
    Sample(SampleArgs),
    /// List the named presets.
    Presets,
    /// Write a run's metrics.jsonl as metrics.csv (a row per logged step) and
    /// diagnostics.csv (a row per check) and fid.csv (a row per FID) beside it.
    Metrics(MetricsArgs),
    /// Train or inspect evaluator classifiers.
    #[command(subcommand)]
    Evaluator(EvaluatorCommand),
    /// Score a run's generator with an evaluator (course top-k accuracy, domain-feature FD).
    Eval(EvalArgs),
    /// pytorch-fid's FID between two folders of PNG images (`python -m pytorch_fid A B`),
    /// with pytorch-fid's Inception weights from --fid-weights.
    Fid(FidArgs),
    /// Write a run's newest generator and discriminator as a weights-only folder (config.json,
    /// generator.safetensors, discriminator.safetensors; no optimizer state), the form in
    /// which generators ship in checkpoints/.
    Ship(ShipArgs),
    /// Import a generator trained in PyTorch, exported to ONNX, as a run folder that sample,
    /// eval and the explorer open (eval-only: it cannot be trained further here).
    Import(ImportArgs),
    /// Generate datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Time training iterations (dcgan64, cdcgan28, wgangp-critic64, iclevr-sagan), on the CPU
    /// unless --device says otherwise; or the explorer's latency (--model explore) or the CPU
    /// kernels (--model kernels).
    Bench(BenchArgs),
    /// Mutation-fuzz the file readers (IDX, CIFAR, i-CLEVR JSON, attribute lists, config and
    /// latent JSON, checkpoints, PNG): a reader may refuse an input, never panic.
    Fuzz(FuzzArgs),
}

/// Set the process environment the engine reads, once, before any thread exists (the
/// library only checks it): candle keeps gradient graphs (exact gradient penalties), runs its
/// elementwise ops on the calling thread on small machines, and `bench --threads N` gives
/// candle N threads.
fn set_up_environment(cli: &Cli) {
    let mut vars = vec![ganscope::grad::KEEP_GRAPHS_ENV];
    vars.extend(ganscope::elementwise_threads_env());
    let threads = match &cli.command {
        Some(Command::Bench(BenchArgs {
            threads: Some(t), ..
        })) => Some(t.to_string()),
        _ => None,
    };
    for (k, v) in vars {
        // SAFETY: called first thing in `main`, before any thread of this process exists
        // (argument parsing starts none), so nothing can read the environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    if let Some(t) = threads {
        // SAFETY: as above.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", t) };
    }
}

fn main() {
    let cli = Cli::parse();
    set_up_environment(&cli);
    ganscope::tune_allocator();
    // Gradient penalties need candle's gradient graphs kept: verify it before any work.
    if let Err(e) = ganscope::grad::check_exact_second_order() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        None => ganscope::app::run_native(cli.open, shipped_checkpoints())
            .map_err(|e| anyhow::anyhow!("could not open the explorer window: {e}")),
        Some(Command::Presets) => {
            for (name, desc) in PRESETS {
                println!("{name:<20} {desc}");
            }
            Ok(())
        }
        Some(Command::Train(a)) => train(*a),
        Some(Command::Sample(a)) => sample(a),
        Some(Command::Metrics(a)) => metrics(a),
        Some(Command::Evaluator(EvaluatorCommand::Train(a))) => evaluator_train(a),
        Some(Command::Evaluator(EvaluatorCommand::Score(a))) => evaluator_score(a),
        Some(Command::Eval(a)) => eval(a),
        Some(Command::Fid(a)) => fid(a),
        Some(Command::Ship(a)) => ship(a),
        Some(Command::Import(a)) => import(a),
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
                preset: a
                    .preset
                    .unwrap_or_else(|| ganscope::app::DEFAULT_PRESET.into()),
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
