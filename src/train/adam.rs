//! Adam (Kingma & Ba, ICLR 2015) whose moment estimates are plain tensors that can be saved
//! and restored exactly (candle-nn's AdamW keeps them private).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var, backprop::GradStore};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            lr,
            beta1,
            beta2,
            eps,
        })
    }

    /// One update of every variable that has a gradient in `grads`
    /// (variables without one keep their value and moments, as in PyTorch).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients keep their graph when second-order gradients are enabled: cut it so
            // the moments do not chain every step's graph together.
            let g = g.detach();
            let m = ((self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?).detach();
            let v = ((self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?).detach();
            let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, self.eps)?;
            let update = m.affine(self.lr / bc1, 0.0)?.div(&denom)?;
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
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{prefix}.m.{name}"), self.m[i].clone());
            out.insert(format!("{prefix}.v.{name}"), self.v[i].clone());
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
            self.m[i] = mine[&format!("{prefix}.m.{name}")]
                .to_device(dev)?
                .to_dtype(dtype)?;
            self.v[i] = mine[&format!("{prefix}.v.{name}")]
                .to_device(dev)?
                .to_dtype(dtype)?;
        }
        let t = mine[&format!("{prefix}.t")]
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        self.t = u64::try_from(t[0])
            .map_err(|_| Error::bad_file(path, format!("{prefix}.t is negative ({})", t[0])))?;
        Ok(())
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
}
