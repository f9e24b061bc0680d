//! Exponential moving average of the generator's weights (Yazıcı et al., "The Unusual
//! Effectiveness of Averaging in GAN Training", ICLR 2019; Karras et al. 2018 sample from
//! such a copy). After every generator step, `ema <- decay * ema + (1 - decay) * g` for
//! weights and BatchNorm running statistics alike; spectral-norm vectors are copied.
//!
//! The averaged generator is the one that is sampled (wall, sheets, diagnostics) and saved
//! as `generator.safetensors`; the trained weights travel in `optimizer.safetensors` under
//! the prefix [`RAW_PREFIX`].

pub use crate::config::EmaConfig;
use crate::error::Result;
use crate::params::ParamStore;

/// Prefix of the trained (not averaged) generator tensors in the optimizer file.
pub const RAW_PREFIX: &str = "raw.";

impl EmaConfig {
    pub fn is_on(&self) -> bool {
        self.decay > 0.0
    }

    /// The decay used after generator step `step` (1-based): 0 (a copy) until `start`,
    /// then `min(decay, (1 + n) / (10 + n))` for the n-th step after it, so the average
    /// does not lag thousands of steps behind early in a run (the warm-up of TensorFlow's
    /// `ExponentialMovingAverage` with `num_updates`).
    pub fn decay_at(&self, step: u64) -> f64 {
        if step <= self.start {
            return 0.0;
        }
        let n = (step - self.start) as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }
}

/// `ema <- decay * ema + (1 - decay) * src` over weights and buffers; state copied.
/// Both stores must hold the same names and shapes (two builds of one config).
pub fn update(ema: &ParamStore, src: &ParamStore, decay: f64) -> Result<()> {
    for (name, t) in src.model_tensors() {
        if let Some(v) = ema.get(&name) {
            let new = if decay == 0.0 {
                t.copy()?
            } else {
                (v.as_tensor().affine(decay, 0.0)? + t.affine(1.0 - decay, 0.0)?)?
            };
            v.set(&new)?;
        }
    }
    for (name, t) in src.state_tensors() {
        if let Some(v) = ema.get(&name) {
            v.set(&t.copy()?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Init;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    fn store(v: f64) -> ParamStore {
        let s = ParamStore::new(Rng::new(0), DType::F64, &Device::Cpu);
        let vb = s.root("gen");
        vb.param("w", &[2], Init::Const(v)).unwrap();
        vb.buffer("mean", &[1], Init::Const(v)).unwrap();
        vb.state("u", &[1], Init::Const(v)).unwrap();
        s
    }

    fn val(s: &ParamStore, name: &str) -> Vec<f64> {
        s.get(name).unwrap().as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn average_by_hand() {
        // ema = 0, g = 1 then 3, decay 0.9: 0.1 after one update, 0.9*0.1 + 0.1*3 = 0.39.
        let ema = store(0.0);
        let g = store(1.0);
        update(&ema, &g, 0.9).unwrap();
        assert!((val(&ema, "gen.w")[0] - 0.1).abs() < 1e-12);
        assert!((val(&ema, "gen.mean")[0] - 0.1).abs() < 1e-12);
        // State (spectral-norm vectors) is copied, not averaged.
        assert_eq!(val(&ema, "gen.u"), vec![1.0]);
        let g3 = store(3.0);
        update(&ema, &g3, 0.9).unwrap();
        assert!((val(&ema, "gen.w")[1] - 0.39).abs() < 1e-12);
        // Decay 0 copies; the source is never changed.
        update(&ema, &g3, 0.0).unwrap();
        assert_eq!(val(&ema, "gen.w"), vec![3.0, 3.0]);
        assert_eq!(val(&g3, "gen.w"), vec![3.0, 3.0]);
    }

    #[test]
    fn decay_schedule() {
        let c = EmaConfig {
            decay: 0.99,
            start: 10,
        };
        assert!(c.is_on());
        assert_eq!(c.decay_at(10), 0.0);
        // n = 1: 2 / 11; n = 90: 91 / 100; from n = 890 on: 0.99.
        assert!((c.decay_at(11) - 2.0 / 11.0).abs() < 1e-12);
        assert!((c.decay_at(100) - 0.91).abs() < 1e-12);
        assert_eq!(c.decay_at(10_000), 0.99);
        assert!(!EmaConfig::default().is_on());
    }
}
