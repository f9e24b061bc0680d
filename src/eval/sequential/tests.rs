#![expect(clippy::unwrap_used, reason = "tests may unwrap")]
use super::*;
use crate::config::TrainConfig;
use crate::data::render::{RenderOptions, render_scene, synthetic_dataset};
use candle_core::DType;

fn setup() -> (Generator, crate::data::InMemoryDataset, Vec<u8>) {
    let mut cfg = TrainConfig::iclevr_sequential_small();
    cfg.model.g_ch = 8;
    cfg.model.label_names = crate::data::iclevr::default_object_names();
    let g = Generator::new(&cfg.model, Rng::new(4), DType::F32, &Device::Cpu).unwrap();
    let data = synthetic_dataset(6, 32, 1, None);
    let floor = render_scene(&[], 32, RenderOptions::default());
    (g, data, floor)
}

fn set_const(g: &Generator, name: &str, v: f32) {
    let var = g.store.get(name).unwrap();
    let t = Tensor::full(v, var.dims(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

#[test]
fn a_step_that_draws_nothing_keeps_everything_and_one_that_paints_over_keeps_nothing() {
    let (g, data, floor) = setup();
    // The occlusion convolution's bias moves the whole mask: -100 -> nothing drawn.
    set_const(&g, "gen.occlusion.bias", -100.0);
    let p = preservation(&g, &data, &floor, 8, 3).unwrap();
    assert_eq!(p.steps, 8);
    assert!(p.object_pixels > 0);
    assert!(p.object_change_generated < 1e-6, "{p:?}");
    assert_eq!(p.changed_share_generated, 0.0);
    // The real additions change a part of the image (the object and its shadow), and touch
    // the previous objects little.
    assert!(
        p.changed_share_real > 0.005 && p.changed_share_real < 0.5,
        "{p:?}"
    );
    assert!(p.object_change_real < 0.2, "{p:?}");
    // +100: the step's colour replaces the whole image.
    set_const(&g, "gen.occlusion.bias", 100.0);
    let q = preservation(&g, &data, &floor, 8, 3).unwrap();
    assert!(q.object_change_generated > 0.05, "{q:?}");
    assert!(q.changed_share_generated > 0.5, "{q:?}");
    assert_eq!(q.changed_share_real, p.changed_share_real);
}

#[test]
fn preservation_needs_a_sequential_generator_and_scene_steps() {
    let (_g, data, floor) = setup();
    let other = TrainConfig::iclevr_small();
    let g = Generator::new(&other.model, Rng::new(4), DType::F32, &Device::Cpu).unwrap();
    let e = preservation(&g, &data, &floor, 8, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequential"), "{e}");
    let (g, mut flat, _) = setup();
    flat.steps.clear();
    let e = preservation(&g, &flat, &floor, 8, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no scene steps"), "{e}");
    let e = preservation(&g, &data, &floor[..10], 8, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("floor"), "{e}");
}

#[test]
fn scene_from_returns_the_floor_and_every_step() {
    let (g, _, _) = setup();
    let z = vec![g.latent(1, 0), g.latent(1, 1)];
    let steps = g.scene_from(&z, &[vec![3, 10], vec![7]]).unwrap();
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|s| s.n == 2 && s.height == 32));
    // Image 1 has one object: its last two images are the same.
    assert!(
        steps[1]
            .image(1)
            .iter()
            .zip(steps[2].image(1))
            .all(|(a, b)| (a - b).abs() < 1e-5)
    );
    // The order matters: adding 10 then 3 is another image than 3 then 10.
    let swapped = g.scene_from(&z[..1], &[vec![10, 3]]).unwrap();
    let d: f32 = swapped[2]
        .image(0)
        .iter()
        .zip(steps[2].image(0))
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(d > 1e-3);
    let other = TrainConfig::iclevr_small();
    let g2 = Generator::new(&other.model, Rng::new(4), DType::F32, &Device::Cpu).unwrap();
    assert!(g2.scene_from(&z, &[vec![1], vec![2]]).is_err());
}
