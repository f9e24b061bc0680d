//! Checkpoints: exact resume (in process and in a fresh process), crash safety at the trainer
//! level, and clear errors that change nothing when a checkpoint does not fit the model.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ganscope::config::{Arch, Conditioning, DNorm, LossKind, TrainConfig};
use ganscope::data::{ConditionKind, Dataset};
use ganscope::train::Trainer;

fn tiny(mut c: TrainConfig) -> TrainConfig {
    c.model.g_ch = 4;
    c.model.d_ch = 4;
    c.model.z_dim = 8;
    c.model.cond_embed = 4;
    c.batch_size = 8;
    c.seed = 77;
    c
}

/// Configs covering BN running stats, Adam moments, SN vectors, attention, GP, R1, ACGAN.
fn configs() -> Vec<TrainConfig> {
    let mut sagan = tiny(TrainConfig::cifar10_sagan());
    sagan.model.attention = Some(8);
    sagan.loss.r1_gamma = 1.0;
    let mut wgan = tiny(TrainConfig::fmnist_cwgan_gp());
    wgan.loss.n_critic = 2;
    let mut acgan = tiny(TrainConfig::mnist_cdcgan());
    acgan.model.conditioning = Conditioning::Acgan;
    acgan.model.label_input = true;
    acgan.loss.kind = LossKind::Hinge;
    let mut clip = tiny(TrainConfig::mnist_dcgan());
    clip.loss.kind = LossKind::Wgan;
    clip.model.d_norm = DNorm::None;
    // Every technique of the default recipe at once: aux head (real images only), minibatch
    // std, conditional BN in a DCGAN G, mode seeking, DiffAugment, EMA.
    let mut recipe = tiny(TrainConfig::mnist_cdcgan());
    recipe.model.aux_head = true;
    recipe.model.minibatch_std = true;
    recipe.model.g_cond_bn = true;
    recipe.model.d_norm = DNorm::None;
    recipe.model.d_spectral_norm = true;
    recipe.loss.kind = LossKind::Hinge;
    recipe.loss.mode_seeking = 1.0;
    recipe.loss.aux_on_fakes = false;
    recipe.augment.translation = 0.125;
    recipe.augment.cutout = 0.25;
    recipe.ema.decay = 0.9;
    recipe.ema.start = 1;
    // The scene-step model (pair D, floor, encoder) on synthetic scenes.
    let mut sequential = tiny(TrainConfig::iclevr_sequential_small());
    sequential.model.z_dim = 9;
    vec![
        sequential,
        tiny(TrainConfig::mnist_cdcgan()),
        wgan,
        sagan,
        acgan,
        clip,
        recipe,
    ]
}

fn data_for(c: &TrainConfig) -> Arc<dyn Dataset> {
    let m = &c.model;
    if m.arch == Arch::Sequential {
        // 7 scenes x 3 steps: each image's previous step is in the data.
        return Arc::new(ganscope::data::render::synthetic_dataset(
            7,
            m.image_size,
            3,
            None,
        ));
    }
    let (k, kind) = match m.condition_kind {
        ConditionKind::None => (10, ConditionKind::OneHot), // unconditional model on labelled data
        kind => (m.num_conditions, kind),
    };
    Arc::new(common::random_dataset(
        20,
        m.channels,
        m.image_size,
        k,
        kind,
        5,
    ))
}

fn weights(t: &Trainer) -> HashMap<String, Vec<u32>> {
    let mut all = t.generator.store.model_tensors();
    all.extend(t.discriminator.store.model_tensors());
    all.extend(t.generator.store.state_tensors());
    all.extend(t.discriminator.store.state_tensors());
    if let Some(e) = &t.ema {
        for (k, v) in e.store.model_tensors() {
            all.insert(format!("ema.{k}"), v);
        }
    }
    all.into_iter()
        .map(|(k, v)| {
            let bits = v
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (k, bits)
        })
        .collect()
}

#[test]
fn resume_is_bit_identical_in_process() {
    let dev = Device::Cpu;
    for cfg in configs() {
        let name = format!(
            "{:?}/{:?}/{:?}",
            cfg.model.arch, cfg.model.conditioning, cfg.loss.kind
        );
        let data = data_for(&cfg);
        // 20 images, batch 8: epochs end every 2 D steps, so the resume crosses reshuffles.
        let mut straight = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
        for _ in 0..5 {
            let st = straight.train_step().unwrap();
            // Every preset's step reports both networks' gradient norms.
            for (which, n) in [("D", st.d_grad_norm), ("G", st.g_grad_norm)] {
                assert!(
                    n.is_finite() && n > 0.0,
                    "{name}: {which} gradient norm {n}"
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
        for _ in 0..3 {
            first.train_step().unwrap();
        }
        first.save(dir.path()).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(dir.path(), data.clone(), &dev).unwrap();
        assert_eq!(resumed.step, 3, "{name}");
        for _ in 0..2 {
            resumed.train_step().unwrap();
        }
        let (a, b) = (weights(&straight), weights(&resumed));
        assert_eq!(a.len(), b.len());
        for (k, v) in &a {
            assert!(v == &b[k], "{name}: {k} differs after resume");
        }
        // And training really changed the weights (a frozen model would pass trivially).
        let fresh = weights(&Trainer::new(cfg.clone(), data.clone(), &dev).unwrap());
        let changed = a.iter().filter(|(k, v)| fresh[*k] != **v).count();
        assert!(
            changed * 2 > a.len(),
            "{name}: only {changed}/{} tensors changed",
            a.len()
        );
    }
}

fn safetensors_bits(path: &Path) -> HashMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(_, t): &(String, Tensor)| t.dtype() == candle_core::DType::F32)
        .map(|(k, t)| {
            (
                k,
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn resume_is_bit_identical_across_processes() {
    let Some(shared) = common::shared_data() else {
        eprintln!("skipped: ../shared/data not present");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let mut cfg = tiny(TrainConfig::fmnist_cwgan_gp());
    cfg.model.arch = Arch::Resnet;
    cfg.model.d_spectral_norm = true;
    cfg.model.attention = Some(14);
    cfg.model.d_norm = DNorm::None;
    cfg.model.conditioning = Conditioning::Projection;
    cfg.loss.n_critic = 2;
    cfg.data.path = Some(shared.join("fashion-mnist"));
    cfg.data.limit = Some(40);
    cfg.sample_every = 0;
    cfg.checkpoint_every = 0;
    cfg.log_every = 1;
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("tiny.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let c = cfg_path.to_str().unwrap();
    run(&[
        "train",
        "--config",
        c,
        "--device",
        "cpu",
        "--steps",
        "5",
        "--out",
        a.to_str().unwrap(),
    ]);
    run(&[
        "train",
        "--config",
        c,
        "--device",
        "cpu",
        "--steps",
        "3",
        "--out",
        b.to_str().unwrap(),
    ]);
    run(&[
        "train",
        "--resume",
        b.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "5",
    ]);
    for f in ganscope::checkpoint::FILES {
        let (x, y) = (safetensors_bits(&a.join(f)), safetensors_bits(&b.join(f)));
        assert!(!x.is_empty());
        assert_eq!(
            x, y,
            "{f} differs between 5 straight steps and 3 + resume + 2"
        );
    }
    // metrics.jsonl has one line per step in both runs.
    let lines = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines(&a), 5);
    assert_eq!(lines(&b), 5);

    // `sample` draws a captioned sheet from the run: 2 conditions x 4 samples.
    let sheet = tmp.path().join("sheet.png");
    run(&[
        "sample",
        "--run",
        b.to_str().unwrap(),
        "--labels",
        "Bag",
        "--class",
        "0",
        "--n",
        "4",
    ]
    .iter()
    .chain(&[
        "--scale",
        "1",
        "--device",
        "cpu",
        "--out",
        sheet.to_str().unwrap(),
    ])
    .copied()
    .collect::<Vec<_>>());
    let img = image::open(&sheet).unwrap().to_rgb8();
    assert!(
        img.width() > 4 * 28 && img.height() > 2 * 28,
        "{:?}",
        img.dimensions()
    );
    let out = Command::new(bin)
        .args([
            "sample",
            "--run",
            b.to_str().unwrap(),
            "--labels",
            "purple unicorn",
            "--device",
            "cpu",
        ])
        .args(["--out", tmp.path().join("x.png").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown label `purple unicorn`"),
        "{err}"
    );
}

#[test]
fn half_written_checkpoint_is_ignored_and_the_previous_one_loads() {
    let dev = Device::Cpu;
    let cfg = tiny(TrainConfig::mnist_cdcgan());
    let data = data_for(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    t.train_step().unwrap();
    t.save(dir.path()).unwrap();
    let at_step1 = weights(&t);
    t.train_step().unwrap();
    t.save(dir.path()).unwrap();
    // Simulate a crash that left the newest generator file half written.
    let g = dir.path().join("generator.safetensors");
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(&g, &bytes[..bytes.len() / 2]).unwrap();
    let back = Trainer::resume(dir.path(), data, &dev).unwrap();
    assert_eq!(back.step, 1);
    assert_eq!(weights(&back), at_step1);
    // The fallback is said, not silent, and the torn file is kept aside (renamed) so the
    // next save cannot overwrite the evidence.
    let notes = back.load_notes.join("; ");
    assert!(notes.contains("generator.safetensors"), "{notes}");
    let aside = ganscope::checkpoint::set_aside_rejected(dir.path()).unwrap();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        aside[0].contains("generator.safetensors set aside as"),
        "{aside:?}"
    );
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("generator.safetensors.rejected-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        std::fs::read(dir.path().join(&kept[0])).unwrap(),
        &bytes[..bytes.len() / 2]
    );
    back.save(dir.path()).unwrap();
    assert!(dir.path().join(&kept[0]).exists());
    assert!(
        ganscope::checkpoint::set_aside_rejected(dir.path())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn corrupt_restored_state_is_refused_not_a_panic() {
    // A well-formed checkpoint (valid checksums) whose trainer state is out of range: the
    // sampler cursor at -9 (as u64) panicked in the first step; an all-zero random state
    // would draw the same numbers forever. Both are errors naming the file and the tensor,
    // and the trainer is unchanged.
    let dev = Device::Cpu;
    let cfg = tiny(TrainConfig::mnist_cdcgan());
    let data = data_for(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    t.train_step().unwrap();
    t.save(dir.path()).unwrap();
    let set = ganscope::checkpoint::load_latest(dir.path(), &dev).unwrap();
    for (name, value, want) in [
        (
            "trainer.sampler",
            vec![0u64, (-9i64) as u64, data.len() as u64],
            "cursor -9",
        ),
        ("trainer.rng", vec![0u64; 4], "all zeros"),
    ] {
        let [g, d, mut o] = set.files.clone();
        let v: Vec<i64> = value.iter().map(|&x| x as i64).collect();
        let t_bad = Tensor::new(v.as_slice(), &dev).unwrap();
        o.insert(name.to_string(), t_bad);
        let bad = dir.path().join(name);
        ganscope::checkpoint::save(&bad, 1, [&g, &d, &o]).unwrap();
        std::fs::copy(dir.path().join("config.json"), bad.join("config.json")).unwrap();
        let mut fresh = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
        let before = weights(&fresh);
        let err = fresh.load_checkpoint(&bad).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors") && err.contains(name) && err.contains(want),
            "{err}"
        );
        assert_eq!(weights(&fresh), before);
        assert_eq!(fresh.step, 0);
    }
}

#[test]
fn mismatched_checkpoint_names_tensor_and_shapes_and_changes_nothing() {
    let dev = Device::Cpu;
    let cfg = tiny(TrainConfig::mnist_cdcgan());
    let data = data_for(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    t.train_step().unwrap();
    t.save(dir.path()).unwrap();
    let mut wider = cfg.clone();
    wider.model.g_ch = 8;
    let mut other = Trainer::new(wider, data, &dev).unwrap();
    let before = weights(&other);
    let err = other.load_checkpoint(dir.path()).unwrap_err().to_string();
    assert!(err.contains("generator.safetensors"), "{err}");
    assert!(err.contains("gen.") && err.contains("shape"), "{err}");
    assert!(
        err.contains("[8,") || err.contains("[16,") || err.contains("8]"),
        "{err}"
    );
    assert_eq!(
        weights(&other),
        before,
        "a failed load must not change the model"
    );
    assert_eq!(other.step, 0);
}

#[test]
fn cli_errors_are_clear() {
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("train-images-idx3-ubyte");
    std::fs::write(
        &bad,
        [0u8, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2, 3],
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("train-labels-idx1-ubyte"),
        [0u8, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3, 4, 5],
    )
    .unwrap();
    let out = Command::new(bin)
        .args([
            "train",
            "--data",
            tmp.path().to_str().unwrap(),
            "--steps",
            "1",
            "--device",
            "cpu",
        ])
        .args(["--out", tmp.path().join("run").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("bytes"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let out = Command::new(bin)
        .args(["train", "--preset", "nope"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown preset `nope`") && err.contains("mnist-cdcgan"),
        "{err}"
    );
}

#[test]
fn cli_refuses_bad_numbers_and_conditions_with_clear_errors() {
    // Each of these panicked, aborted on allocation, printed NaN or 0/0, or was accepted
    // silently (issue 19's audit). Every one is now refused, naming the flag, file or label,
    // and nothing panics. The shipped MNIST and i-CLEVR generators give the models.
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mnist = root.join("checkpoints/mnist-dcgan");
    let iclevr = root.join("checkpoints/iclevr-small");
    let png = tmp.path().join("x.png");
    let empty = tmp.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let cfg = tmp.path().join("typo.json");
    std::fs::write(&cfg, r#"{"batchsize": 16}"#).unwrap();
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "eval".into(),
                "--run".into(),
                p(&mnist),
                "--seeds".into(),
                "0".into(),
            ],
            "--seeds",
        ),
        (
            vec![
                "sample".into(),
                "--run".into(),
                p(&mnist),
                "--n".into(),
                "100000000".into(),
                "--out".into(),
                p(&png),
            ],
            "--n",
        ),
        (
            vec![
                "data".into(),
                "iclevr".into(),
                "--size".into(),
                "0".into(),
                "--out".into(),
                p(tmp.path()),
            ],
            "--size",
        ),
        (
            vec![
                "data".into(),
                "iclevr".into(),
                "--n-scenes".into(),
                "0".into(),
                "--out".into(),
                p(tmp.path()),
            ],
            "--n-scenes",
        ),
        (
            vec![
                "evaluator".into(),
                "train".into(),
                "--kind".into(),
                "mnist".into(),
                "--width".into(),
                "0".into(),
                "--out".into(),
                p(tmp.path()),
            ],
            "--width",
        ),
        (
            vec![
                "evaluator".into(),
                "train".into(),
                "--kind".into(),
                "mnist".into(),
                "--epochs".into(),
                "0".into(),
                "--out".into(),
                p(tmp.path()),
            ],
            "--epochs",
        ),
        (
            vec![
                "sample".into(),
                "--run".into(),
                p(&iclevr),
                "--labels".into(),
                "red cube,red cube".into(),
                "--out".into(),
                p(&png),
            ],
            "given twice",
        ),
        (
            vec![
                "sample".into(),
                "--run".into(),
                p(&iclevr),
                "--labels".into(),
                "red cube,blue cube,gray cube,green cube".into(),
                "--out".into(),
                p(&png),
            ],
            "1 to 3 objects",
        ),
        (
            vec![
                "sample".into(),
                "--run".into(),
                p(&iclevr),
                "--conditions".into(),
                p(&empty),
                "--out".into(),
                p(&png),
            ],
            "holds no conditions",
        ),
        (
            vec![
                "train".into(),
                "--config".into(),
                p(&cfg),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                p(&tmp.path().join("r")),
            ],
            "unknown field `batchsize`",
        ),
        (
            vec![
                "train".into(),
                "--lr-g".into(),
                "NaN".into(),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                p(&tmp.path().join("r2")),
            ],
            "lr_g",
        ),
        (
            vec![
                "train".into(),
                "--resume".into(),
                p(&iclevr),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                p(&tmp.path().join("r3")),
            ],
            "already at step",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!png.exists(), "no sheet was written");
    assert!(!tmp.path().join("r2").join("config.json").exists());
    assert!(!tmp.path().join("r3").join("config.json").exists());

    // A run folder that cannot be created or written is an error before any data is read or
    // any step trained (the audit found a read-only --out only at the first save). As root
    // every folder is writable, so the folder's place is a regular file here.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(bin)
        .args(["train", "--steps", "1", "--device", "cpu", "--out"])
        .arg(file.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("opening the run folder") && err.contains("a-file"),
        "{err}"
    );
    assert!(!err.contains("data:") && !err.contains("panicked"), "{err}");
}

/// The values of one named tensor.
fn values(m: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    m[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn ema_generator_is_what_is_saved_and_sampled() {
    // With EMA on, generator.safetensors holds the average (what `sample` and `eval` load),
    // the trained weights ride in the optimizer file, and both come back on resume.
    let dev = Device::Cpu;
    let cfg = configs().pop().unwrap();
    assert!(cfg.ema.is_on());
    let data = data_for(&cfg);
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    for _ in 0..4 {
        t.train_step().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let (g, _, step) = ganscope::train::load_generator(dir.path(), &dev).unwrap();
    assert_eq!(step, 4);
    let key = "gen.blocks.0.conv.weight";
    let v = |m: &HashMap<String, Tensor>| values(m, key);
    let saved = v(&g.store.model_tensors());
    let ema = v(&t.ema.as_ref().unwrap().store.model_tensors());
    let raw = v(&t.generator.store.model_tensors());
    assert_eq!(saved, ema);
    assert_ne!(
        saved, raw,
        "the average must differ from the trained weights"
    );
    assert_eq!(v(&t.sampling_generator().store.model_tensors()), ema);
    let r = Trainer::resume(dir.path(), data, &dev).unwrap();
    assert_eq!(v(&r.generator.store.model_tensors()), raw);
    assert_eq!(v(&r.ema.as_ref().unwrap().store.model_tensors()), ema);
}

#[test]
fn weights_only_folder_samples_and_trains_on() {
    // `ganscope ship` writes G and D of one save without optimizer state: what shipped
    // generators are. It must sample like the run (EMA weights), start further training from
    // those weights at the saved step, and never pass for a run's checkpoint.
    use ganscope::checkpoint;
    let dev = Device::Cpu;
    let cfg = configs().pop().unwrap();
    let data = data_for(&cfg);
    let mut t = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
    for _ in 0..4 {
        t.train_step().unwrap();
    }
    let run = tempfile::tempdir().unwrap();
    t.save(run.path()).unwrap();
    let set = checkpoint::load_latest(run.path(), &dev).unwrap();
    let shipped = tempfile::tempdir().unwrap();
    let dir = shipped.path().join("ship");
    // A run folder is refused (its optimizer state would be orphaned), and nothing changes.
    let err = checkpoint::save_weights(run.path(), 4, &set.files[0], &set.files[1])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("run folder"),
        "{err}"
    );
    assert!(!checkpoint::is_weights_folder(run.path()));
    checkpoint::save_weights(&dir, set.step, &set.files[0], &set.files[1]).unwrap();
    std::fs::copy(run.path().join("config.json"), dir.join("config.json")).unwrap();
    assert!(checkpoint::is_weights_folder(&dir));
    assert!(!dir.join("optimizer.safetensors").exists());
    // Not a run's checkpoint: load_latest still says so.
    let err = checkpoint::load_latest(&dir, &dev).unwrap_err().to_string();
    assert!(err.contains("optimizer.safetensors"), "{err}");

    // Sampling: the same images as the run folder's generator.
    let (g_run, _, _) = ganscope::train::load_generator(run.path(), &dev).unwrap();
    let (g_ship, _, step) = ganscope::train::load_generator(&dir, &dev).unwrap();
    assert_eq!(step, 4);
    let conds = vec![vec![0.0; 10]; 3];
    let conds: Vec<Vec<f32>> = conds
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c[i] = 1.0;
            c
        })
        .collect();
    let a = g_run.generate(3, &conds, 5).unwrap();
    let b = g_ship.generate(3, &conds, 5).unwrap();
    assert_eq!(a.data, b.data);

    // Training on: both G copies start from the shipped (EMA) weights, D from its file, Adam
    // afresh, the step from the files; steps stay finite and move the weights.
    let mut w = Trainer::resume(&dir, data.clone(), &dev).unwrap();
    assert_eq!(w.step, 4);
    let key = "gen.blocks.0.conv.weight";
    let v = |m: &HashMap<String, Tensor>| values(m, key);
    let ema = v(&t.ema.as_ref().unwrap().store.model_tensors());
    assert_eq!(v(&w.generator.store.model_tensors()), ema);
    assert_eq!(v(&w.ema.as_ref().unwrap().store.model_tensors()), ema);
    let dk = |t: &Trainer| {
        let m = t.discriminator.store.model_tensors();
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        keys.iter().map(|k| values(&m, k)).collect::<Vec<_>>()
    };
    assert_eq!(dk(&w), dk(&t));
    let st = w.train_step().unwrap();
    assert!(st.d_loss.is_finite() && st.g_loss.is_finite());
    assert_eq!(w.step, 5);
    assert_ne!(v(&w.generator.store.model_tensors()), ema);

    // A flipped bit in the shipped generator: a clear error naming the file.
    let gp = dir.join("generator.safetensors");
    let mut bytes = std::fs::read(&gp).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&gp, &bytes).unwrap();
    let err = ganscope::train::load_generator(&dir, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("generator.safetensors") && err.contains("checksum"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn kill_9_during_training_always_leaves_a_loadable_run() {
    // The audit's kill -9 loop, shortened: a tiny MNIST run (64 random 28x28 images written
    // as IDX files) checkpoints every step; it is killed with SIGKILL at three moments, and
    // after each kill the folder loads (or holds no checkpoint yet) and `train --resume`
    // continues from it; the lock of the killed process does not block the resume.
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let n = 64u32;
    let mut images = [0x803u32, n, 28, 28]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect::<Vec<u8>>();
    images.extend((0..n * 28 * 28).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    std::fs::write(data.join("train-images-idx3-ubyte"), &images).unwrap();
    let mut labels = [0x801u32, n]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect::<Vec<u8>>();
    labels.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(data.join("train-labels-idx1-ubyte"), &labels).unwrap();
    let run = tmp.path().join("run");
    let start = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = start(&[
        "train",
        "--preset",
        "mnist-cdcgan",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "100000",
        "--batch",
        "8",
        "--checkpoint-every",
        "1",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        "--set",
        "model.g_ch=4",
        "--set",
        "model.d_ch=4",
    ]);
    let mut last_step = 0;
    // Each kill lands a different time after the run has reached a checkpoint (the first
    // wait covers a slow start on a loaded machine).
    for delay_ms in [350u64, 120, 610] {
        let t0 = std::time::Instant::now();
        while ganscope::checkpoint::load_latest(&run, &Device::Cpu).map_or(0, |c| c.step)
            <= last_step
        {
            assert!(t0.elapsed().as_secs() < 120, "no new checkpoint in 120 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        match ganscope::checkpoint::load_latest(&run, &Device::Cpu) {
            Ok(set) => {
                assert!(
                    set.step > last_step,
                    "went back from {last_step} to {}",
                    set.step
                );
                last_step = set.step;
            }
            Err(e) => panic!("after a kill {delay_ms} ms past a checkpoint: {e}"),
        }
        child = start(&[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--steps",
            "100000",
            "--device",
            "cpu",
        ]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The folder resumes and finishes a short run cleanly.
    let set = ganscope::checkpoint::load_latest(&run, &Device::Cpu).unwrap();
    let target = (set.step + 2).to_string();
    let out = Command::new(bin)
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--steps",
            &target,
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = ganscope::checkpoint::load_latest(&run, &Device::Cpu).unwrap();
    assert_eq!(back.step.to_string(), target);
}

#[test]
fn sample_writes_numpy_arrays_of_the_images_and_their_conditions() {
    // `sample --npy`: the shipped MNIST cDCGAN, class 3, 4 samples -> a 4 x 28 x 28 float32
    // array in [-1, 1] (one channel: no channel axis, like seed 001's generate(n, c)) and the
    // 4 x 10 one-hot conditions beside it. The header is parsed as numpy writes it.
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("digits.npy");
    let out = Command::new(bin)
        .args([
            "sample",
            "--run",
            "checkpoints/mnist-cdcgan",
            "--class",
            "3",
            "--n",
            "4",
        ])
        .args(["--device", "cpu", "--npy"])
        .arg(&npy)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &std::path::Path| -> (String, Vec<f32>) {
        let b = std::fs::read(p).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let header = String::from_utf8(b[10..10 + hl].to_vec()).unwrap();
        let data = b[10 + hl..]
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (header, data)
    };
    let (h, x) = read(&npy);
    assert!(
        h.contains("'descr': '<f4'") && h.contains("'shape': (4, 28, 28)"),
        "{h}"
    );
    assert_eq!(x.len(), 4 * 28 * 28);
    assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Digits: dark background (near -1) and bright strokes.
    assert!(x.iter().filter(|v| **v < -0.9).count() > x.len() / 2);
    assert!(x.iter().any(|v| *v > 0.5));
    let (h, c) = read(&tmp.path().join("digits.conditions.npy"));
    assert!(h.contains("'shape': (4, 10)"), "{h}");
    for row in c.chunks(10) {
        assert_eq!(row.iter().position(|v| *v == 1.0), Some(3));
        assert_eq!(row.iter().sum::<f32>(), 1.0);
    }
}

#[test]
fn training_on_from_shipped_weights_takes_set_an_exact_resume_refuses_it() {
    // `train --resume checkpoints/NAME --out DIR` starts a new run (fresh Adam state), so its
    // recipe may change; a run folder's own resume stays exact.
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints/iclevr-small");
    let before = std::fs::read(shipped.join("config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let more = tmp.path().join("more");
    let step: u64 = {
        let c = ganscope::checkpoint::load_weights(&shipped, &Device::Cpu).unwrap();
        c.step
    };
    let train = |args: &[&str]| {
        Command::new(bin)
            .args(["train", "--device", "cpu", "--sample-every", "0"])
            .args(args)
            .output()
            .unwrap()
    };
    let next = (step + 1).to_string();
    let out = train(&[
        "--resume",
        shipped.to_str().unwrap(),
        "--out",
        more.to_str().unwrap(),
        "--steps",
        &next,
        "--set",
        "loss.mode_seeking_until=40000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(more.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg.loss.mode_seeking_until, 40000);
    assert_eq!(std::fs::read(shipped.join("config.json")).unwrap(), before);
    let set = ganscope::checkpoint::load_latest(&more, &Device::Cpu).unwrap();
    assert_eq!(set.step, step + 1);
    // The new run folder resumes exactly: --set is refused there, and nothing is written.
    let out = train(&[
        "--resume",
        more.to_str().unwrap(),
        "--steps",
        &(step + 2).to_string(),
        "--set",
        "loss.mode_seeking=0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot change when resuming"), "{err}");
    assert_eq!(
        ganscope::checkpoint::load_latest(&more, &Device::Cpu)
            .unwrap()
            .step,
        step + 1
    );
}

#[test]
fn keep_every_leaves_weights_folders_of_those_steps() {
    // `train --keep-every N` keeps every Nth step's weights in <run>/kept/step_NNNNNN/: a
    // weights-only folder with config.json (what `ship` writes) holding that step's sampling
    // G and D, so runs of different speeds can be compared at equal steps afterwards.
    use ganscope::checkpoint;
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints/iclevr-small");
    let step = checkpoint::load_weights(&shipped, &Device::Cpu)
        .unwrap()
        .step;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(bin)
        .args([
            "train",
            "--device",
            "cpu",
            "--sample-every",
            "0",
            "--resume",
        ])
        .arg(&shipped)
        .arg("--out")
        .arg(&run)
        .args(["--keep-every", "1", "--steps", &(step + 2).to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = |s: u64| run.join("kept").join(format!("step_{s:06}"));
    let last = checkpoint::load_latest(&run, &Device::Cpu).unwrap();
    assert_eq!(last.step, step + 2);
    let mut gens = Vec::new();
    for s in [step + 1, step + 2] {
        let dir = kept(s);
        assert!(checkpoint::is_weights_folder(&dir), "{}", dir.display());
        let cfg: TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg.keep_every, 1);
        let w = checkpoint::load_weights(&dir, &Device::Cpu).unwrap();
        assert_eq!(w.step, s);
        gens.push(w.files[0].clone());
    }
    let key = "gen.layer.blocks.0.conv.weight";
    // The last kept step is the run's checkpoint of that step; the one before differs.
    assert_eq!(values(&gens[1], key), values(&last.files[0], key));
    assert_ne!(values(&gens[0], key), values(&gens[1], key));
    assert!(!kept(step).exists());
}

#[test]
fn ship_with_sheet_copies_the_grid_of_the_shipped_step() {
    // `ganscope ship --sheet` takes the run's sample grid of the step it ships as the
    // folder's samples.png; where the run has no grid at that step it fails before writing
    // anything, naming the missing file.
    let bin = env!("CARGO_BIN_EXE_ganscope");
    let mut cfg = tiny(TrainConfig::iclevr_small());
    cfg.model.g_object_layers = 0;
    cfg.data.limit = Some(32);
    cfg.sample_every = 2;
    cfg.checkpoint_every = 0;
    cfg.keep_every = 2;
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("tiny.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap()
    };
    let (r, out) = (tmp.path().join("run"), tmp.path().join("ship"));
    let (rs, os) = (r.to_str().unwrap(), out.to_str().unwrap());
    let c = cfg_path.to_str().unwrap();
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(run(&[
        "train", "--config", c, "--device", "cpu", "--steps", "2", "--out", rs,
    ]));
    ok(run(&["ship", "--run", rs, "--out", os, "--sheet"]));
    assert_eq!(
        std::fs::read(out.join("samples.png")).unwrap(),
        std::fs::read(r.join("samples/step_000002.png")).unwrap()
    );
    // A kept step ships as it is, with the run's grid of that step.
    let kept = r.join("kept/step_000002");
    let outk = tmp.path().join("ship-kept");
    ok(run(&[
        "ship",
        "--run",
        kept.to_str().unwrap(),
        "--out",
        outk.to_str().unwrap(),
        "--sheet",
    ]));
    assert_eq!(
        std::fs::read(outk.join("samples.png")).unwrap(),
        std::fs::read(r.join("samples/step_000002.png")).unwrap()
    );
    let g = |d: &std::path::Path| {
        ganscope::train::load_generator(d, &candle_core::Device::Cpu)
            .unwrap()
            .0
            .store
            .model_tensors()
    };
    let (a, b) = (g(&kept), g(&outk));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, y, "{name}");
    }
    // With standing statistics: G's BatchNorm running statistics measured again, everything
    // else as it was; with --sheet too it is refused (the run's grid does not show them).
    let outs = tmp.path().join("ship-standing");
    let os_ = outs.to_str().unwrap();
    let ks = kept.to_str().unwrap();
    let o = run(&[
        "ship",
        "--run",
        ks,
        "--out",
        os_,
        "--standing-stats",
        "16",
        "--sheet",
    ]);
    assert!(!o.status.success() && !outs.exists());
    let o = run(&["ship", "--run", ks, "--out", os_, "--standing-stats", "16"]);
    ok(o.clone());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("standing statistics:"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let c = g(&outs);
    assert_eq!(a.len(), c.len());
    let mut running = 0;
    for (name, t) in &a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = c[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if name.contains(".running_") {
            running += 1;
            assert_ne!(x, y, "{name}");
            assert!(y.iter().all(|v| v.is_finite()), "{name}");
        } else {
            assert_eq!(x, y, "{name}");
        }
    }
    assert!(running > 0);
    // A run whose grid of the newest step is gone (or was never written, with
    // `--sample-every 0`): refused, and nothing is written.
    ok(run(&[
        "train", "--resume", rs, "--device", "cpu", "--steps", "3",
    ]));
    std::fs::remove_file(r.join("samples/step_000003.png")).unwrap();
    let out3 = tmp.path().join("ship3");
    let o = run(&[
        "ship",
        "--run",
        rs,
        "--out",
        out3.to_str().unwrap(),
        "--sheet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("step_000003.png") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(!out3.exists());
}
