//! Convolutions off the CPU as one batched matrix product over an im2col built from views:
//! the GPU path of [`super::conv`].
//!
//! candle 0.11 runs conv2d on CUDA as im2col + cuBLAS, but conv_transpose2d as a direct kernel
//! (one thread per output element looping over input channels and taps), and candle's backward
//! of every conv2d computes its input gradient with that kernel. On an H200 a dcgan64 training
//! step took 55.8 ms against PyTorch's 6.2 (session 23, `bench/RESULTS.md`). Here both are
//! written with candle tensor ops only (pad, reshape, permute, narrow, stack, matmul), so
//! candle's autograd differentiates them to any order and every FLOP lands in one gemm:
//!
//! - **space-to-depth**: a stride-s convolution with a K x K kernel equals a stride-1
//!   convolution with a k' x k' kernel (k' = ceil(K / s)) over the C s^2 channels of the input
//!   cut into s x s cells (Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution
//!   Using an Efficient Sub-Pixel Convolutional Neural Network", the periodic shuffle). The
//!   kernel is padded with zeros to k' s taps where s does not divide K.
//! - **im2col from views**: the k'^2 taps of that stride-1 convolution are narrowed views of
//!   the shuffled input (channels first: (C, B, H, W)), stacked into the columns
//!   (k'^2 C s^2, B OH OW) in one copy, and multiplied by the reordered weight
//!   (O, k'^2 C s^2): one 2-D gemm forward and one for each gradient.
//! - **transposed convolution as sub-pixel convolution**: output pixel q = i s + a s + r
//!   (kernel tap a s + r) of the uncropped output is a stride-1 "full" correlation of the input
//!   with the taps of phase r, so the s^2 output phases are the output channels of one
//!   stride-1 convolution (no zeros inserted between input pixels, no wasted products); a
//!   depth-to-space shuffle and a crop of the padding give the output.
//!
//! Values equal candle's ops up to the summation order (tests below against candle's CPU
//! ops, first- and second-order gradients included). Selected by [`super::conv`] off the CPU;
//! `GANSCOPE_CONV=candle` keeps candle's own ops there (to compare), `GANSCOPE_CONV=gemm`
//! uses this path on the CPU too (to time or test it without a GPU).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, D, Layout, MetalStorage, Result, Shape, Storage, Tensor, bail,
};

/// Which implementation [`super::conv`] runs, from `GANSCOPE_CONV` (read once):
/// `auto` (default: the CPU kernels on the CPU, this module elsewhere), `gemm` (this module
/// everywhere) or `candle` (candle's own ops everywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvImpl {
    Auto,
    Gemm,
    Candle,
}

impl ConvImpl {
    /// The choice of this process (`GANSCOPE_CONV`; an unknown value is reported once on
    /// stderr and read as `auto`).
    pub fn current() -> Self {
        static CHOICE: std::sync::OnceLock<ConvImpl> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("GANSCOPE_CONV") {
            Err(_) => Self::Auto,
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => Self::Auto,
                "gemm" => Self::Gemm,
                "candle" => Self::Candle,
                other => {
                    eprintln!(
                        "GANSCOPE_CONV={other:?} is not one of auto, gemm, candle: using auto"
                    );
                    Self::Auto
                }
            },
        })
    }
}

/// `x` (C, B, H, W), channels first, cut into s x s cells as channels:
/// (C s s, B, H / s, W / s), channel c s^2 + r_h s + r_w holding pixel (i s + r_h, j s + r_w)
/// at (i, j). H and W are multiples of s.
fn space_to_depth(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (c, b, h, w) = x.dims4()?;
    x.reshape((c, b, h / s, s, w / s, s))?
        .permute((0, 3, 5, 1, 2, 4))?
        .contiguous()?
        .reshape((c * s * s, b, h / s, w / s))
}

/// Pads (or crops, where `after` is negative) dimension `dim` to `before` zeros + itself +
/// `after` zeros.
fn pad_or_crop(x: &Tensor, dim: usize, before: usize, after: isize) -> Result<Tensor> {
    let x = if after < 0 {
        let n = x.dim(dim)?;
        let cut = after.unsigned_abs();
        if cut > n {
            bail!("conv: crop of {cut} from a dimension of {n}");
        }
        x.narrow(dim, 0, n - cut)?
    } else {
        x.clone()
    };
    let after = after.max(0) as usize;
    if before == 0 && after == 0 {
        Ok(x)
    } else {
        x.pad_with_zeros(dim, before, after)
    }
}

/// The columns of a stride-1 convolution with a k x k kernel over `x` (C, B, H, W), channels
/// first: the matrix (k k C, B oh ow), row (a_h k + a_w) C + c holding x[c, b, i + off(a_h),
/// j + off(a_w)] in column (b, i, j), with off(a) = a, or k - 1 - a where `flip` (the taps in
/// reverse order). The taps are stacked along the first dimension: one strided copy each into
/// the contiguous result. The batch sits in the columns, so the product with the weight is one 2-D
/// gemm and so are both of its gradients (a batched product with a broadcast weight would
/// build the weight gradient per image first: B times the weight's size).
fn columns(x: &Tensor, k: usize, oh: usize, ow: usize, flip: bool) -> Result<Tensor> {
    let (c, b, _, _) = x.dims4()?;
    if k == 1 {
        return x
            .narrow(2, 0, oh)?
            .narrow(3, 0, ow)?
            .contiguous()?
            .reshape((c, b * oh * ow));
    }
    let off = |a: usize| if flip { k - 1 - a } else { a };
    let mut taps = Vec::with_capacity(k * k);
    for ah in 0..k {
        let row = x.narrow(2, off(ah), oh)?;
        for aw in 0..k {
            taps.push(row.narrow(3, off(aw), ow)?);
        }
    }
    Tensor::stack(&taps, 0)?.reshape((k * k * c, b * oh * ow))
}

/// A (.., K, K) kernel padded with zeros after its taps to (.., k s, k s), k = ceil(K / s).
fn pad_kernel(w: &Tensor, s: usize) -> Result<(Tensor, usize)> {
    let kk = w.dim(D::Minus1)?;
    let k = kk.div_ceil(s);
    let extra = k * s - kk;
    if extra == 0 {
        return Ok((w.clone(), k));
    }
    let w = w.pad_with_zeros(2, 0, extra)?.pad_with_zeros(3, 0, extra)?;
    Ok((w, k))
}

// The three composites below may return strided views: their caller, [`forward_on`], copies
// the result into fresh contiguous storage anyway.

/// Output size of a convolution over `n` pixels (padding p each side, kernel k, stride s).
fn out_size(n: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if s == 0 || n + 2 * p < k {
        bail!("conv: kernel {k} with stride {s} does not fit {n} pixels padded by {p}");
    }
    Ok((n + 2 * p - k) / s + 1)
}

/// The columns of a stride-s convolution with a k x k kernel over `x` (B, C, H, W) for an
/// output of oh x ow: (kp^2 C s^2, B oh ow), kp = ceil(k / s), rows ordered (a_h, a_w, c,
/// r_h, r_w) for kernel tap (a_h s + r_h, a_w s + r_w).
fn conv_columns(x: &Tensor, s: usize, p: usize, k: usize, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let kp = k.div_ceil(s);
    // Rows 0 .. (oh + kp - 1) s of the padded input are read: pad or crop the bottom to that.
    let hn = (oh + kp - 1) * s;
    let wn = (ow + kp - 1) * s;
    let x = x.transpose(0, 1)?;
    let x = pad_or_crop(&x, 2, p, hn as isize - (h + p) as isize)?;
    let x = pad_or_crop(&x, 3, p, wn as isize - (wd + p) as isize)?;
    columns(&space_to_depth(&x.contiguous()?, s)?, kp, oh, ow, false)
}

/// 2-D convolution, x (B, C, H, W), w (O, C, K, K) -> (B, O, OH, OW) with
/// OH = (H + 2 p - K) / s + 1: the same as `x.conv2d(w, p, s, 1, 1)`.
pub fn conv2d(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 || kh != kw {
        bail!("conv2d: input {:?} and kernel {:?}", x.dims(), w.dims());
    }
    let oh = out_size(h, kh, s, p)?;
    let ow = out_size(wd, kw, s, p)?;
    if b * c * o == 0 {
        return Tensor::zeros((b, o, oh, ow), x.dtype(), x.device());
    }
    let cols = conv_columns(x, s, p, kh, oh, ow)?;
    let (w, k) = pad_kernel(w, s)?;
    // Kernel tap a s + r sits at tap a of phase r: (O, C, a_h, r_h, a_w, r_w) ->
    // (O, a_h, a_w, C, r_h, r_w), the order of the columns' rows.
    let w = w
        .reshape((o, c, k, s, k, s))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((o, c * s * s * k * k))?;
    w.matmul(&cols)?.reshape((o, b, oh, ow))?.transpose(0, 1)
}

/// The gradient of conv2d(x, w) with respect to its k x k weight w (O, C, k, k), given
/// g = d loss / d output (B, O, OH, OW): dw[o, c, kh, kw] = sum over b, i, j of
/// g[b, o, i, j] x[b, c, i s - p + kh, j s - p + kw], one gemm of g with the columns of x.
pub fn conv2d_weight_grad(x: &Tensor, g: &Tensor, s: usize, p: usize, k: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (b2, o, oh, ow) = g.dims4()?;
    if b != b2 || oh != out_size(h, k, s, p)? || ow != out_size(wd, k, s, p)? {
        bail!(
            "conv2d weight gradient: input {:?} and output gradient {:?} (k {k}, s {s}, p {p})",
            x.dims(),
            g.dims()
        );
    }
    if b * c * o == 0 {
        return Tensor::zeros((o, c, k, k), x.dtype(), x.device());
    }
    let kp = k.div_ceil(s);
    let cols = conv_columns(x, s, p, k, oh, ow)?;
    let g = g.transpose(0, 1)?.contiguous()?.reshape((o, b * oh * ow))?;
    // Rows (a_h, a_w, c, r_h, r_w) back to the kernel's (c, a_h, r_h, a_w, r_w), then the
    // taps past k (zeros padding the kernel) dropped.
    g.matmul(&cols.t()?)?
        .reshape((o, kp, kp, c, s, s))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((o, c, kp * s, kp * s))?
        .narrow(2, 0, k)?
        .narrow(3, 0, k)
}

/// 2-D transposed convolution, x (B, Ci, H, W), w (Ci, Co, K, K) -> (B, Co, OH, OW) with
/// OH = (H - 1) s - 2 p + K + op.0 and OW likewise with op.1 (output padding): the same as
/// `x.conv_transpose2d(w, p, op, s, 1)`.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    s: usize,
    p: usize,
    op: (usize, usize),
) -> Result<Tensor> {
    let (b, ci, h, wd) = x.dims4()?;
    let (ci2, co, kh, kw) = w.dims4()?;
    if ci != ci2 || kh != kw || s == 0 {
        bail!(
            "conv_transpose2d: input {:?} and kernel {:?}, stride {s}",
            x.dims(),
            w.dims()
        );
    }
    let size = |n: usize, op: usize| match (n * s + kh + op).checked_sub(s + 2 * p) {
        Some(m) if n > 0 && m > 0 => Ok(m),
        _ => bail!(
            "conv_transpose2d: padding {p} leaves no output for {:?}",
            x.dims()
        ),
    };
    let oh = size(h, op.0)?;
    let ow = size(wd, op.1)?;
    if b * ci * co == 0 {
        return Tensor::zeros((b, co, oh, ow), x.dtype(), x.device());
    }
    let (w, k) = pad_kernel(w, s)?;
    // Uncropped output row q = (i + a) s + r gets x[i] w[a s + r]: with Q = q / s, phase r is
    // sum_a x[Q - a] w[a s + r], a full correlation over x padded by k - 1 on both sides.
    let qh = h + k - 1;
    let qw = wd + k - 1;
    let xt = x.transpose(0, 1)?;
    let xp = if k > 1 {
        xt.pad_with_zeros(2, k - 1, k - 1)?
            .pad_with_zeros(3, k - 1, k - 1)?
    } else {
        xt.contiguous()?
    };
    let cols = columns(&xp, k, qh, qw, true)?;
    // (Ci, Co, a_h, r_h, a_w, r_w) -> (Co, r_h, r_w, a_h, a_w, Ci).
    let w = w
        .reshape((ci, co, k, s, k, s))?
        .permute((1, 3, 5, 2, 4, 0))?
        .contiguous()?
        .reshape((co * s * s, ci * k * k))?;
    // Depth to space: (Co, r_h, r_w, B, Q_h, Q_w) -> (B, Co, Q_h, r_h, Q_w, r_w).
    let full = w
        .matmul(&cols)?
        .reshape((co, s, s, b, qh, qw))?
        .permute((3, 0, 4, 1, 5, 2))?
        .contiguous()?
        .reshape((b, co, qh * s, qw * s))?;
    // Crop the padding; an output padding past the uncropped output is zeros.
    let fit = |full: Tensor, dim: usize, n: usize| -> Result<Tensor> {
        let have = full.dim(dim)?;
        if p + n <= have {
            full.narrow(dim, p, n)
        } else {
            full.narrow(dim, p, have - p)?
                .pad_with_zeros(dim, 0, p + n - have)
        }
    };
    let y = fit(full, 2, oh)?;
    fit(y, 3, ow)
}

#[cfg(test)]
thread_local! {
    /// Forwards run by [`forward_on`] in this thread (the tests check the path was taken).
    pub(crate) static GEMM_FORWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A storage type of candle's backends, and its variant of [`Storage`].
pub(crate) trait OnDevice: BackendStorage<Device: BackendDevice<Storage = Self>> {
    fn wrap(self) -> Storage;
    fn of(s: &Storage) -> Option<&Self>;
}

macro_rules! on_device {
    ($storage:ident, $variant:ident) => {
        impl OnDevice for $storage {
            fn wrap(self) -> Storage {
                Storage::$variant(self)
            }
            fn of(s: &Storage) -> Option<&Self> {
                match s {
                    Storage::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}

on_device!(CpuStorage, Cpu);
on_device!(CudaStorage, Cuda);
on_device!(MetalStorage, Metal);

/// A copy of a custom op's argument as a tensor outside any graph.
fn detached<S: OnDevice>(s: &S, l: &Layout) -> Result<Tensor> {
    // SAFETY: copy_strided_src writes every element of the new storage before it is read.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(Tensor::from_storage(
        dst.wrap(),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// The forward of a custom op on any backend, computed by `f` with the tensor ops of this
/// module on copies of its arguments outside candle's graph: the op stays one node of the
/// graph (its backward is the op's own), and the intermediate tensors of `f` are freed when it
/// returns (candle keeps gradient graphs for the penalties' second-order terms, so the same
/// composite differentiated by candle's autograd would keep every intermediate of every
/// backward alive: 9 GB for a dcgan64 step at batch 64 on the CPU).
pub(crate) fn forward_on<S: OnDevice>(
    s1: &S,
    l1: &Layout,
    s2: &S,
    l2: &Layout,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(S, Shape)> {
    #[cfg(test)]
    GEMM_FORWARDS.with(|c| c.set(c.get() + 1));
    let y = f(&detached(s1, l1)?, &detached(s2, l2)?)?;
    let (storage, layout) = y.storage_and_layout();
    let Some(src) = S::of(&storage) else {
        bail!("conv: the result landed on another device");
    };
    // SAFETY: as in `detached`.
    let mut dst = unsafe { src.device().alloc_uninit(layout.shape(), y.dtype())? };
    src.copy_strided_src(&mut dst, 0, layout)?;
    Ok((dst, layout.shape().clone()))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::rng::Rng;

    fn randn(rng: &mut Rng, dims: &[usize]) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(rng.normal_vec(n), dims, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        let d = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        d / scale
    }

    /// (B, C, H, W, O, K, stride, padding): DCGAN's 4/2/1 layers, 3/1/1, a 4/1/0 head, a
    /// kernel the stride does not divide (3/2/1, 5/2/2), odd sizes and 1x1 kernels.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const CASES: [Case; 9] = [
        (2, 3, 8, 8, 4, 4, 2, 1),
        (2, 3, 7, 9, 4, 4, 2, 1),
        (1, 2, 6, 6, 3, 3, 1, 1),
        (2, 4, 4, 4, 1, 4, 1, 0),
        (2, 3, 9, 8, 2, 3, 2, 1),
        (1, 2, 10, 11, 3, 5, 2, 2),
        (2, 3, 5, 5, 4, 1, 1, 0),
        (1, 2, 9, 9, 2, 3, 3, 1),
        (1, 3, 6, 6, 2, 2, 2, 0),
    ];

    /// Values and both first-order gradients equal candle's conv2d and the CPU kernels' (the
    /// reference for gradients: candle's conv2d backward gets the input gradient's size wrong
    /// where the stride does not divide H + 2p - K; the CPU kernels are checked against finite
    /// differences in `conv/tests.rs`).
    #[test]
    fn conv2d_matches_candle_with_gradients() {
        let mut rng = Rng::new(11);
        for (b, c, h, w, o, k, s, p) in CASES {
            let x = Var::from_tensor(&randn(&mut rng, &[b, c, h, w])).unwrap();
            let wt = Var::from_tensor(&randn(&mut rng, &[o, c, k, k])).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            let candle = x.conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            let case = (b, c, h, w, o, k, s, p);
            assert!(rel(&ours, &candle) < 1e-12, "{case:?} values");
            let theirs =
                crate::kernels::conv::conv2d(x.as_tensor(), wt.as_tensor(), s, p, None).unwrap();
            let r = randn(&mut rng, ours.dims());
            let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                assert!(rel(a, b) < 1e-12, "{case:?} gradient");
            }
        }
    }

    /// The same for the transposed convolution, output paddings included.
    #[test]
    fn conv_transpose2d_matches_candle_with_gradients() {
        let mut rng = Rng::new(12);
        for (b, c, h, w, o, k, s, p) in CASES {
            for op in 0..s.min(2) {
                if (h - 1) * s + k + op < 2 * p + 1 {
                    continue;
                }
                let x = Var::from_tensor(&randn(&mut rng, &[b, c, h, w])).unwrap();
                let wt = Var::from_tensor(&randn(&mut rng, &[c, o, k, k])).unwrap();
                let ours = conv_transpose2d(x.as_tensor(), wt.as_tensor(), s, p, (op, op)).unwrap();
                let candle = x.conv_transpose2d(wt.as_tensor(), p, op, s, 1).unwrap();
                let case = (b, c, h, w, o, k, s, p, op);
                assert!(rel(&ours, &candle) < 1e-12, "{case:?} values");
                let theirs = crate::kernels::conv::conv_transpose2d_op(
                    x.as_tensor(),
                    wt.as_tensor(),
                    s,
                    p,
                    (op, op),
                    None,
                )
                .unwrap();
                let r = randn(&mut rng, ours.dims());
                let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [&x, &wt] {
                    let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                    assert!(rel(a, b) < 1e-12, "{case:?} gradient");
                }
            }
        }
    }

    /// A gradient penalty through a stride-2 conv and a transposed conv (what WGAN-GP and R1
    /// differentiate twice): the weight gradients of ||d out / d x||^2 equal the CPU kernels'.
    #[test]
    fn gradient_penalty_gradients_match_candle() {
        let mut rng = Rng::new(13);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 8, 8])).unwrap();
        let w1 = Var::from_tensor(&randn(&mut rng, &[4, 3, 4, 4])).unwrap();
        let w2 = Var::from_tensor(&randn(&mut rng, &[4, 2, 4, 4])).unwrap();
        let r = randn(&mut rng, &[2, 2, 8, 8]);
        let penalty = |ours: bool| -> candle_core::backprop::GradStore {
            let (a, b) = if ours {
                let a = conv2d(x.as_tensor(), w1.as_tensor(), 2, 1).unwrap();
                (
                    a.clone(),
                    conv_transpose2d(&a.tanh().unwrap(), w2.as_tensor(), 2, 1, (0, 0)).unwrap(),
                )
            } else {
                use crate::kernels::conv as cpu;
                let a = cpu::conv2d(x.as_tensor(), w1.as_tensor(), 2, 1, None).unwrap();
                let t = a.tanh().unwrap();
                (
                    a,
                    cpu::conv_transpose2d(&t, w2.as_tensor(), 2, 1, None).unwrap(),
                )
            };
            let _ = a;
            let out = (&b * &r).unwrap().sum_all().unwrap();
            let gx = out.backward().unwrap().get(&x).unwrap().clone();
            gx.sqr().unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (ga, gb) = (penalty(true), penalty(false));
        for v in [&w1, &w2] {
            let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(rel(a, b) < 1e-11, "second-order gradient: {}", rel(a, b));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&x, &w, 1, 1).is_err());
        let w = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&x, &w, 1, 0).is_err());
        let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv_transpose2d(&x, &w, 2, 1, (0, 0)).is_err());
    }
}
