//! The smaller fused CPU ops, each a candle custom op with a candle-op fallback off the CPU
//! (and for dtypes other than f32/f64): [`linear`] (x w^T + b), [`softmax_last`], the (leaky)
//! ReLU ([`LeakyRelu`], [`leaky_relu`], [`relu`]) with the side-recording backward that the
//! fused convolution and BatchNorm share ([`ActSideOp`]), the per-channel bias
//! ([`add_channel_bias`]) and 2x resampling ([`upsample2`], [`avg_pool2`]).
//!
//! Every backward is built from ops that are themselves differentiable (checked against finite
//! differences and candle's ops in the tests below), so any of these can sit under a gradient
//! penalty.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{Float, MIN_TASK, cpu_slice};
use crate::error::Result;
use crate::grad::GradMode;

/// x (B, in) @ w^T + b, w (out, in), b (out): a linear layer. On the CPU (f32, f64) one op
/// ([`LinearOp`]) whose backward returns each gradient contiguous in its argument's layout:
/// candle's `matmul(w.t())` + `broadcast_add` backward instead adds the weight gradient
/// through a transposed (strided) view, reduces the bias gradient with a strided generic
/// reduction and keeps two more zero-initialised accumulators of the output's size. Same
/// values; the bias gradient's sum runs in another order ([`ChannelSum`]). Elsewhere candle's
/// ops. `mode`: the pass's backward mode, if any (see [`GradMode::settle`]).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    let (n, cin) = x.dims2()?;
    let (cout, win) = w.dims2()?;
    if win != cin || b.is_some_and(|b| b.dims() != [cout]) {
        return Err(crate::error::Error::Msg(format!(
            "linear: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )));
    }
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && b.is_none_or(|b| b.dtype() == x.dtype());
    if !fast || n == 0 {
        let y = x.matmul(&w.t()?)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp::new(mode))?,
        None => x.apply_op2(&w, LinearOp::new(mode))?,
    })
}

/// The op of [`linear`]: (x, w[, b]) -> x w^T [+ b].
/// `mode`: the pass's backward mode, if any (a first-order backward gets plain values,
/// [`GradMode::settle`]).
#[derive(Debug, Clone)]
struct LinearOp {
    mode: Option<GradMode>,
}

impl LinearOp {
    fn new(mode: Option<&GradMode>) -> Self {
        Self {
            mode: mode.cloned(),
        }
    }

    fn fwd(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(x: &[T], w: &[T], b: Option<&[T]>, (n, cin, cout): Dims3) -> Vec<T> {
            let mut y = super::uninit(n * cout);
            // y (n, cout) = x (n, cin) @ w^T, w stored (cout, cin).
            super::matmul::matmul(
                n,
                cout,
                cin,
                &mut y,
                (cout, 1),
                false,
                x,
                (cin, 1),
                w,
                (1, cin),
            );
            // SAFETY: gemm without `accumulate` writes all n x cout elements.
            let mut y = unsafe { super::assume_init(y) };
            if let Some(b) = b {
                y.par_chunks_mut(cout)
                    .with_min_len(MIN_TASK.div_ceil(cout.max(1)))
                    .for_each(|row| {
                        for (y, &b) in row.iter_mut().zip(b) {
                            *y += b;
                        }
                    });
            }
            y
        }
        type Dims3 = (usize, usize, usize);
        let name = "ganscope-linear";
        let (n, cin) = x.1.shape().dims2()?;
        let cout = w.1.shape().dims2()?.0;
        let dims = (n, cin, cout);
        let out = match (x.0, w.0) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(f(
                cpu_slice::<f32>(x.0, x.1, name)?,
                cpu_slice::<f32>(w.0, w.1, name)?,
                b.map(|(s, l)| cpu_slice::<f32>(s, l, name)).transpose()?,
                dims,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(f(
                cpu_slice::<f64>(x.0, x.1, name)?,
                cpu_slice::<f64>(w.0, w.1, name)?,
                b.map(|(s, l)| cpu_slice::<f64>(s, l, name)).transpose()?,
                dims,
            )),
            _ => candle_core::bail!(
                "{name}: unsupported dtypes {:?}",
                (x.0.dtype(), w.0.dtype())
            ),
        };
        Ok((out, Shape::from((n, cout))))
    }

    /// Gradients from candle ops, so that they are differentiable again: dx = g w,
    /// dw = g^T x, db = the column sums of g. Only for arguments that need one.
    fn bwd(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = if x.track_op() {
            Some(g.matmul(w)?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(g.t()?.matmul(x)?)
        } else {
            None
        };
        let gb = match b {
            Some(b) if b.track_op() => Some(g.apply_op1(ChannelSum)?),
            _ => None,
        };
        Ok((gx, gw, gb))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "ganscope-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = Self::bwd(x, w, None, g)?;
        let mode = self.mode.as_ref();
        Ok((GradMode::settle(mode, gx), GradMode::settle(mode, gw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ganscope-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = Self::bwd(x, w, Some(b), g)?;
        let mode = self.mode.as_ref();
        Ok((
            GradMode::settle(mode, gx),
            GradMode::settle(mode, gw),
            GradMode::settle(mode, gb),
        ))
    }
}

/// Softmax over the last dimension. On the CPU (f32, f64) one fused op ([`SoftmaxLast`]) whose
/// backward is built from candle ops on its own output (so differentiable again); elsewhere
/// candle's generic `softmax` (which [`softmax_last_basic`] is).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0 {
        Ok(x.contiguous()?.apply_op1(SoftmaxLast)?)
    } else {
        softmax_last_basic(x)
    }
}

/// candle's generic softmax over the last dimension (the fallback and the tests' reference).
pub fn softmax_last_basic(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// Softmax of one non-empty row in place: max, exp and sum, scale.
pub(super) fn softmax_row<T: Float>(row: &mut [T]) {
    let m = row
        .iter()
        .copied()
        .fold(row[0], |m, v| if v > m { v } else { m });
    let mut sum = T::from_f64(0.0);
    for v in row.iter_mut() {
        *v = (*v - m).exp_();
        sum += *v;
    }
    let r = T::from_f64(1.0) / sum;
    for v in row.iter_mut() {
        *v *= r;
    }
}

/// Fused softmax over the last dimension of a contiguous CPU tensor: one pass per row
/// (max, exp, sum, scale) instead of five whole-tensor ops. Backward:
/// dx = y * (g - sum(g * y)), from candle ops on y = the op's output.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "ganscope-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: Float>(x: &[T], n: usize) -> Vec<T> {
            let mut out = x.to_vec();
            if n == 0 {
                return out;
            }
            for row in out.chunks_mut(n) {
                softmax_row(row);
            }
            out
        }
        let name = self.name();
        let n = *l.dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(f(cpu_slice::<f32>(s, l, name)?, n)),
            CpuStorage::F64(_) => CpuStorage::F64(f(cpu_slice::<f64>(s, l, name)?, n)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((g.broadcast_sub(&s)? * y)?))
    }
}

/// Leaky ReLU with slope 0.2 for negative inputs: max(x, 0.2 x). On the CPU (f32, f64) one
/// fused op ([`LeakyRelu::LEAKY`]) with the same values and gradients as [`leaky_relu_basic`],
/// elsewhere that basic form.
pub fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    LeakyRelu::LEAKY.apply(x)
}

/// Leaky ReLU as max(x, 0.2 x) from candle ops (the fallback and the tests' reference).
pub fn leaky_relu_basic(x: &Tensor) -> Result<Tensor> {
    Ok(LeakyRelu::LEAKY.apply_basic(x)?)
}

/// y (B, C, ...) + b (C) broadcast over every dimension but the channel one: a convolution's
/// bias. On the CPU (f32, f64) one op whose backward sums the gradient per channel in a
/// plane-by-plane pass ([`ChannelSum`]); candle's `broadcast_add` backward reduces over the
/// batch and spatial dimensions with a strided generic reduction (3% of an `iclevr-sagan` step
/// in `perf`). Elsewhere `broadcast_add`. Same values; the bias gradient's sum runs in another
/// order (plane by plane in f64), so it can differ from candle's in the last bits.
pub fn add_channel_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = y.dim(1)?;
    if b.elem_count() != c {
        return Err(crate::error::Error::Msg(format!(
            "channel bias of shape {:?} for an input of shape {:?}",
            b.dims(),
            y.dims()
        )));
    }
    if y.device().is_cpu() && matches!(y.dtype(), DType::F32 | DType::F64) && b.dtype() == y.dtype()
    {
        Ok(y.contiguous()?
            .apply_op2(&b.contiguous()?.flatten_all()?, ChannelBias)?)
    } else {
        let mut bshape = vec![1; y.rank()];
        bshape[1] = c;
        Ok(y.broadcast_add(&b.reshape(bshape)?)?)
    }
}

/// (B, C, S) view of a shape with the channel at dimension 1.
fn bcs(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

/// The op of [`add_channel_bias`]: (y, b) -> y + b per channel.
#[derive(Debug, Clone, Copy)]
struct ChannelBias;

/// g (B, C, ...) -> (C): the sum of each channel's elements, accumulated in f64 plane by
/// plane. Its gradient broadcasts the incoming (C) gradient back over the input's shape.
#[derive(Debug, Clone, Copy)]
struct ChannelSum;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "ganscope-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(y: &[T], b: &[T], (_, c, s): (usize, usize, usize)) -> Vec<T> {
            let mut out = vec![T::from_f64(0.0); y.len()];
            if s > 0 {
                out.par_chunks_mut(s)
                    .zip(y.par_chunks(s))
                    .enumerate()
                    .with_min_len(MIN_TASK.div_ceil(s))
                    .for_each(|(p, (o, y))| {
                        let v = b[p % c];
                        for (o, &x) in o.iter_mut().zip(y) {
                            *o = x + v;
                        }
                    });
            }
            out
        }
        let name = self.name();
        let g = bcs(l1.dims());
        if l2.shape().elem_count() != g.1 {
            candle_core::bail!("{name}: bias {:?} for {:?}", l2.dims(), l1.dims());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(f(
                cpu_slice::<f32>(s1, l1, name)?,
                cpu_slice::<f32>(s2, l2, name)?,
                g,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(f(
                cpu_slice::<f64>(s1, l1, name)?,
                cpu_slice::<f64>(s2, l2, name)?,
                g,
            )),
            _ => candle_core::bail!("{name}: unsupported dtypes {:?}", (s1.dtype(), s2.dtype())),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = y.track_op().then(|| g.clone());
        let gb = if b.track_op() {
            Some(g.contiguous()?.apply_op1(ChannelSum)?)
        } else {
            None
        };
        Ok((gy, gb))
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "ganscope-channel-sum"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(g: &[T], (b, c, s): (usize, usize, usize)) -> Vec<T> {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mut acc = 0.0f64;
                    for i in 0..b {
                        let plane = &g[(i * c + ch) * s..][..s];
                        acc += plane.iter().map(|v| v.to_f64()).sum::<f64>();
                    }
                    T::from_f64(acc)
                })
                .collect()
        }
        let name = self.name();
        let g = bcs(l.dims());
        let out = match st {
            CpuStorage::F32(_) => CpuStorage::F32(f(cpu_slice::<f32>(st, l, name)?, g)),
            CpuStorage::F64(_) => CpuStorage::F64(f(cpu_slice::<f64>(st, l, name)?, g)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", st.dtype()),
        };
        Ok((out, Shape::from(g.1)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut shape = vec![1; x.rank()];
        shape[1] = x.dim(1)?;
        Ok(Some(
            gg.reshape(shape)?.broadcast_as(x.shape())?.contiguous()?,
        ))
    }
}

/// ReLU, max(x, 0). On the CPU (f32, f64) one fused op ([`LeakyRelu::RELU`]: one pass
/// forward, one backward) with the values and gradients of candle's `relu` (whose backward
/// takes four passes and three allocations: `ge`, `to_dtype`, `mul`); elsewhere candle's.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    LeakyRelu::RELU.apply(x)
}

const LEAKY_SLOPE: f64 = 0.2;

/// Fused (leaky) ReLU, y = x for x > 0 and `slope` x otherwise: one pass forward; backward is
/// [`LeakyReluBwd`], itself differentiable, so the op can sit under a gradient penalty. Takes
/// a contiguous CPU tensor.
#[derive(Debug, Clone, Copy)]
pub struct LeakyRelu {
    slope: f64,
    /// The derivative at x = 0.
    tie: f64,
}

impl LeakyRelu {
    /// max(x, 0.2 x) with the derivative candle's `maximum` backward defines: 1 for x > 0,
    /// 0.2 for x < 0, and at a tie (x = 0) half of each, 0.6.
    pub const LEAKY: Self = Self {
        slope: LEAKY_SLOPE,
        tie: 0.5 * (1.0 + LEAKY_SLOPE),
    };
    /// max(x, 0) with candle's `relu` derivative: 1 for x >= 0, 0 below.
    pub const RELU: Self = Self {
        slope: 0.0,
        tie: 1.0,
    };
}

impl LeakyRelu {
    /// The slope for x < 0.
    pub fn slope(&self) -> f64 {
        self.slope
    }

    /// Where a pre-activation lies: 0 below zero, 1 above, 2 at zero (the tie). Ops that
    /// fuse the activation record this per element, and their backward reads the derivative
    /// from it ([`ActSideOp`]) instead of keeping the pre-activation.
    #[inline(always)]
    pub(crate) fn side<T: WithDType>(v: T) -> u8 {
        let z = T::from_f64(0.0);
        if v == z { 2 } else { u8::from(v > z) }
    }

    /// The derivative on each [`LeakyRelu::side`], in T.
    pub(crate) fn factors<T: WithDType>(&self) -> [T; 3] {
        [
            T::from_f64(self.slope),
            T::from_f64(1.0),
            T::from_f64(self.tie),
        ]
    }

    /// Applies the activation to `y` in place (the same values as the op) and returns each
    /// element's [`LeakyRelu::side`].
    pub(crate) fn apply_in_place<T: WithDType>(&self, y: &mut [T]) -> Vec<u8> {
        let (a, z, one) = (T::from_f64(self.slope), T::from_f64(0.0), T::from_f64(1.0));
        // An indexed collect writes the sides straight into the new vector (no zero-fill).
        y.par_iter_mut()
            .with_min_len(MIN_TASK)
            .map(|v| {
                let s = Self::side(*v);
                *v = *v * if *v > z { one } else { a };
                s
            })
            .collect()
    }

    /// The activation of x: this fused op on the CPU (f32, f64), else
    /// [`LeakyRelu::apply_basic`].
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            Ok(x.contiguous()?.apply_op1(*self)?)
        } else {
            Ok(self.apply_basic(x)?)
        }
    }

    /// The activation from basic candle ops: `relu` for slope 0, else max(x, slope x) (the
    /// same values and derivatives, ties included).
    pub fn apply_basic(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.slope == 0.0 {
            x.relu()
        } else {
            x.maximum(&x.affine(self.slope, 0.0)?)
        }
    }
}

/// (x, g) -> g * slope(x) with slope as in [`LeakyRelu`]: its input gradient. Linear in g (its
/// gradient there is this op again); its gradient in x is zero.
#[derive(Debug, Clone, Copy)]
pub struct LeakyReluBwd(LeakyRelu);

/// g -> g * act'(pre), with the pre-activation's sides recorded by an op that applied the
/// activation inside its forward (the fused BatchNorm, the fused convolution): that op's
/// backward starts here. Linear in g (its gradient is this op again); the factor is constant
/// in the pre-activation almost everywhere, so nothing flows back through it, as with
/// [`LeakyRelu`]'s own backward.
#[derive(Debug, Clone)]
pub(crate) struct ActSideOp {
    pub act: LeakyRelu,
    pub side: Arc<Vec<u8>>,
}

impl ActSideOp {
    /// g * act' element by element.
    pub fn apply(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?.apply_op1(self.clone())
    }
}

/// g * act' on the recorded sides, as a plain vector.
pub(crate) fn times_act_derivative<T: WithDType>(g: &[T], side: &[u8], act: LeakyRelu) -> Vec<T> {
    let f = act.factors::<T>();
    g.par_iter()
        .zip(side)
        .with_min_len(MIN_TASK)
        .map(|(&d, &k)| d * f[usize::from(k)])
        .collect()
}

impl CustomOp1 for ActSideOp {
    fn name(&self) -> &'static str {
        "ganscope-activation-derivative"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        if l.shape().elem_count() != self.side.len() {
            candle_core::bail!(
                "{name}: shape {:?} for a forward of {} elements",
                l.dims(),
                self.side.len()
            );
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(times_act_derivative(
                cpu_slice::<f32>(s, l, name)?,
                &self.side,
                self.act,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(times_act_derivative(
                cpu_slice::<f64>(s, l, name)?,
                &self.side,
                self.act,
            )),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _g: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.apply(gg)?))
    }
}

impl CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "ganscope-leaky-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(x: &[T], slope: f64) -> Vec<T> {
            let (a, z, one) = (T::from_f64(slope), T::from_f64(0.0), T::from_f64(1.0));
            x.par_iter()
                .with_min_len(MIN_TASK)
                .map(|&v| v * if v > z { one } else { a })
                .collect()
        }
        let name = self.name();
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(f(cpu_slice::<f32>(s, l, name)?, self.slope)),
            CpuStorage::F64(_) => CpuStorage::F64(f(cpu_slice::<f64>(s, l, name)?, self.slope)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    /// g * slope(x), with x detached: the slope is constant in x almost everywhere, so no
    /// gradient flows back to x through it, and without the link the graph behind x is not
    /// walked at all. Under a gradient penalty that graph is the critic's whole forward pass
    /// on the interpolates; with x attached, a second-order backward would send zeros through
    /// every layer of it (each conv's weight and input gradients, two forward passes' worth
    /// of work on a critic without normalisation layers).
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.detach()
                .apply_op2(&g.contiguous()?, LeakyReluBwd(*self))?,
        ))
    }
}

impl CustomOp2 for LeakyReluBwd {
    fn name(&self) -> &'static str {
        "ganscope-leaky-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(x: &[T], g: &[T], op: &LeakyRelu) -> Vec<T> {
            let (z, one) = (T::from_f64(0.0), T::from_f64(1.0));
            let (slope, tie) = (T::from_f64(op.slope), T::from_f64(op.tie));
            x.par_iter()
                .zip(g)
                .with_min_len(MIN_TASK)
                .map(|(&x, &g)| {
                    let s = if x > z { one } else { slope };
                    g * if x == z { tie } else { s }
                })
                .collect()
        }
        let name = self.name();
        if l1.shape() != l2.shape() {
            candle_core::bail!("{name}: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(f(
                cpu_slice::<f32>(s1, l1, name)?,
                cpu_slice::<f32>(s2, l2, name)?,
                &self.0,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(f(
                cpu_slice::<f64>(s1, l1, name)?,
                cpu_slice::<f64>(s2, l2, name)?,
                &self.0,
            )),
            _ => candle_core::bail!("{name}: unsupported dtypes {:?}", (s1.dtype(), s2.dtype())),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Every input that needs a gradient must get one (zeros for x), or candle's backward
        // fails with "grad not populated".
        let gx = if x.track_op() {
            Some(x.zeros_like()?)
        } else {
            None
        };
        let gg = if g.track_op() {
            Some(x.apply_op2(&gg.contiguous()?, *self)?)
        } else {
            None
        };
        Ok((gx, gg))
    }
}

/// Nearest-neighbour 2x upsampling, x (B, C, H, W) -> (B, C, 2H, 2W). On the CPU (f32, f64)
/// one fused op ([`Resample2::Up`]); elsewhere [`upsample2_basic`].
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    resample2(x, Resample2::Up(1.0), upsample2_basic)
}

/// Nearest-neighbour 2x upsampling from reshape + broadcast (the fallback and the tests'
/// reference; its backward is a strided reduction over the broadcast dimensions).
pub fn upsample2_basic(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// 2x2 average pooling with stride 2, x (B, C, H, W) -> (B, C, H/2, W/2); H and W must be
/// even. On the CPU (f32, f64) one fused op ([`Resample2::Pool`]); elsewhere
/// [`avg_pool2_basic`].
pub fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(crate::error::Error::Msg(format!(
            "2x2 average pooling needs an even height and width, got {h}x{w}"
        )));
    }
    resample2(x, Resample2::Pool(0.25), avg_pool2_basic)
}

/// 2x2 average pooling from reshape + two means (the fallback and the tests' reference).
pub fn avg_pool2_basic(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.mean(5)?.mean(3)?)
}

fn resample2(x: &Tensor, op: Resample2, basic: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() == 4 {
        Ok(x.contiguous()?.apply_op1(op)?)
    } else {
        basic(x)
    }
}

/// Fused 2x resampling of (B, C, H, W), both linear and each the other's adjoint, so each
/// one's backward is the other (exact to any order): `Up(s)` repeats every pixel into a 2x2
/// block times s, `Pool(s)` sums every 2x2 block times s. Upsampling is `Up(1)` (backward
/// `Pool(1)`), average pooling `Pool(1/4)` (backward `Up(1/4)`).
#[derive(Debug, Clone, Copy)]
pub enum Resample2 {
    Up(f64),
    Pool(f64),
}

impl Resample2 {
    fn adjoint(self) -> Self {
        match self {
            Self::Up(s) => Self::Pool(s),
            Self::Pool(s) => Self::Up(s),
        }
    }

    /// One (H, W) plane `x` into one output plane `y`.
    fn plane<T: WithDType>(self, x: &[T], y: &mut [T], w: usize) {
        match self {
            Self::Up(s) => {
                let s = T::from_f64(s);
                // y is (2H, 2W): two identical rows per input row.
                for (xr, yr) in x.chunks(w).zip(y.chunks_mut(4 * w)) {
                    let (top, bottom) = yr.split_at_mut(2 * w);
                    for (&v, t) in xr.iter().zip(top.chunks_mut(2)) {
                        let v = v * s;
                        t[0] = v;
                        t[1] = v;
                    }
                    bottom.copy_from_slice(top);
                }
            }
            Self::Pool(s) => {
                let s = T::from_f64(s);
                // x is (H, W) with W = 2 w_out; rows in pairs.
                for (xr, yr) in x.chunks(2 * w).zip(y.chunks_mut(w / 2)) {
                    let (top, bottom) = xr.split_at(w);
                    for ((o, t), b) in yr.iter_mut().zip(top.chunks(2)).zip(bottom.chunks(2)) {
                        *o = (t[0] + t[1] + b[0] + b[1]) * s;
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Resample2 {
    fn name(&self) -> &'static str {
        match self {
            Self::Up(_) => "ganscope-upsample2",
            Self::Pool(_) => "ganscope-pool2",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn f<T: WithDType>(op: Resample2, x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
            let out_plane = match op {
                Resample2::Up(_) => 4 * h * w,
                Resample2::Pool(_) => h * w / 4,
            };
            let mut y = vec![T::from_f64(0.0); planes * out_plane];
            if out_plane == 0 {
                return y;
            }
            y.par_chunks_mut(out_plane)
                .zip(x.par_chunks(h * w))
                .with_min_len((MIN_TASK / out_plane).max(1))
                .for_each(|(yp, xp)| op.plane(xp, yp, w));
            y
        }
        let name = self.name();
        let (b, c, h, w) = match *l.dims() {
            [b, c, h, w] => (b, c, h, w),
            ref d => candle_core::bail!("{name}: expected (B, C, H, W), got {d:?}"),
        };
        if matches!(self, Self::Pool(_)) && (h % 2 != 0 || w % 2 != 0) {
            candle_core::bail!("{name}: height and width must be even, got {h}x{w}");
        }
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(f(*self, cpu_slice::<f32>(s, l, name)?, b * c, h, w))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(f(*self, cpu_slice::<f64>(s, l, name)?, b * c, h, w))
            }
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        let shape = match self {
            Self::Up(_) => (b, c, 2 * h, 2 * w),
            Self::Pool(_) => (b, c, h / 2, w / 2),
        };
        Ok((out, shape.into()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1(self.adjoint())?))
    }
}

#[cfg(test)]
mod tests;
