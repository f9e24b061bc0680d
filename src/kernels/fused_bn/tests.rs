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
                // whose results come back as plain values (no graph); outside it,
                // differentiable candle ops.
                for t in [&y, &ga, &be] {
                    assert!(!first.get(t.as_tensor()).unwrap().track_op());
                }
                // dy = r gamma depends on the variable gamma.
                assert!(graph.get(y.as_tensor()).unwrap().track_op());
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

type Bn = fn(&Tensor, Option<&Tensor>, Option<&Tensor>, f64) -> Result<(Tensor, Tensor, Tensor)>;
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
                        batch_norm_train_act(xt, Some(gt), Some(bt), EPS, Some(act), None).unwrap()
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
            batch_norm_train_act(x, g, b, eps, Some(act), None)
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
