//! Optimisers: [`adam::Adam`], whose moment estimates are plain tensors saved with a run's
//! checkpoints. Below [`crate::model`], above [`crate::nn`] (it updates any set of
//! parameters, the GAN's and the evaluator's alike).

pub mod adam;
