//! Exact second-order gradients for gradient penalties (WGAN-GP, R1).
//!
//! candle 0.11 detaches every intermediate gradient during `backward` unless the environment
//! variable `CANDLE_GRAD_DO_NOT_DETACH` is set before a thread's first backward (it is read
//! once per thread). Detached gradients make d(penalty)/d(weights) silently wrong. The binary's
//! `main` sets the variable before any thread starts (and `cargo test` through
//! `.cargo/config.toml`); the library never changes the environment: every trainer and every
//! penalty *verifies* it ([`check_exact_second_order`]) on a tiny probe in the calling thread,
//! returning an error instead of an inexact penalty.

use std::cell::Cell;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};

thread_local! {
    static VERIFIED: Cell<bool> = const { Cell::new(false) };
    /// Set while [`first_order_backward`] runs in this thread.
    static FIRST_ORDER: Cell<bool> = const { Cell::new(false) };
    /// Set while the backward of [`input_gradient`] runs in this thread.
    static INPUTS_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Sets a thread-local flag for its lifetime and restores the previous value on drop (also
/// when the backward fails).
struct FlagGuard(&'static std::thread::LocalKey<Cell<bool>>, bool);

impl FlagGuard {
    fn set(flag: &'static std::thread::LocalKey<Cell<bool>>) -> Self {
        Self(flag, flag.with(|f| f.replace(true)))
    }
}

impl Drop for FlagGuard {
    fn drop(&mut self) {
        self.0.with(|f| f.set(self.1));
    }
}

/// `t.backward()` for gradients that will not be differentiated again (those of a training
/// step's update). While it runs, fused ops whose exact second-order backward is costly
/// (attention) may return their input gradients as plain values outside candle's graph; every
/// other backward keeps the graph, so gradients of gradients stay exact by default.
pub fn first_order_backward(t: &Tensor) -> Result<GradStore> {
    let _flag = FlagGuard::set(&FIRST_ORDER);
    Ok(t.backward()?)
}

/// Whether the backward now running in this thread is a [`first_order_backward`].
pub fn first_order_only() -> bool {
    FIRST_ORDER.with(|f| f.get())
}

/// Whether the backward now running in this thread is the one inside [`input_gradient`],
/// whose caller reads only the input's gradient: ops may then skip their weight gradients
/// (PyTorch's `autograd.grad(..., inputs=x)` prunes them the same way).
pub fn inputs_only() -> bool {
    INPUTS_ONLY.with(|f| f.get())
}

/// Runs `f` (a backward) with [`inputs_only`] set in this thread.
pub(crate) fn inputs_only_while<R>(f: impl FnOnce() -> R) -> R {
    let _flag = FlagGuard::set(&INPUTS_ONLY);
    f()
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
/// The backward runs under [`inputs_only`], so the convolutions skip the weight gradients
/// nobody reads (one critic forward's worth of work: 13.3 of the 172.9 GFLOP of the
/// `wgangp-critic64` benchmark step).
pub fn input_gradient<F>(x: &Tensor, f: F) -> Result<(Tensor, Tensor)>
where
    F: FnOnce(&Tensor) -> Result<Tensor>,
{
    check_exact_second_order()?;
    let xv = Var::from_tensor(&x.detach())?;
    let out = f(xv.as_tensor())?;
    let grads = inputs_only_while(|| out.sum_all()?.backward())?;
    let g = grads
        .get(xv.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Msg("the critic output does not depend on its input".into()))?;
    Ok((g, out))
}
