//! A PyTorch evaluator read as is: the NYCU course's i-CLEVR evaluator is torchvision's
//! `resnet18` (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with `fc`
//! replaced by `nn.Sequential(nn.Linear(512, 24), nn.Sigmoid())`, saved as
//! `torch.save({'model': state_dict}, 'checkpoint.pth')` and run in eval mode on 64x64 images
//! in [-1, 1] (exactly what a generator's tanh gives).
//!
//! The file is read by [`super::torch_state::read_pth`] (either `torch.save` format), under the
//! key `model` if it has one (else as a plain state_dict; a `module.` prefix from `DataParallel` is dropped).
//! Every width and the number of blocks per stage come from the tensor shapes, so the same
//! code reads the real 45 MB file and the small committed fixture of the same layout
//! (`tests/fixtures/course_evaluator/make_fixture.py`). Eval-mode BatchNorm is folded into the
//! convolution before it ([`super::torch_state::StateDict::folded`], eps = 1e-5, PyTorch's
//! default).
//!
//! Only basic-block ResNets (18, 34) are read; a bottleneck file (50 and up) is refused by name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::torch_state::{ConvShape, Folded, StateDict, read_pth};
use crate::error::Result;

/// PyTorch's BatchNorm2d default.
const BN_EPS: f64 = 1e-5;

/// torchvision's `BasicBlock`: relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)).
struct Block {
    conv1: Folded,
    conv2: Folded,
    downsample: Option<Folded>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x)?.relu()?;
        let h = self.conv2.forward(&h)?;
        let s = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        Ok((h + s)?.relu()?)
    }
}

/// torchvision's ResNet with basic blocks, in eval mode.
pub struct TorchResNet {
    conv1: Folded,
    blocks: Vec<Block>,
    fc_w: Tensor,
    fc_b: Tensor,
    /// Channels of the first stage (64 in resnet18).
    pub width: usize,
    /// Outputs of the head (24 for the course's evaluator).
    pub num_labels: usize,
    /// Blocks per stage ([2, 2, 2, 2] for resnet18).
    pub layers: [usize; 4],
}

impl TorchResNet {
    /// Read a PyTorch checkpoint (`.pth`) of a torchvision basic-block ResNet.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let t = read_pth(path, Some("model"))?;
        Self::from_state_dict(path, t, device)
    }

    fn from_state_dict(path: &Path, t: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let sd = StateDict {
            path,
            t,
            what: "a torchvision ResNet",
        };
        // torchvision's paddings keep the size at stride 1 (k / 2 for k = 7, 3, 1).
        let shape = |cin, k, stride| ConvShape {
            cin,
            k: Some((k, k)),
            stride,
            same: true,
        };
        if sd.t.keys().any(|k| k.ends_with(".conv3.weight")) {
            return Err(sd.bad(
                "a bottleneck ResNet (50, 101, 152): only basic-block ResNets (18, 34) are read"
                    .into(),
            ));
        }
        let (conv1, width) = sd.folded("conv1", "bn1", shape(3, 7, 2), BN_EPS, device)?;
        let mut blocks = Vec::new();
        let mut layers = [0usize; 4];
        let mut cin = width;
        for (stage, n) in layers.iter_mut().enumerate() {
            let cout = width << stage;
            while sd
                .t
                .contains_key(&format!("layer{}.{}.conv1.weight", stage + 1, *n))
            {
                let p = format!("layer{}.{}", stage + 1, *n);
                let stride = if stage > 0 && *n == 0 { 2 } else { 1 };
                let (c1, o1) = sd.folded(
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    shape(cin, 3, stride),
                    BN_EPS,
                    device,
                )?;
                let (c2, o2) = sd.folded(
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    shape(o1, 3, 1),
                    BN_EPS,
                    device,
                )?;
                if o1 != cout || o2 != cout {
                    return Err(sd.bad(format!(
                        "`{p}` has {o1}/{o2} channels, a ResNet of width {width} has {cout} there"
                    )));
                }
                let down = format!("{p}.downsample.0.weight");
                let downsample = if sd.t.contains_key(&down) {
                    let (d, _) = sd.folded(
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        shape(cin, 1, stride),
                        BN_EPS,
                        device,
                    )?;
                    Some(d)
                } else if stride != 1 || cin != cout {
                    return Err(sd.bad(format!("`{p}` changes its shape but has no downsample")));
                } else {
                    None
                };
                blocks.push(Block {
                    conv1: c1,
                    conv2: c2,
                    downsample,
                });
                cin = cout;
                *n += 1;
            }
            if *n == 0 {
                return Err(sd.bad(format!("no blocks in layer{}", stage + 1)));
            }
        }
        // The course's head is Sequential(Linear, Sigmoid) (`fc.0.*`); a plain one is `fc.*`.
        let fc = if sd.t.contains_key("fc.0.weight") {
            "fc.0"
        } else {
            "fc"
        };
        let fc_w = sd.get(&format!("{fc}.weight"), &[None, Some(cin)])?;
        let k = fc_w.dim(0)?;
        let fc_b = sd.get(&format!("{fc}.bias"), &[Some(k)])?;
        let dev = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .t()?
                .contiguous()?
                .to_device(device)?)
        };
        Ok(Self {
            conv1,
            blocks,
            fc_w: dev(fc_w)?,
            fc_b: fc_b.to_dtype(DType::F32)?.to_device(device)?,
            width,
            num_labels: k,
            layers,
        })
    }

    /// Dimension of the pooled feature vector.
    pub fn feature_dim(&self) -> usize {
        self.width * 8
    }

    /// x: (B, 3, H, W) in [-1, 1] -> (logits (B, K) before the head's sigmoid, pooled
    /// features (B, 8 width)).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.conv1.forward(x)?.relu()?;
        // Max-pool 3x3 / 2 with padding 1: after the ReLU every value is >= 0, so padding
        // with zeros is padding with -inf.
        let h = h
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride((3, 3), (2, 2))?;
        let mut h = h;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        let feats = h.mean((2, 3))?;
        let logits = feats.matmul(&self.fc_w)?.broadcast_add(&self.fc_b)?;
        Ok((logits, feats))
    }
}

/// The fixed inputs of the committed fixture (`fixed_input` of
/// `tests/fixtures/course_evaluator/make_fixture.py`): n x 3 x 64 x 64 values
/// sin(0.37 i + 1.1 c + 0.21 y - 0.13 x + 0.005 y x), computed in f64 and rounded to f32.
pub fn fixture_input(n: usize) -> Result<Tensor> {
    super::torch_state::sine_pattern(n, 64, |v| v)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/course_evaluator")
    }

    /// The worst difference between the network read from `dir/checkpoint.pth` and
    /// PyTorch's logits and sigmoid outputs in `dir/expected.json` (make_fixture.py).
    fn worst_difference(dir: &Path, width: usize) -> f64 {
        let net = TorchResNet::load(&dir.join("checkpoint.pth"), &Device::Cpu).unwrap();
        assert_eq!(
            (net.width, net.num_labels, net.layers),
            (width, 24, [2, 2, 2, 2])
        );
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let want: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (logits, feats) = net.forward(&fixture_input(3).unwrap()).unwrap();
        assert_eq!(feats.dims(), &[3, 8 * width]);
        let got_l = logits.to_vec2::<f32>().unwrap();
        let got_p = candle_nn::ops::sigmoid(&logits)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut worst = 0f64;
        for (key, got) in [("logits", &got_l), ("probabilities", &got_p)] {
            let rows = want[key].as_array().unwrap();
            assert_eq!(rows.len(), 3);
            for (r, g) in rows.iter().zip(got.iter()) {
                let r = r.as_array().unwrap();
                assert_eq!(r.len(), 24);
                for (a, b) in r.iter().zip(g) {
                    worst = worst.max((a.as_f64().unwrap() - *b as f64).abs());
                }
            }
        }
        worst
    }

    #[test]
    fn the_course_layout_matches_pytorch_on_the_fixture() {
        // expected.json: PyTorch 2.15's logits and sigmoid outputs of the fixture network
        // (torchvision's resnet18 layout at widths 4-32, random BN statistics, eval mode).
        let worst = worst_difference(&fixture(), 4);
        assert!(worst < 1e-4, "worst difference from PyTorch {worst:e}");
    }

    /// The real file's size and widths (64-512, about 45 MB) through the same code:
    /// `python3 tests/fixtures/course_evaluator/make_fixture.py --width 64 --out DIR`, then
    /// `GANSCOPE_FULL_EVALUATOR=DIR cargo test --lib full_width -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a 45 MB file made by make_fixture.py --width 64"]
    fn full_width_course_layout_matches_pytorch() {
        let Some(dir) = std::env::var_os("GANSCOPE_FULL_EVALUATOR") else {
            panic!("set GANSCOPE_FULL_EVALUATOR to the folder make_fixture.py --width 64 wrote");
        };
        let worst = worst_difference(Path::new(&dir), 64);
        println!("full-width file: worst difference from PyTorch {worst:e}");
        assert!(worst < 1e-4, "worst difference from PyTorch {worst:e}");
    }

    #[test]
    fn files_that_are_not_a_basic_block_resnet_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pth");
        std::fs::write(&junk, b"not a zip").unwrap();
        let e = TorchResNet::load(&junk, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("junk.pth") && e.contains("PyTorch"), "{e}");
        let e = TorchResNet::load(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");

        // The fixture's tensors with one missing / one of the wrong shape / a bottleneck key.
        let path = fixture().join("checkpoint.pth");
        let full: HashMap<String, Tensor> = read_pth(&path, Some("model")).unwrap();
        let mut t = full.clone();
        t.remove("layer3.0.downsample.0.weight");
        t.remove("layer3.0.downsample.1.weight");
        let e = TorchResNet::from_state_dict(&path, t, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer3.0") && e.contains("downsample"), "{e}");
        let mut t = full.clone();
        t.insert(
            "fc.0.weight".into(),
            Tensor::zeros((24, 31), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = TorchResNet::from_state_dict(&path, t, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("fc.0.weight") && e.contains("[24, 31]"), "{e}");
        let mut t = full;
        t.insert(
            "layer1.0.conv3.weight".into(),
            Tensor::zeros((4, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = TorchResNet::from_state_dict(&path, t, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("bottleneck"), "{e}");
    }
}
