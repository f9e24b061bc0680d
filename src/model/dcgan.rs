//! DCGAN generator and discriminator (Radford, Metz & Chintala, "Unsupervised Representation
//! Learning with Deep Convolutional Generative Adversarial Networks", ICLR 2016), with the
//! conditioning variants of the course reports: c concatenated to z in G; in D an extra input
//! plane, an auxiliary classifier head (ACGAN, Odena et al. 2017) or a projection term.
//!
//! Sizes: 64 -> feature maps 4, 8, 16, 32; 32 -> 4, 8, 16; 28 -> 7, 14.

use candle_core::Tensor;

use crate::config::{DNorm, ModelConfig};
use crate::error::Result;
use crate::kernels::ops::{LeakyRelu, leaky_relu, relu};
use crate::model::{
    AuxBranch, CondPlane, DOut, Projection, attend_after, aux_head_opts, base_size, has_aux_head,
    num_resamples,
};
use crate::nn::{
    BatchNorm, CondBatchNorm, Conv2d, ConvTranspose2d, LayerNorm, LayerOpts, Linear, Pass,
    SelfAttention, WeightInit, minibatch_std,
};
use crate::params::Vb;

/// G's BatchNorm + ReLU: plain, or conditional (`g_cond_bn`: gain and bias from c).
#[derive(Debug, Clone)]
pub enum GenNorm {
    Plain(BatchNorm),
    Cond(CondBatchNorm),
}

impl GenNorm {
    fn new(cfg: &ModelConfig, c: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        Ok(if cfg.g_cond_bn && cfg.num_conditions > 0 {
            let opts = LayerOpts {
                init: WeightInit::Embedding,
                ..opts
            };
            GenNorm::Cond(CondBatchNorm::new(c, cfg.num_conditions, opts, vb)?)
        } else {
            GenNorm::Plain(BatchNorm::new(c, true, vb)?)
        })
    }

    /// ReLU(norm(x)); c: (B, K).
    fn forward_relu(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        match self {
            GenNorm::Plain(bn) => bn.forward_act(x, pass, Some(LeakyRelu::RELU)),
            GenNorm::Cond(cbn) => relu(&cbn.forward(x, c, pass)?),
        }
    }
}

/// One upsampling stage of G: ConvT(k4, s2, p1) -> BN -> ReLU.
#[derive(Debug, Clone)]
pub struct GenBlock {
    conv: ConvTranspose2d,
    bn: GenNorm,
}

impl GenBlock {
    fn new(cfg: &ModelConfig, cin: usize, cout: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        Ok(Self {
            conv: ConvTranspose2d::new(cin, cout, 4, 2, 1, opts, vb.pp("conv"))?,
            bn: GenNorm::new(cfg, cout, opts, vb.pp("bn"))?,
        })
    }

    fn forward(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        self.bn.forward_relu(&self.conv.forward(x, pass)?, c, pass)
    }
}

#[derive(Debug, Clone)]
pub struct DcganGenerator {
    /// K -> cond_embed, concatenated to z.
    cond_embed: Option<Linear>,
    /// (z + e, 1, 1) -> (C0, s0, s0): a ConvT with kernel s0.
    input: ConvTranspose2d,
    input_bn: GenNorm,
    blocks: Vec<GenBlock>,
    /// Self-attention after the block whose output has side `attention`.
    attention: Option<(usize, SelfAttention)>,
    /// Last ConvT to the image channels, then tanh.
    out: ConvTranspose2d,
}

impl DcganGenerator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let opts = LayerOpts {
            bias: false,
            spectral_norm: cfg.g_spectral_norm,
            init: WeightInit::Dcgan,
        };
        let s0 = base_size(cfg.image_size);
        let n_up = num_resamples(cfg.image_size);
        let ch = |level: usize| cfg.g_ch << (n_up - 1 - level); // level 0 .. n_up-1
        let k = cfg.num_conditions;
        let cond_embed = if k > 0 {
            Some(Linear::new(
                k,
                cfg.cond_embed,
                LayerOpts {
                    bias: true,
                    init: WeightInit::Embedding,
                    ..opts
                },
                vb.pp("cond_embed"),
            )?)
        } else {
            None
        };
        let zin = cfg.z_dim + if k > 0 { cfg.cond_embed } else { 0 };
        let input = ConvTranspose2d::new(zin, ch(0), s0, 1, 0, opts, vb.pp("input"))?;
        let input_bn = GenNorm::new(cfg, ch(0), opts, vb.pp("input_bn"))?;
        let mut blocks = Vec::new();
        let mut attention = None;
        for level in 1..n_up {
            blocks.push(GenBlock::new(
                cfg,
                ch(level - 1),
                ch(level),
                opts,
                vb.pp("blocks").pp(level - 1),
            )?);
            if cfg.attention == Some(s0 << level) {
                attention = Some((
                    level - 1,
                    SelfAttention::new(ch(level), opts, vb.pp("attention"))?,
                ));
            }
        }
        let out = ConvTranspose2d::new(ch(n_up - 1), cfg.channels, 4, 2, 1, opts, vb.pp("out"))?;
        Ok(Self {
            cond_embed,
            input,
            input_bn,
            blocks,
            attention,
            out,
        })
    }

    /// z: (B, Z), c: (B, K) -> (B, C, H, W) in [-1, 1]
    /// The first feature layer's output in eval mode, flattened: (B, C0 * s0 * s0).
    pub fn first_features(&self, z: &Tensor, c: &Tensor) -> Result<Tensor> {
        let zc = match &self.cond_embed {
            Some(l) => Tensor::cat(&[z, &l.forward(c, Pass::eval())?], 1)?, // (B, Z + E)
            None => z.clone(),
        };
        let x = zc.unsqueeze(2)?.unsqueeze(3)?; // (B, Z + E, 1, 1)
        let h =
            self.input_bn
                .forward_relu(&self.input.forward(&x, Pass::eval())?, c, Pass::eval())?; // (B, C0, s0, s0)
        Ok(h.flatten_from(1)?)
    }

    pub fn forward(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        Ok(self.forward_raw(z, c, pass)?.tanh()?)
    }

    /// The output before tanh, (B, C, H, W).
    pub fn forward_raw(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let zc = match &self.cond_embed {
            Some(l) => Tensor::cat(&[z, &l.forward(c, pass)?], 1)?, // (B, Z + E)
            None => z.clone(),
        };
        let x = zc.unsqueeze(2)?.unsqueeze(3)?; // (B, Z + E, 1, 1)
        let mut h = self
            .input_bn
            .forward_relu(&self.input.forward(&x, pass)?, c, pass)?; // (B, C0, s0, s0)
        for (i, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h, c, pass)?;
            h = attend_after(&self.attention, i, h, pass)?;
        }
        self.out.forward(&h, pass) // (B, C, H, W)
    }
}

/// The normalisation of a discriminator block.
#[derive(Debug, Clone)]
pub enum Norm {
    Batch(BatchNorm),
    Layer(LayerNorm),
    None,
}

impl Norm {
    fn new(kind: DNorm, c: usize, vb: Vb) -> Result<Self> {
        Ok(match kind {
            DNorm::Batch => Norm::Batch(BatchNorm::new(c, true, vb)?),
            DNorm::Layer => Norm::Layer(LayerNorm::new(c, vb)?),
            DNorm::None => Norm::None,
        })
    }

    /// The normalisation followed by a leaky ReLU (fused with a BatchNorm).
    fn forward_leaky(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match self {
            Norm::Batch(b) => b.forward_act(x, pass, Some(LeakyRelu::LEAKY)),
            Norm::Layer(l) => leaky_relu(&l.forward(x, pass)?),
            Norm::None => leaky_relu(x),
        }
    }
}

/// One downsampling stage of D: Conv(k4, s2, p1) -> norm -> LeakyReLU(0.2).
#[derive(Debug, Clone)]
pub struct DiscBlock {
    conv: Conv2d,
    norm: Norm,
}

impl DiscBlock {
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match self.norm {
            // The activation fused into the convolution (when it has no bias).
            Norm::None => self.conv.forward_act(x, pass, LeakyRelu::LEAKY),
            _ => self.norm.forward_leaky(&self.conv.forward(x, pass)?, pass),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DcganDiscriminator {
    cond_plane: Option<CondPlane>,
    /// `model.d_stem`: Conv(k3, s1, p1) -> LeakyReLU(0.2) at full resolution.
    stem: Option<DiscBlock>,
    blocks: Vec<DiscBlock>,
    attention: Option<(usize, SelfAttention)>,
    /// Conv with kernel s0 to one logit.
    out: Conv2d,
    /// Projection: K -> C_last, inner product with the spatially summed features.
    embed: Option<Projection>,
    /// ACGAN: flattened features -> K logits.
    aux: Option<Linear>,
    /// `model.aux_branch`: the auxiliary logits from a classifier of their own instead.
    aux_branch: Option<AuxBranch>,
    /// Minibatch standard deviation appended before `out` (one more feature map).
    minibatch_std: bool,
}

impl DcganDiscriminator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let opts = LayerOpts {
            bias: cfg.d_norm == DNorm::None,
            spectral_norm: cfg.d_spectral_norm,
            init: WeightInit::Dcgan,
        };
        let s0 = base_size(cfg.image_size);
        let n_down = num_resamples(cfg.image_size);
        let ch = |level: usize| cfg.d_ch << level;
        let k = cfg.num_conditions;
        let cond_plane = CondPlane::maybe_new(cfg, opts, vb.pp("cond_plane"))?;
        let mut cin = cfg.channels + usize::from(cond_plane.is_some());
        let stem = if cfg.d_stem {
            let conv = Conv2d::new(cin, cfg.d_ch, 3, 1, 1, opts, vb.pp("stem").pp("conv"))?;
            cin = cfg.d_ch;
            Some(DiscBlock {
                conv,
                norm: Norm::None,
            })
        } else {
            None
        };
        let mut blocks = Vec::new();
        let mut attention = None;
        for level in 0..n_down {
            let vbb = vb.pp("blocks").pp(level);
            let conv = Conv2d::new(cin, ch(level), 4, 2, 1, opts, vbb.pp("conv"))?;
            let norm = if level == 0 {
                Norm::None
            } else {
                Norm::new(cfg.d_norm, ch(level), vbb.pp("norm"))?
            };
            blocks.push(DiscBlock { conv, norm });
            cin = ch(level);
            if cfg.attention == Some(cfg.image_size >> (level + 1)) {
                attention = Some((level, SelfAttention::new(cin, opts, vb.pp("attention"))?));
            }
        }
        let cin = cin + usize::from(cfg.minibatch_std);
        let out = Conv2d::new(cin, 1, s0, 1, 0, opts, vb.pp("out"))?;
        let embed = Projection::maybe_new(cfg, cin, opts, vb.pp("embed"))?;
        let aux_branch = AuxBranch::maybe_new(cfg, cfg.channels, vb.pp("aux_branch"))?;
        let aux = if has_aux_head(cfg) && aux_branch.is_none() {
            Some(Linear::new(
                cin * s0 * s0,
                k,
                LayerOpts {
                    bias: true,
                    ..aux_head_opts(cfg, opts)
                },
                vb.pp("aux"),
            )?)
        } else {
            None
        };
        Ok(Self {
            cond_plane,
            stem,
            blocks,
            attention,
            out,
            embed,
            aux,
            aux_branch,
            minibatch_std: cfg.minibatch_std,
        })
    }

    /// x: (B, C, H, W), c: (B, K); `branch`: run `model.aux_branch` (if there is one).
    pub fn forward(&self, x: &Tensor, c: &Tensor, pass: Pass, branch: bool) -> Result<DOut> {
        let branch = match &self.aux_branch {
            Some(b) if branch => Some(b.forward(x, pass)?), // (B, K)
            _ => None,
        };
        let mut h = match &self.cond_plane {
            Some(p) => p.concat(x, c, pass)?, // (B, C + 1, H, W)
            None => x.clone(),
        };
        if let Some(s) = &self.stem {
            h = s.forward(&h, pass)?; // (B, d_ch, H, W)
        }
        for (i, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h, pass)?;
            h = attend_after(&self.attention, i, h, pass)?;
        }
        if self.minibatch_std {
            h = minibatch_std(&h)?;
        }
        // h: (B, C_last, s0, s0)
        let mut logits = self.out.forward(&h, pass)?.flatten_all()?; // (B,)
        if let Some(e) = &self.embed {
            logits = e.add(&logits, &h.sum((2, 3))?, c, pass)?; // phi: (B, C_last)
        }
        let aux = match &self.aux {
            Some(a) => Some(a.forward(&h.flatten_from(1)?, pass)?), // (B, K)
            None => branch,
        };
        Ok(DOut { logits, aux })
    }
}
