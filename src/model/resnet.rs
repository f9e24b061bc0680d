//! Residual generator and discriminator for the projection and SAGAN family.
//!
//! - Miyato & Koyama, "cGANs with Projection Discriminator", ICLR 2018 (ResNet G with
//!   conditional BatchNorm, D with an inner-product projection of the condition);
//! - Miyato et al., "Spectral Normalization for GANs", ICLR 2018 (SN, ResNet blocks);
//! - Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019 (attention,
//!   SN in G as well, TTUR, hinge loss).

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::ops::{LeakyRelu, avg_pool2, relu, upsample2};
use crate::model::{
    AuxBranch, CondPlane, DOut, Projection, attend_after, aux_head_opts, base_size, has_aux_head,
    num_resamples,
};
use crate::nn::{
    BatchNorm, CondBatchNorm, Conv2d, LayerOpts, Linear, Pass, SelfAttention, WeightInit,
    minibatch_std,
};
use crate::params::Vb;

/// G block: cBN -> ReLU -> up -> conv3x3 -> cBN -> ReLU -> conv3x3, plus up -> conv1x1 shortcut.
#[derive(Debug, Clone)]
pub struct ResBlockUp {
    bn1: CondBatchNorm,
    conv1: Conv2d,
    bn2: CondBatchNorm,
    conv2: Conv2d,
    shortcut: Conv2d,
}

impl ResBlockUp {
    fn new(cin: usize, cout: usize, k: usize, opts: LayerOpts, vb: Vb) -> Result<Self> {
        Ok(Self {
            bn1: CondBatchNorm::new(cin, k, opts, vb.pp("bn1"))?,
            conv1: Conv2d::new(cin, cout, 3, 1, 1, opts, vb.pp("conv1"))?,
            bn2: CondBatchNorm::new(cout, k, opts, vb.pp("bn2"))?,
            conv2: Conv2d::new(cout, cout, 3, 1, 1, opts, vb.pp("conv2"))?,
            shortcut: Conv2d::new(cin, cout, 1, 1, 0, opts, vb.pp("shortcut"))?,
        })
    }

    /// x: (B, Cin, H, W) -> (B, Cout, 2H, 2W)
    fn forward(&self, x: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = upsample2(&relu(&self.bn1.forward(x, c, pass)?)?)?;
        let h = self.conv1.forward(&h, pass)?;
        let h = self
            .conv2
            .forward(&relu(&self.bn2.forward(&h, c, pass)?)?, pass)?;
        let s = self.shortcut.forward(&upsample2(x)?, pass)?;
        Ok((h + s)?)
    }
}

#[derive(Debug, Clone)]
pub struct ResnetGenerator {
    /// z -> (C0, s0, s0)
    input: Linear,
    blocks: Vec<ResBlockUp>,
    attention: Option<(usize, SelfAttention)>,
    out_bn: BatchNorm,
    /// conv3x3 to the image channels, then tanh.
    out: Conv2d,
    c0: usize,
    s0: usize,
}

/// Channel width at a level: base * min(8, 2^(n - level)).
fn width(base: usize, n: usize, level: usize) -> usize {
    base * (1usize << (n - level).min(3))
}

impl ResnetGenerator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let opts = LayerOpts {
            bias: true,
            spectral_norm: cfg.g_spectral_norm,
            init: WeightInit::Xavier,
        };
        let s0 = base_size(cfg.image_size);
        let n = num_resamples(cfg.image_size);
        let ch = |level: usize| width(cfg.g_ch, n, level);
        let k = cfg.num_conditions;
        let input = Linear::new(cfg.z_dim, ch(0) * s0 * s0, opts, vb.pp("input"))?;
        let mut blocks = Vec::new();
        let mut attention = None;
        for level in 1..=n {
            blocks.push(ResBlockUp::new(
                ch(level - 1),
                ch(level),
                k,
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
        Ok(Self {
            input,
            blocks,
            attention,
            out_bn: BatchNorm::new(ch(n), true, vb.pp("out_bn"))?,
            out: Conv2d::new(ch(n), cfg.channels, 3, 1, 1, opts, vb.pp("out"))?,
            c0: ch(0),
            s0,
        })
    }

    /// z: (B, Z), c: (B, K) -> (B, C, H, W) in [-1, 1]
    /// The first feature layer's output in eval mode, flattened: (B, C0 * s0 * s0).
    pub fn first_features(&self, z: &Tensor) -> Result<Tensor> {
        self.input.forward(z, Pass::eval())
    }

    pub fn forward(&self, z: &Tensor, c: &Tensor, pass: Pass) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut h = self
            .input
            .forward(z, pass)?
            .reshape((b, self.c0, self.s0, self.s0))?; // (B, C0, s0, s0)
        for (i, blk) in self.blocks.iter().enumerate() {
            h = blk.forward(&h, c, pass)?;
            h = attend_after(&self.attention, i, h, pass)?;
        }
        let h = self.out_bn.forward_act(&h, pass, Some(LeakyRelu::RELU))?;
        Ok(self.out.forward(&h, pass)?.tanh()?)
    }
}

/// D block: [ReLU] -> conv3x3 -> ReLU -> conv3x3 -> [avgpool], plus a (conv1x1, avgpool)
/// shortcut. The first block ("optimised block" of SNGAN) has no leading ReLU and pools the
/// input before its shortcut conv.
#[derive(Debug, Clone)]
pub struct ResBlockDown {
    conv1: Conv2d,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    down: bool,
    first: bool,
}

impl ResBlockDown {
    fn new(
        cin: usize,
        cout: usize,
        down: bool,
        first: bool,
        opts: LayerOpts,
        vb: Vb,
    ) -> Result<Self> {
        let shortcut = if cin != cout || down {
            Some(Conv2d::new(cin, cout, 1, 1, 0, opts, vb.pp("shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            conv1: Conv2d::new(cin, cout, 3, 1, 1, opts, vb.pp("conv1"))?,
            conv2: Conv2d::new(cout, cout, 3, 1, 1, opts, vb.pp("conv2"))?,
            shortcut,
            down,
            first,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = if self.first { x.clone() } else { relu(x)? };
        let h = relu(&self.conv1.forward(&h, pass)?)?;
        let mut h = self.conv2.forward(&h, pass)?;
        if self.down {
            h = avg_pool2(&h)?;
        }
        let s = match (&self.shortcut, self.first) {
            (Some(sc), true) => sc.forward(&avg_pool2(x)?, pass)?,
            (Some(sc), false) => {
                let s = sc.forward(x, pass)?;
                if self.down { avg_pool2(&s)? } else { s }
            }
            (None, _) => x.clone(),
        };
        Ok((h + s)?)
    }
}

#[derive(Debug, Clone)]
pub struct ResnetDiscriminator {
    cond_plane: Option<CondPlane>,
    blocks: Vec<ResBlockDown>,
    attention: Option<(usize, SelfAttention)>,
    /// Pooled features -> one logit.
    linear: Linear,
    /// Projection: K -> C, inner product with the pooled features.
    embed: Option<Projection>,
    /// ACGAN: pooled features -> K logits.
    aux: Option<Linear>,
    /// `model.aux_branch`: the auxiliary logits from a classifier of their own instead.
    aux_branch: Option<AuxBranch>,
    /// Minibatch standard deviation appended after the blocks (one more feature map).
    minibatch_std: bool,
}

impl ResnetDiscriminator {
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let opts = LayerOpts {
            bias: true,
            spectral_norm: cfg.d_spectral_norm,
            init: WeightInit::Xavier,
        };
        let n = num_resamples(cfg.image_size);
        let ch = |level: usize| cfg.d_ch * (1usize << level.min(3));
        let k = cfg.num_conditions;
        let cond_plane = CondPlane::maybe_new(cfg, opts, vb.pp("cond_plane"))?;
        let mut cin = cfg.channels + usize::from(cond_plane.is_some());
        let mut blocks = Vec::new();
        let mut attention = None;
        // n downsampling blocks, then one at the base resolution.
        for level in 0..=n {
            let down = level < n;
            let cout = ch(level.min(n - 1));
            blocks.push(ResBlockDown::new(
                cin,
                cout,
                down,
                level == 0,
                opts,
                vb.pp("blocks").pp(level),
            )?);
            cin = cout;
            if down && cfg.attention == Some(cfg.image_size >> (level + 1)) {
                attention = Some((level, SelfAttention::new(cin, opts, vb.pp("attention"))?));
            }
        }
        let cin = cin + usize::from(cfg.minibatch_std);
        let embed = Projection::maybe_new(cfg, cin, opts, vb.pp("embed"))?;
        let aux_branch = AuxBranch::maybe_new(cfg, cfg.channels, vb.pp("aux_branch"))?;
        let aux = if has_aux_head(cfg) && aux_branch.is_none() {
            Some(Linear::new(cin, k, aux_head_opts(cfg, opts), vb.pp("aux"))?)
        } else {
            None
        };
        Ok(Self {
            cond_plane,
            blocks,
            attention,
            linear: Linear::new(cin, 1, opts, vb.pp("linear"))?,
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
            Some(p) => p.concat(x, c, pass)?,
            None => x.clone(),
        };
        for (i, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h, pass)?;
            h = attend_after(&self.attention, i, h, pass)?;
        }
        if self.minibatch_std {
            h = minibatch_std(&h)?;
        }
        let phi = relu(&h)?.sum((2, 3))?; // (B, C)
        let mut logits = self.linear.forward(&phi, pass)?.squeeze(1)?; // (B,)
        if let Some(e) = &self.embed {
            logits = e.add(&logits, &phi, c, pass)?;
        }
        let aux = match &self.aux {
            Some(a) => Some(a.forward(&phi, pass)?),
            None => branch,
        };
        Ok(DOut { logits, aux })
    }
}
