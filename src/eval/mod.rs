//! Scoring generators: the evaluator classifier and the metrics computed from it.

pub mod classifier;
pub mod fid;
pub mod frechet;
pub mod metrics;
pub mod sequential;
pub mod torch_resnet;
pub mod torch_state;
