//! Live diagnostics in the run loop: an evaluator is loaded, the real side fitted once, and
//! every `monitor.every` steps a report lands in metrics.jsonl.

mod common;

use std::sync::Arc;

use candle_core::Device;
use ganscope::config::TrainConfig;
use ganscope::data::{ConditionKind, Dataset};
use ganscope::eval::classifier::{Classifier, EvaluatorConfig};
use ganscope::train::{Trainer, run};

#[test]
fn diagnostics_reports_land_in_metrics() {
    let dev = Device::Cpu;
    let data = common::random_dataset(96, 1, 28, 10, ConditionKind::OneHot, 9);
    let tmp = tempfile::tempdir().unwrap();
    // An (untrained) evaluator is enough to exercise the plumbing.
    let ev_dir = tmp.path().join("evaluator");
    let ecfg = EvaluatorConfig {
        width: 4,
        ..EvaluatorConfig::for_data(&data)
    };
    Classifier::new(&ecfg, &dev).unwrap().save(&ev_dir).unwrap();
    let mut cfg = TrainConfig::mnist_cdcgan();
    cfg.model.g_ch = 4;
    cfg.model.d_ch = 4;
    cfg.batch_size = 16;
    cfg.sample_every = 0;
    cfg.monitor.every = 2;
    cfg.monitor.evaluator = Some(ev_dir);
    cfg.monitor.n_real = 64;
    cfg.monitor.n_generated = 40;
    cfg.monitor.diagnostics.ndb_bins = 8;
    let data: Arc<dyn Dataset> = Arc::new(data);
    let mut t = Trainer::new(cfg, data, &dev).unwrap();
    let out = tmp.path().join("run");
    let mut checks = vec![];
    run::train_until(&mut t, &out, 4, |p| {
        if let Some(c) = &p.check {
            checks.push((c.step, c.report.n_generated, c.report.ndb.k));
        }
    })
    .unwrap();
    assert_eq!(checks, vec![(2, 40, 8), (4, 40, 8)]);
    let lines = ganscope::checkpoint::read_metrics(&out).unwrap();
    let diag: Vec<_> = lines
        .iter()
        .filter(|l| l.get("diagnostics").is_some())
        .collect();
    assert_eq!(diag.len(), 2);
    let share = diag[0]["diagnostics_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");
    let r = &diag[1]["diagnostics"]["report"];
    assert!(r["prdc"]["precision"].as_f64().is_some(), "{r}");
    assert_eq!(r["class_coverage"]["num_classes"].as_u64(), Some(10));
}

#[test]
fn missing_evaluator_is_a_clear_error() {
    let dev = Device::Cpu;
    let data: Arc<dyn Dataset> = Arc::new(common::random_dataset(
        96,
        1,
        28,
        10,
        ConditionKind::OneHot,
        9,
    ));
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::mnist_cdcgan();
    cfg.model.g_ch = 4;
    cfg.model.d_ch = 4;
    cfg.batch_size = 16;
    cfg.monitor.every = 2;
    cfg.monitor.evaluator = Some(tmp.path().join("nowhere"));
    let mut t = Trainer::new(cfg, data, &dev).unwrap();
    let err = run::train_until(&mut t, &tmp.path().join("run"), 2, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nowhere") && err.contains("evaluator.json"),
        "{err}"
    );
}
