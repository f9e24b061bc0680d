use super::*;
use crate::data::Dataset;
use crate::data::iclevr::{load_iclevr, read_train_labels};

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a of the pixels of `synthetic_dataset_with(4, 32, 42, None, _, default)`. An
/// intended change of the renderer or of the placement updates it (the test prints the
/// new value); an unintended one is caught here.
const PINNED_HASH: u64 = 0xfd94_bbf4_708f_5044;

#[test]
fn deterministic_and_pinned() {
    let opts = RenderOptions::default();
    let a = synthetic_dataset_with(4, 32, 42, None, 1, opts);
    let b = synthetic_dataset_with(4, 32, 42, None, 2, opts);
    assert_eq!(a.len(), 12);
    assert_eq!(a.image_shape(), (3, 32, 32));
    assert_eq!(a.condition_kind(), ConditionKind::MultiHot);
    assert_eq!(a.num_conditions(), 24);
    assert_eq!(a.pixels, b.pixels, "thread count changed the images");
    assert_eq!(a.labels, b.labels);
    for s in 0..4 {
        let l = &a.labels[3 * s..3 * s + 3];
        assert_eq!((l[0].len(), l[1].len(), l[2].len()), (1, 2, 3));
        assert!(l[1].starts_with(&l[0]) && l[2].starts_with(&l[1]));
        let mut d = l[2].clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 3, "objects of a scene are distinct");
    }
    let c = synthetic_dataset_with(4, 32, 43, None, 2, opts);
    assert_ne!(a.pixels, c.pixels);
    let h = fnv(&a.pixels);
    assert_eq!(h, PINNED_HASH, "renderer output changed: new hash {h:#x}");
}

#[test]
fn empty_scene_is_the_gray_floor() {
    let img = render_scene(&[], 16, RenderOptions::default());
    let hw = 16 * 16;
    for p in 0..hw {
        let (r, g, b) = (img[p], img[hw + p], img[2 * hw + p]);
        assert!(r == g && g == b, "floor is gray");
        assert!((90..=170).contains(&r), "floor level {r}");
    }
}

/// Pixels of the image (x, y) whose central ray meets `o`.
fn object_pixels(r: &Renderer, o: &SceneObject) -> Vec<(usize, usize)> {
    let prims = [Prim::new(o)];
    let mut v = Vec::new();
    for y in 0..r.height {
        for x in 0..r.width {
            let (u, vv) = r.frame_coords(x as f32 + 0.5, y as f32 + 0.5);
            if r.hit_id(r.cam.ray(u, vv), &prims, 1) == 1 {
                v.push((x, y));
            }
        }
    }
    v
}

#[test]
fn steps_extend_the_scene() {
    let n = 12;
    let objs = synthetic_objects(n, 7, None);
    assert_eq!(objs.len(), 3 * n);
    let size = 48;
    let ds = synthetic_dataset_with(n, size, 7, None, 2, RenderOptions::default());
    let r = Renderer::new(size, size, RenderOptions::default());
    let hw = size * size;
    let (mut outside, mut differ_outside) = (0, 0);
    for s in 0..n {
        assert_eq!(objs[3 * s].len(), 1);
        for step in 1..3 {
            let (prev, cur) = (&objs[3 * s + step - 1], &objs[3 * s + step]);
            assert_eq!(cur.len(), prev.len() + 1);
            assert_eq!(
                &cur[..prev.len()],
                &prev[..],
                "earlier objects kept in place"
            );
            let labels: Vec<u16> = cur.iter().map(SceneObject::label).collect();
            assert_eq!(labels, ds.labels[3 * s + step]);
            // Away from the new object and its shadow, the images agree.
            let p = Prim::new(cur.last().unwrap());
            let (ro, rf) = (r.object_rect(&p), r.floor_rect(&p));
            let (a, b) = (ds.image_u8(3 * s + step - 1), ds.image_u8(3 * s + step));
            let mut differ_inside = 0;
            for y in 0..size {
                for x in 0..size {
                    let o = y * size + x;
                    let d = (0..3).any(|c| a[c * hw + o] != b[c * hw + o]);
                    if ro.contains(x, y) || rf.contains(x, y) {
                        differ_inside += d as usize;
                    } else {
                        outside += 1;
                        differ_outside += d as usize;
                    }
                }
            }
            assert!(differ_inside >= 10, "the new object shows");
        }
    }
    assert!(
        differ_outside * 200 <= outside,
        "{differ_outside} of {outside} pixels away from the new objects changed"
    );
}

#[test]
fn objects_are_visible_apart_and_in_frame() {
    let cam = Camera::clevr();
    let objs = synthetic_objects(60, 11, None);
    for scene in objs.iter().skip(2).step_by(3) {
        let counts = visible_pixels(scene, VIS_W, VIS_H);
        for (k, o) in scene.iter().enumerate() {
            let alone = visible_pixels(std::slice::from_ref(o), VIS_W, VIS_H)[0];
            assert!(counts[k] >= MIN_VISIBLE_PIXELS, "{scene:?}");
            assert!(
                counts[k] as f32 >= MIN_VISIBLE_SHARE * alone as f32,
                "object {k} mostly hidden: {} of {alone} pixels, {scene:?}",
                counts[k]
            );
            let p = Prim::new(o);
            assert!(in_frame(&cam, &p));
            for q in &scene[k + 1..] {
                let q = Prim::new(q);
                let d = ((p.c.x - q.c.x).powi(2) + (p.c.y - q.c.y).powi(2)).sqrt();
                assert!(d >= p.foot + q.foot, "objects overlap: {scene:?}");
            }
            let rel = o.scale / BASE_SCALE - 1.0;
            assert!(rel.abs() <= SCALE_JITTER + 1e-6);
        }
    }
    // A crowded scene still places every object (the least hidden place it found).
    let mut rng = Rng::new(1);
    let crowd = sample_scene(&mut rng, &(0..20).collect::<Vec<u16>>());
    assert_eq!(crowd.len(), 20);
}

/// Hue in degrees and saturation (HSV) of a mean colour.
fn hue_sat(c: [f32; 3]) -> (f32, f32) {
    let max = c[0].max(c[1]).max(c[2]);
    let min = c[0].min(c[1]).min(c[2]);
    let d = max - min;
    let sat = if max > 0.0 { d / max } else { 0.0 };
    if d <= 0.0 {
        return (0.0, sat);
    }
    let h = if max == c[0] {
        ((c[1] - c[2]) / d).rem_euclid(6.0)
    } else if max == c[1] {
        (c[2] - c[0]) / d + 2.0
    } else {
        (c[0] - c[1]) / d + 4.0
    };
    (h * 60.0, sat)
}

#[test]
fn colours_look_like_their_names() {
    let r = Renderer::new(64, 64, RenderOptions::default());
    let hw = 64 * 64;
    for label in 0..24u16 {
        let (colour, shape) = label_parts(label);
        for metal in [false, true] {
            let o = SceneObject {
                colour,
                shape,
                x: 0.3,
                y: 0.5,
                yaw: 0.6,
                scale: BASE_SCALE,
                metal,
            };
            let img = r.render(&[o]);
            let px = object_pixels(&r, &o);
            assert!(px.len() >= 30, "{label}: {} pixels", px.len());
            let mut mean = [0f32; 3];
            for &(x, y) in &px {
                for (c, m) in mean.iter_mut().enumerate() {
                    *m += img[c * hw + y * 64 + x] as f32 / px.len() as f32;
                }
            }
            let (hue, sat) = hue_sat(mean);
            let (want, want_sat) = hue_sat(COLOURS[colour as usize].map(|v| v as f32));
            let what = format!(
                "{} (metal {metal}): mean {mean:?}",
                OBJECT_NAMES[label as usize]
            );
            if colour == 0 {
                assert!(sat < 0.08, "{what}");
            } else {
                let dh = (hue - want).abs();
                assert!(dh.min(360.0 - dh) < 15.0, "{what}: hue {hue} vs {want}");
                assert!(sat > 0.5 * want_sat, "{what}: saturation {sat}");
            }
            // Shape is recognisable by its silhouette's fill of its bounding box:
            // a sphere fills about pi/4 of it, a cylinder more.
            let (x0, x1) = (
                px.iter().map(|p| p.0).min().unwrap(),
                px.iter().map(|p| p.0).max().unwrap(),
            );
            let (y0, y1) = (
                px.iter().map(|p| p.1).min().unwrap(),
                px.iter().map(|p| p.1).max().unwrap(),
            );
            let fill = px.len() as f32 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
            match shape {
                Shape::Sphere => assert!((0.65..0.9).contains(&fill), "{what}: fill {fill}"),
                Shape::Cylinder => assert!(fill > 0.8, "{what}: fill {fill}"),
                Shape::Cube => assert!(fill > 0.6, "{what}: fill {fill}"),
            }
        }
    }
}

fn sets(v: &[(&str, &[u16])]) -> Vec<(String, Vec<u16>)> {
    v.iter().map(|(f, l)| (f.to_string(), l.to_vec())).collect()
}

#[test]
fn label_sets_are_rendered_as_given() {
    let given = sets(&[
        ("CLEVR_train_000005_1.png", &[3, 9]),
        ("CLEVR_train_000002_0.png", &[17]),
        ("CLEVR_train_000005_0.png", &[3]),
        ("CLEVR_train_000002_1.png", &[17, 0]),
        // Not a superset of _1: the cube 0 stays where it was, 17 goes.
        ("CLEVR_train_000002_2.png", &[0, 22]),
        ("odd name.png", &[5]),
    ]);
    let opts = RenderOptions::default();
    let ds = synthetic_dataset_with(10, 24, 3, Some(&given), 2, opts);
    let want: Vec<Vec<u16>> = given.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(ds.labels, want);
    let objs = synthetic_objects(10, 3, Some(&given));
    for (o, l) in objs.iter().zip(&want) {
        let mut a: Vec<u16> = o.iter().map(SceneObject::label).collect();
        let mut b = l.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
    assert_eq!(
        objs[0][0], objs[2][0],
        "_1 extends _0 although listed first"
    );
    assert_eq!(objs[3][0], objs[1][0]);
    assert!(objs[4].contains(&objs[3][1]), "kept object stays in place");
    // n_scenes keeps the first scenes in order of first appearance.
    let one = synthetic_dataset_with(1, 24, 3, Some(&given), 1, opts);
    assert_eq!(one.labels, vec![vec![3, 9], vec![3]]);
    assert_eq!(one.image_u8(0), ds.image_u8(0));
    assert_eq!(one.image_u8(1), ds.image_u8(2));
}

#[test]
fn real_train_labels_render() {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/iclevr"
    ));
    let Ok(sets) = read_train_labels(&dir.join("train.json"), &default_object_names()) else {
        eprintln!("{} not found; skipping", dir.display());
        return;
    };
    // Every scene's steps extend the previous one (see the loader's test); then so do
    // the rendered scenes.
    let ds = synthetic_dataset_with(4, 16, 0, Some(&sets), 2, RenderOptions::default());
    assert_eq!(ds.len(), 12);
    let want: Vec<Vec<u16>> = sets[..12].iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(ds.labels, want);
    let objs = synthetic_objects(4, 0, Some(&sets));
    for s in 0..4 {
        for step in 1..3 {
            let (prev, cur) = (&objs[3 * s + step - 1], &objs[3 * s + step]);
            assert_eq!(&cur[..prev.len()], &prev[..]);
        }
    }
}

#[test]
fn folder_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("synth");
    assert_eq!(write_iclevr_folder(&d, 3, 20, 5, None).unwrap(), 9);
    assert!(d.join("CLEVR_train_000002_2.png").is_file());
    let back = load_iclevr(&d, 20).unwrap();
    let want = synthetic_dataset(3, 20, 5, None);
    assert_eq!(back.labels, want.labels);
    assert_eq!(back.pixels, want.pixels);
    assert_eq!(back.label_names, want.label_names);
    let names = crate::data::iclevr::read_objects(&d.join("objects.json")).unwrap();
    assert_eq!(names, default_object_names());

    // Given label sets: files named as given; the loader sorts them by name.
    let given = sets(&[
        ("CLEVR_train_000009_0.png", &[23]),
        ("CLEVR_train_000001_0.png", &[4]),
        ("CLEVR_train_000001_1.png", &[4, 12]),
    ]);
    let d2 = tmp.path().join("given");
    assert_eq!(write_iclevr_folder(&d2, 5, 12, 8, Some(&given)).unwrap(), 3);
    let back = load_iclevr(&d2, 12).unwrap();
    let want = synthetic_dataset(5, 12, 8, Some(&given));
    assert_eq!(back.labels, vec![vec![4], vec![4, 12], vec![23]]);
    assert_eq!(back.image_u8(0), want.image_u8(1));
    assert_eq!(back.image_u8(2), want.image_u8(0));

    let bad = sets(&[("../x.png", &[1])]);
    assert!(write_iclevr_folder(&d2, 1, 8, 0, Some(&bad)).is_err());
    let bad = sets(&[("x.png", &[24])]);
    let e = write_iclevr_folder(&d2, 1, 8, 0, Some(&bad)).unwrap_err();
    assert!(e.to_string().contains("24"), "{e}");
}

fn to_images(ds: &InMemoryDataset, idx: &[usize]) -> crate::images::Images {
    let mut data = Vec::new();
    for &i in idx {
        data.extend(ds.image_u8(i).iter().map(|&v| crate::images::from_u8(v)));
    }
    crate::images::Images {
        n: idx.len(),
        channels: 3,
        height: ds.height,
        width: ds.width,
        data,
    }
}

/// Eyeballing: `cargo test --lib data::render -- --ignored contact --nocapture`, then
/// look at /tmp/iclevr_contact.png, /tmp/iclevr_steps.png and /tmp/iclevr_big.png.
#[test]
#[ignore]
fn contact_sheet() {
    use crate::export::sheet::{SheetLayout, sample_sheet, save_png};
    let ds = synthetic_dataset(22, 64, 1, None);
    // 8x8 of the third steps and some first/second.
    let idx: Vec<usize> = (0..64)
        .map(|i| (i % 22) * 3 + (2 - (i / 22).min(2)))
        .collect();
    let layout = SheetLayout {
        rows: 8,
        cols: 8,
        scale: 2,
        ..SheetLayout::default()
    };
    let sheet = sample_sheet(&to_images(&ds, &idx), &layout).unwrap();
    save_png(&sheet, Path::new("/tmp/iclevr_contact.png")).unwrap();

    // Steps with captions: 10 scenes x 3 steps.
    let idx: Vec<usize> = (0..30).collect();
    let names = |i: usize| {
        ds.labels[i]
            .iter()
            .map(|&l| OBJECT_NAMES[l as usize])
            .collect::<Vec<_>>()
            .join(", ")
    };
    let layout = SheetLayout {
        rows: 10,
        cols: 3,
        scale: 2,
        row_captions: (0..10).map(|s| names(s * 3 + 2)).collect(),
        col_captions: vec!["_0".into(), "_1".into(), "_2".into()],
        title: Some("synthetic i-CLEVR, seed 1".into()),
        ..SheetLayout::default()
    };
    let sheet = sample_sheet(&to_images(&ds, &idx), &layout).unwrap();
    save_png(&sheet, Path::new("/tmp/iclevr_steps.png")).unwrap();

    let mut rng = Rng::new(5);
    let objects = sample_scene(&mut rng, &[9, 2, 22]);
    let big = render_frame(&objects, 320, 240, RenderOptions::default());
    let hw = 320 * 240;
    let img = image::RgbImage::from_fn(320, 240, |x, y| {
        let o = (y * 320 + x) as usize;
        image::Rgb([big[o], big[hw + o], big[2 * hw + o]])
    });
    save_png(&img, Path::new("/tmp/iclevr_big.png")).unwrap();

    // Six 320x240 frames, metal and rubber.
    let r = Renderer::new(320, 240, RenderOptions::default());
    let mut data = Vec::new();
    for k in 0..6u16 {
        let mut rng = Rng::new(100 + k as u64);
        let mut objects = sample_scene(&mut rng, &[k, 8 + k * 2 % 8, 16 + (k + 3) % 8]);
        for (i, o) in objects.iter_mut().enumerate() {
            o.metal = (i + k as usize).is_multiple_of(2);
        }
        data.extend(
            r.render(&objects)
                .iter()
                .map(|&v| crate::images::from_u8(v)),
        );
    }
    let imgs = crate::images::Images {
        n: 6,
        channels: 3,
        height: 240,
        width: 320,
        data,
    };
    let layout = SheetLayout {
        rows: 2,
        cols: 3,
        scale: 1,
        ..SheetLayout::default()
    };
    save_png(
        &sample_sheet(&imgs, &layout).unwrap(),
        Path::new("/tmp/iclevr_big6.png"),
    )
    .unwrap();
    eprintln!("{objects:?}");
}

/// Throughput: `cargo test --release --lib data::render -- --ignored bench --nocapture`.
#[test]
#[ignore]
fn bench_throughput() {
    for (size, scenes) in [(64, 600), (128, 150)] {
        for threads in [1, worker_threads()] {
            let t = std::time::Instant::now();
            let ds =
                synthetic_dataset_with(scenes, size, 9, None, threads, RenderOptions::default());
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{size}x{size}, {threads} thread(s): {} images in {s:.2} s = {:.0} images/s",
                ds.len(),
                ds.len() as f64 / s
            );
        }
    }
    // Placement alone and rendering alone, one thread.
    let t = std::time::Instant::now();
    let scenes: Vec<Vec<SceneObject>> = (0..600)
        .map(|i| sample_scene(&mut scene_rng(3, i), &[i as u16 % 24, (i as u16 + 5) % 24]))
        .collect();
    let place = t.elapsed().as_secs_f64();
    let r = Renderer::new(64, 64, RenderOptions::default());
    let t = std::time::Instant::now();
    let mut sum = 0u64;
    for sc in &scenes {
        sum += r.render(sc)[0] as u64;
    }
    let render = t.elapsed().as_secs_f64();
    eprintln!(
        "600 two-object scenes: placement {:.1} ms, render {:.1} ms ({sum})",
        place * 1e3,
        render * 1e3
    );
}
