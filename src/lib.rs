//! ganscope: a conditional-GAN engine (models, losses, trainer, checkpoints, data) built on
//! candle, shared by the desktop explorer and the headless CLI.

pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod explore;
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
///
/// Also limits candle's elementwise-op thread pool on small machines: see [`tune_cpu_threads`].
pub fn tune_allocator() {
    tune_cpu_threads();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// On a machine with at most 2 cores, run candle's elementwise ops (its "barrier pool") on
/// the calling thread only, unless `CANDLE_NUM_THREADS` is already set. candle 0.11 splits
/// each large elementwise op across its pool and the caller then *spins* until every worker
/// is done; when the cores are shared (other processes, or the gemm/conv threads), a worker
/// that is not scheduled turns that spin into wasted time. Measured with `ganscope bench
/// --threads 2` on a 2-core machine under load (see `bench/RESULTS.md`): `iclevr-sagan` at
/// batch 8 10.2 s -> 5.6 s per iteration, `cdcgan28` 892 -> 539 ms, `wgangp-critic64`
/// 7.1 -> 5.6 s, `dcgan64` unchanged within noise. Matrix products and convolutions keep
/// all threads (`RAYON_NUM_THREADS`). Must run before candle's first elementwise op (the pool
/// reads the variable once).
pub fn tune_cpu_threads() {
    let small = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 2);
    if small && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
