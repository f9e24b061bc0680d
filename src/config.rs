//! The one configuration tree of a run. Serialised as `config.json` beside every checkpoint;
//! named presets are constructors here, CLI flags override fields of a preset.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a dataset's condition vector is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConditionKind {
    /// No condition (K = 0).
    None,
    /// Exactly one class per image (MNIST, Fashion-MNIST, CIFAR-10).
    OneHot,
    /// Any subset of labels per image (i-CLEVR objects, cartoon attributes).
    MultiHot,
}

/// Side of the smallest feature map: 7 for 28-pixel images, 4 otherwise.
pub fn base_size(image_size: usize) -> usize {
    if image_size.is_multiple_of(7) { 7 } else { 4 }
}

/// Number of 2x resampling stages between the base feature map and the image.
pub fn num_resamples(image_size: usize) -> usize {
    (image_size / base_size(image_size)).trailing_zeros() as usize
}

/// Which dataset a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    Mnist,
    FashionMnist,
    /// i-CLEVR folder; without a path, the synthetic i-CLEVR renderer (embedded default).
    Iclevr,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// One subfolder of PNGs per class.
    ClassFolder,
    /// Images with a multi-label attribute list (`cartoon_attr.txt` layout).
    Attributes,
}

impl DataKind {
    /// The kebab-case name used in configs and folder names (`fashion-mnist`, `iclevr`, ...).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DataKind,
    /// Where the data lives; `None` searches the usual places.
    pub path: Option<PathBuf>,
    /// Use only the first N images (quick runs).
    pub limit: Option<usize>,
    /// Seed of the synthetic i-CLEVR renderer (used when kind is iclevr and path is none).
    pub synthetic_seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Mnist,
            path: None,
            limit: None,
            synthetic_seed: 0,
        }
    }
}

/// Network family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// Radford et al. 2016: (transposed) strided convolutions, BatchNorm.
    Dcgan,
    /// Residual up/down blocks (Miyato et al. 2018, Zhang et al. 2019), conditional BatchNorm in G.
    Resnet,
    /// A scene built one object at a time: G(previous image, object to add, labels so far, z)
    /// -> next image, D judges the (previous, next) pair (`model::sequential`; issue 23, seed
    /// 003). Needs multi-hot conditions and data in scene steps (i-CLEVR's `_0`, `_1`, `_2`).
    Sequential,
    /// A generator imported from PyTorch through ONNX (`ganscope import`): the graph file
    /// `generator.onnx` beside config.json, run by tract; eval-only (no discriminator, no
    /// training). [`ModelConfig::onnx`] names its inputs.
    Onnx,
}

/// The inputs of an imported ONNX generator ([`Arch::Onnx`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxInputs {
    /// The noise input, (B, Z) or (B, Z, 1, 1) float32.
    pub noise: String,
    /// The condition input: float32 (B, K) or an integer class index (B,); none when K = 0.
    pub condition: Option<String>,
}

/// How the condition vector enters the networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conditioning {
    /// Unconditional (K must be 0).
    None,
    /// c into G (concatenated to z for DCGAN, conditional BN for ResNet) and into D as an
    /// extra input plane projected by a linear layer ("type 1").
    Concat,
    /// c into G only; D never sees it ("type 2": instructive failure, G may ignore c).
    GOnly,
    /// c into G; D has an auxiliary head predicting c (Odena et al. 2017). `label_input`
    /// additionally feeds c into D as an input plane.
    Acgan,
    /// Projection discriminator (Miyato & Koyama 2018): D's logit gets <embed(c), phi(x)>.
    Projection,
}

/// Normalisation in the discriminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DNorm {
    Batch,
    Layer,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Square image side: 28, 32 or 64.
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// K, the length of the condition vector (0 for unconditional).
    pub num_conditions: usize,
    pub condition_kind: ConditionKind,
    /// Names of the K condition entries (class or label names), filled from the dataset.
    pub label_names: Vec<String>,
    pub conditioning: Conditioning,
    /// ACGAN only: also feed c into D as an input plane.
    pub label_input: bool,
    pub z_dim: usize,
    /// DCGAN G: width of the linear projection of c concatenated to z.
    pub cond_embed: usize,
    /// Base channel width of G (its last hidden layer).
    pub g_ch: usize,
    /// Base channel width of D (its first layer).
    pub d_ch: usize,
    pub g_spectral_norm: bool,
    pub d_spectral_norm: bool,
    /// Resolution (side in pixels) of the feature map that gets a self-attention block in G
    /// and in D; `None` for no attention.
    pub attention: Option<usize>,
    pub d_norm: DNorm,
    /// An auxiliary classifier head on D (ACGAN, Odena et al. 2017) predicting c, with any
    /// conditioning (`acgan` always has one): multi-label BCE for multi-hot conditions,
    /// softmax cross-entropy for classes, weighted by `loss.aux_weight`.
    pub aux_head: bool,
    /// Whether the auxiliary head's linear layer is spectrally normalised when
    /// `d_spectral_norm` is on (true, the behaviour before this option). Under spectral
    /// normalisation a logit can move by at most the norm of D's last features, which hinge
    /// training keeps small, so the head cannot become a confident classifier (a 64-px pair D
    /// stalled at a BCE of 0.17 per label, where predicting the label frequencies alone gives
    /// 0.23). `false` leaves the head free; D's real/fake logit and projection stay normalised,
    /// and the head's gradient reaches D's body only through the auxiliary loss.
    pub aux_spectral_norm: bool,
    /// D sees the standard deviation of its last features across groups of 4 samples as one
    /// extra feature map (Karras et al., "Progressive Growing of GANs", ICLR 2018): a batch
    /// of near-identical fakes is easy to tell from a varied real batch.
    pub minibatch_std: bool,
    /// DCGAN G: conditional BatchNorm (per-sample gain and bias from c, as the ResNet G has)
    /// in every hidden layer, besides c concatenated to z. No effect on the ResNet G (which
    /// always has it) or without conditions.
    pub g_cond_bn: bool,
    /// DCGAN G only: draw every label of c as its own layer (colour + mask logit) with one
    /// shared network, composited over a learned background by a per-pixel softmax over the
    /// layers (`model::layered`); the value is how many objects an image usually holds (each
    /// layer's latent is z rotated by `z_dim / g_object_layers` per layer). 0 = off.
    pub g_object_layers: usize,
    /// DCGAN D only (also the sequential model's pair D): a 3x3 stride-1 convolution to
    /// `d_ch` channels (leaky ReLU) at full resolution before the first downsampling block, so
    /// that D looks at every pixel of objects a few pixels wide before it halves the image (the
    /// evaluators' stride-1 stem does the same). The first block then takes `d_ch` channels.
    pub d_stem: bool,
    /// Width of a classifier network of its own inside D that gives the auxiliary logits in
    /// place of the head on D's last features (0 = off, the head reads D's body). The branch
    /// is a plain convolutional net on D's input (the image, or the sequential model's pair):
    /// Conv(k3, s1) at full resolution, then Conv(k4, s2) stages doubling from this width
    /// down to the base map, a linear layer to K logits; leaky ReLU, biases, no spectral or
    /// batch normalisation. D's body stays a Lipschitz-bounded real/fake judge and the
    /// branch an unconstrained multi-label classifier (ACGAN, Odena et al. 2017, with the
    /// classifier split from D as in Triple-GAN, Li et al. 2017). Trained by `loss.aux_weight`
    /// on real data only (unless `loss.aux_on_fakes`); G is trained to satisfy it. Needs an
    /// auxiliary head (`aux_head` or conditioning `acgan`).
    pub aux_branch: usize,
    /// `arch: onnx` only: the graph's input names.
    pub onnx: Option<OnnxInputs>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Dcgan,
            image_size: 28,
            channels: 1,
            num_conditions: 0,
            condition_kind: ConditionKind::None,
            label_names: vec![],
            conditioning: Conditioning::None,
            label_input: false,
            z_dim: 100,
            cond_embed: 50,
            g_ch: 64,
            d_ch: 64,
            g_spectral_norm: false,
            d_spectral_norm: false,
            attention: None,
            d_norm: DNorm::Batch,
            aux_head: false,
            aux_spectral_norm: true,
            minibatch_std: false,
            g_cond_bn: false,
            g_object_layers: 0,
            d_stem: false,
            aux_branch: 0,
            onnx: None,
        }
    }
}

/// Adversarial objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Goodfellow et al. 2014 with the non-saturating G loss (BCE with logits).
    Bce,
    /// Arjovsky et al. 2017: critic weights clipped to [-clip, clip].
    Wgan,
    /// Gulrajani et al. 2017: gradient penalty on interpolates.
    WganGp,
    /// Lim & Ye 2017 / Miyato et al. 2018.
    Hinge,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub kind: LossKind,
    /// WGAN-GP lambda.
    pub gp_lambda: f64,
    /// WGAN weight-clipping bound.
    pub clip: f64,
    /// R1 (Mescheder et al. 2018) weight gamma: adds gamma/2 E||grad_x D(x_real)||^2; 0 = off.
    pub r1_gamma: f64,
    /// ACGAN auxiliary classification loss weight.
    pub aux_weight: f64,
    /// D's auxiliary loss includes generated images (labelled with the condition they were
    /// made for) as in the ACGAN paper; off, D's head learns from real images only and G is
    /// pushed towards what real images of c look like.
    pub aux_on_fakes: bool,
    /// Mode-seeking weight lambda (Mao et al., "Mode Seeking GANs", CVPR 2019): G's batch
    /// is two halves with the same conditions and different z, and G's loss gets
    /// lambda / (mean|G(z1,c) - G(z2,c)| / mean|z1 - z2| + 1e-5); 0 = off.
    pub mode_seeking: f64,
    /// The mode-seeking term acts during the first this many generator steps and is off
    /// from then on; 0 = for the whole run. Early on it is what makes G draw at all (without
    /// it the sequential model painted nothing for 1000 steps while D won outright); late in
    /// a run it pays G for any pixel difference between two latents, and G answered with
    /// multicoloured speckle on the image border, which went within 2000 steps of switching
    /// it off (issue 17, session 19).
    pub mode_seeking_until: u64,
    /// Discriminator steps per generator step.
    pub n_critic: usize,
}

impl LossConfig {
    /// The mode-seeking weight of the generator step that follows `steps_done` steps:
    /// [`Self::mode_seeking`] until [`Self::mode_seeking_until`] steps are done, then 0.
    pub fn mode_seeking_at(&self, steps_done: u64) -> f64 {
        if self.mode_seeking_until > 0 && steps_done >= self.mode_seeking_until {
            0.0
        } else {
            self.mode_seeking
        }
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::Bce,
            gp_lambda: 10.0,
            clip: 0.01,
            r1_gamma: 0.0,
            aux_weight: 1.0,
            aux_on_fakes: true,
            mode_seeking: 0.0,
            mode_seeking_until: 0,
            n_critic: 1,
        }
    }
}

/// Adam settings; separate learning rates for G and D (TTUR, Heusel et al. 2017).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr_g: f64,
    pub lr_d: f64,
    /// The learning rate of D's `model.aux_branch` (a classifier, which learns at rates a
    /// GAN's discriminator does not take); `None`: `lr_d`. Not touched by the collapse
    /// guard's `lr_d_factor`.
    pub lr_aux_branch: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl OptimConfig {
    /// Adam with these learning rates and betas (eps at its default).
    pub fn adam(lr_g: f64, lr_d: f64, beta1: f64, beta2: f64) -> Self {
        Self {
            lr_g,
            lr_d,
            beta1,
            beta2,
            ..Self::default()
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr_g: 2e-4,
            lr_d: 2e-4,
            lr_aux_branch: None,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Name of the preset this config started from.
    pub preset: String,
    /// The one seed behind init, noise, label sampling and shuffling.
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub batch_size: usize,
    /// Target number of generator steps.
    pub steps: u64,
    /// Write a sample grid every N steps (0 = never).
    pub sample_every: u64,
    /// Save a checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Also keep G's and D's weights of every Nth step for good, each in
    /// `<run>/kept/step_NNNNNN/` (a weights-only folder, as `ganscope ship` writes, with
    /// `config.json`): `eval --run` and the explorer open it, and `train --resume` trains on
    /// from it. For choosing a step afterwards on training conditions, or comparing runs at
    /// equal steps when they run at different speeds. 0 = off (the checkpoint keeps only the
    /// newest step).
    pub keep_every: u64,
    /// Append a metrics line every N steps.
    pub log_every: u64,
    /// Live diagnostics and alarms.
    pub monitor: MonitorConfig,
    /// Differentiable augmentation of D's inputs (real and fake).
    pub augment: AugmentConfig,
    /// Exponential moving average of G's weights, the generator that is sampled and saved.
    pub ema: EmaConfig,
    /// How latents are drawn when sampling (sheets, the wall, `eval`, the explorer); training
    /// always draws plain N(0, I).
    pub sampling: SamplingConfig,
    /// What the loop does when D wins outright (see [`GuardConfig`]).
    pub guard: GuardConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: "custom".into(),
            seed: 0,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            batch_size: 64,
            steps: 5000,
            sample_every: 500,
            checkpoint_every: 1000,
            keep_every: 0,
            log_every: 50,
            monitor: Default::default(),
            augment: Default::default(),
            ema: Default::default(),
            sampling: Default::default(),
            guard: Default::default(),
        }
    }
}

/// One line per preset, for `ganscope presets`.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "mnist-dcgan",
        "unconditional DCGAN on MNIST 28x28, BCE (seed 001)",
    ),
    (
        "mnist-cdcgan",
        "conditional DCGAN on MNIST, class concatenated to z and to D's input",
    ),
    (
        "fmnist-cwgan-gp",
        "conditional WGAN-GP on Fashion-MNIST, layer-norm critic, n_critic 5 (seed 001)",
    ),
    (
        "iclevr-cdcgan",
        "cDCGAN on i-CLEVR 64x64, 24 multi-hot labels, BCE",
    ),
    (
        "iclevr-small",
        "one-shot i-CLEVR 32x32: cBN DCGAN G drawing one layer per object, SN projection + aux D, mode seeking, EMA",
    ),
    (
        "iclevr-sequential",
        "a scene built one object at a time on i-CLEVR 64x64: G adds an object to the previous image, D judges the pair (seed 003)",
    ),
    (
        "iclevr-sequential-small",
        "the explorer's default: iclevr-sequential at 32x32 (learns the most in 15 minutes on a 2-core CPU)",
    ),
    (
        "iclevr-wgan-gp",
        "conditional WGAN-GP on i-CLEVR 64x64 (seed 000)",
    ),
    (
        "iclevr-acgan",
        "ACGAN with label input on i-CLEVR 64x64, BCE auxiliary head (seed 002)",
    ),
    (
        "iclevr-sagan",
        "SAGAN on i-CLEVR 64x64: SN in G and D, attention at 32, hinge, TTUR (seed 004)",
    ),
    (
        "iclevr-projection",
        "ResNet cBN G + projection D with SN on i-CLEVR 64x64, hinge (seed 003)",
    ),
    (
        "cifar10-sagan",
        "SAGAN on CIFAR-10 32x32, projection D, attention at 16, hinge, TTUR (seed 004)",
    ),
];

impl TrainConfig {
    /// Look a preset up by name.
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "mnist-dcgan" => Self::mnist_dcgan(),
            "mnist-cdcgan" => Self::mnist_cdcgan(),
            "fmnist-cwgan-gp" => Self::fmnist_cwgan_gp(),
            "iclevr-cdcgan" => Self::iclevr_cdcgan(),
            "iclevr-small" => Self::iclevr_small(),
            "iclevr-sequential" => Self::iclevr_sequential(),
            "iclevr-sequential-small" => Self::iclevr_sequential_small(),
            "iclevr-wgan-gp" => Self::iclevr_wgan_gp(),
            "iclevr-acgan" => Self::iclevr_acgan(),
            "iclevr-sagan" => Self::iclevr_sagan(),
            "iclevr-projection" => Self::iclevr_projection(),
            "cifar10-sagan" => Self::cifar10_sagan(),
            _ => {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                return Err(Error::Config(format!(
                    "unknown preset `{name}` (known: {})",
                    names.join(", ")
                )));
            }
        };
        Ok(cfg)
    }

    fn named(name: &str) -> Self {
        Self {
            preset: name.into(),
            ..Self::default()
        }
    }

    pub fn mnist_dcgan() -> Self {
        Self::named("mnist-dcgan")
    }

    pub fn mnist_cdcgan() -> Self {
        let mut c = Self::named("mnist-cdcgan");
        c.model.num_conditions = 10;
        c.model.condition_kind = ConditionKind::OneHot;
        c.model.conditioning = Conditioning::Concat;
        c
    }

    pub fn fmnist_cwgan_gp() -> Self {
        let mut c = Self::mnist_cdcgan();
        c.preset = "fmnist-cwgan-gp".into();
        c.data.kind = DataKind::FashionMnist;
        c.model.d_norm = DNorm::Layer;
        c.loss.kind = LossKind::WganGp;
        c.loss.n_critic = 5;
        c.optim = OptimConfig::adam(1e-4, 1e-4, 0.5, 0.9);
        c
    }

    fn iclevr64(name: &str) -> Self {
        let mut c = Self::named(name);
        c.data.kind = DataKind::Iclevr;
        c.model.image_size = 64;
        c.model.channels = 3;
        c.model.num_conditions = 24;
        c.model.condition_kind = ConditionKind::MultiHot;
        c.model.conditioning = Conditioning::Concat;
        c.model.cond_embed = 100;
        c.steps = 20_000;
        c
    }

    pub fn iclevr_cdcgan() -> Self {
        Self::iclevr64("iclevr-cdcgan")
    }

    /// The one-shot i-CLEVR recipe at 32x32 (the explorer's default until session 27, when
    /// [`Self::iclevr_sequential_small`] learned more in the same 15 minutes). Chosen by
    /// measurement (README, "The default recipe"): a DCGAN G with conditional BatchNorm that
    /// draws every label as its own layer (`g_object_layers`);
    /// a spectral-norm hinge D with a projection term, an auxiliary multi-label head trained
    /// on real images only, and minibatch-std features; a mode-seeking term against G
    /// ignoring z; EMA of G for sampling.
    pub fn iclevr_small() -> Self {
        let mut c = Self::sn_hinge_d(Self::iclevr64("iclevr-small"));
        c.model.image_size = 32;
        c.model.g_ch = 32;
        c.model.d_ch = 32;
        c.model.cond_embed = 24;
        c.model.conditioning = Conditioning::Projection;
        c.model.aux_head = true;
        c.model.g_cond_bn = true;
        // Each label drawn as its own layer: 0.47 on training conditions after 15 minutes
        // (4501 steps), where the single-image G had 0.40 (8458 steps; README, "The default
        // recipe").
        c.model.g_object_layers = 3;
        c.model.minibatch_std = true;
        c.loss.aux_on_fakes = false;
        // Without it every latent of a condition drew the same image (README ablation).
        c.loss.mode_seeking = 0.1;
        // ... but late in a run it paid G for multicoloured speckle on the image border; off
        // after 20,000 steps (the 15-minute default run stops long before). The shipped
        // generator trained on from step 34,133 without it: the speckle gone, training
        // conditions 0.720 -> 0.739, domain FD 46.9 -> 20.9 in 1,867 steps (session 19).
        c.loss.mode_seeking_until = 20_000;
        // No DiffAugment (the 2e-4 run needed it and twice the steps). With object layers,
        // Adam 1e-3 and batch 32 over 15 minutes: 0.594 on training conditions, against 0.505
        // (1e-3, batch 64), 0.530 (4e-4, batch 32) and 0.470 (4e-4, batch 64; README).
        c.optim = OptimConfig::adam(1e-3, 1e-3, 0.0, 0.99);
        c.ema = EmaConfig {
            decay: 0.999,
            start: 300,
        };
        c.batch_size = 32;
        c.sample_every = 250;
        c
    }

    /// Seed 003's reframing at 64x64: the explorer default's losses and optimiser (SN hinge D
    /// with projection and an auxiliary head, mode seeking, EMA, Adam 1e-3, batch 32) on the
    /// scene-step model; D sees (previous, next) and [object added, labels so far].
    pub fn iclevr_sequential() -> Self {
        let mut c = Self::iclevr_small();
        c.preset = "iclevr-sequential".into();
        c.model.arch = Arch::Sequential;
        c.model.image_size = 64;
        // The most objects a scene gets, and z's rotation per step (z_dim / 3).
        c.model.g_object_layers = 3;
        // A full-resolution first layer in the pair D: at 32x32 and 4500 steps, 0.576 against
        // 0.539 on the training conditions and half the domain FD (35 against 72), the
        // speckled patches gone (issue 17, session 18).
        c.model.d_stem = true;
        // Mode seeking off after 20,000 steps as in `iclevr-small` (the border speckle went
        // within 2000 steps of switching it off at step 30,000; switched off at 8,500 instead,
        // the training conditions scored 0.729 / 0.739 at 10,500 / 12,500 against 0.744 / 0.760
        // with it: it still helps while G learns to draw; session 19).
        //
        // Session 25's 64-px run collapsed 5,400 steps after mode seeking went off (D loss
        // 1.2-1.7 to 0.14-0.24 within 200 steps, D(x) to +10, empty floors from then on) and
        // nothing of it could be kept: roll back instead, D's rate halved.
        c.guard.on_d_wins = OnDWins::Rollback;
        c
    }

    /// [`Self::iclevr_sequential`] at 32x32: the explorer's default (`app::DEFAULT_PRESET`).
    /// From scratch, 15 minutes alone on the 2-core CPU: 0.683 on the training conditions
    /// against the one-shot `iclevr-small`'s 0.611 in the same minutes (README, "The default
    /// recipe").
    pub fn iclevr_sequential_small() -> Self {
        let mut c = Self::iclevr_sequential();
        c.preset = "iclevr-sequential-small".into();
        c.model.image_size = 32;
        c
    }

    pub fn iclevr_wgan_gp() -> Self {
        let mut c = Self::iclevr64("iclevr-wgan-gp");
        c.model.d_norm = DNorm::Layer;
        c.loss.kind = LossKind::WganGp;
        c.loss.n_critic = 5;
        c.optim.lr_g = 1e-4;
        c.optim.lr_d = 1e-4;
        c.optim.beta1 = 0.0;
        c.optim.beta2 = 0.9;
        c
    }

    pub fn iclevr_acgan() -> Self {
        let mut c = Self::iclevr64("iclevr-acgan");
        c.model.conditioning = Conditioning::Acgan;
        c.model.label_input = true;
        c.loss.aux_weight = 1.0;
        c
    }

    /// SNGAN/SAGAN's critic recipe: spectral norm instead of a norm layer, hinge loss, TTUR.
    fn sn_hinge_d(mut c: Self) -> Self {
        c.model.d_norm = DNorm::None;
        c.model.d_spectral_norm = true;
        c.loss.kind = LossKind::Hinge;
        c.optim = OptimConfig::adam(1e-4, 4e-4, 0.0, 0.9);
        c
    }

    fn sagan_common(mut c: Self) -> Self {
        c.model.arch = Arch::Resnet;
        c.model.conditioning = Conditioning::Projection;
        Self::sn_hinge_d(c)
    }

    pub fn iclevr_sagan() -> Self {
        let mut c = Self::sagan_common(Self::iclevr64("iclevr-sagan"));
        c.model.g_spectral_norm = true;
        c.model.attention = Some(32);
        c.model.g_ch = 32;
        c.model.d_ch = 32;
        c
    }

    pub fn iclevr_projection() -> Self {
        let mut c = Self::sagan_common(Self::iclevr64("iclevr-projection"));
        c.model.g_ch = 32;
        c.model.d_ch = 32;
        c.optim.lr_g = 2e-4;
        c.optim.lr_d = 2e-4;
        c
    }

    pub fn cifar10_sagan() -> Self {
        let mut c = Self::sagan_common(Self::named("cifar10-sagan"));
        c.data.kind = DataKind::Cifar10;
        c.model.image_size = 32;
        c.model.channels = 3;
        c.model.num_conditions = 10;
        c.model.condition_kind = ConditionKind::OneHot;
        c.model.g_spectral_norm = true;
        c.model.attention = Some(16);
        c.model.g_ch = 64;
        c.model.d_ch = 64;
        c.steps = 50_000;
        c
    }

    /// Reject combinations the engine cannot build, with a reason.
    pub fn validate(&self) -> Result<()> {
        // The preset names the default run folder (`runs/<preset>`): a plain name only.
        let p = &self.preset;
        if p.is_empty()
            || p.len() > 64
            || p.starts_with('.')
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::Config(format!(
                "preset name {p:?}: use 1-64 letters, digits, '-', '_' or '.' (not first); it \
                 names the run folder runs/<preset>"
            )));
        }
        let m = &self.model;
        if ![28, 32, 64].contains(&m.image_size) {
            return Err(Error::Config(format!(
                "image_size {} is not supported (28, 32 or 64)",
                m.image_size
            )));
        }
        if m.channels != 1 && m.channels != 3 {
            return Err(Error::Config(format!(
                "channels must be 1 or 3, not {}",
                m.channels
            )));
        }
        let uncond = m.conditioning == Conditioning::None;
        if uncond != (m.num_conditions == 0) {
            return Err(Error::Config(format!(
                "conditioning `{:?}` with num_conditions = {}: use conditioning none exactly when K = 0",
                m.conditioning, m.num_conditions
            )));
        }
        if (m.num_conditions == 0) != (m.condition_kind == ConditionKind::None) {
            return Err(Error::Config(
                "condition_kind must be none exactly when num_conditions = 0".into(),
            ));
        }
        if let Some(r) = m.attention {
            // Inner feature-map sides shared by G and D (not the base map, not the image).
            let s0 = base_size(m.image_size);
            let sides: Vec<usize> = (1..num_resamples(m.image_size)).map(|l| s0 << l).collect();
            if !sides.contains(&r) {
                return Err(Error::Config(format!(
                    "attention at {r}x{r}: a {0}x{0} model has inner feature maps of side {sides:?}",
                    m.image_size
                )));
            }
        }
        if (m.arch == Arch::Onnx) != m.onnx.is_some() {
            return Err(Error::Config(
                "model.onnx (the imported graph's input names) goes with arch onnx, and only \
                 with it"
                    .into(),
            ));
        }
        if let Some(o) = &m.onnx
            && o.condition.is_some() != (m.num_conditions > 0)
        {
            return Err(Error::Config(format!(
                "arch onnx: a condition input goes with K > 0 (K = {}, condition input {:?})",
                m.num_conditions, o.condition
            )));
        }
        if m.g_object_layers > 0
            && (m.arch == Arch::Resnet || m.num_conditions == 0 || m.g_object_layers > 16)
        {
            return Err(Error::Config(format!(
                "model.g_object_layers = {}: object layers need the dcgan or sequential arch, \
                 conditions, and at most 16 layers",
                m.g_object_layers
            )));
        }
        if m.d_stem && !matches!(m.arch, Arch::Dcgan | Arch::Sequential) {
            return Err(Error::Config(format!(
                "model.d_stem adds a full-resolution layer to the DCGAN discriminator: arch \
                 {:?} has none",
                m.arch
            )));
        }
        if m.aux_branch > 0
            && !(m.num_conditions > 0 && (m.aux_head || m.conditioning == Conditioning::Acgan))
        {
            return Err(Error::Config(format!(
                "model.aux_branch = {}: the branch gives D's auxiliary logits; turn on an \
                 auxiliary head (model.aux_head = true or conditioning acgan) or set it to 0",
                m.aux_branch
            )));
        }
        if m.aux_branch > 0 && m.arch == Arch::Onnx {
            return Err(Error::Config(
                "model.aux_branch: an imported (onnx) generator trains no discriminator".into(),
            ));
        }
        if m.arch == Arch::Sequential
            && (m.condition_kind != ConditionKind::MultiHot || m.g_object_layers == 0)
        {
            return Err(Error::Config(
                "model.arch sequential builds a scene from multi-hot labels one object at a \
                 time: it needs condition_kind multi-hot and model.g_object_layers >= 1 (the \
                 latent's rotation per object)"
                    .into(),
            ));
        }
        if self.loss.kind == LossKind::WganGp && m.d_norm == DNorm::Batch {
            return Err(Error::Config(
                "WGAN-GP with a BatchNorm critic: the penalty assumes independent samples; use d_norm layer or none".into(),
            ));
        }
        if self.steps == 0 {
            return Err(Error::Config(
                "steps must be at least 1 (the number of generator steps to train to)".into(),
            ));
        }
        if self.batch_size == 0 || self.loss.n_critic == 0 || m.z_dim == 0 {
            return Err(Error::Config(
                "batch_size, n_critic and z_dim must be > 0".into(),
            ));
        }
        // Ranges that keep a run finite and its memory bounded (a 1024-channel 64-px model
        // at batch 4096 is already far beyond any machine this runs on).
        for (name, v, lo, hi) in [
            ("model.g_ch", m.g_ch, 1, 1024),
            ("model.d_ch", m.d_ch, 1, 1024),
            ("model.aux_branch", m.aux_branch, 0, 512),
            ("model.z_dim", m.z_dim, 1, 4096),
            ("model.cond_embed", m.cond_embed, 1, 4096),
            ("model.num_conditions", m.num_conditions, 0, 1000),
            ("batch_size", self.batch_size, 1, 4096),
            ("loss.n_critic", self.loss.n_critic, 1, 100),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(Error::Config(format!(
                    "{name} must be in {lo}..={hi}, not {v}"
                )));
            }
        }
        let o = &self.optim;
        for (name, v, lo, hi, lo_open) in [
            ("optim.lr_g", o.lr_g, 0.0, 1.0, true),
            ("optim.lr_d", o.lr_d, 0.0, 1.0, true),
            (
                "optim.lr_aux_branch",
                o.lr_aux_branch.unwrap_or(o.lr_d),
                0.0,
                1.0,
                true,
            ),
            ("optim.beta1", o.beta1, 0.0, 0.999_999, false),
            ("optim.beta2", o.beta2, 0.0, 0.999_999_9, false),
            ("optim.eps", o.eps, 0.0, 1.0, true),
            ("loss.gp_lambda", self.loss.gp_lambda, 0.0, 1e6, false),
            ("loss.r1_gamma", self.loss.r1_gamma, 0.0, 1e6, false),
            ("loss.aux_weight", self.loss.aux_weight, 0.0, 1e6, false),
            ("loss.clip", self.loss.clip, 0.0, 1e6, true),
        ] {
            let low_ok = if lo_open { v > lo } else { v >= lo };
            if !(v.is_finite() && low_ok && v <= hi) {
                let open = if lo_open { "(" } else { "[" };
                return Err(Error::Config(format!(
                    "{name} must be a finite number in {open}{lo}, {hi}], not {v}"
                )));
            }
        }
        let l = &self.loss;
        if !(l.mode_seeking.is_finite() && l.mode_seeking >= 0.0) {
            return Err(Error::Config(format!(
                "loss.mode_seeking must be a finite number >= 0, not {}",
                l.mode_seeking
            )));
        }
        if l.mode_seeking > 0.0 && (self.batch_size < 2 || !self.batch_size.is_multiple_of(2)) {
            return Err(Error::Config(format!(
                "loss.mode_seeking pairs the samples of a batch: batch_size must be even, not {}",
                self.batch_size
            )));
        }
        if !(0.0..1.0).contains(&self.ema.decay) {
            return Err(Error::Config(format!(
                "ema.decay must be in [0, 1) (0 = off), not {}",
                self.ema.decay
            )));
        }
        validate_truncation(self.sampling.truncation)?;
        self.guard.validate(&self.monitor.diagnostics.alarms)?;
        for (name, v) in [
            ("augment.translation", self.augment.translation),
            ("augment.cutout", self.augment.cutout),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Config(format!(
                    "{name} is a fraction of the image side in [0, 1], not {v}"
                )));
            }
        }
        let mo = &self.monitor;
        if mo.fid_every > 0 {
            if mo.fid_weights.is_none() {
                return Err(Error::Config(format!(
                    "monitor.fid_every = {} needs monitor.fid_weights (pytorch-fid's \
                     pt_inception-2015-12-05-6726825d.pth; --fid-weights FILE)",
                    mo.fid_every
                )));
            }
            for (name, v) in [
                ("monitor.fid_n_real", mo.fid_n_real),
                ("monitor.fid_n_generated", mo.fid_n_generated),
            ] {
                if !(2..=100_000).contains(&v) {
                    return Err(Error::Config(format!(
                        "{name} must be in 2..=100000 (FID needs at least 2 images), not {v}"
                    )));
                }
            }
        }
        if !m.label_names.is_empty() && m.label_names.len() != m.num_conditions {
            return Err(Error::Config(format!(
                "{} label names for K = {}",
                m.label_names.len(),
                m.num_conditions
            )));
        }
        Ok(())
    }
}

/// Apply `path=value` overrides (`loss.mode_seeking=1`, `model.attention=null`) to a config.
/// Every path must name an existing field (a typo is an error, not a silent no-op); the value
/// is parsed as JSON, or taken as a string when it is not JSON.
pub fn apply_overrides(cfg: TrainConfig, sets: &[String]) -> Result<TrainConfig> {
    if sets.is_empty() {
        return Ok(cfg);
    }
    let mut v = serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    for s in sets {
        let (path, value) = s.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--set {s}: expected PATH=VALUE (e.g. ema.decay=0.999)"
            ))
        })?;
        let value: serde_json::Value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        let mut node = &mut v;
        for key in path.split('.') {
            node = node
                .as_object_mut()
                .and_then(|o| o.get_mut(key))
                .ok_or_else(|| {
                    Error::Config(format!("--set {s}: the config has no field `{path}`"))
                })?;
        }
        *node = value;
    }
    serde_json::from_value(v).map_err(|e| Error::Config(format!("--set: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Sections of the tree whose behaviour lives in higher layers (the monitor, the diagnostics
// and their alarms, augmentation, EMA). The types are defined here, with their defaults, so
// that the config depends on nothing above it; their methods stay beside the code that uses
// them (`train::monitor`, `diagnostics`, `train::augment`, `train::ema`), which re-export them.
// ---------------------------------------------------------------------------------------------

/// DiffAugment policies applied to every image D sees (see [`crate::train::augment`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Largest shift as a fraction of the image side (the paper uses 1/8); 0 = off.
    pub translation: f64,
    /// Side of the zeroed square as a fraction of the image side (the paper uses 1/2); 0 = off.
    pub cutout: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            translation: 0.0,
            cutout: 0.0,
        }
    }
}

/// Moving average of G's weights (see [`crate::train::ema`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay per generator step (0.999 averages about the last 1000 steps); 0 = off.
    pub decay: f64,
    /// Until this step the average is a plain copy (early weights are not worth keeping);
    /// after it the decay warms up (see [`EmaConfig::decay_at`]).
    pub start: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.0,
            start: 0,
        }
    }
}

/// What the loop does when the "D accuracy pinned" alarm fires (D wins every batch, the usual
/// prelude to a collapse; see `crate::diagnostics::alarms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDWins {
    /// Raise the alarm and train on.
    #[default]
    Alarm,
    /// Go back to the newest guard snapshot taken before the alarm's window began, scale the
    /// learning rates by [`GuardConfig::lr_d_factor`] / [`GuardConfig::lr_g_factor`] and train
    /// on from there.
    Rollback,
}

/// The collapse guard: snapshots of the whole training state (G, its moving average, D and
/// the optimisers) kept in memory every `snapshot_every` steps, and the rollback to one of
/// them when D wins outright ([`OnDWins::Rollback`]). Only snapshots taken while D was not
/// winning outright are kept; the one restored was taken at or before the first step of the
/// alarm's window (`monitor.diagnostics.alarms.d_acc_window` steps before it fired).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    pub on_d_wins: OnDWins,
    /// Take a guard snapshot every N generator steps.
    pub snapshot_every: u64,
    /// Keep the newest N of them (each holds the whole training state in memory: about 36 MB
    /// for `iclevr-sequential`).
    pub keep: usize,
    /// Multiply D's and G's learning rates by these at each rollback (0 < f <= 1; the new rates
    /// are written to the next checkpoint's `config.json`).
    pub lr_d_factor: f64,
    pub lr_g_factor: f64,
    /// After this many rollbacks in one run (process), the alarm only warns.
    pub max_rollbacks: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            on_d_wins: OnDWins::Alarm,
            snapshot_every: 1000,
            keep: 3,
            lr_d_factor: 0.5,
            lr_g_factor: 1.0,
            max_rollbacks: 3,
        }
    }
}

impl GuardConfig {
    /// Reject settings that cannot work, with a reason.
    pub fn validate(&self, alarms: &AlarmConfig) -> Result<()> {
        for (name, f) in [
            ("lr_d_factor", self.lr_d_factor),
            ("lr_g_factor", self.lr_g_factor),
        ] {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                return Err(Error::Config(format!(
                    "guard.{name} = {f}: use a factor in (0, 1]"
                )));
            }
        }
        if self.on_d_wins == OnDWins::Rollback {
            if self.snapshot_every == 0 || self.keep == 0 || self.keep > 64 {
                return Err(Error::Config(format!(
                    "guard.on_d_wins = rollback needs guard.snapshot_every >= 1 and guard.keep \
                     in 1..=64 (have {} and {})",
                    self.snapshot_every, self.keep
                )));
            }
            if alarms.d_acc_window == 0 {
                return Err(Error::Config(
                    "guard.on_d_wins = rollback needs the D-accuracy alarm \
                     (monitor.diagnostics.alarms.d_acc_window >= 1)"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// How sampling draws its latents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// The truncation trick (Brock, Donahue & Simonyan, "Large Scale GAN Training for High
    /// Fidelity Natural Image Synthesis", ICLR 2019, section 3.1): every latent entry whose
    /// magnitude exceeds this threshold is drawn again, which trades variety for fidelity.
    /// `None` = plain N(0, I), what G was trained on. See [`validate_truncation`].
    pub truncation: Option<f64>,
}

/// Smallest and largest truncation threshold accepted. Below 0.05 a standard-normal draw
/// lands inside the interval less than 4% of the time; above 8 truncation changes nothing.
pub const TRUNCATION_RANGE: (f64, f64) = (0.05, 8.0);

/// A truncation threshold is finite and within [`TRUNCATION_RANGE`].
pub fn validate_truncation(t: Option<f64>) -> Result<()> {
    let (lo, hi) = TRUNCATION_RANGE;
    match t {
        Some(v) if !(lo..=hi).contains(&v) => Err(Error::Config(format!(
            "sampling.truncation must be between {lo} and {hi} (or null for none), not {v}"
        ))),
        _ => Ok(()),
    }
}

/// When and on how many samples diagnostics run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Run the diagnostics every N generator steps (0 = never; the alarms on step statistics
    /// run at every step regardless).
    pub every: u64,
    /// Evaluator folder, or a PyTorch checkpoint of the course's evaluator (`.pth`);
    /// `None` = `checkpoints/evaluator-<data kind>`.
    pub evaluator: Option<PathBuf>,
    /// Real images whose evaluator features are computed once.
    pub n_real: usize,
    /// Generated images per check.
    pub n_generated: usize,
    /// Latents drawn per condition in a check (the intra-condition diversity compares
    /// samples of the same condition; 1 leaves it without generated pairs).
    pub seeds_per_condition: usize,
    /// Test-time mirroring in the checks' label probabilities (the mean over each image and
    /// its mirror image). Off by default whatever the evaluator's own `tta_hflip` says
    /// (`ganscope eval` follows the evaluator): it doubles the evaluator's pass over the
    /// generated images, and a check stops training while it runs. Needs an evaluator
    /// trained with flips.
    pub tta_hflip: bool,
    /// Most of the wall time the checks may take over the run (checks / (checks +
    /// training)): a due check is postponed to a later multiple of `every` until one more
    /// (as long as the last) fits this share. 1.0 or more turns the limit off (every
    /// multiple of `every` is checked).
    pub max_share: f64,
    /// pytorch-fid's FID (generated vs real images, Inception pool3 features) every N
    /// generator steps (0 = never); needs `fid_weights`. Costly on a CPU: every check runs
    /// `fid_n_generated` images through Inception-v3 at 299x299 (the real side once).
    pub fid_every: u64,
    /// pytorch-fid's weights file (`pt_inception-2015-12-05-6726825d.pth`, not shipped).
    pub fid_weights: Option<PathBuf>,
    /// Real images whose Inception features are computed once (at the first FID check).
    pub fid_n_real: usize,
    /// Generated images per FID check.
    pub fid_n_generated: usize,
    pub diagnostics: DiagnosticsConfig,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            every: 0,
            evaluator: None,
            n_real: 2000,
            n_generated: 1000,
            seeds_per_condition: 4,
            tta_hflip: false,
            max_share: 0.08,
            fid_every: 0,
            fid_weights: None,
            fid_n_real: 1000,
            fid_n_generated: 500,
            diagnostics: DiagnosticsConfig::default(),
        }
    }
}

/// Settings of every measure (all have defaults, so a config.json may name only some).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Seeds the real split and k-means.
    pub seed: u64,
    /// A class is covered when it gets at least this fraction of its expected share.
    pub coverage_min_share: f64,
    /// Pseudo-count per class in KL(data || generated).
    pub kl_pseudo_count: f64,
    /// NDB: number of k-means bins K, Lloyd iteration cap, test level, Bonferroni correction.
    pub ndb_bins: usize,
    pub kmeans_max_iter: usize,
    pub ndb_alpha: f64,
    pub ndb_bonferroni: bool,
    /// k of the precision / recall balls and of the density / coverage balls.
    pub pr_k: usize,
    pub dc_k: usize,
    /// Diversity flag: generated / real mean pairwise distance below this.
    pub diversity_flag_ratio: f64,
    /// Closest pairs reported, for generated and for real.
    pub closest_pairs: usize,
    pub alarms: AlarmConfig,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            coverage_min_share: 0.25,
            kl_pseudo_count: 0.5,
            ndb_bins: 50,
            kmeans_max_iter: 100,
            ndb_alpha: 0.05,
            ndb_bonferroni: false,
            pr_k: 3,
            dc_k: 5,
            diversity_flag_ratio: 0.5,
            closest_pairs: 8,
            alarms: AlarmConfig::default(),
        }
    }
}

/// Alarm thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmConfig {
    /// Steps before which only the NaN/Inf rule can fire.
    pub warmup_steps: u64,
    pub d_acc_pinned: f64,
    pub d_acc_window: usize,
    pub g_flat_window: usize,
    pub g_flat_var_eps: f64,
    pub min_class_coverage: f64,
    pub min_coverage_vs_baseline: f64,
    pub max_ndb_fraction: f64,
    pub diversity: bool,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 500,
            d_acc_pinned: 0.95,
            d_acc_window: 200,
            g_flat_window: 200,
            g_flat_var_eps: 1e-6,
            min_class_coverage: 0.9,
            min_coverage_vs_baseline: 0.5,
            // NDB is sensitive at these sample sizes: a healthy 2000-step MNIST cDCGAN scores
            // 0.48-0.62 (1000 generated, K = 50), the same run collapsed by a 10x G learning
            // rate 0.90-0.94 (runs of 2026-11-23, README "Live diagnostics").
            max_ndb_fraction: 0.75,
            diversity: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_fields_and_reject_typos() {
        let c = TrainConfig::iclevr_small();
        let c = apply_overrides(
            c,
            &[
                "loss.mode_seeking=1.5".into(),
                "model.aux_head=true".into(),
                "ema.decay=0.999".into(),
                "model.attention=16".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.loss.mode_seeking, 1.5);
        assert!(c.model.aux_head);
        assert_eq!(c.ema.decay, 0.999);
        assert_eq!(c.model.attention, Some(16));
        let e = apply_overrides(c.clone(), &["loss.mode_seking=1".into()]).unwrap_err();
        assert!(e.to_string().contains("no field `loss.mode_seking`"), "{e}");
        assert!(apply_overrides(c.clone(), &["ema.decay".into()]).is_err());
        assert!(apply_overrides(c, &["ema.decay=fast".into()]).is_err());
    }

    #[test]
    fn presets_validate_and_round_trip() {
        for (name, _) in PRESETS {
            let c = TrainConfig::preset(name).unwrap();
            assert_eq!(&c.preset, name);
            c.validate().unwrap();
            let s = serde_json::to_string_pretty(&c).unwrap();
            let back: TrainConfig = serde_json::from_str(&s).unwrap();
            assert_eq!(back, c);
        }
        assert!(TrainConfig::preset("nope").is_err());
    }

    #[test]
    fn sampling_truncation_is_optional_set_by_override_and_checked() {
        // Configs written before the field existed read as no truncation.
        let old: TrainConfig = serde_json::from_str(r#"{"batch_size": 8}"#).unwrap();
        assert_eq!(old.sampling.truncation, None);
        let c = TrainConfig::mnist_cdcgan();
        let t = apply_overrides(c.clone(), &["sampling.truncation=1.5".into()]).unwrap();
        assert_eq!(t.sampling.truncation, Some(1.5));
        t.validate().unwrap();
        let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        for bad in ["0", "0.01", "20", "-1"] {
            let s = format!("sampling.truncation={bad}");
            let e = apply_overrides(c.clone(), &[s])
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains("sampling.truncation"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_collapse_guard_reads_from_old_configs_and_refuses_what_cannot_work() {
        // Configs written before the section existed keep the old behaviour: alarm only.
        let old: TrainConfig = serde_json::from_str(r#"{"batch_size": 8}"#).unwrap();
        assert_eq!(old.guard, GuardConfig::default());
        assert_eq!(old.guard.on_d_wins, OnDWins::Alarm);
        // On by default only where a long run collapsed.
        assert_eq!(
            TrainConfig::iclevr_sequential().guard.on_d_wins,
            OnDWins::Rollback
        );
        let c = TrainConfig::iclevr_small();
        assert_eq!(c.guard.on_d_wins, OnDWins::Alarm);
        let r = apply_overrides(c.clone(), &["guard.on_d_wins=rollback".into()]).unwrap();
        assert_eq!(r.guard.on_d_wins, OnDWins::Rollback);
        r.validate().unwrap();
        let bad: Vec<(&str, &str)> = vec![
            ("guard.lr_d_factor=0", "guard.lr_d_factor"),
            ("guard.lr_g_factor=1.5", "guard.lr_g_factor"),
            ("guard.snapshot_every=0", "snapshot_every"),
            ("guard.keep=0", "guard.keep"),
            ("monitor.diagnostics.alarms.d_acc_window=0", "d_acc_window"),
        ];
        for (set, needle) in bad {
            let e = apply_overrides(r.clone(), &[set.into()])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
        // Alarm only: the snapshot settings are not used, so they are not checked.
        apply_overrides(c, &["guard.snapshot_every=0".into()])
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        // A typo used to be ignored silently (batch 64 trained instead of 16).
        for (json, key) in [
            (r#"{"batchsize": 16}"#, "batchsize"),
            (r#"{"optim": {"lr": 0.001}}"#, "lr"),
            (r#"{"model": {"zdim": 8}}"#, "zdim"),
            (r#"{"monitor": {"every": 5, "n_reals": 10}}"#, "n_reals"),
            (r#"{"ema": {"decai": 0.99}}"#, "decai"),
            (r#"{"augment": {"translate": 0.125}}"#, "translate"),
            (
                r#"{"monitor": {"diagnostics": {"alarms": {"warmup": 5}}}}"#,
                "warmup",
            ),
        ] {
            let e = serde_json::from_str::<TrainConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("unknown field `{key}`")), "{json}: {e}");
        }
        // Every preset still reads back from its own JSON.
        for (name, _) in PRESETS {
            let c = TrainConfig::preset(name).unwrap();
            let back: TrainConfig =
                serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c, "{name}");
        }
    }

    #[test]
    fn preset_names_cannot_leave_the_runs_folder() {
        for bad in ["../../x", "a/b", ".hidden", "", "a b", "x\\y"] {
            let c = TrainConfig {
                preset: bad.into(),
                ..TrainConfig::mnist_cdcgan()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("preset name"), "{bad}: {e}");
        }
        let ok = TrainConfig {
            preset: "my-run_2.b".into(),
            ..TrainConfig::mnist_cdcgan()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn out_of_range_numbers_are_refused_by_name() {
        // Each of these once trained (NaN or Inf weights written to disk), panicked (a width
        // of 0 divides by zero) or aborted on allocation.
        type Case = (&'static str, fn(&mut TrainConfig));
        let cases: Vec<Case> = vec![
            ("optim.lr_g", |c| c.optim.lr_g = f64::NAN),
            ("optim.lr_d", |c| c.optim.lr_d = 1e6),
            ("optim.lr_g", |c| c.optim.lr_g = 0.0),
            ("optim.lr_aux_branch", |c| {
                c.optim.lr_aux_branch = Some(-1e-3)
            }),
            ("optim.beta1", |c| c.optim.beta1 = 1.0),
            ("optim.beta2", |c| c.optim.beta2 = -0.1),
            ("optim.eps", |c| c.optim.eps = f64::INFINITY),
            ("loss.gp_lambda", |c| c.loss.gp_lambda = f64::NAN),
            ("loss.clip", |c| c.loss.clip = 0.0),
            ("model.g_ch", |c| c.model.g_ch = 0),
            ("model.d_ch", |c| c.model.d_ch = 0),
            ("model.cond_embed", |c| c.model.cond_embed = 0),
            ("model.z_dim", |c| c.model.z_dim = 1_000_000_000),
            ("batch_size", |c| c.batch_size = 100_000),
            ("model.g_object_layers", |c| c.model.g_object_layers = 17),
            ("model.g_object_layers", |c| c.model.arch = Arch::Resnet),
            ("model.d_stem", |c| {
                c.model.arch = Arch::Resnet;
                c.model.g_object_layers = 0;
                c.model.d_stem = true;
            }),
            ("model.aux_branch", |c| c.model.aux_branch = 8),
            ("model.aux_branch", |c| {
                c.model.aux_head = true;
                c.model.aux_branch = 513;
            }),
            ("steps", |c| c.steps = 0),
            ("monitor.fid_weights", |c| c.monitor.fid_every = 500),
            ("monitor.fid_n_real", |c| {
                c.monitor.fid_every = 500;
                c.monitor.fid_weights = Some("pt_inception.pth".into());
                c.monitor.fid_n_real = 1;
            }),
        ];
        for (name, set) in cases {
            let mut c = TrainConfig::mnist_cdcgan();
            c.model.g_object_layers = 1;
            set(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{name}: {e}");
        }
        // The edges that are allowed.
        let mut c = TrainConfig::mnist_cdcgan();
        c.optim.beta1 = 0.0;
        c.optim.lr_g = 1.0;
        c.loss.gp_lambda = 0.0;
        c.validate().unwrap();
    }

    #[test]
    fn missing_fields_take_defaults() {
        let c: TrainConfig = serde_json::from_str(r#"{"seed": 3, "model": {"z_dim": 8}}"#).unwrap();
        assert_eq!(c.seed, 3);
        assert_eq!(c.model.z_dim, 8);
        assert_eq!(c.model.g_ch, ModelConfig::default().g_ch);
    }
}
