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
    batch_norm_train_act(x, gamma, beta, eps, None)
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

#[cfg(test)]
thread_local! {
    /// Benchmarks: run the basic-op implementation instead (this thread only).
    static FORCE_BASIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the custom ops handle these arguments (else basic candle ops do).
fn fast_path(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> bool {
    #[cfg(test)]
    if FORCE_BASIC.with(|f| f.get()) {
        return false;
    }
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
        Ok((gx.transpose()?, gg.transpose()?, gb.transpose()?))
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
        Ok((ty.then_some(dy), tg.then_some(dg), tb.then_some(db)))
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
mod tests {
    use std::time::Instant;

    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    const EPS: f64 = 1e-5;

    fn randn(rng: &mut Rng, dims: &[usize], mean: f64, std: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = rng
            .normal_vec(n)
            .into_iter()
            .map(|v| mean + std * v)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn vec64(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (vec64(a), vec64(b));
        assert_eq!(a.len(), b.len());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let s = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
        d / s.max(1e-300)
    }

    /// The fused conditional affine against broadcast candle ops, f32, on (B, C, H, W),
    /// (B, C, 1, 1) and (B, C) inputs: values, gradients in both backward modes (fused inside
    /// a `first_order_backward` of the op's mode, candle ops outside) and a gradient penalty's
    /// second order agree to 1e-5 relative; a gamma of the wrong shape is an error.
    #[test]
    fn cond_affine_matches_candle_ops() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(3);
        let f32t = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        for dims in [
            vec![4, 3, 5, 7],
            vec![16, 8, 1, 1],
            vec![3, 5],
            vec![2, 4, 64, 64],
        ] {
            let (b, c) = (dims[0], dims[1]);
            let y0 = f32t(randn(&mut rng, &dims, 0.0, 1.0));
            let g0 = f32t(randn(&mut rng, &[b, c], 1.0, 0.5));
            let b0 = f32t(randn(&mut rng, &[b, c], 0.0, 0.5));
            let r0 = f32t(randn(&mut rng, &dims, 0.0, 1.0));
            let mut outs = Vec::new();
            for fused in [true, false] {
                let (y, ga, be) = (
                    Var::from_tensor(&y0).unwrap(),
                    Var::from_tensor(&g0).unwrap(),
                    Var::from_tensor(&b0).unwrap(),
                );
                let mode = GradMode::new();
                let (y_, ga_, be_) = (y.as_tensor(), ga.as_tensor(), be.as_tensor());
                let out = if fused {
                    cond_affine(y_, ga_, be_, Some(&mode))
                } else {
                    cond_affine_basic(y_, ga_, be_)
                }
                .unwrap();
                let loss = (&out * &r0).unwrap().sum_all().unwrap();
                let first = crate::grad::first_order_backward(&loss, &mode).unwrap();
                let graph = loss.backward().unwrap();
                // Penalty on dy (= r gamma): its gradient in gamma is 2 sum(r^2 gamma).
                let dy = graph.get(y.as_tensor()).unwrap();
                let p = dy.sqr().unwrap().sum_all().unwrap();
                let second = p.backward().unwrap();
                if fused {
                    // The mode decides: inside its first-order backward the fused backward op,
                    // which has no backward of its own; outside it, differentiable candle ops.
                    let again = |g: &candle_core::backprop::GradStore| {
                        let d = g.get(y.as_tensor()).unwrap();
                        d.sqr().unwrap().sum_all().unwrap().backward()
                    };
                    assert!(again(&first).is_err());
                    assert!(again(&graph).is_ok());
                }
                let mut v = vec![out];
                for t in [&y, &ga, &be] {
                    v.push(first.get(t.as_tensor()).unwrap().clone());
                    v.push(graph.get(t.as_tensor()).unwrap().clone());
                }
                v.push(second.get(ga.as_tensor()).unwrap().clone());
                outs.push(v);
            }
            for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                assert!(rel(a, b) < 1e-5, "{dims:?} output {i}: {}", rel(a, b));
            }
        }
        let y = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let ok = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let err = cond_affine(&y, &bad, &ok, None).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    type Bn =
        fn(&Tensor, Option<&Tensor>, Option<&Tensor>, f64) -> Result<(Tensor, Tensor, Tensor)>;
    type BnFn =
        dyn Fn(&Tensor, Option<&Tensor>, Option<&Tensor>, f64) -> Result<(Tensor, Tensor, Tensor)>;

    struct Case {
        dims: Vec<usize>,
        affine: bool,
    }

    fn cases() -> Vec<Case> {
        let c = |dims: &[usize], affine| Case {
            dims: dims.to_vec(),
            affine,
        };
        vec![
            c(&[4, 3, 5, 7], true),
            c(&[4, 3, 5, 7], false),
            c(&[2, 1, 3, 3], true),    // C = 1
            c(&[16, 8, 1, 1], true),   // BN1d as (B, C, 1, 1)
            c(&[16, 8], true),         // BN1d as (B, C)
            c(&[5, 1100], true),       // BN1d, several channel blocks
            c(&[3, 700, 1, 1], false), // BN1d as (B, C, 1, 1), two blocks
            c(&[1, 5, 1, 1], true),    // N = 1: var = 0
            c(&[3, 2, 4, 9], false),   // planes not a multiple of the lanes
            c(&[8, 2, 64, 64], true),  // large B H W
            c(&[32, 64, 4, 4], true),  // many channels per rayon task
        ]
    }

    /// y, mean, var and the gradients of sum(r * y + q * y^2) w.r.t. x, gamma, beta.
    fn run(bn: Bn, x: &Tensor, gb: Option<(&Tensor, &Tensor)>, r: &Tensor) -> Vec<Tensor> {
        let xv = Var::from_tensor(x).unwrap();
        let vars = gb.map(|(g, b)| (Var::from_tensor(g).unwrap(), Var::from_tensor(b).unwrap()));
        let (y, mean, var) = bn(
            xv.as_tensor(),
            vars.as_ref().map(|v| v.0.as_tensor()),
            vars.as_ref().map(|v| v.1.as_tensor()),
            EPS,
        )
        .unwrap();
        let loss = ((&y * r).unwrap() + (y.sqr().unwrap() * 0.3).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut out = vec![y, mean, var, grads.get(xv.as_tensor()).unwrap().clone()];
        if let Some((g, b)) = &vars {
            out.push(grads.get(g.as_tensor()).unwrap().clone());
            out.push(grads.get(b.as_tensor()).unwrap().clone());
        }
        out
    }

    const NAMES: [&str; 6] = ["y", "mean", "var", "dx", "dgamma", "dbeta"];

    /// Forward, statistics and first-order gradients against the basic ops: in f64 against
    /// f64, in f32 against the basic ops run in f64 on the same (f32-representable) values.
    #[test]
    fn matches_basic_ops_first_order() {
        let mut rng = Rng::new(5);
        for case in cases() {
            let d = &case.dims;
            let c = d[1];
            let x = randn(&mut rng, d, 3.0, 2.0);
            let r = randn(&mut rng, d, 0.0, 1.0);
            let g = randn(&mut rng, &[c], 1.0, 0.5);
            let b = randn(&mut rng, &[c], 0.0, 0.5);
            let gb = case.affine.then_some((&g, &b));
            let want = run(batch_norm_train_basic, &x, gb, &r);
            let got = run(batch_norm_train, &x, gb, &r);
            for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                let e = rel(a, w);
                eprintln!(
                    "f64 {d:?} affine {}: {} rel err {e:.1e}",
                    case.affine, NAMES[i]
                );
                assert!(e < 1e-12, "f64 {d:?}: {} rel err {e:.2e}", NAMES[i]);
            }
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (x32, r32, g32, b32) = (f(&x), f(&r), f(&g), f(&b));
            let up = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (g32u, b32u) = (up(&g32), up(&b32));
            let want = run(
                batch_norm_train_basic,
                &up(&x32),
                case.affine.then_some((&g32u, &b32u)),
                &up(&r32),
            );
            let got = run(
                batch_norm_train,
                &x32,
                case.affine.then_some((&g32, &b32)),
                &r32,
            );
            let basic32 = run(
                batch_norm_train_basic,
                &x32,
                case.affine.then_some((&g32, &b32)),
                &r32,
            );
            for (i, ((a, w), b32)) in got.iter().zip(&want).zip(&basic32).enumerate() {
                assert_eq!(a.dtype(), DType::F32);
                let (e, eb) = (rel(a, w), rel(b32, w));
                eprintln!(
                    "f32 {d:?} affine {}: {} rel err {e:.1e} (basic ops in f32: {eb:.1e})",
                    case.affine, NAMES[i]
                );
                assert!(e < 1e-5, "f32 {d:?}: {} rel err {e:.2e}", NAMES[i]);
            }
        }
    }

    /// Non-contiguous input, and the error for mismatched shapes.
    #[test]
    fn strided_input_and_bad_shapes() {
        let mut rng = Rng::new(6);
        let x = randn(&mut rng, &[3, 5, 4, 2], 0.0, 1.0);
        let xt = x.transpose(0, 1).unwrap(); // (5, 3, 4, 2), strided
        let (a, ..) = batch_norm_train(&xt, None, None, EPS).unwrap();
        let (b, ..) = batch_norm_train_basic(&xt, None, None, EPS).unwrap();
        assert!(rel(&a, &b) < 1e-12);
        let g = randn(&mut rng, &[4], 1.0, 0.1);
        assert!(batch_norm_train(&x, Some(&g), None, EPS).is_err());
        assert!(batch_norm_train(&x.flatten_all().unwrap(), None, None, EPS).is_err());
    }

    /// The function and the inputs of a second-order check: the penalty
    /// P = sum(gx^2) + 0.7 sum(ggamma^2) + sum(w * gbeta), where (gx, ggamma, gbeta) are the
    /// gradients of sum(r * y + 0.3 y^2) (so dy depends on x, gamma and beta too).
    struct Second {
        x: Tensor,
        g: Tensor,
        b: Tensor,
        r: Tensor,
        w: Tensor,
        affine: bool,
    }

    impl Second {
        fn new(rng: &mut Rng, dims: &[usize], affine: bool) -> Self {
            let c = dims[1];
            Self {
                x: randn(rng, dims, 0.5, 1.5),
                g: randn(rng, &[c], 1.0, 0.5),
                b: randn(rng, &[c], 0.0, 0.5),
                r: randn(rng, dims, 0.0, 1.0),
                w: randn(rng, &[c], 0.0, 1.0),
                affine,
            }
        }

        /// P and (if `grad`) dP/d(x, gamma, beta) (zeros for those P does not reach).
        fn penalty(
            &self,
            bn: &BnFn,
            x: &Tensor,
            g: &Tensor,
            b: &Tensor,
            grad: bool,
        ) -> (f64, Vec<Tensor>) {
            let (xv, gv, bv) = (
                Var::from_tensor(x).unwrap(),
                Var::from_tensor(g).unwrap(),
                Var::from_tensor(b).unwrap(),
            );
            let (y, ..) = if self.affine {
                bn(
                    xv.as_tensor(),
                    Some(gv.as_tensor()),
                    Some(bv.as_tensor()),
                    EPS,
                )
            } else {
                bn(xv.as_tensor(), None, None, EPS)
            }
            .unwrap();
            let l = ((&y * &self.r).unwrap() + (y.sqr().unwrap() * 0.3).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g1 = l.backward().unwrap();
            let mut p = g1
                .get(xv.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            if self.affine {
                let gg = g1.get(gv.as_tensor()).unwrap();
                let gb = g1.get(bv.as_tensor()).unwrap();
                p = (p + (gg.sqr().unwrap().sum_all().unwrap() * 0.7).unwrap()).unwrap();
                p = (p + (gb * &self.w).unwrap().sum_all().unwrap()).unwrap();
            }
            let pv = p.to_scalar::<f64>().unwrap();
            if !grad {
                return (pv, vec![]);
            }
            let g2 = p.backward().unwrap();
            let get = |v: &Var| match g2.get(v.as_tensor()) {
                Some(t) => t.clone(),
                None => v.as_tensor().zeros_like().unwrap(),
            };
            (pv, vec![get(&xv), get(&gv), get(&bv)])
        }
    }

    /// Gradients of a gradient penalty through the fused op: against central finite
    /// differences and against double backward through the basic ops, in f64.
    /// dP/d(x, gamma, beta) through `op`: against central finite differences of P (rel
    /// < 1e-6) and against the same through `reference` (rel < 1e-10).
    fn check_second_order(s: &Second, op: &BnFn, reference: &BnFn, what: &str) {
        let (p, grads) = s.penalty(op, &s.x, &s.g, &s.b, true);
        let (pb, basic) = s.penalty(reference, &s.x, &s.g, &s.b, true);
        assert!((p - pb).abs() <= 1e-12 * pb.abs(), "{what}: {p} vs {pb}");
        let h = 1e-5;
        for (k, name) in ["x", "gamma", "beta"].iter().enumerate() {
            if !s.affine && k > 0 {
                continue;
            }
            let arg = [&s.x, &s.g, &s.b][k];
            let orig = vec64(arg);
            let fd: Vec<f64> = (0..orig.len())
                .map(|i| {
                    let at = |d: f64| {
                        let mut v = orig.clone();
                        v[i] += d;
                        let t = Tensor::from_vec(v, arg.dims(), &Device::Cpu).unwrap();
                        let mut a = [&s.x, &s.g, &s.b];
                        a[k] = &t;
                        s.penalty(op, a[0], a[1], a[2], false).0
                    };
                    (at(h) - at(-h)) / (2.0 * h)
                })
                .collect();
            let fd = Tensor::from_vec(fd, arg.dims(), &Device::Cpu).unwrap();
            let (e_fd, e_basic) = (rel(&grads[k], &fd), rel(&grads[k], &basic[k]));
            eprintln!(
                "double backward {what}: dP/d{name} rel err {e_fd:.1e} vs finite differences, \
                 {e_basic:.1e} vs the reference"
            );
            assert!(
                e_fd < 1e-6,
                "{what} dP/d{name}: {e_fd:.2e} vs finite differences"
            );
            assert!(
                e_basic < 1e-10,
                "{what} dP/d{name}: {e_basic:.2e} vs the reference"
            );
        }
    }

    #[test]
    fn double_backward_matches_finite_differences() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(7);
        for (dims, affine) in [
            (vec![3, 2, 2, 3], true),
            (vec![3, 2, 2, 3], false),
            (vec![6, 3], true),
            (vec![2, 1, 3, 2], true),
        ] {
            let s = Second::new(&mut rng, &dims, affine);
            let what = format!("{dims:?} affine {affine}");
            check_second_order(&s, &batch_norm_train, &batch_norm_train_basic, &what);
        }
    }

    /// The fused BatchNorm, then the activation as its own op.
    fn separate(
        act: LeakyRelu,
        x: &Tensor,
        g: Option<&Tensor>,
        b: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor) {
        let (y, m, v) = batch_norm_train(x, g, b, EPS).unwrap();
        (act.apply(&y).unwrap(), m, v)
    }

    /// act(BN(x)) in one op gives the same bits as the two ops in turn: values, batch
    /// statistics and the gradients of x, gamma and beta, in f32 and f64, with exact zeros
    /// at the activation's kink (channel 0 is constant with beta 0, so its pre-activation is
    /// exactly 0 everywhere and the derivative there is the tie value: 1 for ReLU, 0.6 for
    /// leaky ReLU).
    #[test]
    fn activation_fused_matches_separate_ops_bit_for_bit() {
        let mut rng = Rng::new(21);
        for dtype in [DType::F32, DType::F64] {
            for dims in [vec![4, 3, 5, 5], vec![6, 5]] {
                let c = dims[1];
                let x = randn(&mut rng, &dims, 0.3, 1.2);
                // Channel 0 constant: zero variance, pre-activation = beta = 0.
                let keep = Tensor::from_vec(
                    (0..c)
                        .map(|i| f64::from(u8::from(i > 0)))
                        .collect::<Vec<_>>(),
                    if dims.len() == 4 {
                        vec![1, c, 1, 1]
                    } else {
                        vec![1, c]
                    },
                    &Device::Cpu,
                )
                .unwrap();
                let x = x.broadcast_mul(&keep).unwrap().affine(1.0, 0.0).unwrap();
                let x = (x + keep
                    .affine(-1.0, 1.0)
                    .unwrap()
                    .affine(0.7, 0.0)
                    .unwrap()
                    .broadcast_as(dims.as_slice())
                    .unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let g = randn(&mut rng, &[c], 1.0, 0.3).to_dtype(dtype).unwrap();
                let b = (randn(&mut rng, &[c], 0.0, 0.5) * keep.flatten_all().unwrap())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let r = randn(&mut rng, &dims, 0.0, 1.0).to_dtype(dtype).unwrap();
                for act in [LeakyRelu::RELU, LeakyRelu::LEAKY] {
                    let run = |fused: bool| {
                        let (xv, gv, bv) = (
                            Var::from_tensor(&x).unwrap(),
                            Var::from_tensor(&g).unwrap(),
                            Var::from_tensor(&b).unwrap(),
                        );
                        let (xt, gt, bt) = (xv.as_tensor(), gv.as_tensor(), bv.as_tensor());
                        let (y, m, v) = if fused {
                            batch_norm_train_act(xt, Some(gt), Some(bt), EPS, Some(act)).unwrap()
                        } else {
                            separate(act, xt, Some(gt), Some(bt))
                        };
                        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        let mut out = vec![vec64(&y), vec64(&m), vec64(&v)];
                        for t in [xt, gt, bt] {
                            out.push(vec64(grads.get(t).unwrap()));
                        }
                        out
                    };
                    let (fused, sep) = (run(true), run(false));
                    for (i, (a, b)) in fused.iter().zip(&sep).enumerate() {
                        assert!(
                            a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{dtype:?} {dims:?} slope {}: output {i} differs",
                            act.slope()
                        );
                    }
                    // Channel 0 sits on the kink: its x gradient saw the tie value (its
                    // BatchNorm backward is r gamma (u - mean(u)) with u = r dy tie, not zero).
                    let plane: usize = dims[2..].iter().product();
                    let on_kink = fused[0]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (i / plane).is_multiple_of(c))
                        .map(|(_, &v)| v);
                    assert!(on_kink.clone().count() > 0 && on_kink.clone().all(|v| v == 0.0));
                    // And its x gradient is not zero: the tie value let the gradient through.
                    let gx0 = fused[3]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (i / plane).is_multiple_of(c))
                        .map(|(_, &v)| v.abs())
                        .fold(0.0, f64::max);
                    assert!(
                        gx0 > 0.0,
                        "{dims:?} slope {}: no gradient at the kink",
                        act.slope()
                    );
                }
            }
        }
    }

    /// Gradients of gradients through act(BN(x)) in one op: against basic candle ops and
    /// finite differences, as for the plain op.
    #[test]
    fn activation_fused_double_backward() {
        crate::grad::check_exact_second_order().unwrap();
        let mut rng = Rng::new(22);
        for act in [LeakyRelu::RELU, LeakyRelu::LEAKY] {
            let fused = move |x: &Tensor, g: Option<&Tensor>, b: Option<&Tensor>, eps: f64| {
                batch_norm_train_act(x, g, b, eps, Some(act))
            };
            let basic = move |x: &Tensor, g: Option<&Tensor>, b: Option<&Tensor>, eps: f64| {
                let (y, m, v) = batch_norm_train_basic(x, g, b, eps)?;
                Ok((act.apply_basic(&y)?, m, v))
            };
            for dims in [vec![3, 2, 2, 3], vec![6, 3]] {
                let s = Second::new(&mut rng, &dims, true);
                let what = format!("slope {} {dims:?}", act.slope());
                check_second_order(&s, &fused, &basic, &what);
            }
        }
    }

    fn time_ms(n: usize, mut f: impl FnMut()) -> f64 {
        f();
        let mut best = f64::INFINITY;
        for _ in 0..n {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        best
    }

    /// f32 x (N(0, 1)), gamma (N(1, 0.1)), beta (N(0, 0.1)) and loss weights r for a timing.
    fn bench_inputs(rng: &mut Rng, dims: &[usize]) -> (Var, Var, Var, Tensor) {
        let c = dims[1];
        let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = Var::from_tensor(&f(randn(rng, dims, 0.0, 1.0))).unwrap();
        let g = Var::from_tensor(&f(randn(rng, &[c], 1.0, 0.1))).unwrap();
        let b = Var::from_tensor(&f(randn(rng, &[c], 0.0, 0.1))).unwrap();
        (x, g, b, f(randn(rng, dims, 0.0, 1.0)))
    }

    /// act(BN(x)) forward + backward: the two ops in turn vs the fused op, on the DCGAN
    /// layer shapes. Prints the best of 30.
    /// `cargo test --release --lib kernels::fused_bn::tests::bench_act -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_act() {
        crate::tune_allocator();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut rng = Rng::new(9);
        for dims in [
            [64, 64, 14, 14],
            [64, 128, 7, 7],
            [64, 512, 4, 4],
            [64, 128, 16, 16],
            [64, 64, 32, 32],
        ] {
            let (x, g, b, r) = bench_inputs(&mut rng, &dims);
            let (xt, gt, bt) = (x.as_tensor(), g.as_tensor(), b.as_tensor());
            let act = LeakyRelu::LEAKY;
            pool.install(|| {
                let sep = time_ms(30, || {
                    let (y, ..) = separate(act, xt, Some(gt), Some(bt));
                    drop((&y * &r).unwrap().sum_all().unwrap().backward().unwrap());
                });
                let fused = time_ms(30, || {
                    let (y, ..) =
                        batch_norm_train_act(xt, Some(gt), Some(bt), EPS, Some(act)).unwrap();
                    drop((&y * &r).unwrap().sum_all().unwrap().backward().unwrap());
                });
                println!(
                    "{dims:?}: separate {sep:.3} ms, fused {fused:.3} ms ({:.3}x)",
                    fused / sep
                );
            });
        }
    }

    /// BN forward + backward, basic ops vs fused, and one evaluator training step.
    /// `cargo test --release --lib kernels::fused_bn::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench() {
        let mut rng = Rng::new(8);
        for dims in [[64, 16, 32, 32], [64, 128, 7, 7]] {
            let c = dims[1];
            let (x, g, b, r) = bench_inputs(&mut rng, &dims);
            // The layer as it was: normalise with basic ops, then the affine with broadcasts.
            let old = || {
                let (y, ..) = batch_norm_train_basic(x.as_tensor(), None, None, EPS).unwrap();
                let y = y
                    .broadcast_mul(&g.as_tensor().reshape((1, c, 1, 1)).unwrap())
                    .unwrap()
                    .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1)).unwrap())
                    .unwrap();
                (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            };
            let fused = |fwd_only: bool| {
                let (y, ..) =
                    batch_norm_train(x.as_tensor(), Some(g.as_tensor()), Some(b.as_tensor()), EPS)
                        .unwrap();
                if !fwd_only {
                    (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                }
            };
            let basic_fwd = || {
                let (y, ..) = batch_norm_train_basic(x.as_tensor(), None, None, EPS).unwrap();
                drop(
                    y.broadcast_mul(&g.as_tensor().reshape((1, c, 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1)).unwrap())
                        .unwrap(),
                );
            };
            // What the loss and candle's gradient bookkeeping cost without any BatchNorm.
            let loss_only = || {
                (x.as_tensor() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            };
            // The fused backward kernel alone.
            let (_, mean, var) = batch_norm_train(x.as_tensor(), None, None, EPS).unwrap();
            let invstd: Vec<f64> = vec64(&var).iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
            let stats = Arc::new(Stats {
                side: Arc::default(),
                invstd,
                mean: vec64(&mean),
                var: vec64(&var),
            });
            let (xd, gd) = (x.as_tensor().detach(), g.as_tensor().detach());
            let bwd_op = || {
                let op = BnBwdOp {
                    eps: EPS,
                    act: None,
                    stats: stats.clone(),
                };
                drop(xd.apply_op3(&gd, &r, op).unwrap())
            };
            // Best of 3 rounds of 10 each, interleaved (the machine is shared).
            let mut t = [f64::INFINITY; 6];
            for _ in 0..3 {
                let runs: [&dyn Fn(); 6] = [
                    &basic_fwd,
                    &|| fused(true),
                    &old,
                    &|| fused(false),
                    &loss_only,
                    &bwd_op,
                ];
                for (ti, f) in t.iter_mut().zip(runs) {
                    *ti = ti.min(time_ms(10, f));
                }
            }
            let [tb, tf, tbb, tfb, tl, top] = t;
            println!(
                "BN {dims:?} f32: forward basic {tb:.2} ms, fused {tf:.2} ms ({:.1}x); forward + \
                 backward of sum(r * y): basic {tbb:.2} ms, fused {tfb:.2} ms ({:.1}x); without \
                 the {tl:.2} ms the loss and its backward take alone: basic {:.2} ms, fused {:.2} \
                 ms ({:.1}x); fused backward kernel alone {top:.2} ms",
                tb / tf,
                tbb / tfb,
                tbb - tl,
                tfb - tl,
                (tbb - tl) / (tfb - tl)
            );
        }
        evaluator_step();
    }

    fn evaluator_step() {
        use crate::eval::classifier::{Classifier, EvaluatorConfig};
        use crate::nn::Pass;
        use crate::optim::adam::Adam;
        use crate::train::loss::aux_loss;
        let cfg = EvaluatorConfig {
            label_names: (0..24).map(|i| format!("l{i}")).collect(),
            ..EvaluatorConfig::default()
        };
        let dev = Device::Cpu;
        let model = Classifier::new(&cfg, &dev).unwrap();
        let mut opt = Adam::new(model.store.trainable(), 1e-3, 0.9, 0.999, 1e-8).unwrap();
        let mut rng = Rng::new(9);
        let s = cfg.image_size;
        let x = randn(&mut rng, &[cfg.batch_size, cfg.channels, s, s], 0.0, 0.5)
            .to_dtype(DType::F32)
            .unwrap();
        let y = Tensor::from_vec(
            (0..cfg.batch_size * 24)
                .map(|_| if rng.uniform() < 0.1 { 1.0f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (cfg.batch_size, 24),
            &dev,
        )
        .unwrap();
        let mut step = || {
            let (logits, _) = model.forward(&x, Pass::train()).unwrap();
            let loss = aux_loss(cfg.kind, &logits, &y).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        };
        let mut t = [0.0; 2];
        for (i, basic) in [true, false].into_iter().enumerate() {
            FORCE_BASIC.with(|f| f.set(basic));
            t[i] = time_ms(5, &mut step);
        }
        FORCE_BASIC.with(|f| f.set(false));
        println!(
            "evaluator training step (EvaluatorConfig::default(), 64x64x3, batch 64, f32): \
             BatchNorm on basic ops {:.0} ms, fused {:.0} ms ({:.2}x)",
            t[0],
            t[1],
            t[0] / t[1]
        );
    }
}
