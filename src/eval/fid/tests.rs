#![expect(clippy::unwrap_used, reason = "tests may unwrap")]
use std::collections::HashMap;

use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fid_inception")
}

/// The worst difference, relative where values exceed 1, between the network read from
/// `dir/inception.pth` and PyTorch's pooled block outputs in `dir/expected.json`.
fn worst_difference(dir: &Path, div: usize) -> f64 {
    let net = FidInception::load(&dir.join("inception.pth"), &Device::Cpu).unwrap();
    assert_eq!(net.dims, DIMS.map(|d| d / div));
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let x = prepare(&fixture_input(3).unwrap(), &Device::Cpu).unwrap();
    let mut worst = 0f64;
    for (block, key) in ["block0", "block1", "block2", "pool3"].iter().enumerate() {
        let got = net.forward(&x, block).unwrap().to_vec2::<f32>().unwrap();
        let rows = want[key].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        for (r, g) in rows.iter().zip(&got) {
            let r = r.as_array().unwrap();
            assert_eq!(r.len(), net.dims[block], "{key}");
            for (a, b) in r.iter().zip(g) {
                let a = a.as_f64().unwrap();
                worst = worst.max((a - *b as f64).abs() / a.abs().max(1.0));
            }
        }
    }
    worst
}

#[test]
fn the_fid_inception_layout_matches_pytorch_on_the_fixture() {
    // expected.json: PyTorch 2.15's pooled outputs of pytorch-fid's InceptionV3 layout at
    // 1/16 the widths (legacy torch.save file, calibrated BatchNorm statistics), inputs
    // 32x32 resized to 299x299.
    let worst = worst_difference(&fixture(), 16);
    assert!(worst < 1e-4, "worst difference from PyTorch {worst:e}");
}

/// The real file's widths (about 91 MB) through the same code:
/// `python3 tests/fixtures/fid_inception/make_fixture.py --div 1 --out DIR`, then
/// `GANSCOPE_FULL_FID_INCEPTION=DIR cargo test --release --lib full_width_fid -- --ignored`.
#[test]
#[ignore = "needs a 91 MB file made by make_fixture.py --div 1"]
fn full_width_fid_inception_matches_pytorch() {
    let Some(dir) = std::env::var_os("GANSCOPE_FULL_FID_INCEPTION") else {
        panic!("set GANSCOPE_FULL_FID_INCEPTION to the folder make_fixture.py --div 1 wrote");
    };
    let worst = worst_difference(Path::new(&dir), 1);
    println!("full-width file: worst difference from PyTorch {worst:e}");
    assert!(worst < 1e-4, "worst difference from PyTorch {worst:e}");
}

#[test]
fn bilinear_resize_is_pytorchs_align_corners_false() {
    // F.interpolate(tensor([[0., 1.], [2., 3.]])[None, None], size=(4, 4), mode='bilinear',
    // align_corners=False): edges clamp, inner samples at (i + 0.5) / 2 - 0.5.
    let up = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 1, 2, 2, 4, 4);
    let want = [
        0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
    ];
    for (a, b) in up.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{up:?}");
    }
    // Downsampling 4 -> 2 without antialiasing: samples at 0.5 and 2.5 of each row.
    let row: Vec<f32> = (0..4).map(|v| v as f32).collect();
    let down = resize_bilinear(&row, 1, 1, 4, 1, 2);
    assert_eq!(down, vec![0.5, 2.5]);
}

#[test]
fn dims_choose_pytorch_fids_blocks() {
    assert_eq!(FidInception::block_of_dims(2048).unwrap(), 3);
    assert_eq!(FidInception::block_of_dims(64).unwrap(), 0);
    let e = FidInception::block_of_dims(1000).err().unwrap().to_string();
    assert!(e.contains("64, 192, 768 and 2048"), "{e}");
}

#[test]
fn wrong_files_and_folders_are_named() {
    let path = fixture().join("inception.pth");
    let full: HashMap<String, Tensor> = read_pth(&path, None).unwrap();
    let mut t = full.clone();
    t.remove("Mixed_6c.branch7x7dbl_3.conv.weight");
    let e = FidInception::from_state_dict(&path, t, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("inception.pth") && e.contains("Mixed_6c.branch7x7dbl_3.conv.weight"),
        "{e}"
    );
    // A 7x1 kernel where pytorch-fid has 1x7.
    let mut t = full;
    t.insert(
        "Mixed_6b.branch7x7_2.conv.weight".into(),
        Tensor::zeros((8, 8, 7, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let e = FidInception::from_state_dict(&path, t, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Mixed_6b.branch7x7_2") && e.contains("1 x 7"),
        "{e}"
    );
    // The course evaluator is a PyTorch file, but not this network.
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/course_evaluator/checkpoint.pth");
    let e = FidInception::load(&other, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Conv2d_1a_3x3") && e.contains("pytorch-fid"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let e = list_images(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("0 PNG images") && e.contains("at least 2"),
        "{e}"
    );
    let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 50, y as u8 * 60, 255]));
    img.save(dir.path().join("a.png")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let e = list_images(dir.path()).err().unwrap().to_string();
    assert!(e.contains("1 PNG image:"), "{e}");
    img.save(dir.path().join("b.png")).unwrap();
    let files = list_images(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    let (v, h, w) = read_image01(&files[0]).unwrap();
    assert_eq!((h, w), (4, 5));
    // Pixel (x 2, y 3): R 100, G 180, B 255, planar like ToTensor.
    let at = |c: usize| v[c * 20 + 3 * 5 + 2];
    assert_eq!((at(0), at(1), at(2)), (100.0 / 255.0, 180.0 / 255.0, 1.0));
    std::fs::write(dir.path().join("c.jpg"), b"jpeg").unwrap();
    let e = list_images(dir.path()).err().unwrap().to_string();
    assert!(e.contains("c.jpg") && e.contains("PNG"), "{e}");
    let e = list_images(&dir.path().join("missing"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}
