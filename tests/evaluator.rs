//! The evaluator learns a task with a known answer, round-trips through its files, and
//! rejects weights that do not fit its config.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use candle_core::Device;
use ganscope::data::{ConditionKind, Dataset, InMemoryDataset};
use ganscope::eval::classifier::{
    Classifier, EvaluatorConfig, STATE_FILE, train_evaluator, train_evaluator_from,
};
use ganscope::rng::Rng;

/// 16x16 grey images; class i = quadrant i is bright (plus noise). Multi-hot variant:
/// any non-empty subset of quadrants is bright and the labels are that subset.
fn quadrants(n: usize, multi: bool) -> InMemoryDataset {
    let mut rng = Rng::new(3);
    let s = 16;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let set: Vec<u16> = if multi {
            let m = 1 + rng.below(15);
            (0..4).filter(|q| m & (1 << q) != 0).collect()
        } else {
            vec![rng.below(4) as u16]
        };
        for y in 0..s {
            for x in 0..s {
                let q = (y / 8) * 2 + x / 8;
                let base = if set.contains(&(q as u16)) { 200 } else { 40 };
                pixels.push((base + rng.below(40)) as u8);
            }
        }
        labels.push(set);
    }
    InMemoryDataset {
        source: "quadrants".into(),
        channels: 1,
        height: s,
        width: s,
        pixels,
        kind: if multi {
            ConditionKind::MultiHot
        } else {
            ConditionKind::OneHot
        },
        label_names: (0..4).map(|q| format!("q{q}")).collect(),
        labels,
        steps: vec![],
    }
}

#[test]
fn learns_known_tasks_and_round_trips() {
    let dev = Device::Cpu;
    for multi in [false, true] {
        let data = quadrants(640, multi);
        let cfg = EvaluatorConfig {
            width: 4,
            epochs: 3,
            batch_size: 32,
            max_shift: 1,
            hflip: false,
            ..EvaluatorConfig::for_data(&data)
        };
        let (model, acc) = train_evaluator(&cfg, &data, &dev, None, |_| {}).unwrap();
        assert!(
            acc.accuracy() > 0.95,
            "multi={multi}: held-out accuracy {}",
            acc.accuracy()
        );
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        let back = Classifier::load(dir.path(), &dev).unwrap();
        let (x, _) = data.batch(&[0, 1, 2], &dev).unwrap();
        assert_eq!(model.predict(&x).unwrap(), back.predict(&x).unwrap());
        assert_eq!(back.predict(&x).unwrap().1[0].len(), model.feature_dim());
    }
}

#[test]
fn load_rejects_weights_of_another_shape() {
    let dev = Device::Cpu;
    let data = quadrants(64, false);
    let cfg = EvaluatorConfig {
        width: 4,
        ..EvaluatorConfig::for_data(&data)
    };
    let dir = tempfile::tempdir().unwrap();
    Classifier::new(&cfg, &dev)
        .unwrap()
        .save(dir.path())
        .unwrap();
    let wider = EvaluatorConfig { width: 8, ..cfg };
    std::fs::write(
        dir.path().join("evaluator.json"),
        serde_json::to_vec(&wider).unwrap(),
    )
    .unwrap();
    let err = Classifier::load(dir.path(), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("evaluator.safetensors") && err.contains("shape"),
        "{err}"
    );
    std::fs::write(dir.path().join("evaluator.json"), b"{ not json").unwrap();
    let err = Classifier::load(dir.path(), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("evaluator.json"), "{err}");
}

#[test]
fn training_resumes_exactly_after_an_interruption() {
    let dev = Device::Cpu;
    let data = quadrants(160, true);
    let cfg = EvaluatorConfig {
        width: 4,
        epochs: 3,
        batch_size: 32,
        max_shift: 1,
        ..EvaluatorConfig::for_data(&data)
    };
    // A full 3-epoch run, keeping a copy of its state file as it was after epoch 1.
    let full = tempfile::tempdir().unwrap();
    let mut snapshot = None;
    let (a, _) = train_evaluator(&cfg, &data, &dev, Some(full.path()), |p| {
        if p.holdout_accuracy.is_some() && p.epoch == 0 {
            snapshot = Some(std::fs::read(full.path().join(STATE_FILE)).unwrap());
        }
    })
    .unwrap();
    // "Crash" after epoch 1: a folder with only that state, then train again to 3 epochs.
    let resumed = tempfile::tempdir().unwrap();
    std::fs::write(resumed.path().join(STATE_FILE), snapshot.unwrap()).unwrap();
    std::fs::copy(
        full.path().join("evaluator.json"),
        resumed.path().join("evaluator.json"),
    )
    .unwrap();
    let mut epochs_run = vec![];
    let (b, _) = train_evaluator(&cfg, &data, &dev, Some(resumed.path()), |p| {
        if p.holdout_accuracy.is_some() {
            epochs_run.push(p.epoch)
        }
    })
    .unwrap();
    assert_eq!(epochs_run, vec![1, 2], "only the missing epochs run");
    let (x, _) = data.batch(&[0, 1, 2, 3], &dev).unwrap();
    assert_eq!(
        a.predict(&x).unwrap(),
        b.predict(&x).unwrap(),
        "bit-identical after resume"
    );
    // A different config in the same folder is refused rather than mixed.
    let other = EvaluatorConfig { width: 8, ..cfg };
    let err = train_evaluator(&other, &data, &dev, Some(resumed.path()), |_| {})
        .err()
        .unwrap();
    assert!(err.to_string().contains("another config"), "{err}");
}

#[test]
fn fine_tuning_starts_from_the_given_weights_and_refuses_another_network() {
    let dev = Device::Cpu;
    let data = quadrants(640, true);
    let cfg = EvaluatorConfig {
        width: 4,
        epochs: 3,
        batch_size: 32,
        max_shift: 1,
        hflip: false,
        ..EvaluatorConfig::for_data(&data)
    };
    let trained = tempfile::tempdir().unwrap();
    let (_, acc) = train_evaluator(&cfg, &data, &dev, Some(trained.path()), |_| {}).unwrap();
    assert!(acc.accuracy() > 0.95, "{}", acc.accuracy());
    // The first step's loss (before any update) of a fine-tuning run is the trained
    // network's, far below a fresh one's (multi-label BCE of an untrained net: about ln 2).
    let first_loss = |init: Option<&std::path::Path>| {
        let mut first = None;
        let tune = EvaluatorConfig {
            epochs: 1,
            lr: 1e-4,
            ..cfg.clone()
        };
        let (_, acc) = train_evaluator_from(&tune, &data, &dev, None, init, |p| {
            if p.step == 0 && p.holdout_accuracy.is_none() {
                first = Some(p.loss);
            }
        })
        .unwrap();
        (first.unwrap(), acc.accuracy())
    };
    let (fresh, _) = first_loss(None);
    let (tuned, tuned_acc) = first_loss(Some(trained.path()));
    assert!(fresh > 0.4, "fresh first loss {fresh}");
    assert!(
        tuned < 0.25 * fresh,
        "fine-tuning first loss {tuned} vs fresh {fresh}"
    );
    assert!(tuned_acc > 0.95, "fine-tuned held-out accuracy {tuned_acc}");
    // Weights of another width are refused with the folder named, before any training.
    let wider = EvaluatorConfig { width: 8, ..cfg };
    let err = train_evaluator_from(&wider, &data, &dev, None, Some(trained.path()), |_| {
        panic!("no training step with a mismatched init")
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("width 4") && err.contains(&trained.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn shipped_evaluators_load_and_old_configs_keep_their_stem() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints");
    // (folder, image side, stem stride stored in evaluator.json, stem stride used)
    for (dir, size, stored, used) in [
        ("evaluator-mnist", 28, None, 1),
        ("evaluator-fashion-mnist", 28, None, 1),
        ("evaluator-iclevr", 64, Some(1), 1),
        ("evaluator-iclevr-32", 32, Some(1), 1),
    ] {
        let c = Classifier::load(&root.join(dir), &Device::Cpu).unwrap();
        assert_eq!(c.cfg.image_size, size, "{dir}");
        assert_eq!(c.cfg.stem_stride, stored, "{dir}");
        assert_eq!(c.cfg.stem_stride(), used, "{dir}");
    }
    // A 64-pixel config saved before `stem_stride` existed keeps its stride-2 stem.
    let old: EvaluatorConfig =
        serde_json::from_str(r#"{"image_size": 64, "channels": 3, "width": 16}"#).unwrap();
    assert_eq!(old.stem_stride, None);
    assert_eq!(old.stem_stride(), 2);
}

#[test]
fn an_evaluator_judges_only_its_own_image_size() {
    // A 64-px evaluator refuses 32-px generators (it used to enlarge them and measure the
    // enlargement), and the default evaluator folder follows the run's image size.
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let names = label_names_24();
    let make = |size: usize, dir: &str| {
        let d = save_multi_hot_evaluator(tmp.path(), size, dir);
        Classifier::load(&d, &dev).unwrap()
    };
    let e64 = make(64, "evaluator-iclevr");
    let p = tmp.path().join("evaluator-iclevr");
    assert!(e64.check_fits(&p, 3, 64, &names).is_ok());
    let err = e64.check_fits(&p, 3, 32, &names).unwrap_err().to_string();
    assert!(
        err.contains("3x64x64") && err.contains("not 3x32x32"),
        "{err}"
    );
    assert!(e64.check_fits(&p, 3, 16, &names).is_err());
    assert!(e64.check_fits(&p, 1, 64, &names).is_err());
    // Default folder: evaluator-iclevr-32 for a 32-px run once it exists, else the plain one.
    let cfg32 = ganscope::config::TrainConfig::iclevr_small();
    let pick = |c: &ganscope::config::TrainConfig| {
        ganscope::train::monitor::default_evaluator_dir(tmp.path(), c)
    };
    assert_eq!(pick(&cfg32), p);
    make(32, "evaluator-iclevr-32");
    assert_eq!(pick(&cfg32), tmp.path().join("evaluator-iclevr-32"));
    let cfg64 = ganscope::config::TrainConfig::iclevr_sagan();
    assert_eq!(pick(&cfg64), p);
}

#[test]
fn mirrored_test_time_augmentation_averages_the_two_views() {
    // With tta_hflip, the probabilities are the mean of those of the image and of its mirror
    // image (built here by hand, column j <- column W-1-j); the features stay the image's.
    let dev = Device::Cpu;
    let data = quadrants(8, true);
    let cfg = EvaluatorConfig {
        width: 4,
        ..EvaluatorConfig::for_data(&data)
    };
    let plain = Classifier::new(&cfg, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    plain.save(dir.path()).unwrap();
    let mut tta = Classifier::load(dir.path(), &dev).unwrap();
    tta.set_tta_hflip(true).unwrap();
    let (x, _) = data.batch(&[0, 1, 2, 3], &dev).unwrap();
    let (b, c, h, w) = x.dims4().unwrap();
    let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let mut m = vec![0f32; flat.len()];
    for i in 0..b * c * h {
        for j in 0..w {
            m[i * w + j] = flat[i * w + (w - 1 - j)];
        }
    }
    let xm = candle_core::Tensor::from_vec(m, (b, c, h, w), &dev).unwrap();
    let (p, f) = plain.predict(&x).unwrap();
    let (pm, _) = plain.predict(&xm).unwrap();
    let (pt, ft) = tta.predict(&x).unwrap();
    assert_eq!(f, ft);
    for i in 0..b {
        for k in 0..p[i].len() {
            let want = (p[i][k] + pm[i][k]) / 2.0;
            assert!((pt[i][k] - want).abs() < 1e-6, "image {i} label {k}");
        }
        // The mirror image is another input (the quadrant images are not symmetric).
        assert!(p[i] != pm[i]);
    }
    // Saved and loaded with the flag on; evaluators saved without it read it as off.
    tta.save(dir.path()).unwrap();
    assert!(Classifier::load(dir.path(), &dev).unwrap().cfg.tta_hflip);
    let text = std::fs::read_to_string(dir.path().join("evaluator.json")).unwrap();
    assert!(text.contains("tta_hflip"));
    assert!(!serde_json::to_string(&cfg).unwrap().contains("tta_hflip"));
}

#[test]
fn the_course_evaluator_file_is_an_evaluator_of_64_px_iclevr() {
    // The committed stand-in for the course's checkpoint.pth (torchvision resnet18 layout
    // at widths 4-32; tests/fixtures/course_evaluator/make_fixture.py) goes through the same
    // `Classifier::load` as ganscope's evaluators: `eval`, `evaluator score`, the diagnostics
    // and the explorer all read it directly. Its probabilities are PyTorch's.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/course_evaluator");
    let path = dir.join("checkpoint.pth");
    let ev = Classifier::load(&path, &Device::Cpu).unwrap();
    assert!(ev.is_pytorch());
    assert_eq!(
        (ev.cfg.image_size, ev.cfg.channels, ev.feature_dim()),
        (64, 3, 32)
    );
    let names: Vec<String> = ganscope::data::iclevr::OBJECT_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    ev.check_fits(&path, 3, 64, &names).unwrap();
    let e = ev.check_fits(&path, 3, 32, &names).unwrap_err().to_string();
    assert!(e.contains("checkpoint.pth") && e.contains("64x64"), "{e}");
    let e = ev.save(tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.to_string().contains("PyTorch"), "{e}");

    // The fixture's fixed inputs (make_fixture.py's fixed_input(3)).
    let x = ganscope::eval::torch_resnet::fixture_input(3).unwrap();
    let (probs, feats) = ev.predict(&x).unwrap();
    assert_eq!(feats[0].len(), 32);
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (row, got) in want["probabilities"].as_array().unwrap().iter().zip(&probs) {
        for (a, b) in row.as_array().unwrap().iter().zip(got) {
            assert!((a.as_f64().unwrap() - *b as f64).abs() < 1e-4, "{a} vs {b}");
        }
    }

    // The CLI: `evaluator score` reads the file and scores 64-px renders with it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ganscope"))
        .args([
            "evaluator",
            "score",
            "--kind",
            "iclevr",
            "--n-scenes",
            "4",
            "--seed",
            "1",
        ])
        .arg("--evaluator")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("top-k accuracy"), "{stdout}");
}

#[test]
fn the_default_evaluator_is_looked_for_in_every_checkpoints_folder() {
    // `eval` and `train` without an evaluator take the default one of the run's data and
    // size from the first checkpoints folder that has it (the working folder's, the
    // executable's, the source tree's), so they work from any folder; when none has one the
    // error names the kind, the size and the folder names tried.
    use ganscope::train::monitor::{find_evaluator, load_evaluator};
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let roots: Vec<_> = ["a", "b", "c"].iter().map(|r| tmp.path().join(r)).collect();
    let cfg32 = ganscope::config::TrainConfig::iclevr_small();
    // None anywhere: the first root's folder (to be reported missing).
    assert_eq!(
        find_evaluator(&roots, &cfg32),
        roots[0].join("evaluator-iclevr")
    );
    let err = load_evaluator(&find_evaluator(&roots, &cfg32), &cfg32, &dev)
        .err()
        .expect("no evaluator anywhere")
        .to_string();
    assert!(
        err.contains("32x32 iclevr")
            && err.contains("evaluator-iclevr-32 and evaluator-iclevr")
            && err.contains("--evaluator"),
        "{err}"
    );
    let make = save_multi_hot_evaluator;
    // The 64-px one in the first root, the 32-px one in the second: each run gets its size.
    let e64 = make(&roots[0], 64, "evaluator-iclevr");
    let e32 = make(&roots[1], 32, "evaluator-iclevr-32");
    assert_eq!(find_evaluator(&roots, &cfg32), e32);
    let cfg64 = ganscope::config::TrainConfig::iclevr_sagan();
    assert_eq!(find_evaluator(&roots, &cfg64), e64);
    assert!(load_evaluator(&e32, &cfg32, &dev).is_ok());
    // Two roots with one: the earlier wins.
    make(&roots[2], 32, "evaluator-iclevr-32");
    assert_eq!(find_evaluator(&roots, &cfg32), e32);
}

/// 24 placeholder label names (i-CLEVR's count).
fn label_names_24() -> Vec<String> {
    (0..24).map(|i| format!("l{i}")).collect()
}

/// An untrained width-4 evaluator of 3 x `size` x `size` images with [`label_names_24`],
/// saved as `root/dir`; returns that folder.
fn save_multi_hot_evaluator(root: &std::path::Path, size: usize, dir: &str) -> std::path::PathBuf {
    let cfg = EvaluatorConfig {
        image_size: size,
        channels: 3,
        kind: ConditionKind::MultiHot,
        label_names: label_names_24(),
        width: 4,
        ..EvaluatorConfig::default()
    };
    let d = root.join(dir);
    Classifier::new(&cfg, &Device::Cpu)
        .unwrap()
        .save(&d)
        .unwrap();
    d
}
