use candle_core::Var;

use super::*;
use crate::rng::Rng;

fn randn(rng: &mut Rng, dims: &[usize], dtype: DType, scale: f64) -> Var {
    let n = dims.iter().product();
    let t = Tensor::from_vec(rng.normal_vec(n), dims, &Device::Cpu)
        .unwrap()
        .affine(scale, 0.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-30);
    let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
    d.to_scalar::<f64>().unwrap() / scale
}

/// Random shapes, both samples-in-parallel (B >= threads) and one-sample batches.
const SHAPES: [(usize, usize, usize, usize); 4] =
    [(1, 1, 3, 5), (3, 2, 4, 16), (4, 8, 32, 64), (1, 4, 16, 100)];

#[test]
fn forward_and_gradients_match_candle_ops() {
    let mut rng = Rng::new(7);
    for &(b, ck, cv, n) in &SHAPES {
        let q = randn(&mut rng, &[b, ck, n], DType::F32, 1.0);
        let k = randn(&mut rng, &[b, ck, n], DType::F32, 1.0);
        let v = randn(&mut rng, &[b, cv, n], DType::F32, 1.0);
        let r = randn(&mut rng, &[b, cv, n], DType::F32, 1.0);
        let mode = GradMode::new();
        let ours = attention(&q, &k, &v, Some(&mode)).unwrap();
        let theirs = attention_basic(&q, &k, &v).unwrap();
        let e = max_rel_err(&ours, &theirs);
        assert!(e < 1e-5, "forward {b}x{ck}x{cv}x{n}: {e}");
        // Both backward modes of the fused op (one graph, differentiated inside a
        // first-order backward of its mode, then outside it) against candle's own backward.
        let reference = (theirs * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let loss = (ours * r.as_tensor()).unwrap().sum_all().unwrap();
        let fused = crate::grad::first_order_backward(&loss, &mode).unwrap();
        assert!(!mode.first_order(), "restored");
        let graph = loss.backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            // The mode decides: plain values inside its first-order backward, a graph
            // outside it.
            assert!(!fused.get(x).unwrap().track_op(), "d{name} fused");
            assert!(graph.get(x).unwrap().track_op(), "d{name} graph");
            let want = reference.get(x).unwrap();
            for (mode, g) in [("fused", &fused), ("graph", &graph)] {
                let e = max_rel_err(g.get(x).unwrap(), want);
                assert!(e < 1e-5, "d{name} ({mode}) {b}x{ck}x{cv}x{n}: {e}");
            }
        }
    }
}

/// Gradient of a gradient penalty through attention equals candle's (second order).
#[test]
fn second_order_gradients_match_candle_ops() {
    crate::grad::check_exact_second_order().unwrap();
    let mut rng = Rng::new(11);
    let (b, c, n) = (2, 4, 12);
    let x = randn(&mut rng, &[b, c, n], DType::F64, 1.0);
    let wq = randn(&mut rng, &[c, c], DType::F64, 0.5);
    let wk = randn(&mut rng, &[c, c], DType::F64, 0.5);
    let r = randn(&mut rng, &[b, c, n], DType::F64, 1.0);
    // penalty = |d sum(r * attention(Wq x, Wk x, x)) / dx|^2, then d penalty / d(Wq, Wk)
    let penalty = |fused: bool| {
        let xv = Var::from_tensor(&x.as_tensor().detach()).unwrap();
        let xt = xv.as_tensor();
        let q = wq.as_tensor().broadcast_matmul(xt).unwrap();
        let k = wk.as_tensor().broadcast_matmul(xt).unwrap();
        let o = if fused {
            attention(&q, &k, xt, None).unwrap()
        } else {
            attention_basic(&q, &k, xt).unwrap()
        };
        let gx = (o * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = gx.get(xt).unwrap().clone();
        let p = gx.sqr().unwrap().sum_all().unwrap();
        let grads = p.backward().unwrap();
        (
            grads.get(&wq).unwrap().clone(),
            grads.get(&wk).unwrap().clone(),
        )
    };
    let (fq, fk) = penalty(true);
    let (bq, bk) = penalty(false);
    assert!(max_rel_err(&fq, &bq) < 1e-10, "{}", max_rel_err(&fq, &bq));
    assert!(max_rel_err(&fk, &bk) < 1e-10, "{}", max_rel_err(&fk, &bk));
    // And the penalty's gradient is not zero (the check can fail).
    assert!(
        bq.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 1e-6
    );
}

/// No channels or no positions: empty results, no panic, in both directions.
#[test]
fn empty_shapes() {
    for (ck, cv, n) in [(0, 0, 5), (2, 3, 0), (0, 2, 4)] {
        let z = |c: usize| {
            Var::from_tensor(&Tensor::ones((2, c, n), DType::F32, &Device::Cpu).unwrap()).unwrap()
        };
        let (q, k, v) = (z(ck), z(ck), z(cv));
        let mode = GradMode::new();
        let o = attention(&q, &k, &v, Some(&mode)).unwrap();
        assert_eq!(o.dims(), [2, cv, n]);
        let loss = o.sum_all().unwrap();
        let grads = crate::grad::first_order_backward(&loss, &mode).unwrap();
        assert_eq!(grads.get(&v).unwrap().dims(), [2, cv, n]);
        // Zero logits: uniform attention, so o = the mean of v over positions (v = 1).
        if cv > 0 && n > 0 {
            let want = Tensor::ones((2, cv, n), DType::F32, &Device::Cpu).unwrap();
            assert!(max_rel_err(&o, &want) < 1e-6);
        }
    }
}

#[test]
fn mismatched_shapes_are_an_error() {
    let z = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    let err = attention(&z(&[2, 3, 8]), &z(&[2, 3, 7]), &z(&[2, 5, 8]), None).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}
