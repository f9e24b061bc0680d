//! `ganscope fid DIR_A DIR_B`: pytorch-fid's FID (`python -m pytorch_fid DIR_A DIR_B`) with
//! the user's Inception weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;

use ganscope::eval::fid::{self, FidInception};
use ganscope::eval::frechet;

use super::*;

#[derive(clap::Args)]
pub(crate) struct FidArgs {
    /// Two folders of PNG images (pytorch-fid's file types, not recursive).
    #[arg(num_args = 2, required = true)]
    pub(crate) dirs: Vec<PathBuf>,
    /// pytorch-fid's weights, pt_inception-2015-12-05-6726825d.pth (not shipped with
    /// ganscope: pytorch-fid downloads it from its GitHub release on first use).
    #[arg(long, value_name = "FILE")]
    pub(crate) fid_weights: PathBuf,
    /// Images per forward pass (pytorch-fid's --batch-size).
    #[arg(long, default_value_t = 50, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub(crate) batch: usize,
    /// Feature dimensions, i.e. which block (pytorch-fid's --dims: 64, 192, 768, 2048).
    #[arg(long, default_value_t = 2048)]
    pub(crate) dims: usize,
    /// Also print KID (torch-fidelity's subsets of 1000, at most the smaller folder's size).
    #[arg(long)]
    pub(crate) kid: bool,
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

/// Load pytorch-fid's Inception from `path`, with the file named in errors.
pub(crate) fn load_fid_inception(path: &Path, dev: &Device) -> Result<FidInception> {
    FidInception::load(path, dev).with_context(|| {
        format!(
            "loading pytorch-fid's Inception weights from {} (pt_inception-2015-12-05-6726825d.pth; not shipped, see {})",
            path.display(),
            fid::FID_WEIGHTS_URL
        )
    })
}

pub(crate) fn fid(a: FidArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let block = FidInception::block_of_dims(a.dims)?;
    let lists = a
        .dirs
        .iter()
        .map(|d| fid::list_images(d).with_context(|| format!("listing {}", d.display())))
        .collect::<Result<Vec<_>>>()?;
    let net = load_fid_inception(&a.fid_weights, &dev)?;
    let mut feats = Vec::new();
    for (dir, files) in a.dirs.iter().zip(&lists) {
        let t = Instant::now();
        let bar = indicatif::ProgressBar::new(files.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(dir.display().to_string());
        let f = fid::file_features(&net, files, block, a.batch, &dev, |n| {
            bar.set_position(n as u64)
        })
        .with_context(|| format!("Inception features of {}", dir.display()))?;
        bar.finish_and_clear();
        eprintln!(
            "{}: {} images, {:.1} s",
            dir.display(),
            files.len(),
            t.elapsed().as_secs_f64()
        );
        feats.push(f);
    }
    let fd = frechet::frechet_distance(&feats[0], &feats[1])?;
    println!("FID:  {fd}");
    if a.kid {
        let (m, sd) = frechet::kid(
            &feats[0],
            &feats[1],
            frechet::KID_SUBSETS,
            frechet::KID_SUBSET_SIZE,
            1,
        )?;
        println!("KID:  {m} +- {sd}");
    }
    Ok(())
}
