//! Spatial self-attention (SAGAN) as one fused CPU op.
//!
//! Zhang, Goodfellow, Metaxas, Odena, "Self-Attention Generative Adversarial Networks",
//! ICML 2019. For features with N = H W positions, queries q (B, Ck, N), keys k (B, Ck, N) and
//! values v (B, Cv, N): the attention map A = softmax over keys of q^T k, (B, N, N), and the
//! output o = v A^T, (B, Cv, N).
//!
//! Written with candle ops ([`attention_basic`]), A and every intermediate of its backward are
//! (B, N, N) tensors: at 32x32 and batch 16, 64 MiB each, about a dozen per backward once
//! candle's zero-then-add gradient accumulation is counted. [`attention`] works one sample at a
//! time in at most two N x N scratch buffers and recomputes A in the backward (as
//! FlashAttention does; q^T k is the cheap product, Ck = C/8):
//! - forward: L = q^T k, A = softmax_rows(L), o = v A^T;
//! - backward, from g = do (B, Cv, N): dv = g A, dA = g^T v, dL = A * (dA - rowsum(dA * A)),
//!   dq = k dL^T, dk = q dL.
//!
//! Gradients of gradients: inside a [`crate::grad::first_order_backward`] with the
//! [`GradMode`] the op was built with (a training step's update, whose gradients nobody
//! differentiates) the backward runs fused kernels and returns plain values. Every other
//! backward (gradient penalties, ops built without a mode) gets the same formulas written with
//! differentiable candle ops, so second and higher orders stay exact.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::conv::{Elem, Scratch};
use super::matmul::matmul_in;
use super::ops::{softmax_last, softmax_row};
use super::{Float, cpu_slice};
use crate::error::Result;
use crate::grad::GradMode;

const NAME: &str = "ganscope-attention";

/// o = v softmax_rows(q^T k)^T for q, k (B, Ck, N) and v (B, Cv, N); returns (B, Cv, N).
/// On the CPU (f32, f64) the fused [`AttentionOp`], elsewhere [`attention_basic`]. `mode`:
/// the pass's backward mode, if any (see the module docs).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mode: Option<&GradMode>) -> Result<Tensor> {
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
        let op = AttentionOp {
            mode: mode.cloned(),
        };
        Ok(q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
    } else {
        attention_basic(q, k, v)
    }
}

/// The same attention from candle ops (the fallback and the tests' reference).
pub fn attention_basic(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let a = attention_map(q, k)?; // (B, N, N)
    Ok(v.contiguous()?.matmul(&a.transpose(1, 2)?.contiguous()?)?) // (B, Cv, N)
}

/// A = softmax over the last dimension of q^T k: (B, N, N).
fn attention_map(q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
    let logits = q.transpose(1, 2)?.contiguous()?.matmul(&k.contiguous()?)?; // (B, N, N)
    softmax_last(&logits).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// (dq, dk, dv) from candle ops: differentiable again.
fn grads_basic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let a = attention_map(q, k)?; // (B, N, N)
    let g = g.contiguous()?; // (B, Cv, N)
    let dv = g.matmul(&a)?; // (B, Cv, N)
    let da = g.transpose(1, 2)?.contiguous()?.matmul(&v.contiguous()?)?; // (B, N, N)
    let dl = (da.broadcast_sub(&(&da * &a)?.sum_keepdim(D::Minus1)?)? * &a)?; // (B, N, N)
    let dq = k.contiguous()?.matmul(&dl.transpose(1, 2)?.contiguous()?)?; // (B, Ck, N)
    let dk = q.contiguous()?.matmul(&dl)?; // (B, Ck, N)
    Ok((dq, dk, dv))
}

/// Sizes: batch, query/key channels, value channels, positions.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    ck: usize,
    cv: usize,
    n: usize,
}

impl Geom {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Self> {
        match (q, k, v) {
            (&[b, ck, n], &[b2, ck2, n2], &[b3, cv, n3])
                if b2 == b && b3 == b && ck2 == ck && n2 == n && n3 == n =>
            {
                Ok(Self { b, ck, cv, n })
            }
            _ => bail!(
                "ganscope-attention: queries {q:?}, keys {k:?} and values {v:?} do not fit \
                 (expected (B, Ck, N), (B, Ck, N), (B, Cv, N))"
            ),
        }
    }

    /// Whether samples run in parallel (each product on one thread) or one after the other
    /// (each product on every thread).
    fn per_sample_threads(&self) -> bool {
        let t = rayon::current_num_threads();
        t > 1 && self.b >= t
    }
}

/// The fused op: arguments q, k, v; result o. `mode`: the backward mode of the pass that
/// built it, if any.
#[derive(Debug, Clone, Default)]
pub struct AttentionOp {
    pub mode: Option<GradMode>,
}

/// Run `f(sample, out_chunk, parallel_products)` for every sample, `out` split in `chunk`s.
fn per_sample<T: Send>(
    g: &Geom,
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], bool) + Sync,
) {
    if g.per_sample_threads() {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, o)| f(i, o, false));
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, o)| f(i, o, true));
    }
}

/// a (N, N) = softmax_rows(q^T k) for one sample's q, k (Ck, N).
fn attention_rows<T: Elem + Float>(g: &Geom, q: &[T], k: &[T], a: &mut [T], parallel: bool) {
    let n = g.n;
    matmul_in(parallel, n, n, g.ck, a, (n, 1), false, q, (1, n), k, (n, 1));
    for row in a.chunks_mut(n) {
        softmax_row(row);
    }
}

fn forward<T: Elem + Float>(g: &Geom, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let (n, ck, cv) = (g.n, g.ck, g.cv);
    let mut o = vec![T::from_f64(0.0); g.b * cv * n];
    if n == 0 || cv == 0 {
        return o;
    }
    per_sample(g, &mut o, cv * n, |i, o, par| {
        let mut sa = Scratch::<T>::new(n * n);
        let a = sa.get(n * n);
        attention_rows(
            g,
            &q[i * ck * n..][..ck * n],
            &k[i * ck * n..][..ck * n],
            a,
            par,
        );
        // o (Cv, N) = v (Cv, N) A^T
        matmul_in(
            par,
            cv,
            n,
            n,
            o,
            (n, 1),
            false,
            &v[i * cv * n..][..cv * n],
            (n, 1),
            a,
            (1, n),
        );
    });
    o
}

/// (dq, dk, dv) for one batch, each sample's three gradients packed as [dq | dk | dv].
fn backward<T: Elem + Float>(g: &Geom, q: &[T], k: &[T], v: &[T], go: &[T]) -> Vec<T> {
    let (n, ck, cv) = (g.n, g.ck, g.cv);
    let per = 2 * ck * n + cv * n;
    let mut out = vec![T::from_f64(0.0); g.b * per];
    if per == 0 {
        return out;
    }
    per_sample(g, &mut out, per, |i, out, par| {
        let (qi, ki) = (&q[i * ck * n..][..ck * n], &k[i * ck * n..][..ck * n]);
        let (vi, gi) = (&v[i * cv * n..][..cv * n], &go[i * cv * n..][..cv * n]);
        let (dq, rest) = out.split_at_mut(ck * n);
        let (dk, dv) = rest.split_at_mut(ck * n);
        let (mut sa, mut sd) = (Scratch::<T>::new(n * n), Scratch::<T>::new(n * n));
        let (a, d) = (sa.get(n * n), sd.get(n * n));
        attention_rows(g, qi, ki, a, par);
        // dv (Cv, N) = g (Cv, N) A
        matmul_in(par, cv, n, n, dv, (n, 1), false, gi, (n, 1), a, (n, 1));
        // dA (N, N) = g^T v
        matmul_in(par, n, n, cv, d, (n, 1), false, gi, (1, n), vi, (n, 1));
        // dL = A * (dA - rowsum(dA * A)), in place of dA
        for (dr, ar) in d.chunks_mut(n).zip(a.chunks(n)) {
            let s = dr
                .iter()
                .zip(ar)
                .fold(T::from_f64(0.0), |s, (&x, &y)| s + x * y);
            for (x, &y) in dr.iter_mut().zip(ar) {
                *x = (*x - s) * y;
            }
        }
        // dq (Ck, N) = k dL^T, dk (Ck, N) = q dL
        matmul_in(par, ck, n, n, dq, (n, 1), false, ki, (n, 1), d, (1, n));
        matmul_in(par, ck, n, n, dk, (n, 1), false, qi, (n, 1), d, (n, 1));
    });
    out
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ganscope-attention"
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
        let g = Geom::of(l1.dims(), l2.dims(), l3.dims())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(
                    &g,
                    cpu_slice(s1, l1, NAME)?,
                    cpu_slice(s2, l2, NAME)?,
                    cpu_slice(s3, l3, NAME)?,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(
                    &g,
                    cpu_slice(s1, l1, NAME)?,
                    cpu_slice(s2, l2, NAME)?,
                    cpu_slice(s3, l3, NAME)?,
                ))
            }
            _ => bail!(
                "ganscope-attention: expected three f32 or three f64 tensors, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((out, (g.b, g.cv, g.n).into()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        go: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (tq, tk, tv) = (q.track_op(), k.track_op(), v.track_op());
        if !(tq || tk || tv) {
            return Ok((None, None, None));
        }
        let (dq, dk, dv) = if GradMode::first_order_in(self.mode.as_ref()) {
            grads_fused(q, k, v, go)?
        } else {
            grads_basic(q, k, v, go)?
        };
        Ok((tq.then_some(dq), tk.then_some(dk), tv.then_some(dv)))
    }
}

/// (dq, dk, dv) from the fused kernels, as plain values (outside candle's graph).
fn grads_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    go: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let g = Geom::of(q.dims(), k.dims(), v.dims())?;
    let go = go.contiguous()?;
    let (sq, lq) = q.storage_and_layout();
    let (sk, lk) = k.storage_and_layout();
    let (sv, lv) = v.storage_and_layout();
    let (sg, lg) = go.storage_and_layout();
    let (Storage::Cpu(sq), Storage::Cpu(sk), Storage::Cpu(sv), Storage::Cpu(sg)) =
        (&*sq, &*sk, &*sv, &*sg)
    else {
        bail!("ganscope-attention: backward off the CPU")
    };
    if lg.dims() != [g.b, g.cv, g.n] {
        bail!(
            "ganscope-attention: output gradient {:?} does not fit {g:?}",
            lg.dims()
        );
    }
    let a = [(sq, lq), (sk, lk), (sv, lv), (sg, lg)];
    let packed = match (sq, sk, sv, sg) {
        (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
            packed_grads::<f32>(&g, a)?
        }
        (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
            packed_grads::<f64>(&g, a)?
        }
        _ => bail!("ganscope-attention: mixed dtypes in the backward"),
    };
    let dq = packed.narrow(1, 0, g.ck)?.contiguous()?;
    let dk = packed.narrow(1, g.ck, g.ck)?.contiguous()?;
    let dv = packed.narrow(1, 2 * g.ck, g.cv)?.contiguous()?;
    Ok((dq, dk, dv))
}

/// [`backward`] on four CPU storages of dtype T: (B, 2 Ck + Cv, N), [dq | dk | dv] per sample.
fn packed_grads<T: Elem + Float>(
    g: &Geom,
    a: [(&CpuStorage, &Layout); 4],
) -> candle_core::Result<Tensor> {
    let [q, k, v, go] = [
        cpu_slice::<T>(a[0].0, a[0].1, NAME)?,
        cpu_slice::<T>(a[1].0, a[1].1, NAME)?,
        cpu_slice::<T>(a[2].0, a[2].1, NAME)?,
        cpu_slice::<T>(a[3].0, a[3].1, NAME)?,
    ];
    Tensor::from_vec(
        backward(g, q, k, v, go),
        (g.b, 2 * g.ck + g.cv, g.n),
        &Device::Cpu,
    )
}

#[cfg(test)]
mod tests;
