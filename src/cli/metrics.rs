//! `ganscope metrics`: a run's metrics.jsonl as CSV files beside it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub(crate) struct MetricsArgs {
    /// Run folder holding metrics.jsonl.
    #[arg(long)]
    pub(crate) run: PathBuf,
}

/// Write `metrics.csv` (a row per logged step) and, when the run had diagnostics checks,
/// `diagnostics.csv` (a row per check) into the run folder.
pub(crate) fn metrics(a: MetricsArgs) -> Result<()> {
    let lines = ganscope::checkpoint::read_metrics(&a.run)
        .with_context(|| format!("reading {}", a.run.join("metrics.jsonl").display()))?;
    if lines.is_empty() {
        bail!("{}: no metrics.jsonl lines", a.run.display());
    }
    let (steps, diag) = ganscope::export::csv::metrics_csv(&lines);
    let p = a.run.join("metrics.csv");
    ganscope::checkpoint::write_atomic(&p, steps.as_bytes())?;
    eprintln!("wrote {} ({} rows)", p.display(), steps.lines().count() - 1);
    if let Some(d) = diag {
        let p = a.run.join("diagnostics.csv");
        ganscope::checkpoint::write_atomic(&p, d.as_bytes())?;
        eprintln!("wrote {} ({} rows)", p.display(), d.lines().count() - 1);
    }
    Ok(())
}
