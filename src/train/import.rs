//! `ganscope import`: a PyTorch generator exported to ONNX becomes a run folder
//! (`config.json` with `arch: onnx`, and `generator.onnx`) that `sample`, `eval`, the
//! diagnostics and the explorer open like any other; training it is refused with a reason.
//!
//! The graph is checked first ([`crate::model::onnx`]); Z, K and the image shape come from it,
//! the label names and condition kind from the dataset the generator was trained on.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::config::{
    Arch, ConditionKind, Conditioning, DataConfig, DataKind, ModelConfig, OnnxInputs, TrainConfig,
};
use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::model::onnx::{InputNames, ONNX_FILE, OnnxGenerator};
use crate::rng::Rng;

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    /// The exported graph.
    pub onnx: PathBuf,
    /// The dataset the generator was trained on (label names, condition kind, real images
    /// for `eval` and the diagnostics).
    pub data: DataConfig,
    /// Input names (`None`: recognised by the usual names).
    pub names: InputNames,
    /// The run folder to write.
    pub out: PathBuf,
}

/// What the import found, for the user.
#[derive(Debug, Clone)]
pub struct Imported {
    pub cfg: TrainConfig,
    pub feature_tensor: String,
    pub feature_dim: usize,
    pub fixed_batch: Option<usize>,
    /// Smallest and largest pixel over a check batch.
    pub range: (f32, f32),
}

/// Label names and condition kind of a dataset kind, without reading its images where the
/// kind fixes them (MNIST, Fashion-MNIST, CIFAR-10, i-CLEVR's 24 objects or the folder's
/// `objects.json`); other kinds are opened.
fn labels_of(data: &DataConfig) -> Result<(Vec<String>, ConditionKind, usize)> {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Ok(match data.kind {
        DataKind::Mnist => (
            names(data::idx::MnistVariant::Mnist.class_names()),
            ConditionKind::OneHot,
            1,
        ),
        DataKind::FashionMnist => (
            names(data::idx::MnistVariant::FashionMnist.class_names()),
            ConditionKind::OneHot,
            1,
        ),
        DataKind::Cifar10 => (names(&data::cifar::CLASS_NAMES), ConditionKind::OneHot, 3),
        DataKind::Iclevr => {
            let objects = data.path.as_deref().map(|p| p.join("objects.json"));
            let n = match objects {
                Some(o) if o.is_file() => data::iclevr::read_objects(&o)?,
                _ => data::iclevr::default_object_names(),
            };
            (n, ConditionKind::MultiHot, 3)
        }
        DataKind::ClassFolder | DataKind::Attributes => {
            let ds = data::open(data, 32)?;
            (
                ds.label_names().to_vec(),
                ds.condition_kind(),
                ds.image_shape().0,
            )
        }
    })
}

/// A run-folder name from the graph's file name (letters, digits, '-', '_', '.').
fn preset_name(onnx: &Path) -> String {
    let stem = onnx
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        "onnx-import".into()
    } else {
        clean
    }
}

/// Check the graph, write `spec.out/config.json` and `spec.out/generator.onnx`.
pub fn import_onnx(spec: &ImportSpec) -> Result<Imported> {
    let (label_names, kind, data_channels) = labels_of(&spec.data)?;
    let bytes = checkpoint::read_regular(&spec.onnx).map_err(|e| Error::io(&spec.onnx, e))?;
    let g = OnnxGenerator::from_bytes(&spec.onnx, &bytes, &spec.names, Some(label_names.len()))?;
    let bad = |msg: String| Error::bad_file(&spec.onnx, msg);
    let (ch, h, w) = g.image_shape;
    if h != w || ![28, 32, 64].contains(&h) || ![1, 3].contains(&ch) {
        return Err(bad(format!(
            "the generator draws {ch}x{h}x{w} images; ganscope takes square 28, 32 or 64 \
             pixel images with 1 or 3 channels"
        )));
    }
    if ch != data_channels {
        return Err(bad(format!(
            "the generator draws {ch}-channel images, the {} dataset has {data_channels}",
            spec.data.kind.name()
        )));
    }
    let k = g.num_conditions;
    // A check batch: 8 standard-normal latents, conditions cycling through the labels.
    let n = 8;
    let mut rng = Rng::stream(0, "import-check");
    let z: Vec<f32> = rng
        .normal_vec(n * g.z_dim)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let mut c = vec![0f32; n * k];
    if k > 0 {
        for (i, row) in c.chunks_mut(k).enumerate() {
            row[i % k] = 1.0;
        }
    }
    let img = g.generate(&z, &c, n)?;
    let (lo, hi) = img
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(bad("the images are not finite (NaN or infinite)".into()));
    }
    if lo < -1.001 || hi > 1.001 {
        return Err(bad(format!(
            "the images span [{lo:.3}, {hi:.3}]; ganscope expects [-1, 1] (a generator ending \
             in Tanh)"
        )));
    }
    let conditional = k > 0;
    let model = ModelConfig {
        arch: Arch::Onnx,
        image_size: h,
        channels: ch,
        num_conditions: k,
        condition_kind: if conditional {
            kind
        } else {
            ConditionKind::None
        },
        label_names: if conditional { label_names } else { vec![] },
        conditioning: if conditional {
            Conditioning::Concat
        } else {
            Conditioning::None
        },
        z_dim: g.z_dim,
        onnx: Some(OnnxInputs {
            noise: g.noise.clone(),
            condition: g.condition.as_ref().map(|(n, _)| n.clone()),
        }),
        ..ModelConfig::default()
    };
    let cfg = TrainConfig {
        preset: preset_name(&spec.onnx),
        data: spec.data.clone(),
        model,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    write_folder(&spec.out, &cfg, &bytes)?;
    Ok(Imported {
        feature_tensor: g.feature_tensor.clone(),
        feature_dim: g.feature_dim,
        fixed_batch: g.fixed_batch,
        range: (lo, hi),
        cfg,
    })
}

/// Write the folder. A folder that holds a ganscope run (checkpoints or a config of another
/// arch) is refused; an earlier import there is replaced.
fn write_folder(out: &Path, cfg: &TrainConfig, bytes: &[u8]) -> Result<()> {
    let config = out.join(checkpoint::CONFIG_FILE);
    if config.exists() {
        let earlier = crate::train::read_config(out).ok();
        if earlier.is_none_or(|c| c.model.arch != Arch::Onnx) {
            return Err(Error::bad_file(
                &config,
                "this folder holds a run already; import into a new folder",
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    checkpoint::write_atomic(&out.join(ONNX_FILE), bytes)?;
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    checkpoint::write_atomic(&config, &json)
}
