//! Layers shared by every network family: convolutions, linear layers, BatchNorm (plain and
//! conditional), layer norm, spectral normalisation, self-attention, minibatch standard
//! deviation, weight initialisation, and the frozen-parameter state of a pass
//! ([`with_frozen_params`]). The arithmetic runs in [`crate::kernels`] (custom ops and their
//! candle fallbacks); activations and resampling are called from there directly
//! ([`crate::kernels::ops`]).
//!
//! Every op used here is built from candle primitives that have a backward which is itself
//! differentiable (checked against finite differences in `tests/gradient_penalty.rs`), so any
//! of these layers can sit under a gradient penalty. Deliberately avoided: `candle_nn::LayerNorm`,
//! `softmax_last_dim`, `rms_norm` (no backward in candle 0.11).
//!
//! Spectral normalisation: Miyato et al., "Spectral Normalization for Generative Adversarial
//! Networks", ICLR 2018. Self-attention: Zhang et al., "Self-Attention Generative Adversarial
//! Networks", ICML 2019. Conditional BatchNorm: de Vries et al. 2017 / Miyato & Koyama 2018.

use std::cell::Cell;

use candle_core::{D, Tensor, Var};

use crate::config::ConditionKind;
use crate::error::Result;
use crate::kernels::ops::{LeakyRelu, add_channel_bias, linear};
use crate::params::{Init, Vb};

thread_local! {
    static FORWARD_FLOPS: Cell<f64> = const { Cell::new(0.0) };
}

/// Floating-point operations of the forward passes run on this thread since the last
/// [`reset_forward_flops`]: 2 per multiply-accumulate of every convolution, transposed
/// convolution, linear layer and attention product (`2 B O OH OW C K K` for a conv,
/// `2 B Cin H W Cout K K` for a transposed conv, `2 B in out` for a linear layer). Normalisation,
/// activations, biases and spectral-norm power iterations are not counted. For benchmarks.
pub fn forward_flops() -> f64 {
    FORWARD_FLOPS.with(|c| c.get())
}

/// Set the counter of [`forward_flops`] to zero.
pub fn reset_forward_flops() {
    FORWARD_FLOPS.with(|c| c.set(0.0));
}

thread_local! {
    static FROZEN: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the parameters of every layer of this module read as constants: a pass
/// made inside gives gradients for its input (and for anything upstream of it) but none for
/// those parameters, which saves their weight gradients in a backward that only needs the
/// input's (the generator step through the discriminator). Values, batch statistics,
/// running statistics and spectral-norm updates are as without it; gradients that are computed
/// are unchanged.
pub fn with_frozen_params<R>(f: impl FnOnce() -> R) -> R {
    with_frozen_state(true, f)
}

/// Whether this thread is inside [`with_frozen_params`].
pub fn params_frozen() -> bool {
    FROZEN.with(|c| c.get())
}

/// Run `f` with the frozen state of this thread set to `frozen`, restored afterwards (also
/// on panic). [`crate::on_pool_worker`] uses it to carry the caller's state to the worker,
/// and to keep a worker's own state out of a job that the worker picks up while it waits.
pub fn with_frozen_state<R>(frozen: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FROZEN.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FROZEN.with(|c| c.replace(frozen)));
    f()
}

/// A layer's parameter as a pass should see it (detached inside [`with_frozen_params`]).
fn param(t: &Tensor) -> Tensor {
    if FROZEN.with(|c| c.get()) {
        t.detach()
    } else {
        t.clone()
    }
}

fn count_flops(f: usize) {
    FORWARD_FLOPS.with(|c| c.set(c.get() + 2.0 * f as f64));
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
        let weight = vb.param(
            "weight",
            &[cout, cin, k, k],
            opts.init.init(cin * k * k, cout * k * k),
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
    fn kernel(&self, train: bool) -> Result<Tensor> {
        let weight = param(&self.weight);
        Ok(match &self.sn {
            Some(sn) => {
                let o = weight.dim(0)?;
                sn.apply(&weight, &weight.reshape((o, ()))?, train)?
            }
            None => weight,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let w = self.kernel(train)?;
        let y = crate::kernels::conv::conv2d(x, &w, self.stride, self.padding)?; // (B, O, H', W')
        count_flops(y.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => add_channel_bias(&y, &param(b))?,
            None => y,
        })
    }

    /// `act(self.forward(x))`; without a bias, one fused op
    /// ([`crate::kernels::conv::conv2d_act`]).
    pub fn forward_act(&self, x: &Tensor, train: bool, act: LeakyRelu) -> Result<Tensor> {
        if self.bias.is_some() {
            return act.apply(&self.forward(x, train)?);
        }
        let w = self.kernel(train)?;
        let y = crate::kernels::conv::conv2d_act(x, &w, self.stride, self.padding, act)?;
        count_flops(y.elem_count() * w.elem_count() / w.dim(0)?);
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
        let weight = vb.param(
            "weight",
            &[cin, cout, k, k],
            opts.init.init(cout * k * k, cin * k * k),
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

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let weight = param(&self.weight);
        let w = match &self.sn {
            Some(sn) => {
                // PyTorch normalises ConvTranspose along dim 1 (output channels).
                let o = weight.dim(1)?;
                let w_mat = weight.transpose(0, 1)?.contiguous()?.reshape((o, ()))?;
                sn.apply(&weight, &w_mat, train)?
            }
            None => weight,
        };
        let y = crate::kernels::conv::conv_transpose2d(x, &w, self.stride, self.padding)?; // (B, O, H', W')
        count_flops(x.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => add_channel_bias(&y, &param(b))?,
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
        let weight = vb.param("weight", &[cout, cin], opts.init.init(cin, cout))?;
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
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let weight = param(&self.weight);
        let w = match &self.sn {
            Some(sn) => sn.apply(&weight, &weight, train)?,
            None => weight,
        };
        count_flops(x.elem_count() * w.dim(0)?);
        linear(x, &w, self.bias.as_ref().map(param).as_ref())
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
    fn normalize(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        if train {
            self.train_forward(x, None, None, None)
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
    /// update.
    fn train_forward(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        act: Option<LeakyRelu>,
    ) -> Result<Tensor> {
        let c = x.dim(1)?;
        let n = x.elem_count() / c;
        let (y, mean, var) =
            crate::kernels::fused_bn::batch_norm_train_act(x, gamma, beta, BN_EPS, act)?;
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

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, None)
    }

    /// `act(self.forward(x))` for a (leaky) ReLU `act`; in train mode with the affine part,
    /// one fused op (see [`crate::kernels::fused_bn::batch_norm_train_act`]).
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Option<LeakyRelu>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let x4 = if dims.len() == 2 {
            x.reshape((dims[0], dims[1], 1, 1))?
        } else {
            x.clone()
        };
        let (weight, bias) = (
            self.weight.as_ref().map(param),
            self.bias.as_ref().map(param),
        );
        let y = match (&weight, &bias) {
            // The affine part and the activation fused into the op.
            (Some(w), Some(b)) if train => {
                return Ok(self
                    .train_forward(&x4, Some(w), Some(b), act)?
                    .reshape(dims)?);
            }
            (Some(w), Some(b)) => self
                .normalize(&x4, train)?
                .broadcast_mul(&w.reshape((1, (), 1, 1))?)?
                .broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            _ => self.normalize(&x4, train)?,
        };
        let y = y.reshape(dims)?;
        match act {
            Some(a) => a.apply(&y),
            None => Ok(y),
        }
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
    pub fn forward(&self, x: &Tensor, cond: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn.forward(x, train)?;
        match (&self.gamma, &self.beta) {
            (Some(g), Some(b)) => {
                let gamma = g.forward(cond, train)?.affine(1.0, 1.0)?; // (B, C)
                let beta = b.forward(cond, train)?; // (B, C)
                Ok(crate::kernels::fused_bn::cond_affine(&y, &gamma, &beta)?)
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

    /// x: (B, C, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim((1, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((1, 2, 3))?;
        let y = xc.broadcast_div(&var.affine(1.0, BN_EPS)?.sqrt()?)?;
        Ok(
            y.broadcast_mul(&param(&self.weight).reshape((1, (), 1, 1))?)?
                .broadcast_add(&param(&self.bias).reshape((1, (), 1, 1))?)?,
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
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let n = h * w;
        let q = self.query.forward(x, train)?.reshape((b, (), n))?; // (B, Ck, N)
        let k = self.key.forward(x, train)?.reshape((b, (), n))?; // (B, Ck, N)
        let v = self.value.forward(x, train)?.reshape((b, (), n))?; // (B, Cv, N)
        let o = crate::kernels::attention::attention(&q, &k, &v)?; // (B, Cv, N)
        count_flops(b * n * n * (q.dim(1)? + v.dim(1)?));
        let o = self.out.forward(&o.reshape((b, (), h, w))?, train)?; // (B, C, H, W)
        Ok(x.add(&o.broadcast_mul(&param(&self.gamma))?)?)
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

    /// Inside `with_frozen_params` a layer gives its input the same gradient and its
    /// parameters none.
    /// [`crate::on_pool_worker`] runs its closure on a rayon worker with the caller's frozen
    /// state, on and off, and leaves the caller's state as it was.
    #[test]
    fn pool_worker_carries_the_frozen_state() {
        // A thread outside any pool, as the trainer's and the CLI's.
        std::thread::spawn(|| {
            let probe = || (params_frozen(), rayon::current_thread_index().is_some());
            assert_eq!(crate::on_pool_worker(probe), (false, true));
            assert_eq!(
                with_frozen_params(|| crate::on_pool_worker(probe)),
                (true, true)
            );
            assert!(!params_frozen());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn frozen_params_keep_input_gradients() {
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
        let mut rng = Rng::new(5);
        let x0 = random(&mut rng, &[2, 3, 5, 5]);
        let run = |frozen: bool| {
            let x = Var::from_tensor(&x0).unwrap();
            let f = || -> Result<Tensor> {
                let h = leaky_relu(&bn.forward(&conv.forward(x.as_tensor(), true)?, true)?)?;
                lin.forward(&h.flatten_from(1)?, true)
            };
            let y = if frozen { with_frozen_params(f) } else { f() }.unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let n_param_grads = store
                .trainable()
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .count();
            (grads.get(x.as_tensor()).unwrap().clone(), n_param_grads)
        };
        let (g_free, n_free) = run(false);
        let (g_frozen, n_frozen) = run(true);
        assert_eq!(n_free, store.trainable().len());
        assert_eq!(n_frozen, 0);
        assert!(rel_err(&g_frozen, &g_free) < 1e-6);
    }
}
