//! `ganscope bench`: its flags (the benchmark itself is `ganscope::bench`).

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// One of dcgan64, cdcgan28, wgangp-critic64, iclevr-sagan (all when omitted), or
    /// `explore`: the explorer's slider -> image latency (paused, then while training),
    /// `--iters` requests after `--warmup`.
    #[arg(long)]
    pub(crate) model: Option<String>,
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    pub(crate) iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Worker threads (default: the machine's).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// cpu, cuda, metal or auto (cuda and metal need a binary built with that feature).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}
