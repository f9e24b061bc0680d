//! Adam (Kingma & Ba, ICLR 2015) whose moment estimates are plain tensors that can be saved
//! and restored exactly (candle-nn's AdamW keeps them private).
//!
//! On the CPU (f32, f64, contiguous) a step updates the moments and the parameter in place
//! with three fused passes ([`MomentOp`], [`ApplyOp`]) instead of a dozen whole-tensor ops
//! with a fresh allocation each; the arithmetic is the same, operation for operation, as the
//! basic-op form ([`Adam::step_basic`], used elsewhere and as the tests' reference). The
//! moments own their storage (never shared with another tensor), which the in-place update
//! relies on.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var, WithDType, backprop::GradStore,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::cpu_slice;

#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// A learning rate of its own per variable (`None`: [`Adam::lr`]); see
    /// [`Adam::set_lr_of`].
    own_lr: Vec<Option<f64>>,
    /// Number of updates taken.
    pub t: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Adam {
    pub fn new(
        vars: Vec<(String, Var)>,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> Result<Self> {
        // Separate zero tensors for m and v: the fused step writes them in place.
        let zeros = || {
            vars.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let (m, v) = (zeros()?, zeros()?);
        let own_lr = vec![None; vars.len()];
        Ok(Self {
            vars,
            m,
            v,
            own_lr,
            t: 0,
            lr,
            beta1,
            beta2,
            eps,
        })
    }

    /// Give the variables whose names `pick` picks a learning rate of their own (`None`: back
    /// to [`Adam::lr`]), like a PyTorch parameter group; returns how many it picked.
    pub fn set_lr_of(&mut self, pick: &dyn Fn(&str) -> bool, lr: Option<f64>) -> usize {
        let mut n = 0;
        for ((name, _), own) in self.vars.iter().zip(&mut self.own_lr) {
            if pick(name) {
                *own = lr;
                n += 1;
            }
        }
        n
    }

    /// One update of every variable that has a gradient in `grads`
    /// (variables without one keep their value and moments, as in PyTorch).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_impl(grads, true)
    }

    /// [`Adam::step`] with basic candle ops only (the tests' reference).
    #[cfg(test)]
    fn step_basic(&mut self, grads: &GradStore) -> Result<()> {
        self.step_impl(grads, false)
    }

    fn step_impl(&mut self, grads: &GradStore, fused: bool) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor();
            let lr = self.own_lr[i].unwrap_or(self.lr);
            if fused && fused_ok(p, g, &self.m[i], &self.v[i]) {
                let g = g.detach();
                self.m[i].inplace_op2(
                    &g,
                    &MomentOp {
                        beta: b1,
                        sq: false,
                    },
                )?;
                self.v[i].inplace_op2(&g, &MomentOp { beta: b2, sq: true })?;
                p.inplace_op3(
                    &self.m[i],
                    &self.v[i],
                    &ApplyOp {
                        step: lr / bc1,
                        inv_bc2: 1.0 / bc2,
                        eps: self.eps,
                    },
                )?;
                continue;
            }
            // Gradients keep their graph when second-order gradients are enabled: cut it so
            // the moments do not chain every step's graph together.
            let g = g.detach();
            let m = ((self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?).detach();
            let v = ((self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?).detach();
            let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, self.eps)?;
            let update = m.affine(lr / bc1, 0.0)?.div(&denom)?;
            let new = var.as_tensor().detach().sub(&update)?;
            var.set(&new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments and step count under `prefix` (`opt_g.m.<param>`, `opt_g.v.<param>`, `opt_g.t`).
    pub fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        // Copies: the step writes the moments in place.
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{prefix}.m.{name}"), self.m[i].copy()?);
            out.insert(format!("{prefix}.v.{name}"), self.v[i].copy()?);
        }
        let dev = self
            .m
            .first()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert(format!("{prefix}.t"), Tensor::new(&[self.t as i64], &dev)?);
        Ok(out)
    }

    /// Restore what [`Adam::state`] wrote; `path` is only used in error messages.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<()> {
        let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
        for (name, var) in &self.vars {
            for k in ["m", "v"] {
                expected.push((format!("{prefix}.{k}.{name}"), var.dims().to_vec()));
            }
        }
        expected.push((format!("{prefix}.t"), vec![1]));
        let mine: HashMap<String, Tensor> = tensors
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{prefix}.")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::checkpoint::check_shapes(path, &expected, &mine)?;
        let dtype = self.m.first().map(|t| t.dtype()).unwrap_or(DType::F32);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let dev = var.device();
            // Own copies: the step writes the moments in place.
            self.m[i] = mine[&format!("{prefix}.m.{name}")]
                .to_device(dev)?
                .to_dtype(dtype)?
                .copy()?;
            self.v[i] = mine[&format!("{prefix}.v.{name}")]
                .to_device(dev)?
                .to_dtype(dtype)?
                .copy()?;
        }
        let t = mine[&format!("{prefix}.t")]
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        self.t = u64::try_from(t[0])
            .map_err(|_| Error::bad_file(path, format!("{prefix}.t is negative ({})", t[0])))?;
        Ok(())
    }
}

/// Whether the fused in-place step applies: CPU, f32 or f64, everything contiguous and of
/// one shape and dtype. (m and v own their storage by construction: [`Adam::new`] and
/// [`Adam::load_state`] make fresh tensors for them.)
fn fused_ok(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [p, g, m, v];
    all.iter().all(|t| {
        t.device().is_cpu() && t.dtype() == p.dtype() && t.dims() == p.dims() && t.is_contiguous()
    }) && matches!(p.dtype(), DType::F32 | DType::F64)
}

/// In place on a moment: mom = beta mom + (1 - beta) g, or with g^2 (`sq`), rounded as the
/// basic form `mom.affine(beta, 0) + g.affine(1 - beta, 0)` (resp. `g.sqr()` first).
struct MomentOp {
    beta: f64,
    sq: bool,
}

/// In place on the parameter: p -= (m * step) / (sqrt(v * inv_bc2) + eps), rounded as the
/// basic form.
struct ApplyOp {
    step: f64,
    inv_bc2: f64,
    eps: f64,
}

fn contiguous_slice_mut<'a, T: AdamFloat>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [T]> {
    let Some(v) = T::storage_mut(s) else {
        candle_core::bail!("{what}: unexpected dtype")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{what}: non-contiguous argument"),
    }
}

impl InplaceOp2 for MomentOp {
    fn name(&self) -> &'static str {
        "ganscope-adam-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: AdamFloat>(
            op: &MomentOp,
            dst: &mut CpuStorage,
            dl: &Layout,
            g: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            let name = InplaceOp2::name(op);
            let g = cpu_slice::<T>(g, gl, name)?;
            let m = contiguous_slice_mut::<T>(dst, dl, name)?;
            if m.len() != g.len() {
                candle_core::bail!("{name}: {} vs {} elements", m.len(), g.len());
            }
            let (b, c) = (T::from_f64(op.beta), T::from_f64(1.0 - op.beta));
            let zero = T::from_f64(0.0);
            let sq = op.sq;
            m.par_chunks_mut(PAR_CHUNK)
                .zip(g.par_chunks(PAR_CHUNK))
                .for_each(|(m, g)| {
                    if sq {
                        for (m, &g) in m.iter_mut().zip(g) {
                            *m = (*m * b + zero) + ((g * g) * c + zero);
                        }
                    } else {
                        for (m, &g) in m.iter_mut().zip(g) {
                            *m = (*m * b + zero) + (g * c + zero);
                        }
                    }
                });
            Ok(())
        }
        match dst.dtype() {
            DType::F32 => run::<f32>(self, dst, dst_l, g, gl),
            DType::F64 => run::<f64>(self, dst, dst_l, g, gl),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }
}

impl InplaceOp3 for ApplyOp {
    fn name(&self) -> &'static str {
        "ganscope-adam-apply"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: AdamFloat>(
            op: &ApplyOp,
            dst: &mut CpuStorage,
            dl: &Layout,
            m: (&CpuStorage, &Layout),
            v: (&CpuStorage, &Layout),
        ) -> candle_core::Result<()> {
            let name = InplaceOp3::name(op);
            let m = cpu_slice::<T>(m.0, m.1, name)?;
            let v = cpu_slice::<T>(v.0, v.1, name)?;
            let p = contiguous_slice_mut::<T>(dst, dl, name)?;
            if p.len() != m.len() || p.len() != v.len() {
                candle_core::bail!("{name}: mismatched lengths");
            }
            let zero = T::from_f64(0.0);
            let (step, ib, eps) = (
                T::from_f64(op.step),
                T::from_f64(op.inv_bc2),
                T::from_f64(op.eps),
            );
            let one = T::from_f64(1.0);
            p.par_chunks_mut(PAR_CHUNK)
                .zip(m.par_chunks(PAR_CHUNK).zip(v.par_chunks(PAR_CHUNK)))
                .for_each(|(p, (m, v))| {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let denom = (v * ib + zero).sqrt_() * one + eps;
                        *p -= (m * step + zero) / denom;
                    }
                });
            Ok(())
        }
        match dst.dtype() {
            DType::F32 => run::<f32>(self, dst, dst_l, (m, ml), (v, vl)),
            DType::F64 => run::<f64>(self, dst, dst_l, (m, ml), (v, vl)),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }
}

/// Elements per rayon task in the update passes: parameters below this size (biases,
/// BatchNorm scales, most of a small model) stay on the calling thread.
const PAR_CHUNK: usize = 1 << 15;

/// f32 and f64: sqrt and mutable access to CPU storage of that type.
trait AdamFloat: WithDType {
    fn sqrt_(self) -> Self;
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl AdamFloat for f32 {
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl AdamFloat for f64 {
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps by hand (PyTorch's torch.optim.Adam, same formulas): p0 = 1, g = 0.5 both
    /// steps, lr 0.1, betas (0.5, 0.999), eps 1e-8.
    /// t=1: m = 0.25, v = 0.00025; mhat = 0.5, vhat = 0.25 -> p = 1 - 0.1 * 0.5/0.5 = 0.9.
    /// t=2: m = 0.375, v = 0.00049975; mhat = 0.375/0.75 = 0.5; vhat = 0.00049975/0.001999 = 0.25
    ///      -> p = 0.9 - 0.1 = 0.8 (up to eps).
    #[test]
    fn matches_hand_computation() {
        let p = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![("p".into(), p.clone())], 0.1, 0.5, 0.999, 1e-8).unwrap();
        for expected in [0.9, 0.8] {
            let loss = p.as_tensor().affine(0.5, 0.0).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
            let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
            assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        }
        let st = opt.state("opt").unwrap();
        let mut fresh = Adam::new(vec![("p".into(), p.clone())], 0.1, 0.5, 0.999, 1e-8).unwrap();
        fresh.load_state("opt", &st, Path::new("x")).unwrap();
        assert_eq!(fresh.t, 2);
        assert_eq!(
            fresh.m[0].to_vec1::<f64>().unwrap(),
            opt.m[0].to_vec1::<f64>().unwrap()
        );
    }

    /// A variable with a learning rate of its own moves by that rate: Adam's first step is
    /// lr * g / (|g| + eps), so p -= lr * sign(g) to within eps / |g|. Both step forms.
    #[test]
    fn a_variable_with_its_own_rate_steps_by_it() {
        for fused in [true, false] {
            let vars: Vec<(String, Var)> = ["disc.body.w", "disc.aux_branch.w"]
                .iter()
                .map(|n| {
                    let t = Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
                    (n.to_string(), Var::from_tensor(&t).unwrap())
                })
                .collect();
            let mut opt = Adam::new(vars.clone(), 1e-4, 0.0, 0.99, 1e-8).unwrap();
            assert_eq!(
                opt.set_lr_of(&|n| n.contains(".aux_branch."), Some(1e-3)),
                1
            );
            // Loss sum(p^2): gradient 2p, signs (+, -).
            let loss = |v: &Var| v.as_tensor().sqr().unwrap().sum_all().unwrap();
            let l = (loss(&vars[0].1) + loss(&vars[1].1)).unwrap();
            opt.step_impl(&l.backward().unwrap(), fused).unwrap();
            for ((_, v), lr) in vars.iter().zip([1e-4, 1e-3]) {
                let got = v.as_tensor().to_vec1::<f32>().unwrap();
                for (g, want) in got.iter().zip([1.0 - lr, -2.0 + lr]) {
                    assert!(
                        (f64::from(*g) - want).abs() < 1e-7,
                        "{fused}: {g} vs {want}"
                    );
                }
            }
            // Back to the shared rate.
            assert_eq!(opt.set_lr_of(&|n| n.contains(".aux_branch."), None), 1);
            assert_eq!(opt.own_lr, vec![None, None]);
        }
    }

    /// The fused in-place step against the basic-op step on random shapes, f32 and f64, over
    /// several steps (gradients that change each step, and a variable without a gradient):
    /// parameters and moments agree to 1e-5 relative in f32 (in practice exactly: the same
    /// operations in the same order).
    #[test]
    fn fused_step_matches_basic_ops() {
        use crate::rng::Rng;
        let mut rng = Rng::new(21);
        for dtype in [DType::F32, DType::F64] {
            for case in 0..6 {
                let shapes: Vec<Vec<usize>> = (0..3)
                    .map(|_| (0..1 + rng.below(3)).map(|_| 1 + rng.below(40)).collect())
                    .collect();
                let init: Vec<Tensor> = shapes
                    .iter()
                    .map(|s| {
                        let n = s.iter().product();
                        Tensor::from_vec(rng.normal_vec(n), s.as_slice(), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let make = || {
                    let vars: Vec<(String, Var)> = init
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (format!("p{i}"), Var::from_tensor(t).unwrap()))
                        .collect();
                    let opt = Adam::new(vars.clone(), 1e-2, 0.5, 0.999, 1e-8).unwrap();
                    (vars, opt)
                };
                let (va, mut fused) = make();
                let (vb, mut basic) = make();
                for step in 0..4 {
                    let run = |vars: &[(String, Var)]| {
                        // Loss: sum(p0^3) + sum(sin(p1)), p2 (every other step) unused.
                        let mut l = vars[0].1.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
                        l = (l + vars[1].1.as_tensor().sin().unwrap().sum_all().unwrap()).unwrap();
                        if step % 2 == 0 {
                            l = (l + vars[2].1.as_tensor().sqr().unwrap().sum_all().unwrap())
                                .unwrap();
                        }
                        l.backward().unwrap()
                    };
                    fused.step(&run(&va)).unwrap();
                    basic.step_basic(&run(&vb)).unwrap();
                }
                let rel = |a: &Tensor, b: &Tensor| {
                    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
                    let s = b.abs().unwrap().max(0).unwrap();
                    d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1e-30)
                };
                for i in 0..3 {
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    let e = [
                        rel(va[i].1.as_tensor(), vb[i].1.as_tensor()),
                        rel(&fused.m[i], &basic.m[i]),
                        rel(&fused.v[i], &basic.v[i]),
                    ];
                    assert!(
                        e.iter().all(|&e| e < tol),
                        "{dtype:?} case {case} var {i} {:?}: {e:?}",
                        shapes[i]
                    );
                }
                // The saved state is a snapshot: later steps do not change it.
                let st = fused.state("o").unwrap();
                let before = st["o.m.p0"].flatten_all().unwrap().to_vec1::<f64>();
                fused
                    .step(&va[0].1.as_tensor().sum_all().unwrap().backward().unwrap())
                    .unwrap();
                let after = st["o.m.p0"].flatten_all().unwrap().to_vec1::<f64>();
                if dtype == DType::F64 {
                    assert_eq!(before.unwrap(), after.unwrap());
                }
            }
        }
    }
}
