//! The explorer driven through egui_kittest (wgpu software rendering, no display needed):
//! composer toggles, a latent slider, pause / resume, exports, snapshots of the main panels.
//! Needs a Vulkan or GL software driver (Mesa's lavapipe / llvmpipe; `.ci/run` installs it).

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use ganscope::app::{AppOptions, GanscopeApp, NoDialogs, Settings, Tab};
use ganscope::train::worker::RunState;

const SIZE: [f32; 2] = [1280.0, 860.0];

fn settings() -> Settings {
    Settings {
        // A fresh run of the one-shot i-CLEVR preset (not a shipped checkpoint), no
        // diagnostics: the panels behave the same for every preset, and its steps are the
        // quickest of the i-CLEVR presets. The default preset has its own tests below.
        preset: "iclevr-small".into(),
        launched_before: true,
        diagnostics_every: 0,
        wall_every: 1,
        ..Settings::default()
    }
}

fn harness(s: Settings, run: bool) -> Harness<'static, GanscopeApp> {
    harness_opening(s, run, None)
}

/// The explorer as `ganscope --open DIR` starts it when `open` is given.
fn harness_opening(s: Settings, run: bool, open: Option<PathBuf>) -> Harness<'static, GanscopeApp> {
    harness_sized(s, run, open, SIZE)
}

fn harness_sized(
    s: Settings,
    run: bool,
    open: Option<PathBuf>,
    size: [f32; 2],
) -> Harness<'static, GanscopeApp> {
    ganscope::grad::check_exact_second_order().unwrap();
    Harness::builder()
        .with_size(size)
        // Some drag values and combo boxes sit beside a grid label instead of carrying
        // their own accessible name (noted in the explorer issue's closing note).
        .with_accessibility_check(false)
        .wgpu()
        .build_eframe(move |cc| {
            GanscopeApp::with_options(
                cc,
                AppOptions {
                    autostart: true,
                    run,
                    dialogs: Box::new(NoDialogs),
                    settings: Some(s),
                    checkpoints: ganscope::app::checkpoints_dir(),
                    show_timings: false,
                    open,
                    runs: None,
                    feature_cache: None,
                },
            )
        })
}

/// How long a `wait_for` (or the GIF export's loop) waits before the test fails: a hang still
/// fails, while a slow shared CI host passes. In session 33, on a 2-core host at a third of its
/// usual speed (sgemm 36-73 GFLOP/s), two of these waits (the imported generator's check, the
/// first FID) exceeded 120 s while a training run shared the cores, and 300 s beside two
/// release builds; alone, the two tests took 75 s together.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// Step the harness (real time passing) until `done` holds.
fn wait_for(h: &mut Harness<'_, GanscopeApp>, what: &str, done: impl Fn(&GanscopeApp) -> bool) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < WAIT_LIMIT,
            "timed out waiting for {what}; log: {:?}; error: {:?}",
            h.state().status.log,
            h.state().run.error
        );
        std::thread::sleep(Duration::from_millis(30));
        h.step();
    }
    h.step();
}

fn ready(h: &mut Harness<'_, GanscopeApp>) {
    wait_for(h, "the session and the first wall", |a| {
        a.run.info.is_some() && !a.run.frames.is_empty() && a.run.run_state != RunState::Loading
    });
}

/// A two-step run of a narrow `preset` (widths 8, batch 4) saved in `dir`, as `ganscope
/// train` saves it.
fn two_step_run(preset: &str, dir: &std::path::Path) {
    let mut cfg = ganscope::config::TrainConfig::preset(preset).unwrap();
    cfg.model.g_ch = 8;
    cfg.model.d_ch = 8;
    cfg.batch_size = 4;
    let data = ganscope::data::open(&cfg.data, cfg.model.image_size).unwrap();
    let mut t =
        ganscope::train::Trainer::new(cfg, Arc::new(data), &candle_core::Device::Cpu).unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    t.save(dir).unwrap();
}

fn active_labels(a: &GanscopeApp) -> Vec<String> {
    a.composer
        .cond
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(i, _)| a.composer.names[i].clone())
        .collect()
}

#[test]
fn composer_ticks_labels_and_refuses_a_fourth_object() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    // It starts on the wall's first row (a label set of the data), not on "gray cube".
    let first = h.state().run.info.as_ref().unwrap().wall_rows[0].0.clone();
    assert_eq!(active_labels(h.state()).join(", "), first);
    assert_eq!(first, "purple sphere");
    h.get_by_label("purple sphere").click();
    h.run_steps(2);
    assert!(active_labels(h.state()).is_empty());
    h.get_by_label("gray cube").click();
    h.run_steps(2);
    h.get_by_label("red sphere").click();
    h.run_steps(2);
    h.get_by_label("blue cylinder").click();
    h.run_steps(2);
    assert_eq!(
        active_labels(h.state()),
        vec!["gray cube", "red sphere", "blue cylinder"]
    );
    h.get_by_label("green cube").click();
    h.run_steps(2);
    assert_eq!(active_labels(h.state()).len(), 3, "a 4th object is refused");
    h.get_by_label_contains("at most 3 objects");
    // Unticking works, then the 4th fits.
    h.get_by_label("gray cube").click();
    h.run_steps(2);
    h.get_by_label("green cube").click();
    h.run_steps(2);
    // Listed in label order (green cube is label 3, red sphere 9, blue cylinder 18).
    assert_eq!(
        active_labels(h.state()),
        vec!["green cube", "red sphere", "blue cylinder"]
    );
}

#[test]
fn latent_slider_changes_the_image() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    h.get_by_label("Explore").click();
    wait_for(&mut h, "the first latent image", |a| {
        a.latent.image.is_some()
    });
    let before = h.state().latent.image.clone().unwrap();
    let z0 = h.state().latent.dims[0];
    let rect = h.get_by_role_and_label(Role::Slider, "z[0]").rect();
    // Click near the right end of the rail: z[0] jumps to about +2.7.
    let p = egui::pos2(rect.left() + rect.width() * 0.05 + 2.0, rect.center().y);
    let p = if z0 < 0.0 {
        egui::pos2(rect.right() - 4.0, rect.center().y)
    } else {
        p
    };
    h.hover_at(p);
    h.step();
    h.drag_at(p);
    h.step();
    h.drop_at(p);
    h.step();
    let z1 = h.state().latent.dims[0];
    assert!((z1 - z0).abs() > 1.0, "slider moved z[0] from {z0} to {z1}");
    wait_for(&mut h, "the re-rendered image", |a| {
        a.latent
            .image
            .as_ref()
            .is_some_and(|im| im.data != before.data)
    });
    let after = h.state().latent.image.clone().unwrap();
    let diff: f32 = before
        .data
        .iter()
        .zip(&after.data)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / before.data.len() as f32;
    // An untrained generator changes little per latent dimension (about 5e-4 here).
    assert!(diff > 1e-5, "mean abs change {diff}");
    assert!(!h.state().latent.slider_to_image_ms.is_empty());
}

/// The frame whose input moved a slider waits for the renderer's answer and runs its UI pass
/// again, so the new image is already in that frame: no `wait_for` between the drag and the
/// check. (The wait is raised from the app's 8 ms so that a loaded machine cannot make the
/// test depend on timing; `ganscope bench --model explore` measures the real budget's hit rate.)
#[test]
fn a_slider_move_is_drawn_in_the_frame_that_made_it() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    h.get_by_label("Explore").click();
    wait_for(&mut h, "the first latent image", |a| {
        a.latent.image.is_some() && a.latent.texture.is_some()
    });
    h.state_mut().same_frame_wait = Duration::from_secs(60);
    let before = h.state().latent.image.clone().unwrap();
    let shown = h.state().latent.slider_to_image_ms.len();
    let z0 = h.state().latent.dims[3];
    let rect = h.get_by_role_and_label(Role::Slider, "z[3]").rect();
    let p = egui::pos2(rect.right() - 4.0, rect.center().y);
    h.hover_at(p);
    h.step();
    h.drag_at(p);
    h.step();
    let a = h.state();
    assert!(
        (a.latent.dims[3] - z0).abs() > 0.5,
        "slider moved z[3] from {z0} to {}",
        a.latent.dims[3]
    );
    assert!(a.latent.pending.is_empty(), "an answer is still pending");
    assert_eq!(
        a.latent.slider_to_image_ms.len(),
        shown + 1,
        "the new image was not drawn in the frame of the drag"
    );
    assert!(!a.latent.texture_dirty, "the texture was not rebuilt");
    let after = a.latent.image.as_ref().unwrap();
    assert_ne!(before.data, after.data, "the image did not change");
    h.drop_at(p);
    h.step();
}

#[test]
fn truncation_redraws_the_latent_and_the_wall() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    let z_before = h.state().latent.base.clone();
    assert!(
        z_before.iter().any(|v| v.abs() > 1.0),
        "seed 0 has no entry beyond +-1"
    );
    let wall_before = h.state().run.frames.back().unwrap().images.clone();
    h.get_by_label("Truncation").click();
    h.step();
    assert_eq!(h.state().latent.truncation, Some(1.0));
    let z = h.state().latent.base.clone();
    assert!(
        z.iter().all(|v| v.abs() <= 1.0),
        "a latent entry beyond +-1"
    );
    // Entries already inside are kept: the seed keeps its look.
    for (a, b) in z.iter().zip(&z_before) {
        if b.abs() <= 1.0 {
            assert_eq!(a, b);
        }
    }
    // The session samples its wall the same way: the frame of this step drawn again, with
    // different images.
    wait_for(&mut h, "the truncated wall", |a| {
        a.run.frames.back().is_some_and(|f| f.images != wall_before)
    });
    assert!(
        h.state()
            .status
            .log
            .iter()
            .any(|l| l.contains("truncation trick")),
        "{:?}",
        h.state().status.log
    );
    // Off again: the plain latent of the seed.
    h.get_by_label("Truncation").click();
    h.step();
    assert_eq!(h.state().latent.truncation, None);
    assert_eq!(h.state().latent.base, z_before);
}

#[test]
fn open_a_run_folder_paused_and_a_missing_one_is_an_error() {
    // A two-step run of a narrow iclevr-small, saved like `ganscope train` saves it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    two_step_run("iclevr-small", &dir);

    let mut h = harness_opening(settings(), true, Some(dir.clone()));
    ready(&mut h);
    let a = h.state();
    assert_eq!(
        a.run.run_state,
        RunState::Paused,
        "opened runs start paused"
    );
    let info = a.run.info.as_ref().unwrap();
    assert_eq!((info.step, info.cfg.model.g_ch), (2, 8));
    assert!(
        a.status.log.iter().any(|l| l.contains("opened")),
        "{:?}",
        a.status.log
    );

    let nowhere = tmp.path().join("nowhere");
    let mut h = harness_opening(settings(), true, Some(nowhere));
    wait_for(&mut h, "the error", |a| a.run.error.is_some());
    let err = h.state().run.error.clone().unwrap();
    assert!(err.contains("nowhere"), "{err}");
    assert!(
        h.state().run.info.is_none(),
        "no session from a missing folder"
    );
}

#[test]
fn scene_tab_adds_undoes_rerolls_and_exports() {
    // A two-step run of a narrow sequential model, saved like `ganscope train` saves it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    two_step_run("iclevr-sequential-small", &dir);
    let s = Settings {
        export_path: tmp.path().join("exports").display().to_string(),
        export_scale: 2,
        ..settings()
    };
    let mut h = harness_opening(s, true, Some(dir));
    ready(&mut h);
    // The training panel names the opened run's preset.
    assert_eq!(h.state().settings.preset, "iclevr-sequential-small");
    h.get_by_label("Scene").click();
    wait_for(&mut h, "the floor", |a| {
        a.scene.images.as_ref().is_some_and(|im| im.n == 1)
    });
    // Add "red cube" (label 1) with the picker's button.
    h.state_mut().scene.pick = 1;
    h.get_by_label("Add").click();
    wait_for(&mut h, "the first object", |a| {
        a.scene.images_for == vec![1]
    });
    // Then the composer's ticked labels (the wall's first row, purple sphere).
    h.get_by_label("Add the composer's labels").click();
    wait_for(&mut h, "the second object", |a| {
        a.scene.images_for.len() == 2
    });
    assert_eq!(h.state().scene.images_for, vec![1, 13]);
    h.get_by_label_contains("previous: + red cube");
    h.get_by_label_contains("new: + purple sphere");
    let before = h.state().scene.images.clone().unwrap();
    assert_eq!(before.n, 3);
    // Re-roll: the last image changes, the floor and the first step stay.
    h.get_by_label("Re-roll last").click();
    wait_for(&mut h, "the re-rolled step", |a| {
        a.scene
            .images
            .as_ref()
            .is_some_and(|im| im.image(2) != before.image(2))
    });
    let after = h.state().scene.images.clone().unwrap();
    assert_eq!(after.image(0), before.image(0));
    assert_eq!(after.image(1), before.image(1));
    h.get_by_label("Undo").click();
    wait_for(&mut h, "the undone step", |a| a.scene.images_for == vec![1]);
    assert_eq!(
        h.state().scene.images.as_ref().unwrap().image(1),
        before.image(1)
    );
    // Export the sequence: a PNG strip of the floor and the step, and a GIF.
    h.get_by_label("Export strip PNG").click();
    wait_for(&mut h, "the strip export", |a| a.export.message.is_some());
    let msg = h.state().export.message.clone().unwrap_or_default();
    assert!(msg.starts_with("wrote ") && msg.ends_with(".png"), "{msg}");
    let img = image::open(msg.trim_start_matches("wrote "))
        .unwrap()
        .to_rgb8();
    assert!(img.width() >= 2 * 32 * 2, "{}", img.width());
    h.state_mut().export.message = None;
    h.get_by_label("Export GIF").click();
    wait_for(&mut h, "the GIF export", |a| a.export.message.is_some());
    let msg = h.state().export.message.clone().unwrap_or_default();
    assert!(msg.ends_with(".gif"), "{msg}");
    assert!(image::open(msg.trim_start_matches("wrote ")).is_ok());
}

#[test]
fn scene_tab_explains_itself_for_a_one_shot_generator() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    h.get_by_label("Scene").click();
    h.run_steps(2);
    h.get_by_label_contains("Scene mode needs a sequential generator");
    assert!(h.state().scene.images.is_none());
}

#[test]
fn fid_set_in_the_training_panel_reaches_the_plots() {
    // The committed same-layout fixture (pytorch-fid's Inception at 1/16 width) stands in for
    // pt_inception-2015-12-05-6726825d.pth.
    let weights = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fid_inception/inception.pth");
    let s = Settings {
        fid_every: 2,
        fid_weights: weights.display().to_string(),
        ..settings()
    };
    let mut h = harness(s, true);
    wait_for(&mut h, "the first FID", |a| !a.run.fid_series.is_empty());
    let p = h.state().run.fid_series[0].clone();
    assert!(p.fid.is_finite() && p.fid > 0.0, "{p:?}");
    assert_eq!(p.step % 2, 0);
    h.get_by_label("Plots").click();
    h.run_steps(2);
    h.get_by_label_contains("FID (pytorch-fid's Inception pool3, every 2 steps");
    // Without weights the session refuses to start, naming the missing setting.
    let s = Settings {
        fid_every: 2,
        ..settings()
    };
    let mut h = harness(s, true);
    wait_for(&mut h, "the error", |a| a.run.error.is_some());
    let e = h.state().run.error.clone().unwrap();
    assert!(e.contains("fid_weights"), "{e}");
}

#[test]
fn when_d_wins_is_chosen_in_the_training_panel_and_reaches_the_session() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    assert_eq!(h.state().settings.on_d_wins, None);
    h.get_by_value("as the preset says").click();
    h.run_steps(2);
    h.get_by_label("roll back + halve D's LR").click();
    h.run_steps(2);
    assert_eq!(
        h.state().settings.on_d_wins,
        Some(ganscope::config::OnDWins::Rollback)
    );
    wait_for(&mut h, "the session's answer", |a| {
        a.status
            .log
            .iter()
            .any(|l| l.contains("when D wins outright: roll back"))
    });
}

#[test]
fn first_launch_opens_the_shipped_generator_paused_and_resume_trains_on() {
    // The shipped default generator (checkpoints/iclevr-sequential-small, weights only) opens
    // paused on the first launch; ticking a label changes the wall at once; Resume trains on
    // from its step; Start trains from scratch.
    let ckpt = ganscope::app::checkpoints_dir();
    assert!(
        ganscope::app::has_shipped_default(&ckpt),
        "no shipped default in {}",
        ckpt.display()
    );
    let shipped = ganscope::checkpoint::load_weights(
        &ckpt.join(ganscope::app::DEFAULT_PRESET),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(shipped.step >= 1000, "shipped at step {}", shipped.step);
    // A first launch: the settings a new user has.
    let first = Settings {
        launched_before: false,
        diagnostics_every: 0,
        wall_every: 1,
        ..Settings::default()
    };
    assert_eq!(first.preset, "iclevr-sequential-small");
    let mut h = harness(first, true);
    ready(&mut h);
    let a = h.state();
    assert_eq!(
        a.run.run_state,
        RunState::Paused,
        "the shipped generator opens paused"
    );
    assert_eq!(a.run.info.as_ref().unwrap().step, shipped.step);
    assert!(
        a.status.log.iter().any(|l| l.contains("shipped")),
        "{:?}",
        a.status.log
    );
    // The composer's first label row re-renders at once while paused.
    h.get_by_label("Explore").click();
    wait_for(&mut h, "the first latent image", |a| {
        a.latent.image.is_some()
    });
    let before = h.state().latent.image.clone().unwrap();
    let before_labels = active_labels(h.state());
    let toggle = if before_labels.iter().any(|l| l == "red sphere") {
        "red sphere"
    } else {
        "blue cube"
    };
    h.get_by_label(toggle).click();
    h.step();
    assert_ne!(active_labels(h.state()), before_labels);
    wait_for(&mut h, "the image of the new condition", |a| {
        a.latent
            .image
            .as_ref()
            .is_some_and(|im| im.data != before.data)
    });
    h.get_by_label("Resume").click();
    wait_for(&mut h, "training on from the shipped step", |a| {
        a.run
            .history
            .last()
            .is_some_and(|s| s.stats.step >= shipped.step + 2)
    });
    h.get_by_label("Start").click();
    wait_for(&mut h, "a run from scratch", |a| {
        a.run.info.as_ref().is_some_and(|i| i.step == 0)
    });
}

#[test]
fn save_asks_before_replacing_another_run() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("mnist-run");
    std::fs::create_dir_all(&other).unwrap();
    let mnist = ganscope::config::TrainConfig::preset("mnist-cdcgan").unwrap();
    std::fs::write(
        other.join("config.json"),
        serde_json::to_vec_pretty(&mnist).unwrap(),
    )
    .unwrap();
    let mut h = harness(
        Settings {
            checkpoint_path: other.display().to_string(),
            ..settings()
        },
        false,
    );
    ready(&mut h);
    h.get_by_label("Save").click();
    h.run_steps(2);
    let (dir, why) = h
        .state()
        .train
        .save_confirm
        .clone()
        .expect("a question, not a save");
    assert_eq!(dir, other);
    assert!(why.contains("mnist-cdcgan"), "{why}");
    h.get_by_label_contains("Saving there replaces it");
    h.get_by_label("Cancel").click();
    h.run_steps(2);
    assert!(h.state().train.save_confirm.is_none());
    assert!(
        !other.join("generator.safetensors").exists(),
        "nothing written"
    );
    // Replace writes there; the next save of the same run asks nothing.
    h.get_by_label("Save").click();
    h.run_steps(2);
    h.get_by_label("Replace").click();
    wait_for(&mut h, "the save", |_| {
        other.join("generator.safetensors").exists()
    });
    wait_for(&mut h, "the saved config", |_| {
        std::fs::read_to_string(other.join("config.json")).is_ok_and(|t| t.contains("iclevr-small"))
    });
    h.get_by_label("Save").click();
    h.run_steps(2);
    assert!(
        h.state().train.save_confirm.is_none(),
        "same run: no question, got {:?}",
        h.state().train.save_confirm
    );
    // A shipped (weights-only) folder is always asked about.
    let why = ganscope::app::train_panel::save_conflict(
        &ganscope::app::checkpoints_dir().join("iclevr-small"),
        &h.state().run.info.as_ref().unwrap().cfg,
    );
    assert!(why.is_some_and(|w| w.contains("shipped")));
}

#[test]
fn pause_resume_and_single_steps() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    assert_eq!(h.state().run.run_state, RunState::Paused);
    let step0 = h.state().run.history.last().map_or(0, |s| s.stats.step);
    h.get_by_label("Both").click();
    wait_for(&mut h, "one step", |a| {
        a.run
            .history
            .last()
            .is_some_and(|s| s.stats.step == step0 + 1)
    });
    h.get_by_label("Resume").click();
    wait_for(&mut h, "training", |a| a.run.run_state == RunState::Running);
    wait_for(&mut h, "three more steps", |a| {
        a.run
            .history
            .last()
            .is_some_and(|s| s.stats.step >= step0 + 4)
    });
    h.get_by_label("Pause").click();
    wait_for(&mut h, "paused", |a| a.run.run_state == RunState::Paused);
    let s = h.state().run.history.last().unwrap().stats.step;
    std::thread::sleep(Duration::from_millis(800));
    h.run_steps(3);
    assert_eq!(
        h.state().run.history.last().unwrap().stats.step,
        s,
        "no steps while paused"
    );
    assert!(h.state().run.frames.len() >= 2, "the wall was re-rendered");
}

#[test]
fn export_sheet_and_history_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Settings {
        export_path: dir.path().display().to_string(),
        export_scale: 2,
        ..settings()
    };
    let mut h = harness(s, false);
    ready(&mut h);
    h.get_by_label("Wall as PNG").click();
    wait_for(&mut h, "the PNG export", |a| a.export.message.is_some());
    let msg = h.state().export.message.clone().unwrap_or_default();
    assert!(msg.starts_with("wrote "), "{msg}");
    let path = std::path::PathBuf::from(msg.trim_start_matches("wrote "));
    let img = image::open(&path).unwrap().to_rgb8();
    let f = h.state().run.frames.back().unwrap().clone();
    // 8 seeds of 32 px at scale 2 plus padding and a caption column: wider than 8 * 64.
    assert!(
        img.width() > (f.cols * f.images.width * 2) as u32,
        "{}",
        img.width()
    );
    assert!(img.height() >= (f.rows * f.images.height * 2) as u32);
    h.state_mut().export.message = None;
    h.get_by_label("Wall history as GIF").click();
    wait_for(&mut h, "the GIF export", |a| a.export.message.is_some());
    let msg = h.state().export.message.clone().unwrap_or_default();
    assert!(msg.ends_with(".gif"), "{msg}");
    let gif = std::path::PathBuf::from(msg.trim_start_matches("wrote "));
    assert!(image::open(&gif).is_ok());
}

#[test]
fn history_gif_is_written_off_the_ui_thread() {
    // 60 kept wall frames (the newest frame's layout, with noise added so that every frame
    // differs), every 2nd one exported: frames of steps 10, 30, ..., 590 and the newest,
    // 600. The click only queues the job; the UI keeps drawing frames while the export
    // thread renders and encodes, and shows its progress. Frame times are printed (the
    // software renderer of the tests sets their floor), not asserted.
    let dir = tempfile::tempdir().unwrap();
    let s = Settings {
        export_path: dir.path().display().to_string(),
        export_scale: 2,
        gif_stride: 2,
        ..settings()
    };
    let mut h = harness(s, false);
    ready(&mut h);
    let base = h.state().run.frames.back().unwrap().clone();
    h.state_mut().run.frames.clear();
    for k in 1..=60u64 {
        let mut f = (*base).clone();
        f.step = 10 * k;
        for (i, v) in f.images.data.iter_mut().enumerate() {
            *v = (*v + 0.002 * ((i as u64 * 7 + k * 13) % 31) as f32).clamp(-1.0, 1.0);
        }
        h.state_mut().run.frames.push_back(Arc::new(f));
    }
    h.run_steps(2);
    let t = Instant::now();
    h.get_by_label("Wall history as GIF").click();
    h.step();
    let click_frame = t.elapsed().as_secs_f64() * 1e3;
    let mut frames_ms = vec![];
    let mut saw_progress = false;
    while h.state().export.message.is_none() {
        assert!(t.elapsed() < WAIT_LIMIT, "export timed out");
        saw_progress |= h.state().export.exporter.busy.is_some();
        let f = Instant::now();
        h.step();
        frames_ms.push(f.elapsed().as_secs_f64() * 1e3);
    }
    let worst = frames_ms.iter().cloned().fold(click_frame, f64::max);
    println!(
        "history GIF (31 frames): {:.0} ms in all; click frame {click_frame:.1} ms, {} frames \
         drawn meanwhile, worst {worst:.1} ms",
        t.elapsed().as_secs_f64() * 1e3,
        frames_ms.len()
    );
    assert!(saw_progress || frames_ms.len() <= 1, "no progress shown");
    let msg = h.state().export.message.clone().unwrap();
    assert!(msg.starts_with("wrote ") && msg.ends_with(".gif"), "{msg}");
    let path = PathBuf::from(msg.trim_start_matches("wrote "));
    assert!(path.is_absolute(), "{msg}");
    use image::AnimationDecoder;
    let dec = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&path).unwrap(),
    ))
    .unwrap();
    let got = dec.into_frames().collect_frames().unwrap();
    assert_eq!(got.len(), 31);
}

#[test]
fn repeating_log_lines_collapse_into_one_with_a_count() {
    // A D-accuracy alarm every 50 steps is one line with a count (showing the newest), so it
    // no longer pushes everything else out of the log; a different line starts a new one.
    let mut h = harness(settings(), false);
    ready(&mut h);
    let n0 = h.state().status.log.len();
    for step in [300, 350, 400, 450, 500] {
        h.state_mut().push_log(format!(
            "ALARM step {step}: D accuracy 0.{} over the last 200 steps",
            950 + step / 50
        ));
    }
    h.state_mut()
        .push_log("saved a checkpoint to runs/x".into());
    h.state_mut()
        .push_log("ALARM step 550: D accuracy 0.961 over the last 200 steps".into());
    h.run_steps(2);
    let a = h.state();
    assert_eq!(a.status.log.len(), n0 + 3, "{:?}", a.status.log);
    let counts: Vec<u32> = a.status.log_counts.iter().skip(n0).copied().collect();
    assert_eq!(counts, vec![5, 1, 1]);
    assert!(
        a.status.log[n0].contains("step 500"),
        "the newest of the repeats is shown"
    );
    h.get_by_label_contains("step 500: D accuracy 0.960 over the last 200 steps  (x5)");
    assert_eq!(
        ganscope::app::numbers_masked("step 12: lr 1.5e-4, -3 x2"),
        "step #: lr #, -# x#"
    );
}

#[test]
fn the_wall_zoom_fits_the_space_and_a_manual_zoom_is_kept() {
    // Zoom 0 (the default) = the largest integer zoom at which the wall fits the central
    // panel. The 8 x 8 wall of 32-px images is 256 x 256 px at 1x: at 1280x860 with both side
    // panels it fits at 2x (3x = 768 px is taller than the panel), in a 1700x1400 window at
    // 3x (4x = 1024 px is not). A zoom typed in is kept; the heat map shows its scale.
    let mut small = harness(settings(), false);
    ready(&mut small);
    small.run_steps(2);
    assert_eq!(small.state().wall.shown_zoom, 2);
    let mut big = harness_sized(settings(), false, None, [1700.0, 1400.0]);
    ready(&mut big);
    big.run_steps(2);
    assert_eq!(big.state().wall.shown_zoom, 3);
    big.state_mut().settings.zoom = 1;
    big.run_steps(2);
    assert_eq!(big.state().wall.shown_zoom, 1);
    big.state_mut().settings.zoom = 0;
    big.state_mut().settings.heat = ganscope::app::HeatMode::Row;
    big.run_steps(2);
    assert_eq!(big.state().wall.shown_zoom, 3);
    big.get_by_label_contains("std across the group");
}

#[test]
fn without_a_dialog_backend_the_path_field_asks_for_the_path() {
    // NoDialogs answers every dialog with nothing, as rfd does with no portal or zenity: the
    // data path field takes the keyboard focus and a line under it says to type the path
    // (before, only a log line at the bottom said so).
    let mut h = harness(settings(), false);
    ready(&mut h);
    assert!(h.ctx.memory(|m| m.focused()).is_none());
    h.get_by_label("Open dataset…").click();
    h.run_steps(3);
    assert_eq!(
        h.state().prompt.map(|p| p.purpose),
        Some(ganscope::app::dialogs::Purpose::OpenDataset)
    );
    h.get_by_label_contains("No path came from a file dialog");
    assert!(
        h.ctx.memory(|m| m.focused()).is_some(),
        "the field has the focus"
    );
}

#[test]
fn snapshots_of_the_main_panels() {
    let mut h = harness(settings(), false);
    ready(&mut h);
    // The initial (untrained) wall is deterministic: seed 0 weights, fixed noise.
    h.state_mut().settings.tab = Tab::Wall;
    h.run_steps(3);
    h.snapshot("explorer_wall");
    h.get_by_label("Explore").click();
    wait_for(&mut h, "the latent image", |a| {
        a.latent.image.is_some() && a.latent.interp.strip.is_some()
    });
    h.run_steps(3);
    h.snapshot("explorer_explore");
    h.get_by_label("Diagnostics").click();
    h.run_steps(3);
    h.snapshot("explorer_diagnostics");
}

#[test]
fn an_imported_pytorch_generator_opens_and_its_latent_slider_moves_the_image() {
    // `ganscope import` of seed 000's generator (ONNX fixture), then `ganscope --open DIR`.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seed000");
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_generators");
    ganscope::train::import::import_onnx(&ganscope::train::import::ImportSpec {
        onnx: fixtures.join("seed000_cdcgan.onnx"),
        data: ganscope::config::DataConfig {
            kind: ganscope::config::DataKind::Iclevr,
            // Enough real images for the diagnostics' reference and holdout halves.
            limit: Some(240),
            ..Default::default()
        },
        names: Default::default(),
        out: dir.clone(),
    })
    .unwrap();
    // Diagnostics on: the imported generator gets its one check (64-pixel evaluator).
    let s = Settings {
        diagnostics_every: 50,
        ..settings()
    };
    let mut h = harness_opening(s, true, Some(dir));
    ready(&mut h);
    wait_for(&mut h, "the imported generator's check", |a| {
        a.run.last_check.is_some()
    });
    let a = h.state();
    assert_eq!(a.run.run_state, RunState::Paused);
    assert_eq!(a.run.info.as_ref().unwrap().cfg.model.z_dim, 8);
    let c = a.run.last_check.as_ref().unwrap();
    assert!(c.report.prdc.coverage.is_finite(), "{:?}", c.report.prdc);
    assert!(
        a.status
            .log
            .iter()
            .any(|l| l.contains("imported from PyTorch")),
        "{:?}",
        a.status.log
    );
    h.get_by_label("Explore").click();
    wait_for(&mut h, "the first latent image", |a| {
        a.latent.image.is_some()
    });
    let before = h.state().latent.image.clone().unwrap();
    assert_eq!((before.channels, before.height), (3, 64));
    let z0 = h.state().latent.dims[0];
    let rect = h.get_by_role_and_label(Role::Slider, "z[0]").rect();
    let p = if z0 < 0.0 {
        egui::pos2(rect.right() - 4.0, rect.center().y)
    } else {
        egui::pos2(rect.left() + rect.width() * 0.05 + 2.0, rect.center().y)
    };
    h.hover_at(p);
    h.step();
    h.drag_at(p);
    h.step();
    h.drop_at(p);
    h.step();
    wait_for(&mut h, "the re-rendered image", |a| {
        a.latent
            .image
            .as_ref()
            .is_some_and(|im| im.data != before.data)
    });
}
