//! Networks: one file per family ([`dcgan`], [`resnet`], [`layered`], [`sequential`]), built
//! from the layers of [`crate::nn`]; [`onnx`] runs a generator imported from PyTorch.
//!
//! [`Generator`] and [`Discriminator`] wrap a family's network with its config; they are what
//! the trainer, the CLI and the explorer use.

pub mod dcgan;
pub mod layered;
pub mod onnx;
pub mod resnet;
pub mod sequential;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, Conditioning, ModelConfig};
use crate::error::{Error, Result};
use crate::images::Images;
use crate::nn::{LayerOpts, Linear, Pass, SelfAttention, WeightInit};
use crate::params::{ParamStore, Vb};
use crate::rng::Rng;

// The feature-map geometry lives beside the config that validates it (config sits below
// model); the networks use it from here.
pub use crate::config::{base_size, num_resamples};

/// Apply `attention` to `h` if it sits after block `i`.
pub(crate) fn attend_after(
    attention: &Option<(usize, SelfAttention)>,
    i: usize,
    h: Tensor,
    pass: Pass,
) -> Result<Tensor> {
    match attention {
        Some((j, a)) if *j == i => a.forward(&h, pass),
        _ => Ok(h),
    }
}

/// Whether D has an auxiliary classifier head: `acgan` conditioning, or `aux_head` with any
/// conditioning (never without conditions).
pub fn has_aux_head(cfg: &ModelConfig) -> bool {
    cfg.num_conditions > 0 && (cfg.conditioning == Conditioning::Acgan || cfg.aux_head)
}

/// The auxiliary head's layer options: D's own, with spectral norm only where
/// `aux_spectral_norm` keeps it (every D family builds its head with these).
pub fn aux_head_opts(cfg: &ModelConfig, opts: LayerOpts) -> LayerOpts {
    LayerOpts {
        spectral_norm: opts.spectral_norm && cfg.aux_spectral_norm,
        ..opts
    }
}

/// What a discriminator says about a batch.
#[derive(Debug, Clone)]
pub struct DOut {
    /// Realness logits (or critic values), (B,).
    pub logits: Tensor,
    /// ACGAN auxiliary condition logits, (B, K).
    pub aux: Option<Tensor>,
}

/// The condition projected by a linear layer to one extra input plane of D.
#[derive(Debug, Clone)]
pub struct CondPlane {
    linear: Linear,
    size: usize,
}

impl CondPlane {
    /// Present for `concat`, and for `acgan` with `label_input`.
    pub fn maybe_new(cfg: &ModelConfig, opts: LayerOpts, vb: Vb) -> Result<Option<Self>> {
        let wanted = match cfg.conditioning {
            Conditioning::Concat => true,
            Conditioning::Acgan => cfg.label_input,
            _ => false,
        };
        if !wanted || cfg.num_conditions == 0 {
            return Ok(None);
        }
        let s = cfg.image_size;
        let opts = LayerOpts {
            bias: true,
            init: WeightInit::Embedding,
            ..opts
        };
        Ok(Some(Self {
            linear: Linear::new(cfg.num_conditions, s * s, opts, vb.pp("linear"))?,
            size: s,
        }))
    }

    /// x: (B, C, H, W), c: (B, K) -> (B, C + 1, H, W)
    pub fn concat(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let b = x.dim(0)?;
        let plane = self
            .linear
            .forward(c, pass)?
            .reshape((b, 1, self.size, self.size))?;
        Ok(Tensor::cat(&[x, &plane], 1)?)
    }
}

/// `model.aux_branch`: D's auxiliary logits from a classifier network of its own (see the
/// option's doc): Conv(k3, s1, p1) at full resolution to `w` channels, then one Conv(k4, s2,
/// p1) stage per resample (`w`, `2w`, ... channels) down to the base map, each with a leaky
/// ReLU(0.2) (fused, no bias), then a linear layer (with bias) from the flattened base map
/// to K logits. No spectral or batch normalisation: a classifier free of D's Lipschitz bound
/// and of batch statistics (real and fake batches pass separately).
#[derive(Debug, Clone)]
pub struct AuxBranch {
    stem: crate::nn::Conv2d,
    blocks: Vec<crate::nn::Conv2d>,
    out: Linear,
}

impl AuxBranch {
    /// Present when `cfg.aux_branch > 0`; `channels` is what D's input has (the image's, or
    /// twice that for a sequential pair).
    pub fn maybe_new(cfg: &ModelConfig, channels: usize, vb: Vb) -> Result<Option<Self>> {
        let w = cfg.aux_branch;
        if w == 0 {
            return Ok(None);
        }
        let opts = LayerOpts {
            bias: false,
            spectral_norm: false,
            init: WeightInit::Xavier,
        };
        let stem = crate::nn::Conv2d::new(channels, w, 3, 1, 1, opts, vb.pp("stem"))?;
        let mut blocks = Vec::new();
        let mut cin = w;
        for level in 0..num_resamples(cfg.image_size) {
            let cout = w << level;
            blocks.push(crate::nn::Conv2d::new(
                cin,
                cout,
                4,
                2,
                1,
                opts,
                vb.pp("blocks").pp(level),
            )?);
            cin = cout;
        }
        let s0 = base_size(cfg.image_size);
        let out = Linear::new(
            cin * s0 * s0,
            cfg.num_conditions,
            LayerOpts { bias: true, ..opts },
            vb.pp("out"),
        )?;
        Ok(Some(Self { stem, blocks, out }))
    }

    /// x: (B, C, H, W) -> (B, K) logits.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        use crate::kernels::ops::LeakyRelu;
        let mut h = self.stem.forward_act(x, pass, LeakyRelu::LEAKY)?; // (B, w, H, W)
        for b in &self.blocks {
            h = b.forward_act(&h, pass, LeakyRelu::LEAKY)?;
        }
        self.out.forward(&h.flatten_from(1)?, pass) // (B, K)
    }
}

/// The projection discriminator's condition term <embed(c), phi(x)> (Miyato & Koyama 2018),
/// added to D's logit; `phi` are D's spatially pooled features.
#[derive(Debug, Clone)]
pub struct Projection {
    embed: Linear,
}

impl Projection {
    /// Present for `projection` conditioning; `vb` names the embedding (`disc.embed.weight`).
    pub fn maybe_new(
        cfg: &ModelConfig,
        features: usize,
        opts: LayerOpts,
        vb: Vb,
    ) -> Result<Option<Self>> {
        if cfg.conditioning != Conditioning::Projection {
            return Ok(None);
        }
        let opts = LayerOpts {
            bias: false,
            ..opts
        };
        Ok(Some(Self {
            embed: Linear::new(cfg.num_conditions, features, opts, vb)?,
        }))
    }

    /// logits (B,) + sum(embed(c) * phi, 1), with phi (B, C) and c (B, K).
    pub fn add(&self, logits: &Tensor, phi: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let term = (self.embed.forward(c, pass)? * phi)?.sum(candle_core::D::Minus1)?;
        Ok((logits + term)?)
    }
}

#[derive(Debug, Clone)]
enum GenNet {
    Dcgan(dcgan::DcganGenerator),
    Layered(layered::LayeredGenerator),
    Resnet(resnet::ResnetGenerator),
    Sequential(sequential::SequentialGenerator),
    Onnx(Arc<onnx::OnnxGenerator>),
}

/// A generator with its config and parameters.
#[derive(Debug, Clone)]
pub struct Generator {
    net: GenNet,
    pub cfg: ModelConfig,
    pub store: ParamStore,
    /// Truncation of the latents this generator's sampling draws ([`latent_truncated`]);
    /// `None` = plain N(0, I).
    truncation: Option<f64>,
}

/// Tensor prefix of generator parameters.
pub const GEN_PREFIX: &str = "gen";
/// Tensor prefix of discriminator parameters.
pub const DISC_PREFIX: &str = "disc";

impl Generator {
    /// Build with fresh weights drawn from `rng`.
    pub fn new(cfg: &ModelConfig, rng: Rng, dtype: DType, device: &Device) -> Result<Self> {
        let store = ParamStore::new(rng, dtype, device);
        let vb = store.root(GEN_PREFIX);
        let net = match cfg.arch {
            Arch::Dcgan if cfg.g_object_layers > 0 => {
                GenNet::Layered(layered::LayeredGenerator::new(cfg, vb)?)
            }
            Arch::Dcgan => GenNet::Dcgan(dcgan::DcganGenerator::new(cfg, vb)?),
            Arch::Resnet => GenNet::Resnet(resnet::ResnetGenerator::new(cfg, vb)?),
            Arch::Sequential => GenNet::Sequential(sequential::SequentialGenerator::new(cfg, vb)?),
            Arch::Onnx => return Err(Error::Config(onnx_not_trainable())),
        };
        Ok(Self {
            net,
            cfg: cfg.clone(),
            store,
            truncation: None,
        })
    }

    /// The generator of an imported run folder ([`Arch::Onnx`]): the graph at `path`,
    /// checked against the config (its inputs, Z, K and the image shape). It runs on the
    /// CPU; tensors from another device are copied there and the images back.
    pub fn from_onnx(path: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let inputs = cfg.onnx.as_ref().ok_or_else(|| {
            Error::Config("Generator::from_onnx needs a config with arch onnx".into())
        })?;
        let names = onnx::InputNames {
            noise: Some(inputs.noise.clone()),
            condition: inputs.condition.clone(),
        };
        let g = onnx::OnnxGenerator::load(path, &names, Some(cfg.num_conditions))?;
        let found = (g.z_dim, g.num_conditions, g.image_shape);
        let want = (
            cfg.z_dim,
            cfg.num_conditions,
            (cfg.channels, cfg.image_size, cfg.image_size),
        );
        if found != want {
            return Err(Error::bad_file(
                path,
                format!(
                    "the graph has (Z, K, image C x H x W) = {found:?}, its config.json says \
                     {want:?}"
                ),
            ));
        }
        Ok(Self {
            net: GenNet::Onnx(Arc::new(g)),
            cfg: cfg.clone(),
            store: ParamStore::new(Rng::new(0), DType::F32, device),
            truncation: None,
        })
    }

    /// Whether this generator was imported (ONNX) and so cannot be trained or saved.
    pub fn is_imported(&self) -> bool {
        matches!(self.net, GenNet::Onnx(_))
    }

    /// z: (B, Z), c: (B, K) -> images (B, C, H, W) in [-1, 1]. `pass` selects batch
    /// statistics (and updates running ones) or running statistics, and carries the pass's
    /// frozen state, backward mode and FLOP counter ([`Pass`]).
    pub fn forward(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        match &self.net {
            GenNet::Dcgan(g) => g.forward(z, c, pass),
            GenNet::Layered(g) => g.forward(z, c, pass),
            GenNet::Resnet(g) => g.forward(z, c, pass),
            GenNet::Onnx(g) => {
                if pass.train {
                    return Err(Error::Config(onnx_not_trainable()));
                }
                let (n, zv, cv) = onnx_inputs(z, c)?;
                let img = g.generate(&zv, &cv, n)?;
                let (ch, h, w) = g.image_shape;
                onnx_output(img, (n, ch, h, w), z)
            }
            GenNet::Sequential(g) => g.forward(z, c, pass),
        }
    }

    /// Activations of G's first feature layer (eval mode), (B, F): what GANSpace's PCA reads.
    pub fn first_features(&self, z: &Tensor, c: &Tensor) -> Result<Tensor> {
        match &self.net {
            GenNet::Dcgan(g) => g.first_features(z, c),
            GenNet::Layered(g) => g.first_features(z, c),
            GenNet::Resnet(g) => g.first_features(z),
            GenNet::Sequential(g) => g.first_features(z, c),
            GenNet::Onnx(g) => {
                let (n, zv, cv) = onnx_inputs(z, c)?;
                let f = g.first_features(&zv, &cv, n)?;
                let width = f.len() / n.max(1);
                onnx_output(f, (n, width), z)
            }
        }
    }

    /// G's tensors `found` (read from `path`), saved by this generator's architecture at a
    /// narrower `model.g_ch` (`narrow_g_ch`), widened to this generator's shapes (Net2WiderNet,
    /// [`crate::params::widen`]): first without noise, checked to draw what the narrow
    /// generator draws (eval mode, 4 latents and conditions; refused if not, e.g. through
    /// attention or spectral norm, whose outputs change when channels repeat), then with
    /// `noise` from `rng` so the repeated channels can part.
    pub fn widen_from(
        &self,
        narrow_g_ch: usize,
        path: &Path,
        found: &std::collections::HashMap<String, Tensor>,
        noise: f64,
        rng: &mut Rng,
    ) -> Result<std::collections::HashMap<String, Tensor>> {
        let (from, to) = (narrow_g_ch, self.cfg.g_ch);
        if from == 0 || to <= from || to % from != 0 {
            return Err(Error::Config(format!(
                "cannot widen the generator of {} from model.g_ch {from} to {to}: the new \
                 width must be a whole multiple of the old",
                path.display()
            )));
        }
        let narrow = ModelConfig {
            g_ch: from,
            ..self.cfg.clone()
        };
        let device = self.store.device().clone();
        let old = Generator::new(&narrow, Rng::new(0), DType::F32, &device)?;
        old.store.load(path, found, true)?;
        let expected = self.store.shapes(true);
        let fan_in = |n: &str| self.store.fan_in_axis(n);
        let exact = crate::params::widen(path, &expected, found, &fan_in, 0.0, rng)?;
        let wide = Generator::new(&self.cfg, Rng::new(0), DType::F32, &device)?;
        wide.store.load(path, &exact, true)?;
        let n = 4;
        let z = Tensor::from_vec(
            Rng::new(1).normal_vec(n * self.cfg.z_dim),
            (n, self.cfg.z_dim),
            &device,
        )?
        .to_dtype(DType::F32)?;
        let k = self.cfg.num_conditions;
        let mut c = vec![0f32; n * k];
        for i in 0..n {
            if k > 0 {
                c[i * k + i % k] = 1.0;
                if self.cfg.condition_kind == crate::config::ConditionKind::MultiHot {
                    c[i * k + (3 * i + 5) % k] = 1.0;
                }
            }
        }
        let c = Tensor::from_vec(c, (n, k), &device)?;
        let a = old.forward(&z, &c, Pass::eval())?;
        let b = wide.forward(&z, &c, Pass::eval())?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff.is_nan() || diff > 1e-3 {
            return Err(Error::Config(format!(
                "widening the generator of {} from g_ch {from} to {to} does not keep what it \
                 draws (largest pixel difference {diff:.4}): this architecture does not widen by \
                 repeating channels",
                path.display()
            )));
        }
        if noise == 0.0 {
            return Ok(exact);
        }
        crate::params::widen(path, &expected, found, &fan_in, noise, rng)
    }

    /// The scene-step network of a sequential generator (`model.arch = sequential`).
    pub fn sequential(&self) -> Option<&sequential::SequentialGenerator> {
        match &self.net {
            GenNet::Sequential(g) => Some(g),
            _ => None,
        }
    }

    /// [`Self::sequential`], or an error saying a scene needs one.
    fn sequential_net(&self) -> Result<&sequential::SequentialGenerator> {
        self.sequential().ok_or_else(|| {
            Error::Msg(format!(
                "building a scene step by step needs a sequential generator (model.arch \
                 sequential); this one is {:?}",
                self.cfg.arch
            ))
        })
    }

    /// Every latent has z_dim entries.
    fn check_latents(&self, z: &[Vec<f32>]) -> Result<()> {
        let zd = self.cfg.z_dim;
        match z.iter().find(|v| v.len() != zd) {
            Some(bad) => Err(Error::Msg(format!(
                "latent of length {} (z_dim is {zd})",
                bad.len()
            ))),
            None => Ok(()),
        }
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// The latent vector image `i` of a `generate(.., seed)` call uses (truncated when
    /// [`Generator::set_truncation`] set a threshold).
    pub fn latent(&self, seed: u64, i: usize) -> Vec<f32> {
        latent_truncated(self.cfg.z_dim, seed.wrapping_add(i as u64), self.truncation)
    }

    /// Sample with the truncation trick at threshold `t` (`None` = off); see
    /// [`latent_truncated`]. Checked like `sampling.truncation`.
    pub fn set_truncation(&mut self, t: Option<f64>) -> Result<()> {
        crate::config::validate_truncation(t)?;
        self.truncation = t;
        Ok(())
    }

    /// The truncation threshold sampling uses (`None` = off).
    pub fn truncation(&self) -> Option<f64> {
        self.truncation
    }

    /// `n` images in eval mode. `conditions` holds one K-vector per image, or a single one
    /// used for all, or nothing when K = 0. Image i uses the latent `latent(seed, i)`.
    pub fn generate(&self, n: usize, conditions: &[Vec<f32>], seed: u64) -> Result<Images> {
        let z: Vec<Vec<f32>> = (0..n).map(|i| self.latent(seed, i)).collect();
        let conds: Vec<Vec<f32>> = match conditions.len() {
            0 => vec![vec![]; n],
            1 => vec![conditions[0].clone(); n],
            l if l == n => conditions.to_vec(),
            l => {
                return Err(Error::Msg(format!(
                    "generate: {l} condition vectors for {n} images (give 1 or {n})"
                )));
            }
        };
        self.generate_from(&z, &conds)
    }

    /// The images of a sample grid, row by row: `rows` conditions x `cols` columns. With
    /// conditions, column j uses the latent `latent(seed, j)` in every row (rows differ only by
    /// their condition); an unconditional model has nothing to vary by row, so every cell gets
    /// its own latent, `latent(seed, r * cols + j)`.
    pub fn grid(&self, rows: &[Vec<f32>], cols: usize, seed: u64) -> Result<Images> {
        let mut z = Vec::with_capacity(rows.len() * cols);
        let mut conds = Vec::with_capacity(rows.len() * cols);
        for (r, c) in rows.iter().enumerate() {
            for j in 0..cols {
                let i = if self.cfg.num_conditions == 0 {
                    r * cols + j
                } else {
                    j
                };
                z.push(self.latent(seed, i));
                conds.push(c.clone());
            }
        }
        self.generate_from(&z, &conds)
    }

    /// Scenes built one object at a time (sequential generators only): image i adds the
    /// labels of `orders[i]` in that order to the floor, with latent `z[i]`. Returns the floor
    /// and the images after each step (1 + the longest order's length image sets of `z.len()`
    /// images; an image with fewer objects stays as it is), in eval mode.
    pub fn scene_from(&self, z: &[Vec<f32>], orders: &[Vec<usize>]) -> Result<Vec<Images>> {
        let net = self.sequential_net()?;
        let n = z.len();
        let zd = self.cfg.z_dim;
        if orders.len() != n {
            return Err(Error::Msg(format!(
                "{} orders for {n} latents",
                orders.len()
            )));
        }
        self.check_latents(z)?;
        let dev = self.device();
        let dt = self.store.dtype();
        let zt = Tensor::from_vec(z.concat(), (n, zd), dev)?.to_dtype(dt)?;
        let seqs: Vec<Vec<sequential::Addition>> = orders
            .iter()
            .map(|o| o.iter().map(|&l| (l, 1.0)).collect())
            .collect();
        let floor = net.floor_batch(n)?;
        let mut out = vec![Images::from_tensor(&floor)?];
        for step in net.scene(&zt, &seqs, Pass::eval())? {
            out.push(Images::from_tensor(&step)?);
        }
        Ok(out)
    }

    /// One scene built one object at a time with a latent per step (`zs[j]` draws object j of
    /// `order`; sequential generators only): the floor and the image after each step, as one
    /// batch of `1 + order.len()` images, in eval mode.
    pub fn scene_per_step(&self, zs: &[Vec<f32>], order: &[usize]) -> Result<Images> {
        let net = self.sequential_net()?;
        let zd = self.cfg.z_dim;
        if zs.len() != order.len() {
            return Err(Error::Msg(format!(
                "{} latents for {} objects (one per step)",
                zs.len(),
                order.len()
            )));
        }
        self.check_latents(zs)?;
        let dev = self.device();
        let dt = self.store.dtype();
        let mut images = vec![net.floor_batch(1)?];
        if !order.is_empty() {
            let zt = zs
                .iter()
                .map(|z| Ok(Tensor::from_slice(z, (1, zd), dev)?.to_dtype(dt)?))
                .collect::<Result<Vec<_>>>()?;
            let seq = vec![order.iter().map(|&l| (l, 1.0)).collect::<Vec<_>>()];
            images.extend(net.scene_latents(&zt, &seq, Pass::eval())?);
        }
        Images::from_tensor(&Tensor::cat(&images, 0)?)
    }

    /// Images for explicit latents and conditions (one each per image), in eval mode.
    pub fn generate_from(&self, z: &[Vec<f32>], conditions: &[Vec<f32>]) -> Result<Images> {
        let n = z.len();
        let (zd, k) = (self.cfg.z_dim, self.cfg.num_conditions);
        if conditions.len() != n {
            return Err(Error::Msg(format!(
                "{} conditions for {n} latents",
                conditions.len()
            )));
        }
        if let Some(bad) = z.iter().find(|v| v.len() != zd) {
            return Err(Error::Msg(format!(
                "latent of length {} (z_dim is {zd})",
                bad.len()
            )));
        }
        if let Some(bad) = conditions.iter().find(|v| v.len() != k) {
            return Err(Error::Msg(format!(
                "condition vector of length {} (the model has K = {k})",
                bad.len()
            )));
        }
        if n == 0 {
            let m = &self.cfg;
            return Ok(Images {
                n: 0,
                channels: m.channels,
                height: m.image_size,
                width: m.image_size,
                data: vec![],
            });
        }
        let dev = self.device();
        let dt = self.store.dtype();
        let zt = Tensor::from_vec(z.concat(), (n, zd), dev)?.to_dtype(dt)?;
        let ct = Tensor::from_vec(conditions.concat(), (n, k), dev)?.to_dtype(dt)?;
        Images::from_tensor(&self.forward(&zt, &ct, Pass::eval())?)
    }

    /// `iters` power iterations of every spectrally normalised layer, from its current
    /// vector and its current weight (eval-mode forwards of one zero latent: nothing else
    /// changes). For a generator whose spectral-norm vectors were not loaded with its weights.
    pub fn refine_spectral_norm(&self, iters: usize) -> Result<()> {
        let (zd, k) = (self.cfg.z_dim, self.cfg.num_conditions);
        let (dev, dt) = (self.device(), self.store.dtype());
        let z = Tensor::zeros((1, zd), dt, dev)?;
        let c = Tensor::zeros((1, k), dt, dev)?;
        for _ in 0..iters {
            self.forward(&z, &c, Pass::eval().refining_sn())?;
        }
        Ok(())
    }
}

fn onnx_not_trainable() -> String {
    "this run folder holds a generator imported from PyTorch (arch onnx): ganscope can \
     sample, evaluate and explore it, but not train it (there is no discriminator and no \
     trainable weight); train the original in PyTorch, or start a ganscope run from a preset"
        .into()
}

/// (B, Z) and (B, K) tensors as CPU f32 rows for an imported graph.
fn onnx_inputs(z: &Tensor, c: &Tensor) -> Result<(usize, Vec<f32>, Vec<f32>)> {
    let n = z.dim(0)?;
    let rows = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    Ok((n, rows(z)?, rows(c)?))
}

/// An imported graph's f32 output as a tensor on `like`'s device and dtype.
fn onnx_output<S: Into<candle_core::Shape>>(
    v: Vec<f32>,
    shape: S,
    like: &Tensor,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

/// Standard-normal latent of length `z_dim` for a seed.
pub fn latent(z_dim: usize, seed: u64) -> Vec<f32> {
    latent_truncated(z_dim, seed, None)
}

/// The latent of `seed` drawn from N(0, I) truncated to |z_i| <= `truncation` (BigGAN's
/// truncation trick). The entries of [`latent`]'s vector that lie inside are kept, so a seed
/// keeps its look; each one outside is drawn again from the seed's stream until it falls
/// inside. `None` gives exactly [`latent`]'s vector. The threshold is checked by
/// [`crate::config::validate_truncation`]; a smaller one is raised to the lowest accepted, so
/// that the loop always ends.
pub fn latent_truncated(z_dim: usize, seed: u64, truncation: Option<f64>) -> Vec<f32> {
    let mut rng = Rng::stream(seed, "latent");
    let mut v = rng.normal_vec(z_dim);
    if let Some(t) = truncation.filter(|t| !t.is_nan()) {
        let t = t.max(crate::config::TRUNCATION_RANGE.0);
        // Fresh standard normals from the same stream, in Box-Muller pairs.
        let mut fresh = std::iter::repeat_with(|| {
            let mut pair = [0.0; 2];
            rng.fill_normal(&mut pair);
            pair
        })
        .flatten();
        for x in v.iter_mut().filter(|x| x.abs() > t) {
            // The stream is endless: `find` always finds one inside.
            *x = fresh.find(|d| d.abs() <= t).unwrap_or(0.0);
        }
    }
    v.into_iter().map(|x| x as f32).collect()
}

#[derive(Debug, Clone)]
enum DiscNet {
    Dcgan(dcgan::DcganDiscriminator),
    Resnet(resnet::ResnetDiscriminator),
}

/// A discriminator (critic) with its config and parameters.
#[derive(Debug, Clone)]
pub struct Discriminator {
    net: DiscNet,
    pub cfg: ModelConfig,
    pub store: ParamStore,
}

impl Discriminator {
    pub fn new(cfg: &ModelConfig, rng: Rng, dtype: DType, device: &Device) -> Result<Self> {
        let store = ParamStore::new(rng, dtype, device);
        let vb = store.root(DISC_PREFIX);
        let net = match cfg.arch {
            Arch::Dcgan => DiscNet::Dcgan(dcgan::DcganDiscriminator::new(cfg, vb)?),
            Arch::Resnet => DiscNet::Resnet(resnet::ResnetDiscriminator::new(cfg, vb)?),
            // The pair discriminator: (previous, next) stacked, [added, so far] conditions.
            Arch::Sequential => DiscNet::Dcgan(dcgan::DcganDiscriminator::new(
                &sequential::pair_config(cfg),
                vb,
            )?),
            Arch::Onnx => return Err(Error::Config(onnx_not_trainable())),
        };
        Ok(Self {
            net,
            cfg: cfg.clone(),
            store,
        })
    }

    /// x: (B, C, H, W), c: (B, K)
    pub fn forward(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<DOut> {
        self.forward_with(x, c, pass, true)
    }

    /// [`Self::forward`] for the realness logits only: skips `model.aux_branch` (a network
    /// as large as D's body) where nothing reads the auxiliary logits (the gradient
    /// penalties, D's fake batch without `loss.aux_on_fakes`). A head on D's body still runs:
    /// its spectral norm steps on every training pass, so skipping it would change training.
    pub fn forward_realness(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<DOut> {
        self.forward_with(x, c, pass, false)
    }

    fn forward_with(&self, x: &Tensor, c: &Tensor, pass: Pass, branch: bool) -> Result<DOut> {
        match &self.net {
            DiscNet::Dcgan(d) => d.forward(x, c, pass, branch),
            DiscNet::Resnet(d) => d.forward(x, c, pass, branch),
        }
    }
}

/// Test helpers shared by the network families' tests.
#[cfg(test)]
pub(crate) mod test_util {
    #![expect(clippy::unwrap_used, reason = "test helper")]
    use candle_core::{Device, Tensor};

    use crate::params::ParamStore;
    use crate::rng::Rng;

    /// A tensor of N(0, 1) draws from `rng` (f64, on the CPU).
    pub fn normal(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n), shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference between two tensors of one shape (any float type).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let v = |t: &Tensor| -> Vec<f64> {
            let t = t.to_dtype(candle_core::DType::F64).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        v(a).iter()
            .zip(v(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// d loss / d theta from `loss().backward()` against central differences with step `h`
    /// (f64 stores), at the first, a middle and the last entry of each named parameter;
    /// `loss` must read the parameters afresh on every call (the networks hold their storage).
    pub fn assert_param_gradients(
        store: &ParamStore,
        names: &[&str],
        h: f64,
        loss: impl Fn() -> Tensor,
    ) {
        let grads = loss().backward().unwrap();
        for name in names {
            let var = store.get(name).unwrap();
            let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let grad = flat(grads.get(var.as_tensor()).unwrap());
            let base = flat(var.as_tensor());
            let shape = var.as_tensor().shape().clone();
            for i in [0, base.len() / 3, base.len() - 1] {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss().to_scalar::<f64>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                at(0.0);
                assert!(
                    (fd - grad[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{name}[{i}]: backward {} vs finite difference {fd}",
                    grad[i]
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn truncated_latents_stay_inside_and_keep_the_entries_already_inside() {
        let plain = latent(512, 7);
        assert_eq!(latent_truncated(512, 7, None), plain);
        for t in [0.05, 0.5, 1.0, 2.0] {
            let z = latent_truncated(512, 7, Some(t));
            assert_eq!(z.len(), 512);
            assert_eq!(z, latent_truncated(512, 7, Some(t)), "deterministic");
            let mut redrawn = 0;
            for (a, b) in z.iter().zip(&plain) {
                assert!(f64::from(a.abs()) <= t, "{a} outside +-{t}");
                if f64::from(b.abs()) <= t {
                    assert_eq!(a, b, "an entry inside +-{t} was changed");
                } else {
                    redrawn += 1;
                }
            }
            // P(|N(0,1)| > 1) = 0.317: about 162 of 512 entries are redrawn at t = 1.
            if t == 1.0 {
                assert!((120..200).contains(&redrawn), "{redrawn} redrawn at t = 1");
            }
        }
        // Truncation narrows the distribution: the variance of N(0,1) truncated to +-1 is
        // 1 - 2 phi(1) / (2 Phi(1) - 1) = 0.2911.
        let z: Vec<f32> = (0..200)
            .flat_map(|s| latent_truncated(100, s, Some(1.0)))
            .collect();
        let var = z.iter().map(|v| f64::from(v * v)).sum::<f64>() / z.len() as f64;
        assert!((var - 0.2911).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn d_stem_sees_full_resolution_and_its_gradients_match_finite_differences() {
        // The 32-px i-CLEVR D with a stride-1 stem: named like its fields, (out, in, 3, 3).
        let mut cfg = crate::config::TrainConfig::preset("iclevr-small").unwrap();
        cfg.model.d_stem = true;
        cfg.model.d_ch = 4;
        // Spectral norm's power iteration moves u at every training pass: off, so that the
        // loss is a fixed function of the weights.
        cfg.model.d_spectral_norm = false;
        cfg.validate().unwrap();
        let m = &cfg.model;
        let d = Discriminator::new(m, Rng::new(2), DType::F64, &Device::Cpu).unwrap();
        let t = d.store.model_tensors();
        assert_eq!(t["disc.stem.conv.weight"].dims(), &[4, 3, 3, 3]);
        assert_eq!(t["disc.blocks.0.conv.weight"].dims(), &[4, 4, 4, 4]);
        // The sequential model's pair D stacks (previous, next): six input channels.
        let pair = sequential::pair_config(m);
        let dp = Discriminator::new(&pair, Rng::new(2), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            dp.store.model_tensors()["disc.stem.conv.weight"].dims(),
            &[4, 6, 3, 3]
        );
        // d sum(logits * r + aux * s) / d theta at the stem and the first block, against
        // central differences (f64; the leaky ReLU's kink is not crossed at h = 1e-6).
        let b = 4;
        let mut rng = Rng::new(5);
        let mut t = |shape: &[usize]| test_util::normal(&mut rng, shape);
        let x = t(&[b, 3, 32, 32]);
        let c = t(&[b, 24]).ge(0.8).unwrap().to_dtype(DType::F64).unwrap();
        let (r, s) = (t(&[b]), t(&[b, 24]));
        test_util::assert_param_gradients(
            &d.store,
            &["disc.stem.conv.weight", "disc.blocks.0.conv.weight"],
            1e-6,
            || {
                let o = d.forward(&x, &c, Pass::train()).unwrap();
                let aux = (o.aux.unwrap() * &s).unwrap().sum_all().unwrap();
                ((o.logits * &r).unwrap().sum_all().unwrap() + aux).unwrap()
            },
        );
    }

    #[test]
    fn an_aux_branch_gives_the_aux_logits_and_its_gradients_match_finite_differences() {
        // 32-px i-CLEVR D with a width-2 branch: stem (2, 3, 3, 3), stages 2 -> 2 -> 4 -> 8
        // channels at 16, 8, 4 px, a linear layer from 8 * 4 * 4 features to 24 logits; no
        // head on D's body.
        let mut cfg = crate::config::TrainConfig::preset("iclevr-small").unwrap();
        cfg.model.aux_head = true;
        cfg.model.aux_branch = 2;
        cfg.model.d_ch = 4;
        cfg.model.d_spectral_norm = false;
        cfg.validate().unwrap();
        let m = &cfg.model;
        let d = Discriminator::new(m, Rng::new(2), DType::F64, &Device::Cpu).unwrap();
        let t = d.store.model_tensors();
        assert_eq!(t["disc.aux_branch.stem.weight"].dims(), &[2, 3, 3, 3]);
        assert_eq!(t["disc.aux_branch.blocks.0.weight"].dims(), &[2, 2, 4, 4]);
        assert_eq!(t["disc.aux_branch.blocks.2.weight"].dims(), &[8, 4, 4, 4]);
        assert_eq!(t["disc.aux_branch.out.weight"].dims(), &[24, 8 * 4 * 4]);
        assert!(!t.contains_key("disc.aux.weight"));
        let mut rng = Rng::new(5);
        let mut r = |shape: &[usize]| test_util::normal(&mut rng, shape);
        let b = 3;
        let x = r(&[b, 3, 32, 32]);
        let c = r(&[b, 24]).ge(0.8).unwrap().to_dtype(DType::F64).unwrap();
        // The logits are the branch's alone: its output bias moves them one for one, and the
        // condition does not enter them.
        let aux =
            |d: &Discriminator, c: &Tensor| d.forward(&x, c, Pass::eval()).unwrap().aux.unwrap();
        let before = aux(&d, &c);
        assert_eq!(before.dims(), &[b, 24]);
        assert_eq!(
            before.to_vec2::<f64>().unwrap(),
            aux(&d, &c.zeros_like().unwrap()).to_vec2::<f64>().unwrap()
        );
        let bias = d.store.get("disc.aux_branch.out.bias").unwrap();
        bias.set(&(bias.as_tensor() + 1.5).unwrap()).unwrap();
        let moved = (aux(&d, &c) - &before).unwrap().flatten_all().unwrap();
        for v in moved.to_vec1::<f64>().unwrap() {
            assert!((v - 1.5).abs() < 1e-12, "{v}");
        }
        // d sum(aux * s) / d theta through the branch, against central differences (f64).
        let s = r(&[b, 24]);
        test_util::assert_param_gradients(
            &d.store,
            &[
                "disc.aux_branch.stem.weight",
                "disc.aux_branch.blocks.1.weight",
            ],
            1e-6,
            || {
                let o = d.forward(&x, &c, Pass::train()).unwrap();
                (o.aux.unwrap() * &s).unwrap().sum_all().unwrap()
            },
        );
        // The ResNet D takes the branch the same way.
        let mut p = crate::config::TrainConfig::preset("iclevr-projection").unwrap();
        p.model.image_size = 32;
        p.model.d_ch = 4;
        p.model.attention = None;
        p.model.aux_head = true;
        p.model.aux_branch = 2;
        p.validate().unwrap();
        let dr = Discriminator::new(&p.model, Rng::new(2), DType::F64, &Device::Cpu).unwrap();
        let tr = dr.store.model_tensors();
        assert!(
            tr.contains_key("disc.aux_branch.out.weight") && !tr.contains_key("disc.aux.weight")
        );
        assert_eq!(aux(&dr, &c).dims(), &[b, 24]);
    }

    #[test]
    fn an_aux_head_without_spectral_norm_scales_with_its_weights() {
        // With spectral norm the head computes W / sigma(W) h + b: scaling W by 10 changes
        // nothing. Without it (`aux_spectral_norm: false`) the logits minus the bias scale by
        // 10, and D keeps no power-iteration vector for the head; the real/fake logit is
        // normalised either way.
        for preset in ["iclevr-small", "iclevr-projection"] {
            let mut cfg = crate::config::TrainConfig::preset(preset).unwrap();
            cfg.model.aux_head = true;
            cfg.model.image_size = 32;
            cfg.model.d_ch = 4;
            cfg.model.attention = None;
            cfg.model.d_spectral_norm = true;
            let mut rng = Rng::new(5);
            let x = Tensor::from_vec(
                rng.normal_vec(2 * 3 * 32 * 32),
                (2, 3, 32, 32),
                &Device::Cpu,
            )
            .unwrap();
            let c = Tensor::from_vec(rng.normal_vec(2 * 24), (2, 24), &Device::Cpu)
                .unwrap()
                .ge(0.8)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            for free in [false, true] {
                cfg.model.aux_spectral_norm = !free;
                cfg.validate().unwrap();
                let d =
                    Discriminator::new(&cfg.model, Rng::new(2), DType::F64, &Device::Cpu).unwrap();
                let has_u = d.store.state_tensors().contains_key("disc.aux.sn.u");
                assert_eq!(has_u, !free, "{preset}: aux power-iteration vector");
                let flat = |t: Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
                let out = |d: &Discriminator| {
                    let o = d.forward(&x, &c, Pass::eval()).unwrap();
                    (flat(o.logits), flat(o.aux.unwrap()))
                };
                let (l0, a0) = out(&d);
                let w = d.store.get("disc.aux.weight").unwrap();
                let bias = flat(d.store.get("disc.aux.bias").unwrap().as_tensor().clone());
                w.set(&w.as_tensor().affine(10.0, 0.0).unwrap()).unwrap();
                let (l1, a1) = out(&d);
                assert_eq!(
                    l0, l1,
                    "{preset}: the real/fake logit does not use the head"
                );
                for (i, (p, q)) in a0.iter().zip(&a1).enumerate() {
                    let b = bias[i % bias.len()];
                    let want = if free { (p - b) * 10.0 + b } else { *p };
                    assert!(
                        (q - want).abs() <= 1e-9 * (1.0 + want.abs()),
                        "{preset} free={free} [{i}]: {q} vs {want}"
                    );
                }
                assert!(
                    a0.iter().any(|v| v.abs() > 1e-6),
                    "{preset}: logits all zero"
                );
            }
        }
    }

    #[test]
    fn a_generator_samples_with_its_truncation_and_refuses_bad_thresholds() {
        let mut cfg = crate::config::TrainConfig::preset("mnist-cdcgan")
            .unwrap()
            .model;
        cfg.g_ch = 4;
        let mut g = Generator::new(&cfg, Rng::new(0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(g.latent(3, 2), latent(cfg.z_dim, 5));
        g.set_truncation(Some(0.7)).unwrap();
        assert_eq!(g.latent(3, 2), latent_truncated(cfg.z_dim, 5, Some(0.7)));
        for bad in [0.0, -1.0, 0.01, 9.0, f64::NAN, f64::INFINITY] {
            let e = g.set_truncation(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("sampling.truncation"), "{bad}: {e}");
        }
        assert_eq!(
            g.truncation(),
            Some(0.7),
            "a refused threshold keeps the old one"
        );
        g.set_truncation(None).unwrap();
        assert_eq!(g.latent(3, 2), latent(cfg.z_dim, 5));
    }

    /// A trained-looking narrow G (weights drawn from another seed than the wide one's),
    /// widened 2x: without noise it draws the same images; with noise nearly the same, not
    /// identical.
    #[test]
    fn a_widened_generator_draws_what_the_narrow_one_drew() {
        use crate::config::TrainConfig;
        let mut sequential = TrainConfig::iclevr_sequential_small().model;
        sequential.g_ch = 4;
        sequential.z_dim = 9;
        let mut dcgan = TrainConfig::mnist_cdcgan().model;
        dcgan.g_ch = 4;
        let mut layered = TrainConfig::iclevr_small().model;
        layered.g_ch = 4;
        for narrow in [sequential, dcgan, layered] {
            let old = Generator::new(&narrow, Rng::new(11), DType::F32, &Device::Cpu).unwrap();
            let wide_cfg = ModelConfig {
                g_ch: 8,
                ..narrow.clone()
            };
            let wide = Generator::new(&wide_cfg, Rng::new(0), DType::F32, &Device::Cpu).unwrap();
            let found = old.store.model_tensors();
            let p = Path::new("g.safetensors");
            let z = test_util::normal(&mut Rng::new(2), &[3, narrow.z_dim])
                .to_dtype(DType::F32)
                .unwrap();
            let k = narrow.num_conditions;
            let c: Vec<f32> = (0..3 * k)
                .map(|i| f32::from(u8::from(i % 5 == 0)))
                .collect();
            let c = Tensor::from_vec(c, (3, k), &Device::Cpu).unwrap();
            let img = |g: &Generator| g.forward(&z, &c, Pass::eval()).unwrap();
            let diff = |a: &Generator, b: &Generator| test_util::max_abs_diff(&img(a), &img(b));
            let exact = wide
                .widen_from(4, p, &found, 0.0, &mut Rng::new(5))
                .unwrap();
            wide.store.load(p, &exact, true).unwrap();
            let d0 = diff(&old, &wide);
            assert!(d0 < 1e-5, "{:?}: {d0}", narrow.arch);
            let noisy = wide
                .widen_from(4, p, &found, 0.02, &mut Rng::new(5))
                .unwrap();
            wide.store.load(p, &noisy, true).unwrap();
            let d1 = diff(&old, &wide);
            assert!(d1 > 1e-6 && d1 < 0.3, "{:?}: {d1}", narrow.arch);
        }

        // Attention and a spectrally normalised G do not widen by repeating channels: refused.
        let mut sagan = TrainConfig::cifar10_sagan().model;
        sagan.g_ch = 8;
        let old = Generator::new(&sagan, Rng::new(11), DType::F32, &Device::Cpu).unwrap();
        let wide = Generator::new(
            &ModelConfig {
                g_ch: 16,
                ..sagan.clone()
            },
            Rng::new(0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let refuse = |from: usize| {
            let found = old.store.model_tensors();
            let p = Path::new("g.safetensors");
            wide.widen_from(from, p, &found, 0.0, &mut Rng::new(5))
                .unwrap_err()
                .to_string()
        };
        let e = refuse(8);
        assert!(
            e.contains("does not keep") && e.contains("g.safetensors"),
            "{e}"
        );
        // Not a whole multiple.
        let e = refuse(6);
        assert!(e.contains("whole multiple"), "{e}");
    }
}
