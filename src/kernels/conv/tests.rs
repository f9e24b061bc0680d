use std::cell::Cell;

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
    (2, 1, 8, 8, 20, 2, 2, 0),  // more output channels than im2col rows (dw not transposed)
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
    (2, 20, 4, 4, 1, 2, 2, 0),  // 4 -> 8, more input channels than im2col rows
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
        let per_sample =
            wdims[1] * k * k * conv_out(h, k, s, p).unwrap() * conv_out(wd, k, s, p).unwrap() * 4;
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
        let op = Conv2dOp::keeping(2, 1, &x, w, None);
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
/// products summed ([`splits_sum`]), as the tall product (at most 128 output channels) or
/// not; against candle's, whole and in batch chunks whose last one is shorter.
#[test]
fn split_sum_weight_gradients_match_candle() {
    let mut rng = Rng::new(11);
    // O C K K = 16 * 3 * 4 * 4 = 768 weights; n = 8 * 16 * 16 = 2048 positions whole
    // (conv2d of 8 x 32 x 32, or conv_transpose2d from 8 x 16 x 16: the same product on
    // its column side); chunked, 11 images of 64 x 64 in chunks of 6 and 5 (n = 6144, 5120);
    // 144 output channels (past TALL_WEIGHT_GRAD_MAX_CHANNELS): dw += gy @ cols^T halves.
    assert!(splits_sum(768, 2048) && splits_sum(768, 6 * 1024) && splits_sum(144 * 48, 2048));
    const { assert!(144 > TALL_WEIGHT_GRAD_MAX_CHANNELS) };
    for dtype in [DType::F32, DType::F64] {
        let chunk_budget = 8 * 48 * 1024 * dtype.size_in_bytes();
        for (transposed, budget, o) in [
            (false, None, 16),
            (true, None, 16),
            (false, Some(chunk_budget), 16),
            (false, None, 144),
        ] {
            let (xd, wd) = match (transposed, budget) {
                (true, _) => ([8, 16, 16, 16], [16, 3, 4, 4]),
                (false, None) => ([8, 3, 32, 32], [o, 3, 4, 4]),
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
                "{dtype:?} transposed {transposed} budget {budget:?} O {o}: {e:e}"
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
                    let (gx, gw) = (g.get(x.as_tensor()).unwrap(), g.get(w.as_tensor()).unwrap());
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

/// Runs `f` with the custom ops' forwards on [`conv_gemm`] (the GPU path) in this thread;
/// returns its result and how many forwards took that path.
fn on_gemm_path<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = conv_gemm::GEMM_FORWARDS.with(|c| c.get());
    GEMM_ON_CPU.with(|g| g.set(true));
    let r = f();
    GEMM_ON_CPU.with(|g| g.set(false));
    (r, conv_gemm::GEMM_FORWARDS.with(|c| c.get()) - before)
}

/// The custom ops with their forwards on the GPU path (conv_gemm's composites inside the
/// same ops) give the CPU kernels' values and gradients of every order: both penalties above
/// (input-gradient and weight-gradient), differentiated with respect to weights and input,
/// through conv2d, conv_transpose2d with an output padding and the weight-gradient op's own
/// backward.
#[test]
fn gemm_forwards_give_the_cpu_kernels_gradients_of_every_order() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(9);
    for net in &NETS {
        let (x, w1, w2, r) = setup(net, &mut rng);
        let penalties = |gemm: bool| -> Vec<Tensor> {
            let run = || {
                let out = net_out(net, x.as_tensor(), [&w1, &w2], &r, true);
                let g = out.backward().unwrap();
                let sq = |v: &Var| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                let pen = ((sq(&w1) + sq(&w2)).unwrap() + sq(&x)).unwrap();
                let gg = pen.backward().unwrap();
                let mut v = vec![out, pen];
                v.extend([&w1, &w2, &x].map(|t| gg.get(t.as_tensor()).unwrap().clone()));
                v
            };
            if gemm {
                let (v, n) = on_gemm_path(run);
                assert!(n >= 6, "{net:?}: only {n} forwards on the gemm path");
                v
            } else {
                run()
            }
        };
        let (a, b) = (penalties(true), penalties(false));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let e = rel(a, b);
            assert!(e < 1e-11, "{net:?} result {i}: {e:e}");
        }
    }
}

/// On the gemm path a conv2d with an activation runs the activation as its own op (the fused
/// op records the pre-activation's sides on the CPU only), with the same result.
#[test]
fn activation_conv_on_the_gemm_path_matches_the_fused_op() {
    let mut rng = Rng::new(10);
    let x = randn(&mut rng, &[2, 3, 8, 8], DType::F64);
    let w = Var::from_tensor(&randn(&mut rng, &[4, 3, 4, 4], DType::F64)).unwrap();
    let act = LeakyRelu::LEAKY;
    let fused = conv2d_act(&x, &w, 2, 1, act, None).unwrap();
    let gf = fused.sum_all().unwrap().backward().unwrap();
    let ((plain, gp), n) = on_gemm_path(|| {
        let y = conv2d_act(&x, &w, 2, 1, act, None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (y, g)
    });
    assert!(n >= 2, "{n} forwards on the gemm path");
    assert!(rel(&plain, &fused) < 1e-12);
    assert!(rel(gp.get(&w).unwrap(), gf.get(&w).unwrap()) < 1e-12);
}

/// transpose_batch against an index-by-index transpose, for blocks that straddle samples
/// (cols not a multiple of the block) and for one matrix.
#[test]
fn transpose_batch_transposes_each_sample() {
    for (nb, rows, cols) in [(3, 5, 37), (1, 70, 33), (2, 1, 1), (4, 64, 32)] {
        let src: Vec<u32> = (0..(nb * rows * cols) as u32).collect();
        let mut dst = vec![u32::MAX; nb * rows * cols];
        transpose_batch(&src, nb, rows, cols, &mut dst);
        for b in 0..nb {
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        dst[b * rows * cols + j * rows + i],
                        src[b * rows * cols + i * cols + j],
                        "{:?}",
                        (nb, rows, cols, b, i, j)
                    );
                }
            }
        }
    }
}
