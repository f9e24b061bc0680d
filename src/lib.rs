//! ganscope: a conditional-GAN engine (models, losses, trainer, checkpoints, data) built on
//! candle, shared by the desktop explorer and the headless CLI.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod export;
pub mod images;

pub use error::{Error, Result};
pub mod config;
pub mod diagnostics;
pub mod eval;
pub mod grad;
pub mod model;
pub mod params;
pub mod rng;
pub mod train;

/// Keep freed memory in the process for reuse instead of returning it to the OS (glibc only).
///
/// candle allocates a fresh buffer for every op; with glibc's defaults, large buffers are
/// mmapped and unmapped each time, so a training step spends about a third of its time having
/// the kernel zero new pages (measured with `perf` on the i-CLEVR SAGAN preset). The same
/// settings as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=...`,
/// applied at run time. Call once, first thing in `main`.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
