//! The headless subcommands, one file each; `main.rs` only parses and dispatches.

mod bench;
mod common;
mod conditions;
mod data;
mod eval;
mod evaluator;
mod fid;
mod fuzz;
mod import;
mod metrics;
mod sample;
mod ship;
mod train;

pub(crate) use bench::*;
pub(crate) use common::*;
pub(crate) use conditions::*;
pub(crate) use data::*;
pub(crate) use eval::*;
pub(crate) use evaluator::*;
pub(crate) use fid::*;
pub(crate) use fuzz::*;
pub(crate) use import::*;
pub(crate) use metrics::*;
pub(crate) use sample::*;
pub(crate) use ship::*;
pub(crate) use train::*;
