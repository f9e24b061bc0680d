//! The explorer's engine side without a UI: the session thread's commands and events, the
//! NaN guard (restore the last healthy in-memory snapshot, then pause or lower the LR), exact
//! snapshot / restore, and the renderer thread.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use candle_core::Device;
use ganscope::config::TrainConfig;
use ganscope::train::StepKind;
use ganscope::train::run::LoopEvent;
use ganscope::train::worker::{
    Command, Event, NanPolicy, RenderRequest, Renderer, RunState, Session, SessionSpec,
};

fn small() -> TrainConfig {
    let mut c = TrainConfig::iclevr_small();
    c.data.limit = Some(96);
    c.batch_size = 16;
    c.model.g_ch = 8;
    c.model.d_ch = 8;
    c
}

fn spawn(cfg: TrainConfig, policy: NanPolicy) -> Session {
    ganscope::grad::check_exact_second_order().unwrap();
    let mut spec = SessionSpec::new(cfg, Device::Cpu);
    spec.run = false;
    spec.snapshot_every = 1;
    spec.nan_policy = policy;
    Session::spawn(spec, Arc::new(|| {}))
}

/// Events until `pick` returns Some (30 s at most).
fn until<T>(rx: &Receiver<Event>, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    loop {
        let e = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no event while waiting for {what}"));
        if let Event::Error(m) = &e {
            panic!("session error while waiting for {what}: {m}");
        }
        if let Some(t) = pick(&e) {
            return t;
        }
    }
}

fn step_of(e: &Event) -> Option<u64> {
    match e {
        Event::Loop(LoopEvent::Step(s)) => Some(s.stats.step),
        _ => None,
    }
}

#[test]
fn injected_nan_restores_the_last_healthy_snapshot_and_pauses() {
    let s = spawn(small(), NanPolicy::RestorePause);
    let info = until(&s.events, "ready", |e| match e {
        Event::Ready(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(info.step, 0);
    for want in 1..=3 {
        s.send(Command::Step(StepKind::Both));
        assert_eq!(until(&s.events, "a step", step_of), want);
    }
    s.send(Command::InjectNan);
    s.send(Command::Step(StepKind::Both));
    // The poisoned step 4 either ends with a NaN loss (its update skipped, no Step event) or
    // leaves NaN in the weights with finite losses; either way the guard restores the
    // snapshot of step 3.
    let r = until(&s.events, "the recovery", |e| match e {
        Event::Loop(LoopEvent::Recovered(r)) => Some(r.clone()),
        Event::Loop(LoopEvent::Step(st)) => {
            assert_eq!(st.stats.step, 4, "a step after the poisoned one ran");
            None
        }
        _ => None,
    });
    assert_eq!((r.at, r.to), (4, 3), "{}", r.message);
    assert!(r.message.contains("paused"));
    let w = until(&s.events, "the restored weights", |e| match e {
        Event::Loop(LoopEvent::Weights(w)) => Some(w.clone()),
        _ => None,
    });
    assert_eq!(w.step, 3);
    for (name, t) in &w.params {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} not finite after restore"
        );
    }
    // Training goes on from the restored state.
    s.send(Command::Step(StepKind::Both));
    let st = until(&s.events, "a step after restore", |e| match e {
        Event::Loop(LoopEvent::Step(st)) => Some(st.stats.clone()),
        _ => None,
    });
    assert_eq!(st.step, 4);
    assert!(st.g_loss.is_finite() && st.d_loss.is_finite());
}

#[test]
fn lower_lr_policy_halves_both_rates_and_keeps_running() {
    let cfg = small();
    let (g0, d0) = (cfg.optim.lr_g, cfg.optim.lr_d);
    let s = spawn(cfg, NanPolicy::RestoreLowerLr);
    s.send(Command::Step(StepKind::Both));
    until(&s.events, "a step", step_of);
    s.send(Command::InjectNan);
    s.send(Command::Run);
    let r = until(&s.events, "the recovery", |e| match e {
        Event::Loop(LoopEvent::Recovered(r)) => Some(r.clone()),
        _ => None,
    });
    assert!(r.message.contains("halved"), "{}", r.message);
    let st = until(&s.events, "a step after restore", |e| match e {
        Event::Loop(LoopEvent::Step(st)) if st.stats.g_loss.is_finite() => Some(st.clone()),
        _ => None,
    });
    assert!((st.lr_g - g0 / 2.0).abs() < 1e-12 && (st.lr_d - d0 / 2.0).abs() < 1e-12);
    s.send(Command::Pause);
    until(&s.events, "paused", |e| {
        matches!(e, Event::State(RunState::Paused)).then_some(())
    });
}

#[test]
fn the_collapse_guard_switched_on_mid_run_rolls_back_when_d_wins() {
    // The explorer's "When D wins: roll back": switched on at step 2 (its first snapshot is
    // taken then), it answers the "D accuracy pinned" alarm, rigged here to hold at every step
    // (>= 0%) and to fire at step 5, the first after a 5-step warm-up, over steps 3-5. The
    // newest guard snapshot at or before step 5 - 3 = 2 is the one taken when it was switched
    // on; D's rate is halved, G's kept.
    let mut cfg = small();
    let alarms = &mut cfg.monitor.diagnostics.alarms;
    alarms.d_acc_pinned = 0.0;
    alarms.d_acc_window = 3;
    alarms.warmup_steps = 5;
    cfg.guard.snapshot_every = 2;
    assert_eq!(cfg.guard.on_d_wins, ganscope::config::OnDWins::Alarm);
    let (g0, d0) = (cfg.optim.lr_g, cfg.optim.lr_d);
    let s = spawn(cfg, NanPolicy::RestorePause);
    for want in 1..=2 {
        s.send(Command::Step(StepKind::Both));
        assert_eq!(until(&s.events, "a step", step_of), want);
    }
    s.send(Command::SetOnDWins(ganscope::config::OnDWins::Rollback));
    let log = until(&s.events, "the guard's log line", |e| match e {
        Event::Loop(LoopEvent::Log(m)) if m.contains("when D wins outright") => Some(m.clone()),
        _ => None,
    });
    assert!(
        log.contains("roll back") && log.contains("from step 2"),
        "{log}"
    );
    for _ in 0..3 {
        s.send(Command::Step(StepKind::Both));
    }
    let r = until(&s.events, "the rollback", |e| match e {
        Event::Loop(LoopEvent::Recovered(r)) => Some(r.clone()),
        _ => None,
    });
    assert_eq!((r.at, r.to, r.paused), (5, 2, false), "{}", r.message);
    assert!(
        r.message.contains("D wins outright at step 5"),
        "{}",
        r.message
    );
    s.send(Command::Step(StepKind::Both));
    let st = until(&s.events, "a step after the rollback", |e| match e {
        Event::Loop(LoopEvent::Step(st)) => Some(st.clone()),
        _ => None,
    });
    assert_eq!(
        st.stats.step, 3,
        "training goes on from the snapshot of step 2"
    );
    assert_eq!((st.lr_g, st.lr_d), (g0, d0 * 0.5));
}

#[test]
fn an_explorer_session_writes_its_run_folder() {
    // The explorer trains through the same loop as the CLI: its run folder gets a
    // metrics.jsonl line every `log_every` steps and a checkpoint every `checkpoint_every`.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("explorer-run");
    let mut cfg = small();
    cfg.log_every = 1;
    cfg.checkpoint_every = 2;
    cfg.sample_every = 0;
    ganscope::grad::check_exact_second_order().unwrap();
    let mut spec = SessionSpec::new(cfg, Device::Cpu);
    spec.run = false;
    spec.run_dir = Some(dir.clone());
    let s = Session::spawn(spec, Arc::new(|| {}));
    let info = until(&s.events, "ready", |e| match e {
        Event::Ready(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(info.run_dir.as_deref(), Some(dir.as_path()));
    assert!(!dir.exists(), "nothing is written before the first step");
    for want in 1..=3 {
        s.send(Command::Step(StepKind::Both));
        assert_eq!(until(&s.events, "a step", step_of), want);
    }
    // The step event comes before the sink's writes of that step: wait for the state change
    // that follows them.
    until(&s.events, "paused", |e| {
        matches!(e, Event::State(RunState::Paused)).then_some(())
    });
    let lines = ganscope::checkpoint::read_metrics(&dir).unwrap();
    let steps: Vec<u64> = lines.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(lines[0]["images_per_s"].as_f64().is_some());
    let (_, _, step) = ganscope::train::load_generator(&dir, &Device::Cpu).unwrap();
    assert_eq!(step, 2);
}

#[test]
fn a_run_folder_that_cannot_be_written_is_reported_and_training_goes_on() {
    // Another process holds the folder's lock (two sessions started in the same second
    // would pick the same name): the session says so once and keeps training.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("taken");
    let _other = ganscope::checkpoint::RunLock::acquire(&dir).unwrap();
    let mut cfg = small();
    cfg.log_every = 1;
    ganscope::grad::check_exact_second_order().unwrap();
    let mut spec = SessionSpec::new(cfg, Device::Cpu);
    spec.run = false;
    spec.run_dir = Some(dir.clone());
    let s = Session::spawn(spec, Arc::new(|| {}));
    s.send(Command::Step(StepKind::Both));
    let msg = until(&s.events, "the report", |e| match e {
        Event::Loop(LoopEvent::Log(m)) if m.contains("no longer written") => Some(m.clone()),
        _ => None,
    });
    assert!(msg.contains("in use"), "{msg}");
    for want in 2..=3 {
        s.send(Command::Step(StepKind::Both));
        assert_eq!(until(&s.events, "a step", step_of), want);
    }
    assert!(!dir.join("metrics.jsonl").exists());
}

#[test]
fn snapshot_restore_is_exact() {
    ganscope::grad::check_exact_second_order().unwrap();
    let cfg = small();
    let data: Arc<dyn ganscope::data::Dataset> =
        Arc::new(ganscope::data::open(&cfg.data, cfg.model.image_size).unwrap());
    let mut t = ganscope::train::Trainer::new(cfg, data, &Device::Cpu).unwrap();
    t.train_step().unwrap();
    let snap = t.snapshot().unwrap();
    let a1 = t.train_step().unwrap();
    let a2 = t.train_step().unwrap();
    let w_a = t.generator.store.model_tensors();
    t.restore(&snap).unwrap();
    assert_eq!(t.step, 1);
    let b1 = t.train_step().unwrap();
    let b2 = t.train_step().unwrap();
    assert_eq!(
        (a1, a2),
        (b1, b2),
        "same losses after restore (RNG and sampler restored)"
    );
    for (name, v) in t.generator.store.model_tensors() {
        let d = (v - &w_a[&name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
}

#[test]
fn renderer_answers_the_newest_request_per_slot() {
    let cfg = small();
    let g = ganscope::model::Generator::new(
        &cfg.model,
        ganscope::rng::Rng::new(1),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let w = Arc::new(ganscope::train::worker::GeneratorWeights::of(&g, 0).unwrap());
    let r = Renderer::spawn(Arc::new(|| {}));
    r.set_weights(w);
    let k = cfg.model.num_conditions;
    for id in 1..=5u64 {
        r.request(RenderRequest {
            slot: "latent",
            id,
            z: vec![g.latent(id, 0)],
            c: vec![vec![0.0; k]],
            scene: None,
        });
    }
    let mut got = Vec::new();
    while got.last() != Some(&5) {
        let res = r
            .results
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert_eq!(res.images.n, 1);
        got.push(res.id);
    }
    assert!(
        got.windows(2).all(|p| p[0] < p[1]),
        "answers in order: {got:?}"
    );
    // The image for id 5 is the generator's own output for that latent.
    let direct = g.generate_from(&[g.latent(5, 0)], &[vec![0.0; k]]).unwrap();
    r.request(RenderRequest {
        slot: "latent",
        id: 6,
        z: vec![g.latent(5, 0)],
        c: vec![vec![0.0; k]],
        scene: None,
    });
    let res = r
        .results
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    assert_eq!(res.images.data, direct.data);
}
