//! ganscope: a conditional-GAN engine (models, losses, trainer, checkpoints, data) built on
//! candle, shared by the desktop explorer and the headless CLI.

// `unwrap` is for tests only (Cargo.toml's [lints] warns on it elsewhere).
#![cfg_attr(test, expect(clippy::unwrap_used, reason = "tests may unwrap"))]

pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod explore;
pub mod export;
pub mod fuzz;
pub mod images;
pub mod kernels;

pub use error::{Error, Result};
pub mod config;
pub mod diagnostics;
pub mod eval;
pub mod grad;
pub mod model;
pub mod nn;
pub mod optim;
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
/// One malloc arena for all threads (`M_ARENA_MAX` 1, as `MALLOC_ARENA_MAX=1`): with the
/// trim threshold above, every thread's arena keeps the largest working set that thread ever
/// freed, and the kernels' rayon workers free as much as the trainer's thread does. On the
/// 2-core machine (`ganscope bench --threads 2 --iters 5 --warmup 1`, 4 interleaved rounds,
/// session 21) peak RSS went from 2194-2414 to 1290-1308 MiB on the critic step and from
/// 2950-3242 to 1605-1619 MiB on the SAGAN step (batch 16), with no change in the time per
/// step beyond the noise (medians 1306 -> 1341 ms and 2130 -> 2024 ms; dcgan64 1315 -> 1203).
///
/// (The environment the engine wants is set by the binary's `main`: see
/// [`elementwise_threads_env`] and [`grad::KEEP_GRAPHS_ENV`].)
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs `f` on a worker thread of the current rayon pool (the global one when called from
/// outside any pool) and returns its result; on a worker already, runs it in place.
///
/// The engine's kernels (gemm, im2col / col2im, BatchNorm, attention, Adam) split their work
/// with rayon. Called from a thread outside the pool, each of them hands its work to the
/// pool's threads and puts the caller to sleep until they are done: two thread wake-ups per
/// kernel, hundreds per training step, and between kernels the caller's serial work (candle's
/// elementwise ops and gradient bookkeeping) shares the cores with pool threads that are still
/// spinning for more work. On a worker, a kernel forks in place and the other workers help.
/// Measured with `ganscope bench --threads 2` on the 2-core machine (see `bench/RESULTS.md`):
/// `cdcgan28` 130 -> 119 ms per iteration, `dcgan64` 1247 -> 1213 ms.
///
/// Equivalent to `f()` otherwise: no engine state lives in threads (a pass's train, frozen
/// and backward modes travel with it as [`nn::Pass`] and [`grad::GradMode`] values), so
/// nothing has to be carried to the worker.
pub fn on_pool_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        // `scope` runs its closure on a worker of the global pool and blocks until it returns.
        rayon::scope(|_| f())
    }
}

/// The `CANDLE_NUM_THREADS` value the binary's `main` sets, if any: on a machine with at most
/// 2 cores, candle's elementwise ops (its "barrier pool") run on the calling thread only,
/// unless the variable is already set. candle 0.11 splits each large elementwise op across its
/// pool and the caller then *spins* until every worker is done; when the cores are shared
/// (other processes, or the gemm/conv threads), a worker that is not scheduled turns that spin
/// into wasted time. Measured with `ganscope bench --threads 2` on a 2-core machine under load
/// (see `bench/RESULTS.md`): `iclevr-sagan` at batch 8 10.2 s -> 5.6 s per iteration,
/// `cdcgan28` 892 -> 539 ms, `wgangp-critic64` 7.1 -> 5.6 s, `dcgan64` unchanged within noise.
/// Matrix products and convolutions keep all threads (`RAYON_NUM_THREADS`). It must be set
/// before candle's first elementwise op (the pool reads the variable once). The library reads
/// the environment, never sets it.
pub fn elementwise_threads_env() -> Option<(&'static str, &'static str)> {
    let small = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 2);
    (small && std::env::var_os("CANDLE_NUM_THREADS").is_none())
        .then_some(("CANDLE_NUM_THREADS", "1"))
}
