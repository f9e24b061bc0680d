//! `ganscope import`: a PyTorch generator exported to ONNX becomes a run folder that
//! `sample`, `eval` and the explorer open.

use std::path::PathBuf;

use anyhow::{Context, Result};

use ganscope::config::{DataConfig, DataKind};
use ganscope::model::onnx::InputNames;
use ganscope::train::import::{ImportSpec, import_onnx};

#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// The generator exported with torch.onnx.export (inputs named e.g. "noise", "labels").
    #[arg(long)]
    pub(crate) onnx: PathBuf,
    /// The dataset it was trained on: label names, condition kind and the real images that
    /// `eval` and the diagnostics compare with (iclevr, mnist, fashion-mnist, cifar10,
    /// class-folder, attributes).
    #[arg(long, value_parser = parse_kind)]
    pub(crate) dataset: DataKind,
    /// Where that dataset lives (default: the usual places; i-CLEVR: the built-in renderer).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// The noise input's name (default: the only input, or one named noise / z / latent).
    #[arg(long)]
    pub(crate) noise_input: Option<String>,
    /// The condition input's name (default: the other input).
    #[arg(long)]
    pub(crate) condition_input: Option<String>,
    /// The run folder to write (config.json + generator.onnx).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

fn parse_kind(s: &str) -> std::result::Result<DataKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
        "one of iclevr, mnist, fashion-mnist, cifar10, class-folder, attributes".to_string()
    })
}

pub(crate) fn import(a: ImportArgs) -> Result<()> {
    let spec = ImportSpec {
        onnx: a.onnx.clone(),
        data: DataConfig {
            kind: a.dataset,
            path: a.data.clone(),
            ..DataConfig::default()
        },
        names: InputNames {
            noise: a.noise_input.clone(),
            condition: a.condition_input.clone(),
        },
        out: a.out.clone(),
    };
    let r = import_onnx(&spec).with_context(|| format!("importing {}", a.onnx.display()))?;
    let m = &r.cfg.model;
    let inputs = m.onnx.as_ref().context("import wrote no input names")?;
    eprintln!(
        "imported {} -> {}: noise `{}` (Z = {}){}, images {}x{}x{} in [{:.3}, {:.3}]{}; \
         principal directions read `{}` ({} features)",
        a.onnx.display(),
        a.out.display(),
        inputs.noise,
        m.z_dim,
        match &inputs.condition {
            Some(c) => format!(
                ", condition `{c}` (K = {}, {:?})",
                m.num_conditions, m.condition_kind
            ),
            None => ", unconditional".into(),
        },
        m.channels,
        m.image_size,
        m.image_size,
        r.range.0,
        r.range.1,
        match r.fixed_batch {
            Some(b) => format!(", exported with a fixed batch of {b} (run in chunks)"),
            None => String::new(),
        },
        r.feature_tensor,
        r.feature_dim,
    );
    eprintln!(
        "next: ganscope sample --run {0} --out sheet.png; ganscope eval --run {0}; \
         ganscope --open {0}",
        a.out.display()
    );
    Ok(())
}
