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
//! Off the CPU both run [`super::conv_gemm`] (candle tensor ops around one matmul, for the
//! GPU); for dtypes other than f32/f64 on the CPU, or for non-square kernels, candle's own ops.
//! `GANSCOPE_CONV` overrides the choice (see [`ConvImpl`]).
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
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Result, Shape, Tensor,
    WithDType, bail,
};
use rayon::prelude::*;

use super::conv_gemm::{self, ConvImpl, OnDevice, forward_on};
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
    match route(x, w) {
        Route::Ops => x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv2dOp::keeping(stride, padding, x, w, mode),
        ),
        Route::Candle => x.conv2d(w, padding, stride, 1, 1),
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
    match route(x, w) {
        Route::Ops => conv_transpose2d_op(x, w, stride, padding, (0, 0), mode),
        Route::Candle => x.conv_transpose2d(w, padding, 0, stride, 1),
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
    match route(x, w) {
        Route::Ops if fuses_activation(x) => {
            let mut op = Conv2dOp::keeping(stride, padding, x, w, mode);
            op.act = Some((act, Arc::default()));
            Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
        }
        Route::Ops => act.apply(&conv2d(x, w, stride, padding, mode)?),
        Route::Candle => act.apply(&x.conv2d(w, padding, stride, 1, 1)?),
    }
}

/// Which implementation runs a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The custom ops of this module: the CPU kernels on the CPU, [`super::conv_gemm`]'s
    /// forward elsewhere (or with `GANSCOPE_CONV=gemm`); their backward passes are these ops
    /// again on every device.
    Ops,
    /// candle's own conv2d / conv_transpose2d.
    Candle,
}

fn route(x: &Tensor, w: &Tensor) -> Route {
    let usable = x.rank() == 4
        && w.rank() == 4
        && w.dims()[2] == w.dims()[3]
        && x.dtype() == w.dtype()
        && x.dtype().is_float()
        && x.device().same_device(w.device());
    match ConvImpl::current() {
        ConvImpl::Candle => Route::Candle,
        _ if !usable => Route::Candle,
        // Other dtypes on the CPU: candle's ops, unless the gemm path is asked for.
        _ if x.device().is_cpu() && !cpu_dtype(x.dtype()) && !gemm_on_cpu() => Route::Candle,
        _ => Route::Ops,
    }
}

/// The dtypes of the CPU kernels.
fn cpu_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// Whether the custom ops run [`super::conv_gemm`]'s composite on the CPU too:
/// `GANSCOPE_CONV=gemm`, or [`GEMM_ON_CPU`] in this thread.
fn gemm_on_cpu() -> bool {
    ConvImpl::current() == ConvImpl::Gemm || GEMM_ON_CPU.with(|g| g.get())
}

/// Whether the CPU kernels run a custom op's forward on the CPU (else [`super::conv_gemm`]'s
/// composite does).
fn cpu_kernels_take(dtype: DType) -> bool {
    cpu_dtype(dtype) && !gemm_on_cpu()
}

thread_local! {
    /// Runs the custom ops' forwards on the CPU through [`super::conv_gemm`] in this thread:
    /// the GPU path, checked on the CPU by the tests.
    pub(crate) static GEMM_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a conv2d on `x` fuses its activation (the CPU kernels only).
fn fuses_activation(x: &Tensor) -> bool {
    x.device().is_cpu() && cpu_kernels_take(x.dtype())
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
pub(crate) fn conv_transpose2d_op(
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

/// [`weight_grad_op`] without a kept im2col or a backward mode (`ganscope bench --model
/// kernels` times it).
pub(crate) fn conv2d_weight_grad(
    x: &Tensor,
    g: &Tensor,
    s: usize,
    p: usize,
    k: usize,
) -> Result<Tensor> {
    weight_grad_op(x, g, s, p, k, None, None)
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
pub(crate) fn output_padding(
    img: usize,
    out: usize,
    k: usize,
    s: usize,
    p: usize,
) -> Result<usize> {
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
    /// A conv2d that keeps its columns for the weight gradient, if `w` will get one and the
    /// CPU kernels run it.
    fn keeping(s: usize, p: usize, x: &Tensor, w: &Tensor, mode: Option<&GradMode>) -> Self {
        Self {
            s,
            p,
            cols: (w.track_op() && fuses_activation(x)).then(Arc::default),
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

/// `cuda_fwd` and `metal_fwd` of a conv custom op: its [`Composite::gemm_fwd`].
macro_rules! gpu_forwards {
    () => {
        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.gemm_fwd(s1, l1, s2, l2)
        }

        fn metal_fwd(
            &self,
            s1: &MetalStorage,
            l1: &Layout,
            s2: &MetalStorage,
            l2: &Layout,
        ) -> Result<(MetalStorage, Shape)> {
            self.gemm_fwd(s1, l1, s2, l2)
        }
    };
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
        if !cpu_kernels_take(s1.dtype()) {
            if self.act.is_some() {
                bail!("{}: a fused activation needs the CPU kernels", self.name());
            }
            return self.gemm_fwd(s1, l1, s2, l2);
        }
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

    gpu_forwards!();

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
        Ok((GradMode::settle(mode, gx), GradMode::settle(mode, gw)))
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
        if !cpu_kernels_take(s1.dtype()) {
            return self.gemm_fwd(s1, l1, s2, l2);
        }
        dispatch(self, s1, l1, s2, l2)
    }

    gpu_forwards!();

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
        Ok((GradMode::settle(mode, gx), GradMode::settle(mode, gw)))
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
        if !cpu_kernels_take(s1.dtype()) {
            return self.gemm_fwd(s1, l1, s2, l2);
        }
        dispatch(self, s1, l1, s2, l2)
    }

    gpu_forwards!();

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

/// A conv op's forward as [`conv_gemm`]'s composite of tensor ops: what it runs off the CPU
/// kernels, on copies of its arguments outside candle's graph ([`forward_on`]).
trait Composite {
    fn composite(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    fn gemm_fwd<S: OnDevice>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> Result<(S, Shape)> {
        forward_on(s1, l1, s2, l2, |a, b| self.composite(a, b))
    }
}

impl Composite for Conv2dOp {
    fn composite(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        conv_gemm::conv2d(x, w, self.s, self.p)
    }
}

impl Composite for ConvT2dOp {
    fn composite(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        conv_gemm::conv_transpose2d(x, w, self.s, self.p, (self.oph, self.opw))
    }
}

impl Composite for WeightGradOp {
    fn composite(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        conv_gemm::conv2d_weight_grad(x, g, self.s, self.p, self.k)
    }
}

/// Sizes of one convolution, in image-side / column-side terms (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Geom {
    pub(crate) b: usize,
    /// Image side: channels, height, width.
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// Column side: channels, height, width.
    pub(crate) o: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) k: usize,
    pub(crate) s: usize,
    pub(crate) p: usize,
}

impl Geom {
    /// Rows of the im2col matrix.
    pub(crate) fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Column positions per sample.
    pub(crate) fn l(&self) -> usize {
        self.oh * self.ow
    }
    /// Image elements per sample.
    pub(crate) fn img(&self) -> usize {
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
    let mut split = splits_sum(g.o * ckk, bc.min(g.b) * l).then(|| zeros::<T>(g.o * ckk));
    // With few output channels and more rows of columns, dw^T (C K K, O) += cols (C K K, n)
    // @ gy^T (n, O), every operand row-major, then one transpose: gemm runs the tall product
    // faster than dw (O, C K K) += gy (O, n) @ cols^T with a column-major right operand
    // (1024 x 128 x 1024: 218 against 165 GFLOP/s on 2 threads; the 64 -> 128 channel
    // layers of dcgan64 took 27 instead of 31.5 ms). With 256 channels it gained nothing and
    // with 512 it lost 15% (the transposes grow, gemm's own rate is already high):
    // `ganscope bench --model conv-layers`, bench/RESULTS.md session 35.
    // The two single-thread halves of a split sum gain most: the 32-channel 64-px layers of
    // the sequential preset (32 x 512 x 1024 per half) ran at 44 GFLOP/s per thread as
    // dw += gy @ cols^T and at 108 as the tall product. With fewer rows of columns than
    // channels (the 3- and 1-channel ends of dcgan64 and cdcgan28) it was 1.7-2x slower.
    let tall = ckk >= g.o && g.o <= TALL_WEIGHT_GRAD_MAX_CHANNELS;
    let mut gp = Scratch::new(if bc > 1 || tall { g.o * bc * l } else { 0 });
    let mut dwt = if tall {
        zeros::<T>(ckk * g.o)
    } else {
        Vec::new()
    };
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
        if tall {
            // gy^T (n, O): each sample's (O, L) transposed.
            let gt = gp.get(g.o * n);
            transpose_batch(gc, nb, g.o, l, gt);
            // dw^T (C K K, O) += cols (C K K, n) @ gy^T (n, O).
            let o = g.o;
            let (lhs, rhs) = ((cols, (n, 1)), (&*gt, (o, 1)));
            matmul_over_halves(
                ckk,
                o,
                n,
                (&mut dwt, (o, 1)),
                split.as_mut(),
                b0 > 0,
                lhs,
                rhs,
            );
            continue;
        }
        let lhs: &[T] = if nb == 1 {
            gc
        } else {
            let gp = gp.get(g.o * n);
            batch_to_channel_major(gc, nb, g.o, l, gp);
            gp
        };
        // dw (O, C K K) += lhs (O, n) @ cols^T (n, C K K).
        let (lhs, rhs) = ((lhs, (n, 1)), (cols, (1, n)));
        matmul_over_halves(
            g.o,
            ckk,
            n,
            (&mut dw, (ckk, 1)),
            split.as_mut(),
            b0 > 0,
            lhs,
            rhs,
        );
    }
    if let Some(second) = split {
        let sum = if tall { &mut dwt } else { &mut dw };
        for (d, s) in sum.iter_mut().zip(second) {
            *d += s;
        }
    }
    if tall {
        transpose_batch(&dwt, 1, ckk, g.o, &mut dw);
    }
    dw
}

/// dst (m, n) = lhs (m, k) @ rhs (k, n), or += with `acc`; operands as (slice, (row, column)
/// strides). With `second`, as two half-length products over k, one per thread: the first
/// half into dst, the second into `second` (same layout; the caller adds it to dst).
#[expect(
    clippy::too_many_arguments,
    reason = "a strided product: sizes, destination, second sum, accumulate, two operands"
)]
fn matmul_over_halves<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_s): (&mut [T], (usize, usize)),
    second: Option<&mut Vec<T>>,
    acc: bool,
    (lhs, lhs_s): (&[T], (usize, usize)),
    (rhs, rhs_s): (&[T], (usize, usize)),
) {
    let Some(second) = second else {
        return matmul(m, n, k, dst, dst_s, acc, lhs, lhs_s, rhs, rhs_s);
    };
    let h = k / 2;
    let (lhs2, rhs2) = (&lhs[h * lhs_s.1..], &rhs[h * rhs_s.0..]);
    rayon::join(
        || matmul_in(false, m, n, h, dst, dst_s, acc, lhs, lhs_s, rhs, rhs_s),
        || {
            matmul_in(
                false,
                m,
                n,
                k - h,
                second,
                dst_s,
                acc,
                lhs2,
                lhs_s,
                rhs2,
                rhs_s,
            )
        },
    );
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

/// The f32 im2col of `nb` samples, row by row ([`im2col_rows`]) or through the offset table
/// ([`im2col_table`]), whatever [`Geom::gathers_by_table`] says (`ganscope bench --model
/// kernels` times both).
pub(crate) fn im2col_f32(g: &Geom, nb: usize, img: &[f32], cols: &mut [f32], table: bool) {
    if table {
        im2col_table(g, nb, img, cols)
    } else {
        im2col_rows(g, nb, img, cols)
    }
}

/// The f32 col2im of `nb` samples, added into `img` row by row ([`col2im_rows`]) or written
/// pixel by pixel ([`col2im_gather`]), as [`im2col_f32`].
pub(crate) fn col2im_f32(g: &Geom, nb: usize, cols: &[f32], img: &mut [f32], gather: bool) {
    if gather {
        col2im_gather(g, nb, cols, img)
    } else {
        col2im_rows(g, nb, cols, img)
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

/// `nb` row-major (rows, cols) matrices one after another -> each transposed, (cols, rows),
/// in the same order: (nb, rows, cols) -> (nb, cols, rows). Blocks of [`TRANSPOSE_BLOCK`]
/// output rows run in parallel.
fn transpose_batch<T: Copy + Send + Sync>(
    src: &[T],
    nb: usize,
    rows: usize,
    cols: usize,
    dst: &mut [T],
) {
    let per = rows * cols;
    if per == 0 {
        return;
    }
    dst[..nb * per]
        .par_chunks_mut(TRANSPOSE_BLOCK * rows)
        .enumerate()
        .for_each(|(i, d)| {
            // Output row `out_row` is column j of sample b's source; a block may straddle
            // two samples. The block's source columns are adjacent, so the strided reads of
            // one output row bring in the cache lines the next rows read.
            for (r, dr) in d.chunks_mut(rows).enumerate() {
                let out_row = i * TRANSPOSE_BLOCK + r;
                let (b, j) = (out_row / cols, out_row % cols);
                let s = &src[b * per + j..];
                for (k, v) in dr.iter_mut().enumerate() {
                    *v = s[k * cols];
                }
            }
        });
}

/// Most output channels for which [`weight_grad`] computes the transposed product.
const TALL_WEIGHT_GRAD_MAX_CHANNELS: usize = 128;

/// Output rows per parallel block of [`transpose_batch`].
const TRANSPOSE_BLOCK: usize = 32;

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
mod tests;
