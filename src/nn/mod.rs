//! Layers shared by every network family: convolutions, linear layers, BatchNorm (plain and
//! conditional), layer norm, spectral normalisation, self-attention, minibatch standard
//! deviation, weight initialisation, and [`Pass`], the value every layer's and network's
//! forward takes: train or eval mode, frozen parameters, the backward mode of its fused ops
//! ([`GradMode`]) and a FLOP counter ([`FlopCounter`]). The arithmetic runs in
//! [`crate::kernels`] (custom ops and their candle fallbacks); activations and resampling are
//! called from there directly ([`crate::kernels::ops`]).
//!
//! Every op used here is built from candle primitives that have a backward which is itself
//! differentiable (checked against finite differences in `tests/gradient_penalty.rs`), so any
//! of these layers can sit under a gradient penalty. Deliberately avoided: `candle_nn::LayerNorm`,
//! `softmax_last_dim`, `rms_norm` (no backward in candle 0.11).
//!
//! Spectral normalisation: Miyato et al., "Spectral Normalization for Generative Adversarial
//! Networks", ICLR 2018. Self-attention: Zhang et al., "Self-Attention Generative Adversarial
//! Networks", ICML 2019. Conditional BatchNorm: de Vries et al. 2017 / Miyato & Koyama 2018.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{D, Tensor, Var};

use crate::config::ConditionKind;
use crate::error::Result;
use crate::grad::GradMode;
use crate::kernels::ops::{LeakyRelu, add_channel_bias, linear};
use crate::params::{Init, Vb};

/// How a forward pass runs, handed by value to every layer's and network's forward (candle's
/// `forward_t(x, train)`, with the rest of a pass's state explicit too):
/// - `train`: batch statistics (and their running update, and a spectral-norm power
///   iteration) vs running statistics;
/// - `frozen`: every layer reads its parameters as constants (detached). The pass then gives
///   gradients for its input (and for anything upstream of it) but none for those
///   parameters, which saves their weight gradients in a backward that only needs the input's
///   (the generator step through the discriminator). Values, batch statistics, running
///   statistics and spectral-norm updates are as without it; gradients that are computed are
///   unchanged;
/// - `grad`: the backward mode the pass's fused ops follow ([`GradMode`]; none: exact, every
///   gradient);
/// - `flops`: a counter the pass adds its FLOPs to ([`FlopCounter`]; for benchmarks);
/// - `standing`: in a train-mode pass, every BatchNorm hands its batch statistics to this
///   accumulator instead of updating its running statistics, and spectral norm skips its
///   power iteration: nothing in the network changes until [`StandingStats::apply`];
/// - `refine_sn`: spectral norm runs its power iteration (and keeps the refined vector) even
///   in an eval-mode pass ([`Pass::refining_sn`]; what a generator loaded without its
///   spectral-norm vectors needs before it samples).
///
/// `Pass::train()`, `Pass::eval()`, then `.frozen()`, `.with_grad(&mode)`, `.counting(&c)`,
/// `.standing(&s)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass<'a> {
    pub train: bool,
    pub frozen: bool,
    pub grad: Option<&'a GradMode>,
    pub flops: Option<&'a FlopCounter>,
    pub standing: Option<&'a StandingStats>,
    pub refine_sn: bool,
}

impl Pass<'static> {
    /// A training-mode pass: batch statistics, parameters trainable.
    pub const fn train() -> Self {
        Self::new(true)
    }

    /// An eval-mode pass: running statistics, parameters trainable.
    pub const fn eval() -> Self {
        Self::new(false)
    }

    /// [`Pass::train`] or [`Pass::eval`].
    pub const fn new(train: bool) -> Self {
        Self {
            train,
            frozen: false,
            grad: None,
            flops: None,
            standing: None,
            refine_sn: false,
        }
    }
}

impl<'a> Pass<'a> {
    /// The same pass with every layer's parameters read as constants (see [`Pass`]).
    pub fn frozen(self) -> Self {
        Self {
            frozen: true,
            ..self
        }
    }

    /// The same pass with its fused ops following `mode` (set around a backward by
    /// [`crate::grad::first_order_backward`] and [`crate::grad::input_gradient`]).
    pub fn with_grad(self, mode: &'a GradMode) -> Self {
        Self {
            grad: Some(mode),
            ..self
        }
    }

    /// The same pass adding its forward FLOPs to `counter`.
    pub fn counting(self, counter: &'a FlopCounter) -> Self {
        Self {
            flops: Some(counter),
            ..self
        }
    }

    /// The same pass collecting BatchNorm batch statistics into `stats` (see [`Pass`]).
    pub fn standing(self, stats: &'a StandingStats) -> Self {
        Self {
            standing: Some(stats),
            ..self
        }
    }

    /// The same pass with spectral norm's power iteration on whatever the mode (see [`Pass`]).
    pub fn refining_sn(self) -> Self {
        Self {
            refine_sn: true,
            ..self
        }
    }

    /// Whether this pass updates the network's state: running statistics and spectral-norm
    /// vectors (train mode, not collecting standing statistics).
    fn updates_state(self) -> bool {
        self.train && self.standing.is_none()
    }

    /// Whether spectral norm refines its vector in this pass.
    fn updates_sn(self) -> bool {
        self.updates_state() || self.refine_sn
    }

    /// A layer's parameter as this pass should see it (detached when frozen).
    fn param(self, t: &Tensor) -> Tensor {
        if self.frozen { t.detach() } else { t.clone() }
    }

    /// Adds `macs` multiply-accumulates (2 FLOPs each) to the pass's counter, if any.
    fn count(self, macs: usize) {
        if let Some(c) = self.flops {
            c.add_macs(macs);
        }
    }
}

/// Floating-point operations of the forward passes that carried it ([`Pass::counting`]):
/// 2 per multiply-accumulate of every convolution, transposed convolution, linear layer and
/// attention product (`2 B O OH OW C K K` for a conv, `2 B Cin H W Cout K K` for a transposed
/// conv, `2 B in out` for a linear layer, `2 B N N (Ck + Cv)` for attention over N positions).
/// Normalisation, activations, biases and spectral-norm power iterations are not counted. For
/// benchmarks.
#[derive(Debug, Default)]
pub struct FlopCounter(AtomicU64);

impl FlopCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// FLOPs counted so far.
    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64
    }

    fn add_macs(&self, macs: usize) {
        self.0.fetch_add(2 * macs as u64, Ordering::Relaxed);
    }
}

/// How fresh weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightInit {
    /// N(0, 0.02), the DCGAN paper's choice.
    Dcgan,
    /// Glorot uniform (SNGAN / projection-discriminator code).
    Xavier,
    /// N(0, 1), like an embedding table (`nn.Embedding`): for layers that read a one-hot or
    /// multi-hot condition, so that the condition reaches the network at the scale of z or of
    /// the image from the first step instead of being drowned out at N(0, 0.02).
    Embedding,
}

impl WeightInit {
    fn init(self, fan_in: usize, fan_out: usize) -> Init {
        match self {
            WeightInit::Dcgan => Init::Normal {
                mean: 0.0,
                std: 0.02,
            },
            WeightInit::Xavier => Init::xavier(fan_in, fan_out),
            WeightInit::Embedding => Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        }
    }
}

/// Options shared by weight layers.
#[derive(Debug, Clone, Copy)]
pub struct LayerOpts {
    pub bias: bool,
    pub spectral_norm: bool,
    pub init: WeightInit,
}

/// Spectral normalisation state: the left singular vector estimate `u`.
#[derive(Debug, Clone)]
pub struct SpectralNorm {
    u: Var,
}

fn l2_normalize(v: &Tensor) -> Result<Tensor> {
    let n = v.sqr()?.sum_all()?.sqrt()?.affine(1.0, 1e-12)?;
    Ok(v.broadcast_div(&n)?)
}

impl SpectralNorm {
    /// `rows`: the first dimension of the weight viewed as a matrix.
    pub fn new(rows: usize, vb: Vb) -> Result<Self> {
        let u = vb.state(
            "u",
            &[rows],
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )?;
        u.set(&l2_normalize(u.as_tensor())?)?;
        Ok(Self { u })
    }

    /// W / sigma(W) for a weight viewed as a (rows, cols) matrix `w_mat`, with `w` its original
    /// shape. In training mode one power iteration refines `u` first (no gradient through u, v,
    /// as in PyTorch's `spectral_norm`); sigma = u^T W v keeps its gradient with respect to W.
    pub fn apply(&self, w: &Tensor, w_mat: &Tensor, train: bool) -> Result<Tensor> {
        let wd = w_mat.detach();
        let u0 = self.u.as_tensor().detach().unsqueeze(1)?; // (rows, 1)
        let v = l2_normalize(&wd.t()?.matmul(&u0)?)?; // (cols, 1)
        let u = if train {
            let u1 = l2_normalize(&wd.matmul(&v)?)?; // (rows, 1)
            self.u.set(&u1.squeeze(1)?)?;
            u1
        } else {
            u0
        };
        let sigma = u.t()?.matmul(&w_mat.matmul(&v)?)?.reshape(())?; // scalar
        Ok(w.broadcast_div(&sigma)?)
    }
}

/// 2-D convolution, OIHW weights.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    sn: Option<SpectralNorm>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        opts: LayerOpts,
        vb: Vb,
    ) -> Result<Self> {
        let weight = vb.weight(
            "weight",
            &[cout, cin, k, k],
            opts.init.init(cin * k * k, cout * k * k),
            1,
        )?;
        let bias = if opts.bias {
            Some(vb.param("bias", &[cout], Init::Const(0.0))?)
        } else {
            None
        };
        let sn = if opts.spectral_norm {
            Some(SpectralNorm::new(cout, vb.pp("sn"))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            sn,
            stride,
            padding,
        })
    }

    /// The kernel, spectrally normalised when configured.
    fn kernel(&self, pass: Pass) -> Result<Tensor> {
        let weight = pass.param(&self.weight);
        Ok(match &self.sn {
            Some(sn) => {
                let o = weight.dim(0)?;
                sn.apply(&weight, &weight.reshape((o, ()))?, pass.updates_sn())?
            }
            None => weight,
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let w = self.kernel(pass)?;
        let (s, p) = (self.stride, self.padding);
        let y = crate::kernels::conv::conv2d(x, &w, s, p, pass.grad)?; // (B, O, H', W')
        pass.count(y.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => add_channel_bias(&y, &pass.param(b))?,
            None => y,
        })
    }

    /// `act(self.forward(x))`; without a bias, one fused op
    /// ([`crate::kernels::conv::conv2d_act`]).
    pub fn forward_act(&self, x: &Tensor, pass: Pass, act: LeakyRelu) -> Result<Tensor> {
        if self.bias.is_some() {
            return act.apply(&self.forward(x, pass)?);
        }
        let w = self.kernel(pass)?;
        let (s, p) = (self.stride, self.padding);
        let y = crate::kernels::conv::conv2d_act(x, &w, s, p, act, pass.grad)?;
        pass.count(y.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(y)
    }
}

/// 2-D transposed convolution, weights (in, out, kH, kW) as in PyTorch.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    sn: Option<SpectralNorm>,
    stride: usize,
    padding: usize,
}

impl ConvTranspose2d {
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        opts: LayerOpts,
        vb: Vb,
    ) -> Result<Self> {
        let weight = vb.weight(
            "weight",
            &[cin, cout, k, k],
            opts.init.init(cout * k * k, cin * k * k),
            0,
        )?;
        let bias = if opts.bias {
            Some(vb.param("bias", &[cout], Init::Const(0.0))?)
        } else {
            None
        };
        let sn = if opts.spectral_norm {
            Some(SpectralNorm::new(cout, vb.pp("sn"))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            sn,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let weight = pass.param(&self.weight);
        let w = match &self.sn {
            Some(sn) => {
                // PyTorch normalises ConvTranspose along dim 1 (output channels).
                let o = weight.dim(1)?;
                let w_mat = weight.transpose(0, 1)?.contiguous()?.reshape((o, ()))?;
                sn.apply(&weight, &w_mat, pass.updates_sn())?
            }
            None => weight,
        };
        let (s, p) = (self.stride, self.padding);
        let y = crate::kernels::conv::conv_transpose2d(x, &w, s, p, pass.grad)?; // (B, O, H', W')
        pass.count(x.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => add_channel_bias(&y, &pass.param(b))?,
            None => y,
        })
    }
}

/// Fully connected layer, weight (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    sn: Option<SpectralNorm>,
}

impl Linear {
    pub fn new(cin: usize, cout: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        let weight = vb.weight("weight", &[cout, cin], opts.init.init(cin, cout), 1)?;
        let bias = if opts.bias {
            Some(vb.param("bias", &[cout], Init::Const(0.0))?)
        } else {
            None
        };
        let sn = if opts.spectral_norm {
            Some(SpectralNorm::new(cout, vb.pp("sn"))?)
        } else {
            None
        };
        Ok(Self { weight, bias, sn })
    }

    /// x: (B, in) -> (B, out)
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let weight = pass.param(&self.weight);
        let w = match &self.sn {
            Some(sn) => sn.apply(&weight, &weight, pass.updates_sn())?,
            None => weight,
        };
        pass.count(x.elem_count() * w.dim(0)?);
        linear(
            x,
            &w,
            self.bias.as_ref().map(|b| pass.param(b)).as_ref(),
            pass.grad,
        )
    }
}

/// Batch normalisation over (B, H, W) per channel; accepts (B, C) or (B, C, H, W).
/// Train mode uses batch statistics and updates the running ones (momentum 0.1, unbiased
/// running variance, as PyTorch); eval mode uses the running statistics. Train mode runs the
/// fused op of [`crate::kernels::fused_bn`] (affine part included), exact under double backward.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Var,
    running_var: Var,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    /// `affine`: learn gamma and beta (gamma initialised as DCGAN does, N(1, 0.02)).
    pub fn new(c: usize, affine: bool, vb: Vb) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.param(
                    "weight",
                    &[c],
                    Init::Normal {
                        mean: 1.0,
                        std: 0.02,
                    },
                )?),
                Some(vb.param("bias", &[c], Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            running_mean: vb.buffer("running_mean", &[c], Init::Const(0.0))?,
            running_var: vb.buffer("running_var", &[c], Init::Const(1.0))?,
        })
    }

    /// Normalised input without the affine part; shape (B, C, H, W).
    fn normalize(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let c = x.dim(1)?;
        if pass.train {
            self.train_forward(x, None, None, None, pass)
        } else {
            let mean = self.running_mean.as_tensor().reshape((1, c, 1, 1))?;
            let std = self
                .running_var
                .as_tensor()
                .affine(1.0, BN_EPS)?
                .sqrt()?
                .reshape((1, c, 1, 1))?;
            Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
        }
    }

    /// Train mode: the fused batch-norm op (batch statistics, with the affine part and the
    /// activation when given; exact under double backward), then the running-statistics
    /// update, or the statistics handed to the pass's standing accumulator.
    fn train_forward(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        act: Option<LeakyRelu>,
        pass: Pass,
    ) -> Result<Tensor> {
        let c = x.dim(1)?;
        let n = x.elem_count() / c;
        let (y, mean, var) =
            crate::kernels::fused_bn::batch_norm_train_act(x, gamma, beta, BN_EPS, act, pass.grad)?;
        if let Some(acc) = pass.standing {
            acc.add(&self.running_mean, &self.running_var, &mean, &var, n)?;
            return Ok(y);
        }
        let unbias = if n > 1 {
            n as f64 / (n - 1) as f64
        } else {
            1.0
        };
        let rm = self.running_mean.as_tensor();
        let rv = self.running_var.as_tensor();
        let new_rm = (rm.affine(1.0 - BN_MOMENTUM, 0.0)? + mean.affine(BN_MOMENTUM, 0.0)?)?;
        let new_rv =
            (rv.affine(1.0 - BN_MOMENTUM, 0.0)? + var.affine(BN_MOMENTUM * unbias, 0.0)?)?;
        self.running_mean.set(&new_rm)?;
        self.running_var.set(&new_rv)?;
        Ok(y)
    }

    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.forward_act(x, pass, None)
    }

    /// `act(self.forward(x))` for a (leaky) ReLU `act`; in train mode with the affine part,
    /// one fused op (see [`crate::kernels::fused_bn::batch_norm_train_act`]).
    pub fn forward_act(&self, x: &Tensor, pass: Pass, act: Option<LeakyRelu>) -> Result<Tensor> {
        let train = pass.train;
        let dims = x.dims().to_vec();
        let x4 = if dims.len() == 2 {
            x.reshape((dims[0], dims[1], 1, 1))?
        } else {
            x.clone()
        };
        let (weight, bias) = (
            self.weight.as_ref().map(|t| pass.param(t)),
            self.bias.as_ref().map(|t| pass.param(t)),
        );
        let y = match (&weight, &bias) {
            // The affine part and the activation fused into the op.
            (Some(w), Some(b)) if train => {
                return Ok(self
                    .train_forward(&x4, Some(w), Some(b), act, pass)?
                    .reshape(dims)?);
            }
            (Some(w), Some(b)) => self
                .normalize(&x4, pass)?
                .broadcast_mul(&w.reshape((1, (), 1, 1))?)?
                .broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            _ => self.normalize(&x4, pass)?,
        };
        let y = y.reshape(dims)?;
        match act {
            Some(a) => a.apply(&y),
            None => Ok(y),
        }
    }
}

/// Standing statistics (Brock, Donahue & Simonyan, "Large Scale GAN Training for High
/// Fidelity Natural Image Synthesis", ICLR 2019, appendix: a generator's BatchNorm statistics
/// re-estimated for the weights that are sampled, here the EMA average, whose running
/// statistics are an average of other weights' batches). A train-mode pass carrying it
/// ([`Pass::standing`]) hands every BatchNorm call's batch mean and variance here (a layer
/// called several times in a pass adds each call); [`StandingStats::apply`] then writes each
/// layer's statistics over every row it saw (pooled exactly: the mean of the means and the
/// variance of all rows together, unbiased as PyTorch keeps it) into its running statistics.
#[derive(Debug, Default)]
pub struct StandingStats {
    layers: std::sync::Mutex<Vec<StandingLayer>>,
}

#[derive(Debug)]
struct StandingLayer {
    running_mean: Var,
    running_var: Var,
    /// Rows seen (B * H * W per call).
    n: f64,
    /// Per channel: the sum of x and of x^2 over those rows.
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl StandingStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// One BatchNorm call: its batch `mean` and biased `var` over `n` rows per channel.
    fn add(
        &self,
        running_mean: &Var,
        running_var: &Var,
        mean: &Tensor,
        var: &Tensor,
        n: usize,
    ) -> Result<()> {
        let m: Vec<f64> = mean.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let v: Vec<f64> = var.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let id = running_mean.as_tensor().id();
        let at = match layers
            .iter()
            .position(|l| l.running_mean.as_tensor().id() == id)
        {
            Some(i) => i,
            None => {
                layers.push(StandingLayer {
                    running_mean: running_mean.clone(),
                    running_var: running_var.clone(),
                    n: 0.0,
                    sum: vec![0.0; m.len()],
                    sum_sq: vec![0.0; m.len()],
                });
                layers.len() - 1
            }
        };
        let l = &mut layers[at];
        let nf = n as f64;
        l.n += nf;
        for (c, (mu, var)) in m.iter().zip(&v).enumerate() {
            l.sum[c] += nf * mu;
            l.sum_sq[c] += nf * (var + mu * mu);
        }
        Ok(())
    }

    /// BatchNorm layers that saw at least one call.
    pub fn layers(&self) -> usize {
        self.layers.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Write every layer's pooled statistics into its running mean and variance; returns the
    /// number of layers written. An error, with nothing written, if any statistic is not
    /// finite.
    pub fn apply(&self) -> Result<usize> {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(layers.len());
        for l in layers.iter() {
            let mean: Vec<f64> = l.sum.iter().map(|s| s / l.n).collect();
            let unbias = if l.n > 1.0 { l.n / (l.n - 1.0) } else { 1.0 };
            let var: Vec<f64> = l
                .sum_sq
                .iter()
                .zip(&mean)
                .map(|(sq, mu)| (sq / l.n - mu * mu).max(0.0) * unbias)
                .collect();
            if mean.iter().chain(&var).any(|v| !v.is_finite()) {
                return Err(crate::error::Error::Msg(
                    "standing statistics: a BatchNorm layer saw non-finite values; nothing \
                     was written"
                        .into(),
                ));
            }
            out.push((mean, var));
        }
        for (l, (mean, var)) in layers.iter().zip(out) {
            for (v, vals) in [(&l.running_mean, mean), (&l.running_var, var)] {
                let t = v.as_tensor();
                let new = Tensor::from_vec(vals, t.dims(), t.device())?.to_dtype(t.dtype())?;
                v.set(&new)?;
            }
        }
        Ok(layers.len())
    }
}

/// Conditional BatchNorm: gamma = 1 + W_g c, beta = W_b c (no bias), on top of an
/// affine-free BatchNorm. With K = 0 it is an ordinary affine BatchNorm.
#[derive(Debug, Clone)]
pub struct CondBatchNorm {
    bn: BatchNorm,
    gamma: Option<Linear>,
    beta: Option<Linear>,
}

impl CondBatchNorm {
    pub fn new(c: usize, k: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        if k == 0 {
            return Ok(Self {
                bn: BatchNorm::new(c, true, vb.pp("bn"))?,
                gamma: None,
                beta: None,
            });
        }
        let lin = LayerOpts {
            bias: false,
            ..opts
        };
        Ok(Self {
            bn: BatchNorm::new(c, false, vb.pp("bn"))?,
            gamma: Some(Linear::new(k, c, lin, vb.pp("gamma"))?),
            beta: Some(Linear::new(k, c, lin, vb.pp("beta"))?),
        })
    }

    /// x: (B, C, H, W), cond: (B, K)
    pub fn forward(&self, x: &Tensor, cond: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = self.bn.forward(x, pass)?;
        match (&self.gamma, &self.beta) {
            (Some(g), Some(b)) => {
                let gamma = g.forward(cond, pass)?.affine(1.0, 1.0)?; // (B, C)
                let beta = b.forward(cond, pass)?; // (B, C)
                Ok(crate::kernels::fused_bn::cond_affine(
                    &y, &gamma, &beta, pass.grad,
                )?)
            }
            _ => Ok(y),
        }
    }
}

/// Minibatch standard deviation (Karras et al., "Progressive Growing of GANs for Improved
/// Quality, Stability, and Variation", ICLR 2018, section 3): the batch is split into groups
/// of 4 samples (the whole batch when 4 does not divide it; member j of a group is sample
/// `g * (B / G) + j` as in the paper's reshape), each feature's standard deviation is taken
/// within the group, averaged over features, and appended as one constant feature map.
/// x: (B, C, H, W) -> (B, C + 1, H, W). Basic ops only: differentiable to any order.
pub fn minibatch_std(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if b == 0 {
        return Ok(Tensor::zeros((0, c + 1, h, w), x.dtype(), x.device())?);
    }
    let g = if b % 4 == 0 { 4 } else { b };
    let m = b / g;
    let xg = x.reshape((g, m, c, h, w))?;
    let mean = xg.mean_keepdim(0)?;
    let var = xg.broadcast_sub(&mean)?.sqr()?.mean(0)?; // (m, C, H, W)
    let sd = var.affine(1.0, 1e-8)?.sqrt()?.flatten_from(1)?.mean(1)?; // (m,)
    let sd = sd.reshape((1, m, 1, 1, 1))?.repeat((g, 1, 1, 1, 1))?; // (G, m, 1, 1, 1)
    let plane = sd.reshape((b, 1, 1, 1))?.broadcast_as((b, 1, h, w))?;
    Ok(Tensor::cat(&[x, &plane.contiguous()?], 1)?)
}

/// Layer normalisation over (C, H, W) of each sample with a per-channel affine, written from
/// basic ops (differentiable twice; the usual critic norm under WGAN-GP, where BatchNorm
/// would couple the samples the penalty treats independently).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(c: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.param("weight", &[c], Init::Const(1.0))?,
            bias: vb.param("bias", &[c], Init::Const(0.0))?,
        })
    }

    /// x: (B, C, H, W). Only `pass.frozen` matters (no statistics are kept).
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mean = x.mean_keepdim((1, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((1, 2, 3))?;
        let y = xc.broadcast_div(&var.affine(1.0, BN_EPS)?.sqrt()?)?;
        Ok(
            y.broadcast_mul(&pass.param(&self.weight).reshape((1, (), 1, 1))?)?
                .broadcast_add(&pass.param(&self.bias).reshape((1, (), 1, 1))?)?,
        )
    }
}

/// Self-attention over spatial positions (SAGAN): y = x + gamma * o, gamma starting at 0.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    query: Conv2d,
    key: Conv2d,
    value: Conv2d,
    out: Conv2d,
    gamma: Tensor,
}

impl SelfAttention {
    pub fn new(c: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        let ck = (c / 8).max(1);
        let cv = (c / 2).max(1);
        let o = LayerOpts {
            bias: false,
            ..opts
        };
        Ok(Self {
            query: Conv2d::new(c, ck, 1, 1, 0, o, vb.pp("query"))?,
            key: Conv2d::new(c, ck, 1, 1, 0, o, vb.pp("key"))?,
            value: Conv2d::new(c, cv, 1, 1, 0, o, vb.pp("value"))?,
            out: Conv2d::new(cv, c, 1, 1, 0, o, vb.pp("out"))?,
            gamma: vb.param("gamma", &[1], Init::Const(0.0))?,
        })
    }

    /// x: (B, C, H, W)
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let n = h * w;
        let q = self.query.forward(x, pass)?.reshape((b, (), n))?; // (B, Ck, N)
        let k = self.key.forward(x, pass)?.reshape((b, (), n))?; // (B, Ck, N)
        let v = self.value.forward(x, pass)?.reshape((b, (), n))?; // (B, Cv, N)
        let o = crate::kernels::attention::attention(&q, &k, &v, pass.grad)?; // (B, Cv, N)
        pass.count(b * n * n * (q.dim(1)? + v.dim(1)?));
        let o = self.out.forward(&o.reshape((b, (), h, w))?, pass)?; // (B, C, H, W)
        Ok(x.add(&o.broadcast_mul(&pass.param(&self.gamma))?)?)
    }
}

/// Stable log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok((pos + tail)?)
}

/// Stable binary cross-entropy with logits, mean over all entries:
/// max(x, 0) - x t + log(1 + exp(-|x|)).
pub fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    Ok((softplus(x)? - (x * t)?)?.mean_all()?)
}

/// ACGAN auxiliary loss (the GAN's auxiliary head and the evaluator's training share it): BCE over labels for multi-hot conditions, softmax cross-entropy for
/// one-hot ones. logits, target: (B, K).
pub fn aux_loss(kind: ConditionKind, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        ConditionKind::OneHot => {
            let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
            (logp * target)?.sum(D::Minus1)?.mean_all()?.neg()?
        }
        _ => bce_with_logits(logits, target)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minibatch_std_by_hand_and_by_finite_differences() {
        use candle_core::Var;
        let dev = Device::Cpu;
        // B = 2 (not divisible by 4: one group), C = 1, 1x2 maps: x0 = (0, 2), x1 = (2, 2).
        // Per-feature population std with 1e-8 inside the sqrt: (1.000000005, 1e-4), mean
        // 0.50005; the plane is the same for both samples.
        let x = Tensor::new(&[[[[0.0f64, 2.0]]], [[[2.0, 2.0]]]], &dev).unwrap();
        let y = minibatch_std(&x).unwrap();
        assert_eq!(y.dims(), &[2, 2, 1, 2]);
        let v: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        let want = ((1.0f64 + 1e-8).sqrt() + 1e-4) / 2.0;
        for i in [2, 3, 6, 7] {
            assert!((v[i] - want).abs() < 1e-9, "{v:?}");
        }
        assert_eq!((&v[..2], &v[4..6]), (&[0.0, 2.0][..], &[2.0, 2.0][..]));
        // B = 8: groups of 4 with members g * 2 + j; the two group columns get their own std.
        let x = Tensor::from_vec(
            (0..8 * 3 * 2 * 2)
                .map(|i| ((i * 29) % 17) as f64 / 7.0)
                .collect::<Vec<_>>(),
            (8, 3, 2, 2),
            &dev,
        )
        .unwrap();
        let r = Tensor::from_vec(
            (0..8 * 4 * 2 * 2)
                .map(|i| ((i * 11) % 5) as f64 - 2.0)
                .collect::<Vec<_>>(),
            (8, 4, 2, 2),
            &dev,
        )
        .unwrap();
        let f = |x: &Tensor| -> f64 {
            (minibatch_std(x).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let var = Var::from_tensor(&x).unwrap();
        let g = (minibatch_std(var.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f64> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..base.len()).step_by(7) {
            let t = |d: f64| {
                let mut p = base.clone();
                p[i] += d;
                Tensor::from_vec(p, (8, 3, 2, 2), &dev).unwrap()
            };
            let fd = (f(&t(1e-5)) - f(&t(-1e-5))) / 2e-5;
            assert!((fd - g[i]).abs() < 1e-6, "{i}: {fd} vs {}", g[i]);
        }
        // Identical samples give a std plane of (almost) zero.
        let same = Tensor::ones((4, 2, 2, 2), DType::F64, &dev).unwrap();
        let s: f64 = minibatch_std(&same)
            .unwrap()
            .narrow(1, 2, 1)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(s < 1e-3, "{s}");
    }
    use crate::kernels::ops::leaky_relu;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};

    fn random(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// max |a - b| / max(|b|, 1e-30) over all entries (0 when both are all zero).
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
        let s = b.abs().unwrap().max(0).unwrap();
        let (d, s) = (d.to_scalar::<f64>().unwrap(), s.to_scalar::<f64>().unwrap());
        if d == 0.0 { 0.0 } else { d / s.max(1e-30) }
    }

    /// A small network (conv, train-mode BatchNorm, linear) and its store.
    struct Net {
        store: crate::params::ParamStore,
        conv: Conv2d,
        bn: BatchNorm,
        lin: Linear,
        x0: Tensor,
    }

    impl Net {
        fn new() -> Self {
            let store = crate::params::ParamStore::new(Rng::new(3), DType::F32, &Device::Cpu);
            let vb = store.root("d");
            let opts = LayerOpts {
                bias: true,
                spectral_norm: false,
                init: WeightInit::Dcgan,
            };
            let conv = Conv2d::new(3, 4, 3, 1, 1, opts, vb.pp("conv")).unwrap();
            let bn = BatchNorm::new(4, true, vb.pp("bn")).unwrap();
            let lin = Linear::new(4 * 5 * 5, 2, opts, vb.pp("lin")).unwrap();
            let x0 = random(&mut Rng::new(5), &[2, 3, 5, 5]);
            Self {
                store,
                conv,
                bn,
                lin,
                x0,
            }
        }

        /// The input's gradient of sum(y^2) after a pass, and how many parameters got one.
        fn run(&self, pass: Pass) -> (Tensor, usize) {
            let x = Var::from_tensor(&self.x0).unwrap();
            let h = self.conv.forward(x.as_tensor(), pass).unwrap();
            let h = leaky_relu(&self.bn.forward(&h, pass).unwrap()).unwrap();
            let y = self.lin.forward(&h.flatten_from(1).unwrap(), pass).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let n_param_grads = self
                .store
                .trainable()
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .count();
            (grads.get(x.as_tensor()).unwrap().clone(), n_param_grads)
        }
    }

    /// Inside a first-order backward of the pass's mode (a training step's update), the
    /// layers' gradients come back as plain values: no recorded op, so none of them holds the
    /// gradients before it alive (`GradMode::settle`). The values are those of an ordinary
    /// backward, which keeps the graph (the tests run with candle's graphs kept, as the
    /// binary does) so that gradients of gradients stay exact.
    #[test]
    fn a_first_order_backward_returns_plain_gradients() {
        let net = Net::new();
        let convt_store = crate::params::ParamStore::new(Rng::new(4), DType::F32, &Device::Cpu);
        let opts = LayerOpts {
            bias: true,
            spectral_norm: false,
            init: WeightInit::Dcgan,
        };
        let convt = ConvTranspose2d::new(3, 3, 4, 2, 1, opts, convt_store.root("t")).unwrap();
        let x = Var::from_tensor(&random(&mut Rng::new(8), &[2, 3, 3, 3])).unwrap();
        let params: Vec<Var> = net
            .store
            .trainable()
            .into_iter()
            .chain(convt_store.trainable())
            .map(|(_, v)| v)
            .collect();
        let grads = |first_order: bool| {
            let mode = GradMode::new();
            let pass = Pass::train().with_grad(&mode);
            // (2, 3, 3, 3) -> transposed conv (2, 3, 6, 6) -> conv (2, 4, 6, 6) -> 5x5 crop
            // -> BatchNorm + leaky ReLU -> linear (2, 2).
            let h = convt.forward(x.as_tensor(), pass).unwrap();
            let h = net.conv.forward(&h, pass).unwrap();
            let h = h.narrow(2, 0, 5).unwrap().narrow(3, 0, 5).unwrap();
            let h = net
                .bn
                .forward_act(&h, pass, Some(LeakyRelu::LEAKY))
                .unwrap();
            let y = net.lin.forward(&h.flatten_from(1).unwrap(), pass).unwrap();
            let loss = y.sqr().unwrap().sum_all().unwrap();
            let store = if first_order {
                crate::grad::first_order_backward(&loss, &mode).unwrap()
            } else {
                loss.backward().unwrap()
            };
            std::iter::once(x.as_tensor())
                .chain(params.iter().map(Var::as_tensor))
                .map(|t| store.get(t).unwrap().clone())
                .collect::<Vec<_>>()
        };
        let (plain, graph) = (grads(true), grads(false));
        assert_eq!(plain.len(), 1 + 2 + 2 + 2 + 2);
        for (i, (p, g)) in plain.iter().zip(&graph).enumerate() {
            assert!(
                !p.track_op(),
                "gradient {i} of the first-order backward has a graph"
            );
            assert_eq!(rel_err(p, g), 0.0, "gradient {i}");
        }
        // The ordinary backward kept its graph: the input's and the first layer's gradients
        // depend on every layer after them.
        assert!(graph[0].track_op());
    }

    /// A frozen pass gives the input the same gradient and the parameters none.
    #[test]
    fn frozen_params_keep_input_gradients() {
        let net = Net::new();
        let (g_free, n_free) = net.run(Pass::train());
        let (g_frozen, n_frozen) = net.run(Pass::train().frozen());
        assert_eq!(n_free, net.store.trainable().len());
        assert_eq!(n_frozen, 0);
        assert!(rel_err(&g_frozen, &g_free) < 1e-6);
    }

    /// Whether a pass is frozen travels with the pass, not with the thread: on a rayon worker
    /// ([`crate::on_pool_worker`], from a thread outside any pool, as the trainer's and the
    /// CLI's), and with a frozen and a trainable pass running at once on the pool's threads,
    /// each gets its own.
    #[test]
    fn frozen_state_travels_with_the_pass() {
        let net = Net::new();
        let all = net.store.trainable().len();
        std::thread::spawn(move || {
            let on_worker = |pass: Pass| {
                crate::on_pool_worker(|| {
                    assert!(rayon::current_thread_index().is_some());
                    net.run(pass).1
                })
            };
            assert_eq!(on_worker(Pass::train()), all);
            assert_eq!(on_worker(Pass::train().frozen()), 0);
            let (a, b) = crate::on_pool_worker(|| {
                rayon::join(
                    || net.run(Pass::train().frozen()).1,
                    || net.run(Pass::train()).1,
                )
            });
            assert_eq!((a, b), (0, all));
        })
        .join()
        .unwrap();
    }

    /// A counting pass adds the documented FLOPs of each layer (`2 B O OH OW C K K` for a
    /// conv, `2 B Cin H W Cout K K` for a transposed conv, `2 B in out` for a linear layer,
    /// `2 B N N (Ck + Cv)` for attention plus its four 1x1 convs); a pass without the counter
    /// adds nothing to it.
    #[test]
    fn flop_counter_counts_the_hand_formula() {
        let store = crate::params::ParamStore::new(Rng::new(4), DType::F32, &Device::Cpu);
        let vb = store.root("f");
        let opts = LayerOpts {
            bias: true,
            spectral_norm: true,
            init: WeightInit::Dcgan,
        };
        let mut rng = Rng::new(6);
        let (b, c, h, w) = (2usize, 3usize, 8usize, 8usize);
        let x = random(&mut rng, &[b, c, h, w]);
        let count = |f: &dyn Fn(Pass)| {
            let counter = FlopCounter::new();
            f(Pass::train().counting(&counter));
            f(Pass::eval());
            counter.get()
        };
        // Conv 3 -> 5, k4 s2 p1: 4x4 output.
        let conv = Conv2d::new(c, 5, 4, 2, 1, opts, vb.pp("conv")).unwrap();
        let want = (2 * b * 5 * 4 * 4 * c * 4 * 4) as f64;
        assert_eq!(count(&|p| drop(conv.forward(&x, p).unwrap())), want);
        let act = LeakyRelu::LEAKY;
        assert_eq!(
            count(&|p| drop(conv.forward_act(&x, p, act).unwrap())),
            want
        );
        // Transposed conv 3 -> 6, k4 s2 p1, on the 8x8 input.
        let convt = ConvTranspose2d::new(c, 6, 4, 2, 1, opts, vb.pp("convt")).unwrap();
        let want = (2 * b * c * h * w * 6 * 4 * 4) as f64;
        assert_eq!(count(&|p| drop(convt.forward(&x, p).unwrap())), want);
        // Linear (B, C H W) -> 7.
        let lin = Linear::new(c * h * w, 7, opts, vb.pp("lin")).unwrap();
        let xf = x.flatten_from(1).unwrap();
        let want = (2 * b * c * h * w * 7) as f64;
        assert_eq!(count(&|p| drop(lin.forward(&xf, p).unwrap())), want);
        // Self-attention on 16 channels: Ck = 2, Cv = 8, N = 64.
        let xa = random(&mut rng, &[b, 16, h, w]);
        let att = SelfAttention::new(16, opts, vb.pp("att")).unwrap();
        let n = h * w;
        let convs = 2 * b * n * (16 * 2 + 16 * 2 + 16 * 8 + 8 * 16);
        let want = (convs + 2 * b * n * n * (2 + 8)) as f64;
        assert_eq!(count(&|p| drop(att.forward(&xa, p).unwrap())), want);
    }

    /// Standing statistics pool every call exactly: two batches through a BatchNorm (one of
    /// them twice, as a layer called twice in one pass) give the running statistics of all
    /// rows together, by hand: channel 0 sees 1, 3 | 5, 7 | 5, 7, mean 14/3, variance
    /// (sum of x^2 = 158) 158/6 - (14/3)^2 = 41/9 biased, 41/9 * 6/5 = 82/15 unbiased. The
    /// pass changes nothing until `apply`, and a spectral-norm vector is never refined.
    #[test]
    fn standing_statistics_pool_every_call_and_change_nothing_before_apply() {
        let store = crate::params::ParamStore::new(Rng::new(3), DType::F64, &Device::Cpu);
        let vb = store.root("g");
        let bn = BatchNorm::new(2, true, vb.pp("bn")).unwrap();
        let opts = LayerOpts {
            bias: false,
            spectral_norm: true,
            init: WeightInit::Dcgan,
        };
        let lin = Linear::new(2, 2, opts, vb.pp("lin")).unwrap();
        let before = |name: &str| -> Vec<f64> {
            store
                .get(name)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let u0 = before("g.lin.sn.u");
        let dev = Device::Cpu;
        // (B, C) rows: channel 1 is channel 0 times -2.
        let a = Tensor::new(&[[1.0f64, -2.0], [3.0, -6.0]], &dev).unwrap();
        let b = Tensor::new(&[[5.0f64, -10.0], [7.0, -14.0]], &dev).unwrap();
        let acc = StandingStats::new();
        let pass = Pass::train().standing(&acc);
        for x in [&a, &b, &b] {
            let y = bn.forward(x, pass).unwrap();
            lin.forward(&y, pass).unwrap();
        }
        assert_eq!(before("g.bn.running_mean"), vec![0.0, 0.0]);
        assert_eq!(before("g.bn.running_var"), vec![1.0, 1.0]);
        assert_eq!(acc.layers(), 1);
        assert_eq!(acc.apply().unwrap(), 1);
        let (m, v) = (before("g.bn.running_mean"), before("g.bn.running_var"));
        let want_m = [14.0 / 3.0, -28.0 / 3.0];
        let want_v = [82.0 / 15.0, 4.0 * 82.0 / 15.0];
        for c in 0..2 {
            assert!((m[c] - want_m[c]).abs() < 1e-12, "{m:?}");
            assert!((v[c] - want_v[c]).abs() < 1e-12, "{v:?}");
        }
        assert_eq!(before("g.lin.sn.u"), u0);
        // An ordinary train pass still refines u and moves the running statistics.
        let y = bn.forward(&a, Pass::train()).unwrap();
        lin.forward(&y, Pass::train()).unwrap();
        assert_ne!(before("g.lin.sn.u"), u0);
        assert_ne!(before("g.bn.running_mean"), m);
    }

    /// Nothing is written when a layer saw a non-finite value.
    #[test]
    fn standing_statistics_refuse_non_finite_values() {
        let store = crate::params::ParamStore::new(Rng::new(3), DType::F64, &Device::Cpu);
        let bn = BatchNorm::new(1, true, store.root("g").pp("bn")).unwrap();
        let acc = StandingStats::new();
        let x = Tensor::new(&[[1.0f64], [f64::INFINITY]], &Device::Cpu).unwrap();
        bn.forward(&x, Pass::train().standing(&acc)).unwrap();
        assert!(acc.apply().is_err());
        let m: Vec<f64> = store
            .get("g.bn.running_mean")
            .unwrap()
            .as_tensor()
            .to_vec1()
            .unwrap();
        assert_eq!(m, vec![0.0]);
    }
}
