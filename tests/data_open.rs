//! `data::open` reaches every loader from a run config, and the embedded default (synthetic
//! i-CLEVR) needs no files.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use ganscope::config::{DataConfig, DataKind, TrainConfig};
use ganscope::data::{self, ConditionKind, Dataset};

#[test]
fn embedded_default_renders_in_memory() {
    let cfg = DataConfig {
        kind: DataKind::Iclevr,
        limit: Some(30),
        ..DataConfig::default()
    };
    let ds = data::open(&cfg, 32).unwrap();
    assert_eq!(ds.len(), 30);
    assert_eq!(ds.image_shape(), (3, 32, 32));
    assert_eq!(ds.condition_kind(), ConditionKind::MultiHot);
    assert_eq!(ds.num_conditions(), 24);
    // Scenes come in steps of 1, 2, 3 objects.
    let counts: Vec<usize> = (0..6).map(|i| ds.labels[i].len()).collect();
    assert_eq!(counts, vec![1, 2, 3, 1, 2, 3]);
    // Same config, same pixels.
    assert_eq!(data::open(&cfg, 32).unwrap().pixels, ds.pixels);
    // And the i-CLEVR presets accept it.
    let mut t = TrainConfig::iclevr_cdcgan();
    t.data = DataConfig {
        limit: Some(96),
        ..cfg
    };
    ganscope::train::check_data(&t, &data::open(&t.data, 64).unwrap()).unwrap();
}

#[test]
fn formats_without_a_default_location_ask_for_a_path() {
    for kind in [
        DataKind::Cifar10,
        DataKind::ClassFolder,
        DataKind::Attributes,
    ] {
        let cfg = DataConfig {
            kind,
            ..DataConfig::default()
        };
        let err = data::open(&cfg, 32).unwrap_err().to_string();
        assert!(err.contains("needs a path"), "{err}");
    }
}
