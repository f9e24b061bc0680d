//! Helpers shared by the subcommands.

use std::path::Path;

use anyhow::Result;
use candle_core::Device;

/// The compute device named on the command line. `cuda` and `metal` need a binary built with
/// that cargo feature (clear error otherwise); `auto` takes the first usable accelerator the
/// binary was built for and falls back to the CPU (saying why) when none opens.
pub(crate) fn device(name: &str) -> Result<Device> {
    Ok(ganscope::device::open(name, |e| {
        eprintln!("note: {e}; trying the next device")
    })?)
}

/// `--truncation T` over the run's own setting: 0 turns truncation off, any other value is
/// checked like `sampling.truncation`. Says on stderr what sampling uses when it truncates.
pub(crate) fn set_truncation(g: &mut ganscope::model::Generator, t: Option<f64>) -> Result<()> {
    if let Some(t) = t {
        g.set_truncation((t != 0.0).then_some(t))
            .map_err(|e| anyhow::anyhow!("--truncation {t}: {e}"))?;
    }
    if let Some(t) = g.truncation() {
        eprintln!("sampling with the truncation trick: latent entries within +-{t}");
    }
    Ok(())
}

pub(crate) fn has_checkpoint(dir: &Path) -> bool {
    ganscope::checkpoint::FILES
        .iter()
        .any(|f| dir.join(f).exists() || dir.join(format!("{f}.prev")).exists())
}
