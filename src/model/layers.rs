//! Building blocks shared by every network family: convolutions, linear layers, BatchNorm
//! (plain and conditional), layer norm, spectral normalisation, self-attention, resampling.
//!
//! Every op here is built from candle primitives that have a backward which is itself
//! differentiable (checked against finite differences in `tests/gradient_penalty.rs`), so any
//! of these layers can sit under a gradient penalty. Deliberately avoided: `candle_nn::LayerNorm`,
//! `softmax_last_dim`, `rms_norm` (no backward in candle 0.11).
//!
//! Spectral normalisation: Miyato et al., "Spectral Normalization for Generative Adversarial
//! Networks", ICLR 2018. Self-attention: Zhang et al., "Self-Attention Generative Adversarial
//! Networks", ICML 2019. Conditional BatchNorm: de Vries et al. 2017 / Miyato & Koyama 2018.

use std::cell::Cell;

use candle_core::{D, Tensor, Var};

use crate::error::Result;
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
    #[allow(clippy::too_many_arguments)]
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

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let w = match &self.sn {
            Some(sn) => {
                let o = self.weight.dim(0)?;
                sn.apply(&self.weight, &self.weight.reshape((o, ()))?, train)?
            }
            None => self.weight.clone(),
        };
        let y = crate::model::conv::conv2d(x, &w, self.stride, self.padding)?; // (B, O, H', W')
        count_flops(y.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        })
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
    #[allow(clippy::too_many_arguments)]
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
        let w = match &self.sn {
            Some(sn) => {
                // PyTorch normalises ConvTranspose along dim 1 (output channels).
                let o = self.weight.dim(1)?;
                let w_mat = self
                    .weight
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((o, ()))?;
                sn.apply(&self.weight, &w_mat, train)?
            }
            None => self.weight.clone(),
        };
        let y = crate::model::conv::conv_transpose2d(x, &w, self.stride, self.padding)?; // (B, O, H', W')
        count_flops(x.elem_count() * w.elem_count() / w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
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
        let w = match &self.sn {
            Some(sn) => sn.apply(&self.weight, &self.weight, train)?,
            None => self.weight.clone(),
        };
        let y = x.matmul(&w.t()?)?;
        count_flops(x.elem_count() * w.dim(0)?);
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Batch normalisation over (B, H, W) per channel; accepts (B, C) or (B, C, H, W).
/// Train mode uses batch statistics and updates the running ones (momentum 0.1, unbiased
/// running variance, as PyTorch); eval mode uses the running statistics. Train mode runs the
/// fused op of [`crate::model::fused_bn`] (affine part included), exact under double backward.
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
            self.train_forward(x, None, None)
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

    /// Train mode: the fused batch-norm op (batch statistics, with the affine part when
    /// given; exact under double backward), then the running-statistics update.
    fn train_forward(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = x.dim(1)?;
        let n = x.elem_count() / c;
        let (y, mean, var) = crate::model::fused_bn::batch_norm_train(x, gamma, beta, BN_EPS)?;
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
        let dims = x.dims().to_vec();
        let x4 = if dims.len() == 2 {
            x.reshape((dims[0], dims[1], 1, 1))?
        } else {
            x.clone()
        };
        let y = match (&self.weight, &self.bias) {
            // The affine part fused into the op.
            (Some(w), Some(b)) if train => self.train_forward(&x4, Some(w), Some(b))?,
            (Some(w), Some(b)) => self
                .normalize(&x4, train)?
                .broadcast_mul(&w.reshape((1, (), 1, 1))?)?
                .broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            _ => self.normalize(&x4, train)?,
        };
        Ok(y.reshape(dims)?)
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
                let gamma = g
                    .forward(cond, train)?
                    .affine(1.0, 1.0)?
                    .unsqueeze(2)?
                    .unsqueeze(3)?;
                let beta = b.forward(cond, train)?.unsqueeze(2)?.unsqueeze(3)?;
                Ok(y.broadcast_mul(&gamma)?.broadcast_add(&beta)?)
            }
            _ => Ok(y),
        }
    }
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
        Ok(y.broadcast_mul(&self.weight.reshape((1, (), 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
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
        let logits = q.transpose(1, 2)?.contiguous()?.matmul(&k)?; // (B, N, N)
        let attn = candle_nn::ops::softmax(&logits, D::Minus1)?; // rows sum to 1
        let o = v.matmul(&attn.transpose(1, 2)?.contiguous()?)?; // (B, Cv, N)
        count_flops(b * n * n * (q.dim(1)? + v.dim(1)?));
        let o = self.out.forward(&o.reshape((b, (), h, w))?, train)?; // (B, C, H, W)
        Ok(x.add(&o.broadcast_mul(&self.gamma)?)?)
    }
}

/// Leaky ReLU with slope 0.2 for negative inputs, as max(x, 0.2 x).
pub fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&x.affine(0.2, 0.0)?)?)
}

/// Nearest-neighbour 2x upsampling from reshape + broadcast (differentiable twice).
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// 2x2 average pooling with stride 2 (H and W must be even).
pub fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.mean(5)?.mean(3)?)
}

/// Stable log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok((pos + tail)?)
}
