//! `ganscope eval`: a generator scored by an evaluator.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use ganscope::data::{self, Dataset};
use ganscope::eval::fid::{self, FidInception};
use ganscope::eval::frechet;

/// Images per Inception forward pass.
const FID_BATCH: usize = 25;

use super::*;

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// Condition lists (JSON, i-CLEVR test.json style); repeatable. Class models default to
    /// every class.
    #[arg(long)]
    pub(crate) conditions: Vec<PathBuf>,
    /// Number of noise seeds per condition list.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) seeds: u64,
    /// Class models without --conditions: images per class and seed.
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub(crate) per_class: usize,
    /// Unconditional models: images per seed whose predicted classes make the histogram.
    #[arg(long, default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_000_000))]
    pub(crate) n: usize,
    /// Evaluator folder (default checkpoints/evaluator-<dataset>), or a PyTorch checkpoint of
    /// the course's i-CLEVR evaluator (`checkpoint.pth`, torchvision resnet18, read as is).
    #[arg(long)]
    pub(crate) evaluator: Option<PathBuf>,
    /// Real images for the Fréchet distance (default: the run's dataset, if it can be opened).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Real images used for the Fréchet distance.
    #[arg(long, default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_000_000))]
    pub(crate) n_real: usize,
    /// Also compute pytorch-fid's FID (and KID) of the generated images against --n-real
    /// real images of the run's dataset, with pytorch-fid's weights
    /// (pt_inception-2015-12-05-6726825d.pth, not shipped). Slow on a CPU.
    #[arg(long, value_name = "FILE")]
    pub(crate) fid_weights: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// Truncation trick: redraw every latent entry beyond +-T (BigGAN); 0 = off. Default: the
    /// run's `sampling.truncation` (off unless its config.json sets it).
    #[arg(long, value_name = "T")]
    pub(crate) truncation: Option<f64>,
    /// Sequential models: build each condition's scene one object at a time in the file's
    /// label order and score the final image, every intermediate image against the labels
    /// added so far, and (on synthetic training scenes) how much of the previous image a step
    /// keeps.
    #[arg(long)]
    pub(crate) sequential: bool,
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    use ganscope::eval::classifier::Classifier;
    use ganscope::eval::metrics::{active_labels, frechet_distance, topk_accuracy};
    let dev = device(&a.device)?;
    // The weights first: a wrong file is an error before any work.
    let fid_net = match &a.fid_weights {
        Some(p) => Some(load_fid_inception(p, &dev)?),
        None => None,
    };
    // Inception pool3 features of generated images, for FID.
    let mut gen_fid: Vec<Vec<f32>> = Vec::new();
    let (mut g, cfg, step) = ganscope::train::load_generator(&a.run, &dev)?;
    set_truncation(&mut g, a.truncation)?;
    println!("{} at step {step}", a.run.display());
    let m = &cfg.model;
    let ev_dir = match &a.evaluator {
        Some(p) => p.clone(),
        None => default_evaluator(&cfg),
    };
    let ev = if a.evaluator.is_some() {
        Classifier::load(&ev_dir, &dev)
    } else {
        ganscope::train::monitor::load_evaluator(&ev_dir, &cfg, &dev)
    }
    .with_context(|| format!("loading the evaluator from {}", ev_dir.display()))?;
    // An unconditional generator has no labels of its own: only the geometry must match.
    let want = if m.num_conditions == 0 {
        &ev.cfg.label_names
    } else {
        &m.label_names
    };
    ev.check_fits(&ev_dir, m.channels, m.image_size, want)?;
    let names = &m.label_names;
    let one_hot = m.condition_kind == ganscope::data::ConditionKind::OneHot;
    let mut lists: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    for p in &a.conditions {
        lists.push((p.display().to_string(), read_condition_file(p)?));
    }
    let mut gen_feats = Vec::new();
    if a.sequential && g.sequential().is_none() {
        bail!(
            "--sequential scores a scene built one object at a time: {} is not a sequential \
             model (model.arch {:?})",
            a.run.display(),
            m.arch
        );
    }
    if a.sequential && lists.is_empty() {
        bail!("--sequential needs --conditions (e.g. test.json)");
    }
    if m.num_conditions == 0 {
        if !lists.is_empty() {
            bail!(
                "{} is unconditional: --conditions does not apply",
                a.run.display()
            );
        }
        gen_feats = eval_class_histogram(
            &g,
            &ev,
            a.n,
            a.seeds,
            &dev,
            fid_net.as_ref().map(|n| (n, &mut gen_fid)),
        )?;
    } else if lists.is_empty() {
        if !one_hot {
            bail!("give --conditions (e.g. test.json) for a multi-label model");
        }
        if a.per_class == 0 {
            bail!("--per-class must be at least 1");
        }
        let all: Vec<Vec<String>> = (0..m.num_conditions)
            .flat_map(|i| vec![vec![i.to_string()]; a.per_class])
            .collect();
        lists.push((format!("every class x {}", a.per_class), all));
    }
    for (name, items) in &lists {
        let conds: Vec<Vec<f32>> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                parse_condition(names, it, one_hot).with_context(|| format!("{name}: entry {i}"))
            })
            .collect::<Result<_>>()?;
        let truth: Vec<Vec<u16>> = conds.iter().map(|c| active_labels(c)).collect();
        let mut accs = Vec::new();
        let mut per_label = vec![(0usize, 0usize); names.len()];
        // Sequential scoring: each step's accuracy against the labels added so far.
        let orders: Vec<Vec<usize>> = truth_in_file_order(names, items);
        let longest = orders.iter().map(Vec::len).max().unwrap_or(0);
        let mut step_accs: Vec<Vec<f64>> = vec![Vec::new(); longest];
        // The first step's images hold one object each: what the evaluator reads instead.
        let mut first_read = vec![vec![0usize; names.len()]; names.len()];
        for seed in 0..a.seeds {
            let imgs = if a.sequential {
                let z: Vec<Vec<f32>> = (0..conds.len())
                    .map(|i| g.latent(seed * 1_000_003, i))
                    .collect();
                let mut steps = g.scene_from(&z, &orders)?;
                for (j, acc) in step_accs.iter_mut().enumerate() {
                    // Images with at least j + 1 objects, against their first j + 1 labels.
                    let rows: Vec<usize> =
                        (0..orders.len()).filter(|&i| orders[i].len() > j).collect();
                    let sub = ganscope::images::Images {
                        n: rows.len(),
                        data: rows
                            .iter()
                            .flat_map(|&i| steps[j + 1].image(i).to_vec())
                            .collect(),
                        ..steps[j + 1].clone()
                    };
                    let so_far: Vec<Vec<u16>> = rows
                        .iter()
                        .map(|&i| orders[i][..=j].iter().map(|&l| l as u16).collect())
                        .collect();
                    let (sc, _) = ev.predict(&sub.to_tensor(&dev)?)?;
                    acc.push(topk_accuracy(&sc, &so_far)?.accuracy());
                    if j == 0 {
                        for (row, t) in sc.iter().zip(&so_far) {
                            if let (Some(&l), Some(top)) = (t.first(), top1(row)) {
                                first_read[l as usize][top] += 1;
                            }
                        }
                    }
                }
                steps.pop().context("a scene with no steps")?
            } else {
                g.generate(conds.len(), &conds, seed * 1_000_003)?
            };
            let x = imgs.to_tensor(&dev)?;
            let (scores, feats) = ev.predict(&x)?;
            if let Some(net) = &fid_net {
                gen_fid.extend(fid::tensor_features(net, &x, 3, FID_BATCH)?);
            }
            let r = topk_accuracy(&scores, &truth)?;
            accs.push(r.accuracy());
            for (acc, (n, h)) in per_label.iter_mut().zip(&r.per_label) {
                acc.0 += n;
                acc.1 += h;
            }
            gen_feats.extend(feats);
        }
        let (mean, sd) = mean_sd(&accs);
        println!(
            "{name}: top-k accuracy {mean:.4} +- {sd:.4} over {} seeds ({} labels each)",
            a.seeds,
            truth.iter().map(Vec::len).sum::<usize>()
        );
        let rates: Vec<String> = per_label
            .iter()
            .zip(names)
            .filter(|((n, _), _)| *n > 0)
            .map(|((n, h), l)| format!("{l} {:.2}", *h as f64 / *n as f64))
            .collect();
        println!("  per-label hit rate: {}", rates.join(", "));
        if a.sequential {
            println!(
                "  {}",
                first_object_misreadings(names, &first_read, MISREAD_SHOWN)
            );
            for (j, acc) in step_accs.iter().enumerate() {
                let (m, sd) = mean_sd(acc);
                println!(
                    "  after object {}: top-k accuracy {m:.4} +- {sd:.4} against the labels added so far",
                    j + 1
                );
            }
        }
    }
    if a.sequential {
        sequential_preservation(&a, &g, &cfg)?;
    }
    let mut dc = cfg.data.clone();
    if let Some(p) = &a.data {
        dc.path = Some(p.clone());
    }
    match data::open(&dc, m.image_size) {
        Ok(ds) => {
            let n = a.n_real.min(ds.len());
            let mut idx: Vec<usize> = (0..ds.len()).collect();
            ganscope::rng::Rng::new(7).shuffle(&mut idx);
            let (x, _) = ds.batch(&idx[..n], &dev)?;
            let (_, real_feats) = ev.predict(&x)?;
            let fd = frechet_distance(&gen_feats, &real_feats)?;
            println!(
                "domain-feature FD (evaluator features, not FID): {fd:.3} ({} generated vs {n} real images)",
                gen_feats.len()
            );
            prdc_line(&gen_feats, &real_feats);
            if let Some(net) = &fid_net {
                let real_fid = fid::tensor_features(net, &x, 3, FID_BATCH)?;
                let fid = frechet::frechet_distance(&gen_fid, &real_fid)?;
                let (kid, kid_sd) = frechet::kid(
                    &gen_fid,
                    &real_fid,
                    frechet::KID_SUBSETS,
                    frechet::KID_SUBSET_SIZE,
                    1,
                )?;
                println!(
                    "FID (pytorch-fid's Inception pool3): {fid:.3}, KID {kid:.5} +- {kid_sd:.5} ({} generated vs {n} real images at {}x{}, resized to 299x299)",
                    gen_fid.len(),
                    m.image_size,
                    m.image_size
                );
            }
        }
        Err(e) => {
            println!("domain-feature FD skipped: cannot open the real data ({e})");
            if fid_net.is_some() {
                bail!("FID needs the run's real images: cannot open the data ({e}); give --data");
            }
        }
    }
    Ok(())
}

/// Precision, recall, density and coverage (Naeem et al. 2020, the diagnostics' k) of the
/// generated features against the first half of the real ones, beside the real-vs-real
/// baseline of the second half; both sides compare the same number of points.
fn prdc_line(gen_feats: &[Vec<f32>], real_feats: &[Vec<f32>]) {
    use ganscope::diagnostics::RealManifold;
    let k = ganscope::config::DiagnosticsConfig::default();
    let half = real_feats.len() / 2;
    let m = half.min(gen_feats.len());
    if m <= k.pr_k.max(k.dc_k) {
        println!("coverage skipped: {m} points are too few");
        return;
    }
    let res = RealManifold::new(&real_feats[..half], k.pr_k, k.dc_k).and_then(|man| {
        Ok((
            man.evaluate(&gen_feats[..m])?,
            man.evaluate(&real_feats[half..half + m])?,
        ))
    });
    match res {
        Ok((g, r)) => println!(
            "evaluator features, {m} generated vs {half} real (real-vs-real in brackets): \
             coverage {:.3} ({:.3}), density {:.3} ({:.3}), precision {:.3} ({:.3}), recall {:.3} ({:.3})",
            g.coverage,
            r.coverage,
            g.density,
            r.density,
            g.precision,
            r.precision,
            g.recall,
            r.recall
        ),
        Err(e) => println!("coverage skipped: {e}"),
    }
}

/// Mean and sample standard deviation over seeds (sd 0 for a single seed).
pub(crate) fn mean_sd(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let sd =
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt();
    (mean, sd)
}

/// An unconditional generator against a class evaluator: for each seed, the histogram of the
/// evaluator's top class over `n` images, the classes covered (at least a quarter of the
/// uniform share) and KL(histogram || uniform) in nats; mean +- sd over the seeds. Returns the
/// evaluator features of every image (for the Fréchet distance).
pub(crate) fn eval_class_histogram(
    g: &ganscope::model::Generator,
    ev: &ganscope::eval::classifier::Classifier,
    n: usize,
    seeds: u64,
    dev: &Device,
    mut fid_feats: Option<(&FidInception, &mut Vec<Vec<f32>>)>,
) -> Result<Vec<Vec<f32>>> {
    if n == 0 || seeds == 0 {
        bail!("--n and --seeds must be at least 1");
    }
    let names = ev.cfg.label_names.clone();
    let k = names.len();
    if k < 2 {
        bail!("the evaluator has {k} classes: no histogram to judge");
    }
    let mut feats_all = Vec::new();
    let (mut kls, mut covered) = (Vec::new(), Vec::new());
    let mut total = vec![0usize; k];
    for seed in 0..seeds {
        let mut probs = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let m = 500.min(n - i);
            let z: Vec<Vec<f32>> = (i..i + m).map(|j| g.latent(seed * 1_000_003, j)).collect();
            let imgs = g.generate_from(&z, &vec![vec![]; m])?;
            let x = imgs.to_tensor(dev)?;
            let (p, feats) = ev.predict(&x)?;
            if let Some((net, out)) = fid_feats.as_mut() {
                out.extend(fid::tensor_features(net, &x, 3, FID_BATCH)?);
            }
            probs.extend(p);
            feats_all.extend(feats);
            i += m;
        }
        let s = ganscope::eval::metrics::class_spread(&probs, k)?;
        kls.push(s.kl_uniform);
        covered.push(s.covered as f64);
        for (t, h) in total.iter_mut().zip(&s.counts) {
            *t += h;
        }
    }
    let (kl, kl_sd) = mean_sd(&kls);
    let (cov, cov_sd) = mean_sd(&covered);
    println!(
        "class histogram over {n} images x {seeds} seeds: KL(histogram || uniform) {kl:.4} +- {kl_sd:.4} nats, classes covered {cov:.1} +- {cov_sd:.1} of {k}"
    );
    let all = n as f64 * seeds as f64;
    let shares: Vec<String> = total
        .iter()
        .zip(&names)
        .map(|(c, l)| format!("{l} {:.3}", *c as f64 / all))
        .collect();
    println!("  shares: {}", shares.join(", "));
    Ok(feats_all)
}

/// How many labels [`first_object_misreadings`] lists.
const MISREAD_SHOWN: usize = 6;

/// The index of the highest score (the lower index on ties; NaN ranks lowest); `None` for an
/// empty row.
fn top1(row: &[f32]) -> Option<usize> {
    (0..row.len()).reduce(|best, i| {
        let (b, x) = (row[best], row[i]);
        if x > b || (b.is_nan() && !x.is_nan()) {
            i
        } else {
            best
        }
    })
}

/// One line on the first step's images (one object on the floor): the `shown` labels the
/// evaluator reads least often as themselves (top-1), each with the label it reads most often
/// instead. `read[t][p]`: images of label t read as p.
fn first_object_misreadings(names: &[String], read: &[Vec<usize>], shown: usize) -> String {
    let mut rows: Vec<(f64, String)> = read
        .iter()
        .enumerate()
        .filter_map(|(t, r)| {
            let n: usize = r.iter().sum();
            let wrong = (0..r.len())
                .filter(|&p| p != t)
                .max_by_key(|&p| (r[p], usize::MAX - p))?;
            (n > 0 && r[t] < n).then(|| {
                let rate = r[t] as f64 / n as f64;
                let line = format!(
                    "{} {:.2} (as {} {}/{n})",
                    names[t], rate, names[wrong], r[wrong]
                );
                (rate, line)
            })
        })
        .collect();
    if rows.is_empty() {
        return "first objects alone: every one read as itself (top-1)".into();
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let list: Vec<String> = rows.into_iter().take(shown).map(|(_, l)| l).collect();
    format!(
        "first objects alone, read as themselves (top-1), the weakest: {}",
        list.join(", ")
    )
}

/// Each entry's label indices in the order the file lists them (entries already checked by
/// `parse_condition`; names that do not resolve are left out).
fn truth_in_file_order(names: &[String], items: &[Vec<String>]) -> Vec<Vec<usize>> {
    items
        .iter()
        .map(|it| {
            it.iter()
                .filter_map(|l| {
                    let l = l.trim();
                    names
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(l))
                        .or_else(|| l.parse::<usize>().ok().filter(|&i| i < names.len()))
                })
                .collect()
        })
        .collect()
}

/// The step's preservation of the previous image on the synthetic training scenes (the
/// renderer's empty floor is the ground truth of where the previous objects are).
fn sequential_preservation(
    a: &EvalArgs,
    g: &ganscope::model::Generator,
    cfg: &ganscope::config::TrainConfig,
) -> Result<()> {
    use ganscope::data::render::{RenderOptions, render_scene};
    let mut dc = cfg.data.clone();
    if let Some(p) = &a.data {
        dc.path = Some(p.clone());
    }
    if dc.path.is_some() {
        println!(
            "preservation skipped: it needs the renderer's ground truth (the synthetic training \
             scenes), not a folder of images"
        );
        return Ok(());
    }
    let size = cfg.model.image_size;
    let ds = data::open(&dc, size).context("opening the synthetic training scenes")?;
    let floor = render_scene(&[], size, RenderOptions::default());
    let p = ganscope::eval::sequential::preservation(g, &ds, &floor, 1000, 0)?;
    println!(
        "preservation over {} additions to training scenes (G adds the labelled object to the real previous image): \
         mean |change| on the previous objects' pixels {:.4} (real next image {:.4}); \
         pixels changed visibly {:.3} (real {:.3})",
        p.steps,
        p.object_change_generated,
        p.object_change_real,
        p.changed_share_generated,
        p.changed_share_real
    );
    Ok(())
}

/// The run's evaluator when `--evaluator` is not given: its config's, else the shipped one for
/// its data and size (found as [`MonitorConfig::evaluator_dir`] says), else the copy of the
/// 32-px i-CLEVR evaluator embedded in this binary (unpacked once into the user's cache), so
/// that `eval` works from any folder.
///
/// [`MonitorConfig::evaluator_dir`]: ganscope::train::monitor::MonitorConfig::evaluator_dir
fn default_evaluator(cfg: &ganscope::config::TrainConfig) -> std::path::PathBuf {
    let found = cfg.monitor.evaluator_dir(cfg);
    if cfg.monitor.evaluator.is_some() || found.exists() {
        return found;
    }
    match super::ship::extract_embedded() {
        Ok(root) => {
            let d = ganscope::train::monitor::default_evaluator_dir(&root, cfg);
            if d.join(ganscope::eval::classifier::CONFIG_FILE).is_file() {
                d
            } else {
                found
            }
        }
        Err(_) => found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_takes_the_first_highest_and_ranks_nan_lowest() {
        assert_eq!(top1(&[0.1, 0.7, 0.7, 0.2]), Some(1));
        assert_eq!(top1(&[f32::NAN, 0.3, 0.5]), Some(2));
        assert_eq!(top1(&[]), None);
    }

    /// Three labels: `a` always read right (left out), `b` read as `c` 3 of 4 times, `c` read
    /// as `a` 1 of 4 times: the weakest first, each with what it is read as most.
    #[test]
    fn misreadings_list_the_weakest_labels_with_their_most_common_reading() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let read = vec![vec![5, 0, 0], vec![0, 1, 3], vec![1, 0, 3]];
        assert_eq!(
            first_object_misreadings(&names, &read, 6),
            "first objects alone, read as themselves (top-1), the weakest: b 0.25 (as c 3/4), \
             c 0.75 (as a 1/4)"
        );
        assert_eq!(
            first_object_misreadings(&names, &read, 1),
            "first objects alone, read as themselves (top-1), the weakest: b 0.25 (as c 3/4)"
        );
        let perfect = vec![vec![2, 0, 0], vec![0, 0, 0], vec![0, 0, 1]];
        assert!(first_object_misreadings(&names, &perfect, 6).contains("every one"));
    }
}
