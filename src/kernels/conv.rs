//! Fast CPU 2-D convolutions: im2col / col2im around one gemm, as candle custom ops.
//!
//! candle 0.11 runs conv2d on the CPU as im2col + gemm, but conv_transpose2d as a direct loop,
//! and that loop also computes the input gradient of every conv2d. [`conv2d`] and
//! [`conv_transpose2d`] here run both through the `gemm` crate. Their backward passes are built
//! from the same three custom ops (conv2d, conv_transpose2d with an output padding, and the
//! weight gradient), each with a backward of its own made of these ops again, so gradients of
//! gradients (WGAN-GP, R1) stay exact. A gradient is only computed for an argument that
//! candle tracks (a variable or something computed from one): the input gradient of the first
//! conv of a discriminator fed real images is skipped.
//!
//! Off the CPU, for dtypes other than f32/f64, or for non-square kernels, both fall back to
//! candle's own ops, so CUDA/Metal keep working.
//!
//! Index conventions shared by all three ops ("image side" and "column side"): with stride s,
//! padding p and a K x K kernel, column position (oh, ow) of an output channel sees image
//! pixel (oh * s - p + kh, ow * s - p + kw) through kernel tap (kh, kw).
//! - conv2d: image = input x (B, C, H, W), columns = output (B, O, OH, OW);
//!   y_b = W (O, C K K) @ im2col(x_b).
//! - conv_transpose2d: columns = input x (B, Cin, H, W), image = output (B, Cout, OH, OW);
//!   y_b = col2im(W^T (Cout K K, Cin) @ x_b).
//! - weight gradient of conv2d: dW (O, C K K) = sum_b g_b (O, OH OW) @ im2col(x_b)^T.
//!
//! Each op may carry the [`GradMode`] handle of the pass that built it (the ops its backward
//! builds inherit it): inside a backward that wants only input gradients
//! ([`GradMode::inputs_only`], a gradient penalty's inner backward) the weight gradients are
//! skipped. Without a handle every gradient is computed.
//!
//! A [`conv2d`] whose weight needs a gradient keeps its forward im2col (up to
//! [`COLS_CACHE_MAX_BYTES`]) for the weight gradient, which would otherwise build the same
//! columns again.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};
use std::thread::LocalKey;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

use super::matmul::{matmul, matmul_in};
use super::ops::{ActSideOp, LeakyRelu};
use super::{MIN_TASK, Slot, assume_init, contiguous, uninit};
use crate::grad::GradMode;

/// 2-D convolution, x (B, C, H, W), w (O, C, K, K) OIHW -> (B, O, OH, OW), with
/// OH = (H + 2 padding - K) / stride + 1. Same result as `x.conv2d(w, padding, stride, 1, 1)`.
/// `mode`: the backward mode of the pass (see the module docs), if any.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    if fast_path(x, w) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv2dOp::keeping(stride, padding, w, mode),
        )
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// 2-D transposed convolution, x (B, Cin, H, W), w (Cin, Cout, K, K) -> (B, Cout, OH, OW),
/// with OH = (H - 1) stride - 2 padding + K. Same result as
/// `x.conv_transpose2d(w, padding, 0, stride, 1)`. `mode` as for [`conv2d`].
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    if fast_path(x, w) {
        conv_transpose2d_op(x, w, stride, padding, (0, 0), mode)
    } else {
        x.conv_transpose2d(w, padding, 0, stride, 1)
    }
}

/// `act(conv2d(x, w))` for a (leaky) ReLU `act`, with the activation applied inside the
/// convolution's op on the CPU: no separate pass, output or graph node. The forward records
/// which side of zero each pre-activation fell on, and the backward multiplies the incoming
/// gradient by the derivative read from it ([`ActSideOp`]), so values and gradients of every
/// order are those of the two ops in turn, ties at zero included. `mode` as for [`conv2d`].
pub fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    act: LeakyRelu,
    mode: Option<&GradMode>,
) -> crate::error::Result<Tensor> {
    if fast_path(x, w) {
        let mut op = Conv2dOp::keeping(stride, padding, w, mode);
        op.act = Some((act, Arc::default()));
        Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
    } else {
        act.apply(&x.conv2d(w, padding, stride, 1, 1)?)
    }
}

/// Whether the custom ops handle these arguments (else candle's ops do).
fn fast_path(x: &Tensor, w: &Tensor) -> bool {
    let dims = w.dims();
    x.device().is_cpu()
        && w.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && x.rank() == 4
        && dims.len() == 4
        && dims[2] == dims[3]
}

fn conv2d_op(
    x: &Tensor,
    w: &Tensor,
    s: usize,
    p: usize,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2dOp {
            s,
            p,
            cols: None,
            act: None,
            mode: mode.cloned(),
        },
    )
}

/// `op`: output padding (rows, columns), each below the stride.
fn conv_transpose2d_op(
    x: &Tensor,
    w: &Tensor,
    s: usize,
    p: usize,
    op: (usize, usize),
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvT2dOp {
            s,
            p,
            oph: op.0,
            opw: op.1,
            mode: mode.cloned(),
        },
    )
}

/// Gradient of conv2d(x, w) with respect to w (O, C, k, k), given g = d loss / d output.
/// `cols`: the im2col of x kept by the forward conv, if it kept one.
fn weight_grad_op(
    x: &Tensor,
    g: &Tensor,
    s: usize,
    p: usize,
    k: usize,
    cols: Option<Arc<ColsSlot>>,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    let op = WeightGradOp {
        s,
        p,
        k,
        cols,
        mode: mode.cloned(),
    };
    x.contiguous()?.apply_op2(&g.contiguous()?, op)
}

/// Output padding that makes conv_transpose2d map a conv2d output of size `out` back to an
/// image of size `img` (the part of the image no window reaches when the stride does not
/// divide `img + 2p - k`).
fn output_padding(img: usize, out: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    match out
        .checked_sub(1)
        .and_then(|o| (img + 2 * p).checked_sub(k + o * s))
    {
        Some(r) if r < s => Ok(r),
        _ => bail!("conv: image size {img} does not match output size {out} (k {k}, s {s}, p {p})"),
    }
}

/// conv2d: (x, w) -> y. With `cols`, the forward stores its im2col there (see
/// [`KeptCols`]); with `act`, it applies the activation to y and stores the pre-activation's
/// sides in the slot (see [`conv2d_act`]). `mode`: the pass's backward mode, if any; the ops
/// its backward builds inherit it.
#[derive(Debug, Clone)]
struct Conv2dOp {
    s: usize,
    p: usize,
    cols: Option<Arc<ColsSlot>>,
    act: Option<(LeakyRelu, Arc<SideSlot>)>,
    mode: Option<GradMode>,
}

/// Where a conv2d with a fused activation leaves the pre-activation's sides for its backward.
type SideSlot = OnceLock<Arc<Vec<u8>>>;

impl Conv2dOp {
    /// A conv2d that keeps its columns for the weight gradient, if `w` will get one.
    fn keeping(s: usize, p: usize, w: &Tensor, mode: Option<&GradMode>) -> Self {
        Self {
            s,
            p,
            cols: w.track_op().then(Arc::default),
            act: None,
            mode: mode.cloned(),
        }
    }
}

/// Where a forward conv2d leaves its im2col for the weight gradient.
type ColsSlot = OnceLock<KeptCols>;

/// The im2col of a conv2d's whole input, chunk after chunk as the forward built them:
/// chunks of `chunk` samples, each a (C K K, chunk OH OW) matrix, the one starting at sample
/// b0 at offset b0 C K K OH OW. Back to the scratch pool when the op (the graph) is dropped.
struct KeptCols {
    chunk: usize,
    buf: ColsBuf,
}

pub(super) enum ColsBuf {
    F32(Scratch<f32>),
    F64(Scratch<f64>),
}

impl std::fmt::Debug for KeptCols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptCols")
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

/// Largest im2col (bytes) a conv2d keeps for its weight gradient: the DCGAN-28
/// discriminator's layers (8.8 and 12.8 MB at batch 64) fit; the widest DCGAN-64 ones (33 and
/// 67 MB) build their columns again instead.
const COLS_CACHE_MAX_BYTES: usize = 32 << 20;

/// conv_transpose2d with output padding: (x, w) -> y.
#[derive(Debug, Clone)]
struct ConvT2dOp {
    s: usize,
    p: usize,
    oph: usize,
    opw: usize,
    mode: Option<GradMode>,
}

/// Weight gradient of conv2d: (x, g) -> dw (O, C, k, k); `cols`: the forward's im2col of x,
/// if kept.
#[derive(Debug, Clone)]
struct WeightGradOp {
    s: usize,
    p: usize,
    k: usize,
    cols: Option<Arc<ColsSlot>>,
    mode: Option<GradMode>,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ganscope-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut storage, shape) = dispatch(self, s1, l1, s2, l2)?;
        if let Some((act, slot)) = &self.act {
            let side = match &mut storage {
                CpuStorage::F32(y) => act.apply_in_place(y),
                CpuStorage::F64(y) => act.apply_in_place(y),
                _ => bail!("{}: unsupported dtype", self.name()),
            };
            // A fresh op per call: the slot is empty.
            let _ = slot.set(Arc::new(side));
        }
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (s, p, mode) = (self.s, self.p, self.mode.as_ref());
        let k = w.dim(2)?;
        // With a fused activation, the gradient at the pre-activation.
        let g = &match &self.act {
            Some((act, slot)) => {
                let side = slot.get().cloned().ok_or_else(|| {
                    candle_core::Error::Msg("conv2d: backward before forward".into())
                })?;
                ActSideOp { act: *act, side }.apply(g)?
            }
            None => g.clone(),
        };
        let gx = if x.track_op() {
            let (_, _, h, wd) = x.dims4()?;
            let (_, _, oh, ow) = g.dims4()?;
            let op = (
                output_padding(h, oh, k, s, p)?,
                output_padding(wd, ow, k, s, p)?,
            );
            Some(conv_transpose2d_op(g, w, s, p, op, mode)?)
        } else {
            None
        };
        let gw = weight_gradient(w, mode, || {
            weight_grad_op(x, g, s, p, k, self.cols.clone(), mode)
        })?;
        Ok((gx, gw))
    }
}

impl CustomOp2 for ConvT2dOp {
    fn name(&self) -> &'static str {
        "ganscope-conv-transpose2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (s, p, mode) = (self.s, self.p, self.mode.as_ref());
        // x sits on the column side, g (the output's gradient) on the image side.
        let gx = if x.track_op() {
            Some(conv2d_op(g, w, s, p, mode)?)
        } else {
            None
        };
        let gw = weight_gradient(w, mode, || {
            weight_grad_op(g, x, s, p, w.dim(2)?, None, mode)
        })?;
        Ok((gx, gw))
    }
}

/// The weight gradient a convolution's backward returns: `f()`, unless the weight needs none
/// or the backward wants only input gradients ([`GradMode::inputs_only`] of the op's `mode`).
/// Then a weight that is a variable gets nothing, and one computed from variables (spectral
/// norm) gets zeros: candle's backward requires a gradient for every such intermediate tensor.
fn weight_gradient(
    w: &Tensor,
    mode: Option<&GradMode>,
    f: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if !w.track_op() {
        Ok(None)
    } else if !GradMode::inputs_only_in(mode) {
        f().map(Some)
    } else if w.is_variable() {
        Ok(None)
    } else {
        w.zeros_like().map(Some)
    }
}

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "ganscope-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch(self, s1, l1, s2, l2)
    }

    /// dw[o,c,kh,kw] = sum g[b,o,oh,ow] x[b,c,oh s-p+kh,ow s-p+kw] is bilinear in (x, g):
    /// d/dx is conv_transpose2d(g, gdw) (gdw read as (O, C, k, k) = (Cin, Cout, k, k)), with
    /// the output padding that restores x's size; d/dg is conv2d(x, gdw).
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        gdw: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (s, p, k, mode) = (self.s, self.p, self.k, self.mode.as_ref());
        let gx = if x.track_op() {
            let (_, _, h, wd) = x.dims4()?;
            let (_, _, oh, ow) = g.dims4()?;
            let op = (
                output_padding(h, oh, k, s, p)?,
                output_padding(wd, ow, k, s, p)?,
            );
            Some(conv_transpose2d_op(g, gdw, s, p, op, mode)?)
        } else {
            None
        };
        let gg = if g.track_op() {
            Some(conv2d_op(x, gdw, s, p, mode)?)
        } else {
            None
        };
        Ok((gx, gg))
    }
}

/// Sizes of one convolution, in image-side / column-side terms (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geom {
    b: usize,
    /// Image side: channels, height, width.
    c: usize,
    h: usize,
    w: usize,
    /// Column side: channels, height, width.
    o: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Geom {
    /// Rows of the im2col matrix.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Column positions per sample.
    fn l(&self) -> usize {
        self.oh * self.ow
    }
    /// Image elements per sample.
    fn img(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Column-side elements per sample.
    fn col(&self) -> usize {
        self.o * self.l()
    }
    /// Samples per im2col buffer, so that the buffer stays within the budget. The batch is
    /// split into chunks of equal size (64 samples at 20 per buffer run as 4 x 16, not
    /// 20 + 20 + 20 + 4: a small last chunk makes a gemm too narrow to run at full rate).
    fn chunk<T>(&self) -> usize {
        let per_sample = (self.ckk() * self.l() * std::mem::size_of::<T>()).max(1);
        let b = self.b.max(1);
        let most = (cols_budget_bytes() / per_sample).clamp(1, b);
        b.div_ceil(b.div_ceil(most))
    }
}

/// Largest im2col buffer (bytes) before the batch is processed in chunks. Measured on the
/// DCGAN-28 layers (2 threads): 1 to 32 MiB all ran within noise of each other, 512 KiB was
/// 10-20% slower (gemm calls too small); 4 MiB keeps the scratch pool small.
const COLS_BUDGET_BYTES: usize = 4 << 20;

fn cols_budget_bytes() -> usize {
    #[cfg(test)]
    if let Some(b) = tests::BUDGET.with(|c| c.get()) {
        return b;
    }
    COLS_BUDGET_BYTES
}

fn conv_out(n: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if s == 0 || k == 0 {
        bail!("conv: stride {s}, kernel {k}");
    }
    match (n + 2 * p).checked_sub(k) {
        Some(r) => Ok(r / s + 1),
        None => bail!("conv: kernel {k} larger than the padded input {n} + 2 * {p}"),
    }
}

fn conv_t_out(n: usize, k: usize, s: usize, p: usize, op: usize) -> Result<usize> {
    if s == 0 {
        bail!("conv_transpose: stride 0");
    }
    if op >= s {
        bail!("conv_transpose: output padding {op} must be below the stride {s}");
    }
    if n == 0 || k == 0 {
        bail!("conv_transpose: empty input or kernel");
    }
    match ((n - 1) * s + k + op).checked_sub(2 * p) {
        Some(o) if o > 0 => Ok(o),
        _ => bail!("conv_transpose: padding {p} leaves an empty output"),
    }
}

fn dims4(d: &[usize], what: &str) -> Result<[usize; 4]> {
    match d {
        &[a, b, c, e] => Ok([a, b, c, e]),
        _ => bail!("{what}: expected a rank-4 tensor, got shape {d:?}"),
    }
}

/// What each op does with its two (contiguous) arguments.
trait Kernel {
    const NAME: &'static str;
    fn geom(&self, a: &[usize], b: &[usize]) -> Result<Geom>;
    fn out_shape(&self, g: &Geom) -> Shape;
    fn run<T: Elem>(&self, g: &Geom, a: &[T], b: &[T]) -> Vec<T>;
}

impl Kernel for Conv2dOp {
    const NAME: &'static str = "ganscope-conv2d";
    fn geom(&self, a: &[usize], b: &[usize]) -> Result<Geom> {
        let [bs, c, h, w] = dims4(a, Self::NAME)?;
        let [o, c2, k, k2] = dims4(b, Self::NAME)?;
        if c2 != c || k2 != k {
            bail!("{}: input {a:?} and kernel {b:?} do not fit", Self::NAME);
        }
        Ok(Geom {
            b: bs,
            c,
            h,
            w,
            o,
            oh: conv_out(h, k, self.s, self.p)?,
            ow: conv_out(w, k, self.s, self.p)?,
            k,
            s: self.s,
            p: self.p,
        })
    }
    fn out_shape(&self, g: &Geom) -> Shape {
        (g.b, g.o, g.oh, g.ow).into()
    }
    fn run<T: Elem>(&self, g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
        conv2d_fwd(g, x, w, self.cols.as_deref())
    }
}

impl Kernel for ConvT2dOp {
    const NAME: &'static str = "ganscope-conv-transpose2d";
    fn geom(&self, a: &[usize], b: &[usize]) -> Result<Geom> {
        let [bs, ci, h, w] = dims4(a, Self::NAME)?;
        let [ci2, co, k, k2] = dims4(b, Self::NAME)?;
        if ci2 != ci || k2 != k {
            bail!("{}: input {a:?} and kernel {b:?} do not fit", Self::NAME);
        }
        Ok(Geom {
            b: bs,
            c: co,
            h: conv_t_out(h, k, self.s, self.p, self.oph)?,
            w: conv_t_out(w, k, self.s, self.p, self.opw)?,
            o: ci,
            oh: h,
            ow: w,
            k,
            s: self.s,
            p: self.p,
        })
    }
    fn out_shape(&self, g: &Geom) -> Shape {
        (g.b, g.c, g.h, g.w).into()
    }
    fn run<T: Elem>(&self, g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
        conv_t_fwd(g, x, w)
    }
}

impl Kernel for WeightGradOp {
    const NAME: &'static str = "ganscope-conv2d-weight-grad";
    fn geom(&self, a: &[usize], b: &[usize]) -> Result<Geom> {
        let [bs, c, h, w] = dims4(a, Self::NAME)?;
        let [bs2, o, oh, ow] = dims4(b, Self::NAME)?;
        let (k, s, p) = (self.k, self.s, self.p);
        if bs2 != bs || conv_out(h, k, s, p)? != oh || conv_out(w, k, s, p)? != ow {
            bail!(
                "{}: input {a:?} and output gradient {b:?} do not fit (k {k}, s {s}, p {p})",
                Self::NAME
            );
        }
        Ok(Geom {
            b: bs,
            c,
            h,
            w,
            o,
            oh,
            ow,
            k,
            s,
            p,
        })
    }
    fn out_shape(&self, g: &Geom) -> Shape {
        (g.o, g.c, g.k, g.k).into()
    }
    fn run<T: Elem>(&self, g: &Geom, x: &[T], gy: &[T]) -> Vec<T> {
        weight_grad(g, x, gy, self.cols.as_deref())
    }
}

fn dispatch<K: Kernel>(
    op: &K,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = op.geom(l1.dims(), l2.dims())?;
    let shape = op.out_shape(&g);
    // Empty batch or channels: a zero (or empty) result, without the kernels.
    let empty = g.b == 0 || g.c == 0 || g.o == 0;
    let storage = match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) if empty => {
            CpuStorage::F32(zeros(shape.elem_count()))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) if empty => {
            CpuStorage::F64(zeros(shape.elem_count()))
        }
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(op.run(&g, contiguous(a, l1, K::NAME)?, contiguous(b, l2, K::NAME)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(op.run(&g, contiguous(a, l1, K::NAME)?, contiguous(b, l2, K::NAME)?))
        }
        _ => bail!(
            "{}: expected two f32 or two f64 tensors, got {:?} and {:?}",
            K::NAME,
            s1.dtype(),
            s2.dtype()
        ),
    };
    Ok((storage, shape))
}

fn zeros<T: WithDType>(n: usize) -> Vec<T> {
    vec![T::from_f64(0.0); n]
}

/// f32 and f64, each with a per-thread pool of scratch buffers: fresh multi-megabyte
/// allocations come back from the kernel as zeroed pages, a cost comparable to the copy that
/// fills them.
pub(super) trait Elem: WithDType {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
    fn wrap(s: Scratch<Self>) -> ColsBuf;
    fn unwrap(b: &ColsBuf) -> Option<&[Self]>;
}

thread_local! {
    static POOL_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static POOL_F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

impl Elem for f32 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &POOL_F32
    }
    fn wrap(s: Scratch<Self>) -> ColsBuf {
        ColsBuf::F32(s)
    }
    fn unwrap(b: &ColsBuf) -> Option<&[Self]> {
        match b {
            ColsBuf::F32(s) => Some(&s.0),
            ColsBuf::F64(_) => None,
        }
    }
}

impl Elem for f64 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &POOL_F64
    }
    fn wrap(s: Scratch<Self>) -> ColsBuf {
        ColsBuf::F64(s)
    }
    fn unwrap(b: &ColsBuf) -> Option<&[Self]> {
        match b {
            ColsBuf::F64(s) => Some(&s.0),
            ColsBuf::F32(_) => None,
        }
    }
}

/// Buffers the pool keeps per thread and dtype, the largest it keeps and their total (bytes).
/// A convolution holds up to three at once (columns, a transposed operand, padded planes);
/// a discriminator's graph holds the columns each conv keeps for its weight gradient.
const POOL_BUFFERS: usize = 8;
const POOL_MAX_BYTES: usize = 32 << 20;
const POOL_MAX_TOTAL_BYTES: usize = 96 << 20;

/// A scratch buffer of at least `n` elements with unspecified contents, back to the pool
/// when dropped.
pub(super) struct Scratch<T: Elem>(Vec<T>);

impl<T: Elem> Scratch<T> {
    /// Takes the smallest pooled buffer that holds `n` elements, else the largest one, grown
    /// (growing zero-fills the new part: a pass over memory the pool exists to avoid). An
    /// empty request takes nothing from the pool.
    pub(super) fn new(n: usize) -> Self {
        if n == 0 {
            return Self(Vec::new());
        }
        let mut v = T::pool()
            .try_with(|p| {
                let mut p = p.borrow_mut();
                let fit = (0..p.len())
                    .filter(|&i| p[i].len() >= n)
                    .min_by_key(|&i| p[i].len());
                let pick = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].len()));
                pick.map(|i| p.swap_remove(i))
            })
            .ok()
            .flatten()
            .unwrap_or_default();
        if v.len() < n {
            v.resize(n, T::from_f64(0.0));
        }
        Self(v)
    }

    pub(super) fn get(&mut self, n: usize) -> &mut [T] {
        &mut self.0[..n]
    }
}

impl<T: Elem> Drop for Scratch<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if !v.is_empty() && v.len() * std::mem::size_of::<T>() <= POOL_MAX_BYTES {
            let _ = T::pool().try_with(|p| {
                let mut p = p.borrow_mut();
                let total: usize = p.iter().map(Vec::len).sum::<usize>() + v.len();
                if p.len() < POOL_BUFFERS
                    && total * std::mem::size_of::<T>() <= POOL_MAX_TOTAL_BYTES
                {
                    p.push(v);
                }
            });
        }
    }
}

impl Geom {
    /// The window covers the whole image once (the first layer of a DCGAN generator, the
    /// last of its discriminator): im2col is the identity on each sample's (C, K, K) block.
    fn dense(&self) -> bool {
        self.l() == 1 && self.p == 0 && self.h == self.k && self.w == self.k
    }

    /// 1x1 kernel, stride 1, no padding: im2col is the identity on each sample's (C, H W).
    fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
}

/// conv2d forward: x (B, C, H, W), w (O, C K K) -> y (B, O, OH, OW). With `keep`, the
/// im2col of x goes there (if it fits [`COLS_CACHE_MAX_BYTES`]).
fn conv2d_fwd<T: Elem>(g: &Geom, x: &[T], w: &[T], keep: Option<&ColsSlot>) -> Vec<T> {
    let mut y = uninit(g.b * g.col());
    conv2d_fwd_into(g, x, w, keep, &mut y);
    // SAFETY: every path of conv2d_fwd_into writes every output element (gemm without
    // reading dst, or the full transpose of its result).
    unsafe { assume_init(y) }
}

fn conv2d_fwd_into<T: Elem>(
    g: &Geom,
    x: &[T],
    w: &[T],
    keep: Option<&ColsSlot>,
    y: &mut [MaybeUninit<T>],
) {
    let (ckk, l) = (g.ckk(), g.l());
    if g.dense() {
        // y (B, O) = x (B, C K K) @ w^T.
        matmul(g.b, g.o, ckk, y, (g.o, 1), false, x, (ckk, 1), w, (1, ckk));
        return;
    }
    if g.pointwise() {
        for (yb, xb) in y.chunks_mut(g.col()).zip(x.chunks(g.img())) {
            matmul(g.o, l, ckk, yb, (l, 1), false, w, (ckk, 1), xb, (l, 1));
        }
        return;
    }
    let bc = g.chunk::<T>();
    let whole = ckk * g.b * l;
    let keep = keep.filter(|_| whole * std::mem::size_of::<T>() <= COLS_CACHE_MAX_BYTES);
    let mut cols = Scratch::new(if keep.is_some() { whole } else { ckk * bc * l });
    let mut tmp = Scratch::new(if bc > 1 { g.o * bc * l } else { 0 });
    for b0 in (0..g.b).step_by(bc) {
        let nb = bc.min(g.b - b0);
        let n = nb * l;
        let at = if keep.is_some() { ckk * b0 * l } else { 0 };
        let cols = &mut cols.get(at + ckk * n)[at..];
        im2col(g, nb, &x[b0 * g.img()..(b0 + nb) * g.img()], cols);
        let yc = &mut y[b0 * g.col()..(b0 + nb) * g.col()];
        if nb == 1 {
            matmul(g.o, n, ckk, yc, (n, 1), false, w, (ckk, 1), cols, (n, 1));
        } else {
            let tmp = tmp.get(g.o * n);
            matmul(g.o, n, ckk, tmp, (n, 1), false, w, (ckk, 1), cols, (n, 1));
            channel_to_batch_major(tmp, nb, g.o, l, yc);
        }
    }
    if let Some(slot) = keep {
        // A fresh op per forward: the slot is empty.
        let _ = slot.set(KeptCols {
            chunk: bc,
            buf: T::wrap(cols),
        });
    }
}

/// conv_transpose2d forward: x (B, O, OH, OW) on the column side, w (O, C K K) ->
/// y (B, C, H, W) on the image side.
fn conv_t_fwd<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let n = g.b * g.img();
    if g.dense() || g.pointwise() || g.gathers_by_table() {
        let mut y = uninit(n);
        conv_t_fwd_into(g, x, w, &mut y);
        // SAFETY: these paths write every output element (gemm without reading dst, or
        // col2im as a gather that writes each pixel once).
        unsafe { assume_init(y) }
    } else {
        // col2im row by row adds into the image: it starts from zeros.
        let mut y = zeros(n);
        conv_t_fwd_into(g, x, w, &mut y);
        y
    }
}

fn conv_t_fwd_into<T: Elem, S: Slot<T>>(g: &Geom, x: &[T], w: &[T], y: &mut [S]) {
    let (ckk, l) = (g.ckk(), g.l());
    if g.dense() {
        // y (B, C K K) = x (B, O) @ w (O, C K K).
        matmul(g.b, ckk, g.o, y, (ckk, 1), false, x, (g.o, 1), w, (ckk, 1));
        return;
    }
    if g.pointwise() {
        for (yb, xb) in y.chunks_mut(g.img()).zip(x.chunks(g.col())) {
            matmul(ckk, l, g.o, yb, (l, 1), false, w, (1, ckk), xb, (l, 1));
        }
        return;
    }
    let bc = g.chunk::<T>();
    let mut cols = Scratch::new(ckk * bc * l);
    let mut xp = Scratch::new(if bc > 1 { g.o * bc * l } else { 0 });
    for b0 in (0..g.b).step_by(bc) {
        let nb = bc.min(g.b - b0);
        let n = nb * l;
        let cols = cols.get(ckk * n);
        let xc = &x[b0 * g.col()..(b0 + nb) * g.col()];
        let rhs: &[T] = if nb == 1 {
            xc
        } else {
            let xp = xp.get(g.o * n);
            batch_to_channel_major(xc, nb, g.o, l, xp);
            xp
        };
        // cols (C K K, n) = w^T @ rhs, w stored (O, C K K).
        matmul(ckk, n, g.o, cols, (n, 1), false, w, (1, ckk), rhs, (n, 1));
        col2im(g, nb, cols, &mut y[b0 * g.img()..(b0 + nb) * g.img()]);
    }
}

/// conv2d weight gradient: x (B, C, H, W), gy (B, O, OH, OW) -> dw (O, C K K). `kept`: the
/// forward's im2col of x, used instead of building it again when there is one.
fn weight_grad<T: Elem>(g: &Geom, x: &[T], gy: &[T], kept: Option<&ColsSlot>) -> Vec<T> {
    let (ckk, l) = (g.ckk(), g.l());
    let mut dw = zeros(g.o * ckk);
    if g.dense() {
        // dw (O, C K K) = gy^T (O, B) @ x (B, C K K).
        matmul(
            g.o,
            ckk,
            g.b,
            &mut dw,
            (ckk, 1),
            false,
            gy,
            (1, g.o),
            x,
            (ckk, 1),
        );
        return dw;
    }
    if g.pointwise() {
        for (b, (xb, gb)) in x.chunks(g.img()).zip(gy.chunks(g.col())).enumerate() {
            // dw (O, C) += gy_b (O, L) @ x_b^T (L, C).
            matmul(
                g.o,
                ckk,
                l,
                &mut dw,
                (ckk, 1),
                b > 0,
                gb,
                (l, 1),
                xb,
                (1, l),
            );
        }
        return dw;
    }
    let kept = kept
        .and_then(|slot| slot.get())
        .and_then(|k| Some((k.chunk, T::unwrap(&k.buf)?)))
        .filter(|(_, c)| c.len() >= ckk * g.b * l);
    let bc = kept.map_or_else(|| g.chunk::<T>(), |(chunk, _)| chunk);
    let mut cols = Scratch::new(if kept.is_some() { 0 } else { ckk * bc * l });
    let mut gp = Scratch::new(if bc > 1 { g.o * bc * l } else { 0 });
    let mut split = splits_sum(g.o * ckk, bc.min(g.b) * l).then(|| zeros::<T>(g.o * ckk));
    for b0 in (0..g.b).step_by(bc) {
        let nb = bc.min(g.b - b0);
        let n = nb * l;
        let cols: &[T] = match kept {
            Some((_, all)) => &all[ckk * b0 * l..][..ckk * n],
            None => {
                let cols = cols.get(ckk * n);
                im2col(g, nb, &x[b0 * g.img()..(b0 + nb) * g.img()], cols);
                cols
            }
        };
        let gc = &gy[b0 * g.col()..(b0 + nb) * g.col()];
        let lhs: &[T] = if nb == 1 {
            gc
        } else {
            let gp = gp.get(g.o * n);
            batch_to_channel_major(gc, nb, g.o, l, gp);
            gp
        };
        // dw (O, C K K) += lhs (O, n) @ cols^T (n, C K K).
        match split.as_mut() {
            None => matmul(
                g.o,
                ckk,
                n,
                &mut dw,
                (ckk, 1),
                b0 > 0,
                lhs,
                (n, 1),
                cols,
                (1, n),
            ),
            Some(second) => {
                // The first half of the n products into dw, the second into its own sum.
                let h = n / 2;
                let (m, acc) = (g.o, b0 > 0);
                rayon::join(
                    || {
                        matmul_in(
                            false,
                            m,
                            ckk,
                            h,
                            &mut dw,
                            (ckk, 1),
                            acc,
                            lhs,
                            (n, 1),
                            cols,
                            (1, n),
                        )
                    },
                    || {
                        matmul_in(
                            false,
                            m,
                            ckk,
                            n - h,
                            second,
                            (ckk, 1),
                            acc,
                            &lhs[h..],
                            (n, 1),
                            &cols[h..],
                            (1, n),
                        )
                    },
                );
            }
        }
    }
    if let Some(second) = split {
        for (d, s) in dw.iter_mut().zip(second) {
            *d += s;
        }
    }
    dw
}

/// Largest weight gradient (elements, O C K K) that [`weight_grad`] computes as two
/// half-length products summed, one per thread, instead of one product that gemm splits
/// over the output: for few channels and many positions (the first layer of a
/// discriminator, the last of a generator) gemm's own split leaves both threads repacking
/// a long operand, at about 60% of its rate on large products.
const SPLIT_SUM_MAX_ELEMS: usize = 32 << 10;

/// Whether [`weight_grad`] sums two half-length products (see [`SPLIT_SUM_MAX_ELEMS`]).
/// It depends on the shapes only, never on the thread count, so results do not either.
fn splits_sum(out_elems: usize, n: usize) -> bool {
    out_elems <= SPLIT_SUM_MAX_ELEMS && n >= 2048 && out_elems * n >= 1 << 20
}

/// Column positions `o` in [0, n_out) whose tap `kk` lands inside the image:
/// 0 <= o s + kk - p < n_img.
fn valid_range(kk: usize, p: usize, s: usize, n_img: usize, n_out: usize) -> (usize, usize) {
    let lo = if kk >= p { 0 } else { (p - kk).div_ceil(s) };
    let hi = if n_img + p > kk {
        n_out.min((n_img + p - kk - 1) / s + 1)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// im2col of `nb` samples: img (nb, C, H, W) -> cols (C K K, nb OH OW), every entry written.
fn im2col<T: Elem>(g: &Geom, nb: usize, img: &[T], cols: &mut [T]) {
    if g.gathers_by_table() {
        im2col_table(g, nb, img, cols)
    } else {
        im2col_rows(g, nb, img, cols)
    }
}

/// col2im of `nb` samples: adds cols (C K K, nb OH OW) into img (nb, C, H, W). The gather
/// overwrites `img`; row by row it accumulates, so `img` must then be initialised to zeros.
fn col2im<T: WithDType, S: Slot<T>>(g: &Geom, nb: usize, cols: &[T], img: &mut [S]) {
    if g.gathers_by_table() {
        col2im_gather(g, nb, cols, img)
    } else {
        let img = S::init(img).expect("col2im row by row needs a zeroed image");
        col2im_rows(g, nb, cols, img)
    }
}

impl Geom {
    /// Whether im2col / col2im gather through offset tables (im2col from zero-padded planes,
    /// col2im pixel by pixel; short output rows or a stride above 1: the DCGAN layers)
    /// rather than going row by row with contiguous copies (stride 1 and rows of 16 or more:
    /// the 3x3 convolutions of the ResNet-style models).
    fn gathers_by_table(&self) -> bool {
        self.s > 1 || self.ow < 16
    }

    /// Height and width of a zero-padded image plane.
    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.p, self.w + 2 * self.p)
    }

    /// For each column position j = oh OW + ow, the offset in a padded plane (row length
    /// `wp`) of the pixel it sees through tap (0, 0); tap (kh, kw) adds kh wp + kw. The
    /// largest offset plus the largest tap shift, ((OH-1) s + K-1) wp + (OW-1) s + K-1, is
    /// below hp wp because (OH-1) s + K <= H + 2p for a conv (and, with the output padding,
    /// for a transposed one).
    fn tap_offsets(&self) -> Vec<usize> {
        let wp = self.padded().1;
        (0..self.oh)
            .flat_map(|oh| (0..self.ow).map(move |ow| oh * self.s * wp + ow * self.s))
            .collect()
    }
}

/// Copies `planes` planes of h x w into planes of (h + 2p) x (w + 2p) with a zero border.
fn pad_planes<T: WithDType>(src: &[T], h: usize, w: usize, p: usize, dst: &mut [T]) {
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let zero = T::from_f64(0.0);
    dst.par_chunks_mut(hp * wp)
        .zip(src.par_chunks(h * w))
        .with_min_len((MIN_TASK / (hp * wp).max(1)).max(1))
        .for_each(|(d, s)| {
            d[..p * wp].fill(zero);
            d[(p + h) * wp..].fill(zero);
            for (dr, sr) in d[p * wp..(p + h) * wp].chunks_mut(wp).zip(s.chunks(w)) {
                dr[..p].fill(zero);
                dr[p..p + w].copy_from_slice(sr);
                dr[p + w..].fill(zero);
            }
        });
}

/// [`im2col`] through the offset table: each row (c, kh, kw) of cols reads, for every
/// sample, padded_plane[kh wp + kw + offset[j]] into position j.
fn im2col_table<T: Elem>(g: &Geom, nb: usize, img: &[T], cols: &mut [T]) {
    let (k, l) = (g.k, g.l());
    let (hp, wp) = g.padded();
    let pp = hp * wp;
    let mut padded = Scratch::new(if g.p > 0 { nb * g.c * pp } else { 0 });
    let src: &[T] = if g.p > 0 {
        let d = padded.get(nb * g.c * pp);
        pad_planes(img, g.h, g.w, g.p, d);
        d
    } else {
        img
    };
    let offsets = g.tap_offsets();
    let last = offsets.last().copied().unwrap_or(0);
    cols.par_chunks_mut(nb * l)
        .with_min_len((8192 / (nb * l).max(1)).max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (c, kh, kw) = (r / (k * k), (r / k) % k, r % k);
            let shift = kh * wp + kw;
            for (b, dst) in row.chunks_mut(l).enumerate() {
                let plane = &src[(b * g.c + c) * pp..][..pp];
                // Every read lies in plane[shift..=shift + last] (see tap_offsets).
                let plane = &plane[shift..=shift + last];
                for (d, &o) in dst.iter_mut().zip(&offsets) {
                    *d = plane[o];
                }
            }
        });
}

/// For every pixel i of an image plane (row-major), the columns of cols that land on it:
/// `offsets[start[i]..start[i + 1]]`, each `tap * n + j` (tap = kh K + kw, j = oh OW + ow,
/// `n` the columns per row of cols), in increasing tap order.
fn pixel_sources(g: &Geom, n: usize) -> (Vec<usize>, Vec<usize>) {
    let (k, s, p) = (g.k, g.s, g.p);
    let mut pairs = Vec::with_capacity(k * k * g.l());
    for tap in 0..k * k {
        let (kh, kw) = (tap / k, tap % k);
        let (hlo, hhi) = valid_range(kh, p, s, g.h, g.oh);
        let (wlo, whi) = valid_range(kw, p, s, g.w, g.ow);
        for oh in hlo..hhi {
            for ow in wlo..whi {
                let pixel = (oh * s + kh - p) * g.w + ow * s + kw - p;
                pairs.push((pixel, tap * n + oh * g.ow + ow));
            }
        }
    }
    // A stable counting sort by pixel keeps each pixel's sources in tap order.
    let mut start = vec![0usize; g.h * g.w + 1];
    for &(px, _) in &pairs {
        start[px + 1] += 1;
    }
    for i in 0..g.h * g.w {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut offsets = vec![0usize; pairs.len()];
    for (px, o) in pairs {
        offsets[fill[px]] = o;
        fill[px] += 1;
    }
    (start, offsets)
}

/// [`col2im`] as a gather: each pixel sums the columns that land on it (see
/// [`pixel_sources`]) in the order the row version adds them, and is written once. Overwrites
/// `img` (the callers pass zeros, and 0 + v = v, so the result equals an accumulation).
fn col2im_gather<T: WithDType, S: Slot<T>>(g: &Geom, nb: usize, cols: &[T], img: &mut [S]) {
    let (kk, l) = (g.k * g.k, g.l());
    let n = nb * l;
    let hw = g.h * g.w;
    let (start, offsets) = pixel_sources(g, n);
    let zero = T::from_f64(0.0);
    img.par_chunks_mut(hw)
        .with_min_len((4096 / hw.max(1)).max(1))
        .enumerate()
        .for_each(|(idx, plane)| {
            let (b, c) = (idx / g.c, idx % g.c);
            let src = &cols[c * kk * n + b * l..];
            for (px, range) in plane.iter_mut().zip(start.windows(2)) {
                let mut acc = zero;
                for &o in &offsets[range[0]..range[1]] {
                    acc += src[o];
                }
                px.set(acc);
            }
        });
}

/// [`im2col`] row by row: contiguous runs are copied, the padding filled.
fn im2col_rows<T: WithDType>(g: &Geom, nb: usize, img: &[T], cols: &mut [T]) {
    let (k, s, p, l) = (g.k, g.s, g.p, g.l());
    let n = nb * l;
    let zero = T::from_f64(0.0);
    cols.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let (c, kh, kw) = (r / (k * k), (r / k) % k, r % k);
        let (hlo, hhi) = valid_range(kh, p, s, g.h, g.oh);
        let (wlo, whi) = valid_range(kw, p, s, g.w, g.ow);
        for b in 0..nb {
            let plane = &img[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
            let dst = &mut row[b * l..(b + 1) * l];
            dst[..hlo * g.ow].fill(zero);
            dst[hhi * g.ow..].fill(zero);
            for oh in hlo..hhi {
                let src = &plane[(oh * s + kh - p) * g.w..][..g.w];
                let d = &mut dst[oh * g.ow..(oh + 1) * g.ow];
                d[..wlo].fill(zero);
                d[whi..].fill(zero);
                if wlo < whi {
                    let j0 = wlo * s + kw - p;
                    let src = &src[j0..j0 + (whi - wlo - 1) * s + 1];
                    gather(&mut d[wlo..whi], src, s);
                }
            }
        }
    });
}

/// [`col2im`] row by row.
fn col2im_rows<T: WithDType>(g: &Geom, nb: usize, cols: &[T], img: &mut [T]) {
    let (k, s, p, l) = (g.k, g.s, g.p, g.l());
    let n = nb * l;
    let hw = g.h * g.w;
    img.par_chunks_mut(hw)
        .with_min_len((4096 / hw.max(1)).max(1))
        .enumerate()
        .for_each(|(idx, plane)| {
            let (b, c) = (idx / g.c, idx % g.c);
            for kh in 0..k {
                let (hlo, hhi) = valid_range(kh, p, s, g.h, g.oh);
                for kw in 0..k {
                    let (wlo, whi) = valid_range(kw, p, s, g.w, g.ow);
                    if wlo >= whi {
                        continue;
                    }
                    let row = &cols[((c * k + kh) * k + kw) * n + b * l..][..l];
                    for oh in hlo..hhi {
                        let src = &row[oh * g.ow + wlo..oh * g.ow + whi];
                        let j0 = (oh * s + kh - p) * g.w + wlo * s + kw - p;
                        scatter_add(&mut plane[j0..j0 + (whi - wlo - 1) * s + 1], src, s);
                    }
                }
            }
        });
}

/// dst[j] = src[j s] for every j; src holds exactly (dst.len() - 1) s + 1 elements (not
/// empty). Strides 1 and 2 (every layer of the DCGANs) get loops with the stride known at
/// compile time and no per-element bounds arithmetic (a `step_by` iterator recomputes its
/// remaining length on every element).
#[inline(always)]
fn gather<T: Copy>(dst: &mut [T], src: &[T], s: usize) {
    match s {
        1 => dst.copy_from_slice(src),
        2 => {
            for (dv, c) in dst.iter_mut().zip(src.chunks(2)) {
                *dv = c[0];
            }
        }
        _ => {
            for (dv, c) in dst.iter_mut().zip(src.chunks(s)) {
                *dv = c[0];
            }
        }
    }
}

/// dst[j s] += src[j] for every j; dst holds exactly (src.len() - 1) s + 1 elements (see
/// [`gather`]).
#[inline(always)]
fn scatter_add<T: WithDType>(dst: &mut [T], src: &[T], s: usize) {
    match s {
        1 => {
            for (dv, sv) in dst.iter_mut().zip(src) {
                *dv += *sv;
            }
        }
        2 => {
            for (c, sv) in dst.chunks_mut(2).zip(src) {
                c[0] += *sv;
            }
        }
        _ => {
            for (c, sv) in dst.chunks_mut(s).zip(src) {
                c[0] += *sv;
            }
        }
    }
}

/// (nb, m, l) -> (m, nb l).
fn batch_to_channel_major<T: WithDType>(src: &[T], nb: usize, m: usize, l: usize, dst: &mut [T]) {
    dst.par_chunks_mut(nb * l).enumerate().for_each(|(i, row)| {
        for b in 0..nb {
            row[b * l..(b + 1) * l].copy_from_slice(&src[(b * m + i) * l..][..l]);
        }
    });
}

/// (m, nb l) -> (nb, m, l).
fn channel_to_batch_major<T: WithDType, S: Slot<T>>(
    src: &[T],
    nb: usize,
    m: usize,
    l: usize,
    dst: &mut [S],
) {
    dst.par_chunks_mut(l)
        .with_min_len((4096 / l.max(1)).max(1))
        .enumerate()
        .for_each(|(idx, d)| {
            let (b, i) = (idx / m, idx % m);
            for (d, v) in d.iter_mut().zip(&src[(i * nb + b) * l..][..l]) {
                d.set(*v);
            }
        });
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Instant;

    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    thread_local! {
        /// Overrides the im2col budget in this thread (to exercise batch chunking).
        pub(super) static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    }

    fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(rng.normal_vec(n), dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let a = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// Gradients of sum(y * r): backpropagating a random cotangent r through y.
    fn grads_of(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
        (y * r).unwrap().sum_all().unwrap().backward().unwrap()
    }

    fn tol(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 1e-5,
            _ => 1e-12,
        }
    }

    /// (B, C, H, W, O, K, stride, padding) for conv2d.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const CONV: &[Case] = &[
        (2, 3, 8, 8, 4, 3, 1, 1),
        (2, 3, 8, 8, 4, 3, 2, 1),   // 8 + 2 - 3 odd: 4x4, last row unused
        (3, 2, 28, 28, 4, 4, 2, 1), // 28 -> 14
        (2, 4, 14, 14, 3, 4, 2, 1), // 14 -> 7
        (2, 3, 7, 7, 2, 7, 1, 0),   // 7 -> 1
        (2, 3, 4, 4, 2, 4, 1, 0),   // 4 -> 1
        (2, 5, 6, 6, 3, 1, 1, 0),   // 1x1
        (2, 2, 6, 6, 3, 1, 2, 0),   // 1x1 stride 2, 6 -> 3
        (2, 3, 10, 9, 4, 3, 2, 0),  // non-square
        (1, 2, 9, 9, 3, 4, 2, 0),   // 9 -> 3, (9 - 4) odd
        (2, 3, 5, 5, 2, 3, 1, 1),
        (1, 1, 1, 1, 3, 1, 1, 0),   // 1x1 spatial
        (2, 3, 2, 2, 4, 4, 1, 1),   // 2 -> 1 through padding
        (2, 3, 4, 4, 2, 4, 2, 0),   // 4 -> 1, stride 2
        (2, 2, 20, 18, 3, 3, 1, 1), // stride 1, rows of 16+: im2col row by row
    ];

    /// (B, Cin, H, W, Cout, K, stride, padding) for conv_transpose2d.
    const CONV_T: &[Case] = &[
        (3, 8, 1, 1, 4, 4, 1, 0),   // DCGAN's first layer, 1 -> 4
        (3, 8, 1, 1, 4, 7, 1, 0),   // 1 -> 7
        (2, 6, 7, 7, 4, 4, 2, 1),   // 7 -> 14
        (2, 4, 14, 14, 1, 4, 2, 1), // 14 -> 28
        (2, 3, 5, 6, 4, 3, 1, 1),   // same size, non-square
        (2, 3, 4, 4, 2, 3, 2, 1),   // 4 -> 7
        (2, 3, 5, 5, 2, 1, 1, 0),   // 1x1
        (2, 3, 4, 4, 2, 3, 2, 0),   // 4 -> 9
        (2, 3, 4, 5, 2, 2, 2, 0),   // 4x5 -> 8x10
        (2, 3, 3, 3, 2, 5, 3, 2),   // stride 3
        (2, 3, 1, 1, 2, 4, 1, 1),   // 1 -> 2 through padding
    ];

    #[test]
    fn forward_matches_candle() {
        let mut rng = Rng::new(1);
        for dtype in [DType::F32, DType::F64] {
            let mut worst = (0.0f64, 0.0f64);
            for &(b, c, h, w, o, k, s, p) in CONV {
                let x = randn(&mut rng, &[b, c, h, w], dtype);
                let wt = randn(&mut rng, &[o, c, k, k], dtype);
                let r = rel(
                    &conv2d(&x, &wt, s, p, None).unwrap(),
                    &x.conv2d(&wt, p, s, 1, 1).unwrap(),
                );
                assert!(
                    r < tol(dtype),
                    "conv2d {dtype:?} {:?}: {r:e}",
                    (b, c, h, w, o, k)
                );
                worst.0 = worst.0.max(r);
            }
            for &(b, c, h, w, o, k, s, p) in CONV_T {
                let x = randn(&mut rng, &[b, c, h, w], dtype);
                let wt = randn(&mut rng, &[c, o, k, k], dtype);
                let r = rel(
                    &conv_transpose2d(&x, &wt, s, p, None).unwrap(),
                    &x.conv_transpose2d(&wt, p, 0, s, 1).unwrap(),
                );
                assert!(
                    r < tol(dtype),
                    "conv_t {dtype:?} {:?}: {r:e}",
                    (b, c, h, w, o, k)
                );
                worst.1 = worst.1.max(r);
            }
            // Output padding (only reachable through backward) against candle's.
            for (op, s) in [(1, 2), (1, 3), (2, 3)] {
                let x = randn(&mut rng, &[2, 3, 4, 5], dtype);
                let wt = randn(&mut rng, &[3, 2, 3, 3], dtype);
                let r = rel(
                    &conv_transpose2d_op(&x, &wt, s, 1, (op, op), None).unwrap(),
                    &x.conv_transpose2d(&wt, 1, op, s, 1).unwrap(),
                );
                assert!(r < tol(dtype), "conv_t output padding {op}: {r:e}");
                worst.1 = worst.1.max(r);
            }
            eprintln!(
                "forward {dtype:?}: worst rel err conv2d {:.1e}, conv_transpose2d {:.1e}",
                worst.0, worst.1
            );
        }
    }

    /// Inside an input-gradient backward of the ops' own mode, a variable weight gets no
    /// gradient and a computed one zeros, while the input gradient is unchanged; the same graph
    /// differentiated again outside it gives both theirs, and so do ops built without that
    /// mode (or without any) while it is set.
    #[test]
    fn input_gradient_backward_skips_weight_gradients() {
        let mut rng = Rng::new(9);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 8, 8], DType::F64)).unwrap();
        let w = Var::from_tensor(&randn(&mut rng, &[4, 3, 4, 4], DType::F64)).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[4, 2, 4, 4], DType::F64)).unwrap();
        let mode = GradMode::new();
        let build = |m: Option<&GradMode>| {
            // w as a variable; wt through a computed tensor (as spectral norm does).
            let wt2 = (wt.as_tensor() * 2.0).unwrap();
            let y = conv2d(x.as_tensor(), &w, 2, 1, m).unwrap();
            let z = conv_transpose2d(&y, &wt2, 2, 1, m).unwrap();
            z.sqr().unwrap().sum_all().unwrap()
        };
        let grads = |g: &candle_core::backprop::GradStore| {
            let get = |t: &Tensor| g.get(t).cloned();
            (get(x.as_tensor()).unwrap(), get(&w), get(wt.as_tensor()))
        };
        let max_abs = |t: &Tensor| -> f64 {
            let m = t.abs().unwrap().max_all().unwrap();
            m.to_scalar::<f64>().unwrap()
        };
        let loss = build(Some(&mode));
        let (gx, gw, gwt) = grads(&mode.inputs_only_while(|| loss.backward()).unwrap());
        assert!(!mode.inputs_only(), "restored");
        let (gx_all, gw_all, gwt_all) = grads(&loss.backward().unwrap());
        assert_eq!(rel(&gx, &gx_all), 0.0);
        assert!(gw.is_none());
        let gwt = gwt.expect("the zeros flow back to the variable");
        assert_eq!(max_abs(&gwt), 0.0);
        assert!(max_abs(&gw_all.unwrap()) > 0.0 && max_abs(&gwt_all.unwrap()) > 0.0);
        // Another pass's mode, or none: every gradient, whatever `mode` says.
        for other in [Some(&GradMode::new()), None] {
            let loss = build(other);
            let (gx2, gw2, gwt2) = grads(&mode.inputs_only_while(|| loss.backward()).unwrap());
            assert_eq!(rel(&gx2, &gx_all), 0.0);
            assert!(max_abs(&gw2.unwrap()) > 0.0 && max_abs(&gwt2.unwrap()) > 0.0);
        }
    }

    #[test]
    fn batch_chunking_gives_the_same_result() {
        let mut rng = Rng::new(2);
        let x = randn(&mut rng, &[5, 3, 9, 9], DType::F64);
        let w = randn(&mut rng, &[4, 3, 3, 3], DType::F64);
        let wt = randn(&mut rng, &[3, 4, 4, 4], DType::F64);
        let run = || {
            let xv = Var::from_tensor(&x).unwrap();
            let y = conv2d(xv.as_tensor(), &w, 2, 1, None).unwrap();
            let z = conv_transpose2d(xv.as_tensor(), &wt, 2, 1, None).unwrap();
            let gx = (y.sqr().unwrap().sum_all().unwrap() + z.sum_all().unwrap())
                .unwrap()
                .backward()
                .unwrap()
                .get(xv.as_tensor())
                .unwrap()
                .clone();
            let gw = weight_grad_op(&x, &y, 2, 1, 3, None, None).unwrap();
            [y, z, gx, gw]
        };
        let whole = run();
        // im2col bytes per sample: 27 rows x 25 columns for conv2d (and its input and weight
        // gradients), 64 x 81 for conv_transpose2d (and its gradients). Budgets for chunks of
        // 1 and 2 (conv2d), then 2 and 3 (conv_transpose2d), the last chunk a remainder.
        for budget in [1, 2]
            .map(|n| n * 27 * 25 * 8)
            .into_iter()
            .chain([2, 3].map(|n| n * 64 * 81 * 8))
        {
            BUDGET.with(|c| c.set(Some(budget)));
            let chunked = run();
            BUDGET.with(|c| c.set(None));
            for (a, b) in chunked.iter().zip(&whole) {
                assert!(rel(a, b) < 1e-14, "budget {budget}: {:e}", rel(a, b));
            }
        }
    }

    #[test]
    fn kept_columns_give_the_same_weight_gradient() {
        let mut rng = Rng::new(12);
        for (dims, wdims, s, p) in [
            ([5, 3, 9, 9], [4, 3, 3, 3], 2, 1),   // rows path
            ([5, 2, 14, 14], [3, 2, 4, 4], 2, 1), // table path
            ([5, 2, 20, 18], [3, 2, 3, 3], 1, 1), // stride 1, long rows
        ] {
            let x = randn(&mut rng, &dims, DType::F32);
            let w = Var::from_tensor(&randn(&mut rng, &wdims, DType::F32)).unwrap();
            let (_, _, h, wd) = x.dims4().unwrap();
            let k = wdims[2];
            let per_sample = wdims[1]
                * k
                * k
                * conv_out(h, k, s, p).unwrap()
                * conv_out(wd, k, s, p).unwrap()
                * 4;
            // Chunks of 2 samples (2 + 2 + 1) in the forward; the weight gradient must use the
            // forward's chunking even when the budget has changed since.
            BUDGET.with(|c| c.set(Some(2 * per_sample)));
            let slot = Arc::new(ColsSlot::new());
            let op = Conv2dOp {
                s,
                p,
                cols: Some(slot.clone()),
                act: None,
                mode: None,
            };
            let y = x.apply_op2(w.as_tensor(), op).unwrap();
            BUDGET.with(|c| c.set(Some(3 * per_sample)));
            assert_eq!(
                slot.get().map(|k| k.chunk),
                Some(2),
                "{dims:?}: no columns kept"
            );
            let r = randn(&mut rng, y.dims(), DType::F32);
            let kept = grads_of(&y, &r);
            let kept = kept.get(w.as_tensor()).unwrap();
            // Built afresh with the forward's chunking (with chunks of 3 the sums round
            // differently, which is how a kept gradient that ignored the kept chunking would
            // show).
            BUDGET.with(|c| c.set(Some(2 * per_sample)));
            let fresh = weight_grad_op(&x, &r, s, p, k, None, None).unwrap();
            BUDGET.with(|c| c.set(None));
            let (a, b) = (
                kept.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                fresh.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            // The same columns and the same gemm calls: equal to the last bit.
            assert_eq!(a, b, "{dims:?}");
            // And the same as candle's (chunked sums differ from its order by rounding).
            let theirs = reference_conv2d(&x, w.as_tensor(), s, p);
            let g = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let e = rel(g.get(w.as_tensor()).unwrap(), kept);
            assert!(e < 1e-5, "{dims:?}: {e:e}");
        }
    }

    #[test]
    fn columns_are_kept_only_for_a_weight_that_needs_a_gradient() {
        let mut rng = Rng::new(13);
        let x = randn(&mut rng, &[2, 3, 8, 8], DType::F32);
        let w = randn(&mut rng, &[4, 3, 4, 4], DType::F32);
        let kept = |w: &Tensor| {
            let op = Conv2dOp::keeping(2, 1, w, None);
            let slot = op.cols.clone();
            x.apply_op2(w, op).unwrap();
            slot.is_some_and(|s| s.get().is_some())
        };
        assert!(!kept(&w));
        assert!(kept(Var::from_tensor(&w).unwrap().as_tensor()));
    }

    /// candle's conv2d, made to give the right input gradient for non-square images: its
    /// backward takes the output padding of the height for the width as well, so pad the
    /// image with zeros (which leaves the output alone) until both agree.
    fn reference_conv2d(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
        let (_, _, h, wd) = x.dims4().unwrap();
        let k = w.dim(2).unwrap();
        let (rh, rw) = ((h + 2 * p - k) % s, (wd + 2 * p - k) % s);
        let x = if rh > rw {
            x.pad_with_zeros(3, 0, rh - rw).unwrap()
        } else {
            x.pad_with_zeros(2, 0, rw - rh).unwrap()
        };
        x.conv2d(w, p, s, 1, 1).unwrap()
    }

    #[test]
    fn first_order_gradients_match_candle() {
        let mut rng = Rng::new(3);
        for dtype in [DType::F32, DType::F64] {
            let mut worst = 0.0f64;
            let cases = CONV
                .iter()
                .map(|&c| (false, c))
                .chain(CONV_T.iter().map(|&c| (true, c)));
            for (transposed, (b, c, h, w, o, k, s, p)) in cases {
                let x = Var::from_tensor(&randn(&mut rng, &[b, c, h, w], dtype)).unwrap();
                let wdims = if transposed {
                    [c, o, k, k]
                } else {
                    [o, c, k, k]
                };
                let wt = Var::from_tensor(&randn(&mut rng, &wdims, dtype)).unwrap();
                let (xt, wtt) = (x.as_tensor(), wt.as_tensor());
                let (ours, theirs) = if transposed {
                    (
                        conv_transpose2d(xt, wtt, s, p, None).unwrap(),
                        xt.conv_transpose2d(wtt, p, 0, s, 1).unwrap(),
                    )
                } else {
                    (
                        conv2d(xt, wtt, s, p, None).unwrap(),
                        reference_conv2d(xt, wtt, s, p),
                    )
                };
                let r = randn(&mut rng, ours.dims(), dtype);
                let (g1, g2) = (grads_of(&ours, &r), grads_of(&theirs, &r));
                for v in [xt, wtt] {
                    let e = rel(g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert!(
                        e < tol(dtype),
                        "{dtype:?} transposed {transposed} {:?}: {e:e}",
                        (b, c, h, w, o, k, s, p)
                    );
                    worst = worst.max(e);
                }
            }
            eprintln!("first-order gradients {dtype:?}: worst rel err {worst:.1e}");
        }
    }

    /// Weight gradients of few output elements over many positions are two half-length
    /// products summed ([`splits_sum`]); against candle's, whole and in batch chunks whose
    /// last one is shorter.
    #[test]
    fn split_sum_weight_gradients_match_candle() {
        let mut rng = Rng::new(11);
        // O C K K = 16 * 3 * 4 * 4 = 768 weights; n = 8 * 16 * 16 = 2048 positions whole
        // (conv2d of 8 x 32 x 32, or conv_transpose2d from 8 x 16 x 16: the same product on
        // its column side); chunked, 11 images of 64 x 64 in chunks of 6 and 5 (n = 6144, 5120).
        assert!(splits_sum(768, 2048) && splits_sum(768, 6 * 1024));
        for dtype in [DType::F32, DType::F64] {
            let chunk_budget = 8 * 48 * 1024 * dtype.size_in_bytes();
            for (transposed, budget) in [(false, None), (true, None), (false, Some(chunk_budget))] {
                let (xd, wd) = match (transposed, budget) {
                    (true, _) => ([8, 16, 16, 16], [16, 3, 4, 4]),
                    (false, None) => ([8, 3, 32, 32], [16, 3, 4, 4]),
                    (false, Some(_)) => ([11, 3, 64, 64], [16, 3, 4, 4]),
                };
                let x = Var::from_tensor(&randn(&mut rng, &xd, dtype)).unwrap();
                let wt = Var::from_tensor(&randn(&mut rng, &wd, dtype)).unwrap();
                let (xt, wtt) = (x.as_tensor(), wt.as_tensor());
                BUDGET.with(|c| c.set(budget));
                let ours = if transposed {
                    conv_transpose2d(xt, wtt, 2, 1, None).unwrap()
                } else {
                    conv2d(xt, wtt, 2, 1, None).unwrap()
                };
                let r = randn(&mut rng, ours.dims(), dtype);
                let g1 = grads_of(&ours, &r);
                BUDGET.with(|c| c.set(None));
                let theirs = if transposed {
                    xt.conv_transpose2d(wtt, 1, 0, 2, 1).unwrap()
                } else {
                    xt.conv2d(wtt, 1, 2, 1, 1).unwrap()
                };
                let g2 = grads_of(&theirs, &r);
                let e = rel(g1.get(wtt).unwrap(), g2.get(wtt).unwrap());
                assert!(
                    e < tol(dtype),
                    "{dtype:?} transposed {transposed} budget {budget:?}: {e:e}"
                );
            }
        }
    }

    #[test]
    fn untracked_input_gets_no_gradient() {
        let mut rng = Rng::new(4);
        let x = randn(&mut rng, &[2, 3, 8, 8], DType::F64);
        let w = Var::from_tensor(&randn(&mut rng, &[4, 3, 4, 4], DType::F64)).unwrap();
        let y = conv2d(&x, w.as_tensor(), 2, 1, None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        let want = x
            .conv2d(w.as_tensor(), 1, 2, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let e = rel(
            g.get(w.as_tensor()).unwrap(),
            want.get(w.as_tensor()).unwrap(),
        );
        assert!(e < 1e-12, "{e:e}");
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let mut rng = Rng::new(5);
        let x = randn(&mut rng, &[2, 3, 6, 6], DType::F16);
        let w = randn(&mut rng, &[4, 3, 3, 3], DType::F16);
        let wt = randn(&mut rng, &[3, 4, 3, 3], DType::F16);
        let a = conv2d(&x, &w, 1, 1, None).unwrap();
        assert_eq!(rel(&a, &x.conv2d(&w, 1, 1, 1, 1).unwrap()), 0.0);
        let a = conv_transpose2d(&x, &wt, 2, 1, None).unwrap();
        assert_eq!(rel(&a, &x.conv_transpose2d(&wt, 1, 0, 2, 1).unwrap()), 0.0);
        // Mismatched dtypes are an error, not a panic.
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(conv2d(&x.to_dtype(DType::F32).unwrap(), &w64, 1, 1, None).is_err());
        // Empty batches and channels give zeros of the right shape.
        let e = Tensor::zeros((0, 3, 6, 6), DType::F64, &Device::Cpu).unwrap();
        let w64 = randn(&mut rng, &[4, 3, 3, 3], DType::F64);
        assert_eq!(conv2d(&e, &w64, 1, 1, None).unwrap().dims(), &[0, 4, 6, 6]);
        let e = Tensor::zeros((2, 0, 6, 6), DType::F64, &Device::Cpu).unwrap();
        let w0 = Tensor::zeros((4, 0, 3, 3), DType::F64, &Device::Cpu).unwrap();
        let y = conv2d(&e, &w0, 1, 1, None).unwrap();
        assert_eq!(y.dims(), &[2, 4, 6, 6]);
        assert_eq!(
            y.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        let wt0 = Tensor::zeros((0, 4, 3, 3), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            conv_transpose2d(&e, &wt0, 2, 1, None).unwrap().dims(),
            &[2, 4, 11, 11]
        );
        // So are mismatched channels.
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(
            conv2d(
                &x64,
                &randn(&mut rng, &[4, 2, 3, 3], DType::F64),
                1,
                1,
                None
            )
            .is_err()
        );
    }

    #[derive(Clone, Copy, Debug)]
    enum Layer {
        Conv,
        ConvT,
    }

    type Net = (
        [usize; 4],
        (Layer, [usize; 4], usize, usize),
        (Layer, [usize; 4], usize, usize),
    );

    fn apply(layer: Layer, x: &Tensor, w: &Tensor, s: usize, p: usize, ours: bool) -> Tensor {
        match (layer, ours) {
            (Layer::Conv, true) => conv2d(x, w, s, p, None).unwrap(),
            (Layer::ConvT, true) => conv_transpose2d(x, w, s, p, None).unwrap(),
            (Layer::Conv, false) => x.conv2d(w, p, s, 1, 1).unwrap(),
            (Layer::ConvT, false) => x.conv_transpose2d(w, p, 0, s, 1).unwrap(),
        }
    }

    /// r * f(x) summed, for f = layer2(leaky_relu(layer1(x))).
    fn net_out(net: &Net, x: &Tensor, w: [&Tensor; 2], r: &Tensor, ours: bool) -> Tensor {
        let (_, (l1, _, s1, p1), (l2, _, s2, p2)) = *net;
        let h = apply(l1, x, w[0], s1, p1, ours);
        let h = h.maximum(&(&h * 0.2).unwrap()).unwrap();
        let y = apply(l2, &h, w[1], s2, p2, ours);
        (y * r).unwrap().sum_all().unwrap()
    }

    /// Checks d pen / d v for every entry of every var against central finite differences
    /// (`pen(true)`, our ops) and against candle's analytic gradient (`pen(false)`, candle's
    /// ops); returns the worst relative errors. Entries are compared relative to the larger
    /// of the two values, floored at 1e-3 of the largest gradient entry of that var.
    fn check_penalty(label: &str, vars: &[&Var], pen: &dyn Fn(bool) -> Tensor) -> (f64, f64) {
        let dev = Device::Cpu;
        let h = 1e-4;
        let grads = pen(true).backward().unwrap();
        let theirs = pen(false).backward().unwrap();
        let mut worst_fd = 0.0f64;
        let mut worst_candle = 0.0f64;
        for var in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient"));
            worst_candle = worst_candle.max(rel(g, theirs.get(var.as_tensor()).unwrap()));
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for idx in 0..orig.len() {
                let eval = |d: f64| {
                    let mut v = orig.clone();
                    v[idx] += d;
                    var.set(&Tensor::from_vec(v, var.dims(), &dev).unwrap())
                        .unwrap();
                    pen(true).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let e = (g[idx] - fd).abs() / g[idx].abs().max(fd.abs()).max(1e-3 * scale);
                assert!(
                    e < 1e-6,
                    "{label} [{idx}]: analytic {} vs finite difference {fd} ({e:e})",
                    g[idx]
                );
                worst_fd = worst_fd.max(e);
            }
            var.set(&Tensor::from_vec(orig, var.dims(), &dev).unwrap())
                .unwrap();
        }
        (worst_fd, worst_candle)
    }

    const NETS: [Net; 3] = [
        // conv2d (8 -> 4, uncovered last row) -> conv_transpose2d (4 -> 8)
        (
            [2, 2, 8, 8],
            (Layer::Conv, [3, 2, 3, 3], 2, 1),
            (Layer::ConvT, [3, 2, 4, 4], 2, 1),
        ),
        // conv2d (9 -> 9) -> conv2d (9 -> 3, uncovered last row)
        (
            [2, 2, 9, 9],
            (Layer::Conv, [4, 2, 3, 3], 1, 1),
            (Layer::Conv, [1, 4, 4, 4], 2, 0),
        ),
        // conv_transpose2d (3 -> 6) -> conv2d (6 -> 3)
        (
            [2, 3, 3, 3],
            (Layer::ConvT, [3, 4, 4, 4], 2, 1),
            (Layer::Conv, [2, 4, 3, 3], 2, 1),
        ),
    ];

    /// Random input, weights and output weights r for a net.
    fn setup(net: &Net, rng: &mut Rng) -> (Var, Var, Var, Tensor) {
        let f = DType::F64;
        let x = Var::from_tensor(&randn(rng, &net.0, f)).unwrap();
        let w1 = Var::from_tensor(&randn(rng, &(net.1).1, f)).unwrap();
        let w2 = Var::from_tensor(&randn(rng, &(net.2).1, f)).unwrap();
        let y = {
            let h = apply((net.1).0, x.as_tensor(), &w1, (net.1).2, (net.1).3, false);
            apply((net.2).0, &h, &w2, (net.2).2, (net.2).3, false)
        };
        let r = randn(rng, y.dims(), f);
        (x, w1, w2, r)
    }

    /// Gradient penalty as in WGAN-GP / R1: sum((d sum(r f(x)) / dx)^2), differentiated with
    /// respect to the weights.
    #[test]
    fn double_backward_matches_finite_differences() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(6);
        for net in &NETS {
            let (x, w1, w2, r) = setup(net, &mut rng);
            let x = x.as_tensor().detach();
            let pen = |ours: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let out = net_out(net, xv.as_tensor(), [&w1, &w2], &r, ours);
                let g = out.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
                g.sqr().unwrap().sum_all().unwrap()
            };
            let label = format!("input-gradient penalty {net:?}");
            let (fd, candle) = check_penalty(&label, &[&w1, &w2], &pen);
            assert!(candle < 1e-12, "{label} vs candle: {candle:e}");
            eprintln!(
                "input-gradient penalty {:?}/{:?}: worst rel err vs finite differences {fd:.1e}, \
                 vs candle's ops {candle:.1e}",
                (net.1).0,
                (net.2).0
            );
        }
    }

    /// A penalty on the weight gradients and the input gradient together, differentiated with
    /// respect to the weights and the input: runs the backward of the weight-gradient op.
    #[test]
    fn weight_gradient_double_backward_matches_finite_differences() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(8);
        for net in &NETS {
            let (x, w1, w2, r) = setup(net, &mut rng);
            let pen = |ours: bool| {
                let out = net_out(net, x.as_tensor(), [&w1, &w2], &r, ours);
                let g = out.backward().unwrap();
                let sq = |v: &Var| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                ((sq(&w1) + sq(&w2)).unwrap() + sq(&x)).unwrap()
            };
            let label = format!("weight-gradient penalty {net:?}");
            let (fd, candle) = check_penalty(&label, &[&w1, &w2, &x], &pen);
            eprintln!(
                "weight-gradient penalty {:?}/{:?}: worst rel err vs finite differences {fd:.1e}, \
                 vs candle's ops {candle:.1e}",
                (net.1).0,
                (net.2).0
            );
        }
    }

    /// conv2d with the activation fused gives the same bits as conv2d then the activation op:
    /// values, first-order gradients of x and w, and the gradient with respect to w of an
    /// input-gradient penalty (WGAN-GP's path), in f32 and f64, for ReLU and leaky ReLU.
    /// Output channel 0 has an all-zero kernel, so its pre-activation is exactly 0 and the
    /// gradient there must use the tie value (1 for ReLU, 0.6 for leaky ReLU).
    #[test]
    fn activation_fused_conv_matches_separate_ops_bit_for_bit() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(31);
        let bits = |t: &Tensor| -> Vec<u64> {
            let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            v.to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        for dtype in [DType::F32, DType::F64] {
            for &(b, c, h, o, k, s, p) in &[(2, 3, 8, 4, 4, 2, 1), (3, 2, 7, 3, 3, 1, 1)] {
                let x0 = randn(&mut rng, &[b, c, h, h], dtype);
                let keep = Tensor::from_vec(
                    (0..o)
                        .map(|i| f64::from(u8::from(i > 0)))
                        .collect::<Vec<_>>(),
                    (o, 1, 1, 1),
                    &Device::Cpu,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let w0 = randn(&mut rng, &[o, c, k, k], dtype)
                    .broadcast_mul(&keep)
                    .unwrap();
                let oh = (h + 2 * p - k) / s + 1;
                let r = randn(&mut rng, &[b, o, oh, oh], dtype);
                for act in [LeakyRelu::RELU, LeakyRelu::LEAKY] {
                    let run = |fused: bool| -> Vec<Vec<u64>> {
                        let (x, w) = (
                            Var::from_tensor(&x0).unwrap(),
                            Var::from_tensor(&w0).unwrap(),
                        );
                        let f = |x: &Tensor| {
                            if fused {
                                conv2d_act(x, w.as_tensor(), s, p, act, None).unwrap()
                            } else {
                                act.apply(&conv2d(x, w.as_tensor(), s, p, None).unwrap())
                                    .unwrap()
                            }
                        };
                        let y = f(x.as_tensor());
                        let g = grads_of(&y, &r);
                        let (gx, gw) =
                            (g.get(x.as_tensor()).unwrap(), g.get(w.as_tensor()).unwrap());
                        // sum((d sum(r f(x)) / dx)^2), differentiated with respect to w.
                        let pen = gx.sqr().unwrap().sum_all().unwrap();
                        let gpen = pen.backward().unwrap();
                        let gpw = gpen.get(w.as_tensor()).unwrap();
                        vec![bits(&y), bits(gx), bits(gw), bits(gpw)]
                    };
                    let (fused, sep) = (run(true), run(false));
                    for (i, (a, b)) in fused.iter().zip(&sep).enumerate() {
                        assert!(
                            a == b,
                            "{dtype:?} slope {}: output {i} differs",
                            act.slope()
                        );
                    }
                    // The zero channel sits on the kink and still passes a gradient to x.
                    let y = &fused[0];
                    let plane = oh * oh;
                    assert!(
                        (0..y.len())
                            .filter(|i| (i / plane) % o == 0)
                            .all(|i| f64::from_bits(y[i]) == 0.0)
                    );
                    assert!(fused[1].iter().any(|&v| f64::from_bits(v) != 0.0));
                    assert!(fused[3].iter().any(|&v| f64::from_bits(v) != 0.0));
                }
            }
        }
    }

    /// Median wall time of `f` over `n` runs after one warm-up, in ms.
    fn time_ms(n: usize, mut f: impl FnMut()) -> f64 {
        f();
        let mut t: Vec<f64> = (0..n)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[n / 2]
    }

    /// A timed pass: name, candle's version, ours.
    type Pass<'a> = (&'static str, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>);

    /// The two im2col / col2im implementations (rows; offset table and pixel gather) give
    /// identical results (same values, same order of additions) on geometries that each of
    /// them serves in practice.
    #[test]
    fn table_and_row_paths_agree() {
        let mut rng = Rng::new(5);
        // (nb, c, h, w, k, s, p)
        let cases = [
            (3, 2, 14, 14, 4, 2, 1),
            (2, 3, 20, 17, 3, 1, 1),
            (2, 2, 9, 11, 3, 2, 0),
            (1, 2, 7, 7, 7, 1, 0),
            (2, 1, 10, 10, 5, 3, 2),
            (2, 2, 18, 18, 3, 1, 0),
        ];
        for (nb, c, h, w, k, s, p) in cases {
            let g = Geom {
                b: nb,
                c,
                h,
                w,
                o: 1,
                oh: conv_out(h, k, s, p).unwrap(),
                ow: conv_out(w, k, s, p).unwrap(),
                k,
                s,
                p,
            };
            let img: Vec<f64> = rng.normal_vec(nb * g.img());
            let n = g.ckk() * nb * g.l();
            let (mut a, mut b) = (vec![f64::NAN; n], vec![f64::NAN; n]);
            im2col_rows(&g, nb, &img, &mut a);
            im2col_table(&g, nb, &img, &mut b);
            assert_eq!(a, b, "im2col {:?}", (nb, c, h, w, k, s, p));
            let cols: Vec<f64> = rng.normal_vec(n);
            let (mut a, mut b) = (vec![0.0; img.len()], vec![0.0; img.len()]);
            col2im_rows(&g, nb, &cols, &mut a);
            col2im_gather(&g, nb, &cols, &mut b);
            assert_eq!(a, b, "col2im {:?}", (nb, c, h, w, k, s, p));
        }
    }

    /// im2col / col2im alone, row by row against the table / gather, on the DCGAN-28 and
    /// DCGAN-64 layer shapes (batch chunk as the kernels use it):
    /// `cargo test --release --lib kernels::conv::tests::bench_im2col -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_im2col() {
        let geoms = [
            ("D conv 64->128 14->7", 64, 14, 7, 128, 20),
            ("D conv 11->64 28->14", 11, 28, 14, 64, 64),
            ("D64 conv 64->128 32->16", 64, 32, 16, 128, 4),
            ("D64 conv 3->64 64->32", 3, 64, 32, 64, 16),
        ];
        for (name, c, h, oh, o, nb) in geoms {
            let g = Geom {
                b: nb,
                c,
                h,
                w: h,
                o,
                oh,
                ow: oh,
                k: 4,
                s: 2,
                p: 1,
            };
            let mut rng = Rng::new(3);
            let img: Vec<f32> = rng
                .normal_vec(nb * g.img())
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let mut cols = vec![0f32; g.ckk() * nb * g.l()];
            let mut back = vec![0f32; nb * g.img()];
            let ms = |f: &mut dyn FnMut()| time_ms(15, f);
            let a = ms(&mut || im2col_rows(&g, nb, &img, &mut cols));
            let ref_cols = cols.clone();
            let b = ms(&mut || im2col_table(&g, nb, &img, &mut cols));
            assert_eq!(ref_cols, cols);
            let c2 = ms(&mut || {
                back.fill(0.0);
                col2im_rows(&g, nb, &cols, &mut back)
            });
            let ref_back = back.clone();
            let d = ms(&mut || col2im_gather(&g, nb, &cols, &mut back));
            assert_eq!(ref_back, back);
            let mb = (cols.len() * 4) as f64 / 1e6;
            println!(
                "{name} x{nb} ({mb:.1} MB of cols): im2col rows {a:.3} ms, table {b:.3} ms; \
                 col2im rows {c2:.3} ms, gather {d:.3} ms"
            );
        }
    }

    /// `cargo test --release --lib kernels::conv -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench() {
        let mut rng = Rng::new(7);
        let f = DType::F32;
        let n = 7;
        println!("threads: {}", rayon::current_num_threads());
        // The gemm ceiling under the current load: one matmul as large as the big layers.
        let (a, b) = (
            randn(&mut rng, &[128, 1024], f),
            randn(&mut rng, &[1024, 3136], f),
        );
        let t = time_ms(n, || drop(a.matmul(&b).unwrap()));
        println!(
            "plain matmul 128x1024 @ 1024x3136 (0.82 GFLOP): {t:.2} ms ({:.0} GFLOP/s)",
            0.822 / t * 1e3
        );
        // Per pass: (name, transposed, x dims, w dims, stride, padding), batch 64.
        let layers = [
            (
                "G convT 100->256 1->7 k7",
                true,
                [64, 100, 1, 1],
                [100, 256, 7, 7],
                1,
                0,
            ),
            (
                "G convT 128->64 7->14",
                true,
                [64, 128, 7, 7],
                [128, 64, 4, 4],
                2,
                1,
            ),
            (
                "G convT 64->1 14->28",
                true,
                [64, 64, 14, 14],
                [64, 1, 4, 4],
                2,
                1,
            ),
            (
                "D conv 1->64 28->14",
                false,
                [64, 1, 28, 28],
                [64, 1, 4, 4],
                2,
                1,
            ),
            (
                "D conv 64->128 14->7",
                false,
                [64, 64, 14, 14],
                [128, 64, 4, 4],
                2,
                1,
            ),
        ];
        for (name, transposed, xd, wd, s, p) in layers {
            let x = randn(&mut rng, &xd, f);
            let w = randn(&mut rng, &wd, f);
            let k = wd[2];
            let y = if transposed {
                conv_transpose2d(&x, &w, s, p, None).unwrap()
            } else {
                conv2d(&x, &w, s, p, None).unwrap()
            };
            let gy = randn(&mut rng, y.dims(), f);
            // MACs: column-side elements x image channels x k^2.
            let (cols, img_c) = if transposed {
                (x.elem_count(), wd[1])
            } else {
                (y.elem_count(), xd[1])
            };
            let gflop = 2.0 * (cols * img_c * k * k) as f64 / 1e9;
            let op =
                output_padding(y.dims()[2].max(xd[2]), y.dims()[2].min(xd[2]), k, s, p).unwrap();
            // candle's passes as its backprop runs them.
            let candle_wgrad = |img: &Tensor, cols: &Tensor| {
                img.transpose(0, 1)
                    .unwrap()
                    .conv2d(&cols.transpose(0, 1).unwrap(), p, 1, s, 1)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .narrow(2, 0, k)
                    .unwrap()
                    .narrow(3, 0, k)
                    .unwrap()
            };
            let passes: [Pass; 3] = if transposed {
                [
                    (
                        "forward",
                        Box::new(|| drop(x.conv_transpose2d(&w, p, 0, s, 1).unwrap())),
                        Box::new(|| drop(conv_transpose2d(&x, &w, s, p, None).unwrap())),
                    ),
                    (
                        "grad input",
                        Box::new(|| drop(gy.conv2d(&w, p, s, 1, 1).unwrap())),
                        Box::new(|| drop(conv2d(&gy, &w, s, p, None).unwrap())),
                    ),
                    (
                        "grad weight",
                        Box::new(|| drop(candle_wgrad(&gy, &x).transpose(0, 1).unwrap())),
                        Box::new(|| drop(weight_grad_op(&gy, &x, s, p, k, None, None).unwrap())),
                    ),
                ]
            } else {
                [
                    (
                        "forward",
                        Box::new(|| drop(x.conv2d(&w, p, s, 1, 1).unwrap())),
                        Box::new(|| drop(conv2d(&x, &w, s, p, None).unwrap())),
                    ),
                    (
                        "grad input",
                        Box::new(|| drop(gy.conv_transpose2d(&w, p, op, s, 1).unwrap())),
                        Box::new(|| {
                            drop(conv_transpose2d_op(&gy, &w, s, p, (op, op), None).unwrap())
                        }),
                    ),
                    (
                        "grad weight",
                        Box::new(|| drop(candle_wgrad(&x, &gy))),
                        Box::new(|| drop(weight_grad_op(&x, &gy, s, p, k, None, None).unwrap())),
                    ),
                ]
            };
            for (pass, theirs, ours) in &passes {
                let tc = time_ms(n, theirs);
                let to = time_ms(n, ours);
                println!(
                    "{name} {pass}, batch 64 ({gflop:.2} GFLOP): candle {tc:.2} ms, ours {to:.2} ms \
                     ({:.1}x, {:.0} GFLOP/s)",
                    tc / to,
                    gflop / to * 1e3
                );
            }
        }
        // DCGAN-28 without norms: G = convT(128->64, 7->14), lrelu, convT(64->1, 14->28),
        // tanh; D = conv(1->64, 28->14), lrelu, conv(64->128, 14->7), lrelu, sum.
        let h0 = Var::from_tensor(&randn(&mut rng, &[64, 128, 7, 7], f)).unwrap();
        let real = randn(&mut rng, &[64, 1, 28, 28], f);
        let mk = |rng: &mut Rng, d: &[usize]| {
            Var::from_tensor(&(randn(rng, d, f) * 0.05).unwrap()).unwrap()
        };
        let (g1, g2) = (mk(&mut rng, &[128, 64, 4, 4]), mk(&mut rng, &[64, 1, 4, 4]));
        let (d1, d2) = (mk(&mut rng, &[64, 1, 4, 4]), mk(&mut rng, &[128, 64, 4, 4]));
        let lrelu = |t: Tensor| t.maximum(&(&t * 0.2).unwrap()).unwrap();
        let disc = |x: &Tensor, ours: bool| -> Tensor {
            let h = if ours {
                conv2d(x, d1.as_tensor(), 2, 1, None).unwrap()
            } else {
                x.conv2d(d1.as_tensor(), 1, 2, 1, 1).unwrap()
            };
            let h = lrelu(h);
            let h = if ours {
                conv2d(&h, d2.as_tensor(), 2, 1, None).unwrap()
            } else {
                h.conv2d(d2.as_tensor(), 1, 2, 1, 1).unwrap()
            };
            lrelu(h).sum_all().unwrap()
        };
        let gen_step = |ours: bool| {
            let h = if ours {
                conv_transpose2d(h0.as_tensor(), g1.as_tensor(), 2, 1, None).unwrap()
            } else {
                h0.as_tensor()
                    .conv_transpose2d(g1.as_tensor(), 1, 0, 2, 1)
                    .unwrap()
            };
            let h = lrelu(h);
            let img = if ours {
                conv_transpose2d(&h, g2.as_tensor(), 2, 1, None).unwrap()
            } else {
                h.conv_transpose2d(g2.as_tensor(), 1, 0, 2, 1).unwrap()
            };
            disc(&img.tanh().unwrap(), ours).backward().unwrap();
        };
        let d_real_step = |ours: bool| {
            disc(&real, ours).backward().unwrap();
        };
        for (name, step) in [
            (
                "G forward+backward through D (all tracked)",
                &gen_step as &dyn Fn(bool),
            ),
            (
                "D forward+backward on real images",
                &d_real_step as &dyn Fn(bool),
            ),
        ] {
            let tc = time_ms(n, || step(false));
            let to = time_ms(n, || step(true));
            println!(
                "DCGAN-28 {name}, batch 64: candle {tc:.1} ms, ours {to:.1} ms ({:.1}x)",
                tc / to
            );
        }
    }
}
