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
