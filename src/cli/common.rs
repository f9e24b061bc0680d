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

pub(crate) fn has_checkpoint(dir: &Path) -> bool {
    ganscope::checkpoint::FILES
        .iter()
        .any(|f| dir.join(f).exists() || dir.join(format!("{f}.prev")).exists())
}
