//! Training-speed benchmark (`ganscope bench`): time whole training iterations of four
//! workloads and compare them with the machine's matrix-multiply rate.
//!
//! Workloads (one "iteration" each):
//! - `dcgan64`: the DCGAN of Radford et al. at 64x64, exactly as PyTorch's DCGAN example
//!   builds it: G = ConvT(100->512, k4 s1 p0) BN ReLU, ConvT(512->256, k4 s2 p1) BN ReLU,
//!   ConvT(256->128) BN ReLU, ConvT(128->64) BN ReLU, ConvT(64->3) tanh;
//!   D = Conv(3->64, k4 s2 p1) LReLU(0.2), Conv(64->128) BN LReLU, Conv(128->256) BN LReLU,
//!   Conv(256->512) BN LReLU, Conv(512->1, k4 s1 p0). One G forward, one D step on the real
//!   batch and the (detached) fakes, then one G step through D on the same fakes.
//! - `cdcgan28`: a conditional DCGAN for MNIST: G = Linear(100+10 -> 128*7*7) BN ReLU,
//!   ConvT(128->64, k4 s2 p1) BN ReLU, ConvT(64->1, k4 s2 p1) tanh; D = the one-hot label
//!   broadcast to 10 planes and concatenated to the image, Conv(11->64, k4 s2 p1) LReLU,
//!   Conv(64->128, k4 s2 p1) BN LReLU, Linear(128*7*7 -> 1). Same iteration as `dcgan64`.
//! - `wgangp-critic64`: one WGAN-GP critic step (Gulrajani et al. 2017) with the `dcgan64`
//!   D without BatchNorm as the critic (the paper drops BatchNorm from the critic): fakes
//!   from the `dcgan64` G (forward only), critic loss mean(D(fake)) - mean(D(real)) +
//!   10 GP, the penalty through [`crate::train::loss::gradient_penalty`] (double backward).
//! - `iclevr-sagan`: one [`Trainer::train_step`] of the `iclevr-sagan` preset on a synthetic
//!   i-CLEVR set ([`crate::data::render::synthetic_dataset`]).
//!
//! The two reference models use weights N(0, 0.02), no conv biases (linear layers have a zero
//! bias, as PyTorch's default layers), BatchNorm gamma N(1, 0.02) and beta 0, Adam lr 2e-4
//! betas (0.5, 0.999) eps 1e-8 and BCE with logits; the critic uses the same Adam. Real
//! images are a fixed seeded random batch in [-1, 1], labels seeded random.
//!
//! FLOP count (printed as "GFLOP/iter"): F_G and F_D are the forward FLOPs of G and D at the
//! benchmark batch, counted by a [`crate::nn::FlopCounter`] that one forward pass of each
//! carries ([`Pass::counting`]; 2 per
//! multiply-accumulate of convolutions, linear layers and attention products; normalisation,
//! activations and the optimizer are not counted). A pass that is backpropagated counts 3x its
//! forward (forward, input gradient, weight gradient), a forward-only pass 1x, a
//! gradient-penalty pass 6x (forward, input gradient, and the backward of both). So
//! `dcgan64`/`cdcgan28`: 3 F_G + 9 F_D (G forward once, D on real and fake 2 x 3, the G
//! step's D pass 3, G backward 2); `wgangp-critic64`: F_G + 12 F_D;
//! `iclevr-sagan` (hinge, n_critic n): n (F_G + 6 F_D) + 3 F_G + 3 F_D.
//! The G step runs D in a frozen pass ([`Pass::frozen`]: no weight gradients for D there; the
//! count above still includes them, as PyTorch computes them).
//! The "floor" is that count at the measured sgemm rate: the time the iteration would take
//! if all of it ran as one large matrix multiply (on the CPU a 2048^3 product with the `gemm`
//! crate, on a GPU an 8192^3 candle matmul on that device).
//!
//! Two more "models" time something else: [`EXPLORE`] the explorer's slider path
//! ([`explore_latency`]) and [`KERNELS`] the CPU kernels against candle's own ops
//! ([`kernels`]).

pub mod kernels;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::grad::GradMode;
use crate::kernels::ops::LeakyRelu;
use crate::nn::{
    BatchNorm, Conv2d, ConvTranspose2d, FlopCounter, LayerOpts, Linear, Pass, WeightInit, softplus,
};
use crate::optim::adam::Adam;
use crate::params::{ParamStore, Vb};
use crate::rng::Rng;
use crate::train::Trainer;

/// Timed iterations of a workload (and requests of [`EXPLORE`]) unless told otherwise.
pub const DEFAULT_ITERS: usize = 10;
/// Untimed iterations first unless told otherwise.
pub const DEFAULT_WARMUP: usize = 2;

/// The workloads, in the order `ganscope bench` runs them.
pub const MODELS: [&str; 4] = ["dcgan64", "cdcgan28", "wgangp-critic64", "iclevr-sagan"];

/// What `ganscope bench` was asked for.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// One of [`MODELS`]; all when `None`.
    pub model: Option<String>,
    /// Batch size (default [`default_batch`]).
    pub batch: Option<usize>,
    /// Timed iterations ([`DEFAULT_ITERS`] when `None`; [`KERNELS`]: each case's own).
    pub iters: Option<usize>,
    /// Untimed iterations first ([`DEFAULT_WARMUP`] when `None`; [`KERNELS`]: each case's own).
    pub warmup: Option<usize>,
    /// Worker threads (rayon and candle); the machine's default when `None`.
    pub threads: Option<usize>,
    /// Where the workloads run. On a GPU the floor is the device's own f32 matmul rate
    /// ([`device_sgemm_gflops`]) and every iteration ends with a device synchronisation.
    pub device: Device,
    /// [`EXPLORE`] only: the preset whose session and generator the slider path drives (the
    /// CLI passes the explorer's default unless `--preset` names another).
    pub preset: String,
}

/// One benchmark workload: a model with its optimizers and data, advanced one iteration at a
/// time.
pub trait Workload: Send {
    fn batch(&self) -> usize;
    /// One training iteration; returns its losses (e.g. D and G), which must be finite.
    fn step(&mut self) -> Result<Vec<f64>>;
    /// FLOPs of one iteration (see the module docs).
    fn flops(&self) -> f64;
}

/// The batch a workload runs at unless told otherwise: 64, except `iclevr-sagan` at 16
/// (its preset trains at 64, but one iteration at 64 needs about 25 GB on the CPU, mostly the
/// (B, 1024, 1024) attention maps of G and D at 32x32: 3.6 GB measured at batch 8, 6.7 GB at 16).
pub fn default_batch(model: &str) -> usize {
    if model == "iclevr-sagan" { 16 } else { 64 }
}

/// Adam as the reference models use it.
fn adam(store: &ParamStore) -> Result<Adam> {
    Adam::new(store.trainable(), 2e-4, 0.5, 0.999, 1e-8)
}

fn dcgan_opts() -> LayerOpts {
    LayerOpts {
        bias: false,
        spectral_norm: false,
        init: WeightInit::Dcgan,
    }
}

fn linear_opts() -> LayerOpts {
    LayerOpts {
        bias: true,
        ..dcgan_opts()
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn normal(rng: &mut Rng, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normal_vec(n), shape, dev)?.to_dtype(DType::F32)?)
}

fn uniform(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(DType::F32)?)
}

/// (B, K) one-hot rows for `labels`.
fn one_hot(labels: &[usize], k: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        v[i * k + l] = 1.0;
    }
    Ok(Tensor::from_vec(v, (labels.len(), k), dev)?)
}

/// (B, K) labels -> (B, K, H, W) constant planes, written directly: candle's
/// `broadcast_as(..).contiguous()` copies element by element through a strided index (1.6 ms
/// of each `cdcgan28` iteration in `perf`), and `cat` with a broadcast argument takes a
/// transpose + strided-copy path whose result is itself strided.
fn label_planes(y: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, k) = y.dims2()?;
    let mut v = Vec::with_capacity(b * k * h * w);
    for l in y.flatten_all()?.to_vec1::<f32>()? {
        v.resize(v.len() + h * w, l);
    }
    Ok(Tensor::from_vec(v, (b, k, h, w), y.device())?)
}

/// BCE with logits against all-ones (`target_one`) or all-zeros targets, mean over the batch:
/// softplus(-x) or softplus(x).
fn bce_const(logits: &Tensor, target_one: bool) -> Result<Tensor> {
    let x = if target_one {
        logits.neg()?
    } else {
        logits.clone()
    };
    Ok(softplus(&x)?.mean_all()?)
}

/// The DCGAN-64 generator.
struct G64 {
    convs: Vec<ConvTranspose2d>,
    bns: Vec<BatchNorm>,
}

impl G64 {
    fn new(vb: Vb) -> Result<Self> {
        let ch = [100, 512, 256, 128, 64, 3];
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for i in 0..5 {
            let (s, p) = if i == 0 { (1, 0) } else { (2, 1) };
            let v = vb.pp(i);
            convs.push(ConvTranspose2d::new(
                ch[i],
                ch[i + 1],
                4,
                s,
                p,
                dcgan_opts(),
                v.pp("conv"),
            )?);
            if i < 4 {
                bns.push(BatchNorm::new(ch[i + 1], true, v.pp("bn"))?);
            }
        }
        Ok(Self { convs, bns })
    }

    /// z: (B, 100, 1, 1) -> (B, 3, 64, 64)
    fn forward(&self, z: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut h = z.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h, pass)?;
            h = match self.bns.get(i) {
                Some(bn) => bn.forward_act(&h, pass, Some(LeakyRelu::RELU))?,
                None => h.tanh()?,
            };
        }
        Ok(h)
    }
}

/// The DCGAN-64 discriminator (with BatchNorm) or critic (without).
struct D64 {
    convs: Vec<Conv2d>,
    bns: Vec<Option<BatchNorm>>,
}

impl D64 {
    fn new(batch_norm: bool, vb: Vb) -> Result<Self> {
        let ch = [3, 64, 128, 256, 512, 1];
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for i in 0..5 {
            let (s, p) = if i == 4 { (1, 0) } else { (2, 1) };
            let v = vb.pp(i);
            convs.push(Conv2d::new(
                ch[i],
                ch[i + 1],
                4,
                s,
                p,
                dcgan_opts(),
                v.pp("conv"),
            )?);
            bns.push(if batch_norm && (1..4).contains(&i) {
                Some(BatchNorm::new(ch[i + 1], true, v.pp("bn"))?)
            } else {
                None
            });
        }
        Ok(Self { convs, bns })
    }

    /// x: (B, 3, 64, 64) -> logits (B,)
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, conv) in self.convs.iter().enumerate() {
            h = match &self.bns[i] {
                _ if i == last => conv.forward(&h, pass)?,
                Some(bn) => {
                    bn.forward_act(&conv.forward(&h, pass)?, pass, Some(LeakyRelu::LEAKY))?
                }
                None => conv.forward_act(&h, pass, LeakyRelu::LEAKY)?,
            };
        }
        Ok(h.flatten_all()?)
    }
}

/// `dcgan64`.
pub struct Dcgan64 {
    g: G64,
    d: D64,
    opt_g: Adam,
    opt_d: Adam,
    rng: Rng,
    real: Tensor,
    batch: usize,
    flops: f64,
    dev: Device,
}

impl Dcgan64 {
    pub fn new(batch: usize, seed: u64, dev: &Device) -> Result<Self> {
        let gs = ParamStore::new(Rng::stream(seed, "bench.g"), DType::F32, dev);
        let ds = ParamStore::new(Rng::stream(seed, "bench.d"), DType::F32, dev);
        let g = G64::new(gs.root("gen"))?;
        let d = D64::new(true, ds.root("disc"))?;
        let mut rng = Rng::stream(seed, "bench.data");
        let real = uniform(&mut rng, &[batch, 3, 64, 64], -1.0, 1.0, dev)?;
        let (fg, fd) = (FlopCounter::new(), FlopCounter::new());
        let z = normal(&mut rng, &[batch, 100, 1, 1], dev)?;
        let x = g.forward(&z, Pass::train().counting(&fg))?;
        d.forward(&x, Pass::train().counting(&fd))?;
        let (fg, fd) = (fg.get(), fd.get());
        Ok(Self {
            opt_g: adam(&gs)?,
            opt_d: adam(&ds)?,
            g,
            d,
            rng,
            real,
            batch,
            flops: 3.0 * fg + 9.0 * fd,
            dev: dev.clone(),
        })
    }
}

impl Workload for Dcgan64 {
    fn batch(&self) -> usize {
        self.batch
    }

    fn step(&mut self) -> Result<Vec<f64>> {
        let z = normal(&mut self.rng, &[self.batch, 100, 1, 1], &self.dev)?;
        let pass = Pass::train();
        let fake = self.g.forward(&z, pass)?;
        // D step: real and (detached) fake batches, each through D on its own.
        let d_loss = (bce_const(&self.d.forward(&self.real, pass)?, true)?
            + bce_const(&self.d.forward(&fake.detach(), pass)?, false)?)?;
        self.opt_d.step(&d_loss.backward()?)?;
        // G step through the updated D (its parameters frozen), on the same fakes.
        let g_loss = bce_const(&self.d.forward(&fake, pass.frozen())?, true)?;
        self.opt_g.step(&g_loss.backward()?)?;
        Ok(vec![scalar(&d_loss)?, scalar(&g_loss)?])
    }

    fn flops(&self) -> f64 {
        self.flops
    }
}

/// The cDCGAN-28 generator.
struct G28 {
    input: Linear,
    input_bn: BatchNorm,
    conv1: ConvTranspose2d,
    bn1: BatchNorm,
    conv2: ConvTranspose2d,
}

impl G28 {
    fn new(vb: Vb) -> Result<Self> {
        Ok(Self {
            input: Linear::new(110, 128 * 7 * 7, linear_opts(), vb.pp("input"))?,
            input_bn: BatchNorm::new(128 * 7 * 7, true, vb.pp("input_bn"))?,
            conv1: ConvTranspose2d::new(128, 64, 4, 2, 1, dcgan_opts(), vb.pp("conv1"))?,
            bn1: BatchNorm::new(64, true, vb.pp("bn1"))?,
            conv2: ConvTranspose2d::new(64, 1, 4, 2, 1, dcgan_opts(), vb.pp("conv2"))?,
        })
    }

    /// z: (B, 100), y: (B, 10) one-hot -> (B, 1, 28, 28)
    fn forward(&self, z: &Tensor, y: &Tensor, pass: Pass) -> Result<Tensor> {
        let b = z.dim(0)?;
        let h = self.input.forward(&Tensor::cat(&[z, y], 1)?, pass)?;
        let h = self.input_bn.forward_act(&h, pass, Some(LeakyRelu::RELU))?;
        let h = h.reshape((b, 128, 7, 7))?;
        let h =
            self.bn1
                .forward_act(&self.conv1.forward(&h, pass)?, pass, Some(LeakyRelu::RELU))?;
        Ok(self.conv2.forward(&h, pass)?.tanh()?)
    }
}

/// The cDCGAN-28 discriminator.
struct D28 {
    conv1: Conv2d,
    conv2: Conv2d,
    bn2: BatchNorm,
    out: Linear,
}

impl D28 {
    fn new(vb: Vb) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(11, 64, 4, 2, 1, dcgan_opts(), vb.pp("conv1"))?,
            conv2: Conv2d::new(64, 128, 4, 2, 1, dcgan_opts(), vb.pp("conv2"))?,
            bn2: BatchNorm::new(128, true, vb.pp("bn2"))?,
            out: Linear::new(128 * 7 * 7, 1, linear_opts(), vb.pp("out"))?,
        })
    }

    /// x: (B, 1, 28, 28), y: (B, 10) -> logits (B,)
    fn forward(&self, x: &Tensor, y: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = Tensor::cat(&[x, &label_planes(y, 28, 28)?], 1)?;
        let h = self.conv1.forward_act(&h, pass, LeakyRelu::LEAKY)?;
        let h =
            self.bn2
                .forward_act(&self.conv2.forward(&h, pass)?, pass, Some(LeakyRelu::LEAKY))?;
        Ok(self.out.forward(&h.flatten_from(1)?, pass)?.flatten_all()?)
    }
}

/// `cdcgan28`.
pub struct Cdcgan28 {
    g: G28,
    d: D28,
    opt_g: Adam,
    opt_d: Adam,
    rng: Rng,
    real: Tensor,
    real_y: Tensor,
    batch: usize,
    flops: f64,
    dev: Device,
}

impl Cdcgan28 {
    pub fn new(batch: usize, seed: u64, dev: &Device) -> Result<Self> {
        let gs = ParamStore::new(Rng::stream(seed, "bench.g"), DType::F32, dev);
        let ds = ParamStore::new(Rng::stream(seed, "bench.d"), DType::F32, dev);
        let g = G28::new(gs.root("gen"))?;
        let d = D28::new(ds.root("disc"))?;
        let mut rng = Rng::stream(seed, "bench.data");
        let real = uniform(&mut rng, &[batch, 1, 28, 28], -1.0, 1.0, dev)?;
        let labels: Vec<usize> = (0..batch).map(|_| rng.below(10)).collect();
        let real_y = one_hot(&labels, 10, dev)?;
        let (fg, fd) = (FlopCounter::new(), FlopCounter::new());
        let z = normal(&mut rng, &[batch, 100], dev)?;
        let x = g.forward(&z, &real_y, Pass::train().counting(&fg))?;
        d.forward(&x, &real_y, Pass::train().counting(&fd))?;
        let (fg, fd) = (fg.get(), fd.get());
        Ok(Self {
            opt_g: adam(&gs)?,
            opt_d: adam(&ds)?,
            g,
            d,
            rng,
            real,
            real_y,
            batch,
            flops: 3.0 * fg + 9.0 * fd,
            dev: dev.clone(),
        })
    }
}

impl Workload for Cdcgan28 {
    fn batch(&self) -> usize {
        self.batch
    }

    fn step(&mut self) -> Result<Vec<f64>> {
        let b = self.batch;
        let z = normal(&mut self.rng, &[b, 100], &self.dev)?;
        let labels: Vec<usize> = (0..b).map(|_| self.rng.below(10)).collect();
        let y = one_hot(&labels, 10, &self.dev)?;
        let pass = Pass::train();
        let fake = self.g.forward(&z, &y, pass)?;
        let d_loss = (bce_const(&self.d.forward(&self.real, &self.real_y, pass)?, true)?
            + bce_const(&self.d.forward(&fake.detach(), &y, pass)?, false)?)?;
        self.opt_d.step(&d_loss.backward()?)?;
        let g_loss = bce_const(&self.d.forward(&fake, &y, pass.frozen())?, true)?;
        self.opt_g.step(&g_loss.backward()?)?;
        Ok(vec![scalar(&d_loss)?, scalar(&g_loss)?])
    }

    fn flops(&self) -> f64 {
        self.flops
    }
}

/// `wgangp-critic64`.
pub struct WganGpCritic64 {
    g: G64,
    d: D64,
    opt_d: Adam,
    rng: Rng,
    real: Tensor,
    batch: usize,
    flops: f64,
    dev: Device,
}

impl WganGpCritic64 {
    pub fn new(batch: usize, seed: u64, dev: &Device) -> Result<Self> {
        crate::grad::check_exact_second_order()?;
        let gs = ParamStore::new(Rng::stream(seed, "bench.g"), DType::F32, dev);
        let ds = ParamStore::new(Rng::stream(seed, "bench.d"), DType::F32, dev);
        let g = G64::new(gs.root("gen"))?;
        let d = D64::new(false, ds.root("disc"))?;
        let mut rng = Rng::stream(seed, "bench.data");
        let real = uniform(&mut rng, &[batch, 3, 64, 64], -1.0, 1.0, dev)?;
        let (fg, fd) = (FlopCounter::new(), FlopCounter::new());
        let z = normal(&mut rng, &[batch, 100, 1, 1], dev)?;
        let x = g.forward(&z, Pass::train().counting(&fg))?;
        d.forward(&x, Pass::train().counting(&fd))?;
        let (fg, fd) = (fg.get(), fd.get());
        Ok(Self {
            opt_d: adam(&ds)?,
            g,
            d,
            rng,
            real,
            batch,
            flops: fg + 12.0 * fd,
            dev: dev.clone(),
        })
    }
}

impl Workload for WganGpCritic64 {
    fn batch(&self) -> usize {
        self.batch
    }

    fn step(&mut self) -> Result<Vec<f64>> {
        let b = self.batch;
        let z = normal(&mut self.rng, &[b, 100, 1, 1], &self.dev)?;
        // The penalty's inner backward skips the critic's weight gradients through `mode`.
        let mode = GradMode::new();
        let pass = Pass::train().with_grad(&mode);
        let fake = self.g.forward(&z, pass)?.detach();
        let e: Vec<f64> = (0..b).map(|_| self.rng.uniform()).collect();
        let eps = Tensor::from_vec(e, (b, 1, 1, 1), &self.dev)?.to_dtype(DType::F32)?;
        let (d, real) = (&self.d, &self.real);
        let wd = (d.forward(&fake, pass)?.mean_all()? - d.forward(real, pass)?.mean_all()?)?;
        let gp =
            crate::train::loss::gradient_penalty(real, &fake, &eps, &mode, |x| d.forward(x, pass))?;
        let loss = (&wd + gp.affine(10.0, 0.0)?)?;
        self.opt_d.step(&loss.backward()?)?;
        Ok(vec![scalar(&loss)?, scalar(&gp)?])
    }

    fn flops(&self) -> f64 {
        self.flops
    }
}

/// `iclevr-sagan`: the project's trainer on its preset.
pub struct IclevrSagan {
    trainer: Trainer,
    flops: f64,
}

impl IclevrSagan {
    pub fn new(batch: usize, seed: u64, dev: &Device) -> Result<Self> {
        let mut cfg = TrainConfig::iclevr_sagan();
        cfg.batch_size = batch;
        cfg.seed = seed;
        // Three images per scene; a few batches' worth keeps rendering quick.
        let scenes = (2 * batch).div_ceil(3).max(4);
        let ds = crate::data::render::synthetic_dataset(scenes, cfg.model.image_size, seed, None);
        let trainer = Trainer::new(cfg, Arc::new(ds), dev)?;
        let (fg, fd) = {
            let data = trainer.data().clone();
            let idx: Vec<usize> = (0..batch).collect();
            let (x, c) = data.batch(&idx, dev)?;
            let (x, c) = (x.to_dtype(DType::F32)?, c.to_dtype(DType::F32)?);
            let z = Tensor::zeros((batch, trainer.cfg.model.z_dim), DType::F32, dev)?;
            let (fg, fd) = (FlopCounter::new(), FlopCounter::new());
            trainer
                .generator
                .forward(&z, &c, Pass::eval().counting(&fg))?;
            trainer
                .discriminator
                .forward(&x, &c, Pass::eval().counting(&fd))?;
            (fg.get(), fd.get())
        };
        let l = &trainer.cfg.loss;
        let mut per_critic = fg + 6.0 * fd;
        if l.kind == crate::config::LossKind::WganGp {
            per_critic += 6.0 * fd;
        }
        if l.r1_gamma > 0.0 {
            per_critic += 6.0 * fd;
        }
        let flops = l.n_critic as f64 * per_critic + 3.0 * fg + 3.0 * fd;
        Ok(Self { trainer, flops })
    }
}

impl Workload for IclevrSagan {
    fn batch(&self) -> usize {
        self.trainer.cfg.batch_size
    }

    fn step(&mut self) -> Result<Vec<f64>> {
        let st = self.trainer.train_step()?;
        Ok(vec![st.d_loss, st.g_loss])
    }

    fn flops(&self) -> f64 {
        self.flops
    }
}

/// Build a workload by name (see [`MODELS`]).
pub fn workload(name: &str, batch: usize, seed: u64, dev: &Device) -> Result<Box<dyn Workload>> {
    Ok(match name {
        "dcgan64" => Box::new(Dcgan64::new(batch, seed, dev)?),
        "cdcgan28" => Box::new(Cdcgan28::new(batch, seed, dev)?),
        "wgangp-critic64" => Box::new(WganGpCritic64::new(batch, seed, dev)?),
        "iclevr-sagan" => Box::new(IclevrSagan::new(batch, seed, dev)?),
        other => {
            return Err(Error::Config(format!(
                "unknown bench model `{other}` (one of {})",
                MODELS.join(", ")
            )));
        }
    })
}

/// Timing summary of one workload.
#[derive(Debug, Clone)]
pub struct Timing {
    pub model: String,
    pub batch: usize,
    /// Milliseconds per iteration, sorted.
    pub ms: Vec<f64>,
    pub flops: f64,
}

impl Timing {
    /// Value at quantile `q` of the sorted times (linear interpolation).
    pub fn quantile(&self, q: f64) -> f64 {
        let n = self.ms.len();
        if n == 0 {
            return f64::NAN;
        }
        let pos = q * (n - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        self.ms[lo] + (self.ms[hi] - self.ms[lo]) * (pos - lo as f64)
    }

    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    pub fn images_per_s(&self) -> f64 {
        self.batch as f64 / (self.median() / 1e3)
    }

    pub fn gflops(&self) -> f64 {
        self.flops / (self.median() / 1e3) / 1e9
    }
}

/// Run `warmup` untimed and `iters` timed iterations; fails on a non-finite loss.
pub fn time_workload(
    name: &str,
    w: &mut dyn Workload,
    dev: &Device,
    warmup: usize,
    iters: usize,
) -> Result<Timing> {
    let check = |losses: &[f64]| -> Result<()> {
        if losses.iter().all(|l| l.is_finite()) {
            Ok(())
        } else {
            Err(Error::Msg(format!("{name}: non-finite loss {losses:?}")))
        }
    };
    // As the trainer runs its steps (`Trainer::step_kind`). The losses are read back to the
    // host, which waits for the step's kernels on a GPU; the explicit synchronisation also
    // covers anything queued after them.
    let mut step = || {
        let losses = crate::on_pool_worker(|| w.step())?;
        dev.synchronize()?;
        Ok::<_, Error>(losses)
    };
    for _ in 0..warmup {
        check(&step()?)?;
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let losses = step()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        check(&losses)?;
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        model: name.to_string(),
        batch: w.batch(),
        ms,
        flops: w.flops(),
    })
}

/// The machine's f32 matrix-multiply rate in GFLOP/s: the median of 5 timed
/// `n x n x n` products with the `gemm` crate (the one candle and the engine's convolutions
/// use), on `threads` threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn sgemm_gflops(n: usize, threads: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 17) as f32) * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 13) as f32) * 0.01).collect();
    let mut c = vec![0f32; n * n];
    let mut run = || {
        let t = Instant::now();
        // The kernels' product, split over the rayon pool when `threads` > 1.
        crate::kernels::matmul::matmul_in(
            threads > 1,
            n,
            n,
            n,
            &mut c,
            (n, 1),
            false,
            &a,
            (n, 1),
            &b,
            (n, 1),
        );
        t.elapsed().as_secs_f64()
    };
    run();
    let mut s: Vec<f64> = (0..5).map(|_| run()).collect();
    s.sort_by(f64::total_cmp);
    2.0 * (n as f64).powi(3) / s[2] / 1e9
}

/// The f32 matrix-multiply rate of `dev` in GFLOP/s through candle's matmul (cuBLAS on CUDA,
/// MPS on Metal): the median of 5 timed `n x n x n` products, each waited for.
pub fn device_sgemm_gflops(dev: &Device, n: usize) -> Result<f64> {
    let a = Tensor::ones((n, n), DType::F32, dev)?;
    let b = Tensor::ones((n, n), DType::F32, dev)?;
    let run = || -> Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        let c = a.matmul(&b)?;
        dev.synchronize()?;
        drop(c);
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let mut s = (0..5).map(|_| run()).collect::<Result<Vec<f64>>>()?;
    s.sort_by(f64::total_cmp);
    Ok(2.0 * (n as f64).powi(3) / s[2] / 1e9)
}

/// Without the `gemm` dependency (non-glibc targets) there is no rate to measure.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn sgemm_gflops(_n: usize, _threads: usize) -> f64 {
    f64::NAN
}

/// Use `threads` worker threads for rayon (the engine's convolutions). candle reads
/// `RAYON_NUM_THREADS` on every op: the binary's `main` sets it to the same number before any
/// thread starts (the library never changes the environment). Call before anything has used
/// rayon.
pub fn set_threads(threads: usize) -> Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::Msg(format!("setting {threads} threads: {e}")))?;
    Ok(())
}

/// `ganscope bench`: time the chosen workloads on `opts.device` and print a table and one
/// `bench model=...` line each.
pub fn run(opts: &BenchOptions) -> Result<Vec<Timing>> {
    if let Some(t) = opts.threads {
        set_threads(t)?;
    }
    let (iters, warmup) = (
        opts.iters.unwrap_or(DEFAULT_ITERS).max(1),
        opts.warmup.unwrap_or(DEFAULT_WARMUP),
    );
    if opts.model.as_deref() == Some(EXPLORE) {
        for training in [false, true] {
            explore_latency(iters, warmup, training, &opts.preset)?;
        }
        return Ok(Vec::new());
    }
    if opts.model.as_deref() == Some(KERNELS) {
        if !opts.device.is_cpu() {
            return Err(Error::Config(format!(
                "bench --model {KERNELS} times the CPU kernels: --device cpu"
            )));
        }
        kernels::run(&kernels::KernelBenchOptions {
            quick: false,
            iters: opts.iters,
            warmup: opts.warmup,
            threads: opts.threads,
        })?;
        return Ok(Vec::new());
    }
    if opts.model.as_deref() == Some(CONV_LAYERS) {
        if !opts.device.is_cpu() {
            return Err(Error::Config(format!(
                "bench --model {CONV_LAYERS} times the CPU kernels: --device cpu"
            )));
        }
        crate::on_pool_worker(|| kernels::conv_layers(opts.batch.unwrap_or(64), iters, warmup))?;
        return Ok(Vec::new());
    }
    let threads = candle_core::utils::get_num_threads();
    let names: Vec<&str> = match &opts.model {
        Some(m) => {
            if !MODELS.contains(&m.as_str()) {
                return Err(Error::Config(format!(
                    "unknown bench model `{m}` (one of {}, or {EXPLORE}, {KERNELS} or {CONV_LAYERS})",
                    MODELS.join(", ")
                )));
            }
            vec![m.as_str()]
        }
        None => MODELS.to_vec(),
    };
    let dev = &opts.device;
    let sgemm = if dev.is_cpu() {
        let sgemm = sgemm_gflops(2048, threads);
        let elementwise = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into());
        println!(
            "device cpu, {threads} threads (candle elementwise: CANDLE_NUM_THREADS={elementwise}), \
             avx512f {}, sgemm 2048^3: {sgemm:.1} GFLOP/s",
            avx512()
        );
        println!("bench sgemm n=2048 threads={threads} gflops={sgemm:.1}");
        sgemm
    } else {
        let sgemm = device_sgemm_gflops(dev, 8192)?;
        let name = crate::device::name(dev);
        println!("device {name}, f32 matmul 8192^3: {sgemm:.1} GFLOP/s");
        println!("bench sgemm n=8192 device={name} gflops={sgemm:.1}");
        sgemm
    };
    println!(
        "{:<16} {:>5} {:>10} {:>21} {:>9} {:>10} {:>8} {:>9} {:>8}",
        "model",
        "batch",
        "ms median",
        "ms min/p25/p75/max",
        "images/s",
        "GFLOP/iter",
        "GFLOP/s",
        "floor ms",
        "x floor"
    );
    let mut out = Vec::new();
    for name in names {
        let batch = opts.batch.unwrap_or_else(|| default_batch(name));
        let mut w = workload(name, batch, 0, dev)?;
        let t = time_workload(name, w.as_mut(), dev, warmup, iters)?;
        let floor = t.flops / (sgemm * 1e9) * 1e3;
        println!(
            "{:<16} {:>5} {:>10.1} {:>21} {:>9.1} {:>10.1} {:>8.1} {:>9.1} {:>8.2}",
            name,
            t.batch,
            t.median(),
            format!(
                "{:.0}/{:.0}/{:.0}/{:.0}",
                t.quantile(0.0),
                t.quantile(0.25),
                t.quantile(0.75),
                t.quantile(1.0)
            ),
            t.images_per_s(),
            t.flops / 1e9,
            t.gflops(),
            floor,
            t.median() / floor
        );
        let rss = peak_rss_mib().map_or_else(|| "nan".to_string(), |m| format!("{m:.0}"));
        println!(
            "bench model={} batch={} ms_per_iter={:.2} images_per_s={:.2} gflops={:.2} peak_rss_mib={rss}",
            name,
            t.batch,
            t.median(),
            t.images_per_s(),
            t.gflops()
        );
        out.push(t);
    }
    Ok(out)
}

/// The process's peak resident memory so far in MiB (`VmHWM` of `/proc/self/status`; Linux
/// only). With one `--model` it is that workload's peak (setup included).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The bench "model" that times the explorer's slider path instead of a training iteration.
pub const EXPLORE: &str = "explore";

/// The bench "model" that times the CPU kernels against candle's own ops, case by case
/// ([`kernels::run`]).
pub const KERNELS: &str = "kernels";

/// The bench "model" that times every pass of every convolution of the benchmark models
/// ([`kernels::conv_layers`]), to set beside `bench/torch_bench.py --model conv-layers`.
pub const CONV_LAYERS: &str = "conv-layers";

/// Latencies of [`explore_latency`], in milliseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    pub training: bool,
    pub ms: Vec<f64>,
    /// Training steps the session reported while the timed requests ran.
    pub steps: u64,
}

impl Latency {
    /// Nearest-rank quantile, `q` in [0, 1].
    pub fn quantile(&self, q: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }

    /// Share of the requests answered within the explorer's same-frame budget
    /// ([`crate::train::worker::SAME_FRAME_WAIT`]): those images are painted in the frame that
    /// handled the input; the rest one frame later.
    pub fn same_frame_share(&self) -> f64 {
        let budget = crate::train::worker::SAME_FRAME_WAIT.as_secs_f64() * 1e3;
        let n = self.ms.iter().filter(|&&m| m <= budget).count();
        n as f64 / self.ms.len().max(1) as f64
    }
}

/// `ganscope bench --model explore`: the explorer's slider path without a window. A training
/// session of `preset` (embedded data; `ganscope bench` passes the explorer's default) runs in
/// its own thread exactly as the explorer starts it, paused or training; its generator weights go to
/// the renderer thread as the explorer forwards them; then, every 30 ms (a slider drag's
/// event rate), one latent coordinate moves and the explorer image is requested. Each latency
/// is the time from the request to the rendered image arriving back on the asking thread,
/// which is the part of the explorer's "slider -> image" timing that happens before the frame
/// is painted: the window waits up to [`crate::train::worker::SAME_FRAME_WAIT`] for it and
/// paints the image in the same frame (the window adds its own drawing). `warmup` requests are
/// not counted.
pub fn explore_latency(
    requests: usize,
    warmup: usize,
    training: bool,
    preset: &str,
) -> Result<Latency> {
    use crate::train::run::LoopEvent;
    use crate::train::worker::{Command, Event, RenderRequest, Renderer, Session, SessionSpec};
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Duration;

    let cfg = TrainConfig::preset(preset)?;
    let mut spec = SessionSpec::new(cfg, Device::Cpu);
    spec.run = false;
    let session = Session::spawn(spec, Arc::new(|| {}));
    let renderer = Renderer::spawn(Arc::new(|| {}));
    let has_weights = std::cell::Cell::new(false);
    // Training steps reported by the session while the requests run (proof that it trained).
    let steps = std::cell::Cell::new(0u64);
    let forward = |ev: Event| -> Result<Option<crate::train::worker::SessionInfo>> {
        match ev {
            Event::Loop(LoopEvent::Weights(w)) => {
                renderer.set_weights(w);
                has_weights.set(true);
            }
            Event::Loop(LoopEvent::Step(_)) => steps.set(steps.get() + 1),
            Event::Error(e) => return Err(Error::Msg(format!("explore bench: session: {e}"))),
            Event::Ready(info) => return Ok(Some(*info)),
            _ => {}
        }
        Ok(None)
    };
    // Wait until the session is ready and its first weights are with the renderer.
    let mut info = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while info.is_none() || !has_weights.get() {
        let left = deadline.saturating_duration_since(Instant::now());
        match session.events.recv_timeout(left) {
            Ok(ev) => info = forward(ev)?.or(info),
            Err(_) => {
                return Err(Error::Msg(
                    "explore bench: the session did not start".into(),
                ));
            }
        }
    }
    let info = info.expect("the loop ends with the session info");
    if training {
        // Measure while training is under way: after its first step.
        session.send(Command::Run);
        while steps.get() == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match session.events.recv_timeout(left) {
                Ok(ev) => {
                    forward(ev)?;
                }
                Err(_) => return Err(Error::Msg("explore bench: training did not start".into())),
            }
        }
    }
    let z_dim = info.cfg.model.z_dim;
    let k = info.cfg.model.num_conditions;
    let mut c = vec![0f32; k];
    if k > 0 {
        c[0] = 1.0;
    }
    let mut rng = Rng::new(7);
    let mut z: Vec<f32> = rng
        .normal_vec(z_dim)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let mut ms = Vec::with_capacity(requests);
    let mut steps_at_start = 0;
    for i in 0..warmup + requests {
        if i == warmup {
            steps_at_start = steps.get();
        }
        std::thread::sleep(Duration::from_millis(30));
        for ev in session.events.try_iter() {
            forward(ev)?;
        }
        z[i % z_dim] += 0.1;
        let id = i as u64;
        let t = Instant::now();
        renderer.request(RenderRequest {
            slot: "latent",
            id,
            z: vec![z.clone()],
            c: vec![c.clone()],
            scene: None,
        });
        loop {
            match renderer.results.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(r)) if r.id == id => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Error::Msg(format!("explore bench: {e}"))),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Msg("explore bench: no image within 60 s".into()));
                }
            }
        }
        if i >= warmup {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for ev in session.events.try_iter() {
        forward(ev)?;
    }
    let trained = steps.get() - steps_at_start;
    session.send(Command::Shutdown);
    let lat = Latency {
        training,
        ms,
        steps: trained,
    };
    let state = if training { "training" } else { "paused" };
    println!(
        "explore {preset} ({state}, {} requests, {trained} training steps meanwhile): slider -> image ms \
         p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}; {:.1}% within the same-frame budget ({} ms)",
        lat.ms.len(),
        lat.quantile(0.5),
        lat.quantile(0.95),
        lat.quantile(0.99),
        lat.quantile(1.0),
        100.0 * lat.same_frame_share(),
        crate::train::worker::SAME_FRAME_WAIT.as_millis()
    );
    println!(
        "bench model=explore preset={preset} state={state} requests={} p50_ms={:.2} p95_ms={:.2} p99_ms={:.2} \
         same_frame={:.3}",
        lat.ms.len(),
        lat.quantile(0.5),
        lat.quantile(0.95),
        lat.quantile(0.99),
        lat.same_frame_share()
    );
    Ok(lat)
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every workload runs an iteration at a tiny batch with finite losses, and its FLOP count
    /// is positive. Not a timing test.
    #[test]
    fn each_workload_runs_one_iteration() {
        crate::grad::check_exact_second_order().unwrap();
        for name in MODELS {
            let mut w = workload(name, 2, 7, &Device::Cpu).unwrap();
            let losses = w.step().unwrap();
            assert!(!losses.is_empty(), "{name}");
            assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
            assert!(w.flops() > 0.0, "{name}");
        }
    }

    /// The explorer's slider path runs headless, paused and training, and every request gets
    /// its image back (a latency each). Not a timing test.
    #[test]
    fn explore_latency_answers_every_request() {
        crate::grad::check_exact_second_order().unwrap();
        for training in [false, true] {
            let l = explore_latency(3, 1, training, "iclevr-small").unwrap();
            assert_eq!(l.ms.len(), 3);
            if !training {
                assert_eq!(l.steps, 0, "{l:?}");
            }
            assert!(l.ms.iter().all(|m| m.is_finite() && *m >= 0.0), "{l:?}");
            assert!(l.quantile(0.5) <= l.quantile(1.0));
        }
        let l = Latency {
            training: false,
            ms: vec![5.0, 1.0, 3.0, 2.0, 40.0],
            steps: 0,
        };
        assert_eq!(
            (l.quantile(0.5), l.quantile(0.95), l.quantile(0.0)),
            (3.0, 40.0, 1.0)
        );
        // 4 of 5 within the 8 ms budget.
        assert_eq!(crate::train::worker::SAME_FRAME_WAIT.as_millis(), 8);
        assert!((l.same_frame_share() - 0.8).abs() < 1e-12);
        assert!(peak_rss_mib().is_some_and(|m| m > 1.0));
    }

    /// The timing loop (with its device synchronisation) and the device matmul rate run on
    /// the CPU device too; a GPU gives them their point, but their plumbing is checked here.
    #[test]
    fn timing_and_device_rate_on_the_cpu_device() {
        let dev = Device::Cpu;
        let mut w = workload("cdcgan28", 2, 3, &dev).unwrap();
        let t = time_workload("cdcgan28", w.as_mut(), &dev, 1, 2).unwrap();
        assert_eq!((t.batch, t.ms.len()), (2, 2));
        assert!(
            t.ms.iter().all(|&m| m > 0.0) && t.ms[0] <= t.ms[1],
            "{:?}",
            t.ms
        );
        let rate = device_sgemm_gflops(&dev, 64).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }

    #[test]
    fn reference_flop_counts() {
        // DCGAN-64 by hand, per sample: G = 2 (100*512*16 + 3 * 2^25 + 64*1024*3*16)
        // (each middle ConvT is 2^25 MACs), D = 2 (64*1024*48 + 3 * 2^25 + 8192).
        let fg = 2.0 * (100.0 * 512.0 * 16.0 + 3.0 * 33_554_432.0 + 64.0 * 1024.0 * 48.0);
        let fd = 2.0 * (64.0 * 1024.0 * 48.0 + 3.0 * 33_554_432.0 + 8192.0);
        let w = Dcgan64::new(2, 0, &Device::Cpu).unwrap();
        let want = 2.0 * (3.0 * fg + 9.0 * fd);
        assert!(
            (w.flops() - want).abs() < 1e-6 * want,
            "{} vs {want}",
            w.flops()
        );
        let t = Timing {
            model: "x".into(),
            batch: 2,
            ms: vec![1.0, 2.0, 4.0, 10.0],
            flops: 1e9,
        };
        assert_eq!(t.median(), 3.0);
        assert_eq!(t.quantile(0.0), 1.0);
        assert_eq!(t.quantile(1.0), 10.0);
    }
}
