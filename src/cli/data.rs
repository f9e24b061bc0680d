//! `ganscope data iclevr`: synthetic i-CLEVR renders.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Subcommand;

use ganscope::data;
use ganscope::export::sheet::save_png;

#[derive(Subcommand)]
pub(crate) enum DataCommand {
    /// Render a synthetic i-CLEVR folder (PNGs + train.json + objects.json).
    Iclevr(IclevrArgs),
}

#[derive(clap::Args)]
pub(crate) struct IclevrArgs {
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Number of scenes; each gives three images (_0, _1, _2 with 1, 2, 3 objects).
    #[arg(long, default_value_t = data::SYNTHETIC_SCENES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub(crate) n_scenes: usize,
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..=512))]
    pub(crate) size: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Render exactly the label sets of this train.json (e.g. the real one) instead of sampling.
    #[arg(long)]
    pub(crate) train_json: Option<PathBuf>,
    /// Also write a captioned contact sheet of the first 24 images (8 scenes x 3 steps).
    #[arg(long)]
    pub(crate) sheet: Option<PathBuf>,
}

pub(crate) fn render_iclevr(a: IclevrArgs) -> Result<()> {
    use ganscope::data::{iclevr, render};
    let labels = match &a.train_json {
        Some(p) => Some(iclevr::read_train_labels(
            p,
            &iclevr::default_object_names(),
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let n = render::write_iclevr_folder(&a.out, a.n_scenes, a.size, a.seed, labels.as_deref())?;
    let s = t0.elapsed().as_secs_f64();
    println!(
        "wrote {n} images ({}x{}) to {} in {s:.1} s ({:.0} images/s, rendering and PNG encoding)",
        a.size,
        a.size,
        a.out.display(),
        n as f64 / s
    );
    if let Some(p) = &a.sheet {
        use ganscope::data::Dataset;
        let ds = render::synthetic_dataset(8, a.size, a.seed, labels.as_deref());
        let n = ds.len().min(24);
        let idx: Vec<usize> = (0..n).collect();
        let (x, _) = ds.batch(&idx, &Device::Cpu)?;
        let imgs = ganscope::images::Images::from_tensor(&x)?;
        // One row per scene (its three steps), captioned with the full scene's objects.
        let rows = n / 3;
        let layout = ganscope::export::sheet::SheetLayout {
            rows,
            cols: 3,
            scale: 2,
            row_captions: (0..rows)
                .map(|r| ganscope::train::run::caption(&ds.condition(r * 3 + 2), ds.label_names()))
                .collect(),
            col_captions: vec!["_0".into(), "_1".into(), "_2".into()],
            title: Some(format!("synthetic i-CLEVR, seed {}", a.seed)),
            ..Default::default()
        };
        save_png(&ganscope::export::sheet::sample_sheet(&imgs, &layout)?, p)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
