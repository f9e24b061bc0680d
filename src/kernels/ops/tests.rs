use super::*;

use crate::rng::Rng;
use candle_core::{Device, Var};

fn random(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(n), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn random_shape(rng: &mut Rng) -> Vec<usize> {
    (0..1 + rng.below(4)).map(|_| 1 + rng.below(9)).collect()
}

/// max |a - b| / max(|b|, 1e-30) over all entries (0 when both are all zero).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let s = b.abs().unwrap().max(0).unwrap();
    let (d, s) = (d.to_scalar::<f64>().unwrap(), s.to_scalar::<f64>().unwrap());
    if d == 0.0 { 0.0 } else { d / s.max(1e-30) }
}

fn candle_relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

type Unary = fn(&Tensor) -> Result<Tensor>;

/// [`linear`] against candle's `matmul(w.t())` + `broadcast_add` (f32 and f64, with and
/// without a bias): values and gradients of x, w and b, and the w and b gradients of a
/// penalty on the x gradient (the double-backward path), to 1e-5 (f32) / 1e-12 (f64)
/// relative to the largest reference entry. Wrong shapes are an error.
#[test]
fn linear_op_matches_candle_ops() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = crate::rng::Rng::new(43);
    for dtype in [DType::F32, DType::F64] {
        for (n, cin, cout, bias) in [(5, 7, 3, true), (4, 6, 9, false), (1, 3, 1, true)] {
            let t = |v: Vec<f64>, d: &[usize]| {
                Tensor::from_vec(v, d, &candle_core::Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x0 = t(rng.normal_vec(n * cin), &[n, cin]);
            let w0 = t(rng.normal_vec(cout * cin), &[cout, cin]);
            let b0 = t(rng.normal_vec(cout), &[cout]);
            let r = t(rng.normal_vec(n * cout), &[n, cout]);
            let run = |fused: bool| {
                let (x, w, b) = (
                    Var::from_tensor(&x0).unwrap(),
                    Var::from_tensor(&w0).unwrap(),
                    Var::from_tensor(&b0).unwrap(),
                );
                let bt = bias.then(|| b.as_tensor().clone());
                let y = if fused {
                    linear(x.as_tensor(), w.as_tensor(), bt.as_ref(), None).unwrap()
                } else {
                    let y = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                    match &bt {
                        Some(b) => y.broadcast_add(b).unwrap(),
                        None => y,
                    }
                };
                // y^2 weighting: the x gradient depends on w and b, so the penalty does.
                let loss = (&y.sqr().unwrap() * &r).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let gx = g.get(x.as_tensor()).unwrap().clone();
                let gw = g.get(w.as_tensor()).unwrap().clone();
                let pen = gx.sqr().unwrap().sum_all().unwrap();
                let gp = pen.backward().unwrap();
                let mut out = vec![y, gx, gw, gp.get(w.as_tensor()).unwrap().clone()];
                if bias {
                    out.push(g.get(b.as_tensor()).unwrap().clone());
                    out.push(gp.get(b.as_tensor()).unwrap().clone());
                }
                out.into_iter()
                    .map(|t| {
                        t.to_dtype(DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            };
            let (a, e) = (run(true), run(false));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let what = ["y", "dx", "dw", "penalty dw", "db", "penalty db"];
            assert_eq!(a.len(), e.len());
            for (i, (p, q)) in a.iter().zip(&e).enumerate() {
                let scale = q.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(scale > 0.0, "{}: zero reference", what[i]);
                assert_eq!(p.len(), q.len());
                for (u, v) in p.iter().zip(q) {
                    assert!(
                        (u - v).abs() <= tol * scale,
                        "{dtype:?} {:?} {}: {u} vs {v}",
                        (n, cin, cout, bias),
                        what[i]
                    );
                }
            }
        }
    }
    let dev = &candle_core::Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F32, dev).unwrap();
    let w = Tensor::zeros((4, 5), DType::F32, dev).unwrap();
    assert!(linear(&x, &w, None, None).is_err());
    let w = Tensor::zeros((4, 3), DType::F32, dev).unwrap();
    let b = Tensor::zeros(3, DType::F32, dev).unwrap();
    assert!(linear(&x, &w, Some(&b), None).is_err());
    assert_eq!(linear(&x, &w, None, None).unwrap().dims(), [2, 4]);
}

/// The fused channel bias against candle's broadcast_add, f32 and f64: the same values
/// and input gradient bit for bit, the bias gradient to rounding (summed in f64 here), and
/// the bias gradient of an input-gradient penalty through it (second order) to rounding.
#[test]
fn channel_bias_matches_broadcast_add() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = crate::rng::Rng::new(41);
    for dtype in [DType::F32, DType::F64] {
        for dims in [vec![3, 4, 5, 6], vec![2, 3, 1, 1], vec![4, 2, 7]] {
            let c = dims[1];
            let n: usize = dims.iter().product();
            let t = |v: Vec<f64>, d: &[usize]| {
                Tensor::from_vec(v, d, &candle_core::Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x0 = t(rng.normal_vec(n), &dims);
            let b0 = t(rng.normal_vec(c), &[c]);
            let r = t(rng.normal_vec(n), &dims);
            let run = |fused: bool| {
                let (x, b) = (
                    Var::from_tensor(&x0).unwrap(),
                    Var::from_tensor(&b0).unwrap(),
                );
                let mut bs = vec![1; dims.len()];
                bs[1] = c;
                // A nonlinearity between x and the bias makes the penalty depend on b.
                let h = (x.as_tensor() * x.as_tensor()).unwrap();
                let y = if fused {
                    add_channel_bias(&h, b.as_tensor()).unwrap()
                } else {
                    h.broadcast_add(&b.as_tensor().reshape(bs).unwrap())
                        .unwrap()
                };
                let loss = (&y.sqr().unwrap() * &r).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let (gx, gb) = (g.get(x.as_tensor()).unwrap(), g.get(b.as_tensor()).unwrap());
                let pen = gx.sqr().unwrap().sum_all().unwrap();
                let gp = pen.backward().unwrap();
                let gpb = gp.get(b.as_tensor()).unwrap().clone();
                [y, gx.clone(), gb.clone(), gpb].map(|t| {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                })
            };
            let (a, e) = (run(true), run(false));
            assert_eq!(a[0], e[0], "{dtype:?} {dims:?}: values");
            assert_eq!(a[1], e[1], "{dtype:?} {dims:?}: x gradient");
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for (i, what) in [(2, "bias gradient"), (3, "penalty's bias gradient")] {
                let scale = e[i].iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(scale > 0.0, "{what}: zero reference");
                for (p, q) in a[i].iter().zip(&e[i]) {
                    assert!(
                        (p - q).abs() <= tol * scale,
                        "{dtype:?} {dims:?} {what}: {p} vs {q}"
                    );
                }
            }
        }
    }
    // A bias of the wrong size is an error, not a panic.
    let y = Tensor::zeros((2, 3, 4, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(add_channel_bias(&y, &b).is_err());
}

/// Under a gradient penalty the activation's backward keeps no link to its input, so
/// the second-order backward does not walk the critic's forward pass on the interpolates
/// (where only zeros would flow), and the penalty still reaches every weight.
#[test]
fn penalty_backward_skips_the_inner_forward_pass() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(31);
    let x = random(&mut rng, &[2, 3, 8, 8]);
    let w1 = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3])).unwrap();
    let w2 = Var::from_tensor(&random(&mut rng, &[1, 4, 3, 3])).unwrap();
    for act in [LeakyRelu::LEAKY, LeakyRelu::RELU] {
        let inner = std::cell::RefCell::new(None);
        let mode = crate::grad::GradMode::new();
        let (g, _) = crate::grad::input_gradient(&x, &mode, |x| {
            let h = super::super::conv::conv2d(x, w1.as_tensor(), 1, 1, Some(&mode))?;
            *inner.borrow_mut() = Some(h.clone());
            let h = act.apply(&h)?;
            let y = super::super::conv::conv2d(&h, w2.as_tensor(), 1, 1, Some(&mode))?;
            Ok(y.flatten_from(1)?.sum(1)?)
        })
        .unwrap();
        let p = crate::grad::per_sample_sq_norm(&g)
            .unwrap()
            .sum_all()
            .unwrap();
        let h = inner.take().unwrap();
        assert!(
            p.sorted_nodes().iter().all(|t| t.id() != h.id()),
            "slope {}: the penalty's graph walks the inner forward pass",
            act.slope()
        );
        let grads = p.backward().unwrap();
        for w in [&w1, &w2] {
            let n = grads
                .get(w.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "slope {}: no penalty gradient", act.slope());
        }
    }
}

/// The fused leaky ReLU against max(x, 0.2 x), and the fused ReLU against candle's `relu`,
/// on random shapes, f32: values, gradients and gradients of gradients (what a gradient
/// penalty takes) agree to 1e-5 relative.
#[test]
fn fused_leaky_relu_matches_candle_ops() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(11);
    let pairs: [(Unary, Unary); 2] = [(leaky_relu, leaky_relu_basic), (relu, candle_relu)];
    for (fused_op, basic_op) in pairs {
        for _ in 0..20 {
            let shape = random_shape(&mut rng);
            let mut x0 = random(&mut rng, &shape);
            if shape.iter().product::<usize>() > 2 {
                // Exact zeros (the tie of max) and a non-contiguous view as well.
                let z = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
                x0 = Tensor::cat(
                    &[
                        &z,
                        &x0.flatten_all()
                            .unwrap()
                            .narrow(0, 1, x0.elem_count() - 1)
                            .unwrap(),
                    ],
                    0,
                )
                .unwrap()
                .reshape(shape.as_slice())
                .unwrap();
            }
            let r0 = random(&mut rng, &shape);
            let s0 = random(&mut rng, &shape);
            let mut outs = Vec::new();
            for fused in [true, false] {
                let x = Var::from_tensor(&x0).unwrap();
                let r = Var::from_tensor(&r0).unwrap();
                let f = |t: &Tensor| {
                    if fused {
                        fused_op(t).unwrap()
                    } else {
                        basic_op(t).unwrap()
                    }
                };
                let y = f(x.as_tensor());
                // First order: g = d sum(y r) / dx = r slope(x).
                let grads = (&y * r.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gx = grads.get(x.as_tensor()).unwrap().clone();
                // Second order through g (as a penalty does): d sum(g^2 s) / d(r, x).
                let h = (gx.sqr().unwrap() * &s0).unwrap().sum_all().unwrap();
                let g2 = h.backward().unwrap();
                let gr2 = g2.get(r.as_tensor()).unwrap().clone();
                let gx2 = g2
                    .get(x.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| x0.zeros_like().unwrap());
                // A transposed (non-contiguous) input gives the same values.
                let yt = if shape.len() >= 2 {
                    Some(f(&x0.t().unwrap()))
                } else {
                    None
                };
                outs.push((y, gx, gr2, gx2, yt));
            }
            let (a, b) = (&outs[0], &outs[1]);
            assert!(rel_err(&a.0, &b.0) < 1e-5, "values {shape:?}");
            assert!(rel_err(&a.1, &b.1) < 1e-5, "gradients {shape:?}");
            assert!(rel_err(&a.2, &b.2) < 1e-5, "second order (r) {shape:?}");
            assert!(rel_err(&a.3, &b.3) < 1e-5, "second order (x) {shape:?}");
            if let (Some(p), Some(q)) = (&a.4, &b.4) {
                assert!(rel_err(p, q) < 1e-5, "transposed {shape:?}");
            }
        }
    }
}

/// The fused 2x upsampling and 2x2 average pooling against their reshape/broadcast/mean
/// forms on random shapes, f32: values, gradients and gradients of gradients agree to 1e-5
/// relative; odd sizes for pooling are an error.
#[test]
fn fused_resampling_matches_candle_ops() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(5);
    let pairs: [(Unary, Unary); 2] = [(upsample2, upsample2_basic), (avg_pool2, avg_pool2_basic)];
    for (fused_op, basic_op) in pairs {
        for _ in 0..10 {
            let shape = [
                1 + rng.below(3),
                1 + rng.below(4),
                2 * (1 + rng.below(6)),
                2 * (1 + rng.below(6)),
            ];
            let x0 = random(&mut rng, &shape);
            let y_shape = basic_op(&x0).unwrap().dims().to_vec();
            let r0 = random(&mut rng, &y_shape);
            let s0 = random(&mut rng, &shape);
            let mut outs = Vec::new();
            for op in [fused_op, basic_op] {
                let x = Var::from_tensor(&x0).unwrap();
                let r = Var::from_tensor(&r0).unwrap();
                let y = op(x.as_tensor()).unwrap();
                let loss = (&y * r.as_tensor()).unwrap().sum_all().unwrap();
                let gx = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
                // d sum(gx^2 s) / dr: through the backward op.
                let h = (gx.sqr().unwrap() * &s0).unwrap().sum_all().unwrap();
                let gr = h.backward().unwrap().get(r.as_tensor()).unwrap().clone();
                // A transposed (non-contiguous) input gives the same values.
                let yt = op(&x0.transpose(2, 3).unwrap()).unwrap();
                outs.push((y, gx, gr, yt));
            }
            let (a, b) = (&outs[0], &outs[1]);
            assert!(rel_err(&a.0, &b.0) < 1e-5, "values {shape:?}");
            assert!(rel_err(&a.1, &b.1) < 1e-5, "gradients {shape:?}");
            assert!(rel_err(&a.2, &b.2) < 1e-5, "second order {shape:?}");
            assert!(rel_err(&a.3, &b.3) < 1e-5, "transposed {shape:?}");
        }
    }
    let odd = Tensor::zeros((1, 2, 5, 4), DType::F32, &Device::Cpu).unwrap();
    let err = avg_pool2(&odd).unwrap_err().to_string();
    assert!(err.contains("even"), "{err}");
}

/// The fused softmax against candle's on random shapes, f32: values, gradients and
/// gradients of gradients agree to 1e-5 relative.
#[test]
fn fused_softmax_matches_candle_ops() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(12);
    for _ in 0..20 {
        let shape = random_shape(&mut rng);
        let x0 = random(&mut rng, &shape).affine(3.0, 0.0).unwrap();
        let r0 = random(&mut rng, &shape);
        let s0 = random(&mut rng, &shape);
        let mut outs = Vec::new();
        for fused in [true, false] {
            let x = Var::from_tensor(&x0).unwrap();
            let r = Var::from_tensor(&r0).unwrap();
            let y = if fused {
                softmax_last(x.as_tensor()).unwrap()
            } else {
                softmax_last_basic(x.as_tensor()).unwrap()
            };
            let grads = (&y * r.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = grads.get(x.as_tensor()).unwrap().clone();
            let h = (gx.sqr().unwrap() * &s0).unwrap().sum_all().unwrap();
            let g2 = h.backward().unwrap();
            let gr2 = g2.get(r.as_tensor()).unwrap().clone();
            let gx2 = g2.get(x.as_tensor()).unwrap().clone();
            outs.push((y, gx, gr2, gx2));
        }
        let (a, b) = (&outs[0], &outs[1]);
        assert!(rel_err(&a.0, &b.0) < 1e-5, "values {shape:?}");
        assert!(rel_err(&a.1, &b.1) < 1e-5, "gradients {shape:?}");
        assert!(rel_err(&a.2, &b.2) < 1e-5, "second order (r) {shape:?}");
        assert!(rel_err(&a.3, &b.3) < 1e-5, "second order (x) {shape:?}");
    }
}
