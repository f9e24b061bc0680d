//! Exact second-order gradients for gradient penalties (WGAN-GP, R1).
//!
//! candle 0.11 detaches every intermediate gradient during `backward` unless the environment
//! variable `CANDLE_GRAD_DO_NOT_DETACH` is set before a thread's first backward (it is read
//! once per thread). Detached gradients make d(penalty)/d(weights) silently wrong. The binary's
//! `main` sets the variable before any thread starts (and `cargo test` through
//! `.cargo/config.toml`); the library never changes the environment: every trainer and every
//! penalty *verifies* it ([`check_exact_second_order`]) on a tiny probe in the calling thread,
//! returning an error instead of an inexact penalty.
//!
//! Which gradients a backward needs (all of them exactly, first order only, or the input's
//! only) is a value, a [`GradMode`] handle that the forward pass hands to its fused ops and
//! that [`first_order_backward`] and [`input_gradient`] set while their backward runs; no
//! thread-local state decides it.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};

thread_local! {
    /// A cache of [`check_exact_second_order`]'s result (the environment is read once per
    /// thread); it changes no behaviour.
    static VERIFIED: Cell<bool> = const { Cell::new(false) };
}

/// What the backward now running through a network's fused ops needs from them: a shared
/// handle, cheap to clone, created by whoever runs a step (the trainer, a benchmark, a test),
/// handed to the forward pass (`crate::nn::Pass::with_grad`), whose custom ops keep a clone,
/// and set around each backward by [`first_order_backward`] and [`input_gradient`] (restored
/// when they return, also on error or panic). A fused op's backward receives no context in
/// candle 0.11, and the same op can be differentiated twice in one step with different needs
/// (a gradient penalty's inner backward wants exact input gradients only, the total loss's
/// backward then passes the same ops again and wants weight gradients, first order only), so
/// the op reads the handle when its backward runs. Ops built without a handle, and ops of a
/// handle that is not inside either call, behave as by default: exact gradients of every
/// order, for every argument that needs one.
#[derive(Debug, Clone, Default)]
pub struct GradMode(Arc<ModeFlags>);

#[derive(Debug, Default)]
struct ModeFlags {
    first_order: AtomicBool,
    inputs_only: AtomicBool,
}

impl GradMode {
    /// A fresh handle, in the default mode.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a [`first_order_backward`] with this handle is running: its gradients will
    /// not be differentiated again, so fused ops whose exact second-order backward is costly
    /// may return plain values outside candle's graph.
    pub fn first_order(&self) -> bool {
        self.0.first_order.load(Ordering::Relaxed)
    }

    /// Whether the backward inside an [`input_gradient`] with this handle is running: its
    /// caller reads only the input's gradient, so ops may skip their weight gradients
    /// (PyTorch's `autograd.grad(..., inputs=x)` prunes them the same way).
    pub fn inputs_only(&self) -> bool {
        self.0.inputs_only.load(Ordering::Relaxed)
    }

    /// [`GradMode::first_order`] of an op's optional handle (none: false).
    pub fn first_order_in(mode: Option<&GradMode>) -> bool {
        mode.is_some_and(GradMode::first_order)
    }

    /// [`GradMode::inputs_only`] of an op's optional handle (none: false).
    pub fn inputs_only_in(mode: Option<&GradMode>) -> bool {
        mode.is_some_and(GradMode::inputs_only)
    }

    /// A fused op's gradient as its backward hands it back to candle: inside a
    /// [`first_order_backward`] with this op's `mode`, its value only ([`Tensor::detach`]);
    /// otherwise unchanged, so gradients of gradients stay exact.
    ///
    /// The binary keeps candle's gradient graphs ([`KEEP_GRAPHS_ENV`], for the penalties), so
    /// every gradient a backward computes from a variable (`g w` of a layer) records the op
    /// that made it, and with it the gradient that flowed in. Each gradient then holds the one
    /// before it alive, down to the parameters' gradients, which live until the optimizer
    /// step: every intermediate gradient of the step at once. A training step's update is
    /// never differentiated again, so its fused ops cut that chain here. Measured with
    /// `ganscope bench --model iclevr-sagan --batch 64` (session 21): a peak of 5151 MiB with
    /// the chain, 2265 MiB with no gradient graphs at all, 2163 MiB with this.
    pub fn settle(mode: Option<&GradMode>, t: Option<Tensor>) -> Option<Tensor> {
        match t {
            Some(t) if Self::first_order_in(mode) => Some(t.detach()),
            t => t,
        }
    }

    /// Runs `f` (a backward) with [`GradMode::inputs_only`] set, restored afterwards. For
    /// [`input_gradient`], and for tests that check an op's input-only backward.
    pub fn inputs_only_while<R>(&self, f: impl FnOnce() -> R) -> R {
        let _flag = FlagGuard::set(&self.0.inputs_only);
        f()
    }
}

/// Sets one flag of a [`GradMode`] for its lifetime and restores the previous value on drop
/// (also when the backward fails or panics).
struct FlagGuard<'a>(&'a AtomicBool, bool);

impl<'a> FlagGuard<'a> {
    fn set(flag: &'a AtomicBool) -> Self {
        Self(flag, flag.swap(true, Ordering::Relaxed))
    }
}

impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Relaxed);
    }
}

/// `t.backward()` for gradients that will not be differentiated again (those of a training
/// step's update). While it runs, [`GradMode::first_order`] is set on `mode`: the fused ops
/// built with that handle whose exact second-order backward is costly (attention, the
/// conditional affine) may return their gradients as plain values outside candle's graph;
/// every other backward keeps the graph, so gradients of gradients stay exact by default.
pub fn first_order_backward(t: &Tensor, mode: &GradMode) -> Result<GradStore> {
    let _flag = FlagGuard::set(&mode.0.first_order);
    Ok(t.backward()?)
}

/// The environment variable that makes candle keep gradient graphs, and its value.
pub const KEEP_GRAPHS_ENV: (&str, &str) = ("CANDLE_GRAD_DO_NOT_DETACH", "1");

/// Check that candle keeps gradient graphs (needed for gradients of gradients) in this
/// thread: [`KEEP_GRAPHS_ENV`] must have been set before the process started its threads.
/// Cheap after the first call in a thread.
pub fn check_exact_second_order() -> Result<()> {
    if VERIFIED.with(|v| v.get()) {
        return Ok(());
    }
    // Probe: y = x^3 at x = 2; dy/dx = 3x^2 = 12; d(dy/dx)/dx = 6x = 12.
    let x = Var::new(2.0f64, &Device::Cpu)?;
    let y = x.as_tensor().powf(3.0)?;
    let g = y
        .backward()?
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Msg("gradient probe: no first-order gradient".into()))?;
    let g2 = g.backward()?.get(x.as_tensor()).cloned();
    let ok = match g2 {
        Some(t) => (t.to_scalar::<f64>()? - 12.0).abs() < 1e-9,
        None => false,
    };
    if !ok {
        return Err(Error::Msg(
            "candle detaches gradients in this thread, so a gradient penalty would be silently \
             wrong: start the process with CANDLE_GRAD_DO_NOT_DETACH=1 (the ganscope binary sets \
             it in main, `cargo test` through .cargo/config.toml)"
                .into(),
        ));
    }
    VERIFIED.with(|v| v.set(true));
    Ok(())
}

/// Per-sample squared L2 norm over all but the first dimension: (B, ...) -> (B,).
pub fn per_sample_sq_norm(g: &Tensor) -> Result<Tensor> {
    Ok(g.sqr()?.flatten_from(1)?.sum(1)?)
}

/// Gradient of `sum(f(x))` with respect to `x`, kept differentiable: `f` gets a fresh leaf
/// variable holding the values of `x` and returns a per-sample output. Also returns f's output.
/// The backward runs with [`GradMode::inputs_only`] set on `mode`, so the convolutions built
/// with that handle (`f`'s forward pass should carry it) skip the weight gradients nobody
/// reads (one critic forward's worth of work: 13.3 of the 172.9 GFLOP of the
/// `wgangp-critic64` benchmark step).
pub fn input_gradient<F>(x: &Tensor, mode: &GradMode, f: F) -> Result<(Tensor, Tensor)>
where
    F: FnOnce(&Tensor) -> Result<Tensor>,
{
    check_exact_second_order()?;
    let xv = Var::from_tensor(&x.detach())?;
    let out = f(xv.as_tensor())?;
    let grads = mode.inputs_only_while(|| out.sum_all()?.backward())?;
    let g = grads
        .get(xv.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Msg("the critic output does not depend on its input".into()))?;
    Ok((g, out))
}
