//! End-to-end tests of [`Diagnostics`] on constructed "evaluator outputs" whose answers are
//! known: K well-separated Gaussian clusters in feature space, one per class, with class
//! scores that name each sample's true cluster.

use super::*;
use crate::rng::Rng;

const K: usize = 10;
const D: usize = 32;

/// Cluster mean of class c: 10 e_c (pairwise 14.1 apart; within a cluster, sigma = 1 gives
/// distances ~ sqrt(2 D) = 8, so the clusters do not touch).
fn mean_of(c: usize) -> Vec<f32> {
    let mut m = vec![0.0; D];
    m[c] = 10.0;
    m
}

fn sample(rng: &mut Rng, c: usize, sigma: f32) -> Vec<f32> {
    mean_of(c)
        .iter()
        .zip(rng.normal_vec(D))
        .map(|(m, z)| m + sigma * z as f32)
        .collect()
}

/// Scores naming class c (softmax-like, 0.91 on c).
fn scores(c: usize) -> Vec<f32> {
    let mut p = vec![0.01; K];
    p[c] = 0.91;
    p
}

/// Features, scores and condition sets of a sample.
type Drawn = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<u16>>);

/// `n` samples cycling through `classes`: features, scores, condition sets.
fn draw(rng: &mut Rng, n: usize, classes: &[usize], sigma: f32) -> Drawn {
    let mut out = (vec![], vec![], vec![]);
    for i in 0..n {
        let c = classes[i % classes.len()];
        out.0.push(sample(rng, c, sigma));
        out.1.push(scores(c));
        out.2.push(vec![c as u16]);
    }
    out
}

fn all_classes() -> Vec<usize> {
    (0..K).collect()
}

fn spec() -> ClassSpec {
    ClassSpec {
        kind: ConditionKind::OneHot,
        num_classes: K,
    }
}

/// 2000 real samples (200 per class), split 1000 / 1000; K = 10 NDB bins (one per cluster).
fn fitted(rng: &mut Rng) -> (Diagnostics, Vec<Vec<f32>>) {
    let (real, _, labels) = draw(rng, 2000, &all_classes(), 1.0);
    let cfg = DiagnosticsConfig {
        ndb_bins: K,
        ..DiagnosticsConfig::default()
    };
    (Diagnostics::fit(cfg, spec(), &real, &labels).unwrap(), real)
}

#[test]
fn one_class_generator_is_caught_everywhere() {
    // Unconditional run whose generator only ever makes class 3 (1000 samples).
    // - Coverage: every argmax is 3 -> modes covered 1 / 10 = 1/K.
    // - NDB (K = 10 bins, one per cluster, each holding ~100 of the 1000 reference samples):
    //   the 9 other bins are empty (pooled p = 100 / 2000: z ~ -0.1 / sqrt(0.05 * 0.95 *
    //   0.002) = -10.3) and bin 3 holds everything (z ~ 0.9 / sqrt(0.55 * 0.45 * 0.002) = +40): NDB = 10, of which K - 1 = 9 under-represented.
    // - Recall / coverage: generated balls only reach cluster 3, so only its real points
    //   (~1/10) are recalled / covered: both <= ~0.1 (assert < 0.2 and < 0.3 x baseline).
    // - Precision stays at its baseline level (each sample is realistic): > 0.6.
    // - Diversity ("all" group, unconditional run): generated pairs are within one cluster
    //   (mean distance ~ sqrt(2 D) = 7.9), real pairs 9 times in 10 between clusters
    //   (~ sqrt(2 * 100 + 2 D) = 16.2): ratio ~ 7.9 / (0.1 * 7.9 + 0.9 * 16.2) = 0.51, below
    //   a threshold of 0.6 (flagged there; the default 0.5 is meant for per-condition groups).
    let mut rng = Rng::new(100);
    let (dg, _) = fitted(&mut rng);
    let (gf, gp, _) = draw(&mut rng, 1000, &[3], 1.0);
    let r = dg
        .check(Generated {
            features: &gf,
            probs: &gp,
            conditions: &[],
        })
        .unwrap();
    let cov = r.class_coverage.as_ref().unwrap();
    assert_eq!((cov.modes_covered, cov.modes_present), (1, K));
    assert!(r.confusion.is_none() && r.label_hits.is_none());
    assert_eq!(
        (r.ndb.n_significant, r.ndb.n_under, r.ndb.n_over),
        (K, K - 1, 1)
    );
    assert!(r.ndb_baseline.n_significant <= 2, "{:?}", r.ndb_baseline);
    assert!(r.prdc.recall < 0.2 && r.prdc.coverage < 0.2, "{:?}", r.prdc);
    assert!(r.prdc.precision > 0.6, "{:?}", r.prdc);
    // The baseline itself: k = 3 balls of 100 points per cluster in 32-D underfill the
    // manifold, so real-vs-real precision / recall are only ~0.75 (which is why every number
    // is shown beside its baseline); coverage ~ 1 - 2^-5 = 0.97.
    let b = &r.prdc_baseline;
    assert!(
        b.recall > 0.6 && b.precision > 0.6 && b.coverage > 0.9,
        "{b:?}"
    );
    assert!(r.prdc.recall < 0.3 * b.recall && r.prdc.coverage < 0.3 * b.coverage);
    let all = &r.diversity.per_condition[0];
    assert_eq!(r.diversity.per_condition.len(), 1);
    let ratio = all.ratio.unwrap();
    assert!((0.45..0.62).contains(&ratio), "{all:?}");
    let d2 = diversity::compare(
        &[diversity::GroupDiversity {
            condition: None,
            n: 1000,
            mean_distance: all.generated,
            by_size: vec![],
        }],
        &dg.real_diversity,
        0.6,
    );
    assert_eq!(d2.n_flagged, 1);
    // The alarms read it: modes lost, coverage < half its baseline, NDB/K = 1 > 0.75.
    let mut mon = AlarmMonitor::new(AlarmConfig::default());
    let kinds: Vec<_> = mon
        .push_measures(&r.measure_point(500))
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert!(matches!(kinds[0], AlarmKind::ModesLost { .. }));
    assert!(matches!(kinds[1], AlarmKind::CoverageLow { .. }));
    assert!(matches!(kinds[2], AlarmKind::NdbHigh { .. }));
}

#[test]
fn real_against_real_matches_baselines() {
    // A "generator" that samples the real mixture itself (conditional, balanced): every
    // number must sit at its real-vs-real baseline, which it is exchangeable with.
    // - Coverage 10/10, KL ~ 0 (balanced 100 per class: exactly q = p -> 0).
    // - Confusion diagonal: accuracy 1.
    // - NDB: K = 10 bins, expected false positives alpha * K = 0.5: assert <= 2.
    // - P/R/D/C within sampling noise of the baselines (binomial sd <= 0.016 at n = 1000;
    //   assert 0.05) and coverage ~ 1 - 2^-5 = 0.97, density ~ 1.
    // - Diversity ratios ~ 1 (assert 0.9..1.1), nothing flagged.
    let mut rng = Rng::new(200);
    let (dg, _) = fitted(&mut rng);
    let (gf, gp, gc) = draw(&mut rng, 1000, &all_classes(), 1.0);
    let r = dg
        .check(Generated {
            features: &gf,
            probs: &gp,
            conditions: &gc,
        })
        .unwrap();
    let cov = r.class_coverage.as_ref().unwrap();
    assert_eq!(cov.modes_covered, K);
    assert!(cov.kl_data_generated < 1e-9);
    assert_eq!(r.confusion.as_ref().unwrap().accuracy, 1.0);
    assert!(r.ndb.n_significant <= 2, "{:?}", r.ndb);
    assert_eq!(r.baseline_n, 1000);
    let (p, b) = (&r.prdc, &r.prdc_baseline);
    for (x, y) in [
        (p.precision, b.precision),
        (p.recall, b.recall),
        (p.coverage, b.coverage),
    ] {
        assert!((x - y).abs() < 0.05, "{p:?} vs {b:?}");
    }
    assert!((p.density - b.density).abs() < 0.1 && (p.density - 1.0).abs() < 0.15);
    assert!((p.coverage - 0.969).abs() < 0.03, "{p:?}");
    assert_eq!(r.diversity.per_condition.len(), K + 1);
    assert_eq!(r.diversity.n_flagged, 0);
    for c in &r.diversity.per_condition {
        let x = c.ratio.unwrap();
        assert!((0.9..1.1).contains(&x), "{c:?}");
    }
    // Real closest pairs come from the holdout and use indices into the real set.
    assert_eq!(r.closest_real.len(), 8);
    assert!(
        r.closest_real
            .iter()
            .all(|q| dg.holdout.contains(&q.i) && q.i < q.j)
    );
    // Nothing to alarm about.
    let mut mon = AlarmMonitor::new(AlarmConfig::default());
    assert!(mon.push_measures(&r.measure_point(500)).is_empty());
}

#[test]
fn conditional_collapse_per_class() {
    // Conditional run that obeys its conditions (confusion accuracy 1, coverage 10/10) but
    // draws a single image per class: a typical sample x_c of the class plus noise of
    // sigma 0.01. The class histogram looks perfect, yet
    // - every class's diversity ratio is ~0.01 / 1 (all 10 flagged; "all" is not: pairs of
    //   different classes are still ~16 apart, ratio ~ 0.9 * 16.2 / 15.4 = 0.95);
    // - recall ~0: each generated ball has radius ~0.01 and holds no real point;
    // - coverage ~0.05: by the k-NN symmetry, a point drawn from a cluster falls in about
    //   k = 5 of its 100 real points' 5-NN balls, so ~5 of 100 real points per class are
    //   covered (assert < 0.15);
    // - the closest generated pairs are ~100x closer than the real ones (assert 50x).
    let mut rng = Rng::new(300);
    let (dg, _) = fitted(&mut rng);
    let anchors: Vec<Vec<f32>> = (0..K).map(|c| sample(&mut rng, c, 1.0)).collect();
    let (mut gf, gp, gc) = draw(&mut rng, 1000, &all_classes(), 0.01);
    for (i, f) in gf.iter_mut().enumerate() {
        let c = i % K;
        for (v, (a, m)) in f.iter_mut().zip(anchors[c].iter().zip(mean_of(c))) {
            *v += a - m;
        }
    }
    let r = dg
        .check(Generated {
            features: &gf,
            probs: &gp,
            conditions: &gc,
        })
        .unwrap();
    assert_eq!(r.class_coverage.as_ref().unwrap().modes_covered, K);
    assert_eq!(r.confusion.as_ref().unwrap().accuracy, 1.0);
    let flagged: Vec<_> = r
        .diversity
        .per_condition
        .iter()
        .filter(|c| c.flagged)
        .map(|c| c.condition)
        .collect();
    assert_eq!(flagged, (0..K as u16).map(Some).collect::<Vec<_>>());
    assert!(r.diversity.min_ratio.unwrap() < 0.02);
    assert!(
        r.prdc.recall < 0.05 && r.prdc.coverage < 0.15,
        "{:?}",
        r.prdc
    );
    assert!(r.closest_generated[0].distance * 50.0 < r.closest_real[0].distance);
    let mut mon = AlarmMonitor::new(AlarmConfig::default());
    let a = mon.push_measures(&r.measure_point(900));
    assert!(
        a.iter()
            .any(|x| matches!(x.kind, AlarmKind::DiversityLow { .. }))
    );
    assert!(
        !a.iter()
            .any(|x| matches!(x.kind, AlarmKind::ModesLost { .. }))
    );
}

#[test]
fn multi_label_run_gets_label_hits() {
    // K = 24 labels (i-CLEVR layout); each sample conditioned on {c, c + 8} for colour c in
    // 0..8 (a cube and a sphere of one colour), features from cluster c. The scores rank
    // both asked labels first, except for green (colour 3): its sphere (label 11) scores
    // 0.1 below a distractor (label 20, 0.7), so top-2 = {3, 20}: green cube hits, green
    // sphere never does. Hit rates: 1 for every cube and sphere but green sphere (0).
    // Cylinders are never asked for: None.
    let mut rng = Rng::new(400);
    let n = 400;
    let (mut feats, mut probs, mut conds) = (vec![], vec![], vec![]);
    for i in 0..n {
        let c = i % 8;
        feats.push(sample(&mut rng, c, 1.0));
        let mut p = vec![0.05f32; 24];
        p[c] = 0.9;
        p[c + 8] = if c == 3 { 0.1 } else { 0.8 };
        if c == 3 {
            p[20] = 0.7;
        }
        probs.push(p);
        conds.push(vec![c as u16, (c + 8) as u16]);
    }
    let real_labels = conds.clone();
    let spec = ClassSpec {
        kind: ConditionKind::MultiHot,
        num_classes: 24,
    };
    let cfg = DiagnosticsConfig {
        ndb_bins: 8,
        ..DiagnosticsConfig::default()
    };
    let r = DiagnosticsReport::compute(
        &cfg,
        spec,
        &feats,
        &real_labels,
        Generated {
            features: &feats,
            probs: &probs,
            conditions: &conds,
        },
    )
    .unwrap();
    assert!(r.class_coverage.is_none() && r.confusion.is_none());
    let h = r.label_hits.as_ref().unwrap();
    let g = h.heat_map.as_ref().unwrap();
    assert_eq!(g[1][3], Some(0.0));
    assert_eq!(g[0][3], Some(1.0));
    assert_eq!(g[1][4], Some(1.0));
    assert_eq!(g[2][0], None);
    // 8 colours x 2 labels, 50 samples each; only green spheres (50 labels of 800) miss.
    assert!((h.accuracy - 750.0 / 800.0).abs() < 1e-12);
    // 1 "all" group + 24 labels; cylinders (16..24) have no samples on either side.
    assert_eq!(r.diversity.per_condition.len(), 25);
    assert!(r.diversity.per_condition[17].generated.is_none());
}

#[test]
fn report_serialises_and_is_deterministic() {
    let mut rng = Rng::new(500);
    let (real, _, labels) = draw(&mut rng, 400, &all_classes(), 1.0);
    let (gf, gp, _) = draw(&mut rng, 150, &[1, 2, 3], 1.0);
    let cfg: DiagnosticsConfig = serde_json::from_str(r#"{"ndb_bins": 12, "seed": 7}"#).unwrap();
    assert_eq!(cfg.pr_k, 3);
    assert_eq!(cfg.alarms, AlarmConfig::default());
    let g = Generated {
        features: &gf,
        probs: &gp,
        conditions: &[],
    };
    let mut a = DiagnosticsReport::compute(&cfg, spec(), &real, &labels, g).unwrap();
    let mut b = DiagnosticsReport::compute(&cfg, spec(), &real, &labels, g).unwrap();
    // Baselines at the generated size: min(150, 200 holdout).
    assert_eq!(
        (a.baseline_n, a.n_real_reference, a.n_real_holdout),
        (150, 200, 200)
    );
    a.timings = Timings::default();
    b.timings = Timings::default();
    assert_eq!(a, b);
    // One metrics.jsonl line; it parses back (floats to within serde_json's parsing, which
    // may differ from the printed value in the last bit).
    let line = serde_json::to_string(&a).unwrap();
    assert!(!line.contains('\n'));
    let back: DiagnosticsReport = serde_json::from_str(&line).unwrap();
    assert_eq!(back.ndb.significant, a.ndb.significant);
    assert_eq!(back.closest_real, a.closest_real);
    assert!((back.prdc.density - a.prdc.density).abs() < 1e-12);
    let json = serde_json::to_string(&DiagnosticsConfig::default()).unwrap();
    assert_eq!(
        serde_json::from_str::<DiagnosticsConfig>(&json).unwrap(),
        DiagnosticsConfig::default()
    );
    // Bad inputs are errors, not panics.
    let bad = DiagnosticsConfig {
        ndb_alpha: 1.5,
        ..cfg.clone()
    };
    assert!(Diagnostics::fit(bad, spec(), &real, &labels).is_err());
    assert!(Diagnostics::fit(cfg.clone(), spec(), &real[..20], &labels[..20]).is_err());
    let dg = Diagnostics::fit(cfg, spec(), &real, &labels).unwrap();
    let nan = vec![vec![f32::NAN; D]; 10];
    assert!(
        dg.check(Generated {
            features: &nan,
            probs: &[],
            conditions: &[]
        })
        .is_err()
    );
    assert!(
        dg.check(Generated {
            features: &gf,
            probs: &gp[..3],
            conditions: &[]
        })
        .is_err()
    );
}

/// Timing at the issue's budget: 2000 real (1000 / 1000 split) and 2000 generated features
/// of dimension 128, default config (50 NDB bins). Run with
/// `cargo test --lib diagnostics::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let mut rng = Rng::new(600);
    let dim = 128;
    let gen_rows = |rng: &mut Rng, n: usize| -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                let c = i % 10;
                rng.normal_vec(dim)
                    .into_iter()
                    .enumerate()
                    .map(|(j, v)| v as f32 + if j == c { 8.0 } else { 0.0 })
                    .collect()
            })
            .collect()
    };
    for (n_real, n_gen) in [(2000, 2000), (4000, 2000)] {
        let real = gen_rows(&mut rng, n_real);
        let labels: Vec<Vec<u16>> = (0..n_real).map(|i| vec![(i % 10) as u16]).collect();
        let gf = gen_rows(&mut rng, n_gen);
        let gp: Vec<Vec<f32>> = (0..n_gen).map(|i| scores(i % 10)).collect();
        let gc: Vec<Vec<u16>> = (0..n_gen).map(|i| vec![(i % 10) as u16]).collect();
        let t = Instant::now();
        let dg = Diagnostics::fit(DiagnosticsConfig::default(), spec(), &real, &labels).unwrap();
        let fit = t.elapsed().as_secs_f64() * 1e3;
        let g = Generated {
            features: &gf,
            probs: &gp,
            conditions: &gc,
        };
        let r1 = dg.check(g).unwrap();
        let r2 = dg.check(g).unwrap();
        let t = Instant::now();
        let cp = closest_pairs(&gf, 8).unwrap();
        let cp_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "n_real {n_real} n_gen {n_gen} d {dim}: fit {fit:.1} ms (kmeans {} iters); \
             first check {:?}; second check (baseline cached) {:.1} ms; closest pairs alone \
             {cp_ms:.1} ms ({} pairs)",
            dg.bins.iterations,
            r1.timings,
            r2.timings.check_ms,
            cp.len()
        );
    }
}
