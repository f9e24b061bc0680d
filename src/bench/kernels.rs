//! `ganscope bench --model kernels`: the engine's CPU kernels against candle's own ops (or the
//! layer as it was before the kernel), one line per measured case with its times in ms. These
//! were the `#[ignore]` timing tests of `src/kernels/` (issue #18); they print what those
//! printed.
//!
//! Cases, in the order they run (batch 64 unless stated):
//! - linear: [`linear`] against `matmul(w.t())` + `broadcast_add`, forward + backward with x,
//!   w and b all tracked, on the two linear layers of the `cdcgan28` benchmark; median of 31
//!   runs.
//! - BN + activation: leaky-ReLU(BN(x)) forward + backward, the fused BatchNorm then the
//!   activation as its own op against [`batch_norm_train_act`], on the DCGAN layer shapes;
//!   best of 30 after one untimed run.
//! - BN: forward and forward + backward, BatchNorm on basic candle ops (then the affine as
//!   broadcasts, the layer as it was) against the fused op, without and with what the loss
//!   and its backward cost alone, and the fused backward kernel alone; best of 3 interleaved
//!   rounds of 10 (after one untimed run each).
//! - evaluator training step (`EvaluatorConfig::default()`, 64x64x3, batch 64) with BatchNorm
//!   on basic ops and fused; best of 5 after one untimed run.
//! - im2col / col2im alone, row by row against the offset table / pixel gather, on DCGAN-28
//!   and DCGAN-64 layer shapes (batch chunks as the kernels use them); median of 15 after one
//!   untimed run.
//! - convolutions: one plain 128x1024 @ 1024x3136 matmul (the gemm ceiling under the current
//!   load), then each pass (forward, input gradient, weight gradient) of the `cdcgan28`
//!   convolutions, candle's against ours, and a DCGAN-28 G step through D and a D step on
//!   real images without norms; median of 7 after one untimed run.
//!
//! `--iters` / `--warmup` replace each case's own counts (the statistic stays: median or
//! best). The linear and BN + activation cases run in a rayon pool of their own with 2 threads
//! (`--threads` when given); the others on the global pool.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::kernels::conv::{
    Geom, col2im_f32, conv_transpose2d, conv_transpose2d_op, conv2d, conv2d_weight_grad,
    im2col_f32, output_padding,
};
use crate::kernels::fused_bn::{
    backward_kernel, batch_norm_train, batch_norm_train_act, batch_norm_train_basic,
};
use crate::kernels::ops::{LeakyRelu, linear};
use crate::rng::Rng;

/// The BatchNorm epsilon of the BN cases.
const EPS: f64 = 1e-5;

/// What `ganscope bench --model kernels` was asked for.
#[derive(Debug, Clone, Default)]
pub struct KernelBenchOptions {
    /// Batch 2, im2col chunks of at most 2 samples and one timed run per measurement (unless
    /// `iters` says otherwise), no untimed one: a check that every case runs, not a
    /// measurement.
    pub quick: bool,
    /// Timed runs per measurement; each case's own count when `None`.
    pub iters: Option<usize>,
    /// Untimed runs first; each case's own count when `None`.
    pub warmup: Option<usize>,
    /// Threads of the pool the linear and BN + activation cases run in (2 when `None`).
    pub threads: Option<usize>,
}

/// Timing with the options' counts.
struct Timer<'a> {
    opts: &'a KernelBenchOptions,
}

impl Timer<'_> {
    /// (untimed, timed) runs: the options' counts, else the case's own.
    fn counts(&self, warmup: usize, iters: usize) -> (usize, usize) {
        let o = self.opts;
        let (w, i) = if o.quick { (0, 1) } else { (warmup, iters) };
        (o.warmup.unwrap_or(w), o.iters.unwrap_or(i).max(1))
    }

    /// Wall times of `f` in ms after the untimed runs.
    fn times(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f64>> {
        let (warmup, iters) = self.counts(warmup, iters);
        for _ in 0..warmup {
            f()?;
        }
        let mut t = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        Ok(t)
    }

    /// Median wall time in ms (the upper one of an even count).
    fn median(&self, warmup: usize, iters: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
        let t = self.times(warmup, iters, f)?;
        Ok(t[t.len() / 2])
    }

    /// Best wall time in ms.
    fn best(&self, warmup: usize, iters: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
        Ok(self.times(warmup, iters, f)?[0])
    }
}

/// The lines printed, kept for the caller.
struct Out(Vec<String>);

impl Out {
    fn line(&mut self, s: String) {
        println!("{s}");
        self.0.push(s);
    }
}

/// (dims) f32 tensor of N(mean, std^2) entries.
fn randn(rng: &mut Rng, dims: &[usize], mean: f64, std: f64) -> Result<Tensor> {
    let v: Vec<f64> = rng
        .normal_vec(dims.iter().product())
        .into_iter()
        .map(|v| mean + std * v)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// `r`'s value dropped, its error kept.
fn done<T, E: Into<crate::Error>>(r: std::result::Result<T, E>) -> Result<()> {
    r.map(drop).map_err(Into::into)
}

/// `loss = sum(r * y)` and its backward; the gradients are dropped.
fn backward(y: &Tensor, r: &Tensor) -> Result<()> {
    drop((y * r)?.sum_all()?.backward()?);
    Ok(())
}

/// `ganscope bench --model kernels`: run every case and print one line each (after a line
/// with the thread counts); returns the lines.
pub fn run(opts: &KernelBenchOptions) -> Result<Vec<String>> {
    let mut out = Out(Vec::new());
    let batch = if opts.quick { 2 } else { 64 };
    let pool_threads = opts.threads.unwrap_or(2);
    out.line(format!(
        "kernels: {} threads, {pool_threads} for the linear and BN + activation cases{}",
        rayon::current_num_threads(),
        if opts.quick {
            " (quick: tiny sizes)"
        } else {
            ""
        }
    ));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(pool_threads)
        .build()
        .map_err(|e| crate::Error::Msg(format!("kernel bench: thread pool: {e}")))?;
    let timer = Timer { opts };
    pool.install(|| linear_cases(&timer, batch, &mut out))?;
    pool.install(|| bn_act_cases(&timer, batch, &mut out))?;
    bn_cases(&timer, batch, &mut out)?;
    im2col_cases(&timer, opts.quick, &mut out)?;
    conv_cases(&timer, batch, &mut out)?;
    Ok(out.0)
}

/// [`linear`] against candle's ops, forward + backward (x, w and b all need gradients), on the
/// two linear layers of the `cdcgan28` benchmark.
fn linear_cases(timer: &Timer, batch: usize, out: &mut Out) -> Result<()> {
    let mut rng = Rng::new(10);
    for (n, cin, cout) in [(batch, 110, 6272), (batch, 6272, 1)] {
        let var = |rng: &mut Rng, d: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&randn(rng, d, 0.0, 1.0)?)?)
        };
        let (x, w, b) = (
            var(&mut rng, &[n, cin])?,
            var(&mut rng, &[cout, cin])?,
            var(&mut rng, &[cout])?,
        );
        let r = var(&mut rng, &[n, cout])?.as_tensor().detach();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let time = |fused: bool| {
            timer.median(0, 31, || {
                let y = if fused {
                    linear(xt, wt, Some(bt), None)?
                } else {
                    xt.matmul(&wt.t()?)?.broadcast_add(bt)?
                };
                backward(&y, &r)
            })
        };
        let (old, new) = (time(false)?, time(true)?);
        out.line(format!(
            "linear ({n}, {cin}) -> {cout}: candle ops {old:.3} ms, op {new:.3} ms ({:.3}x)",
            new / old
        ));
    }
    Ok(())
}

/// f32 x (N(0, 1)), gamma (N(1, 0.1)), beta (N(0, 0.1)) and loss weights r.
fn bn_inputs(rng: &mut Rng, dims: &[usize]) -> Result<(Var, Var, Var, Tensor)> {
    let c = dims[1];
    let x = Var::from_tensor(&randn(rng, dims, 0.0, 1.0)?)?;
    let g = Var::from_tensor(&randn(rng, &[c], 1.0, 0.1)?)?;
    let b = Var::from_tensor(&randn(rng, &[c], 0.0, 0.1)?)?;
    Ok((x, g, b, randn(rng, dims, 0.0, 1.0)?))
}

/// act(BN(x)) forward + backward: the two ops in turn vs the fused op, on the DCGAN layer
/// shapes.
fn bn_act_cases(timer: &Timer, batch: usize, out: &mut Out) -> Result<()> {
    let mut rng = Rng::new(9);
    for dims in [
        [batch, 64, 14, 14],
        [batch, 128, 7, 7],
        [batch, 512, 4, 4],
        [batch, 128, 16, 16],
        [batch, 64, 32, 32],
    ] {
        let (x, g, b, r) = bn_inputs(&mut rng, &dims)?;
        let (xt, gt, bt) = (x.as_tensor(), g.as_tensor(), b.as_tensor());
        let act = LeakyRelu::LEAKY;
        let sep = timer.best(1, 30, || {
            let (y, ..) = batch_norm_train(xt, Some(gt), Some(bt), EPS)?;
            backward(&act.apply(&y)?, &r)
        })?;
        let fused = timer.best(1, 30, || {
            let (y, ..) = batch_norm_train_act(xt, Some(gt), Some(bt), EPS, Some(act), None)?;
            backward(&y, &r)
        })?;
        out.line(format!(
            "{dims:?}: separate {sep:.3} ms, fused {fused:.3} ms ({:.3}x)",
            fused / sep
        ));
    }
    Ok(())
}

/// BN forward + backward, basic ops vs fused.
fn bn_cases(timer: &Timer, batch: usize, out: &mut Out) -> Result<()> {
    let mut rng = Rng::new(8);
    for dims in [[batch, 16, 32, 32], [batch, 128, 7, 7]] {
        let c = dims[1];
        let (x, g, b, r) = bn_inputs(&mut rng, &dims)?;
        let (xt, gt, bt) = (x.as_tensor(), g.as_tensor(), b.as_tensor());
        // The layer as it was: normalise with basic ops, then the affine with broadcasts.
        let basic = || -> Result<Tensor> {
            let (y, ..) = batch_norm_train_basic(xt, None, None, EPS)?;
            Ok(y.broadcast_mul(&gt.reshape((1, c, 1, 1))?)?
                .broadcast_add(&bt.reshape((1, c, 1, 1))?)?)
        };
        let basic_fwd = || basic().map(drop);
        let old = || backward(&basic()?, &r);
        let fused = |fwd_only: bool| -> Result<()> {
            let (y, ..) = batch_norm_train(xt, Some(gt), Some(bt), EPS)?;
            if !fwd_only {
                backward(&y, &r)?;
            }
            Ok(())
        };
        // What the loss and candle's gradient bookkeeping cost without any BatchNorm.
        let loss_only = || backward(xt, &r);
        // The fused backward kernel alone.
        let kernel = backward_kernel(xt, gt, EPS)?;
        let bwd_op = || done(kernel(&r));
        // Best of 3 rounds, interleaved (the machine is shared).
        let mut t = [f64::INFINITY; 6];
        let rounds = if timer.opts.quick { 1 } else { 3 };
        for _ in 0..rounds {
            let runs: [&dyn Fn() -> Result<()>; 6] = [
                &basic_fwd,
                &|| fused(true),
                &old,
                &|| fused(false),
                &loss_only,
                &bwd_op,
            ];
            for (ti, f) in t.iter_mut().zip(runs) {
                *ti = ti.min(timer.best(1, 10, f)?);
            }
        }
        let [tb, tf, tbb, tfb, tl, top] = t;
        out.line(format!(
            "BN {dims:?} f32: forward basic {tb:.2} ms, fused {tf:.2} ms ({:.1}x); forward + \
             backward of sum(r * y): basic {tbb:.2} ms, fused {tfb:.2} ms ({:.1}x); without \
             the {tl:.2} ms the loss and its backward take alone: basic {:.2} ms, fused {:.2} \
             ms ({:.1}x); fused backward kernel alone {top:.2} ms",
            tb / tf,
            tbb / tfb,
            tbb - tl,
            tfb - tl,
            (tbb - tl) / (tfb - tl)
        ));
    }
    Ok(())
}

/// im2col / col2im alone, row by row against the table / gather, on the DCGAN-28 and DCGAN-64
/// layer shapes (batch chunk as the kernels use it). Fails if the two disagree.
fn im2col_cases(timer: &Timer, quick: bool, out: &mut Out) -> Result<()> {
    let geoms = [
        ("D conv 64->128 14->7", 64, 14, 7, 128, 20),
        ("D conv 11->64 28->14", 11, 28, 14, 64, 64),
        ("D64 conv 64->128 32->16", 64, 32, 16, 128, 4),
        ("D64 conv 3->64 64->32", 3, 64, 32, 64, 16),
    ];
    for (name, c, h, oh, o, nb) in geoms {
        let nb = if quick { nb.min(2) } else { nb };
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
        let ms = |f: &mut dyn FnMut()| {
            timer.median(1, 15, || {
                f();
                Ok(())
            })
        };
        let a = ms(&mut || im2col_f32(&g, nb, &img, &mut cols, false))?;
        let ref_cols = cols.clone();
        let b = ms(&mut || im2col_f32(&g, nb, &img, &mut cols, true))?;
        let c2 = ms(&mut || {
            back.fill(0.0);
            col2im_f32(&g, nb, &cols, &mut back, false)
        })?;
        let ref_back = back.clone();
        let d = ms(&mut || col2im_f32(&g, nb, &cols, &mut back, true))?;
        if ref_cols != cols || ref_back != back {
            return Err(crate::Error::Msg(format!(
                "kernel bench: {name}: the two im2col / col2im implementations disagree"
            )));
        }
        let mb = (cols.len() * 4) as f64 / 1e6;
        out.line(format!(
            "{name} x{nb} ({mb:.1} MB of cols): im2col rows {a:.3} ms, table {b:.3} ms; \
             col2im rows {c2:.3} ms, gather {d:.3} ms"
        ));
    }
    Ok(())
}

/// A timed pass: name, candle's version, ours.
type ConvPass<'a> = (
    &'static str,
    Box<dyn Fn() -> Result<()> + 'a>,
    Box<dyn Fn() -> Result<()> + 'a>,
);

/// The `cdcgan28` convolutions, candle's against ours, pass by pass and as whole steps.
fn conv_cases(timer: &Timer, batch: usize, out: &mut Out) -> Result<()> {
    let mut rng = Rng::new(7);
    let time = |f: &dyn Fn() -> Result<()>| timer.median(1, 7, f);
    // The gemm ceiling under the current load: one matmul as large as the big layers.
    let (m, k, n) = (128, 1024, 3136);
    let (a, b) = (
        randn(&mut rng, &[m, k], 0.0, 1.0)?,
        randn(&mut rng, &[k, n], 0.0, 1.0)?,
    );
    let t = time(&|| done(a.matmul(&b)))?;
    let gflop = 2.0 * (m * k * n) as f64 / 1e9;
    out.line(format!(
        "plain matmul {m}x{k} @ {k}x{n} ({gflop:.2} GFLOP): {t:.2} ms ({:.0} GFLOP/s)",
        gflop / t * 1e3
    ));
    // The cdcgan28 layers of `conv-layers`, each pass candle's against ours.
    let (_, layers) = CONV_LAYERS[1];
    for &(name, transposed, xd, wd, s, p) in layers {
        let xd = [batch, xd[0], xd[1], xd[2]];
        let LayerInputs {
            x,
            w,
            gy,
            gflop,
            op,
        } = layer_inputs(&mut rng, transposed, xd, wd, s, p)?;
        let k = wd[2];
        // candle's passes as its backprop runs them.
        let candle_wgrad = |img: &Tensor, cols: &Tensor| -> Result<Tensor> {
            Ok(img
                .transpose(0, 1)?
                .conv2d(&cols.transpose(0, 1)?, p, 1, s, 1)?
                .transpose(0, 1)?
                .narrow(2, 0, k)?
                .narrow(3, 0, k)?)
        };
        let passes: [ConvPass; 3] = if transposed {
            [
                (
                    "forward",
                    Box::new(|| done(x.conv_transpose2d(&w, p, 0, s, 1))),
                    Box::new(|| done(conv_transpose2d(&x, &w, s, p, None))),
                ),
                (
                    "grad input",
                    Box::new(|| done(gy.conv2d(&w, p, s, 1, 1))),
                    Box::new(|| done(conv2d(&gy, &w, s, p, None))),
                ),
                (
                    "grad weight",
                    Box::new(|| done(candle_wgrad(&gy, &x)?.transpose(0, 1))),
                    Box::new(|| done(conv2d_weight_grad(&gy, &x, s, p, k))),
                ),
            ]
        } else {
            [
                (
                    "forward",
                    Box::new(|| done(x.conv2d(&w, p, s, 1, 1))),
                    Box::new(|| done(conv2d(&x, &w, s, p, None))),
                ),
                (
                    "grad input",
                    Box::new(|| done(gy.conv_transpose2d(&w, p, op, s, 1))),
                    Box::new(|| done(conv_transpose2d_op(&gy, &w, s, p, (op, op), None))),
                ),
                (
                    "grad weight",
                    Box::new(|| done(candle_wgrad(&x, &gy))),
                    Box::new(|| done(conv2d_weight_grad(&x, &gy, s, p, k))),
                ),
            ]
        };
        for (pass, theirs, ours) in &passes {
            let tc = time(theirs.as_ref())?;
            let to = time(ours.as_ref())?;
            out.line(format!(
                "{name} {pass}, batch {batch} ({gflop:.2} GFLOP): candle {tc:.2} ms, ours \
                 {to:.2} ms ({:.1}x, {:.0} GFLOP/s)",
                tc / to,
                gflop / to * 1e3
            ));
        }
    }
    // DCGAN-28 without norms: G = convT(128->64, 7->14), lrelu, convT(64->1, 14->28),
    // tanh; D = conv(1->64, 28->14), lrelu, conv(64->128, 14->7), lrelu, sum.
    let h0 = Var::from_tensor(&randn(&mut rng, &[batch, 128, 7, 7], 0.0, 1.0)?)?;
    let real = randn(&mut rng, &[batch, 1, 28, 28], 0.0, 1.0)?;
    let mk = |rng: &mut Rng, d: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(&(randn(rng, d, 0.0, 1.0)? * 0.05)?)?)
    };
    let (g1, g2) = (
        mk(&mut rng, &[128, 64, 4, 4])?,
        mk(&mut rng, &[64, 1, 4, 4])?,
    );
    let (d1, d2) = (
        mk(&mut rng, &[64, 1, 4, 4])?,
        mk(&mut rng, &[128, 64, 4, 4])?,
    );
    let lrelu = |t: Tensor| -> Result<Tensor> { Ok(t.maximum(&(&t * 0.2)?)?) };
    let disc = |x: &Tensor, ours: bool| -> Result<Tensor> {
        let h = if ours {
            conv2d(x, d1.as_tensor(), 2, 1, None)?
        } else {
            x.conv2d(d1.as_tensor(), 1, 2, 1, 1)?
        };
        let h = lrelu(h)?;
        let h = if ours {
            conv2d(&h, d2.as_tensor(), 2, 1, None)?
        } else {
            h.conv2d(d2.as_tensor(), 1, 2, 1, 1)?
        };
        Ok(lrelu(h)?.sum_all()?)
    };
    let gen_step = |ours: bool| -> Result<()> {
        let h = if ours {
            conv_transpose2d(h0.as_tensor(), g1.as_tensor(), 2, 1, None)?
        } else {
            h0.as_tensor()
                .conv_transpose2d(g1.as_tensor(), 1, 0, 2, 1)?
        };
        let h = lrelu(h)?;
        let img = if ours {
            conv_transpose2d(&h, g2.as_tensor(), 2, 1, None)?
        } else {
            h.conv_transpose2d(g2.as_tensor(), 1, 0, 2, 1)?
        };
        drop(disc(&img.tanh()?, ours)?.backward()?);
        Ok(())
    };
    let d_real_step = |ours: bool| -> Result<()> {
        drop(disc(&real, ours)?.backward()?);
        Ok(())
    };
    for (name, step) in [
        (
            "G forward+backward through D (all tracked)",
            &gen_step as &dyn Fn(bool) -> Result<()>,
        ),
        (
            "D forward+backward on real images",
            &d_real_step as &dyn Fn(bool) -> Result<()>,
        ),
    ] {
        let tc = time(&|| step(false))?;
        let to = time(&|| step(true))?;
        out.line(format!(
            "DCGAN-28 {name}, batch {batch}: candle {tc:.1} ms, ours {to:.1} ms ({:.1}x)",
            tc / to
        ));
    }
    Ok(())
}

/// Random inputs of one convolution layer's three passes.
struct LayerInputs {
    x: Tensor,
    w: Tensor,
    /// A gradient of the forward's output.
    gy: Tensor,
    /// The forward's work: 2 x column-side elements x image channels x k^2, in GFLOP.
    gflop: f64,
    /// The output padding of a conv2d's input gradient (the transposed convolution).
    op: usize,
}

/// x (`xd`) and w (`wd`) of N(0, 1) entries, the forward run once for its shape, then gy.
fn layer_inputs(
    rng: &mut Rng,
    transposed: bool,
    xd: [usize; 4],
    wd: [usize; 4],
    s: usize,
    p: usize,
) -> Result<LayerInputs> {
    let x = randn(rng, &xd, 0.0, 1.0)?;
    let w = randn(rng, &wd, 0.0, 1.0)?;
    let k = wd[2];
    let y = if transposed {
        conv_transpose2d(&x, &w, s, p, None)?
    } else {
        conv2d(&x, &w, s, p, None)?
    };
    let gy = randn(rng, y.dims(), 0.0, 1.0)?;
    let (cols, img_c) = if transposed {
        (x.elem_count(), wd[1])
    } else {
        (y.elem_count(), xd[1])
    };
    let gflop = 2.0 * (cols * img_c * k * k) as f64 / 1e9;
    let op = output_padding(y.dims()[2].max(xd[2]), y.dims()[2].min(xd[2]), k, s, p)?;
    Ok(LayerInputs {
        x,
        w,
        gy,
        gflop,
        op,
    })
}

/// One pass of a layer of [`conv_layers`]: its name and the engine's call.
type OurPass<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>);

/// One convolution layer of a benchmark model: (name, transposed, x dims without the batch,
/// w dims, stride, padding).
type LayerSpec = (&'static str, bool, [usize; 3], [usize; 4], usize, usize);

/// The convolutions of `dcgan64` (and `wgangp-critic64`'s critic, the same D without
/// BatchNorm) and `cdcgan28`, as `bench/torch_bench.py --model conv-layers` lists them.
#[rustfmt::skip]
pub const CONV_LAYERS: [(&str, &[LayerSpec]); 2] = [
    (
        "dcgan64",
        &[
            ("G convT 100->512 1->4", true, [100, 1, 1], [100, 512, 4, 4], 1, 0),
            ("G convT 512->256 4->8", true, [512, 4, 4], [512, 256, 4, 4], 2, 1),
            ("G convT 256->128 8->16", true, [256, 8, 8], [256, 128, 4, 4], 2, 1),
            ("G convT 128->64 16->32", true, [128, 16, 16], [128, 64, 4, 4], 2, 1),
            ("G convT 64->3 32->64", true, [64, 32, 32], [64, 3, 4, 4], 2, 1),
            ("D conv 3->64 64->32", false, [3, 64, 64], [64, 3, 4, 4], 2, 1),
            ("D conv 64->128 32->16", false, [64, 32, 32], [128, 64, 4, 4], 2, 1),
            ("D conv 128->256 16->8", false, [128, 16, 16], [256, 128, 4, 4], 2, 1),
            ("D conv 256->512 8->4", false, [256, 8, 8], [512, 256, 4, 4], 2, 1),
            ("D conv 512->1 4->1", false, [512, 4, 4], [1, 512, 4, 4], 1, 0),
        ],
    ),
    (
        "cdcgan28",
        &[
            ("G convT 100->256 1->7 k7", true, [100, 1, 1], [100, 256, 7, 7], 1, 0),
            ("G convT 128->64 7->14", true, [128, 7, 7], [128, 64, 4, 4], 2, 1),
            ("G convT 64->1 14->28", true, [64, 14, 14], [64, 1, 4, 4], 2, 1),
            ("D conv 1->64 28->14", false, [1, 28, 28], [64, 1, 4, 4], 2, 1),
            ("D conv 64->128 14->7", false, [64, 14, 14], [128, 64, 4, 4], 2, 1),
        ],
    ),
];

/// `ganscope bench --model conv-layers`: every pass (forward, input gradient, weight
/// gradient) of every convolution of the benchmark models at `batch`, the engine's kernels
/// alone, median of `iters` runs after `warmup`; one line per pass,
/// `layer <model> <name> <pass> ms=<median> gflops=<rate>`, the same lines
/// `bench/torch_bench.py --model conv-layers` prints for PyTorch's convolutions. The MAC count
/// of every pass is the forward's (column-side elements x image channels x k^2).
pub fn conv_layers(batch: usize, iters: usize, warmup: usize) -> Result<Vec<String>> {
    let opts = KernelBenchOptions {
        iters: Some(iters),
        warmup: Some(warmup),
        ..KernelBenchOptions::default()
    };
    let timer = Timer { opts: &opts };
    let mut out = Out(Vec::new());
    let mut rng = Rng::new(7);
    for (model, layers) in CONV_LAYERS {
        for &(name, transposed, xd, wd, s, p) in layers {
            let xd = [batch, xd[0], xd[1], xd[2]];
            let LayerInputs {
                x,
                w,
                gy,
                gflop,
                op,
            } = layer_inputs(&mut rng, transposed, xd, wd, s, p)?;
            let k = wd[2];
            let passes: [OurPass; 3] = if transposed {
                [
                    (
                        "forward",
                        Box::new(|| done(conv_transpose2d(&x, &w, s, p, None))),
                    ),
                    ("grad-input", Box::new(|| done(conv2d(&gy, &w, s, p, None)))),
                    (
                        "grad-weight",
                        Box::new(|| done(conv2d_weight_grad(&gy, &x, s, p, k))),
                    ),
                ]
            } else {
                [
                    ("forward", Box::new(|| done(conv2d(&x, &w, s, p, None)))),
                    (
                        "grad-input",
                        Box::new(|| done(conv_transpose2d_op(&gy, &w, s, p, (op, op), None))),
                    ),
                    (
                        "grad-weight",
                        Box::new(|| done(conv2d_weight_grad(&x, &gy, s, p, k))),
                    ),
                ]
            };
            for (pass, f) in &passes {
                let t = timer.median(warmup, iters, f.as_ref())?;
                out.line(format!(
                    "layer {model} {} {pass} ms={t:.3} gflops={:.1}",
                    name.replace(' ', "_"),
                    gflop / t * 1e3
                ));
            }
        }
    }
    Ok(out.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case runs at tiny sizes, once, and prints its line. Not a timing test.
    #[test]
    fn every_case_runs_quick() {
        crate::grad::check_exact_second_order().unwrap();
        let lines = run(&KernelBenchOptions {
            quick: true,
            ..KernelBenchOptions::default()
        })
        .unwrap();
        // Header, 2 linear, 5 BN + activation, 2 BN, 4 im2col, matmul, 5 layers x 3 passes,
        // 2 DCGAN-28 steps.
        assert_eq!(lines.len(), 1 + 2 + 5 + 2 + 4 + 1 + 15 + 2, "{lines:#?}");
        assert!(lines[1..].iter().all(|l| l.contains(" ms")), "{lines:#?}");
    }

    /// Every layer of the conv-layers bench runs its three passes at batch 1 and prints one
    /// parseable line each. Not a timing test.
    #[test]
    fn conv_layers_cover_every_pass() {
        let lines = conv_layers(1, 1, 0).unwrap();
        let n: usize = CONV_LAYERS.iter().map(|(_, l)| l.len()).sum();
        assert_eq!(lines.len(), 3 * n, "{lines:#?}");
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!((f.len(), f[0]), (6, "layer"), "{l}");
            assert!(
                f[4].strip_prefix("ms=").unwrap().parse::<f64>().unwrap() > 0.0,
                "{l}"
            );
        }
    }
}
