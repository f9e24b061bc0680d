//! CPU vs accelerator agreement: the same seeded models on the CPU (the engine's own gemm
//! convolutions and fused BatchNorm) and on a CUDA or Metal device (candle's native ops) give
//! the same generator output, losses and weights after a few training steps, and the same
//! evaluator predictions.
//!
//! Needs a binary built with `--features cuda` (or `metal`) and a usable device; anywhere
//! else it prints why and passes, so CPU-only CI runs it as a no-op. Run it with
//! `cargo test --release --features cuda --test device_agreement -- --nocapture`.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ganscope::config::{PRESETS, TrainConfig};
use ganscope::data::{ConditionKind, Dataset};
use ganscope::eval::classifier::{Classifier, EvaluatorConfig};
use ganscope::nn::Pass;
use ganscope::rng::Rng;
use ganscope::train::Trainer;

type Open = fn(usize) -> candle_core::Result<Device>;

/// The accelerator this test binary was built for, if one opens.
fn accelerator() -> Option<Device> {
    let tries: [(bool, Open); 2] = [
        (cfg!(feature = "cuda"), Device::new_cuda),
        (cfg!(feature = "metal"), Device::new_metal),
    ];
    for (built, open) in tries {
        if !built {
            continue;
        }
        match open(0) {
            Ok(d) => return Some(d),
            Err(e) => eprintln!("device_agreement: no device ({e})"),
        }
    }
    eprintln!("device_agreement: skipped (no accelerator in this build or machine)");
    None
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn data_for(c: &TrainConfig) -> Arc<dyn Dataset> {
    let m = &c.model;
    let (k, kind) = match m.condition_kind {
        ConditionKind::None => (10, ConditionKind::OneHot),
        kind => (m.num_conditions, kind),
    };
    Arc::new(common::random_dataset(
        64,
        m.channels,
        m.image_size,
        k,
        kind,
        5,
    ))
}

/// Largest difference over every weight of both networks.
fn weight_diff(a: &Trainer, b: &Trainer) -> f64 {
    let (mut wa, mut wb) = (
        a.generator.store.model_tensors(),
        b.generator.store.model_tensors(),
    );
    wa.extend(a.discriminator.store.model_tensors());
    wb.extend(b.discriminator.store.model_tensors());
    wa.iter()
        .map(|(k, t)| max_abs_diff(t, &wb[k]))
        .fold(0.0, f64::max)
}

/// CPU vs `dev` for one config.
struct Agreement {
    /// Generator output (eval mode) of the fresh networks.
    g_init: f64,
    /// Largest difference of a D or G loss over the steps, relative to max(1, |loss|)
    /// (WGAN critic losses run into the hundreds).
    loss: f64,
    /// Largest weight difference after the steps.
    weights: f64,
    /// Generator output (train mode: batch statistics) after the steps.
    g_after: f64,
}

/// Generator output, losses and weights over `steps` training steps, CPU vs `dev`.
fn compare_training(cfg: &TrainConfig, dtype: DType, dev: &Device, steps: usize) -> Agreement {
    let data = data_for(cfg);
    let mut cpu = Trainer::with_dtype(cfg.clone(), data.clone(), &Device::Cpu, dtype).unwrap();
    let mut acc = Trainer::with_dtype(cfg.clone(), data, dev, dtype).unwrap();
    let m = &cfg.model;
    let b = 8;
    let mut rng = Rng::new(11);
    let z = Tensor::from_vec(rng.normal_vec(b * m.z_dim), (b, m.z_dim), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let k = m.num_conditions;
    // Row r: condition r mod k (one label; a valid multi-hot condition too).
    let c: Vec<f32> = (0..b * k)
        .map(|i| if i % k == (i / k) % k { 1.0 } else { 0.0 })
        .collect();
    let c = Tensor::from_vec(c, (b, k), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let g_cpu = cpu.generator.forward(&z, &c, Pass::eval()).unwrap();
    let g_acc = acc
        .generator
        .forward(
            &z.to_device(dev).unwrap(),
            &c.to_device(dev).unwrap(),
            Pass::eval(),
        )
        .unwrap();
    let g_init = max_abs_diff(&g_cpu, &g_acc);
    let mut loss: f64 = 0.0;
    for _ in 0..steps {
        let (s1, s2) = (cpu.train_step().unwrap(), acc.train_step().unwrap());
        let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1.0);
        loss = loss
            .max(rel(s1.d_loss, s2.d_loss))
            .max(rel(s1.g_loss, s2.g_loss));
    }
    let g_cpu = cpu.generator.forward(&z, &c, Pass::train()).unwrap();
    let g_acc = acc
        .generator
        .forward(
            &z.to_device(dev).unwrap(),
            &c.to_device(dev).unwrap(),
            Pass::train(),
        )
        .unwrap();
    Agreement {
        g_init,
        loss,
        weights: weight_diff(&cpu, &acc),
        g_after: max_abs_diff(&g_cpu, &g_acc),
    }
}

fn small(mut c: TrainConfig) -> TrainConfig {
    c.model.g_ch = c.model.g_ch.min(16);
    c.model.d_ch = c.model.d_ch.min(16);
    c.batch_size = 8;
    c
}

#[test]
fn presets_agree_between_cpu_and_accelerator() {
    let Some(dev) = accelerator() else { return };
    let mut failures = Vec::new();
    for (name, _) in PRESETS {
        let cfg = small(TrainConfig::preset(name).unwrap());
        // f64 isolates the algorithms: CPU and device must agree to rounding, before and
        // after training. f32 is what runs; there Adam, which divides by the gradient's own
        // scale, turns rounding-level gradient differences (a bias before a BatchNorm gets
        // pure rounding noise) into steps of up to lr either way, so after a few steps weights
        // and outputs differ by about lr-sized amounts; the bounds say "same training".
        // Bounds: (G(z) before, relative losses, weights after, G(z) after).
        for (dtype, tol) in [
            (DType::F64, [1e-10, 1e-10, 1e-8, 1e-8]),
            (DType::F32, [1e-4, 1e-2, 5e-3, 5e-2]),
        ] {
            let a = compare_training(&cfg, dtype, &dev, 3);
            println!(
                "{name:<17} {dtype:?}: max|diff| G(z) {:.2e}, losses (3 steps, relative) {:.2e}, weights {:.2e}, G(z) after {:.2e}",
                a.g_init, a.loss, a.weights, a.g_after
            );
            let got = [a.g_init, a.loss, a.weights, a.g_after];
            if got.iter().zip(tol).any(|(g, t)| g.is_nan() || *g > t) {
                failures.push(format!("{name} {dtype:?}: {got:?} (bounds {tol:?})"));
            }
        }
    }
    assert!(failures.is_empty(), "disagreements: {failures:?}");
}

#[test]
fn evaluator_agrees_between_cpu_and_accelerator() {
    let Some(dev) = accelerator() else { return };
    for (size, stem_stride) in [(64, None), (64, Some(1)), (28, None)] {
        let cfg = EvaluatorConfig {
            image_size: size,
            label_names: (0..24).map(|i| format!("l{i}")).collect(),
            stem_stride,
            ..EvaluatorConfig::default()
        };
        let cpu = Classifier::new(&cfg, &Device::Cpu).unwrap();
        let acc = Classifier::new(&cfg, &dev).unwrap();
        let mut rng = Rng::new(5);
        let n = 16 * 3 * size * size;
        let x = Tensor::from_vec(rng.normal_vec(n), (16, 3, size, size), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        for train in [false, true] {
            let (l1, f1) = cpu.forward(&x, Pass::new(train)).unwrap();
            let (l2, f2) = acc
                .forward(&x.to_device(&dev).unwrap(), Pass::new(train))
                .unwrap();
            let (dl, df) = (max_abs_diff(&l1, &l2), max_abs_diff(&f1, &f2));
            println!(
                "evaluator {size}px stem {}, train {train}: logits max|diff| {dl:.3e}, features {df:.3e}",
                cfg.stem_stride()
            );
            assert!(dl < 1e-3 && df < 1e-3, "evaluator disagrees: {dl} {df}");
        }
    }
}
