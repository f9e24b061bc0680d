#![expect(clippy::unwrap_used, reason = "tests may unwrap")]
use super::*;
use crate::config::{Arch, Conditioning};
use crate::data::ConditionKind;
use crate::model::test_util::max_abs_diff;
use crate::params::ParamStore;
use crate::rng::Rng;
use candle_core::{DType, Device};

const K: usize = 4;
const Z: usize = 6;
const S: usize = 32;

fn cfg() -> ModelConfig {
    ModelConfig {
        arch: Arch::Sequential,
        image_size: S,
        channels: 3,
        num_conditions: K,
        condition_kind: ConditionKind::MultiHot,
        conditioning: Conditioning::Projection,
        z_dim: Z,
        cond_embed: 3,
        g_ch: 4,
        g_cond_bn: true,
        g_object_layers: 3,
        ..ModelConfig::default()
    }
}

fn build() -> (ParamStore, SequentialGenerator) {
    let store = ParamStore::new(Rng::new(7), DType::F64, &Device::Cpu);
    let g = SequentialGenerator::new(&cfg(), store.root("gen")).unwrap();
    // A floor that is not flat, so that it shows in the images.
    let v: Vec<f32> = (0..3 * S * S)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.2)
        .collect();
    g.set_floor(&v).unwrap();
    assert!(g.set_floor(&v[1..]).is_err());
    // A buffer: saved with the weights, never trained.
    assert!(store.model_tensors().contains_key("gen.floor"));
    assert!(store.trainable().iter().all(|(n, _)| n != "gen.floor"));
    (store, g)
}

fn z(b: usize) -> Tensor {
    Tensor::from_vec(Rng::new(3).normal_vec(b * Z), (b, Z), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn t(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn a_scene_is_its_steps_in_order_from_the_floor() {
    let (_store, g) = build();
    let zt = z(3);
    // Image 0 adds labels 2 then 0; image 1 adds label 3; image 2 adds nothing.
    let orders = vec![vec![(2, 1.0), (0, 1.0)], vec![(3, 1.0)], vec![]];
    let steps = g.scene(&zt, &orders, Pass::eval()).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[1].dims(), &[3, 3, S, S]);

    // By hand, image 0: floor -> step(z, add 2, so far {2}) -> step(z rotated by 2, add 0,
    // so far {0, 2}).
    let z0 = zt.narrow(0, 0, 1).unwrap();
    let floor = g.floor().unwrap();
    let one = |l: usize| {
        let mut v = vec![0.0; K];
        v[l] = 1.0;
        t(v, &[1, K])
    };
    let a = g
        .step(&floor, &z0, &one(2), &one(2), None, Pass::eval())
        .unwrap();
    let zr = g.rotated(&z0, 1).unwrap();
    assert_eq!(
        rows(&zr),
        (0..Z).map(|d| rows(&z0)[(d + 2) % Z]).collect::<Vec<_>>()
    );
    let both = t(vec![1.0, 0.0, 1.0, 0.0], &[1, K]);
    let b = g.step(&a, &zr, &one(0), &both, None, Pass::eval()).unwrap();
    assert!(max_abs_diff(&steps[0].narrow(0, 0, 1).unwrap(), &a) < 1e-12);
    assert!(max_abs_diff(&steps[1].narrow(0, 0, 1).unwrap(), &b) < 1e-12);
    // Image 1 has one object: its second step leaves it as it was (mask weight e^-30).
    let i1 = |s: usize| steps[s].narrow(0, 1, 1).unwrap();
    assert!(max_abs_diff(&i1(0), &i1(1)) < 1e-9);
    assert!(
        max_abs_diff(&i1(0), &floor) > 1e-3,
        "the object changed nothing"
    );
    // Image 2 stays the floor.
    assert!(max_abs_diff(&steps[1].narrow(0, 2, 1).unwrap(), &floor) < 1e-9);

    // forward(z, c) builds in label-index order: {0, 2} adds 0 first, then 2.
    let c = t(
        vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        &[3, K],
    );
    let f = g.forward(&zt, &c, Pass::eval()).unwrap();
    let in_order = g
        .scene(
            &zt,
            &[vec![(0, 1.0), (2, 1.0)], vec![(3, 1.0)], vec![]],
            Pass::eval(),
        )
        .unwrap();
    assert!(max_abs_diff(&f, &in_order[1]) < 1e-12);
    // No labels anywhere: the floor for every image.
    let empty = g
        .forward(&zt, &t(vec![0.0; 3 * K], &[3, K]), Pass::eval())
        .unwrap();
    assert!(max_abs_diff(&empty.narrow(0, 1, 1).unwrap(), &floor) < 1e-12);
    // A label past K is refused, not a panic.
    assert!(
        g.scene(&zt, &[vec![(K, 1.0)], vec![], vec![]], Pass::eval())
            .is_err()
    );
}

#[test]
fn the_next_image_keeps_the_previous_one_outside_the_mask() {
    // next = prev * (1 - a) + tanh(colour) * a: with the mask pushed down by -30 everywhere
    // the previous image comes back unchanged; with 0 it is a blend; images in [-1, 1].
    let (_store, g) = build();
    let prev = t(
        Rng::new(5)
            .normal_vec(2 * 3 * S * S)
            .into_iter()
            .map(|v| v.tanh())
            .collect(),
        &[2, 3, S, S],
    );
    let zt = z(2);
    let added = t(vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], &[2, K]);
    let so_far = t(vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], &[2, K]);
    let off = t(vec![ABSENT_LOGIT; 2], &[2, 1, 1, 1]);
    let kept = g
        .step(&prev, &zt, &added, &so_far, Some(&off), Pass::eval())
        .unwrap();
    assert!(max_abs_diff(&kept, &prev) < 1e-9);
    let drawn = g
        .step(&prev, &zt, &added, &so_far, None, Pass::eval())
        .unwrap();
    assert!(max_abs_diff(&drawn, &prev) > 1e-3);
    assert!(rows(&drawn).iter().all(|v| v.abs() <= 1.0 + 1e-12));
    // Very negative logits give finite gradients (the stable sigmoid): d sum(next) / d floor.
    let huge = t(vec![-1e4; 2], &[2, 1, 1, 1]);
    let fl = g.floor_batch(2).unwrap();
    let v = candle_core::Var::from_tensor(&fl).unwrap();
    let out = g
        .step(
            v.as_tensor(),
            &zt,
            &added,
            &so_far,
            Some(&huge),
            Pass::eval(),
        )
        .unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let gv = rows(grads.get(v.as_tensor()).unwrap());
    assert!(gv.iter().all(|x| x.is_finite() && (x - 1.0).abs() < 1e-9));
}

#[test]
fn the_floor_fills_first_steps_only() {
    let (_store, g) = build();
    let prev = t(vec![0.5; 2 * 3 * S * S], &[2, 3, S, S]);
    let p = g.with_floor(&prev, &[true, false]).unwrap();
    assert!(max_abs_diff(&p.narrow(0, 0, 1).unwrap(), &g.floor().unwrap()) < 1e-15);
    assert!(max_abs_diff(&p.narrow(0, 1, 1).unwrap(), &prev.narrow(0, 1, 1).unwrap()) < 1e-15);
}

#[test]
fn gradients_match_finite_differences() {
    // d sum(r * scene(z)) / d theta for the encoder, the occlusion convolution and
    // the step network's last weights, through two steps, against central differences (f64,
    // training mode: batch statistics).
    let (store, g) = build();
    let zt = z(2);
    let orders = vec![vec![(1, 1.0), (3, 1.0)], vec![(2, 0.6)]];
    let r = t(Rng::new(9).normal_vec(2 * 3 * S * S), &[2, 3, S, S]);
    let loss = || -> Tensor {
        let last = g.scene(&zt, &orders, Pass::train()).unwrap().pop().unwrap();
        (last * &r).unwrap().sum_all().unwrap()
    };
    // h 1e-6: at 1e-5 one of the encoder's leaky-ReLU units crosses its kink (the difference
    // then changes with h; at 1e-6 and 1e-7 it agrees with backward).
    crate::model::test_util::assert_param_gradients(
        &store,
        &[
            "gen.encoder.0.weight",
            "gen.encode.weight",
            "gen.occlusion.weight",
            "gen.layer.out.weight",
        ],
        1e-6,
        loss,
    );
}
