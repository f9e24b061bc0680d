//! ganscope: a conditional-GAN engine (models, losses, trainer, checkpoints, data) built on
//! candle, shared by the desktop explorer and the headless CLI.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod export;
pub mod images;

pub use error::{Error, Result};
pub mod config;
pub mod diagnostics;
pub mod eval;
pub mod grad;
pub mod model;
pub mod params;
pub mod rng;
pub mod train;
