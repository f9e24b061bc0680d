//! Live diagnostics in the run loop: an evaluator is loaded, the real side fitted once, and
//! every `monitor.every` steps a report lands in metrics.jsonl.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use std::sync::Arc;

use candle_core::Device;
use ganscope::config::TrainConfig;
use ganscope::data::{ConditionKind, Dataset};
use ganscope::eval::classifier::{Classifier, EvaluatorConfig};
use ganscope::train::Trainer;
use ganscope::train::run::{FnSink, LoopEvent, LoopOptions, RunFolder, TrainLoop};

/// Train `t` to `target` into `out` through the one loop; `on_check` sees every check,
/// `on_step` every step's event.
fn train_until_with(
    t: Trainer,
    out: &std::path::Path,
    target: u64,
    mut on_check: impl FnMut(&ganscope::train::monitor::Check),
    mut on_step: impl FnMut(&ganscope::train::run::StepEvent),
) -> ganscope::Result<ganscope::train::monitor::MonitorCost> {
    let mut folder = RunFolder::new(out, &t.cfg);
    let opts = LoopOptions::for_trainer(&t);
    let mut lp = TrainLoop::new(t, opts)?;
    let mut watch = FnSink(|e: &LoopEvent| match e {
        LoopEvent::Check(c) => on_check(c),
        LoopEvent::Step(s) => on_step(s),
        _ => {}
    });
    lp.run_until(target, None, &mut [&mut folder, &mut watch])?;
    Ok(lp.monitor_cost())
}

fn train_until(
    t: Trainer,
    out: &std::path::Path,
    target: u64,
    on_check: impl FnMut(&ganscope::train::monitor::Check),
) -> ganscope::Result<ganscope::train::monitor::MonitorCost> {
    train_until_with(t, out, target, on_check, |_| {})
}

/// The steps of the training lines of `out/metrics.jsonl`, in file order, and every line.
fn step_lines(out: &std::path::Path) -> (Vec<u64>, Vec<serde_json::Value>) {
    let lines = ganscope::checkpoint::read_metrics(out).unwrap();
    let steps = lines
        .iter()
        .filter(|l| l.get("d_loss").is_some())
        .filter_map(|l| l["step"].as_u64())
        .collect();
    (steps, lines)
}

/// A tiny cDCGAN on random 28x28 data with an (untrained) evaluator, which is enough to
/// exercise the plumbing: diagnostics every `every` steps under `max_share`.
fn toy_trainer(tmp: &std::path::Path, every: u64, max_share: f64) -> Trainer {
    let dev = Device::Cpu;
    let data = common::random_dataset(96, 1, 28, 10, ConditionKind::OneHot, 9);
    let ev_dir = tmp.join("evaluator");
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
    cfg.checkpoint_every = 0;
    cfg.monitor.every = every;
    cfg.monitor.evaluator = Some(ev_dir);
    cfg.monitor.n_real = 64;
    cfg.monitor.n_generated = 40;
    cfg.monitor.diagnostics.ndb_bins = 8;
    cfg.monitor.max_share = max_share;
    let data: Arc<dyn Dataset> = Arc::new(data);
    Trainer::new(cfg, data, &dev).unwrap()
}

#[test]
fn diagnostics_reports_land_in_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    // No share limit: every multiple of `every` (the checks of this toy dwarf its steps).
    let mut t = toy_trainer(tmp.path(), 2, 1.0);
    t.cfg.log_every = 1;
    let out = tmp.path().join("run");
    let mut checks = vec![];
    let cost = train_until(t, &out, 4, |c| {
        checks.push((c.step, c.report.n_generated, c.report.ndb.k));
    })
    .unwrap();
    assert_eq!(checks, vec![(2, 40, 8), (4, 40, 8)]);
    let lines = ganscope::checkpoint::read_metrics(&out).unwrap();
    let diag: Vec<_> = lines
        .iter()
        .filter(|l| l.get("diagnostics").is_some())
        .collect();
    assert_eq!(diag.len(), 2);
    assert_eq!((cost.checks, cost.postponed), (2, 0));
    assert!(cost.fit_seconds > 0.0 && cost.check_seconds > 0.0 && cost.train_seconds > 0.0);
    let share = diag[1]["diagnostics"]["share"].as_f64().unwrap();
    // The run's share after its last check is the cost's.
    assert!((share - cost.share()).abs() < 1e-12, "{share} vs {cost:?}");
    assert!(share > 0.0 && share < 1.0, "{share}");
    let r = &diag[1]["diagnostics"]["report"];
    assert!(r["prdc"]["precision"].as_f64().is_some(), "{r}");
    assert_eq!(r["class_coverage"]["num_classes"].as_u64(), Some(10));

    // The same numbers as TensorBoard scalars in the run folder's event file.
    let events: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let recs = ganscope::export::tensorboard::read_events(&events[0]).unwrap();
    let scalar = |tag: &str| -> Vec<(i64, f32)> {
        recs.iter()
            .flat_map(|r| r.2.iter().filter(|s| s.0 == tag).map(move |s| (r.1, s.1)))
            .collect()
    };
    let logged: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("d_loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    let d_loss = scalar("train/d_loss");
    assert!(!logged.is_empty());
    assert_eq!(
        d_loss.iter().map(|s| s.0 as u64).collect::<Vec<_>>(),
        logged
    );
    let first = lines.iter().find(|l| l.get("d_loss").is_some()).unwrap();
    assert_eq!(d_loss[0].1, first["d_loss"].as_f64().unwrap() as f32);
    let precision = scalar("diagnostics/precision");
    assert_eq!(
        precision.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![2, 4]
    );
    let want = diag[1]["diagnostics"]["report"]["prdc"]["precision"]
        .as_f64()
        .unwrap() as f32;
    assert_eq!(precision[1].1, want);
}

#[test]
fn max_share_postpones_checks() {
    // Checks (an evaluator pass over 40 images + every measure) take far longer than this
    // toy's steps. With max_share 1e-3 a second check needs about 2 x 999 times the first
    // one's duration in training: the first due point (step 1) is checked, 2-6 postponed.
    let tmp = tempfile::tempdir().unwrap();
    let t = toy_trainer(tmp.path(), 1, 1e-3);
    let mut steps = vec![];
    let mut next = vec![];
    let cost = train_until_with(
        t,
        &tmp.path().join("run"),
        6,
        |c| steps.push(c.step),
        |s| next.push((s.stats.step, s.next_check.unwrap())),
    )
    .unwrap();
    assert_eq!(steps, vec![1]);
    assert_eq!((cost.checks, cost.postponed), (1, 5), "{cost:?}");
    // What the explorer shows as the next check: step 2 before the first check ran, then
    // far beyond this run (not "every 1 step").
    assert_eq!(next[0], (1, 2));
    for &(s, n) in &next[1..] {
        assert!(n > 6, "at step {s} the next check was expected at {n}");
    }
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
    // No such folder: the error says what was looked for.
    cfg.monitor.evaluator = Some(tmp.path().join("nowhere"));
    let t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    let err = train_until(t, &tmp.path().join("run"), 2, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nowhere") && err.contains("no evaluator for 28x28 mnist"),
        "{err}"
    );
    // A folder without evaluator.json: the error names the file.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    cfg.monitor.evaluator = Some(empty);
    let t = Trainer::new(cfg, data, &dev).unwrap();
    let err = train_until(t, &tmp.path().join("run2"), 2, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty") && err.contains("evaluator.json"),
        "{err}"
    );
}

#[test]
fn a_generator_that_ignores_z_is_flagged_for_every_label() {
    // Multi-label data (6 labels, 1-3 per image) and a cDCGAN whose first layer has its
    // noise rows zeroed: every latent of a condition gives the same image. The monitor draws
    // 4 latents per condition, so every label group holds pairs with the same condition and
    // a diversity of 0: every label that has a value is flagged. With the noise rows intact
    // the same check sees spread (the old grouping saw spread in both cases).
    use candle_core::{DType, Tensor};
    use ganscope::train::monitor::Monitor;
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let data = common::random_dataset(120, 3, 32, 6, ConditionKind::MultiHot, 3);
    let ev_dir = tmp.path().join("evaluator");
    let ecfg = EvaluatorConfig {
        width: 4,
        ..EvaluatorConfig::for_data(&data)
    };
    Classifier::new(&ecfg, &dev).unwrap().save(&ev_dir).unwrap();
    let mut cfg = TrainConfig::iclevr_small();
    cfg.model.num_conditions = 6;
    cfg.model.g_ch = 4;
    cfg.model.d_ch = 4;
    cfg.batch_size = 8;
    cfg.monitor.every = 1;
    cfg.monitor.evaluator = Some(ev_dir);
    cfg.monitor.n_real = 120;
    cfg.monitor.n_generated = 96;
    cfg.monitor.diagnostics.ndb_bins = 4;
    let data: Arc<dyn Dataset> = Arc::new(data);
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    // 40 steps bring BatchNorm's running statistics to the (tiny) scale of an untrained
    // G's activations, so that in eval mode z changes the images (at init every image is
    // close to 0 whatever z is).
    for _ in 0..40 {
        t.train_step().unwrap();
    }
    let g = t.sampling_generator();
    let mut monitor = Monitor::new(&cfg, data.as_ref(), &dev).unwrap();
    let (varied, _) = monitor.check(1, g, data.as_ref()).unwrap();
    // (The object-layer G's latent enters its shared layer network, `gen.layer`.)
    let input = if cfg.model.g_object_layers > 0 {
        "gen.layer.input.weight"
    } else {
        "gen.input.weight"
    };
    let w = g.store.get(input).unwrap();
    let z = cfg.model.z_dim;
    let rows = w.dim(0).unwrap();
    let keep = w.as_tensor().narrow(0, z, rows - z).unwrap();
    let zeros = Tensor::zeros(
        (z, w.dim(1).unwrap(), w.dim(2).unwrap(), w.dim(3).unwrap()),
        DType::F32,
        &dev,
    )
    .unwrap();
    w.set(&Tensor::cat(&[&zeros, &keep], 0).unwrap()).unwrap();
    let (frozen, _) = monitor.check(2, g, data.as_ref()).unwrap();
    let labels = |c: &ganscope::train::monitor::Check| -> Vec<_> {
        c.report
            .diversity
            .per_condition
            .iter()
            .filter(|d| d.condition.is_some() && d.ratio.is_some())
            .cloned()
            .collect()
    };
    let (f, v) = (labels(&frozen), labels(&varied));
    assert_eq!((f.len(), v.len()), (6, 6), "{f:?}");
    for (d, e) in f.iter().zip(&v) {
        assert!(d.flagged && d.ratio.unwrap() < 1e-3, "{d:?}");
        // The same check with z intact measures a spread (about 0.1 of the random real
        // images'): the zero is the frozen noise, not the measure.
        assert!(e.ratio.unwrap() > 0.02, "{e:?} vs {d:?}");
    }
}

#[test]
fn a_nan_in_a_headless_run_stops_it_and_keeps_the_last_healthy_checkpoint() {
    // The CLI's path (`TrainLoop::run_until` into a `RunFolder`): 3 healthy steps, each
    // checkpointed, then one generator weight is poisoned with NaN. Step 4 is caught within
    // the step (NaN loss or NaN weights), the snapshot of step 3 is restored, and the run
    // stops with an error that says so. Nothing of step 4 reaches the folder: it loads at
    // step 3 with finite weights, and metrics.jsonl ends with the recovery line.
    let tmp = tempfile::tempdir().unwrap();
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.log_every = 1;
    t.cfg.checkpoint_every = 1;
    t.cfg.sample_every = 2;
    let out = tmp.path().join("run");
    let mut folder = RunFolder::new(&out, &t.cfg);
    let mut opts = LoopOptions::for_trainer(&t);
    opts.snapshot_every = 1;
    let mut lp = TrainLoop::new(t, opts).unwrap();
    lp.run_until(3, None, &mut [&mut folder]).unwrap();
    assert_eq!(folder.saved_step(), Some(3));
    lp.trainer.inject_nan().unwrap().unwrap();
    let err = lp
        .run_until(6, None, &mut [&mut folder])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NaN/Inf at step 4") && err.contains("step 3") && err.contains("stopped"),
        "{err}"
    );
    assert_eq!(lp.trainer.step, 3, "the loop holds the restored state");
    assert!(lp.trainer.weights_finite().unwrap());
    let (g, _, step) = ganscope::train::load_generator(&out, &Device::Cpu).unwrap();
    assert_eq!(step, 3);
    for (name, t) in g.store.model_tensors() {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
    let lines = ganscope::checkpoint::read_metrics(&out).unwrap();
    let steps: Vec<u64> = lines.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, vec![1, 2, 3, 3], "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["recovered"]["at"].as_u64(), Some(4), "{last}");
    assert!(out.join("samples/step_000002.png").exists());
    assert!(
        out.join("samples/step_000003.png").exists(),
        "the last step's grid"
    );
    assert!(!out.join("samples/step_000004.png").exists());
}

#[test]
fn the_loop_under_halve_lr_goes_on_and_logs_the_continued_run() {
    // Same poisoning under RestoreLowerLr: the run reaches its target with both rates
    // halved, and metrics.jsonl holds each step once, in order.
    let tmp = tempfile::tempdir().unwrap();
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.log_every = 1;
    t.cfg.checkpoint_every = 0;
    t.cfg.sample_every = 0;
    let (g0, d0) = t.learning_rates();
    let out = tmp.path().join("run");
    let mut folder = RunFolder::new(&out, &t.cfg);
    let mut opts = LoopOptions::for_trainer(&t);
    opts.snapshot_every = 1;
    opts.nan_policy = ganscope::train::run::NanPolicy::RestoreLowerLr;
    let mut lp = TrainLoop::new(t, opts).unwrap();
    lp.run_until(2, None, &mut [&mut folder]).unwrap();
    lp.trainer.inject_nan().unwrap().unwrap();
    lp.run_until(5, None, &mut [&mut folder]).unwrap();
    assert_eq!(lp.trainer.step, 5);
    assert_eq!(lp.trainer.learning_rates(), (g0 * 0.5, d0 * 0.5));
    let (steps, lines) = step_lines(&out);
    assert_eq!(steps, vec![1, 2, 3, 4, 5], "{lines:?}");
    // The end of the run is checkpointed even with checkpoint_every = 0.
    let (_, _, step) = ganscope::train::load_generator(&out, &Device::Cpu).unwrap();
    assert_eq!(step, 5);
}

/// Records rollbacks, log lines and the generator weights sent right after the first rollback.
#[derive(Default)]
struct GuardWatch {
    recoveries: Vec<(u64, u64, bool, String)>,
    logs: Vec<String>,
    restored: Option<Arc<ganscope::train::run::GeneratorWeights>>,
}

impl ganscope::train::run::Sink for GuardWatch {
    fn event(&mut self, ev: &LoopEvent) -> ganscope::Result<()> {
        match ev {
            LoopEvent::Recovered(r) => {
                self.recoveries
                    .push((r.at, r.to, r.paused, r.message.clone()))
            }
            LoopEvent::Log(m) => self.logs.push(m.clone()),
            LoopEvent::Weights(w) if self.recoveries.len() == 1 && self.restored.is_none() => {
                self.restored = Some(w.clone())
            }
            _ => {}
        }
        Ok(())
    }
    fn wants_weights(&self) -> bool {
        true
    }
}

#[test]
fn when_d_wins_outright_the_guard_rolls_back_to_a_snapshot_before_the_alarm_window() {
    // The rule is made to hold at every step (pinned at >= 0% accuracy) so that the alarm's
    // timing is exact: silent during a 7-step warm-up, it fires at step 7 over the window of
    // steps 5-7. Guard snapshots every 2 steps, the newest 3 kept (2, 4, 6; the one of the
    // start, step 0, evicted); the newest at or before the window's first step minus one
    // (7 - 3 = 4) is step 4's. Each rollback halves D's rate and leaves G's; after two
    // (guard.max_rollbacks) the alarm only warns and the run reaches its target.
    let tmp = tempfile::tempdir().unwrap();
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.log_every = 1;
    t.cfg.keep_every = 1;
    let alarms = &mut t.cfg.monitor.diagnostics.alarms;
    alarms.d_acc_pinned = 0.0;
    alarms.d_acc_window = 3;
    alarms.warmup_steps = 7;
    t.cfg.guard = ganscope::config::GuardConfig {
        on_d_wins: ganscope::config::OnDWins::Rollback,
        snapshot_every: 2,
        keep: 3,
        lr_d_factor: 0.5,
        lr_g_factor: 1.0,
        max_rollbacks: 2,
    };
    t.cfg.validate().unwrap();
    let (g0, d0) = t.learning_rates();
    let out = tmp.path().join("run");
    let mut folder = RunFolder::new(&out, &t.cfg);
    let opts = LoopOptions::for_trainer(&t);
    let mut lp = TrainLoop::new(t, opts).unwrap();
    // The weights of step 4 as first trained, to compare with what a rollback restores.
    lp.run_until(4, None, &mut [&mut folder]).unwrap();
    // (Copied: the store's tensors share storage with its variables.)
    let at4: std::collections::HashMap<String, candle_core::Tensor> = lp
        .trainer
        .sampling_generator()
        .store
        .model_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect();
    let mut watch = GuardWatch::default();
    lp.run_until(9, None, &mut [&mut folder, &mut watch])
        .unwrap();
    assert_eq!(lp.trainer.step, 9);
    let got: Vec<(u64, u64, bool)> = watch.recoveries.iter().map(|r| (r.0, r.1, r.2)).collect();
    assert_eq!(
        got,
        vec![(7, 4, false), (7, 4, false)],
        "{:?}",
        watch.recoveries
    );
    assert!(
        watch.recoveries[0].3.contains("D wins outright at step 7"),
        "{:?}",
        watch.recoveries
    );
    assert!(
        watch
            .logs
            .iter()
            .any(|m| m.contains("no rollback, 2 already")),
        "{:?}",
        watch.logs
    );
    assert_eq!(lp.trainer.learning_rates(), (g0, d0 * 0.25));
    // A rollback restores the snapshot itself: the weights right after it are step 4's.
    let restored = watch
        .restored
        .expect("the wall's weights after the rollback");
    assert_eq!(restored.step, 4);
    assert_eq!(restored.params.len(), at4.len());
    for (name, t) in &at4 {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = restored.params[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    // metrics.jsonl reads as the run that went on: each step once, in order.
    let (steps, lines) = step_lines(&out);
    assert_eq!(steps, (1..=9).collect::<Vec<_>>(), "{lines:?}");
    // Kept weights of undone steps (5 and 6, twice) are set aside, not lost; kept/ holds the
    // run that went on.
    for s in 1..=9 {
        assert!(
            out.join(format!("kept/step_{s:06}/config.json")).exists(),
            "{s}"
        );
    }
    let undone = out.join("undone/at_000007");
    assert!(undone.join("step_000005/config.json").exists());
    assert!(undone.join("step_000006/config.json").exists());
}

/// The committed stand-in for pytorch-fid's weights (tests/fixtures/fid_inception).
fn fid_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fid_inception/inception.pth")
}

#[test]
fn fid_lands_in_metrics_and_tensorboard() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.monitor.fid_every = 2;
    t.cfg.monitor.fid_weights = Some(fid_fixture());
    t.cfg.monitor.fid_n_real = 8;
    t.cfg.monitor.fid_n_generated = 6;
    t.cfg.validate().unwrap();
    let out = tmp.path().join("run");
    let mut folder = RunFolder::new(&out, &t.cfg);
    let opts = LoopOptions::for_trainer(&t);
    let mut lp = TrainLoop::new(t, opts).unwrap();
    let mut seen = vec![];
    let mut watch = FnSink(|e: &LoopEvent| {
        if let LoopEvent::Fid(p) = e {
            seen.push((p.step, p.n_generated, p.n_real, p.fid));
        }
    });
    lp.run_until(4, None, &mut [&mut folder, &mut watch])
        .unwrap();
    assert_eq!(
        seen.iter().map(|s| (s.0, s.1, s.2)).collect::<Vec<_>>(),
        vec![(2, 6, 8), (4, 6, 8)]
    );
    assert!(
        seen.iter().all(|s| s.3.is_finite() && s.3 > 0.0),
        "{seen:?}"
    );
    let lines = ganscope::checkpoint::read_metrics(&out).unwrap();
    let fid: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("fid").and_then(|f| f["fid"].as_f64()))
        .collect();
    assert_eq!(fid, seen.iter().map(|s| s.3).collect::<Vec<_>>());
    let events: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect();
    let recs = ganscope::export::tensorboard::read_events(&events[0]).unwrap();
    let tb: Vec<(i64, f32)> = recs
        .iter()
        .flat_map(|r| {
            r.2.iter()
                .filter(|s| s.0 == "fid/fid")
                .map(move |s| (r.1, s.1))
        })
        .collect();
    assert_eq!(tb, vec![(2, fid[0] as f32), (4, fid[1] as f32)]);
    assert!(ganscope::export::csv::metrics_csv(&lines).fid.is_some());

    // A weights file that is not there stops the run before any step, naming the file.
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.monitor.fid_every = 2;
    t.cfg.monitor.fid_weights = Some(tmp.path().join("pt_inception-missing.pth"));
    let opts = LoopOptions::for_trainer(&t);
    let e = TrainLoop::new(t, opts).err().unwrap().to_string();
    assert!(
        e.contains("pt_inception-missing.pth") && e.contains("FID"),
        "{e}"
    );
}

/// The real images' evaluator features are kept in the feature cache: the second fit reads
/// them (and its check reports exactly what the first one's did); a damaged file, another
/// evaluator or other real images are computed afresh, and nothing else lands in the cache.
#[test]
fn real_features_come_from_the_cache_until_something_they_depend_on_changes() {
    use ganscope::train::monitor::Monitor;
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let t = toy_trainer(tmp.path(), 1, 1.0);
    let cfg = t.cfg.clone();
    let data = t.data().clone();
    let g = t.sampling_generator();
    let files = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&cache)
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let fit = |cfg: &TrainConfig, data: &dyn Dataset| {
        Monitor::with_feature_cache(cfg, data, &dev, Some(&cache)).unwrap()
    };
    // Everything a check reports but its timings.
    let report = |m: &mut Monitor| {
        let (c, _) = m.check(1, g, data.as_ref()).unwrap();
        let mut v = serde_json::to_value(&c.report).unwrap();
        v.as_object_mut().unwrap().remove("timings").unwrap();
        v.to_string()
    };

    let mut first = fit(&cfg, data.as_ref());
    assert!(!first.cost().fit_cached);
    let written = files();
    assert_eq!(written.len(), 1, "{written:?}");
    // 64 real images x the evaluator's feature width, after a 24-byte header.
    let len = std::fs::metadata(&written[0]).unwrap().len();
    assert_eq!((len - 24) % (64 * 4), 0, "{len}");

    let mut second = fit(&cfg, data.as_ref());
    assert!(second.cost().fit_cached);
    assert_eq!(report(&mut first), report(&mut second));
    // Without a cache: the same report again, nothing read.
    let mut uncached = Monitor::new(&cfg, data.as_ref(), &dev).unwrap();
    assert!(!uncached.cost().fit_cached);
    assert_eq!(report(&mut first), report(&mut uncached));

    // A damaged file is recomputed and rewritten.
    let bytes = std::fs::read(&written[0]).unwrap();
    std::fs::write(&written[0], &bytes[..bytes.len() - 3]).unwrap();
    assert!(!fit(&cfg, data.as_ref()).cost().fit_cached);
    assert_eq!(std::fs::read(&written[0]).unwrap(), bytes);
    // So is a file whose numbers are not finite (the header intact).
    let mut nan = bytes.clone();
    nan[24..28].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&written[0], &nan).unwrap();
    assert!(!fit(&cfg, data.as_ref()).cost().fit_cached);
    assert_eq!(std::fs::read(&written[0]).unwrap(), bytes);

    // Another evaluator (other weights in the same folder): a new file.
    let ev_dir = cfg.monitor.evaluator.clone().unwrap();
    let ecfg = EvaluatorConfig {
        width: 4,
        seed: 99,
        ..EvaluatorConfig::for_data(data.as_ref())
    };
    Classifier::new(&ecfg, &dev).unwrap().save(&ev_dir).unwrap();
    assert!(!fit(&cfg, data.as_ref()).cost().fit_cached);
    assert_eq!(files().len(), 2);
    assert!(fit(&cfg, data.as_ref()).cost().fit_cached);

    // Other real images (another seed picks other ones): a new file.
    let mut other = cfg.clone();
    other.seed += 1;
    assert!(!fit(&other, data.as_ref()).cost().fit_cached);
    assert_eq!(files().len(), 3);
}

#[test]
fn a_stop_request_ends_the_run_after_the_step_in_progress_with_a_checkpoint() {
    // `train`'s Ctrl-C / SIGTERM path: the flag is set while the loop runs toward a far
    // target; the loop finishes the next step and ends as at a deadline, so the folder holds
    // a checkpoint and a sample grid of that step although neither was scheduled.
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let mut t = toy_trainer(tmp.path(), 0, 1.0);
    t.cfg.checkpoint_every = 1000;
    t.cfg.sample_every = 1000;
    let out = tmp.path().join("run");
    let mut folder = RunFolder::new(&out, &t.cfg);
    let opts = LoopOptions::for_trainer(&t);
    let mut lp = TrainLoop::new(t, opts).unwrap();
    lp.stop_when(&STOP);
    lp.run_until(2, None, &mut [&mut folder]).unwrap();
    assert_eq!((lp.trainer.step, folder.saved_step()), (2, Some(2)));
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    lp.run_until(1000, None, &mut [&mut folder]).unwrap();
    assert_eq!(lp.trainer.step, 3, "one step after the request");
    assert_eq!(folder.saved_step(), Some(3));
    assert!(out.join("samples").join("step_000003.png").is_file());
}

#[test]
fn the_checks_leave_test_time_mirroring_off_unless_asked() {
    // An evaluator saved with `tta_hflip` on (as evaluator-iclevr-32 ships): `eval` follows
    // it, but a check reads each generated image once unless `monitor.tta_hflip` is set, so
    // its report is that of the same weights with mirroring off. Asked for, mirroring changes
    // the probabilities (so the label statistics); an evaluator trained without flips
    // refuses it.
    use ganscope::train::monitor::Monitor;
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let t = toy_trainer(tmp.path(), 1, 1.0);
    let data = t.data().clone();
    let g = t.sampling_generator();
    let save = |dir: &str, hflip: bool, tta: bool| -> std::path::PathBuf {
        let ecfg = EvaluatorConfig {
            width: 4,
            hflip,
            tta_hflip: tta,
            ..EvaluatorConfig::for_data(data.as_ref())
        };
        let path = tmp.path().join(dir);
        Classifier::new(&ecfg, &dev).unwrap().save(&path).unwrap();
        path
    };
    let (mirrored, plain, unflipped) = (
        save("mirrored", true, true),
        save("plain", true, false),
        save("unflipped", false, false),
    );
    assert!(Classifier::load(&mirrored, &dev).unwrap().cfg.tta_hflip);
    let report = |ev: &std::path::Path, tta: bool| -> Result<String, String> {
        let mut cfg = t.cfg.clone();
        cfg.monitor.evaluator = Some(ev.to_path_buf());
        cfg.monitor.tta_hflip = tta;
        let mut m = Monitor::new(&cfg, data.as_ref(), &dev).map_err(|e| e.to_string())?;
        let (c, _) = m.check(1, g, data.as_ref()).unwrap();
        let mut v = serde_json::to_value(&c.report).unwrap();
        v.as_object_mut().unwrap().remove("timings").unwrap();
        Ok(v.to_string())
    };
    let off = report(&plain, false).unwrap();
    assert_eq!(report(&mirrored, false).unwrap(), off);
    let on = report(&mirrored, true).unwrap();
    assert_eq!(report(&plain, true).unwrap(), on);
    assert_ne!(on, off);
    let err = report(&unflipped, true).unwrap_err();
    assert!(err.contains("tta_hflip"), "{err}");
}
