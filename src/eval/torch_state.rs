//! PyTorch state_dicts read as is, shared by the networks ganscope reads from PyTorch files
//! ([`super::torch_resnet`], [`super::fid`]).
//!
//! [`read_pth`] reads both formats of `torch.save`: the zip archive of PyTorch 1.6 and later
//! (through candle's reader) and the older *legacy* stream (five pickles: a magic number, the
//! protocol version 1001, system information, the object with its storages as persistent ids,
//! the list of storage keys; then each storage as an 8-byte little-endian element count and
//! its raw bytes), which is how pytorch-fid's 2019 Inception weights are stored. The pickles
//! are parsed by candle's pickle `Stack`.
//!
//! [`StateDict`] looks tensors up by name with their shapes checked, and folds an eval-mode
//! BatchNorm into the convolution before it (w * gamma / sqrt(var + eps), beta - mean * gamma /
//! sqrt(var + eps), computed in f64) as a [`Folded`] convolution.

use std::collections::HashMap;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::conv::conv2d;
use crate::kernels::ops::add_channel_bias;

/// The first pickle of a legacy file: protocol 2, the 10-byte LONG1 0x1950a86a20f9469cfc6c,
/// STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Every tensor of the PyTorch file at `path` (either format), by name. With `key`, a
/// top-level dict's entry `key` is read if it exists (`{'model': state_dict}`), else the top
/// level itself; a `module.` prefix from `DataParallel` is dropped. Tensors that are not
/// floating point are skipped.
pub fn read_pth(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_file(path, "not a regular file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tensors: Vec<(String, Tensor)> = if bytes.starts_with(b"PK\x03\x04") {
        drop(bytes);
        let read = |key: Option<&str>| candle_core::pickle::read_all_with_key(path, key);
        match key.map(|k| read(Some(k))) {
            Some(Ok(t)) => t,
            _ => read(None).map_err(|e| {
                Error::bad_file(
                    path,
                    format!("not a PyTorch checkpoint that candle can read: {e}"),
                )
            })?,
        }
    } else if bytes.starts_with(&LEGACY_MAGIC) {
        read_legacy(&bytes, key)
            .map_err(|msg| Error::bad_file(path, format!("a damaged legacy PyTorch file: {msg}")))?
    } else {
        return Err(Error::bad_file(
            path,
            "not a PyTorch checkpoint (neither torch.save's zip archive nor its legacy format)",
        ));
    };
    Ok(tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .collect())
}

/// One pickle from the front of `r`.
fn unpickle(r: &mut &[u8]) -> Result<Object, String> {
    let mut stack = Stack::empty();
    stack.read_loop(r).map_err(|e| e.to_string())?;
    stack.finalize().map_err(|e| e.to_string())
}

/// A storage's element type and size in bytes from its class (`torch.FloatStorage`).
fn storage_dtype(class: &str) -> Option<(DType, usize)> {
    Some(match class {
        "FloatStorage" => (DType::F32, 4),
        "DoubleStorage" => (DType::F64, 8),
        "HalfStorage" => (DType::F16, 2),
        "BFloat16Storage" => (DType::BF16, 2),
        "LongStorage" => (DType::I64, 8),
        "IntStorage" => (DType::I64, 4),
        "ByteStorage" | "BoolStorage" | "CharStorage" => (DType::U8, 1),
        "ShortStorage" => (DType::I64, 2),
        _ => return None,
    })
}

/// A tensor of the pickled object: (storage key, storage class, offset, size, stride).
struct TensorRef {
    key: String,
    class: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn usizes(o: Object) -> Result<Vec<usize>, String> {
    o.tuple()
        .map_err(|o| format!("expected a tuple, found {o:?}"))?
        .into_iter()
        .map(|v| {
            v.int_or_long()
                .ok()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| "a negative or non-integer size".to_string())
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` (possibly inside
/// `_rebuild_parameter`) -> its parts; None for anything else.
fn tensor_ref(value: Object) -> Result<Option<TensorRef>, String> {
    let Ok((callable, args)) = value.reduce() else {
        return Ok(None);
    };
    let (callable, args) = match callable {
        Object::Class { class_name, .. } if class_name == "_rebuild_parameter" => {
            let mut a = args.tuple().map_err(|o| format!("{o:?}"))?;
            if a.is_empty() {
                return Err("an empty _rebuild_parameter".into());
            }
            match a.remove(0).reduce() {
                Ok(r) => r,
                Err(_) => return Ok(None),
            }
        }
        c => (c, args),
    };
    match &callable {
        Object::Class { class_name, .. } if class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    let mut a = args.tuple().map_err(|o| format!("{o:?}"))?;
    if a.len() < 4 {
        return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
    }
    let stride = usizes(a.remove(3))?;
    let size = usizes(a.remove(2))?;
    let offset = a
        .remove(1)
        .int_or_long()
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or("a bad storage offset")?;
    let mut pid = a
        .remove(0)
        .persistent_load()
        .and_then(Object::tuple)
        .map_err(|o| format!("a tensor without a storage: {o:?}"))?;
    // ('storage', storage class, key, location, numel[, view metadata])
    if pid.len() < 5 {
        return Err("a storage id of fewer than 5 fields".into());
    }
    let key = pid.remove(2).unicode().map_err(|o| format!("{o:?}"))?;
    let (_, class) = pid.remove(1).class().map_err(|o| format!("{o:?}"))?;
    Ok(Some(TensorRef {
        key,
        class,
        offset,
        size,
        stride,
    }))
}

/// The legacy `torch.save` stream (see the module docs).
fn read_legacy(bytes: &[u8], key: Option<&str>) -> Result<Vec<(String, Tensor)>, String> {
    let mut r = &bytes[LEGACY_MAGIC.len()..];
    match unpickle(&mut r)? {
        Object::Int(1001) => {}
        o => return Err(format!("protocol version {o:?}, expected 1001")),
    }
    let _sys_info = unpickle(&mut r)?;
    let obj = unpickle(&mut r)?;
    let keys = match unpickle(&mut r)? {
        Object::List(k) | Object::Tuple(k) => k
            .into_iter()
            .map(|k| k.unicode().map_err(|o| format!("a storage key {o:?}")))
            .collect::<Result<Vec<_>, _>>()?,
        o => return Err(format!("expected the list of storage keys, found {o:?}")),
    };
    let mut entries = match obj {
        Object::Dict(d) => d,
        _ => return Err("the saved object is not a dict".into()),
    };
    if let Some(key) = key
        && let Some(i) = entries
            .iter()
            .position(|(k, v)| *k == Object::Unicode(key.into()) && matches!(v, Object::Dict(_)))
        && let (_, Object::Dict(inner)) = entries.swap_remove(i)
    {
        entries = inner;
    }
    let mut refs = Vec::new();
    for (name, value) in entries {
        if let (Object::Unicode(name), Some(t)) = (name, tensor_ref(value)?) {
            refs.push((name, t));
        }
    }
    // The storages follow in the order of `keys`: element count, then the raw bytes.
    let class_of: HashMap<&str, &str> = refs
        .iter()
        .map(|(_, t)| (t.key.as_str(), t.class.as_str()))
        .collect();
    let mut storages: HashMap<String, (&[u8], usize)> = HashMap::new();
    for k in &keys {
        let class = class_of.get(k.as_str()).copied().unwrap_or("FloatStorage");
        let (_, elem) =
            storage_dtype(class).ok_or_else(|| format!("unsupported storage type {class}"))?;
        if r.len() < 8 {
            return Err(format!("the file ends before storage {k}"));
        }
        let (head, rest) = r.split_at(8);
        let mut n = [0u8; 8];
        n.copy_from_slice(head);
        let numel = usize::try_from(u64::from_le_bytes(n)).map_err(|e| e.to_string())?;
        let len = numel
            .checked_mul(elem)
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| format!("the file ends inside storage {k} ({numel} elements)"))?;
        let (data, rest) = rest.split_at(len);
        storages.insert(k.clone(), (data, numel));
        r = rest;
    }
    let mut out = Vec::new();
    for (name, t) in refs {
        let (dtype, elem) = storage_dtype(&t.class)
            .ok_or_else(|| format!("`{name}`: unsupported storage type {}", t.class))?;
        if !matches!(dtype, DType::F32 | DType::F64) {
            continue;
        }
        let (data, numel) = storages
            .get(&t.key)
            .ok_or_else(|| format!("`{name}`: storage {} is missing", t.key))?;
        let count: usize = t.size.iter().product();
        let mut contiguous = vec![1usize; t.size.len()];
        for i in (0..t.size.len().saturating_sub(1)).rev() {
            contiguous[i] = contiguous[i + 1] * t.size[i + 1];
        }
        if count > 1 && t.stride != contiguous {
            return Err(format!(
                "`{name}` is not contiguous (strides {:?})",
                t.stride
            ));
        }
        if t.offset + count > *numel {
            return Err(format!("`{name}` reaches past its storage"));
        }
        let bytes = &data[t.offset * elem..(t.offset + count) * elem];
        let v: Vec<f32> = if dtype == DType::F32 {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect()
        };
        let t = Tensor::from_vec(v, t.size.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
        out.push((name, t));
    }
    Ok(out)
}

/// A convolution with the eval-mode BatchNorm after it folded in: weight (O, C, KH, KW),
/// bias (O), stride, and zero padding (rows, columns) on each side.
pub struct Folded {
    pub w: Tensor,
    pub b: Tensor,
    pub stride: usize,
    pub padding: (usize, usize),
}

impl Folded {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.padding;
        let y = if ph == pw {
            conv2d(x, &self.w, self.stride, ph, None)?
        } else {
            let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            conv2d(&x, &self.w, self.stride, 0, None)?
        };
        add_channel_bias(&y, &self.b)
    }
}

/// What a convolution of the file must look like: input channels, kernel size (None: the
/// file's, odd), stride, and whether it keeps the size at stride 1 (padding (k - 1) / 2 on
/// each side) or has no padding.
#[derive(Clone, Copy)]
pub struct ConvShape {
    pub cin: usize,
    pub k: Option<(usize, usize)>,
    pub stride: usize,
    pub same: bool,
}

/// The tensors of a PyTorch file, by name, with the file's path for messages and a name of
/// the network it should hold (`a torchvision ResNet`).
pub struct StateDict<'a> {
    pub path: &'a Path,
    pub t: HashMap<String, Tensor>,
    pub what: &'static str,
}

impl StateDict<'_> {
    pub fn bad(&self, msg: String) -> Error {
        Error::bad_file(self.path, msg)
    }

    /// Tensor `name` as f64 on the CPU, with exactly `dims` (a `None` entry = any).
    pub fn get(&self, name: &str, dims: &[Option<usize>]) -> Result<Tensor> {
        let t = self.t.get(name).ok_or_else(|| {
            self.bad(format!(
                "no tensor `{name}`: not {} state_dict (it has {} tensors{})",
                self.what,
                self.t.len(),
                self.t
                    .keys()
                    .min()
                    .map_or(String::new(), |k| format!(", e.g. `{k}`"))
            ))
        })?;
        let ok = t.rank() == dims.len()
            && t.dims()
                .iter()
                .zip(dims)
                .all(|(a, b)| b.is_none_or(|b| *a == b));
        if !ok {
            return Err(self.bad(format!(
                "tensor `{name}` has shape {:?}, expected {}",
                t.dims(),
                dims.iter()
                    .map(|d| d.map_or("*".to_string(), |d| d.to_string()))
                    .collect::<Vec<_>>()
                    .join(" x ")
            )));
        }
        Ok(t.to_dtype(DType::F64)?)
    }

    /// Conv `conv` (no bias) followed by BatchNorm `bn` with epsilon `eps`, folded, on
    /// `device` in f32; with its number of output channels.
    pub fn folded(
        &self,
        conv: &str,
        bn: &str,
        shape: ConvShape,
        eps: f64,
        device: &Device,
    ) -> Result<(Folded, usize)> {
        let ConvShape {
            cin,
            k,
            stride,
            same,
        } = shape;
        let name = format!("{conv}.weight");
        let w = self.get(&name, &[None, Some(cin), k.map(|k| k.0), k.map(|k| k.1)])?;
        let (cout, _, kh, kw) = w.dims4()?;
        if same && (kh % 2 == 0 || kw % 2 == 0) {
            return Err(self.bad(format!("`{name}` has an even kernel {kh} x {kw}")));
        }
        let c = [Some(cout)];
        let gamma = self.get(&format!("{bn}.weight"), &c)?;
        let beta = self.get(&format!("{bn}.bias"), &c)?;
        let mean = self.get(&format!("{bn}.running_mean"), &c)?;
        let var = self.get(&format!("{bn}.running_var"), &c)?;
        let v = var.to_vec1::<f64>()?;
        if v.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(self.bad(format!(
                "`{bn}.running_var` holds a negative or non-finite value"
            )));
        }
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let b = (beta - (mean * &scale)?)?;
        let to = |t: Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            if t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(self.bad(format!("`{conv}` or `{bn}` holds a non-finite value")));
            }
            Ok(t.to_device(device)?)
        };
        let padding = if same {
            ((kh - 1) / 2, (kw - 1) / 2)
        } else {
            (0, 0)
        };
        Ok((
            Folded {
                w: to(w)?,
                b: to(b)?,
                stride,
                padding,
            },
            cout,
        ))
    }
}

/// The fixed inputs of the committed fixtures' scripts: n x 3 x s x s values
/// f(sin(0.37 i + 1.1 c + 0.21 y - 0.13 x + 0.005 y x)), computed in f64 and rounded to f32.
pub fn sine_pattern(n: usize, s: usize, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    let mut v = Vec::with_capacity(n * 3 * s * s);
    for i in 0..n {
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let (i, c, y, x) = (i as f64, c as f64, y as f64, x as f64);
                    v.push(
                        f((0.37 * i + 1.1 * c + 0.21 * y - 0.13 * x + 0.005 * y * x).sin()) as f32,
                    );
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;

    #[test]
    fn legacy_and_zip_files_are_read_and_junk_is_named() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // Legacy format (fid_inception) and zip (course_evaluator, under `model`).
        let legacy = read_pth(&root.join("fid_inception/inception.pth"), None).unwrap();
        let w = &legacy["Conv2d_1a_3x3.conv.weight"];
        assert_eq!(w.dims(), &[2, 3, 3, 3]);
        assert!(legacy.contains_key("Mixed_7c.branch_pool.bn.running_var"));
        let zip = read_pth(&root.join("course_evaluator/checkpoint.pth"), Some("model")).unwrap();
        assert_eq!(zip["conv1.weight"].dims(), &[4, 3, 7, 7]);

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pth");
        std::fs::write(&junk, b"not a zip").unwrap();
        let e = read_pth(&junk, None).err().unwrap().to_string();
        assert!(e.contains("junk.pth") && e.contains("not a PyTorch"), "{e}");
        // A legacy file cut short is named as damaged, not a panic.
        let bytes = std::fs::read(root.join("fid_inception/inception.pth")).unwrap();
        let cut = dir.path().join("cut.pth");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_pth(&cut, None).err().unwrap().to_string();
        assert!(e.contains("cut.pth") && e.contains("damaged"), "{e}");
        let e = read_pth(dir.path(), None).err().unwrap().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_pth(&dir.path().join("missing.pth"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing.pth"), "{e}");
    }
}
