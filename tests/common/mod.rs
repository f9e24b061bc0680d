#![allow(clippy::unwrap_used, reason = "tests may unwrap")]
#![allow(
    dead_code,
    reason = "each test binary uses a different part of these helpers"
)]
//! Shared helpers for integration tests.

use ganscope::data::{ConditionKind, InMemoryDataset};
use ganscope::rng::Rng;

/// A small random dataset with the given geometry and labels drawn from `kind`.
pub fn random_dataset(
    n: usize,
    channels: usize,
    size: usize,
    k: usize,
    kind: ConditionKind,
    seed: u64,
) -> InMemoryDataset {
    let mut rng = Rng::new(seed);
    let pixels = (0..n * channels * size * size)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels = (0..n)
        .map(|_| match kind {
            ConditionKind::None => vec![],
            ConditionKind::OneHot => vec![rng.below(k) as u16],
            ConditionKind::MultiHot => {
                let m = 1 + rng.below(3);
                let mut v: Vec<u16> = (0..m).map(|_| rng.below(k) as u16).collect();
                v.sort();
                v.dedup();
                v
            }
        })
        .collect();
    InMemoryDataset {
        source: "random".into(),
        channels,
        height: size,
        width: size,
        pixels,
        kind,
        label_names: (0..k).map(|i| format!("label{i}")).collect(),
        labels,
        steps: vec![],
    }
}

/// The shared data folder (`../shared/data` beside the crate), if present.
pub fn shared_data() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    p.is_dir().then_some(p)
}
