//! Standing statistics for a trained generator's BatchNorm layers (Brock, Donahue & Simonyan,
//! "Large Scale GAN Training for High Fidelity Natural Image Synthesis", ICLR 2019, appendix:
//! "standing statistics"). The running statistics a generator samples with are an average of
//! training batches drawn by other weights: the trained generator's, while the sampled one is
//! the EMA average ([`crate::train::ema`]), and, for a sequential model, batches whose
//! previous images were real renders (teacher forcing), while sampling builds each scene on
//! the generator's own images. Here they are measured again for the weights that sample, on
//! inputs drawn as sampling draws them: batches of the training data's conditions (for a
//! sequential model, steps of its scenes with the previous image the generator's own, built in
//! eval mode, the steps of all scenes mixed in each batch as in training) and fresh N(0, I)
//! latents, run in train mode with every BatchNorm's statistics pooled over all rows
//! ([`crate::nn::StandingStats`]). Nothing else changes: no weight, no spectral-norm vector.

use candle_core::Tensor;

use crate::data::{Dataset, SceneStep};
use crate::error::{Error, Result};
use crate::model::Generator;
use crate::model::sequential::Addition;
use crate::nn::{Pass, StandingStats};
use crate::rng::Rng;

/// How many rows to measure on, in what batches, from which random stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandingOptions {
    /// Rows (images, or scene steps for a sequential model) in all; rounded up to whole
    /// batches.
    pub rows: usize,
    /// Rows per train-mode pass (the run's `batch_size` is what its statistics were made of).
    pub batch_size: usize,
    pub seed: u64,
}

/// What [`standing_statistics`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandingReport {
    /// BatchNorm layers whose running statistics were replaced.
    pub layers: usize,
    pub rows: usize,
    pub batches: usize,
}

/// The conditions of a training set as its trainer meets them, label indices per entry: for
/// a sequential model each scene's objects in the order its steps add them (one entry per
/// scene, from its last step; images without a scene step are left out, as the trainer leaves
/// them out); otherwise each image's active labels.
pub fn training_orders(ds: &dyn Dataset, sequential: bool) -> Result<Vec<Vec<usize>>> {
    let active = |i: usize| -> Vec<usize> {
        ds.condition(i)
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.5)
            .map(|(l, _)| l)
            .collect()
    };
    if !sequential {
        return Ok((0..ds.len()).map(active).collect());
    }
    let mut is_previous = vec![false; ds.len()];
    for i in 0..ds.len() {
        if let Some(SceneStep::After { previous }) = ds.scene_step(i)
            && let Some(p) = is_previous.get_mut(previous)
        {
            *p = true;
        }
    }
    let mut orders = Vec::new();
    for end in (0..ds.len()).filter(|&i| !is_previous[i] && ds.scene_step(i).is_some()) {
        let mut order = Vec::new();
        let mut i = end;
        // A scene step's chain ends at its first step; the bound guards a malformed cycle.
        for _ in 0..=ds.len() {
            match ds.scene_step(i) {
                Some(SceneStep::First) => {
                    order.extend(active(i));
                    break;
                }
                Some(SceneStep::After { previous }) => {
                    let before = active(previous);
                    order.extend(active(i).into_iter().filter(|l| !before.contains(l)));
                    i = previous;
                }
                None => {
                    return Err(Error::Msg(format!(
                        "image {i} is a scene's earlier step but has no scene step itself"
                    )));
                }
            }
        }
        order.reverse();
        orders.push(order);
    }
    if orders.is_empty() {
        return Err(Error::Msg(
            "the data has no scene steps to measure a sequential generator's statistics on".into(),
        ));
    }
    Ok(orders)
}

/// Replace the running statistics of every BatchNorm layer of `g` with their values over
/// `opts.rows` rows drawn from `orders` ([`training_orders`]) and fresh latents (see the
/// module's header). An error, with nothing changed, for a generator without BatchNorm, an
/// imported one, or orders that do not fit it.
pub fn standing_statistics(
    g: &Generator,
    orders: &[Vec<usize>],
    opts: StandingOptions,
) -> Result<StandingReport> {
    if g.is_imported() {
        return Err(Error::Msg(
            "an imported generator's statistics are part of its graph: nothing to measure".into(),
        ));
    }
    let (k, zd) = (g.cfg.num_conditions, g.cfg.z_dim);
    if opts.batch_size < 2 || opts.rows == 0 {
        return Err(Error::Msg(format!(
            "standing statistics need batches of at least 2 rows and some rows (got {} rows \
             in batches of {})",
            opts.rows, opts.batch_size
        )));
    }
    if k > 0 && orders.is_empty() {
        return Err(Error::Msg(
            "standing statistics need conditions to draw".into(),
        ));
    }
    if let Some(&l) = orders.iter().flatten().find(|&&l| l >= k.max(1)) {
        return Err(Error::Msg(format!(
            "label {l} in the conditions (the generator has K = {k})"
        )));
    }
    let batches = opts.rows.div_ceil(opts.batch_size);
    let rows = batches * opts.batch_size;
    let mut rng = Rng::stream(opts.seed, "standing");
    let (dev, dt) = (g.device().clone(), g.store.dtype());
    let acc = StandingStats::new();
    let pass = Pass::train().frozen().standing(&acc);
    let tensor = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dt)?)
    };
    let hot = |labels: &[usize]| -> Vec<f32> {
        let mut v = vec![0f32; k];
        for &l in labels {
            v[l] = 1.0;
        }
        v
    };
    let normal =
        |rng: &mut Rng| -> Vec<f32> { rng.normal_vec(zd).into_iter().map(|x| x as f32).collect() };
    if let Some(net) = g.sequential() {
        if orders.iter().all(Vec::is_empty) {
            return Err(Error::Msg("no scene holds an object".into()));
        }
        // Scenes drawn until their steps fill the rows; each built in eval mode (the
        // generator's own previous images), every step a row.
        struct Row {
            prev: Tensor,
            z: Tensor,
            added: Vec<f32>,
            so_far: Vec<f32>,
        }
        let mut all: Vec<Row> = Vec::with_capacity(rows + 3);
        const CHUNK: usize = 64;
        while all.len() < rows {
            let chunk: Vec<&Vec<usize>> = (0..CHUNK)
                .map(|_| &orders[rng.below(orders.len())])
                .filter(|o| !o.is_empty())
                .collect();
            if chunk.is_empty() {
                continue;
            }
            let b = chunk.len();
            let z: Vec<f32> = (0..b).flat_map(|_| normal(&mut rng)).collect();
            let z = tensor(z, &[b, zd])?;
            let seqs: Vec<Vec<Addition>> = chunk
                .iter()
                .map(|o| o.iter().map(|&l| (l, 1.0)).collect())
                .collect();
            let steps = net.scene(&z, &seqs, Pass::eval())?;
            let floor = net.floor_batch(1)?;
            for (i, order) in chunk.iter().enumerate() {
                let zi = z.narrow(0, i, 1)?;
                for j in 0..order.len() {
                    let prev = if j == 0 {
                        floor.clone()
                    } else {
                        steps[j - 1].narrow(0, i, 1)?
                    };
                    all.push(Row {
                        prev,
                        z: net.rotated(&zi, j)?,
                        added: hot(&order[j..=j]),
                        so_far: hot(&order[..=j]),
                    });
                }
            }
        }
        rng.shuffle(&mut all);
        for batch in all[..rows].chunks(opts.batch_size) {
            let b = batch.len();
            let prev = Tensor::cat(&batch.iter().map(|r| &r.prev).collect::<Vec<_>>(), 0)?;
            let z = Tensor::cat(&batch.iter().map(|r| &r.z).collect::<Vec<_>>(), 0)?;
            let added = tensor(
                batch.iter().flat_map(|r| r.added.clone()).collect(),
                &[b, k],
            )?;
            let so_far = tensor(
                batch.iter().flat_map(|r| r.so_far.clone()).collect(),
                &[b, k],
            )?;
            net.step(&prev, &z, &added, &so_far, None, pass)?;
        }
    } else {
        for _ in 0..batches {
            let b = opts.batch_size;
            let z: Vec<f32> = (0..b).flat_map(|_| normal(&mut rng)).collect();
            let c: Vec<f32> = (0..b)
                .flat_map(|_| {
                    if k == 0 {
                        Vec::new()
                    } else {
                        hot(&orders[rng.below(orders.len())])
                    }
                })
                .collect();
            g.forward(&tensor(z, &[b, zd])?, &tensor(c, &[b, k])?, pass)?;
        }
    }
    if acc.layers() == 0 {
        return Err(Error::Msg(format!(
            "this generator ({:?}) has no BatchNorm layer: no statistics to measure",
            g.cfg.arch
        )));
    }
    let layers = acc.apply()?;
    Ok(StandingReport {
        layers,
        rows,
        batches,
    })
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;
    use crate::config::TrainConfig;
    use crate::data::render::synthetic_dataset;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A copy of G's saved tensors (the store's own share storage with its variables, which
    /// `set` overwrites in place).
    fn snapshot(g: &crate::model::Generator) -> HashMap<String, Tensor> {
        g.store
            .model_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.copy().unwrap()))
            .collect()
    }

    fn active(ds: &dyn Dataset, i: usize) -> Vec<usize> {
        let c = ds.condition(i);
        (0..c.len()).filter(|&l| c[l] > 0.5).collect()
    }

    /// Six rendered scenes of three steps: one order per scene, three distinct labels each,
    /// and every image with a scene step is exactly one prefix of one order (its labels).
    #[test]
    fn training_orders_are_each_scenes_objects_in_the_order_its_steps_add_them() {
        let ds = synthetic_dataset(6, 32, 1, None);
        let orders = training_orders(&ds, true).unwrap();
        assert_eq!(orders.len(), 6);
        let mut prefixes: Vec<Vec<usize>> = Vec::new();
        for o in &orders {
            assert_eq!(o.len(), 3, "{o:?}");
            assert!(o[0] != o[1] && o[1] != o[2] && o[0] != o[2], "{o:?}");
            for j in 0..o.len() {
                let mut p = o[..=j].to_vec();
                p.sort_unstable();
                prefixes.push(p);
            }
        }
        let mut images: Vec<Vec<usize>> = (0..ds.len())
            .filter(|&i| ds.scene_step(i).is_some())
            .map(|i| active(&ds, i))
            .collect();
        assert_eq!(images.len(), 18);
        prefixes.sort();
        images.sort();
        assert_eq!(prefixes, images);
        // Each order starts with its scene's first image's label.
        let firsts: Vec<usize> = (0..ds.len())
            .filter(|&i| ds.scene_step(i) == Some(SceneStep::First))
            .map(|i| active(&ds, i)[0])
            .collect();
        let mut starts: Vec<usize> = orders.iter().map(|o| o[0]).collect();
        let mut firsts_sorted = firsts.clone();
        starts.sort_unstable();
        firsts_sorted.sort_unstable();
        assert_eq!(starts, firsts_sorted);
        // Other models: every image's labels.
        let all = training_orders(&ds, false).unwrap();
        assert_eq!(all.len(), ds.len());
        assert!((0..ds.len()).all(|i| all[i] == active(&ds, i)));
    }

    /// The tiny sequential preset: only the BatchNorm running statistics change, each to
    /// finite values other than before; the same seed gives the same statistics; bad
    /// requests are refused with nothing changed.
    #[test]
    fn standing_statistics_replace_the_running_statistics_and_nothing_else() {
        let mut cfg = TrainConfig::iclevr_sequential_small();
        cfg.model.g_ch = 4;
        cfg.model.z_dim = 9;
        let ds = synthetic_dataset(6, 32, 1, None);
        let orders = training_orders(&ds, true).unwrap();
        let fresh = || {
            crate::model::Generator::new(&cfg.model, Rng::new(1), DType::F32, &Device::Cpu).unwrap()
        };
        let g = fresh();
        let before = snapshot(&g);
        let opts = StandingOptions {
            rows: 10,
            batch_size: 4,
            seed: 3,
        };
        // Refused: batches of one row, rows of nothing, a label the model does not have.
        for (bad_opts, bad_orders) in [
            (
                StandingOptions {
                    batch_size: 1,
                    ..opts
                },
                orders.clone(),
            ),
            (StandingOptions { rows: 0, ..opts }, orders.clone()),
            (opts, vec![vec![0, cfg.model.num_conditions]]),
            (opts, vec![]),
        ] {
            assert!(standing_statistics(&g, &bad_orders, bad_opts).is_err());
        }
        let unchanged = snapshot(&g);
        assert!(
            before
                .iter()
                .all(|(k, v)| max_abs_diff(v, &unchanged[k]) == 0.0)
        );
        let r = standing_statistics(&g, &orders, opts).unwrap();
        assert_eq!((r.rows, r.batches), (12, 3));
        let after = snapshot(&g);
        let running =
            |m: &HashMap<String, Tensor>| m.keys().filter(|k| k.contains(".running_")).count();
        assert_eq!(r.layers * 2, running(&before));
        assert!(r.layers > 0);
        for (k, v) in &before {
            let d = max_abs_diff(v, &after[k]);
            if k.contains(".running_") {
                assert!(d > 0.0, "{k} unchanged");
                let vals: Vec<f32> = after[k].flatten_all().unwrap().to_vec1().unwrap();
                assert!(vals.iter().all(|x| x.is_finite()), "{k}");
                if k.ends_with("running_var") {
                    assert!(vals.iter().all(|&x| x >= 0.0), "{k}");
                }
            } else {
                assert_eq!(d, 0.0, "{k} changed");
            }
        }
        let again = fresh();
        standing_statistics(&again, &orders, opts).unwrap();
        let again = again.store.model_tensors();
        assert!(after.iter().all(|(k, v)| max_abs_diff(v, &again[k]) == 0.0));
    }

    /// A one-shot model (not sequential) draws its conditions from the orders as label sets.
    #[test]
    fn standing_statistics_of_a_one_shot_generator() {
        let mut cfg = TrainConfig::mnist_cdcgan();
        cfg.model.g_ch = 4;
        cfg.model.z_dim = 5;
        let g = crate::model::Generator::new(&cfg.model, Rng::new(2), DType::F32, &Device::Cpu)
            .unwrap();
        let before = snapshot(&g);
        let orders: Vec<Vec<usize>> = (0..10).map(|l| vec![l]).collect();
        let opts = StandingOptions {
            rows: 16,
            batch_size: 8,
            seed: 0,
        };
        let r = standing_statistics(&g, &orders, opts).unwrap();
        assert_eq!((r.rows, r.batches), (16, 2));
        let after = snapshot(&g);
        assert!(before.iter().all(|(k, v)| {
            let d = max_abs_diff(v, &after[k]);
            if k.contains(".running_") {
                d > 0.0
            } else {
                d == 0.0
            }
        }));
    }
}
