//! Generators imported from PyTorch through ONNX (`torch.onnx.export`), run on the CPU by
//! tract (pure Rust; see NOTE-onnx.md for why tract and not candle-onnx).
//!
//! The graph takes a noise input, (B, Z) or (B, Z, 1, 1) float32, and optionally a condition
//! input: either a float32 (B, K) vector (multi-hot or one-hot, ganscope's own form) or an
//! integer class index (B,) or (B, 1) for an `nn.Embedding` (ganscope passes the index of the
//! largest entry of its one-hot vector). Its first output is the image batch (B, C, H, W).
//! Imported networks are eval-only: there are no weights for ganscope to train.
//!
//! Before anything runs, the file is checked: that it decodes as an ONNX model with a graph,
//! that every operator is one tract implements (the missing ones are named), that the noise
//! and condition inputs exist (the inputs found are listed) and have usable shapes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::error::{Error, Result};

/// The graph file inside an imported run folder.
pub const ONNX_FILE: &str = "generator.onnx";

/// Input names taken for the noise when none is given (compared case-insensitively).
pub const NOISE_NAMES: &[&str] = &["noise", "z", "latent", "latents", "input_noise", "z_noise"];
/// Input names taken for the condition when none is given.
pub const CONDITION_NAMES: &[&str] = &[
    "labels",
    "label",
    "condition",
    "conditions",
    "cond",
    "c",
    "y",
    "class",
    "classes",
    "class_labels",
];

/// How the graph wants the condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionInput {
    /// float32 (B, K): ganscope's condition vector as is.
    Vector { k: usize },
    /// An integer class index, (B,) or (B, 1) (`rank`), int64 or int32: the argmax of c.
    Index { rank: usize, int32: bool },
}

/// One input of the graph as declared in the file (for error messages).
#[derive(Debug, Clone)]
pub struct GraphInput {
    pub name: String,
    pub elem: String,
    /// Each dimension: a number, a symbolic name, or `?`.
    pub dims: Vec<String>,
}

impl fmt::Display for GraphInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` {} [{}]",
            self.name,
            self.elem,
            self.dims.join(", ")
        )
    }
}

/// Which inputs to use (names from the command line, or `None` to recognise them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputNames {
    pub noise: Option<String>,
    pub condition: Option<String>,
}

/// An imported generator, ready to run.
#[derive(Clone)]
pub struct OnnxGenerator {
    pub path: PathBuf,
    pub noise: String,
    pub z_dim: usize,
    noise_4d: bool,
    pub condition: Option<(String, ConditionInput)>,
    /// K: length of ganscope's condition vector (0 without a condition input).
    pub num_conditions: usize,
    /// The graph was exported with this fixed batch size (run in chunks of it, padded).
    pub fixed_batch: Option<usize>,
    /// (C, H, W) of the images.
    pub image_shape: (usize, usize, usize),
    /// The tensor read as G's first features (GANSpace directions), and its width.
    pub feature_tensor: String,
    pub feature_dim: usize,
    plan: Arc<TypedSimplePlan>,
}

impl fmt::Debug for OnnxGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxGenerator")
            .field("path", &self.path)
            .field("noise", &self.noise)
            .field("z_dim", &self.z_dim)
            .field("condition", &self.condition)
            .field("image_shape", &self.image_shape)
            .field("feature_tensor", &self.feature_tensor)
            .finish_non_exhaustive()
    }
}

fn elem_name(t: i32) -> String {
    use pb::tensor_proto::DataType;
    match DataType::try_from(t) {
        Ok(d) => d.as_str_name().to_lowercase(),
        Err(_) => format!("type {t}"),
    }
}

fn declared_inputs(graph: &pb::GraphProto) -> Vec<GraphInput> {
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| {
            let (elem, dims) = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(t)) => {
                    let dims = t.shape.as_ref().map_or_else(Vec::new, |s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                                    v.to_string()
                                }
                                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                                    p.clone()
                                }
                                None => "?".into(),
                            })
                            .collect()
                    });
                    (elem_name(t.elem_type), dims)
                }
                None => ("untyped".into(), vec![]),
            };
            GraphInput {
                name: i.name.clone(),
                elem,
                dims,
            }
        })
        .collect()
}

fn list(inputs: &[GraphInput]) -> String {
    inputs
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fixed dimension's size, `None` for a symbolic or unknown one.
fn fixed(d: &str) -> Option<usize> {
    d.parse::<usize>().ok().filter(|&v| v > 0)
}

/// Decode `bytes` as an ONNX model with a graph (what `path` names, for messages).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<pb::ModelProto> {
    let not_onnx = |why: String| {
        Error::bad_file(
            path,
            format!("not an ONNX model ({why}); export one with torch.onnx.export"),
        )
    };
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| not_onnx(format!("{e:#}")))?;
    match &proto.graph {
        Some(g) if !g.node.is_empty() && !g.output.is_empty() => Ok(proto),
        _ => Err(not_onnx("no graph with nodes and outputs in it".into())),
    }
}

/// The operators of `graph` that tract does not implement, each once, in graph order.
pub fn unsupported_ops(graph: &pb::GraphProto) -> Vec<String> {
    let known = tract_onnx::onnx().op_register;
    let mut out: Vec<String> = Vec::new();
    for n in &graph.node {
        let name = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        if !known.0.contains_key(&n.op_type) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Rewrite each MatMul of two vectors (a dot product: tract refuses rank-1 x rank-1) as
/// Mul + ReduceSum over all axes, which is the same scalar. PyTorch's `spectral_norm` exports
/// sigma = u . (W v) this way (seed 004's SAGAN). Ranks are followed only as far as they
/// are certain: initializers, Constant nodes, Reshape to a constant shape, MatMul of known
/// ranks. Returns how many were rewritten.
pub fn fix_vector_dots(graph: &mut pb::GraphProto) -> usize {
    use std::collections::HashMap;
    let mut rank: HashMap<String, usize> = HashMap::new();
    // The length of 1-D constant tensors (a Reshape's target shape gives its output rank).
    let mut len1: HashMap<String, usize> = HashMap::new();
    for t in &graph.initializer {
        rank.insert(t.name.clone(), t.dims.len());
        if t.dims.len() == 1 {
            len1.insert(t.name.clone(), t.dims[0].max(0) as usize);
        }
    }
    let mut out = Vec::with_capacity(graph.node.len());
    let mut fixed = 0;
    for mut n in std::mem::take(&mut graph.node) {
        let r = |i: usize| n.input.get(i).and_then(|x| rank.get(x)).copied();
        let (r0, r1) = (r(0), r(1));
        let known = match n.op_type.as_str() {
            "Constant" => n
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref())
                .map(|t| {
                    if t.dims.len() == 1
                        && let Some(o) = n.output.first()
                    {
                        len1.insert(o.clone(), t.dims[0].max(0) as usize);
                    }
                    t.dims.len()
                }),
            "Reshape" => n.input.get(1).and_then(|s| len1.get(s)).copied(),
            "MatMul" => match (r0, r1) {
                (Some(1), Some(1)) => Some(0),
                (Some(2), Some(1)) | (Some(1), Some(2)) => Some(1),
                (Some(a), Some(b)) if a >= 2 && b >= 2 => Some(a.max(b)),
                _ => None,
            },
            _ => None,
        };
        if let Some(k) = known
            && let Some(o) = n.output.first()
        {
            rank.insert(o.clone(), k);
        }
        if n.op_type == "MatMul" && r0 == Some(1) && r1 == Some(1) && n.output.len() == 1 {
            let dot = n.output[0].clone();
            let prod = format!("{dot}__ganscope_dot_product");
            n.op_type = "Mul".into();
            n.output = vec![prod.clone()];
            out.push(n);
            out.push(pb::NodeProto {
                input: vec![prod],
                output: vec![dot.clone()],
                name: format!("{dot}__ganscope_dot_sum"),
                op_type: "ReduceSum".into(),
                attribute: vec![pb::AttributeProto {
                    name: "keepdims".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: 0,
                    ..Default::default()
                }],
                ..Default::default()
            });
            fixed += 1;
        } else {
            out.push(n);
        }
    }
    graph.node = out;
    fixed
}

/// Pick the noise and condition inputs: by the given names, else by the usual names, else
/// the only input is the noise.
fn pick_inputs(
    path: &Path,
    inputs: &[GraphInput],
    names: &InputNames,
) -> Result<(GraphInput, Option<GraphInput>)> {
    let find = |n: &str, what: &str, flag: &str| -> Result<GraphInput> {
        inputs.iter().find(|i| i.name == n).cloned().ok_or_else(|| {
            Error::bad_file(
                path,
                format!(
                    "the graph has no input `{n}` (given as the {what}; {flag}); its inputs are: {}",
                    list(inputs)
                ),
            )
        })
    };
    let by_name = |known: &[&str]| -> Vec<&GraphInput> {
        inputs
            .iter()
            .filter(|i| known.iter().any(|k| i.name.eq_ignore_ascii_case(k)))
            .collect()
    };
    let unclear = |what: &str| {
        Error::bad_file(
            path,
            format!(
                "cannot tell which input is the {what}: the graph's inputs are {}; name them \
                 in torch.onnx.export (input_names=[\"noise\", \"labels\"]) or give \
                 --noise-input NAME / --condition-input NAME",
                list(inputs)
            ),
        )
    };
    if inputs.is_empty() {
        return Err(Error::bad_file(path, "the graph has no inputs"));
    }
    let noise = match &names.noise {
        Some(n) => find(n, "noise", "--noise-input")?,
        None if inputs.len() == 1 => inputs[0].clone(),
        None => match by_name(NOISE_NAMES).as_slice() {
            [one] => (*one).clone(),
            _ => return Err(unclear("noise")),
        },
    };
    let rest: Vec<GraphInput> = inputs
        .iter()
        .filter(|i| i.name != noise.name)
        .cloned()
        .collect();
    let condition = match &names.condition {
        Some(n) if *n == noise.name => {
            return Err(Error::bad_file(
                path,
                format!("input `{n}` given as both the noise and the condition"),
            ));
        }
        Some(n) => Some(find(n, "condition", "--condition-input")?),
        None if rest.is_empty() => None,
        None if rest.len() == 1 => Some(rest[0].clone()),
        None => {
            let named: Vec<&GraphInput> = rest
                .iter()
                .filter(|i| {
                    CONDITION_NAMES
                        .iter()
                        .any(|k| i.name.eq_ignore_ascii_case(k))
                })
                .collect();
            match named.as_slice() {
                [one] => Some((*one).clone()),
                _ => return Err(unclear("condition")),
            }
        }
    };
    let used = 1 + usize::from(condition.is_some());
    if used < inputs.len() {
        let extra: Vec<&GraphInput> = inputs
            .iter()
            .filter(|i| i.name != noise.name && condition.as_ref().is_none_or(|c| c.name != i.name))
            .collect();
        return Err(Error::bad_file(
            path,
            format!(
                "the graph has inputs besides the noise `{}`{}: {}; a generator takes the \
                 noise and at most one condition",
                noise.name,
                condition
                    .as_ref()
                    .map(|c| format!(" and the condition `{}`", c.name))
                    .unwrap_or_default(),
                extra
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok((noise, condition))
}

/// The first tensor computed by a weighted layer (Conv, ConvTranspose, Gemm, MatMul) that
/// depends on the noise: what [`OnnxGenerator::first_features`] reads.
fn feature_tensor(graph: &pb::GraphProto, noise: &str) -> Option<String> {
    let mut reached: std::collections::HashSet<&str> = std::collections::HashSet::new();
    reached.insert(noise);
    for n in &graph.node {
        if n.input.iter().any(|i| reached.contains(i.as_str())) {
            if matches!(
                n.op_type.as_str(),
                "Conv" | "ConvTranspose" | "Gemm" | "MatMul"
            ) && let Some(o) = n.output.first()
            {
                return Some(o.clone());
            }
            for o in &n.output {
                reached.insert(o.as_str());
            }
        }
    }
    None
}

/// One run of the graph: the images (row-major), their shape, the first features (n x F
/// row-major) and F.
struct RunOut {
    images: Vec<f32>,
    shape: Vec<usize>,
    features: Vec<f32>,
    feature_dim: usize,
}

fn tract_err(path: &Path, what: &str, e: impl fmt::Display) -> Error {
    Error::bad_file(path, format!("{what}: {e}"))
}

impl OnnxGenerator {
    /// Read, check and prepare the graph at `path`. `num_conditions` is K when it is known
    /// (from the config or the dataset): required for a class-index condition input, checked
    /// against a (B, K) one.
    pub fn load(path: &Path, names: &InputNames, num_conditions: Option<usize>) -> Result<Self> {
        let bytes = crate::checkpoint::read_regular(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes, names, num_conditions)
    }

    /// [`OnnxGenerator::load`] from the file's bytes.
    pub fn from_bytes(
        path: &Path,
        bytes: &[u8],
        names: &InputNames,
        num_conditions: Option<usize>,
    ) -> Result<Self> {
        let mut proto = decode(path, bytes)?;
        if let Some(g) = proto.graph.as_mut() {
            fix_vector_dots(g);
        }
        let Some(graph) = proto.graph.as_ref() else {
            return Err(Error::bad_file(path, "not an ONNX model (no graph)"));
        };
        let bad = unsupported_ops(graph);
        if !bad.is_empty() {
            return Err(Error::bad_file(
                path,
                format!(
                    "unsupported ONNX operator{} {} (the runtime, tract, does not implement {}); \
                     rewrite that part of the network with supported operators",
                    if bad.len() > 1 { "s" } else { "" },
                    bad.iter()
                        .map(|o| format!("`{o}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if bad.len() > 1 { "them" } else { "it" }
                ),
            ));
        }
        let inputs = declared_inputs(graph);
        let (noise, cond) = pick_inputs(path, &inputs, names)?;
        if noise.elem != "float" {
            return Err(Error::bad_file(
                path,
                format!("the noise input {noise} must be float32"),
            ));
        }
        let shape_err = |i: &GraphInput, want: &str| {
            Error::bad_file(path, format!("input {i} has an unusable shape: the {want}"))
        };
        let (z_dim, noise_4d) = match noise.dims.as_slice() {
            [_, z] => (fixed(z), false),
            [_, z, a, b] if a == "1" && b == "1" => (fixed(z), true),
            _ => (None, false),
        };
        let z_dim = z_dim.ok_or_else(|| {
            shape_err(
                &noise,
                "noise must be (batch, Z) or (batch, Z, 1, 1) with a fixed Z",
            )
        })?;
        let fixed_batch = fixed(&noise.dims[0]);
        let condition = match &cond {
            None => None,
            Some(c) => {
                let kind = match (c.elem.as_str(), c.dims.as_slice()) {
                    ("float", [_, k]) => {
                        let k = fixed(k).ok_or_else(|| {
                            shape_err(c, "condition vector must be (batch, K) with a fixed K")
                        })?;
                        if let Some(want) = num_conditions
                            && want != k
                        {
                            return Err(Error::bad_file(
                                path,
                                format!(
                                    "the condition input {c} takes K = {k} entries, the dataset \
                                     has {want} labels"
                                ),
                            ));
                        }
                        ConditionInput::Vector { k }
                    }
                    ("int64" | "int32", [_]) => ConditionInput::Index {
                        rank: 1,
                        int32: c.elem == "int32",
                    },
                    ("int64" | "int32", [_, one]) if one == "1" => ConditionInput::Index {
                        rank: 2,
                        int32: c.elem == "int32",
                    },
                    _ => {
                        return Err(shape_err(
                            c,
                            "condition must be float32 (batch, K) or an int64/int32 class index \
                             (batch,) or (batch, 1)",
                        ));
                    }
                };
                Some((c.name.clone(), kind))
            }
        };
        let num_conditions = match condition {
            None => 0,
            Some((_, ConditionInput::Vector { k })) => k,
            Some((ref n, ConditionInput::Index { .. })) => match num_conditions {
                Some(k) if k > 0 => k,
                _ => {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "the condition input `{n}` is a class index: the number of classes \
                             must come from the dataset"
                        ),
                    ));
                }
            },
        };
        let feature =
            feature_tensor(graph, &noise.name).unwrap_or_else(|| graph.output[0].name.clone());
        let mut model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(|e| tract_err(path, "reading the graph", format!("{e:#}")))?;
        // Inputs in our order (noise, condition), outputs: the images and the features.
        let mut ins = vec![noise.name.as_str()];
        if let Some((n, _)) = &condition {
            ins.push(n);
        }
        model
            .set_input_names(ins)
            .map_err(|e| tract_err(path, "selecting the inputs", format!("{e:#}")))?;
        let out = *model
            .output_outlets()
            .map_err(|e| tract_err(path, "the graph's outputs", format!("{e:#}")))?
            .first()
            .ok_or_else(|| Error::bad_file(path, "the graph has no output"))?;
        let feat = model.find_outlet_label(&feature).ok_or_else(|| {
            Error::bad_file(path, format!("no tensor `{feature}` for the features"))
        })?;
        model
            .select_output_outlets(&[out, feat])
            .map_err(|e| tract_err(path, "selecting the outputs", format!("{e:#}")))?;
        let typed = model.into_optimized().map_err(|e| {
            tract_err(
                path,
                "preparing the graph (shapes or types)",
                format!("{e:#}"),
            )
        })?;
        let plan = typed
            .into_runnable()
            .map_err(|e| tract_err(path, "preparing the graph", format!("{e:#}")))?;
        let mut g = Self {
            path: path.to_path_buf(),
            noise: noise.name,
            z_dim,
            noise_4d,
            condition,
            num_conditions,
            fixed_batch,
            image_shape: (0, 0, 0),
            feature_tensor: feature,
            feature_dim: 0,
            plan,
        };
        // One probe batch settles the image and feature shapes.
        let n = 2;
        let z = vec![0.1f32; n * z_dim];
        let mut c = vec![0f32; n * num_conditions];
        if num_conditions > 0 {
            c[0] = 1.0;
            c[num_conditions + num_conditions - 1] = 1.0;
        }
        let RunOut {
            images: img,
            shape,
            features: feats,
            feature_dim: fdim,
        } = g.run(&z, &c, n)?;
        if shape.len() != 4 || shape[0] != n {
            return Err(Error::bad_file(
                path,
                format!(
                    "the first output has shape {shape:?} for a batch of {n}: a generator \
                     gives images (batch, C, H, W)"
                ),
            ));
        }
        g.image_shape = (shape[1], shape[2], shape[3]);
        g.feature_dim = fdim;
        if img.iter().chain(&feats).any(|v| !v.is_finite()) {
            return Err(Error::bad_file(
                path,
                "the graph's output is not finite (NaN or infinite) for a plain input",
            ));
        }
        Ok(g)
    }

    /// Run one batch: z (n x Z), c (n x K) row-major -> (images, their shape, features
    /// flattened per sample, feature width).
    fn run(&self, z: &[f32], c: &[f32], n: usize) -> Result<RunOut> {
        match self.fixed_batch {
            Some(b) if b != n => {
                // Chunks of the exported batch size, the last one padded with zeros.
                let (zd, k) = (self.z_dim, self.num_conditions);
                let (mut img, mut feats) = (Vec::new(), Vec::new());
                let (mut shape, mut fdim) = (vec![], 0);
                for start in (0..n).step_by(b) {
                    let m = b.min(n - start);
                    let mut zc = z[start * zd..(start + m) * zd].to_vec();
                    zc.resize(b * zd, 0.0);
                    let mut cc = c[start * k..(start + m) * k].to_vec();
                    cc.resize(b * k, 0.0);
                    let RunOut {
                        images: i,
                        shape: s,
                        features: f,
                        feature_dim: d,
                    } = self.run_exact(&zc, &cc, b)?;
                    let per = i.len() / b.max(1);
                    img.extend_from_slice(&i[..m * per]);
                    feats.extend_from_slice(&f[..m * d]);
                    shape = s;
                    fdim = d;
                }
                if let Some(s0) = shape.first_mut() {
                    *s0 = n;
                }
                Ok(RunOut {
                    images: img,
                    shape,
                    features: feats,
                    feature_dim: fdim,
                })
            }
            _ => self.run_exact(z, c, n),
        }
    }

    fn run_exact(&self, z: &[f32], c: &[f32], n: usize) -> Result<RunOut> {
        let p = &self.path;
        let terr = |e: TractError| tract_err(p, "running the graph", format!("{e:#}"));
        let zshape: Vec<usize> = if self.noise_4d {
            vec![n, self.z_dim, 1, 1]
        } else {
            vec![n, self.z_dim]
        };
        let mut inputs: TVec<TValue> =
            tvec![Tensor::from_shape(&zshape, z).map_err(terr)?.into_tvalue()];
        match self.condition {
            None => {}
            Some((_, ConditionInput::Vector { k })) => {
                inputs.push(Tensor::from_shape(&[n, k], c).map_err(terr)?.into_tvalue());
            }
            Some((_, ConditionInput::Index { rank, int32 })) => {
                let k = self.num_conditions;
                let idx: Vec<i64> = (0..n)
                    .map(|i| {
                        let row = &c[i * k..(i + 1) * k];
                        let mut best = 0;
                        for (j, v) in row.iter().enumerate() {
                            if *v > row[best] {
                                best = j;
                            }
                        }
                        best as i64
                    })
                    .collect();
                let shape: Vec<usize> = if rank == 1 { vec![n] } else { vec![n, 1] };
                let t = if int32 {
                    let v: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
                    Tensor::from_shape(&shape, &v)
                } else {
                    Tensor::from_shape(&shape, &idx)
                };
                inputs.push(t.map_err(terr)?.into_tvalue());
            }
        }
        let out = self.plan.run(inputs).map_err(terr)?;
        let read = |t: &Tensor| -> Result<Vec<f32>> {
            let t = t.cast_to::<f32>().map_err(terr)?;
            Ok(t.to_plain_array_view::<f32>()
                .map_err(terr)?
                .iter()
                .copied()
                .collect())
        };
        let img = read(&out[0])?;
        let shape = out[0].shape().to_vec();
        let feats = read(&out[1])?;
        let fdim = feats.len() / n.max(1);
        Ok(RunOut {
            images: img,
            shape,
            features: feats,
            feature_dim: fdim,
        })
    }

    /// z (n x Z), c (n x K), row-major -> images (n x C x H x W) row-major.
    pub fn generate(&self, z: &[f32], c: &[f32], n: usize) -> Result<Vec<f32>> {
        let RunOut {
            images: img, shape, ..
        } = self.run(z, c, n)?;
        let (ch, h, w) = self.image_shape;
        if shape != [n, ch, h, w] {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "images of shape {shape:?} for a batch of {n} (first run gave {ch}x{h}x{w})"
                ),
            ));
        }
        Ok(img)
    }

    /// The features of [`OnnxGenerator::feature_tensor`], n x F row-major.
    pub fn first_features(&self, z: &[f32], c: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(self.run(z, c, n)?.features)
    }
}
