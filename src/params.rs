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

    fn create(&self, name: String, shape: &[usize], init: Init, kind: Kind) -> Result<Var> {
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

    /// Look up an entry by full name.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().entries.get(name).map(|e| e.var.clone())
    }
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
            .create(self.full(name), shape, init, Kind::Param)?
            .as_tensor()
            .clone())
    }

    /// A saved tensor without gradient (e.g. running mean).
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.store
            .create(self.full(name), shape, init, Kind::Buffer)
    }

    /// Optimizer-side state (e.g. spectral-norm u).
    pub fn state(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.store.create(self.full(name), shape, init, Kind::State)
    }
}
