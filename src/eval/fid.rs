//! FID as everybody computes it: pytorch-fid's Inception-v3 (Szegedy et al., "Rethinking the
//! Inception Architecture for Computer Vision", CVPR 2016) in the variant of the TensorFlow FID
//! graph of Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
//! Nash Equilibrium", NeurIPS 2017, as `pytorch_fid/inception.py`
//! (<https://github.com/mseitzer/pytorch-fid>) builds it, reading the user's
//! `pt_inception-2015-12-05-6726825d.pth` (not shippable with ganscope).
//!
//! What makes it pytorch-fid's:
//! - input images in [0, 1] (PNG files as PIL's `convert('RGB')` + `ToTensor` read them; a
//!   generator's tanh output mapped by (x + 1) / 2), resized to 299 x 299 by bilinear
//!   interpolation with `align_corners=False` (no antialiasing), then mapped to [-1, 1] by 2x - 1;
//! - `BasicConv2d` = convolution without bias, BatchNorm with eps 0.001 (folded, eval mode), ReLU;
//! - the average pools of the Mixed_5/6/7b blocks ignore the padding (`count_include_pad=False`,
//!   TensorFlow's), and the last block (Mixed_7c) max-pools in its pool branch;
//! - four output blocks: after the first max pool (64 channels), the second max pool (192),
//!   Mixed_6e (768), Mixed_7c (2048, "pool3"); each averaged over space (`--dims`).
//!
//! Every width comes from the tensor shapes (kernel sizes and strides are the architecture's),
//! so the same code reads the real file and the committed fixture of the same layout at 1/16
//! the widths (`tests/fixtures/fid_inception/make_fixture.py`). The Fréchet distance itself is
//! [`super::frechet`].

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::torch_state::{ConvShape, Folded, StateDict, read_pth};
use crate::error::{Error, Result};

/// torchvision's Inception `BasicConv2d` BatchNorm epsilon.
const BN_EPS: f64 = 0.001;

/// The side pytorch-fid resizes every image to.
pub const INPUT_SIZE: usize = 299;

/// pytorch-fid's `--dims` choices (at full width) and the block each one reads.
pub const DIMS: [usize; 4] = [64, 192, 768, 2048];

/// The file names pytorch-fid lists in a folder (`IMAGE_EXTENSIONS`, lower case).
const IMAGE_EXTENSIONS: [&str; 9] = [
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// Where pytorch-fid downloads the weights from (`FID_WEIGHTS_URL`).
pub const FID_WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// A pool in front of a branch's convolutions.
#[derive(Clone, Copy)]
enum Pool {
    /// 3x3, stride 1, padding 1, averaging over the pixels inside the image only.
    Avg,
    /// 3x3, stride 1, padding 1 (Mixed_7c).
    Max1,
    /// 3x3, stride 2, no padding (Mixed_6a, Mixed_7a).
    Max2,
}

/// One branch of a mixed block: an optional pool, convolutions in turn, then optionally a fork
/// of convolutions applied to the same input whose outputs are concatenated (InceptionE).
struct Branch {
    pool: Option<Pool>,
    convs: Vec<Folded>,
    fork: Vec<Folded>,
}

/// `BasicConv2d`: the folded convolution, then ReLU.
fn basic(c: &Folded, x: &Tensor) -> Result<Tensor> {
    Ok(c.forward(x)?.relu()?)
}

fn pool(p: Pool, x: &Tensor) -> Result<Tensor> {
    Ok(match p {
        Pool::Max2 => x.max_pool2d_with_stride((3, 3), (2, 2))?,
        // Every input of a pool is a ReLU output (>= 0): zero padding is -inf padding.
        Pool::Max1 => x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride((3, 3), (1, 1))?,
        Pool::Avg => {
            let (_, _, h, w) = x.dims4()?;
            let sum = (x
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .avg_pool2d_with_stride((3, 3), (1, 1))?
                * 9.0)?;
            // Pixels inside the image under each 3x3 window.
            let n = |i: usize, len: usize| 3 - usize::from(i == 0) - usize::from(i + 1 == len);
            let inv: Vec<f32> = (0..h)
                .flat_map(|y| (0..w).map(move |x| 1.0 / (n(y, h) * n(x, w)) as f32))
                .collect();
            let inv = Tensor::from_vec(inv, (1, 1, h, w), x.device())?;
            sum.broadcast_mul(&inv)?
        }
    })
}

impl Branch {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match self.pool {
            Some(p) => pool(p, x)?,
            None => x.clone(),
        };
        for c in &self.convs {
            h = basic(c, &h)?;
        }
        if !self.fork.is_empty() {
            let parts = self
                .fork
                .iter()
                .map(|c| basic(c, &h))
                .collect::<Result<Vec<_>>>()?;
            h = Tensor::cat(&parts, 1)?;
        }
        Ok(h)
    }
}

/// A convolution of the architecture: name, kernel (rows, columns), stride; stride-1 kernels
/// keep the size, stride-2 ones have no padding (`valid` overrides for the stem).
type Spec = (&'static str, (usize, usize), usize);

/// The mixed blocks' branches as (pool, convolutions, fork); each branch starts from the
/// block's input.
type BranchSpec = (Option<Pool>, &'static [Spec], &'static [Spec]);

const A: &[BranchSpec] = &[
    (None, &[("branch1x1", (1, 1), 1)], &[]),
    (
        None,
        &[("branch5x5_1", (1, 1), 1), ("branch5x5_2", (5, 5), 1)],
        &[],
    ),
    (
        None,
        &[
            ("branch3x3dbl_1", (1, 1), 1),
            ("branch3x3dbl_2", (3, 3), 1),
            ("branch3x3dbl_3", (3, 3), 1),
        ],
        &[],
    ),
    (Some(Pool::Avg), &[("branch_pool", (1, 1), 1)], &[]),
];

const B: &[BranchSpec] = &[
    (None, &[("branch3x3", (3, 3), 2)], &[]),
    (
        None,
        &[
            ("branch3x3dbl_1", (1, 1), 1),
            ("branch3x3dbl_2", (3, 3), 1),
            ("branch3x3dbl_3", (3, 3), 2),
        ],
        &[],
    ),
    (Some(Pool::Max2), &[], &[]),
];

const C: &[BranchSpec] = &[
    (None, &[("branch1x1", (1, 1), 1)], &[]),
    (
        None,
        &[
            ("branch7x7_1", (1, 1), 1),
            ("branch7x7_2", (1, 7), 1),
            ("branch7x7_3", (7, 1), 1),
        ],
        &[],
    ),
    (
        None,
        &[
            ("branch7x7dbl_1", (1, 1), 1),
            ("branch7x7dbl_2", (7, 1), 1),
            ("branch7x7dbl_3", (1, 7), 1),
            ("branch7x7dbl_4", (7, 1), 1),
            ("branch7x7dbl_5", (1, 7), 1),
        ],
        &[],
    ),
    (Some(Pool::Avg), &[("branch_pool", (1, 1), 1)], &[]),
];

const D: &[BranchSpec] = &[
    (
        None,
        &[("branch3x3_1", (1, 1), 1), ("branch3x3_2", (3, 3), 2)],
        &[],
    ),
    (
        None,
        &[
            ("branch7x7x3_1", (1, 1), 1),
            ("branch7x7x3_2", (1, 7), 1),
            ("branch7x7x3_3", (7, 1), 1),
            ("branch7x7x3_4", (3, 3), 2),
        ],
        &[],
    ),
    (Some(Pool::Max2), &[], &[]),
];

const E_FORKS: [&[Spec]; 2] = [
    &[("branch3x3_2a", (1, 3), 1), ("branch3x3_2b", (3, 1), 1)],
    &[
        ("branch3x3dbl_3a", (1, 3), 1),
        ("branch3x3dbl_3b", (3, 1), 1),
    ],
];

/// InceptionE with the given pool (average in Mixed_7b, max in Mixed_7c).
const fn e(p: Pool) -> [BranchSpec; 4] {
    [
        (None, &[("branch1x1", (1, 1), 1)], &[]),
        (None, &[("branch3x3_1", (1, 1), 1)], E_FORKS[0]),
        (
            None,
            &[("branch3x3dbl_1", (1, 1), 1), ("branch3x3dbl_2", (3, 3), 1)],
            E_FORKS[1],
        ),
        (Some(p), &[("branch_pool", (1, 1), 1)], &[]),
    ]
}

const E1: [BranchSpec; 4] = e(Pool::Avg);
const E2: [BranchSpec; 4] = e(Pool::Max1);

/// The mixed blocks in order, with the output block (1-3) each one ends, if any.
const MIXED: [(&str, &[BranchSpec]); 11] = [
    ("Mixed_5b", A),
    ("Mixed_5c", A),
    ("Mixed_5d", A),
    ("Mixed_6a", B),
    ("Mixed_6b", C),
    ("Mixed_6c", C),
    ("Mixed_6d", C),
    ("Mixed_6e", C),
    ("Mixed_7a", D),
    ("Mixed_7b", &E1),
    ("Mixed_7c", &E2),
];

/// The stem: name, kernel, stride, keeps the size; a max pool 3x3/2 after the third and fifth.
const STEM: [(&str, usize, usize, bool); 5] = [
    ("Conv2d_1a_3x3", 3, 2, false),
    ("Conv2d_2a_3x3", 3, 1, false),
    ("Conv2d_2b_3x3", 3, 1, true),
    ("Conv2d_3b_1x1", 1, 1, false),
    ("Conv2d_4a_3x3", 3, 1, false),
];

/// pytorch-fid's `InceptionV3` (FID variant), eval mode, up to pool3.
pub struct FidInception {
    stem: Vec<Folded>,
    mixed: Vec<Vec<Branch>>,
    /// Channels of the four output blocks ([64, 192, 768, 2048] for the real file).
    pub dims: [usize; 4],
}

impl FidInception {
    /// Read pytorch-fid's weights (`pt_inception-2015-12-05-6726825d.pth`, a plain
    /// state_dict; its `fc` is not used) or a file of the same layout.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let t = read_pth(path, None)?;
        Self::from_state_dict(path, t, device)
    }

    fn from_state_dict(
        path: &Path,
        t: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let sd = StateDict {
            path,
            t,
            what: "pytorch-fid's Inception (pt_inception-2015-12-05)",
        };
        let conv = |name: &str, cin: usize, k: (usize, usize), stride: usize, same: bool| {
            sd.folded(
                &format!("{name}.conv"),
                &format!("{name}.bn"),
                ConvShape {
                    cin,
                    k: Some(k),
                    stride,
                    same,
                },
                BN_EPS,
                device,
            )
        };
        let mut dims = [0; 4];
        let mut stem = Vec::new();
        let mut c = 3;
        for (i, (name, k, stride, same)) in STEM.into_iter().enumerate() {
            let (f, cout) = conv(name, c, (k, k), stride, same)?;
            stem.push(f);
            c = cout;
            if i == 2 {
                dims[0] = c;
            }
        }
        dims[1] = c;
        let mut mixed = Vec::new();
        for (block, specs) in MIXED {
            let mut branches = Vec::new();
            let mut out = 0;
            for (p, convs, fork) in specs {
                let mut ch = c;
                let mut built = Vec::new();
                for (name, k, stride) in *convs {
                    let (f, cout) =
                        conv(&format!("{block}.{name}"), ch, *k, *stride, *stride == 1)?;
                    built.push(f);
                    ch = cout;
                }
                let mut forked = Vec::new();
                let mut fork_out = 0;
                for (name, k, stride) in *fork {
                    let (f, cout) = conv(&format!("{block}.{name}"), ch, *k, *stride, true)?;
                    forked.push(f);
                    fork_out += cout;
                }
                out += if fork.is_empty() { ch } else { fork_out };
                branches.push(Branch {
                    pool: *p,
                    convs: built,
                    fork: forked,
                });
            }
            mixed.push(branches);
            c = out;
            if block == "Mixed_6e" {
                dims[2] = c;
            }
        }
        dims[3] = c;
        Ok(Self { stem, mixed, dims })
    }

    /// The output block of pytorch-fid's `--dims` (64, 192, 768, 2048), or an error listing them.
    pub fn block_of_dims(dims: usize) -> Result<usize> {
        DIMS.iter().position(|&d| d == dims).ok_or_else(|| {
            Error::Msg(format!(
                "--dims {dims}: pytorch-fid's choices are 64, 192, 768 and 2048"
            ))
        })
    }

    /// Features of output block `block` (0-3), averaged over space: x (B, 3, 299, 299) in
    /// [-1, 1] (see [`prepare`]) -> (B, dims[block]).
    pub fn forward(&self, x: &Tensor, block: usize) -> Result<Tensor> {
        let block = block.min(3);
        let mut h = x.clone();
        for (i, c) in self.stem.iter().enumerate() {
            h = basic(c, &h)?;
            if i == 2 || i == 4 {
                h = pool(Pool::Max2, &h)?;
            }
            if (i == 2 && block == 0) || (i == 4 && block == 1) {
                return Ok(h.mean((2, 3))?);
            }
        }
        for (i, branches) in self.mixed.iter().enumerate() {
            let parts = branches
                .iter()
                .map(|b| b.forward(&h))
                .collect::<Result<Vec<_>>>()?;
            h = Tensor::cat(&parts, 1)?;
            if i == 7 && block == 2 {
                break;
            }
        }
        Ok(h.mean((2, 3))?)
    }
}

/// Bilinear resampling of planes (PyTorch's `interpolate(mode='bilinear',
/// align_corners=False)` without antialiasing): `src` is `planes` planes of h x w.
pub fn resize_bilinear(
    src: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    // Source position of each output index: (i + 0.5) in / out - 0.5, clamped at 0; the two
    // neighbours and the weight of the second.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let s = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let plane = &src[p * h * w..(p + 1) * h * w];
        for &(y0, y1, ly) in &ty {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, lx) in &tx {
                let top = (1.0 - lx) * r0[x0] + lx * r0[x1];
                let bottom = (1.0 - lx) * r1[x0] + lx * r1[x1];
                out.push((1.0 - ly) * top + ly * bottom);
            }
        }
    }
    out
}

/// Images (B, C, H, W) in [0, 1] with C = 3 (or 1, repeated like PIL's `convert('RGB')`) ->
/// the network's input (B, 3, 299, 299) in [-1, 1] on `device`.
pub fn prepare(x01: &Tensor, device: &Device) -> Result<Tensor> {
    let (b, c, h, w) = x01.dims4()?;
    let x = match c {
        3 => x01.clone(),
        1 => x01.repeat((1, 3, 1, 1))?,
        _ => {
            return Err(Error::Msg(format!(
                "FID needs RGB or grey images, got {c} channels"
            )));
        }
    };
    let v = x
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let s = INPUT_SIZE;
    let r: Vec<f32> = if (h, w) == (s, s) {
        v
    } else {
        resize_bilinear(&v, b * 3, h, w, s, s)
    };
    let r: Vec<f32> = r.into_iter().map(|v| 2.0 * v - 1.0).collect();
    Ok(Tensor::from_vec(r, (b, 3, s, s), device)?)
}

/// The image files pytorch-fid would read in `dir` (its extensions, lower case, not
/// recursive), sorted. ganscope decodes PNG only: another image type is an error naming the
/// file.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(ext) = p.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !IMAGE_EXTENSIONS.contains(&ext) || !p.is_file() {
            continue;
        }
        if ext != "png" {
            return Err(Error::bad_file(
                &p,
                "ganscope reads PNG images only (pytorch-fid also reads this type): convert the folder to PNG",
            ));
        }
        files.push(p);
    }
    files.sort();
    if files.len() < 2 {
        return Err(Error::bad_file(
            dir,
            format!(
                "{} PNG image{}: FID needs at least 2 images per folder",
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        ));
    }
    Ok(files)
}

/// A PNG as PIL's `convert('RGB')` + torchvision's `ToTensor` give it: 3 x H x W in [0, 1]
/// (grey repeated, alpha dropped).
pub fn read_image01(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let img = image::open(path)
        .map_err(|e| Error::bad_file(path, format!("cannot decode the image: {e}")))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = px.0[c] as f32 / 255.0;
        }
    }
    Ok((v, h, w))
}

/// Features of every image of `files` (block `block`), `batch` images at a time; `progress`
/// gets the number done after each batch.
pub fn file_features(
    net: &FidInception,
    files: &[PathBuf],
    block: usize,
    batch: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch.max(1)) {
        let mut v = Vec::with_capacity(chunk.len() * 3 * INPUT_SIZE * INPUT_SIZE);
        for p in chunk {
            let (img, h, w) = read_image01(p)?;
            if (h, w) == (INPUT_SIZE, INPUT_SIZE) {
                v.extend(img);
            } else {
                v.extend(resize_bilinear(&img, 3, h, w, INPUT_SIZE, INPUT_SIZE));
            }
        }
        let x = Tensor::from_vec(v, (chunk.len(), 3, INPUT_SIZE, INPUT_SIZE), device)?;
        let x = ((x * 2.0)? - 1.0)?;
        out.extend(net.forward(&x, block)?.to_vec2::<f32>()?);
        progress(out.len());
    }
    Ok(out)
}

/// Features of images in [-1, 1] (a generator's output or a dataset batch, B x C x H x W),
/// mapped to [0, 1] first.
pub fn tensor_features(
    net: &FidInception,
    x: &Tensor,
    block: usize,
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let device = net.device();
    let n = x.dim(0)?;
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let m = batch.max(1).min(n - i);
        let x01 = ((x.narrow(0, i, m)?.to_dtype(candle_core::DType::F32)? + 1.0)? * 0.5)?;
        out.extend(
            net.forward(&prepare(&x01, &device)?, block)?
                .to_vec2::<f32>()?,
        );
        i += m;
    }
    Ok(out)
}

impl FidInception {
    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.stem[0].w.device().clone()
    }
}

/// The fixed inputs of the committed fixture (`fixed_input` of
/// `tests/fixtures/fid_inception/make_fixture.py`): n x 3 x 32 x 32 values
/// 0.5 + 0.5 sin(0.37 i + 1.1 c + 0.21 y - 0.13 x + 0.005 y x), in f64 rounded to f32.
pub fn fixture_input(n: usize) -> Result<Tensor> {
    super::torch_state::sine_pattern(n, 32, |v| 0.5 + 0.5 * v)
}

#[cfg(test)]
#[path = "fid/tests.rs"]
mod tests;
