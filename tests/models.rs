//! Every preset's generator and discriminator build, produce the right shapes, and name their
//! tensors after the struct fields with PyTorch layouts.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use candle_core::{DType, Device, Tensor};
use ganscope::config::{PRESETS, TrainConfig};
use ganscope::model::{Discriminator, Generator};
use ganscope::nn::Pass;
use ganscope::rng::Rng;

#[test]
fn every_preset_builds_with_the_right_shapes() {
    let dev = Device::Cpu;
    for (name, _) in PRESETS {
        let cfg = TrainConfig::preset(name).unwrap();
        let m = &cfg.model;
        let g = Generator::new(m, Rng::new(1), DType::F32, &dev).unwrap();
        let d = Discriminator::new(m, Rng::new(2), DType::F32, &dev).unwrap();
        let b = 2;
        let z = Tensor::randn(0f32, 1.0, (b, m.z_dim), &dev).unwrap();
        let c = Tensor::zeros((b, m.num_conditions), DType::F32, &dev).unwrap();
        for train in [true, false] {
            let x = g.forward(&z, &c, Pass::new(train)).unwrap();
            assert_eq!(
                x.dims(),
                &[b, m.channels, m.image_size, m.image_size],
                "{name} G"
            );
            let mx = x
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(mx <= 1.0, "{name}: tanh output out of range ({mx})");
            // A sequential model's D judges (previous, next) pairs with [added, so far].
            let pair = m.arch == ganscope::config::Arch::Sequential;
            let (dx, dc, k) = if pair {
                (
                    Tensor::cat(&[&x, &x], 1).unwrap(),
                    Tensor::cat(&[&c, &c], 1).unwrap(),
                    2 * m.num_conditions,
                )
            } else {
                (x.clone(), c.clone(), m.num_conditions)
            };
            let out = d.forward(&dx, &dc, Pass::new(train)).unwrap();
            assert_eq!(out.logits.dims(), &[b], "{name} D logits");
            match m.conditioning {
                _ if ganscope::model::has_aux_head(m) => {
                    assert_eq!(out.aux.unwrap().dims(), &[b, k], "{name} aux")
                }
                _ => assert!(out.aux.is_none()),
            }
        }
        eprintln!(
            "{name}: G {} params, D {} params",
            g.store.num_params(),
            d.store.num_params()
        );
    }
}

#[test]
fn tensor_names_follow_fields_and_pytorch_layouts() {
    let dev = Device::Cpu;
    let cfg = TrainConfig::preset("iclevr-cdcgan").unwrap();
    let g = Generator::new(&cfg.model, Rng::new(1), DType::F32, &dev).unwrap();
    let t = g.store.model_tensors();
    // ConvTranspose2d weights are (in, out, kH, kW): 512 -> 256 at the first upsampling.
    assert_eq!(t["gen.blocks.0.conv.weight"].dims(), &[512, 256, 4, 4]);
    assert_eq!(t["gen.blocks.0.bn.running_mean"].dims(), &[256]);
    // (z + cond_embed, 1, 1) -> (512, 4, 4)
    assert_eq!(t["gen.input.weight"].dims(), &[200, 512, 4, 4]);
    // Linear weights are (out, in).
    assert_eq!(t["gen.cond_embed.weight"].dims(), &[100, 24]);
    let d = Discriminator::new(&cfg.model, Rng::new(2), DType::F32, &dev).unwrap();
    let t = d.store.model_tensors();
    // Conv2d weights are (out, in, kH, kW); 3 image channels + 1 condition plane.
    assert_eq!(t["disc.blocks.0.conv.weight"].dims(), &[64, 4, 4, 4]);
    assert_eq!(t["disc.cond_plane.linear.weight"].dims(), &[64 * 64, 24]);

    let cfg = TrainConfig::preset("iclevr-sagan").unwrap();
    let g = Generator::new(&cfg.model, Rng::new(1), DType::F32, &dev).unwrap();
    assert!(g.store.model_tensors().contains_key("gen.attention.gamma"));
    let d = Discriminator::new(&cfg.model, Rng::new(2), DType::F32, &dev).unwrap();
    assert!(d.store.model_tensors().contains_key("disc.attention.gamma"));
    let mut bad = cfg.clone();
    bad.model.attention = Some(64);
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("[8, 16, 32]")
    );
    // Spectral-norm vectors are optimizer-side state, one u per weight's output dimension.
    let st = g.store.state_tensors();
    assert_eq!(st["gen.blocks.0.conv1.sn.u"].dims(), &[256]);
}

#[test]
fn same_seed_same_weights_different_seed_different_weights() {
    let dev = Device::Cpu;
    let cfg = TrainConfig::preset("mnist-cdcgan").unwrap();
    let a = Generator::new(&cfg.model, Rng::stream(5, "init.gen"), DType::F32, &dev).unwrap();
    let b = Generator::new(&cfg.model, Rng::stream(5, "init.gen"), DType::F32, &dev).unwrap();
    let c = Generator::new(&cfg.model, Rng::stream(6, "init.gen"), DType::F32, &dev).unwrap();
    let key = "gen.blocks.0.conv.weight";
    let v = |g: &Generator| {
        g.store.model_tensors()[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(v(&a), v(&b));
    assert_ne!(v(&a), v(&c));
    // generate() is a pure function of (weights, conditions, seed).
    let cond = vec![vec![0.0; 10]; 1];
    let i1 = a.generate(3, &cond, 42).unwrap();
    let i2 = b.generate(3, &cond, 42).unwrap();
    assert_eq!(i1, i2);
    assert_eq!((i1.n, i1.channels, i1.height, i1.width), (3, 1, 28, 28));
    assert!(a.generate(3, &[vec![0.0; 9]], 42).is_err());
}

#[test]
fn the_new_options_build_for_both_families() {
    // aux_head, minibatch_std and g_cond_bn on DCGAN and ResNet nets of every conditioning.
    let dev = Device::Cpu;
    for base in ["iclevr-small", "iclevr-projection", "mnist-cdcgan"] {
        let mut cfg = TrainConfig::preset(base).unwrap();
        cfg.model.aux_head = true;
        cfg.model.minibatch_std = true;
        cfg.model.g_cond_bn = true;
        cfg.model.g_ch = 8;
        cfg.model.d_ch = 8;
        let m = &cfg.model;
        let g = Generator::new(m, Rng::new(1), DType::F32, &dev).unwrap();
        let d = Discriminator::new(m, Rng::new(2), DType::F32, &dev).unwrap();
        let b = 8;
        let z = Tensor::randn(0f32, 1.0, (b, m.z_dim), &dev).unwrap();
        let c = Tensor::ones((b, m.num_conditions), DType::F32, &dev).unwrap();
        let x = g.forward(&z, &c, Pass::train()).unwrap();
        assert_eq!(x.dims(), &[b, m.channels, m.image_size, m.image_size]);
        let out = d.forward(&x, &c, Pass::train()).unwrap();
        assert_eq!(out.logits.dims(), &[b], "{base}");
        assert_eq!(out.aux.unwrap().dims(), &[b, m.num_conditions], "{base}");
        let t = g.store.model_tensors();
        if m.arch == ganscope::config::Arch::Dcgan {
            // Conditional BN: an affine-free BN plus (K -> C) gain and bias maps.
            // (In the object-layer G, the shared layer network is `gen.layer`.)
            let p = if m.g_object_layers > 0 {
                assert!(t.contains_key("gen.background"), "{base}");
                "gen.layer"
            } else {
                "gen"
            };
            assert!(
                t.contains_key(&format!("{p}.blocks.0.bn.gamma.weight")),
                "{base}"
            );
            assert!(
                t.contains_key(&format!("{p}.input_bn.beta.weight")),
                "{base}"
            );
            assert!(
                !t.contains_key(&format!("{p}.blocks.0.bn.weight")),
                "{base}"
            );
        }
        // Without conditions there is no aux head, whatever aux_head says.
        let mut u = cfg.clone();
        u.model.conditioning = ganscope::config::Conditioning::None;
        u.model.num_conditions = 0;
        assert!(!ganscope::model::has_aux_head(&u.model));
    }
}

#[test]
fn sample_grids_vary_by_column_and_for_unconditional_models_by_cell() {
    let dev = Device::Cpu;
    let tiny = |mut c: TrainConfig| {
        c.model.g_ch = 4;
        c.model.z_dim = 8;
        Generator::new(&c.model, Rng::new(3), DType::F32, &dev).unwrap()
    };
    let cell = |im: &ganscope::images::Images, i: usize| {
        let n = im.channels * im.height * im.width;
        im.data[i * n..(i + 1) * n].to_vec()
    };
    // Unconditional: 2 rows x 3 columns, six different latents, six different images (the
    // rows of a sample sheet used to repeat one another).
    let g = tiny(TrainConfig::mnist_dcgan());
    let im = g.grid(&[vec![], vec![]], 3, 9).unwrap();
    assert_eq!(im.n, 6);
    for a in 0..6 {
        for b in 0..a {
            assert_ne!(cell(&im, a), cell(&im, b), "cells {a} and {b}");
        }
    }
    // Conditional: a column keeps its latent down the rows, so equal conditions give equal
    // cells and the columns differ.
    let g = tiny(TrainConfig::mnist_cdcgan());
    let mut c = vec![0.0; 10];
    c[4] = 1.0;
    let im = g.grid(&[c.clone(), c], 3, 9).unwrap();
    for j in 0..3 {
        assert_eq!(cell(&im, j), cell(&im, 3 + j), "column {j}");
    }
    assert_ne!(cell(&im, 0), cell(&im, 1));
}
