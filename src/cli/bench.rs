//! `ganscope bench`: its flags (the benchmark itself is `ganscope::bench`).

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// One of dcgan64, cdcgan28, wgangp-critic64, iclevr-sagan (all when omitted);
    /// `explore`: the explorer's slider -> image latency (paused, then while training),
    /// `--iters` requests after `--warmup`; or `kernels`: the CPU kernels against candle's
    /// own ops, one line per case (each case's own run counts unless `--iters` / `--warmup`
    /// are given; its linear and BN + activation cases on 2 threads unless `--threads`); or
    /// `conv-layers`: every pass of every convolution of dcgan64 and cdcgan28, one line each,
    /// beside `bench/torch_bench.py --model conv-layers` (batch 64 unless `--batch`).
    #[arg(long)]
    pub(crate) model: Option<String>,
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Timed iterations [default: 10].
    #[arg(long)]
    pub(crate) iters: Option<usize>,
    /// Untimed iterations first [default: 2].
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// Worker threads (default: the machine's).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// cpu, cuda, metal or auto (cuda and metal need a binary built with that feature).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// `--model explore` only: the preset whose session and generator the slider path drives
    /// (default: the explorer's, `iclevr-sequential-small`).
    #[arg(long)]
    pub(crate) preset: Option<String>,
}
