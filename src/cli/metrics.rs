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
/// `diagnostics.csv` (a row per check), when it had FID measurements `fid.csv` (a row per
/// measurement), into the run folder.
pub(crate) fn metrics(a: MetricsArgs) -> Result<()> {
    let lines = ganscope::checkpoint::read_metrics(&a.run)
        .with_context(|| format!("reading {}", a.run.join("metrics.jsonl").display()))?;
    if lines.is_empty() {
        bail!("{}: no metrics.jsonl lines", a.run.display());
    }
    let t = ganscope::export::csv::metrics_csv(&lines);
    let tables = [
        ("metrics.csv", Some(t.steps)),
        ("diagnostics.csv", t.diagnostics),
        ("fid.csv", t.fid),
    ];
    for (name, table) in tables {
        let Some(table) = table else { continue };
        let p = a.run.join(name);
        ganscope::checkpoint::write_atomic(&p, table.as_bytes())?;
        eprintln!("wrote {} ({} rows)", p.display(), table.lines().count() - 1);
    }
    Ok(())
}
