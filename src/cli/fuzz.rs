//! `ganscope fuzz`: the readers' mutation fuzzer (`ganscope::fuzz`).

use std::path::PathBuf;

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub(crate) struct FuzzArgs {
    /// A target name, or `all`.
    #[arg(long, default_value = "all")]
    pub(crate) target: String,
    /// Seconds per target.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) seconds: u64,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Save crashing inputs here.
    #[arg(long)]
    pub(crate) crashes: Option<PathBuf>,
}

pub(crate) fn fuzz(a: FuzzArgs) -> Result<()> {
    use ganscope::fuzz;
    let targets: Vec<&str> = if a.target == "all" {
        fuzz::TARGETS.to_vec()
    } else {
        vec![a.target.as_str()]
    };
    let mut crashed = 0;
    for t in targets {
        let budget = fuzz::Budget::Time(std::time::Duration::from_secs(a.seconds));
        let r = fuzz::run(t, budget, a.seed, a.crashes.as_deref())?;
        println!(
            "{:<18} {:>9} execs in {:>6.1} s ({:>7.0}/s): {} accepted, {} refused, {} crashes",
            r.target,
            r.execs,
            r.seconds,
            r.execs as f64 / r.seconds.max(1e-9),
            r.accepted,
            r.refused,
            r.crashes.len()
        );
        for (msg, saved) in &r.crashes {
            let at = saved
                .as_ref()
                .map(|p| format!(" (input: {})", p.display()))
                .unwrap_or_default();
            println!("  crash: {msg}{at}");
        }
        crashed += r.crashes.len();
    }
    if crashed > 0 {
        bail!("{crashed} crashes");
    }
    Ok(())
}
