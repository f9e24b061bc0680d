//! The evaluator: a ResNet-18-style classifier (He et al., "Deep Residual Learning for Image
//! Recognition", CVPR 2016; the CIFAR variant with a 3x3 stem and no max-pool, four stages of
//! two basic blocks) that scores generated images. Multi-label data (i-CLEVR) gets K sigmoid
//! outputs, class data a K-way softmax. Its pooled features feed the domain-feature Fréchet
//! distance and the diagnostics.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{check_shapes, write_atomic};
use crate::data::{ConditionKind, Dataset};
use crate::error::{Error, Result};
use crate::eval::metrics::{TopK, topk_accuracy};
use crate::eval::torch_resnet::TorchResNet;
use crate::images::from_u8;
use crate::nn::aux_loss;
use crate::nn::{BatchNorm, Conv2d, LayerOpts, Linear, Pass, WeightInit};
use crate::optim::adam::Adam;
use crate::params::{ParamStore, Vb};
use crate::rng::Rng;

/// x: (B, C, H, W) mirrored left to right.
fn mirror(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    Ok(x.index_select(&Tensor::from_vec(idx, w, x.device())?, 3)?)
}

const MIRROR_UNSAFE: &str = "test-time mirroring (tta_hflip) needs an evaluator trained with \
    flips (hflip): mirror images may not keep its labels";

/// Images per evaluator forward in [`Classifier::predict`].
const PREDICT_CHUNK: usize = 32;

/// `f` on consecutive slices of at most [`PREDICT_CHUNK`] images of `x`, in order.
fn for_chunks(x: &Tensor, mut f: impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    let n = x.dim(0)?;
    let mut i = 0;
    while i < n {
        let m = PREDICT_CHUNK.min(n - i);
        f(&x.narrow(0, i, m)?)?;
        i += m;
    }
    Ok(())
}

/// Everything that defines an evaluator and how it was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluatorConfig {
    pub image_size: usize,
    pub channels: usize,
    pub kind: ConditionKind,
    pub label_names: Vec<String>,
    /// Channels of the first stage (ResNet-18 uses 64; 16 keeps CPU training quick).
    pub width: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Fraction of the data held out (the last images) to measure accuracy.
    pub holdout: f64,
    /// Augmentation: random translation by up to this many pixels (edge-replicated).
    pub max_shift: usize,
    /// Augmentation: random horizontal flips (label-preserving for i-CLEVR, not for digits).
    pub hflip: bool,
    /// Stride of the 3x3 stem convolution; `None` (and configs saved before this field
    /// existed): 2 for images of 64 pixels or more, else 1 (see [`EvaluatorConfig::stem_stride`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stem_stride: Option<usize>,
    /// Test-time augmentation: label probabilities are the mean of the image's and its
    /// mirror image's (features stay the unmirrored image's). Only where mirroring keeps the
    /// labels (`hflip`); off in evaluators saved before this field existed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tta_hflip: bool,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            channels: 3,
            kind: ConditionKind::MultiHot,
            label_names: vec![],
            width: 16,
            epochs: 5,
            batch_size: 64,
            lr: 1e-3,
            seed: 0,
            holdout: 0.1,
            max_shift: 4,
            hflip: true,
            stem_stride: None,
            tta_hflip: false,
        }
    }
}

impl EvaluatorConfig {
    /// Defaults for a dataset: its geometry and labels; flips only for multi-label scenes.
    pub fn for_data(data: &dyn Dataset) -> Self {
        let (c, h, _) = data.image_shape();
        let kind = data.condition_kind();
        Self {
            image_size: h,
            channels: c,
            kind,
            label_names: data.label_names().to_vec(),
            hflip: kind == ConditionKind::MultiHot,
            max_shift: if h <= 32 { 2 } else { 4 },
            ..Self::default()
        }
    }

    /// The stem's stride: the configured one, else 2 for 64-pixel or larger inputs (as cheap
    /// as a 32x32 input afterwards) and 1 below.
    pub fn stem_stride(&self) -> usize {
        self.stem_stride
            .unwrap_or(if self.image_size >= 64 { 2 } else { 1 })
    }
}

struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: Vb) -> Result<Self> {
        let o = LayerOpts {
            bias: false,
            spectral_norm: false,
            init: WeightInit::Xavier,
        };
        let shortcut = if stride != 1 || cin != cout {
            Some((
                Conv2d::new(cin, cout, 1, stride, 0, o, vb.pp("shortcut").pp("conv"))?,
                BatchNorm::new(cout, true, vb.pp("shortcut").pp("bn"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv2d::new(cin, cout, 3, stride, 1, o, vb.pp("conv1"))?,
            bn1: BatchNorm::new(cout, true, vb.pp("bn1"))?,
            conv2: Conv2d::new(cout, cout, 3, 1, 1, o, vb.pp("conv2"))?,
            bn2: BatchNorm::new(cout, true, vb.pp("bn2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self
            .bn1
            .forward(&self.conv1.forward(x, pass)?, pass)?
            .relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h, pass)?, pass)?;
        let s = match &self.shortcut {
            Some((c, b)) => b.forward(&c.forward(x, pass)?, pass)?,
            None => x.clone(),
        };
        Ok((h + s)?.relu()?)
    }
}

/// One f32 vector per image.
pub type Rows = Vec<Vec<f32>>;

/// ganscope's own evaluator network.
struct OwnNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    blocks: Vec<BasicBlock>,
    head: Linear,
}

/// The network behind an evaluator: ganscope's own (trained by `ganscope evaluator train`)
/// or a PyTorch file read as is (the course's evaluator, eval mode only).
enum Net {
    Own(OwnNet),
    Torch(Box<TorchResNet>),
}

/// The evaluator network with its config and weights.
pub struct Classifier {
    net: Net,
    pub cfg: EvaluatorConfig,
    /// The own network's weights (empty for a PyTorch file).
    pub store: ParamStore,
}

/// File names of a saved evaluator.
pub const CONFIG_FILE: &str = "evaluator.json";
pub const WEIGHTS_FILE: &str = "evaluator.safetensors";

impl Classifier {
    pub fn new(cfg: &EvaluatorConfig, device: &Device) -> Result<Self> {
        let k = cfg.label_names.len();
        if k == 0 {
            return Err(Error::Config("an evaluator needs labels (K > 0)".into()));
        }
        let store = ParamStore::new(Rng::stream(cfg.seed, "init.eval"), DType::F32, device);
        let vb = store.root("eval");
        let o = LayerOpts {
            bias: false,
            spectral_norm: false,
            init: WeightInit::Xavier,
        };
        let w = cfg.width;
        let stem_stride = cfg.stem_stride();
        if !(1..=4).contains(&stem_stride) {
            return Err(Error::Config(format!(
                "evaluator stem stride {stem_stride}: expected 1 to 4"
            )));
        }
        let stem = Conv2d::new(cfg.channels, w, 3, stem_stride, 1, o, vb.pp("stem"))?;
        let stem_bn = BatchNorm::new(w, true, vb.pp("stem_bn"))?;
        let mut blocks = Vec::new();
        let mut cin = w;
        for stage in 0..4 {
            let cout = w << stage;
            for i in 0..2 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    cin,
                    cout,
                    stride,
                    vb.pp("blocks").pp(blocks.len()),
                )?);
                cin = cout;
            }
        }
        let head = Linear::new(cin, k, LayerOpts { bias: true, ..o }, vb.pp("head"))?;
        Ok(Self {
            net: Net::Own(OwnNet {
                stem,
                stem_bn,
                blocks,
                head,
            }),
            cfg: cfg.clone(),
            store,
        })
    }

    /// Dimension of the pooled feature vector.
    pub fn feature_dim(&self) -> usize {
        self.cfg.width * 8
    }

    /// Whether this evaluator is a PyTorch file read as is (it cannot be trained or saved).
    pub fn is_pytorch(&self) -> bool {
        matches!(self.net, Net::Torch(_))
    }

    /// x: (B, C, H, W) in [-1, 1] -> (logits (B, K), pooled features (B, 8w)). A PyTorch
    /// evaluator always runs in eval mode.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<(Tensor, Tensor)> {
        let n = match &self.net {
            Net::Own(n) => n,
            Net::Torch(t) => return t.forward(x),
        };
        let mut h = n.stem_bn.forward(&n.stem.forward(x, pass)?, pass)?.relu()?;
        for b in &n.blocks {
            h = b.forward(&h, pass)?;
        }
        let feats = h.mean((2, 3))?; // (B, 8w)
        Ok((n.head.forward(&feats, pass)?, feats))
    }

    /// The course's i-CLEVR evaluator (or any torchvision basic-block ResNet with a multi-label
    /// head) from its PyTorch checkpoint: 64x64 RGB inputs in [-1, 1], sigmoid outputs; with
    /// 24 outputs its labels are i-CLEVR's, in `objects.json` order (the course's).
    pub fn load_pytorch(path: &Path, device: &Device) -> Result<Self> {
        let t = TorchResNet::load(path, device)?;
        let label_names = if t.num_labels == crate::data::iclevr::OBJECT_NAMES.len() {
            crate::data::iclevr::OBJECT_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            (0..t.num_labels).map(|i| format!("label {i}")).collect()
        };
        let cfg = EvaluatorConfig {
            image_size: 64,
            channels: 3,
            kind: ConditionKind::MultiHot,
            label_names,
            width: t.width,
            hflip: false,
            ..EvaluatorConfig::default()
        };
        Ok(Self {
            net: Net::Torch(Box::new(t)),
            cfg,
            store: ParamStore::new(Rng::stream(0, "init.eval"), DType::F32, device),
        })
    }

    /// Per-image label probabilities (sigmoid or softmax) and features, in eval mode,
    /// processed in chunks of 256.
    pub fn predict(&self, x: &Tensor) -> Result<(Rows, Rows)> {
        // Small chunks keep each activation under the allocator's mmap threshold (32 MiB,
        // see `tune_allocator`): at 256 images of 64x64 every op mapped and faulted in fresh
        // pages (40% of the time in the kernel, measured with `ganscope evaluator score`).
        let n = x.dim(0)?;
        let (mut probs, mut feats) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for_chunks(x, |xi| {
            let (logits, f) = self.forward(xi, Pass::eval())?;
            let mut p = self.probabilities(&logits)?;
            if self.cfg.tta_hflip {
                let (mirrored, _) = self.forward(&mirror(xi)?, Pass::eval())?;
                p = ((p + self.probabilities(&mirrored)?)? * 0.5)?;
            }
            probs.extend(p.to_dtype(DType::F32)?.to_vec2::<f32>()?);
            feats.extend(f.to_dtype(DType::F32)?.to_vec2::<f32>()?);
            Ok(())
        })?;
        Ok((probs, feats))
    }

    /// Per-image features alone (eval mode, chunks as [`Classifier::predict`]; no mirrored
    /// pass even with `tta_hflip`: the features are always the image's own).
    pub fn features(&self, x: &Tensor) -> Result<Rows> {
        let mut feats = Vec::with_capacity(x.dim(0)?);
        for_chunks(x, |xi| {
            let (_, f) = self.forward(xi, Pass::eval())?;
            feats.extend(f.to_dtype(DType::F32)?.to_vec2::<f32>()?);
            Ok(())
        })?;
        Ok(feats)
    }

    /// Turn test-time mirroring on or off; an error for an evaluator trained without flips.
    pub fn set_tta_hflip(&mut self, on: bool) -> Result<()> {
        if on && !self.cfg.hflip {
            return Err(Error::Config(MIRROR_UNSAFE.into()));
        }
        self.cfg.tta_hflip = on;
        Ok(())
    }

    fn probabilities(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.kind {
            ConditionKind::OneHot => candle_nn::ops::softmax(logits, D::Minus1)?,
            _ => candle_nn::ops::sigmoid(logits)?,
        })
    }

    /// Error unless this evaluator reads `channels` x `size` x `size` images with exactly
    /// these labels (`dir` names the evaluator in the message).
    pub fn check_fits(
        &self,
        dir: &Path,
        channels: usize,
        size: usize,
        labels: &[String],
    ) -> Result<()> {
        let c = &self.cfg;
        // Exactly its own size: an evaluator judging resized images measures the resizing
        // (the 64-px i-CLEVR evaluator gave 0.775 on perfect 32-px renders enlarged).
        if c.channels == channels && c.image_size == size && c.label_names == labels {
            return Ok(());
        }
        Err(Error::Config(format!(
            "the evaluator in {} is for {}x{}x{} images with labels [{}], not {channels}x{size}x{size} with [{}]",
            dir.display(),
            c.channels,
            c.image_size,
            c.image_size,
            c.label_names.join(", "),
            labels.join(", ")
        )))
    }

    /// Save `evaluator.json` and `evaluator.safetensors` into `dir` (atomic writes).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.is_pytorch() {
            return Err(Error::Config(
                "a PyTorch evaluator is read as is, not saved in ganscope's format".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_vec_pretty(&self.cfg).map_err(|e| Error::Msg(e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), &json)?;
        let tensors: HashMap<String, Tensor> = self
            .store
            .model_tensors()
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), None)
            .map_err(|e| Error::bad_file(&path, e.to_string()))?;
        write_atomic(&path, &bytes)
    }

    /// Load an evaluator: a folder saved by [`Classifier::save`], or a PyTorch checkpoint
    /// file ([`Classifier::load_pytorch`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return Self::load_pytorch(dir, device);
        }
        let cp = dir.join(CONFIG_FILE);
        let text = crate::checkpoint::read_regular(&cp).map_err(|e| Error::io(&cp, e))?;
        let cfg: EvaluatorConfig =
            serde_json::from_slice(&text).map_err(|e| Error::bad_file(&cp, e.to_string()))?;
        if cfg.tta_hflip && !cfg.hflip {
            return Err(Error::bad_file(&cp, MIRROR_UNSAFE.to_string()));
        }
        let c = Self::new(&cfg, device)?;
        let wp = dir.join(WEIGHTS_FILE);
        let bytes = crate::checkpoint::read_regular(&wp).map_err(|e| Error::io(&wp, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::bad_file(&wp, e.to_string()))?;
        check_shapes(&wp, &c.store.shapes(true), &tensors)?;
        c.store.load(&wp, &tensors, true)?;
        Ok(c)
    }
}

/// Images `idx` of `data` as a batch, optionally augmented (shift, flip) with `rng`.
fn batch(
    data: &dyn Dataset,
    idx: &[usize],
    cfg: &EvaluatorConfig,
    rng: Option<&mut Rng>,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let (c, h, w) = data.image_shape();
    let k = data.num_conditions();
    let mut px = Vec::with_capacity(idx.len() * c * h * w);
    let mut cond = Vec::with_capacity(idx.len() * k);
    let mut rng = rng;
    for &i in idx {
        let img = data.image_u8(i);
        let (dx, dy, flip) = match rng.as_deref_mut() {
            Some(r) => {
                let s = cfg.max_shift as i64;
                let span = (2 * s + 1) as usize;
                (
                    r.below(span) as i64 - s,
                    r.below(span) as i64 - s,
                    cfg.hflip && r.below(2) == 1,
                )
            }
            None => (0, 0, false),
        };
        for ch in 0..c {
            for y in 0..h as i64 {
                let sy = (y - dy).clamp(0, h as i64 - 1) as usize;
                for x in 0..w as i64 {
                    let xx = if flip { w as i64 - 1 - x } else { x };
                    let sx = (xx - dx).clamp(0, w as i64 - 1) as usize;
                    px.push(from_u8(img[(ch * h + sy) * w + sx]));
                }
            }
        }
        cond.extend(data.condition(i));
    }
    Ok((
        Tensor::from_vec(px, (idx.len(), c, h, w), dev)?,
        Tensor::from_vec(cond, (idx.len(), k), dev)?,
    ))
}

/// Label ids of image `i` (the active entries of its condition vector).
pub fn label_ids(data: &dyn Dataset, i: usize) -> Vec<u16> {
    crate::eval::metrics::active_labels(&data.condition(i))
}

/// Top-k accuracy (course scoring) of `model` on images `idx` of `data`.
pub fn score_on(model: &Classifier, data: &dyn Dataset, idx: &[usize]) -> Result<TopK> {
    let dev = model.store.device().clone();
    let mut scores = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(256) {
        let (x, _) = batch(data, chunk, &model.cfg, None, &dev)?;
        scores.extend(model.predict(&x)?.0);
    }
    let truth: Vec<Vec<u16>> = idx.iter().map(|&i| label_ids(data, i)).collect();
    topk_accuracy(&scores, &truth)
}

/// Progress of evaluator training.
#[derive(Debug, Clone)]
pub struct EvalProgress {
    pub epoch: usize,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub loss: f64,
    /// Held-out top-k accuracy, at the end of each epoch.
    pub holdout_accuracy: Option<f64>,
}

/// Training state saved after every epoch (weights, Adam moments, epochs done), so a long
/// evaluator training resumes exactly where it stopped.
pub const STATE_FILE: &str = "evaluator_state.safetensors";

fn save_state(dir: &Path, model: &Classifier, opt: &Adam, epochs_done: usize) -> Result<()> {
    let mut t = model.store.model_tensors();
    t.extend(opt.state("opt")?);
    t.insert(
        "epochs_done".into(),
        Tensor::new(&[epochs_done as i64], &Device::Cpu)?,
    );
    let t: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let path = dir.join(STATE_FILE);
    let bytes = safetensors::serialize(t.iter().map(|(k, v)| (k.clone(), v)), None)
        .map_err(|e| Error::bad_file(&path, e.to_string()))?;
    write_atomic(&path, &bytes)
}

/// Restore what [`save_state`] wrote; returns the number of epochs already done.
fn load_state(dir: &Path, model: &Classifier, opt: &mut Adam) -> Result<usize> {
    let path = dir.join(STATE_FILE);
    let bytes = crate::checkpoint::read_regular(&path).map_err(|e| Error::io(&path, e))?;
    let t = candle_core::safetensors::load_buffer(&bytes, model.store.device())
        .map_err(|e| Error::bad_file(&path, e.to_string()))?;
    let weights: HashMap<String, Tensor> = t
        .iter()
        .filter(|(k, _)| k.starts_with("eval."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    check_shapes(&path, &model.store.shapes(true), &weights)?;
    opt.load_state("opt", &t, &path)?;
    let done = t
        .get("epochs_done")
        .ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            name: "epochs_done".into(),
        })?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    model.store.load(&path, &weights, true)?;
    Ok(done.first().copied().unwrap_or(0).max(0) as usize)
}

/// Train an evaluator on `data`, holding out the last `cfg.holdout` fraction; returns the
/// model and its held-out score. With `dir`, the training state is saved there after every
/// epoch, and a state already there (same config) is resumed exactly.
pub fn train_evaluator(
    cfg: &EvaluatorConfig,
    data: &dyn Dataset,
    device: &Device,
    dir: Option<&Path>,
    progress: impl FnMut(&EvalProgress),
) -> Result<(Classifier, TopK)> {
    train_evaluator_from(cfg, data, device, dir, None, progress)
}

/// [`train_evaluator`] starting from the weights of the saved evaluator in `init` (fine-tuning:
/// fresh Adam moments, `cfg`'s learning rate and cosine schedule), which must have the same
/// network (size, channels, labels, width, stem). A training state already in `dir` is
/// resumed instead, as in [`train_evaluator`].
pub fn train_evaluator_from(
    cfg: &EvaluatorConfig,
    data: &dyn Dataset,
    device: &Device,
    dir: Option<&Path>,
    init: Option<&Path>,
    mut progress: impl FnMut(&EvalProgress),
) -> Result<(Classifier, TopK)> {
    let model = Classifier::new(cfg, device)?;
    let resuming = dir.is_some_and(|d| d.join(STATE_FILE).exists());
    if let (Some(src), false) = (init, resuming) {
        let from = Classifier::load(src, device)?;
        let f = &from.cfg;
        let same_net = f.image_size == cfg.image_size
            && f.channels == cfg.channels
            && f.kind == cfg.kind
            && f.label_names == cfg.label_names
            && f.width == cfg.width
            && f.stem_stride() == cfg.stem_stride();
        if !same_net {
            return Err(Error::Config(format!(
                "{} is a {}x{} evaluator of width {} (stem stride {}, {} labels); this training \
                 needs {}x{}, width {}, stem stride {}, {} labels",
                src.display(),
                f.image_size,
                f.image_size,
                f.width,
                f.stem_stride(),
                f.label_names.len(),
                cfg.image_size,
                cfg.image_size,
                cfg.width,
                cfg.stem_stride(),
                cfg.label_names.len()
            )));
        }
        let wp = src.join(WEIGHTS_FILE);
        model.store.load(&wp, &from.store.model_tensors(), true)?;
    }
    let n = data.len();
    let n_hold = ((n as f64) * cfg.holdout).round() as usize;
    let n_train = n - n_hold;
    if n_train < cfg.batch_size || n_hold == 0 {
        return Err(Error::Config(format!(
            "{n} images are too few to train on batches of {} and hold out {:.0}%",
            cfg.batch_size,
            cfg.holdout * 100.0
        )));
    }
    let hold: Vec<usize> = (n_train..n).collect();
    let mut opt = Adam::new(model.store.trainable(), cfg.lr, 0.9, 0.999, 1e-8)?;
    let mut first_epoch = 0;
    if let Some(d) = dir
        && d.join(STATE_FILE).exists()
    {
        let cp = d.join(CONFIG_FILE);
        let text = crate::checkpoint::read_regular(&cp).map_err(|e| Error::io(&cp, e))?;
        let saved: EvaluatorConfig =
            serde_json::from_slice(&text).map_err(|e| Error::bad_file(&cp, e.to_string()))?;
        let same = EvaluatorConfig {
            epochs: cfg.epochs,
            ..saved
        } == *cfg;
        if !same {
            return Err(Error::Config(format!(
                "{} holds an evaluator trained with another config; use another folder",
                d.display()
            )));
        }
        first_epoch = load_state(d, &model, &mut opt)?;
    }
    let steps_per_epoch = n_train / cfg.batch_size;
    let mut last = None;
    for epoch in first_epoch..cfg.epochs {
        // Order and augmentation of an epoch depend only on (seed, epoch): resumable.
        let mut rng = Rng::stream(cfg.seed.wrapping_add(epoch as u64), "eval.epoch");
        let mut order: Vec<usize> = (0..n_train).collect();
        rng.shuffle(&mut order);
        // Cosine decay of the learning rate over all epochs.
        for step in 0..steps_per_epoch {
            let t = (epoch * steps_per_epoch + step) as f64 / (cfg.epochs * steps_per_epoch) as f64;
            opt.lr = cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
            let idx = &order[step * cfg.batch_size..(step + 1) * cfg.batch_size];
            // On a rayon worker, as the GAN trainer's steps (`crate::on_pool_worker`).
            let lv = crate::on_pool_worker(|| -> Result<f64> {
                let (x, y) = batch(data, idx, cfg, Some(&mut rng), device)?;
                let (logits, _) = model.forward(&x, Pass::train())?;
                let loss = aux_loss(cfg.kind, &logits, &y)?;
                let grads = loss.backward()?;
                opt.step(&grads)?;
                Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
            })?;
            if !lv.is_finite() {
                return Err(Error::Msg(format!(
                    "evaluator loss became {lv} at epoch {epoch} step {step}"
                )));
            }
            progress(&EvalProgress {
                epoch,
                step,
                steps_per_epoch,
                loss: lv,
                holdout_accuracy: None,
            });
        }
        let acc = score_on(&model, data, &hold)?;
        if let Some(d) = dir {
            model.save(d)?;
            save_state(d, &model, &opt, epoch + 1)?;
        }
        progress(&EvalProgress {
            epoch,
            step: steps_per_epoch,
            steps_per_epoch,
            loss: f64::NAN,
            holdout_accuracy: Some(acc.accuracy()),
        });
        last = Some(acc);
    }
    let acc = match last {
        Some(a) => a,
        None => score_on(&model, data, &hold)?,
    };
    Ok((model, acc))
}
