//! The gradient penalties are exact: d(penalty)/d(weights) from candle's double backward
//! matches central finite differences in f64 for every layer type each critic uses
//! (conv, linear, BatchNorm in train mode, layer norm, leaky ReLU, ReLU, average pooling,
//! spectral norm, self-attention, the condition plane, projection). Fails if any relative
//! error exceeds 1e-4.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use candle_core::{DType, Device, Tensor};
use ganscope::config::{Arch, Conditioning, DNorm, ModelConfig};
use ganscope::data::ConditionKind;
use ganscope::grad::GradMode;
use ganscope::model::Discriminator;
use ganscope::nn::Pass;
use ganscope::rng::Rng;
use ganscope::train::loss::{gradient_penalty, r1_penalty};

fn tensor(rng: &mut Rng, shape: &[usize], std: f64, mean: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = rng
        .normal_vec(n)
        .into_iter()
        .map(|x| mean + std * x)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Case {
    name: &'static str,
    cfg: ModelConfig,
    /// BatchNorm needs train mode (batch statistics); spectral norm is checked with u fixed
    /// (eval mode), which is what the training graph sees after its power iteration.
    train: bool,
}

fn cases() -> Vec<Case> {
    let base = ModelConfig {
        d_ch: 4,
        g_ch: 4,
        ..ModelConfig::default()
    };
    let onehot = |mut m: ModelConfig, cond: Conditioning| {
        m.num_conditions = 3;
        m.condition_kind = ConditionKind::OneHot;
        m.conditioning = cond;
        m
    };
    vec![
        Case {
            name: "dcgan critic, layer norm, condition plane (fmnist-cwgan-gp)",
            cfg: onehot(
                ModelConfig {
                    d_norm: DNorm::Layer,
                    ..base.clone()
                },
                Conditioning::Concat,
            ),
            train: true,
        },
        Case {
            name: "dcgan critic, BatchNorm (train mode), unconditional",
            cfg: ModelConfig {
                d_norm: DNorm::Batch,
                ..base.clone()
            },
            train: true,
        },
        Case {
            name: "dcgan critic, ACGAN head with label input, no norm, 32x32 RGB",
            cfg: onehot(
                ModelConfig {
                    d_norm: DNorm::None,
                    image_size: 32,
                    channels: 3,
                    label_input: true,
                    ..base.clone()
                },
                Conditioning::Acgan,
            ),
            train: true,
        },
        Case {
            name: "dcgan critic, spectral norm, projection, attention at 8",
            cfg: onehot(
                ModelConfig {
                    d_norm: DNorm::None,
                    image_size: 32,
                    d_spectral_norm: true,
                    attention: Some(8),
                    ..base.clone()
                },
                Conditioning::Projection,
            ),
            train: false,
        },
        Case {
            name: "resnet critic, spectral norm, self-attention at 16, projection (sagan)",
            cfg: onehot(
                ModelConfig {
                    arch: Arch::Resnet,
                    d_norm: DNorm::None,
                    image_size: 32,
                    channels: 3,
                    d_spectral_norm: true,
                    attention: Some(16),
                    ..base.clone()
                },
                Conditioning::Projection,
            ),
            train: false,
        },
        Case {
            name: "sequential pair critic: (previous, next) stacked, [added, so far] projection + aux head, minibatch std, spectral norm (iclevr-sequential)",
            cfg: ModelConfig {
                arch: Arch::Sequential,
                d_norm: DNorm::None,
                image_size: 32,
                channels: 3,
                d_spectral_norm: true,
                num_conditions: 3,
                condition_kind: ConditionKind::MultiHot,
                conditioning: Conditioning::Projection,
                aux_head: true,
                minibatch_std: true,
                g_object_layers: 3,
                ..base.clone()
            },
            train: false,
        },
    ]
}

/// Relative error with a floor on the scale, so entries whose gradient is ~0 compare
/// absolutely at 1e-7 (finite-difference round-off in f64 is about 1e-11 here).
fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-7)
}

fn check(case: &Case, which: &str) -> f64 {
    let dev = Device::Cpu;
    let m = &case.cfg;
    let d = Discriminator::new(m, Rng::new(11), DType::F64, &dev).unwrap();
    // Random weights far from init (attention's gamma starts at 0, which would hide it).
    let mut rng = Rng::new(12);
    for (name, var) in d.store.trainable() {
        let dims = var.dims().to_vec();
        let t = if dims.len() == 1 {
            let mean = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            tensor(&mut rng, &dims, 0.5, mean)
        } else {
            let fan_in: usize = dims[1..].iter().product();
            tensor(&mut rng, &dims, 1.0 / (fan_in as f64).sqrt(), 0.0)
        };
        var.set(&t).unwrap();
    }
    let b = 3;
    // A sequential model's critic sees (previous, next) pairs and [added, so far] conditions.
    let pair = m.arch == Arch::Sequential;
    let c = if pair { 2 * m.channels } else { m.channels };
    let s = m.image_size;
    let real = tensor(&mut rng, &[b, c, s, s], 0.5, 0.0);
    let fake = tensor(&mut rng, &[b, c, s, s], 0.5, 0.0);
    let eps = Tensor::new(&[0.2f64, 0.5, 0.9], &dev)
        .unwrap()
        .reshape((b, 1, 1, 1))
        .unwrap();
    let cond = Tensor::new(
        &[[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
        &dev,
    )
    .unwrap()
    .narrow(1, 0, m.num_conditions)
    .unwrap();
    let cond = if pair {
        // added: one of the labels so far.
        let added = Tensor::new(
            &[[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
            &dev,
        )
        .unwrap();
        let so_far = Tensor::new(
            &[[1.0f64, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
            &dev,
        )
        .unwrap();
        Tensor::cat(&[&added, &so_far], 1).unwrap()
    } else {
        cond
    };
    let train = case.train;
    let penalty = || -> Tensor {
        // As the trainer runs it: the critic's pass carries the mode that the penalty's inner
        // backward sets (input gradients only).
        let mode = GradMode::new();
        let pass = Pass::new(train).with_grad(&mode);
        let critic = |x: &Tensor| Ok(d.forward(x, &cond, pass)?.logits);
        match which {
            "wgan-gp" => gradient_penalty(&real, &fake, &eps, &mode, critic).unwrap(),
            _ => r1_penalty(&real, &mode, critic).unwrap(),
        }
    };
    let p = penalty();
    let grads = p.backward().unwrap();
    let h = 1e-5;
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (name, var) in d.store.trainable() {
        // No gradient means candle found no path from this tensor to the penalty: it must then
        // be zero, which the finite differences below check (e.g. biases right before a
        // piecewise-linear activation do not move the input gradient).
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // Three entries per tensor: the largest-gradient one and two random ones.
        let argmax = (0..g.len())
            .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
            .unwrap();
        for idx in [argmax, rng.below(g.len()), rng.below(g.len())] {
            let eval = |delta: f64| -> f64 {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &dev).unwrap())
                    .unwrap();
                penalty().to_scalar::<f64>().unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &dev).unwrap())
                .unwrap();
            let e = rel_err(g[idx], fd);
            assert!(
                e < 1e-4,
                "{} {which}: {name}[{idx}] analytic {} vs finite difference {fd} (rel err {e:.2e})",
                case.name,
                g[idx]
            );
            worst = worst.max(e);
            checked += 1;
        }
    }
    eprintln!(
        "{} / {which}: {checked} entries, worst rel err {worst:.2e}",
        case.name
    );
    assert!(checked > 0);
    // The penalty really depends on the weights (a constant would pass trivially).
    assert!(p.to_scalar::<f64>().unwrap() > 0.0);
    worst
}

#[test]
fn wgan_gp_gradients_match_finite_differences() {
    for case in cases() {
        check(&case, "wgan-gp");
    }
}

#[test]
fn r1_gradients_match_finite_differences() {
    for case in cases() {
        check(&case, "r1");
    }
}
