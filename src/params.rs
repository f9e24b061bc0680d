//! Named, seeded parameter storage: the engine's replacement for candle-nn's `VarMap`.
//!
//! Every tensor of a network lives here under a dotted name that follows the struct
//! fields (`gen.blocks.0.conv.weight`), with PyTorch's layouts (OIHW conv weights, (out, in)
//! linear weights), so a PyTorch user can read the safetensors files directly.
//! Initial values come from the engine's own [`Rng`](crate::rng::Rng) in creation order, so
//! a seed fully determines a model. Three kinds of entries are kept apart:
//! - [`Kind::Param`]: trained by the optimizer, saved in the network's file;
//! - [`Kind::Buffer`]: running statistics (BatchNorm), saved in the network's file, no gradient;
//! - [`Kind::State`]: spectral-norm power-iteration vectors, saved with the optimizer state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Param,
    Buffer,
    State,
}

/// How a new tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Const(f64),
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, hi: f64 },
}

impl Init {
    /// Glorot/Xavier uniform for a weight with the given fan-in and fan-out.
    pub fn xavier(fan_in: usize, fan_out: usize) -> Self {
        let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
        Init::Uniform { lo: -a, hi: a }
    }
}

struct Entry {
    var: Var,
    kind: Kind,
    /// The axis of a layer weight that runs over the layer's inputs (1 for OIHW conv and
    /// (out, in) linear weights, 0 for (in, out, kH, kW) transposed conv); `None` for
    /// everything else. What [`widen`] divides instead of copying.
    fan_in_axis: Option<usize>,
}

struct Inner {
    entries: BTreeMap<String, Entry>,
    rng: Rng,
}

/// Shared handle to one network's tensors.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamStore({} tensors)", self.lock().entries.len())
    }
}

impl ParamStore {
    pub fn new(rng: Rng, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: BTreeMap::new(),
                rng,
            })),
            device: device.clone(),
            dtype,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of a map of Vars;
        // the map itself is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A builder rooted at `prefix` (e.g. "gen").
    pub fn root(&self, prefix: &str) -> Vb {
        Vb {
            store: self.clone(),
            path: if prefix.is_empty() {
                vec![]
            } else {
                vec![prefix.to_string()]
            },
        }
    }

    fn create(
        &self,
        name: String,
        shape: &[usize],
        init: Init,
        kind: Kind,
        fan_in_axis: Option<usize>,
    ) -> Result<Var> {
        let mut inner = self.lock();
        if inner.entries.contains_key(&name) {
            return Err(Error::Msg(format!("tensor `{name}` created twice")));
        }
        let n: usize = shape.iter().product();
        let values: Vec<f64> = match init {
            Init::Const(c) => vec![c; n],
            Init::Normal { mean, std } => {
                let mut v = inner.rng.normal_vec(n);
                v.iter_mut().for_each(|x| *x = mean + std * *x);
                v
            }
            Init::Uniform { lo, hi } => (0..n)
                .map(|_| lo + (hi - lo) * inner.rng.uniform())
                .collect(),
        };
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        inner.entries.insert(
            name,
            Entry {
                var: var.clone(),
                kind,
                fan_in_axis,
            },
        );
        Ok(var)
    }

    /// All trainable variables, sorted by name (the optimizer's order).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.of_kind(&[Kind::Param])
    }

    fn of_kind(&self, kinds: &[Kind]) -> Vec<(String, Var)> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| kinds.contains(&e.kind))
            .map(|(k, e)| (k.clone(), e.var.clone()))
            .collect()
    }

    /// Parameters and buffers: what goes into `generator.safetensors` / `discriminator.safetensors`.
    pub fn model_tensors(&self) -> HashMap<String, Tensor> {
        self.of_kind(&[Kind::Param, Kind::Buffer])
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Spectral-norm vectors and similar state: saved with the optimizer.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.of_kind(&[Kind::State])
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Names and shapes of the entries of the given kinds.
    pub fn shapes(&self, model: bool) -> Vec<(String, Vec<usize>)> {
        let kinds: &[Kind] = if model {
            &[Kind::Param, Kind::Buffer]
        } else {
            &[Kind::State]
        };
        self.of_kind(kinds)
            .into_iter()
            .map(|(k, v)| (k, v.dims().to_vec()))
            .collect()
    }

    /// Overwrite entries from `tensors` (as read from `path`), checking names and shapes first:
    /// nothing is changed unless everything matches.
    pub fn load(&self, path: &Path, tensors: &HashMap<String, Tensor>, model: bool) -> Result<()> {
        self.load_except(path, tensors, model, &|_| false)
    }

    /// [`Self::load`] of the entries whose names `fresh` does not pick: those keep their
    /// initial values (and `tensors` must not hold them). Names and shapes of the rest are
    /// checked first; nothing changes unless they all match.
    pub fn load_except(
        &self,
        path: &Path,
        tensors: &HashMap<String, Tensor>,
        model: bool,
        fresh: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let expected: Vec<_> = self
            .shapes(model)
            .into_iter()
            .filter(|(n, _)| !fresh(n))
            .collect();
        crate::checkpoint::check_shapes(path, &expected, tensors)?;
        let inner = self.lock();
        for (name, _) in expected {
            let t = tensors[&name]
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            inner.entries[&name].var.set(&t)?;
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The input axis of a layer weight ([`Vb::weight`]); `None` for other tensors and
    /// unknown names.
    pub fn fan_in_axis(&self, name: &str) -> Option<usize> {
        self.lock().entries.get(name).and_then(|e| e.fan_in_axis)
    }

    /// Look up an entry by full name.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().entries.get(name).map(|e| e.var.clone())
    }
}

/// Net2WiderNet (Chen, Goodfellow & Shlens, "Net2Net: Accelerating Learning via Knowledge
/// Transfer", ICLR 2016): the tensors `found` (read from `path`) widened to the `expected`
/// names and shapes, so that the wider network computes what the narrow one did.
///
/// Every axis that grows does so by a whole factor f, and new index j copies old index
/// j mod n (the old channels repeated f times, a layout that flattened channel-major features
/// keep too). Along a layer weight's input axis (`fan_in_axis`) the copies are divided by f:
/// each old input is now fed f times. Along any other axis they are plain copies (outputs,
/// biases, normalisation statistics and scales). Then, to let the copies part, the copies
/// along a weight's output axis (index >= n there) get N(0, (noise * sd of the old weight)^2)
/// added from `rng` (`noise` = 0: exactly the narrow network's function). Tensors that do not
/// change shape are returned as they are. Anything else (a name missing or extra, a smaller
/// size, a size that is not a whole multiple, a different rank) is refused naming `path`.
pub fn widen(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
    fan_in_axis: &dyn Fn(&str) -> Option<usize>,
    noise: f64,
    rng: &mut Rng,
) -> Result<HashMap<String, Tensor>> {
    let bad = |msg: String| Error::bad_file(path, msg);
    if let Some(extra) = found
        .keys()
        .find(|n| !expected.iter().any(|(e, _)| e == *n))
    {
        return Err(bad(format!(
            "tensor `{extra}` is not part of the wider model"
        )));
    }
    let mut out = HashMap::new();
    for (name, want) in expected {
        let t = found
            .get(name)
            .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
        let have = t.dims().to_vec();
        if have == *want {
            out.insert(name.clone(), t.clone());
            continue;
        }
        let fits = have.len() == want.len()
            && have
                .iter()
                .zip(want)
                .all(|(&h, &w)| h > 0 && w >= h && w % h == 0);
        if !fits {
            return Err(bad(format!(
                "tensor `{name}` has shape {have:?}; widening it to {want:?} needs every size \
                 to grow by a whole factor"
            )));
        }
        let fan_in = fan_in_axis(name);
        let old: Vec<f32> = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let scale = match fan_in {
            Some(a) if want[a] != have[a] => (have[a] as f64 / want[a] as f64) as f32,
            _ => 1.0,
        };
        let sd = if noise > 0.0 && fan_in.is_some() {
            let n = old.len() as f64;
            let mean = old.iter().map(|&x| x as f64).sum::<f64>() / n;
            (old.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt() * noise
        } else {
            0.0
        };
        let total: usize = want.iter().product();
        let mut values = Vec::with_capacity(total);
        let mut idx = vec![0usize; want.len()];
        for _ in 0..total {
            let mut src = 0;
            let mut copy = false;
            for (a, (&i, &h)) in idx.iter().zip(&have).enumerate() {
                src = src * h + i % h;
                copy |= i >= h && Some(a) != fan_in;
            }
            let mut v = old[src] * scale;
            if copy && sd > 0.0 {
                v += (sd * rng.normal_vec(1)[0]) as f32;
            }
            values.push(v);
            for a in (0..want.len()).rev() {
                idx[a] += 1;
                if idx[a] < want[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        let w = Tensor::from_vec(values, want.as_slice(), t.device())?.to_dtype(t.dtype())?;
        out.insert(name.clone(), w);
    }
    Ok(out)
}

/// A path into a [`ParamStore`]: `vb.pp("blocks").pp(0).param(..)`.
#[derive(Clone, Debug)]
pub struct Vb {
    store: ParamStore,
    path: Vec<String>,
}

impl Vb {
    pub fn pp(&self, name: impl ToString) -> Vb {
        let mut path = self.path.clone();
        path.push(name.to_string());
        Vb {
            store: self.store.clone(),
            path,
        }
    }

    fn full(&self, name: &str) -> String {
        let mut p = self.path.clone();
        p.push(name.to_string());
        p.join(".")
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }
    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    /// A trainable tensor.
    pub fn param(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        Ok(self
            .store
            .create(self.full(name), shape, init, Kind::Param, None)?
            .as_tensor()
            .clone())
    }

    /// A trainable layer weight whose axis `fan_in_axis` runs over the layer's inputs.
    pub fn weight(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
        fan_in_axis: usize,
    ) -> Result<Tensor> {
        Ok(self
            .store
            .create(self.full(name), shape, init, Kind::Param, Some(fan_in_axis))?
            .as_tensor()
            .clone())
    }

    /// A saved tensor without gradient (e.g. running mean).
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.store
            .create(self.full(name), shape, init, Kind::Buffer, None)
    }

    /// Optimizer-side state (e.g. spectral-norm u).
    pub fn state(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.store
            .create(self.full(name), shape, init, Kind::State, None)
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn vals(m: &HashMap<String, Tensor>, n: &str) -> Vec<f32> {
        m[n].flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Layer weights of each layout, a bias, and an untouched tensor; values by hand.
    #[test]
    fn widening_repeats_channels_and_shares_out_their_inputs() {
        let w = [1f32, 2., 3., 4., 5., 6.]; // [[1, 2, 3], [4, 5, 6]]
        let found: HashMap<String, Tensor> = [
            ("lin_in", t(&w, &[2, 3])),
            ("lin_out", t(&w, &[2, 3])),
            ("convt", t(&w, &[2, 3])),
            ("bias", t(&[7., 8.], &[2])),
            ("same", t(&[9.], &[1])),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let expected: Vec<(String, Vec<usize>)> = [
            ("lin_in", vec![2, 6]),
            ("lin_out", vec![4, 3]),
            ("convt", vec![4, 6]),
            ("bias", vec![6]),
            ("same", vec![1]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        // (out, in) layouts read their inputs on axis 1, a transposed conv on axis 0.
        let fan_in = |n: &str| match n {
            "lin_in" | "lin_out" => Some(1),
            "convt" => Some(0),
            _ => None,
        };
        let p = Path::new("g.safetensors");
        let exact = widen(p, &expected, &found, &fan_in, 0.0, &mut Rng::new(3)).unwrap();
        // Inputs repeated twice: each copy carries half.
        assert_eq!(
            vals(&exact, "lin_in"),
            [0.5, 1., 1.5, 0.5, 1., 1.5, 2., 2.5, 3., 2., 2.5, 3.]
        );
        // Outputs repeated: rows copied as they are.
        assert_eq!(
            vals(&exact, "lin_out"),
            [1., 2., 3., 4., 5., 6., 1., 2., 3., 4., 5., 6.]
        );
        // (in, out): in axis 0 doubles (halved), out axis 1 doubles (copied): [i][j] =
        // w[i % 2][j % 3] / 2.
        let convt: Vec<f32> = (0..4)
            .flat_map(|i| (0..6).map(move |j| w[(i % 2) * 3 + j % 3] / 2.0))
            .collect();
        assert_eq!(vals(&exact, "convt"), convt);
        assert_eq!(vals(&exact, "bias"), [7., 8., 7., 8., 7., 8.]);
        assert_eq!(vals(&exact, "same"), [9.]);

        // With noise, only the copies along a weight's output axis move, by about noise * sd
        // (sd of 1..6 = 1.708), and the same seed gives the same values.
        let noisy = widen(p, &expected, &found, &fan_in, 0.1, &mut Rng::new(3)).unwrap();
        let again = widen(p, &expected, &found, &fan_in, 0.1, &mut Rng::new(3)).unwrap();
        let lo = vals(&noisy, "lin_out");
        assert_eq!(lo, vals(&again, "lin_out"));
        assert_eq!(lo[..6], [1., 2., 3., 4., 5., 6.]);
        let moved: Vec<f32> = lo[6..].iter().zip(&w).map(|(a, b)| a - b).collect();
        assert!(
            moved.iter().all(|d| d.abs() > 0.0 && d.abs() < 0.171 * 5.0),
            "{moved:?}"
        );
        assert_eq!(vals(&noisy, "lin_in"), vals(&exact, "lin_in"));
        assert_eq!(vals(&noisy, "bias"), vals(&exact, "bias"));
        let ct = vals(&noisy, "convt");
        for i in 0..4 {
            for j in 0..6 {
                let (a, b) = (ct[i * 6 + j], convt[i * 6 + j]);
                assert_eq!(a == b, j < 3, "convt[{i}][{j}]: {a} against {b}");
            }
        }

        // Refused, naming the file: a size that is not a whole multiple, a smaller one, a
        // missing tensor, an extra one.
        let refuse = |expected: &[(String, Vec<usize>)], found: &HashMap<String, Tensor>| {
            let e = widen(p, expected, found, &fan_in, 0.0, &mut Rng::new(0))
                .unwrap_err()
                .to_string();
            assert!(e.contains("g.safetensors"), "{e}");
            e
        };
        let one = |n: &str, s: Vec<usize>| vec![(n.to_string(), s)];
        let only = |n: &str| -> HashMap<String, Tensor> {
            [(n.to_string(), found[n].clone())].into_iter().collect()
        };
        assert!(refuse(&one("bias", vec![3]), &only("bias")).contains("whole factor"));
        assert!(refuse(&one("lin_in", vec![1, 3]), &only("lin_in")).contains("whole factor"));
        assert!(refuse(&one("bias", vec![4]), &HashMap::new()).contains("missing"));
        assert!(refuse(&[], &only("bias")).contains("not part"));
    }
}
