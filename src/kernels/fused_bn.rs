//! Fused train-mode batch normalisation as candle custom ops.
//!
//! Built from basic candle ops, a train-mode BatchNorm is about ten passes over the
//! activations forward and twenty backward. [`batch_norm_train`] does it in two forward
//! (per-channel sums, then the output) and two backward (per-channel sums of dy and
//! dy * (x - mean), then dx), each parallelised with rayon and accumulated in f64.
//!
//! Per channel, over the N = B H W elements of that channel:
//! - forward: xhat = (x - mean) * r with r = 1 / sqrt(var + eps) (biased variance), and
//!   y = gamma * xhat + beta;
//! - backward: dx = gamma r (dy - mean(dy) - xhat mean(dy xhat)), dgamma = sum(dy xhat),
//!   dbeta = sum(dy).
//!
//! Gradients of gradients (WGAN-GP, R1 with a BatchNorm critic) are exact: the backward op's
//! own backward is the vector-Jacobian product of the formulas above, derived by hand (see
//! [`BnBwdOp`]) and written with basic differentiable candle ops, so every further order
//! stays exact too.
//!
//! [`batch_norm_train_act`] also applies a (leaky) ReLU inside the same op: one pass, one
//! output and one graph node fewer each way. The forward records a byte per element saying on
//! which side of zero the pre-activation fell, and the backward takes the activation's
//! derivative from it, so values and gradients are those of the two ops in turn, ties at zero
//! included.
//!
//! Sums run in a fixed order per channel (eight f64 lanes), so results do not depend on the
//! number of threads and training stays bit-reproducible. Off the CPU and for dtypes other than
//! f32/f64 everything falls back to the same math written with basic candle ops
//! ([`batch_norm_train_basic`]).

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

use super::ops::{ActSideOp, LeakyRelu, times_act_derivative};
use super::{Float, MIN_TASK, Slot, assume_init, contiguous, uninit};
use crate::grad::GradMode;

/// Train-mode batch normalisation of x (B, C, ...) over every dimension but the channel one
/// (dimension 1): y = (x - mean) / sqrt(var + eps) * gamma + beta, with gamma and beta of shape
/// (C) (absent: 1 and 0). Returns y (the shape of x), and the batch mean and biased batch
/// variance, shape (C), detached, for the running statistics.
///
/// Differentiable to any order with respect to x, gamma and beta.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_act(x, gamma, beta, eps, None, None)
}

/// [`batch_norm_train`] followed by the activation `act` (ReLU or leaky ReLU), fused into
/// the same op on the CPU: y = act(BN(x)). Same values and gradients (of every order) as
/// applying [`LeakyRelu`] to the output of [`batch_norm_train`].
pub fn batch_norm_train_act(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
    act: Option<LeakyRelu>,
    mode: Option<&GradMode>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = channels(x, gamma, beta)?;
    if !fast_path(x, gamma, beta) {
        let (y, mean, var) = batch_norm_train_basic(x, gamma, beta, eps)?;
        let y = match act {
            Some(a) => a.apply_basic(&y)?,
            None => y,
        };
        return Ok((y, mean, var));
    }
    let (dt, dev) = (x.dtype(), x.device());
    let per_channel = |t: Option<&Tensor>, fill: f64| -> Result<Tensor> {
        match t {
            Some(t) if t.dims() == [c] => t.contiguous(),
            Some(t) => t.reshape(c)?.contiguous(),
            None => Tensor::full(fill, c, dev)?.to_dtype(dt),
        }
    };
    let gamma = per_channel(gamma, 1.0)?;
    let beta = per_channel(beta, 0.0)?;
    let x = x.contiguous()?;
    let slot = Arc::new(OnceLock::new());
    let y = x.apply_op3(
        &gamma,
        &beta,
        BnOp {
            eps,
            act,
            stats: slot.clone(),
            mode: mode.cloned(),
        },
    )?;
    let stats = slot
        .get()
        .ok_or_else(|| candle_core::Error::Msg("fused BatchNorm: no batch statistics".into()))?;
    let mean = Tensor::from_slice(&stats.mean, c, dev)?.to_dtype(dt)?;
    let var = Tensor::from_slice(&stats.var, c, dev)?.to_dtype(dt)?;
    Ok((y, mean, var))
}

/// The same as [`batch_norm_train`], written with basic candle ops (the fallback off the CPU
/// and for other dtypes; the reference in tests and benchmarks).
pub fn batch_norm_train_basic(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = channels(x, gamma, beta)?;
    let g = Geom::of(x.dims())?;
    let x3 = x.reshape((g.b, c, g.s))?;
    let mean = x3.mean_keepdim((0, 2))?; // (1, C, 1)
    let xc = x3.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim((0, 2))?; // biased
    let mut y = xc.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    if let Some(w) = gamma {
        y = y.broadcast_mul(&w.reshape((1, c, 1))?)?;
    }
    if let Some(b) = beta {
        y = y.broadcast_add(&b.reshape((1, c, 1))?)?;
    }
    Ok((
        y.reshape(x.dims())?,
        mean.flatten_all()?.detach(),
        var.flatten_all()?.detach(),
    ))
}

/// Number of channels, after checking the shapes.
fn channels(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> Result<usize> {
    if x.rank() < 2 {
        bail!(
            "batch_norm_train: expected (B, C, ...) input, got shape {:?}",
            x.dims()
        );
    }
    let c = x.dim(1)?;
    for (what, t) in [("gamma", gamma), ("beta", beta)] {
        if let Some(t) = t
            && t.elem_count() != c
        {
            bail!(
                "batch_norm_train: {what} of shape {:?} for {c} channels",
                t.dims()
            );
        }
    }
    Ok(c)
}

/// The first-order backward kernel alone, for `ganscope bench --model kernels`: x's batch
/// statistics (no activation) are computed here once; the closure runs the kernel on
/// (x, gamma, dy) and returns its output (dx, dgamma and dbeta in one vector).
pub(crate) fn backward_kernel(
    x: &Tensor,
    gamma: &Tensor,
    eps: f64,
) -> Result<impl Fn(&Tensor) -> Result<Tensor>> {
    let (_, mean, var) = batch_norm_train(x, None, None, eps)?;
    let vec64 = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let var = vec64(&var)?;
    let stats = Arc::new(Stats {
        side: Arc::default(),
        invstd: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        mean: vec64(&mean)?,
        var,
    });
    let (x, gamma) = (x.detach(), gamma.detach());
    Ok(move |dy: &Tensor| {
        let op = BnBwdOp {
            eps,
            act: None,
            stats: stats.clone(),
        };
        x.apply_op3(&gamma, dy, op)
    })
}

/// Whether the custom ops handle these arguments (else basic candle ops do).
fn fast_path(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> bool {
    let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    matches!(x.dtype(), DType::F32 | DType::F64)
        && ok(x)
        && gamma.is_none_or(ok)
        && beta.is_none_or(ok)
}

/// Per-channel batch statistics, in f64.
#[derive(Debug)]
struct Stats {
    mean: Vec<f64>,
    /// Biased variance.
    var: Vec<f64>,
    /// 1 / sqrt(var + eps).
    invstd: Vec<f64>,
    /// With an activation: per element, where its pre-activation fell
    /// ([`LeakyRelu::side`]), so the backward reads the activation's derivative instead of
    /// recomputing it. Empty without one.
    side: Arc<Vec<u8>>,
}

/// A [`LeakyRelu`]'s forward value in the element type, with the same operations (and so
/// the same rounding) as [`LeakyRelu`]'s own op.
#[derive(Clone, Copy)]
struct Act<T> {
    slope: T,
}

impl<T: Float> Act<T> {
    fn of(a: LeakyRelu) -> Self {
        Self {
            slope: T::from64(a.slope()),
        }
    }

    #[inline(always)]
    fn value(self, v: T) -> T {
        v * if v > T::from64(0.0) {
            T::from64(1.0)
        } else {
            self.slope
        }
    }
}

/// Sizes: x viewed as (b, c, s).
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    s: usize,
}

impl Geom {
    fn of(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            bail!("batch_norm_train: expected (B, C, ...) input, got shape {dims:?}");
        }
        Ok(Self {
            b: dims[0],
            c: dims[1],
            s: dims[2..].iter().product(),
        })
    }

    /// Elements per channel.
    fn n(&self) -> usize {
        self.b * self.s
    }

    fn len(&self) -> usize {
        self.b * self.c * self.s
    }

    /// Sample `b`'s plane of channel `c`.
    fn plane<'a, T>(&self, v: &'a [T], b: usize, c: usize) -> &'a [T] {
        &v[(b * self.c + c) * self.s..][..self.s]
    }
}

/// Forward: (x, gamma, beta) -> y = act(BN(x)); stores the batch statistics in `stats`.
struct BnOp {
    eps: f64,
    act: Option<LeakyRelu>,
    stats: Arc<OnceLock<Arc<Stats>>>,
    /// The pass's backward mode, if any: a first-order backward gets plain values
    /// ([`GradMode::settle`]).
    mode: Option<GradMode>,
}

/// First-order backward: (x, gamma, dy) -> [dx (flattened), dgamma (C), dbeta (C)], one
/// vector of B C H W + 2 C elements (a custom op has a single output), with the batch
/// statistics of the forward pass (functions of x, recomputed by its own backward).
///
/// Its backward, the VJP with cotangents (u, a, b) of (dx, dgamma, dbeta), per channel, with
/// means and sums over the channel's N elements, S_d = sum(dy xhat) (= dgamma),
/// S_u = sum(u xhat) and U0 = sum(u (dy - mean(dy))). Writing L = <u, dx> + a dgamma +
/// b dbeta as a function of (r, xhat, dy, gamma),
/// L = gamma r U0 - gamma r S_u S_d / N + a S_d + b sum(dy), and using
/// dr/dx = -r^2 xhat / N and the VJP of xhat, v -> r (v - mean(v) - xhat mean(v xhat)):
/// - d/d dy = gamma r (u - mean(u) - xhat S_u / N) + a xhat + b;
/// - d/d gamma = r (U0 - S_u S_d / N);
/// - d/dx = -(gamma r^2 S_d / N) (u - mean(u)) + (a r - gamma r^2 S_u / N) (dy - mean(dy))
///   + ((gamma r^2 / N) (3 S_u S_d / N - U0) - a r S_d / N) xhat.
///
/// With an activation, dy is first multiplied by its derivative at the pre-activation
/// ([`ActSideOp`]), which is constant in x almost everywhere: the formulas above then apply to
/// that product, and d/d dy picks up the same factor.
struct BnBwdOp {
    eps: f64,
    act: Option<LeakyRelu>,
    stats: Arc<Stats>,
}

/// The three arguments of an op as slices of one float type.
fn args3<'a, T: WithDType>(what: &str, s: [(&'a CpuStorage, &Layout); 3]) -> Result<[&'a [T]; 3]> {
    let one = |(st, l): (&'a CpuStorage, &Layout)| -> Result<&'a [T]> {
        contiguous(T::cpu_storage_as_slice(st)?, l, what)
    };
    Ok([one(s[0])?, one(s[1])?, one(s[2])?])
}

fn check_args(what: &str, g: &Geom, l2: &Layout, l3: &Layout, third: usize) -> Result<()> {
    if l2.shape().elem_count() != g.c || l3.shape().elem_count() != third {
        bail!(
            "{what}: arguments of shapes {:?}, {:?} for an input with {} channels",
            l2.dims(),
            l3.dims(),
            g.c
        );
    }
    Ok(())
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "ganscope-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let g = Geom::of(l1.dims())?;
        check_args(name, &g, l2, l3, g.c)?;
        let a = [(s1, l1), (s2, l2), (s3, l3)];
        let (storage, stats) = match s1.dtype() {
            DType::F32 => {
                let [x, w, b] = args3::<f32>(name, a)?;
                let (y, st) = forward(g, x, w, b, self.eps, self.act);
                (CpuStorage::F32(y), st)
            }
            DType::F64 => {
                let [x, w, b] = args3::<f64>(name, a)?;
                let (y, st) = forward(g, x, w, b, self.eps, self.act);
                (CpuStorage::F64(y), st)
            }
            dt => bail!("{name}: unsupported dtype {dt:?}"),
        };
        // A fresh op per call: the slot is empty.
        let _ = self.stats.set(Arc::new(stats));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (nx, ng, nb) = (x.track_op(), gamma.track_op(), beta.track_op());
        if !(nx || ng || nb) {
            return Ok((None, None, None));
        }
        let stats = self.stats.get().cloned().ok_or_else(|| {
            candle_core::Error::Msg("fused BatchNorm: backward before forward".into())
        })?;
        let p = x.apply_op3(
            gamma,
            &dy.contiguous()?,
            BnBwdOp {
                eps: self.eps,
                act: self.act,
                stats,
            },
        )?;
        let (m, c) = (x.elem_count(), gamma.elem_count());
        let gx = nx.then(|| p.narrow(0, 0, m)?.reshape(x.dims()));
        let gg = ng.then(|| p.narrow(0, m, c));
        let gb = nb.then(|| p.narrow(0, m + c, c));
        let mode = self.mode.as_ref();
        Ok((
            GradMode::settle(mode, gx.transpose()?),
            GradMode::settle(mode, gg.transpose()?),
            GradMode::settle(mode, gb.transpose()?),
        ))
    }
}

impl CustomOp3 for BnBwdOp {
    fn name(&self) -> &'static str {
        "ganscope-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let g = Geom::of(l1.dims())?;
        check_args(name, &g, l2, l3, g.len())?;
        if self.stats.mean.len() != g.c {
            bail!("{name}: statistics of {} channels", self.stats.mean.len());
        }
        let a = [(s1, l1), (s2, l2), (s3, l3)];
        let storage = match s1.dtype() {
            DType::F32 => {
                let [x, w, dy] = args3::<f32>(name, a)?;
                CpuStorage::F32(backward_act(g, x, w, dy, &self.stats, self.act))
            }
            DType::F64 => {
                let [x, w, dy] = args3::<f64>(name, a)?;
                CpuStorage::F64(backward_act(g, x, w, dy, &self.stats, self.act))
            }
            dt => bail!("{name}: unsupported dtype {dt:?}"),
        };
        Ok((storage, Shape::from(g.len() + 2 * g.c)))
    }

    /// The VJP in the op's docs, from basic ops (so itself differentiable).
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        dy: &Tensor,
        _p: &Tensor,
        gp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (nx, ng, nd) = (x.track_op(), gamma.track_op(), dy.track_op());
        if !(nx || ng || nd) {
            return Ok((None, None, None));
        }
        let g = Geom::of(x.dims())?;
        let (c, m) = (g.c, g.len());
        let n = g.n() as f64;
        let sh = (g.b, c, g.s);
        let csum = |t: &Tensor| t.sum_keepdim((0, 2)); // (1, C, 1)
        let mask = |t: &Tensor| -> Result<Tensor> {
            match self.act {
                Some(act) => ActSideOp {
                    act,
                    side: self.stats.side.clone(),
                }
                .apply(t),
                None => Ok(t.clone()),
            }
        };
        // With an activation, the formulas take dy act'(pre) for dy.
        let dy_e = mask(dy)?;
        let x3 = x.reshape(sh)?;
        let dy3 = dy_e.reshape(sh)?;
        let u = gp.narrow(0, 0, m)?.reshape(sh)?;
        let a = gp.narrow(0, m, c)?.reshape((1, c, 1))?;
        let b = gp.narrow(0, m + c, c)?.reshape((1, c, 1))?;
        let gm = gamma.reshape((1, c, 1))?;

        let mean = (csum(&x3)? / n)?;
        let xc = x3.broadcast_sub(&mean)?;
        let var = (csum(&xc.sqr()?)? / n)?;
        let r = var.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&r)?;
        let mdy = (csum(&dy3)? / n)?;
        let s_d = csum(&(&dy3 * &xhat)?)?;
        let mu = (csum(&u)? / n)?;
        let s_u = csum(&(&u * &xhat)?)?;
        let gr = (&gm * &r)?;
        let gr2 = (&gr * &r)?;
        let su_sd_n = ((&s_u * &s_d)? / n)?;

        let gx = if nx || ng {
            let u0 = (csum(&(&u * &dy3)?)? - ((&mu * &mdy)? * n)?)?;
            let gx = if nx {
                let ar = (&a * &r)?;
                let k_u = ((&gr2 * &s_d)? * (-1.0 / n))?;
                let k_dy = (&ar - ((&gr2 * &s_u)? / n)?)?;
                let k_xhat = (((&gr2 / n)? * ((&su_sd_n * 3.0)? - &u0)?)? - ((&ar * &s_d)? / n)?)?;
                let t = u.broadcast_sub(&mu)?.broadcast_mul(&k_u)?;
                let t = (t + dy3.broadcast_sub(&mdy)?.broadcast_mul(&k_dy)?)?;
                Some((t + xhat.broadcast_mul(&k_xhat)?)?.reshape(x.dims())?)
            } else {
                None
            };
            let gg = if ng {
                Some((&r * (&u0 - &su_sd_n)?)?.reshape(gamma.dims())?)
            } else {
                None
            };
            (gx, gg)
        } else {
            (None, None)
        };
        let gdy = if nd {
            let t = u
                .broadcast_sub(&mu)?
                .broadcast_sub(&xhat.broadcast_mul(&(&s_u / n)?)?)?
                .broadcast_mul(&gr)?;
            let t = (t + xhat.broadcast_mul(&a)?)?.broadcast_add(&b)?;
            Some(mask(&t.reshape(dy.dims())?)?)
        } else {
            None
        };
        Ok((gx.0, gx.1, gdy))
    }
}

/// Independent accumulators per sum: the compiler may not reorder float additions, so one
/// accumulator would serialise every loop on the add latency; eight lanes vectorise.
const LANES: usize = 8;
type Acc = [f64; LANES];

/// Sum of the lanes, in a fixed order.
fn total(a: &Acc) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// s1 += sum(f(a_i, b_i).0), s2 += sum(f(a_i, b_i).1), lane by lane.
#[inline(always)]
fn accumulate2<T: Float>(
    a: &[T],
    b: &[T],
    s1: &mut Acc,
    s2: &mut Acc,
    f: impl Fn(f64, f64) -> (f64, f64),
) {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for i in 0..LANES {
            let (v1, v2) = f(pa[i].to64(), pb[i].to64());
            s1[i] += v1;
            s2[i] += v2;
        }
    }
    for (i, (&va, &vb)) in ra.iter().zip(rb).enumerate() {
        let (v1, v2) = f(va.to64(), vb.to64());
        s1[i] += v1;
        s2[i] += v2;
    }
}

/// Per channel c (in parallel, each in a fixed order), the two sums of f(a, b) over the
/// channel's elements.
fn channel_sums<T: Float, F: Fn(f64, f64) -> (f64, f64)>(
    g: Geom,
    a: &[T],
    b: &[T],
    f: impl Fn(usize) -> F + Sync,
) -> Vec<(f64, f64)> {
    if g.s == 1 {
        return channel_sums_rows(g, a, b, f);
    }
    let min = MIN_TASK.div_ceil(g.n().max(1));
    (0..g.c)
        .into_par_iter()
        .with_min_len(min)
        .map(|c| {
            let fc = f(c);
            let (mut s1, mut s2) = ([0.0; LANES], [0.0; LANES]);
            for i in 0..g.b {
                accumulate2(g.plane(a, i, c), g.plane(b, i, c), &mut s1, &mut s2, &fc);
            }
            (total(&s1), total(&s2))
        })
        .collect()
}

/// [`channel_sums`] for one element per plane (x of shape (B, C), BatchNorm1d): the planes
/// are single elements a row of C apart, so each task takes a block of channels and walks the
/// B rows, reading each row's block contiguously. Same order per channel as
/// [`channel_sums`] (there, one element per plane lands in lane 0, summed over b in order),
/// so the same sums.
fn channel_sums_rows<T: Float, F: Fn(f64, f64) -> (f64, f64)>(
    g: Geom,
    a: &[T],
    b: &[T],
    f: impl Fn(usize) -> F + Sync,
) -> Vec<(f64, f64)> {
    /// Channels per task.
    const BLOCK: usize = 512;
    let blocks: Vec<Vec<(f64, f64)>> = (0..g.c.div_ceil(BLOCK))
        .into_par_iter()
        .map(|k| {
            let (c0, c1) = (k * BLOCK, ((k + 1) * BLOCK).min(g.c));
            let fs: Vec<F> = (c0..c1).map(&f).collect();
            let mut acc = vec![(0.0f64, 0.0f64); c1 - c0];
            for i in 0..g.b {
                let (ra, rb) = (
                    &a[i * g.c + c0..i * g.c + c1],
                    &b[i * g.c + c0..i * g.c + c1],
                );
                for (((s, fc), &va), &vb) in acc.iter_mut().zip(&fs).zip(ra).zip(rb) {
                    let (v1, v2) = fc(va.to64(), vb.to64());
                    s.0 += v1;
                    s.1 += v2;
                }
            }
            acc
        })
        .collect();
    blocks.concat()
}

/// Writes `out` plane by plane in parallel: `f(c, plane, at)` fills the plane of channel c
/// that starts at element `at`. With one element per plane (x of shape (B, C), BatchNorm1d)
/// a call per element would cost more than its arithmetic, so there `row(r, at)` fills each
/// sample's row of C channels instead (the same formula, channel by channel).
fn write_planes<T: Float, S: Slot<T>>(
    g: Geom,
    out: &mut [S],
    f: impl Fn(usize, &mut [S], usize) + Sync,
    row: impl Fn(&mut [S], usize) + Sync,
) {
    if out.is_empty() || g.s == 0 {
        return;
    }
    if g.s == 1 {
        let min = MIN_TASK.div_ceil(g.c.max(1));
        out.par_chunks_mut(g.c)
            .enumerate()
            .with_min_len(min)
            .for_each(|(b, r)| row(r, b * g.c));
        return;
    }
    let min = MIN_TASK.div_ceil(g.s);
    out.par_chunks_mut(g.s)
        .enumerate()
        .with_min_len(min)
        .for_each(|(p, o)| f(p % g.c, o, p * g.s));
}

fn forward<T: Float>(
    g: Geom,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    act: Option<LeakyRelu>,
) -> (Vec<T>, Stats) {
    let n = g.n();
    // Shifted sums (by the channel's first element) keep E[x^2] - E[x]^2 accurate when the
    // mean is large compared with the spread.
    let shift: Vec<f64> = (0..g.c)
        .map(|c| if n > 0 { x[c * g.s].to64() } else { 0.0 })
        .collect();
    let sums = channel_sums(g, x, x, |c| {
        let k = shift[c];
        move |v: f64, _: f64| {
            let d = v - k;
            (d, d * d)
        }
    });
    let nf = n as f64;
    let (mut mean, mut var, mut invstd) = (vec![0.0; g.c], vec![0.0; g.c], vec![0.0; g.c]);
    for c in 0..g.c {
        let (m1, m2) = (sums[c].0 / nf, sums[c].1 / nf);
        mean[c] = shift[c] + m1;
        var[c] = if n > 0 {
            (m2 - m1 * m1).max(0.0)
        } else {
            f64::NAN
        };
        invstd[c] = 1.0 / (var[c] + eps).sqrt();
    }
    // y = (x - mean) k + beta, k = gamma r.
    let coef: Vec<(f64, f64, f64)> = (0..g.c)
        .map(|c| (mean[c], gamma[c].to64() * invstd[c], beta[c].to64()))
        .collect();
    let mut y = uninit(g.len());
    let mut side = Vec::new();
    match act {
        None => write_planes(
            g,
            &mut y,
            |c, o, at| {
                let (m, k, b) = coef[c];
                for (o, &v) in o.iter_mut().zip(&x[at..]) {
                    o.set(T::from64((v.to64() - m) * k + b));
                }
            },
            |r, at| {
                for ((o, &v), &(m, k, b)) in r.iter_mut().zip(&x[at..]).zip(&coef) {
                    o.set(T::from64((v.to64() - m) * k + b));
                }
            },
        ),
        Some(a) => {
            let a = Act::<T>::of(a);
            let mut sides = uninit(g.len());
            write_planes_with_side(
                g,
                &mut y,
                &mut sides,
                |c, o, sd, at| {
                    let (m, k, b) = coef[c];
                    for ((o, sd), &v) in o.iter_mut().zip(sd).zip(&x[at..]) {
                        let pre = T::from64((v.to64() - m) * k + b);
                        sd.set(LeakyRelu::side(pre));
                        o.set(a.value(pre));
                    }
                },
                |r, sd, at| {
                    for (((o, sd), &v), &(m, k, b)) in r.iter_mut().zip(sd).zip(&x[at..]).zip(&coef)
                    {
                        let pre = T::from64((v.to64() - m) * k + b);
                        sd.set(LeakyRelu::side(pre));
                        o.set(a.value(pre));
                    }
                },
            );
            // SAFETY: write_planes_with_side writes every element (every plane, or every row
            // of a (B, C) input; both are empty only when the tensor is).
            side = unsafe { assume_init(sides) };
        }
    }
    // SAFETY: as for the sides; write_planes covers the output the same way.
    let y = unsafe { assume_init(y) };
    let stats = Stats {
        mean,
        var,
        invstd,
        side: Arc::new(side),
    };
    (y, stats)
}

/// [`write_planes`] that also hands each plane (or row) its part of a byte per element.
fn write_planes_with_side<T: Float, S: Slot<T>, U: Slot<u8>>(
    g: Geom,
    out: &mut [S],
    side: &mut [U],
    f: impl Fn(usize, &mut [S], &mut [U], usize) + Sync,
    row: impl Fn(&mut [S], &mut [U], usize) + Sync,
) {
    if out.is_empty() || g.s == 0 {
        return;
    }
    if g.s == 1 {
        let min = MIN_TASK.div_ceil(g.c.max(1));
        out.par_chunks_mut(g.c)
            .zip(side.par_chunks_mut(g.c))
            .enumerate()
            .with_min_len(min)
            .for_each(|(b, (r, sd))| row(r, sd, b * g.c));
        return;
    }
    let min = MIN_TASK.div_ceil(g.s);
    out.par_chunks_mut(g.s)
        .zip(side.par_chunks_mut(g.s))
        .enumerate()
        .with_min_len(min)
        .for_each(|(p, (o, sd))| f(p % g.c, o, sd, p * g.s));
}

/// [`backward`] of act(BN(x)): dy times act' on the recorded sides, then BN's backward.
fn backward_act<T: Float>(
    g: Geom,
    x: &[T],
    gamma: &[T],
    dy: &[T],
    st: &Stats,
    act: Option<LeakyRelu>,
) -> Vec<T> {
    match act {
        None => backward(g, x, gamma, dy, st),
        Some(a) => backward(g, x, gamma, &times_act_derivative(dy, &st.side, a), st),
    }
}

fn backward<T: Float>(g: Geom, x: &[T], gamma: &[T], dy: &[T], st: &Stats) -> Vec<T> {
    let sums = channel_sums(g, dy, x, |c| {
        let m = st.mean[c];
        move |d: f64, v: f64| (d, d * (v - m))
    });
    let nf = g.n() as f64;
    let m = g.len();
    let mut out = uninit(m + 2 * g.c);
    let (dx, rest) = out.split_at_mut(m);
    // dx = gamma r (dy - sdy / N) - gamma r^3 sdyx / N (x - mean), with sdy = sum(dy),
    // sdyx = sum(dy (x - mean)); dgamma = r sdyx, dbeta = sdy.
    let coef: Vec<(f64, f64, f64, f64)> = (0..g.c)
        .map(|c| {
            let (sdy, sdyx) = sums[c];
            let r = st.invstd[c];
            let gr = gamma[c].to64() * r;
            (st.mean[c], gr, -gr * sdy / nf, -gr * r * r * sdyx / nf)
        })
        .collect();
    write_planes(
        g,
        dx,
        |c, o, at| {
            let (mean, k_dy, k0, k_x) = coef[c];
            for ((o, &d), &v) in o.iter_mut().zip(&dy[at..]).zip(&x[at..]) {
                o.set(T::from64(k_dy * d.to64() + k0 + k_x * (v.to64() - mean)));
            }
        },
        |r, at| {
            for (((o, &d), &v), &(mean, k_dy, k0, k_x)) in
                r.iter_mut().zip(&dy[at..]).zip(&x[at..]).zip(&coef)
            {
                o.set(T::from64(k_dy * d.to64() + k0 + k_x * (v.to64() - mean)));
            }
        },
    );
    for c in 0..g.c {
        let (sdy, sdyx) = sums[c];
        rest[c].set(T::from64(st.invstd[c] * sdyx));
        rest[g.c + c].set(T::from64(sdy));
    }
    // SAFETY: write_planes wrote all of dx (every plane, or every row of a (B, C) input), the
    // loop all of `rest`.
    unsafe { assume_init(out) }
}

/// Conditional BatchNorm's per-sample affine: y (B, C, ...) * gamma (B, C) + beta (B, C), one
/// scale and shift per sample and channel. On the CPU (f32, f64) one fused op ([`CondAffine`],
/// one pass forward, one backward); elsewhere [`cond_affine_basic`].
///
/// Backward, per (sample, channel) plane: dy = g gamma, dgamma = sum(g y), dbeta = sum(g).
/// Inside a [`crate::grad::first_order_backward`] with `mode` (the backward mode of the pass,
/// if any) one fused pass computes all three as plain values; in every other backward
/// (gradient penalties, or no mode) they are candle ops, so higher orders stay exact.
pub fn cond_affine(
    y: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mode: Option<&GradMode>,
) -> Result<Tensor> {
    let g = Geom::of(y.dims())?;
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims() != [g.b, g.c] {
            bail!(
                "conditional affine: {name} {:?} does not fit an input {:?} (expected ({}, {}))",
                t.dims(),
                y.dims(),
                g.b,
                g.c
            );
        }
    }
    if fast_path(y, Some(gamma), Some(beta)) {
        let op = CondAffine {
            mode: mode.cloned(),
        };
        y.contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
    } else {
        cond_affine_basic(y, gamma, beta)
    }
}

/// [`cond_affine`] from broadcast candle ops (the fallback and the tests' reference).
pub fn cond_affine_basic(y: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let g = Geom::of(y.dims())?;
    let y3 = y.reshape((g.b, g.c, g.s))?;
    let out = y3
        .broadcast_mul(&gamma.reshape((g.b, g.c, 1))?)?
        .broadcast_add(&beta.reshape((g.b, g.c, 1))?)?;
    out.reshape(y.dims())
}

/// The fused conditional affine: arguments y, gamma, beta (see [`cond_affine`]); `mode`: the
/// backward mode of the pass that built it, if any.
#[derive(Debug, Clone, Default)]
pub struct CondAffine {
    pub mode: Option<GradMode>,
}

impl CustomOp3 for CondAffine {
    fn name(&self) -> &'static str {
        "ganscope-cond-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn f<T: Float>(g: Geom, y: &[T], ga: &[T], be: &[T]) -> Vec<T> {
            let mut out = vec![T::from64(0.0); g.len()];
            if g.s > 0 {
                out.par_chunks_mut(g.s)
                    .zip(y.par_chunks(g.s))
                    .enumerate()
                    .with_min_len(MIN_TASK.div_ceil(g.s))
                    .for_each(|(p, (o, y))| {
                        let (a, b) = (ga[p], be[p]);
                        for (o, &v) in o.iter_mut().zip(y) {
                            *o = v * a + b;
                        }
                    });
            }
            out
        }
        let name = self.name();
        let g = Geom::of(l1.dims())?;
        if l2.shape().elem_count() != g.b * g.c || l3.shape().elem_count() != g.b * g.c {
            bail!(
                "{name}: gamma {:?} and beta {:?} for an input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let a = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => {
                let [y, ga, be] = args3::<f32>(name, a)?;
                CpuStorage::F32(f(g, y, ga, be))
            }
            DType::F64 => {
                let [y, ga, be] = args3::<f64>(name, a)?;
                CpuStorage::F64(f(g, y, ga, be))
            }
            dt => bail!("{name}: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ty, tg, tb) = (y.track_op(), gamma.track_op(), beta.track_op());
        if !(ty || tg || tb) {
            return Ok((None, None, None));
        }
        let geom = Geom::of(y.dims())?;
        let (dy, dg, db) = if GradMode::first_order_in(self.mode.as_ref()) {
            let packed = y.apply_op3(gamma, &g.contiguous()?, CondAffineBwd)?;
            let (n, m) = (geom.len(), geom.b * geom.c);
            (
                packed.narrow(0, 0, n)?.reshape(y.dims())?,
                packed.narrow(0, n, m)?.reshape(gamma.dims())?,
                packed.narrow(0, n + m, m)?.reshape(beta.dims())?,
            )
        } else {
            let g3 = g.reshape((geom.b, geom.c, geom.s))?;
            let y3 = y.reshape((geom.b, geom.c, geom.s))?;
            (
                g3.broadcast_mul(&gamma.reshape((geom.b, geom.c, 1))?)?
                    .reshape(y.dims())?,
                (&g3 * &y3)?.sum(2)?,
                g3.sum(2)?,
            )
        };
        let mode = self.mode.as_ref();
        Ok((
            GradMode::settle(mode, ty.then_some(dy)),
            GradMode::settle(mode, tg.then_some(dg)),
            GradMode::settle(mode, tb.then_some(db)),
        ))
    }
}

/// First-order backward of [`CondAffine`]: (y, gamma, g) -> [dy (flattened), dgamma (B C),
/// dbeta (B C)] in one vector (a custom op has one output). Only used inside a
/// [`crate::grad::first_order_backward`], so it has no backward of its own.
#[derive(Debug, Clone, Copy)]
struct CondAffineBwd;

impl CustomOp3 for CondAffineBwd {
    fn name(&self) -> &'static str {
        "ganscope-cond-affine-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn f<T: Float>(g: Geom, y: &[T], ga: &[T], dout: &[T]) -> Vec<T> {
            let (n, m) = (g.len(), g.b * g.c);
            let mut out = vec![T::from64(0.0); n + 2 * m];
            let (dy, sums) = out.split_at_mut(n);
            let mut per_plane = vec![(0.0f64, 0.0f64); m];
            if g.s > 0 {
                dy.par_chunks_mut(g.s)
                    .zip(per_plane.par_iter_mut())
                    .enumerate()
                    .with_min_len(MIN_TASK.div_ceil(g.s))
                    .for_each(|(p, (d, sum))| {
                        let (yp, gp) = (&y[p * g.s..][..g.s], &dout[p * g.s..][..g.s]);
                        let a = ga[p];
                        for (d, &gv) in d.iter_mut().zip(gp) {
                            *d = gv * a;
                        }
                        let (mut s1, mut s2) = ([0.0; LANES], [0.0; LANES]);
                        accumulate2(gp, yp, &mut s1, &mut s2, |gv, yv| (gv * yv, gv));
                        *sum = (total(&s1), total(&s2));
                    });
            }
            let (dg, db) = sums.split_at_mut(m);
            for ((dg, db), &(s1, s2)) in dg.iter_mut().zip(db.iter_mut()).zip(&per_plane) {
                *dg = T::from64(s1);
                *db = T::from64(s2);
            }
            out
        }
        let name = self.name();
        let g = Geom::of(l1.dims())?;
        if l2.shape().elem_count() != g.b * g.c || l3.dims() != l1.dims() {
            bail!(
                "{name}: gamma {:?} and gradient {:?} for an input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let a = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => {
                let [y, ga, d] = args3::<f32>(name, a)?;
                CpuStorage::F32(f(g, y, ga, d))
            }
            DType::F64 => {
                let [y, ga, d] = args3::<f64>(name, a)?;
                CpuStorage::F64(f(g, y, ga, d))
            }
            dt => bail!("{name}: unsupported dtype {dt:?}"),
        };
        let len = g.len() + 2 * g.b * g.c;
        Ok((out, len.into()))
    }
}

#[cfg(test)]
mod tests;
