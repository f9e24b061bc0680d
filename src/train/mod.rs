//! The training engine: one [`Trainer`] owns G, D, their optimizers, the data stream and the
//! random state, and advances them step by step. Everything it does is determined by the
//! config's seed, and everything it holds is saved in a checkpoint, so that a resumed run
//! continues bit for bit.

pub mod augment;
pub mod ema;
pub mod fid;
pub mod import;
pub mod loss;
pub mod monitor;
pub mod run;
pub mod standing;
pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint;
use crate::config::{Arch, Conditioning, LossKind, TrainConfig};
use crate::data::{Dataset, SceneStep};
pub use crate::diagnostics::StepStats;
use crate::error::{Error, Result};
use crate::eval::metrics;
use crate::grad::GradMode;
use crate::model::{Discriminator, Generator};
use crate::nn::Pass;
use crate::optim::adam::Adam;
use crate::rng::Rng;

/// What one generator update reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GStats {
    pub loss: f64,
    /// The auxiliary loss on G's batch.
    pub aux: Option<f64>,
    /// D's top-k hit rate on G's batch ([`StepStats::aux_acc_fake`]).
    pub aux_acc: Option<f64>,
    /// Global L2 norm of G's gradient before the optimiser step.
    pub grad_norm: f64,
}

/// Which networks a single step updates (the explorer's "step D / step G / step both").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    DOnly,
    GOnly,
    Both,
}

/// Walks the dataset in epochs, each in an order drawn from (seed, epoch).
#[derive(Debug, Clone)]
struct Sampler {
    seed: u64,
    n: usize,
    epoch: u64,
    cursor: usize,
    perm: Vec<usize>,
}

impl Sampler {
    fn new(seed: u64, n: usize) -> Self {
        let mut s = Self {
            seed,
            n,
            epoch: 0,
            cursor: 0,
            perm: vec![],
        };
        s.reshuffle();
        s
    }

    fn reshuffle(&mut self) {
        self.perm = (0..self.n).collect();
        Rng::stream(
            self.seed.wrapping_add(self.epoch.wrapping_mul(0x9E37_79B9)),
            "shuffle",
        )
        .shuffle(&mut self.perm);
    }

    /// The next `b` indices; a last partial batch of an epoch is skipped.
    fn next(&mut self, b: usize) -> Vec<usize> {
        if self.cursor + b > self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.reshuffle();
        }
        let out = self.perm[self.cursor..self.cursor + b].to_vec();
        self.cursor += b;
        out
    }
}

pub struct Trainer {
    pub cfg: TrainConfig,
    /// The generator being trained.
    pub generator: Generator,
    /// Its moving average when `cfg.ema` is on ([`Trainer::sampling_generator`]).
    pub ema: Option<Generator>,
    pub discriminator: Discriminator,
    opt_g: Adam,
    opt_d: Adam,
    /// Noise, condition sampling and GP interpolation weights.
    rng: Rng,
    sampler: Sampler,
    /// Generator steps taken.
    pub step: u64,
    /// What the last checkpoint load skipped and why (a corrupt newest file, a newer
    /// incomplete save): empty normally; front ends show it.
    pub load_notes: Vec<String>,
    data: Arc<dyn Dataset>,
    /// The images a step samples from: all of them, or for a sequential model those with a
    /// scene step (a first object, or an addition whose previous image is in the data).
    usable: Vec<usize>,
    device: Device,
    dtype: DType,
}

/// A batch of scene steps for a sequential model ([`crate::model::sequential`]).
struct StepBatch {
    /// The previous images, (B, C, H, W): real for later steps, zeros where `first`.
    prev: Tensor,
    /// Rows whose previous image is the empty floor (G's own, filled in by the step).
    first: Vec<bool>,
    /// The real next images, (B, C, H, W).
    next: Tensor,
    /// The object added (one-hot), (B, K).
    added: Tensor,
    /// The labels after the step, (B, K).
    so_far: Tensor,
}

impl StepBatch {
    /// D's conditions for the pair: [added, so far], (B, 2K).
    fn pair_conditions(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.added, &self.so_far], 1)?)
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trainer({} at step {})", self.cfg.preset, self.step)
    }
}

/// Bit-cast u64 values into an i64 tensor (safetensors has no u64 in candle).
fn u64_tensor(v: &[u64], dev: &Device) -> Result<Tensor> {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Ok(Tensor::new(v.as_slice(), dev)?)
}

fn tensor_u64(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|x| x as u64)
        .collect())
}

impl Trainer {
    /// A fresh run: networks initialised from the config's seed.
    pub fn new(cfg: TrainConfig, data: Arc<dyn Dataset>, device: &Device) -> Result<Self> {
        Self::with_dtype(cfg, data, device, DType::F32)
    }

    /// As [`Trainer::new`] with a chosen float type (tests use f64).
    pub fn with_dtype(
        mut cfg: TrainConfig,
        data: Arc<dyn Dataset>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        crate::grad::check_exact_second_order()?;
        cfg.validate()?;
        check_data(&cfg, data.as_ref())?;
        if cfg.model.num_conditions > 0 && cfg.model.label_names.is_empty() {
            cfg.model.label_names = data.label_names().to_vec();
        }
        let m = &cfg.model;
        let mut generator = Generator::new(m, Rng::stream(cfg.seed, "init.gen"), dtype, device)?;
        // Training draws its own N(0, I) latents; the truncation is for the samples (wall,
        // sheets) drawn through `Generator::latent`.
        generator.set_truncation(cfg.sampling.truncation)?;
        let discriminator =
            Discriminator::new(m, Rng::stream(cfg.seed, "init.disc"), dtype, device)?;
        let ema = if cfg.ema.is_on() {
            // The same stream: the average starts as an exact copy.
            let mut g = Generator::new(m, Rng::stream(cfg.seed, "init.gen"), dtype, device)?;
            g.set_truncation(cfg.sampling.truncation)?;
            Some(g)
        } else {
            None
        };
        if let Some(floor) = (m.arch == Arch::Sequential)
            .then(|| median_first_step(data.as_ref()))
            .flatten()
        {
            // The empty floor of a scene model: from the data, the same in G and its average.
            for g in std::iter::once(&generator).chain(&ema) {
                if let Some(net) = g.sequential() {
                    net.set_floor(&floor)?;
                }
            }
        }
        let o = &cfg.optim;
        let opt_g = Adam::new(generator.store.trainable(), o.lr_g, o.beta1, o.beta2, o.eps)?;
        let mut opt_d = Adam::new(
            discriminator.store.trainable(),
            o.lr_d,
            o.beta1,
            o.beta2,
            o.eps,
        )?;
        opt_d.set_lr_of(&is_aux_branch, o.lr_aux_branch);
        let usable: Vec<usize> = if cfg.model.arch == Arch::Sequential {
            (0..data.len())
                .filter(|&i| data.scene_step(i).is_some())
                .collect()
        } else {
            (0..data.len()).collect()
        };
        if usable.len() < cfg.batch_size {
            return Err(Error::Config(format!(
                "a sequential model trains on additions, and {} of the {} images is one (an \
                 i-CLEVR `<scene>_<k>.png` whose `_<k-1>` is in the data with one label fewer, \
                 or a `_0` with one label); that is fewer than one batch of {}",
                usable.len(),
                data.len(),
                cfg.batch_size
            )));
        }
        let sampler = Sampler::new(cfg.seed, usable.len());
        Ok(Self {
            rng: Rng::stream(cfg.seed, "train"),
            cfg,
            generator,
            ema,
            discriminator,
            opt_g,
            opt_d,
            sampler,
            step: 0,
            load_notes: Vec::new(),
            data,
            usable,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// About how many bytes one checkpoint set of this run takes on disk: G, D and the
    /// optimizer file (Adam's two moments per weight, and the trained G when the EMA copy is
    /// what `generator.safetensors` holds), 4 bytes a value.
    pub fn checkpoint_bytes(&self) -> u64 {
        let g = self.generator.store.num_params() as u64;
        let d = self.discriminator.store.num_params() as u64;
        let trained_g = if self.ema.is_some() { g } else { 0 };
        4 * (3 * (g + d) + trained_g)
    }

    /// Sample (wall, sheets, `sampling_generator().latent`) with the truncation trick at `t`
    /// (`None` = off); kept in `cfg.sampling`, so the next config.json records it. Training
    /// latents are not affected.
    pub fn set_sampling_truncation(&mut self, t: Option<f64>) -> Result<()> {
        self.generator.set_truncation(t)?;
        if let Some(e) = &mut self.ema {
            e.set_truncation(t)?;
        }
        self.cfg.sampling.truncation = t;
        Ok(())
    }

    /// The generator to sample from: the moving average when `cfg.ema` is on, else the
    /// trained one. This is what `generator.safetensors` holds.
    pub fn sampling_generator(&self) -> &Generator {
        self.ema.as_ref().unwrap_or(&self.generator)
    }

    /// D's view of a batch: augmented when `cfg.augment` is on.
    fn augment(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.augment.is_off() {
            return Ok(x.clone());
        }
        augment::augment(x, &self.cfg.augment, &mut self.rng)
    }

    pub fn data(&self) -> &Arc<dyn Dataset> {
        &self.data
    }

    /// Current (G, D) learning rates.
    pub fn learning_rates(&self) -> (f64, f64) {
        (self.opt_g.lr, self.opt_d.lr)
    }

    /// Change learning rates mid-run (kept in the config that the next checkpoint writes).
    pub fn set_learning_rates(&mut self, lr_g: f64, lr_d: f64) {
        self.cfg.optim.lr_g = lr_g;
        self.cfg.optim.lr_d = lr_d;
        self.opt_g.lr = lr_g;
        self.opt_d.lr = lr_d;
    }

    fn noise(&mut self, b: usize) -> Result<Tensor> {
        let z = self.rng.normal_vec(b * self.cfg.model.z_dim);
        Ok(Tensor::from_vec(z, (b, self.cfg.model.z_dim), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Conditions for a generator batch, drawn from the data's own label distribution.
    fn sample_conditions(&mut self, b: usize) -> Result<Tensor> {
        let k = self.cfg.model.num_conditions;
        if k == 0 {
            return Ok(Tensor::zeros((b, 0), self.dtype, &self.device)?);
        }
        let mut v = Vec::with_capacity(b * k);
        for _ in 0..b {
            let i = self.rng.below(self.data.len());
            v.extend(self.data.condition(i));
        }
        Ok(Tensor::from_vec(v, (b, k), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Scene steps `idx` (indices into the data, each with a scene step).
    fn step_batch(&self, idx: &[usize]) -> Result<StepBatch> {
        let (c, h, w) = self.data.image_shape();
        let k = self.cfg.model.num_conditions;
        let b = idx.len();
        let mut prev = Vec::with_capacity(b * c * h * w);
        let mut first = Vec::with_capacity(b);
        let mut added = Vec::with_capacity(b * k);
        for &i in idx {
            let now = self.data.condition(i);
            match self.data.scene_step(i) {
                Some(SceneStep::First) => {
                    prev.extend(std::iter::repeat_n(0f32, c * h * w));
                    first.push(true);
                    added.extend(now);
                }
                Some(SceneStep::After { previous }) => {
                    prev.extend(
                        self.data
                            .image_u8(previous)
                            .iter()
                            .map(|&v| crate::images::from_u8(v)),
                    );
                    first.push(false);
                    let before = self.data.condition(previous);
                    added.extend(now.iter().zip(&before).map(|(a, p)| a - p));
                }
                None => {
                    return Err(Error::Msg(format!(
                        "image {i} has no scene step (a sequential model trains on additions)"
                    )));
                }
            }
        }
        let (next, so_far) = self.data.batch(idx, &self.device)?;
        let dt = self.dtype;
        Ok(StepBatch {
            prev: Tensor::from_vec(prev, (b, c, h, w), &self.device)?.to_dtype(dt)?,
            first,
            next: next.to_dtype(dt)?,
            added: Tensor::from_vec(added, (b, k), &self.device)?.to_dtype(dt)?,
            so_far: so_far.to_dtype(dt)?,
        })
    }

    /// The sequential network of this run's G (an error for other families).
    fn seq_net(&self) -> Result<&crate::model::sequential::SequentialGenerator> {
        self.generator
            .sequential()
            .ok_or_else(|| Error::Msg("not a sequential generator".into()))
    }

    /// One D update for a sequential model: real pairs (previous, next) against (previous,
    /// G's next) with the same previous images and conditions [added, so far].
    fn d_step_sequential(&mut self) -> Result<StepStats> {
        let b = self.cfg.batch_size;
        let idx: Vec<usize> = self
            .sampler
            .next(b)
            .into_iter()
            .map(|i| self.usable[i])
            .collect();
        let sb = self.step_batch(&idx)?;
        let z = self.noise(b)?;
        let mode = GradMode::new();
        let pass = Pass::train().with_grad(&mode);
        let net = self.seq_net()?;
        let prev = net.with_floor(&sb.prev, &sb.first)?.detach();
        let fake = net
            .step(&prev, &z, &sb.added, &sb.so_far, None, pass)?
            .detach();
        let real = Tensor::cat(&[&prev, &sb.next], 1)?;
        let fake = Tensor::cat(&[&prev, &fake], 1)?;
        self.d_update(real, fake, sb.pair_conditions()?, mode)
    }

    fn real_batch(&mut self) -> Result<(Tensor, Tensor)> {
        let idx = self.sampler.next(self.cfg.batch_size);
        let (x, c) = self.data.batch(&idx, &self.device)?;
        let c = if self.cfg.model.num_conditions == 0 {
            Tensor::zeros((idx.len(), 0), self.dtype, &self.device)?
        } else {
            c.to_dtype(self.dtype)?
        };
        Ok((x.to_dtype(self.dtype)?, c))
    }

    /// One discriminator update on a fresh real batch and fakes for its conditions.
    pub fn d_step(&mut self) -> Result<StepStats> {
        if self.cfg.model.arch == Arch::Sequential {
            return self.d_step_sequential();
        }
        let b = self.cfg.batch_size;
        let (real, c) = self.real_batch()?;
        let z = self.noise(b)?;
        // This step's backward mode: the penalties' inner backward and the update's backward
        // set it around their own, and the passes' fused ops read it.
        let mode = GradMode::new();
        let pass = Pass::train().with_grad(&mode);
        let fake = self.generator.forward(&z, &c, pass)?.detach();
        self.d_update(real, fake, c, mode)
    }

    /// D's update on a real and a fake batch (images, or pairs for a sequential model) with
    /// the conditions D sees.
    fn d_update(
        &mut self,
        real: Tensor,
        fake: Tensor,
        c: Tensor,
        mode: GradMode,
    ) -> Result<StepStats> {
        let b = self.cfg.batch_size;
        let pass = Pass::train().with_grad(&mode);
        let (real_a, fake_a) = (self.augment(&real)?, self.augment(&fake)?);
        let out_r = self.discriminator.forward(&real_a, &c, pass)?;
        let out_f = if self.cfg.loss.aux_on_fakes {
            self.discriminator.forward(&fake_a, &c, pass)?
        } else {
            self.discriminator.forward_realness(&fake_a, &c, pass)?
        };
        let lk = self.cfg.loss.kind;
        let mut total = loss::d_loss(lk, &out_r.logits, &out_f.logits)?;
        let mut st = StepStats {
            step: self.step,
            d_real: out_r.logits.mean_all()?.to_dtype(DType::F64)?.to_scalar()?,
            d_fake: out_f.logits.mean_all()?.to_dtype(DType::F64)?.to_scalar()?,
            d_acc_real: frac_positive(&out_r.logits)?,
            d_acc_fake: 1.0 - frac_positive(&out_f.logits)?,
            ..Default::default()
        };
        if lk == LossKind::WganGp {
            let e: Vec<f64> = (0..b).map(|_| self.rng.uniform()).collect();
            let eps = Tensor::from_vec(e, (b, 1, 1, 1), &self.device)?.to_dtype(self.dtype)?;
            let disc = &self.discriminator;
            let gp = loss::gradient_penalty(&real, &fake, &eps, &mode, |x| {
                Ok(disc.forward_realness(x, &c, pass)?.logits)
            })?;
            st.gp = Some(scalar(&gp)?);
            total = (total + gp.affine(self.cfg.loss.gp_lambda, 0.0)?)?;
        }
        if self.cfg.loss.r1_gamma > 0.0 {
            let disc = &self.discriminator;
            let r1 = loss::r1_penalty(&real, &mode, |x| {
                Ok(disc.forward_realness(x, &c, pass)?.logits)
            })?;
            st.r1 = Some(scalar(&r1)?);
            total = (total + r1.affine(self.cfg.loss.r1_gamma / 2.0, 0.0)?)?;
        }
        if let Some(ar) = &out_r.aux {
            let ck = self.cfg.model.condition_kind;
            let mut aux = loss::aux_loss(ck, ar, &c)?;
            if let (true, Some(af)) = (self.cfg.loss.aux_on_fakes, &out_f.aux) {
                aux = (aux + loss::aux_loss(ck, af, &c)?)?;
            }
            st.aux_d = Some(scalar(&aux)?);
            st.aux_acc_real = aux_hit_rate(ar, &c)?;
            total = (total + aux.affine(self.cfg.loss.aux_weight, 0.0)?)?;
        }
        st.d_loss = scalar(&total)?;
        check_finite("D loss", st.d_loss, self.step)?;
        let grads = crate::grad::first_order_backward(&total, &mode)?;
        st.d_grad_norm = grad_norm(&grads, &self.discriminator.store.trainable())?;
        self.opt_d.step(&grads)?;
        if lk == LossKind::Wgan {
            let c = self.cfg.loss.clip;
            for (_, v) in self.discriminator.store.trainable() {
                v.set(&v.as_tensor().clamp(-c, c)?)?;
            }
        }
        Ok(st)
    }

    /// One generator update; returns its numbers.
    pub fn g_step(&mut self) -> Result<GStats> {
        let b = self.cfg.batch_size;
        let ms = self.cfg.loss.mode_seeking_at(self.step);
        let sequential = self.cfg.model.arch == Arch::Sequential;
        let mode = GradMode::new();
        let pass = Pass::train().with_grad(&mode);
        // Two halves with the same conditions under mode seeking (validate keeps the batch
        // even).
        let draw = if ms > 0.0 { b / 2 } else { b };
        let (z, c, fake, d_in) = if sequential {
            let mut idx: Vec<usize> = (0..draw)
                .map(|_| self.usable[self.rng.below(self.usable.len())])
                .collect();
            if ms > 0.0 {
                idx.extend_from_within(..);
            }
            let sb = self.step_batch(&idx)?;
            let z = self.noise(b)?;
            let net = self.seq_net()?;
            // The floor keeps its gradient: G learns it through its first steps.
            let prev = net.with_floor(&sb.prev, &sb.first)?;
            let fake = net.step(&prev, &z, &sb.added, &sb.so_far, None, pass)?;
            let pair = Tensor::cat(&[&prev, &fake], 1)?;
            (z, sb.pair_conditions()?, fake, pair)
        } else {
            let c = self.sample_conditions(draw)?;
            let c = if ms > 0.0 {
                Tensor::cat(&[&c, &c], 0)?
            } else {
                c
            };
            let z = self.noise(b)?;
            let fake = self.generator.forward(&z, &c, pass)?;
            (z, c, fake.clone(), fake)
        };
        let fake_a = self.augment(&d_in)?;
        // D's parameters as constants: their gradients are not needed here.
        let out = self.discriminator.forward(&fake_a, &c, pass.frozen())?;
        let mut total = loss::g_loss(self.cfg.loss.kind, &out.logits)?;
        if ms > 0.0 {
            let term = loss::mode_seeking(&fake, &z)?;
            total = (total + term.affine(ms, 0.0)?)?;
        }
        let (mut aux_v, mut aux_acc) = (None, None);
        if let Some(a) = &out.aux {
            let aux = loss::aux_loss(self.cfg.model.condition_kind, a, &c)?;
            aux_v = Some(scalar(&aux)?);
            aux_acc = aux_hit_rate(a, &c)?;
            total = (total + aux.affine(self.cfg.loss.aux_weight, 0.0)?)?;
        }
        let g = scalar(&total)?;
        check_finite("G loss", g, self.step)?;
        let grads = crate::grad::first_order_backward(&total, &mode)?;
        let norm = grad_norm(&grads, &self.generator.store.trainable())?;
        self.opt_g.step(&grads)?;
        if let Some(e) = &self.ema {
            let decay = self.cfg.ema.decay_at(self.step + 1);
            ema::update(&e.store, &self.generator.store, decay)?;
        }
        Ok(GStats {
            loss: g,
            aux: aux_v,
            aux_acc,
            grad_norm: norm,
        })
    }

    /// n_critic D updates then one G update; advances the step counter.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.step_kind(StepKind::Both)
    }

    /// A single step of the chosen kind. D-only steps do not advance the G step counter.
    /// Runs on a rayon worker ([`crate::on_pool_worker`]).
    pub fn step_kind(&mut self, kind: StepKind) -> Result<StepStats> {
        crate::on_pool_worker(|| self.step_kind_here(kind))
    }

    fn step_kind_here(&mut self, kind: StepKind) -> Result<StepStats> {
        let mut st = StepStats {
            step: self.step,
            ..Default::default()
        };
        if kind != StepKind::GOnly {
            let n = if kind == StepKind::Both {
                self.cfg.loss.n_critic
            } else {
                1
            };
            for _ in 0..n {
                st = self.d_step()?;
            }
        }
        if kind != StepKind::DOnly {
            let g = self.g_step()?;
            st.g_loss = g.loss;
            st.aux_g = g.aux;
            st.aux_acc_fake = g.aux_acc;
            st.g_grad_norm = g.grad_norm;
            self.step += 1;
        }
        st.step = self.step;
        Ok(st)
    }

    /// Everything besides the network weights that a resume needs.
    fn optimizer_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = self.opt_g.state("opt_g")?;
        t.extend(self.opt_d.state("opt_d")?);
        t.extend(self.generator.store.state_tensors());
        t.extend(self.discriminator.store.state_tensors());
        if self.ema.is_some() {
            for (k, v) in self.generator.store.model_tensors() {
                t.insert(format!("{}{k}", ema::RAW_PREFIX), v);
            }
        }
        let dev = &Device::Cpu;
        t.insert("trainer.step".into(), u64_tensor(&[self.step], dev)?);
        t.insert("trainer.rng".into(), u64_tensor(&self.rng.state(), dev)?);
        t.insert(
            "trainer.sampler".into(),
            u64_tensor(
                &[
                    self.sampler.epoch,
                    self.sampler.cursor as u64,
                    self.sampler.n as u64,
                ],
                dev,
            )?,
        );
        Ok(t)
    }

    /// Write `config.json` and a crash-safe checkpoint of the current state into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        checkpoint::write_atomic(&dir.join("config.json"), &self.config_json()?)?;
        let g = self.sampling_generator().store.model_tensors();
        let d = self.discriminator.store.model_tensors();
        let o = self.optimizer_tensors()?;
        checkpoint::save(dir, self.step, [&g, &d, &o])
    }

    /// The run's config as `config.json` bytes. A config that would not read back (a NaN
    /// written as `null`) is an error, never written.
    fn config_json(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec_pretty(&self.cfg).map_err(|e| Error::Msg(e.to_string()))?;
        let back: TrainConfig = serde_json::from_slice(&json).map_err(|e| {
            Error::Config(format!(
                "the run's config would not read back from config.json: {e}"
            ))
        })?;
        back.validate()?;
        Ok(json)
    }

    /// Write G's (sampling) and D's weights of this step to `dir` as a weights-only folder
    /// with `config.json` ([`checkpoint::save_weights`], what `ganscope ship` writes): the
    /// kept steps of `keep_every`.
    pub fn save_weights(&self, dir: &Path) -> Result<()> {
        let json = self.config_json()?;
        let g = self.sampling_generator().store.model_tensors();
        let d = self.discriminator.store.model_tensors();
        checkpoint::save_weights(dir, self.step, &g, &d)?;
        checkpoint::write_atomic(&dir.join("config.json"), &json)
    }

    /// Rebuild a run from `dir` (its `config.json` and newest complete checkpoint).
    pub fn resume(dir: &Path, data: Arc<dyn Dataset>, device: &Device) -> Result<Self> {
        let cfg = read_config(dir)?;
        Self::resume_with(dir, cfg, data, device)
    }

    /// Resume with a config that may differ from the saved one in non-structural fields
    /// (steps, learning rates, intervals).
    pub fn resume_with(
        dir: &Path,
        cfg: TrainConfig,
        data: Arc<dyn Dataset>,
        device: &Device,
    ) -> Result<Self> {
        let mut t = Self::new(cfg, data, device)?;
        t.load_checkpoint(dir)?;
        Ok(t)
    }

    /// Load the newest complete checkpoint from `dir` into this trainer. Nothing changes
    /// unless every tensor matches the model's names and shapes.
    ///
    /// A weights-only folder (a shipped generator, [`checkpoint::save_weights`]) loads as the
    /// start of further training: G (and its EMA) and D from the files, the step from their
    /// metadata, fresh Adam moments, noise and data order from the config's seed.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        match checkpoint::load_latest(dir, &self.device) {
            Ok(set) => {
                self.load_tensors(&set.paths, &set.files)?;
                self.load_notes = set.notes;
                Ok(())
            }
            Err(Error::NoCheckpoint { .. }) if checkpoint::is_weights_folder(dir) => {
                self.load_weights(dir)
            }
            Err(e) => Err(e),
        }
    }

    /// Load a weights-only folder (see [`Trainer::load_checkpoint`]).
    pub fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let set = checkpoint::load_weights(dir, &self.device)?;
        self.load_notes = set.notes.clone();
        let [gp, dp, _] = &set.paths;
        let [g, d, _] = &set.files;
        let widened = self.widened_generator(dir, gp, g)?;
        let g = widened.as_ref().unwrap_or(g);
        let grown = if d.is_empty() {
            None
        } else {
            let expected = self.discriminator.store.shapes(true);
            let grown = aux_branch_growth(&expected, d);
            if grown.is_none() {
                checkpoint::check_shapes(dp, &expected, d)?;
            }
            grown
        };
        self.generator.store.load(gp, g, true)?;
        if let Some(e) = &self.ema {
            e.store.load(gp, g, true)?;
        }
        match &grown {
            None if !d.is_empty() => self.discriminator.store.load(dp, d, true)?,
            None => {}
            Some((fresh, dropped)) => {
                let kept: HashMap<String, Tensor> = d
                    .iter()
                    .filter(|(n, _)| !dropped.contains(n))
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect();
                self.discriminator
                    .store
                    .load_except(dp, &kept, true, &|n| fresh.iter().any(|f| f == n))?;
                self.load_notes.push(format!(
                    "D gains model.aux_branch: its {} tensors start fresh; the rest of D comes \
                     from {}{}",
                    fresh.len(),
                    dp.display(),
                    if dropped.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", except the auxiliary head it replaces ({})",
                            dropped.join(", ")
                        )
                    }
                ));
            }
        }
        self.step = set.step;
        Ok(())
    }

    /// G's tensors `g` (read from `gp` in the weights folder `dir`) as they are when their
    /// shapes fit this trainer's G (`None`), else, when the folder's `config.json` has a
    /// smaller `model.g_ch`, widened to this G (Net2WiderNet, [`Generator::widen_from`],
    /// noise [`WIDEN_NOISE`] from the config's seed) with a note; else the shape error.
    fn widened_generator(
        &mut self,
        dir: &Path,
        gp: &Path,
        g: &HashMap<String, Tensor>,
    ) -> Result<Option<HashMap<String, Tensor>>> {
        let mismatch = match checkpoint::check_shapes(gp, &self.generator.store.shapes(true), g) {
            Ok(()) => return Ok(None),
            Err(e) => e,
        };
        let from = match read_config(dir) {
            Ok(saved) if saved.model.g_ch < self.cfg.model.g_ch => saved.model.g_ch,
            _ => return Err(mismatch),
        };
        let mut rng = Rng::stream(self.cfg.seed, "widen.gen");
        let wide = self
            .generator
            .widen_from(from, gp, g, WIDEN_NOISE, &mut rng)?;
        self.load_notes.push(format!(
            "G widened from model.g_ch {from} to {} (Net2WiderNet: channels repeated, their \
             inputs shared out, noise {WIDEN_NOISE} of each weight's sd on the copies; the \
             narrow G's images checked first) from {}",
            self.cfg.model.g_ch,
            gp.display()
        ));
        Ok(Some(wide))
    }

    /// An in-memory copy of the whole training state (weights, optimizer moments, SN vectors,
    /// step, random streams), for restoring after a NaN without touching the disk.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let deep = |m: HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>> {
            m.into_iter().map(|(k, v)| Ok((k, v.copy()?))).collect()
        };
        Ok(Snapshot {
            step: self.step,
            files: [
                deep(self.sampling_generator().store.model_tensors())?,
                deep(self.discriminator.store.model_tensors())?,
                deep(self.optimizer_tensors()?)?,
            ],
        })
    }

    /// Return to a [`Trainer::snapshot`].
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        let p = PathBuf::from(format!("<in-memory snapshot of step {}>", snap.step));
        self.load_tensors(&[p.clone(), p.clone(), p], &snap.files)
    }

    /// Poison the generator's first trainable tensor with NaN (the explorer's "Inject NaN",
    /// a demonstration and test of the NaN guard); returns its name.
    pub fn inject_nan(&self) -> Result<Option<String>> {
        let Some((name, var)) = self.generator.store.trainable().into_iter().next() else {
            return Ok(None);
        };
        var.set(&(var.as_tensor().ones_like()? * f64::NAN)?)?;
        Ok(Some(name))
    }

    /// True when every weight of G and D is finite.
    pub fn weights_finite(&self) -> Result<bool> {
        let mut parts = vec![];
        for store in [&self.generator.store, &self.discriminator.store] {
            for (_, t) in store.model_tensors() {
                parts.push(t.abs()?.sum_all()?);
            }
        }
        // A NaN or Inf anywhere makes the (f64) total non-finite.
        Ok(sum_scalars(parts)?.is_finite())
    }

    fn load_tensors(
        &mut self,
        paths: &[PathBuf; 3],
        files: &[HashMap<String, Tensor>; 3],
    ) -> Result<()> {
        let [gp, dp, op] = paths.clone();
        let [g, d, o] = files;
        // Validate everything before touching anything.
        checkpoint::check_shapes(&gp, &self.generator.store.shapes(true), g)?;
        checkpoint::check_shapes(&dp, &self.discriminator.store.shapes(true), d)?;
        let mut opt_g = Adam::new(self.generator.store.trainable(), 0.0, 0.0, 0.0, 0.0)?;
        let mut opt_d = Adam::new(self.discriminator.store.trainable(), 0.0, 0.0, 0.0, 0.0)?;
        opt_g.load_state("opt_g", o, &op)?;
        opt_d.load_state("opt_d", o, &op)?;
        let pick = |prefix: &str| -> HashMap<String, Tensor> {
            o.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let g_state = pick("gen.");
        let d_state = pick("disc.");
        // With EMA: the generator file holds the average, the trained weights are `raw.*`
        // (absent when EMA was turned on at a resume: both start from the file).
        let raw: HashMap<String, Tensor> = o
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(ema::RAW_PREFIX)
                    .map(|n| (n.to_string(), v.clone()))
            })
            .collect();
        let raw = if self.ema.is_some() && !raw.is_empty() {
            checkpoint::check_shapes(&op, &self.generator.store.shapes(true), &raw)?;
            Some(raw)
        } else {
            None
        };
        checkpoint::check_shapes(&op, &self.generator.store.shapes(false), &g_state)?;
        checkpoint::check_shapes(&op, &self.discriminator.store.shapes(false), &d_state)?;
        let get = |name: &str, len: usize| -> Result<Vec<u64>> {
            let t = o.get(name).ok_or_else(|| Error::MissingTensor {
                path: op.clone(),
                name: name.into(),
            })?;
            let v = tensor_u64(t)?;
            if v.len() != len {
                return Err(Error::ShapeMismatch {
                    path: op.clone(),
                    name: name.into(),
                    expected: vec![len],
                    found: t.dims().to_vec(),
                });
            }
            Ok(v)
        };
        let step = get("trainer.step", 1)?[0];
        let rng = get("trainer.rng", 4)?;
        let smp = get("trainer.sampler", 3)?;
        if smp[2] as usize != self.sampler.n {
            return Err(Error::bad_file(
                &op,
                format!(
                    "the checkpoint was trained on {} images, the dataset given has {}",
                    smp[2], self.sampler.n
                ),
            ));
        }
        if smp[1] > smp[2] {
            return Err(Error::bad_file(
                &op,
                format!(
                    "trainer.sampler: the cursor {} is past the end of the dataset ({} images): \
                     the file is corrupt",
                    smp[1] as i64, smp[2]
                ),
            ));
        }
        if rng.iter().all(|&x| x == 0) {
            return Err(Error::bad_file(
                &op,
                "trainer.rng: the random state is all zeros: the file is corrupt",
            ));
        }
        // All checks passed: commit.
        if let Some(e) = &self.ema {
            e.store.load(&gp, g, true)?;
        }
        match &raw {
            Some(raw) => self.generator.store.load(&op, raw, true)?,
            None => self.generator.store.load(&gp, g, true)?,
        }
        self.discriminator.store.load(&dp, d, true)?;
        self.generator.store.load(&op, &g_state, false)?;
        if let Some(e) = &self.ema {
            e.store.load(&op, &g_state, false)?;
        }
        self.discriminator.store.load(&op, &d_state, false)?;
        let o = &self.cfg.optim;
        for (opt, mut new, lr) in [
            (&mut self.opt_g, opt_g, o.lr_g),
            (&mut self.opt_d, opt_d, o.lr_d),
        ] {
            (new.lr, new.beta1, new.beta2, new.eps) = (lr, o.beta1, o.beta2, o.eps);
            *opt = new;
        }
        let branch_lr = self.cfg.optim.lr_aux_branch;
        self.opt_d.set_lr_of(&is_aux_branch, branch_lr);
        self.step = step;
        self.rng = Rng::from_state([rng[0], rng[1], rng[2], rng[3]]);
        self.sampler.epoch = smp[0];
        self.sampler.reshuffle();
        self.sampler.cursor = smp[1] as usize;
        Ok(())
    }
}

/// A deep in-memory copy of a trainer's state ([`Trainer::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub step: u64,
    files: [HashMap<String, Tensor>; 3],
}

/// The generator of a run folder (its config and newest complete checkpoint), for sampling
/// and scoring, with the config's `sampling.truncation`; returns it with the run's config and
/// the checkpoint's step.
pub fn load_generator(dir: &Path, device: &Device) -> Result<(Generator, TrainConfig, u64)> {
    let cfg = read_config(dir)?;
    if cfg.model.arch == crate::config::Arch::Onnx {
        // An imported generator (`ganscope import`): the graph beside the config, no steps.
        let path = dir.join(crate::model::onnx::ONNX_FILE);
        let mut g = Generator::from_onnx(&path, &cfg.model, device)?;
        g.set_truncation(cfg.sampling.truncation)?;
        return Ok((g, cfg, 0));
    }
    let mut g = Generator::new(&cfg.model, Rng::new(0), DType::F32, device)?;
    g.set_truncation(cfg.sampling.truncation)?;
    let set = match checkpoint::load_latest(dir, device) {
        Err(Error::NoCheckpoint { .. }) if checkpoint::is_weights_folder(dir) => {
            checkpoint::load_weights(dir, device)?
        }
        r => r?,
    };
    g.store.load(&set.paths[0], &set.files[0], true)?;
    restore_spectral_norm(&g, &set)?;
    Ok((g, cfg, set.step))
}

/// Power iterations that converge a spectral-norm vector from a random start well past the
/// one-per-step estimate training leaves (the top two singular values of a layer are rarely
/// within 10% of each other; 0.9^100 < 1e-4).
pub const SN_REFINE_ITERS: usize = 100;

/// G's spectral-norm vectors (`*.sn.u`: optimizer-side state, not in `generator.safetensors`),
/// so that G samples with the sigma(W) it trained with: from the run's optimizer file when the
/// folder has one, else (a weights-only folder: `kept/`, a shipped generator) converged by
/// [`SN_REFINE_ITERS`] power iterations on G's own weights. Without them a G with spectral
/// norm (the `iclevr-sagan` preset's) divided each weight by its norm along a random vector
/// and drew saturated noise outside the trainer.
pub fn restore_spectral_norm(g: &Generator, set: &checkpoint::CheckpointSet) -> Result<()> {
    let wanted = g.store.shapes(false);
    if wanted.is_empty() {
        return Ok(());
    }
    let opt = &set.files[2];
    if wanted.iter().all(|(n, _)| opt.contains_key(n)) {
        let mine: HashMap<String, Tensor> = wanted
            .iter()
            .map(|(n, _)| (n.clone(), opt[n].clone()))
            .collect();
        return g.store.load(&set.paths[2], &mine, false);
    }
    g.refine_spectral_norm(SN_REFINE_ITERS)
}

/// Read and parse `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<TrainConfig> {
    let p = dir.join("config.json");
    let bytes = checkpoint::read_regular(&p).map_err(|e| Error::io(&p, e))?;
    let cfg: TrainConfig =
        serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(&p, e.to_string()))?;
    cfg.validate()
        .map_err(|e| Error::bad_file(&p, e.to_string()))?;
    Ok(cfg)
}

/// sqrt(sum over `vars` of |grad|^2) (variables without a gradient count 0).
fn grad_norm(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut parts = vec![];
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            parts.push(g.detach().sqr()?.sum_all()?);
        }
    }
    Ok(sum_scalars(parts)?.sqrt())
}

/// The sum of 0-d tensors, read back once (one device sync per training step, not one per
/// parameter tensor).
fn sum_scalars(parts: Vec<Tensor>) -> Result<f64> {
    if parts.is_empty() {
        return Ok(0.0);
    }
    let parts = parts
        .iter()
        .map(|t| t.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    scalar(&Tensor::stack(&parts, 0)?.sum_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Whether a D parameter belongs to `model.aux_branch`.
fn is_aux_branch(name: &str) -> bool {
    name.contains(".aux_branch.")
}

/// Training on from a D saved without `model.aux_branch` with a config that adds one: the
/// branch's tensors (missing from the file) start fresh and the auxiliary head it replaces
/// (in the file, not in the model) is dropped; every other tensor must match. Returns (fresh,
/// dropped) names, or `None` when the file is not such a D (then the strict check applies).
fn aux_branch_growth(
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
) -> Option<(Vec<String>, Vec<String>)> {
    let head = |n: &str| n.contains(".aux.");
    if found.keys().any(|n| is_aux_branch(n)) {
        return None;
    }
    let fresh: Vec<String> = expected
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| is_aux_branch(n))
        .collect();
    if fresh.is_empty() {
        return None;
    }
    let mut dropped: Vec<String> = found
        .keys()
        .filter(|n| head(n) && !expected.iter().any(|(e, _)| e == *n))
        .cloned()
        .collect();
    dropped.sort_unstable();
    Some((fresh, dropped))
}

/// The noise that lets a widened generator's repeated channels part, as a share of each
/// weight's standard deviation ([`Trainer::widened_generator`]).
pub const WIDEN_NOISE: f64 = 0.02;

/// The course's top-k hit rate of an auxiliary head's logits (B, K) against the conditions
/// (B, K): for a row with k labels (entries above 0.5), the share of them among its k highest
/// logits, summed over the batch (top-1 for one-hot rows); `None` when no row has a label.
fn aux_hit_rate(logits: &Tensor, c: &Tensor) -> Result<Option<f64>> {
    let scores: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    let truth: Vec<Vec<u16>> = c
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .iter()
        .map(|row| metrics::active_labels(row))
        .collect();
    let t = metrics::topk_accuracy(&scores, &truth)?;
    Ok((t.labels > 0).then(|| t.accuracy()))
}

fn frac_positive(t: &Tensor) -> Result<f64> {
    let n = t.elem_count().max(1) as f64;
    Ok(t.gt(0.0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        / n)
}

/// `step`: the number of completed steps (the failing one is the next).
fn check_finite(what: &'static str, v: f64, step: u64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what,
            value: v,
            step: step + 1,
        })
    }
}

/// The dataset must match what the model was configured for.
/// The empty floor of a dataset of scenes: the per-pixel median (CHW, in [-1, 1]) of up to
/// 2001 of its first-step images (one small object each, at a random place), or None when it
/// has none.
pub fn median_first_step(data: &dyn Dataset) -> Option<Vec<f32>> {
    let firsts: Vec<usize> = (0..data.len())
        .filter(|&i| data.scene_step(i) == Some(SceneStep::First))
        .collect();
    if firsts.is_empty() {
        return None;
    }
    // Evenly spread over the data, an odd count (a true middle element).
    let n = firsts.len().min(2001);
    let n = if n.is_multiple_of(2) { n - 1 } else { n }.max(1);
    let picked: Vec<usize> = (0..n).map(|j| firsts[j * firsts.len() / n]).collect();
    let (c, h, w) = data.image_shape();
    let mut column = vec![0u8; n];
    let mut out = Vec::with_capacity(c * h * w);
    for p in 0..c * h * w {
        for (v, &i) in column.iter_mut().zip(&picked) {
            *v = data.image_u8(i)[p];
        }
        let (_, mid, _) = column.select_nth_unstable(n / 2);
        out.push(crate::images::from_u8(*mid));
    }
    Some(out)
}

pub fn check_data(cfg: &TrainConfig, data: &dyn Dataset) -> Result<()> {
    let m = &cfg.model;
    let (c, h, w) = data.image_shape();
    if (c, h, w) != (m.channels, m.image_size, m.image_size) {
        return Err(Error::Config(format!(
            "the dataset has {c}x{h}x{w} images, the model expects {}x{}x{}",
            m.channels, m.image_size, m.image_size
        )));
    }
    let k = data.num_conditions();
    if m.conditioning != Conditioning::None && k != m.num_conditions {
        return Err(Error::Config(format!(
            "the dataset has {k} labels, the model expects K = {}",
            m.num_conditions
        )));
    }
    if !m.label_names.is_empty() && m.num_conditions > 0 && m.label_names != data.label_names() {
        return Err(Error::Config(format!(
            "the dataset's labels ({}) are not the model's ({})",
            data.label_names().join(", "),
            m.label_names.join(", ")
        )));
    }
    if data.len() < cfg.batch_size {
        return Err(Error::Config(format!(
            "the dataset has {} images, fewer than one batch of {}",
            data.len(),
            cfg.batch_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::grad_norm;

    #[test]
    fn the_floor_is_the_median_of_the_first_steps() {
        use crate::data::render::{RenderOptions, render_scene, synthetic_dataset};
        let data = synthetic_dataset(60, 32, 1, None);
        let floor = super::median_first_step(&data).unwrap();
        let empty = render_scene(&[], 32, RenderOptions::default());
        // Within a few grey levels of the renderer's empty floor almost everywhere.
        let off = floor
            .iter()
            .zip(&empty)
            .filter(|(a, b)| (**a - crate::images::from_u8(**b)).abs() > 0.05)
            .count();
        assert!(
            off * 100 < floor.len(),
            "{off} of {} values off",
            floor.len()
        );
        let mut none = data.clone();
        none.steps.clear();
        assert!(super::median_first_step(&none).is_none());
    }

    #[test]
    fn a_sequential_model_refuses_data_without_scene_steps() {
        use std::sync::Arc;
        let mut cfg = crate::config::TrainConfig::iclevr_sequential_small();
        cfg.model.g_ch = 4;
        cfg.model.d_ch = 4;
        cfg.batch_size = 4;
        let mut data = crate::data::render::synthetic_dataset(2, 32, 1, None);
        data.steps.clear();
        let e = super::Trainer::new(cfg, Arc::new(data), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("0 of the 6 images"), "{e}");
    }

    #[test]
    fn mode_seeking_switches_off_after_its_last_step() {
        use std::sync::Arc;
        let mut cfg = crate::config::TrainConfig::iclevr_sequential_small();
        cfg.model.g_ch = 4;
        cfg.model.d_ch = 4;
        cfg.model.z_dim = 9;
        cfg.batch_size = 4;
        cfg.loss.mode_seeking = 1.0;
        assert_eq!(cfg.loss.mode_seeking_at(5), 1.0);
        cfg.loss.mode_seeking_until = 1;
        assert_eq!(
            [0, 1, 7].map(|s| cfg.loss.mode_seeking_at(s)),
            [1.0, 0.0, 0.0]
        );
        let data = Arc::new(crate::data::render::synthetic_dataset(6, 32, 1, None));
        let bits = |t: &super::Trainer| -> Vec<Vec<u32>> {
            let mut m: Vec<_> = t.generator.store.model_tensors().into_iter().collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            m.iter()
                .map(|(_, v)| {
                    let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|x| x.to_bits()).collect()
                })
                .collect()
        };
        let trainer = |until: u64, ms: f64| {
            let mut c = cfg.clone();
            c.loss.mode_seeking_until = until;
            c.loss.mode_seeking = ms;
            super::Trainer::new(c, data.clone(), &Device::Cpu).unwrap()
        };
        // Switched off after one step / never / never on: the first step of the first two is
        // the same update, the second is not; the run without the term differs from step 1.
        let (mut once, mut always, mut never) = (trainer(1, 1.0), trainer(0, 1.0), trainer(0, 0.0));
        for t in [&mut once, &mut always, &mut never] {
            t.train_step().unwrap();
        }
        assert_eq!(bits(&once), bits(&always));
        assert_ne!(bits(&once), bits(&never));
        for t in [&mut once, &mut always] {
            t.train_step().unwrap();
        }
        assert_ne!(bits(&once), bits(&always));
    }

    #[test]
    fn aux_hit_rate_is_the_course_top_k_by_hand() {
        let dev = Device::Cpu;
        let t = |v: &[[f32; 3]; 2]| Tensor::new(v, &dev).unwrap();
        // Row 0 has labels {0, 2}: its top 2 logits are 0 (3.0) and 2 (2.0), two hits. Row 1
        // has label {2}: its top logit is 1 (5.0), a miss. 2 hits of 3 labels.
        let logits = t(&[[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]);
        let c = t(&[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]);
        let r = super::aux_hit_rate(&logits, &c).unwrap().unwrap();
        assert!((r - 2.0 / 3.0).abs() < 1e-12, "{r}");
        // One-hot rows: top-1 accuracy (row 0 right, row 1 wrong).
        let c1 = t(&[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]);
        assert_eq!(super::aux_hit_rate(&logits, &c1).unwrap(), Some(0.5));
        // No labels at all: nothing to read.
        let c0 = t(&[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]);
        assert_eq!(super::aux_hit_rate(&logits, &c0).unwrap(), None);
    }

    /// The 32-px sequential preset at widths 4, z 9, batch 4, with the given auxiliary
    /// head and branch.
    fn tiny_sequential(aux_head: bool, aux_branch: usize) -> crate::config::TrainConfig {
        let mut cfg = crate::config::TrainConfig::iclevr_sequential_small();
        cfg.model.g_ch = 4;
        cfg.model.d_ch = 4;
        cfg.model.z_dim = 9;
        cfg.batch_size = 4;
        cfg.model.aux_head = aux_head;
        cfg.model.aux_branch = aux_branch;
        cfg
    }

    /// A generator with spectral norm samples outside the trainer as inside it: loaded from
    /// a run folder (its vectors from the optimizer file) and from a weights-only folder
    /// (vectors converged by power iteration). With the random vectors a fresh network starts
    /// from, the same weights drew something else (the SAGAN preset drew saturated noise).
    #[test]
    fn a_spectrally_normalised_generator_samples_as_it_trained() {
        use std::sync::Arc;
        let data = Arc::new(crate::data::render::synthetic_dataset(6, 32, 1, None));
        // The SAGAN preset (spectral norm in G and D) at 32 px, widths 4, without attention.
        let mut cfg = crate::config::TrainConfig::iclevr_sagan();
        cfg.model.image_size = 32;
        cfg.model.attention = None;
        cfg.model.g_ch = 4;
        cfg.model.d_ch = 4;
        cfg.model.z_dim = 9;
        assert!(cfg.model.g_spectral_norm);
        cfg.batch_size = 4;
        cfg.ema.decay = 0.0;
        let mut t = super::Trainer::new(cfg.clone(), data, &Device::Cpu).unwrap();
        // Enough steps for every vector to settle near its layer's top singular vector.
        for _ in 0..30 {
            t.train_step().unwrap();
        }
        let conds = vec![vec![0.0; cfg.model.num_conditions]; 1];
        let want = t.sampling_generator().generate(6, &conds, 3).unwrap();
        let (run, weights) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        t.save(run.path()).unwrap();
        t.save_weights(weights.path()).unwrap();
        let diff = |a: &crate::images::Images, b: &crate::images::Images| {
            a.data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let (g, _, _) = super::load_generator(run.path(), &Device::Cpu).unwrap();
        let from_run = diff(&g.generate(6, &conds, 3).unwrap(), &want);
        assert!(from_run < 1e-5, "run folder: {from_run}");
        let (g, _, _) = super::load_generator(weights.path(), &Device::Cpu).unwrap();
        let from_weights = diff(&g.generate(6, &conds, 3).unwrap(), &want);
        assert!(from_weights < 0.1, "weights folder: {from_weights}");
        // The same weights with fresh random vectors and no power iteration.
        let fresh = crate::model::Generator::new(
            &cfg.model,
            crate::rng::Rng::new(0),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let set = crate::checkpoint::load_weights(weights.path(), &Device::Cpu).unwrap();
        fresh
            .store
            .load(&set.paths[0], &set.files[0], true)
            .unwrap();
        let unrefined = diff(&fresh.generate(6, &conds, 3).unwrap(), &want);
        eprintln!(
            "max |diff|: run {from_run:e}, weights {from_weights:e}, unrefined {unrefined:e}"
        );
        assert!(
            unrefined > 10.0 * from_weights.max(1e-3),
            "{unrefined} vs {from_weights}"
        );
    }

    #[test]
    fn a_step_reports_the_aux_heads_hit_rates_only_with_an_aux_head() {
        use std::sync::Arc;
        let data = Arc::new(crate::data::render::synthetic_dataset(6, 32, 1, None));
        let step = |aux_head: bool| {
            let cfg = tiny_sequential(aux_head, 0);
            let mut t = super::Trainer::new(cfg, data.clone(), &Device::Cpu).unwrap();
            t.train_step().unwrap()
        };
        let with = step(true);
        for r in [with.aux_acc_real, with.aux_acc_fake] {
            let r = r.expect("a hit rate with an aux head");
            assert!((0.0..=1.0).contains(&r), "{r}");
        }
        // A batch of 4 pairs holds 8 to 16 labels of [added, so far] (one added and 1 to 3 so
        // far per pair): the rate is hits / labels, a fraction with such a denominator.
        let fracs = |r: f64| (2..=24).any(|n| ((r * n as f64).round() - r * n as f64).abs() < 1e-9);
        assert!(fracs(with.aux_acc_real.unwrap()) && fracs(with.aux_acc_fake.unwrap()));
        let without = step(false);
        assert_eq!((without.aux_acc_real, without.aux_acc_fake), (None, None));
    }

    #[test]
    fn training_on_adds_an_aux_branch_to_a_saved_d_and_keeps_the_rest() {
        use std::sync::Arc;
        let data = Arc::new(crate::data::render::synthetic_dataset(6, 32, 1, None));
        let small = |branch: usize| tiny_sequential(true, branch);
        // A D without the branch, trained a step (so its tensors differ from any init), saved
        // as a weights folder.
        let mut old = super::Trainer::new(small(0), data.clone(), &Device::Cpu).unwrap();
        old.train_step().unwrap();
        let dir = tempfile::tempdir().unwrap();
        old.save_weights(dir.path()).unwrap();
        let saved = old.discriminator.store.model_tensors();
        assert!(saved.contains_key("disc.aux.weight"));

        let mut t = super::Trainer::new(small(3), data.clone(), &Device::Cpu).unwrap();
        let init = t.discriminator.store.model_tensors();
        t.load_checkpoint(dir.path()).unwrap();
        let now = t.discriminator.store.model_tensors();
        let bits = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The body comes from the file, bit for bit; the branch keeps its initial values; the
        // replaced head is gone.
        let mut n_branch = 0;
        for (name, v) in &now {
            if name.contains(".aux_branch.") {
                n_branch += 1;
                assert_eq!(bits(v), bits(&init[name]), "{name} was overwritten");
            } else {
                assert_eq!(bits(v), bits(&saved[name]), "{name} not loaded");
            }
        }
        // stem, one stage per resample of a 32-px model (3), out (weight and bias).
        assert_eq!(n_branch, 1 + 3 + 2);
        assert!(!now.contains_key("disc.aux.weight"));
        assert!(
            t.load_notes
                .iter()
                .any(|n| n.contains("aux_branch") && n.contains("disc.aux.weight")),
            "{:?}",
            t.load_notes
        );
        t.train_step().unwrap();

        // Anything else that differs is still refused, naming the file and the tensor.
        let mut wider = small(3);
        wider.model.d_ch = 5;
        let mut t = super::Trainer::new(wider, data, &Device::Cpu).unwrap();
        let e = t.load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(e.contains("discriminator.safetensors"), "{e}");
    }

    #[test]
    fn training_on_with_a_wider_g_widens_the_saved_one() {
        use std::sync::Arc;
        let data = Arc::new(crate::data::render::synthetic_dataset(6, 32, 1, None));
        let mut old =
            super::Trainer::new(tiny_sequential(true, 0), data.clone(), &Device::Cpu).unwrap();
        old.train_step().unwrap();
        let dir = tempfile::tempdir().unwrap();
        old.save_weights(dir.path()).unwrap();

        let mut cfg = tiny_sequential(true, 0);
        cfg.model.g_ch = 8;
        let mut t = super::Trainer::new(cfg, data.clone(), &Device::Cpu).unwrap();
        t.load_checkpoint(dir.path()).unwrap();
        assert!(
            t.load_notes
                .iter()
                .any(|n| n.contains("widened from model.g_ch 4 to 8")),
            "{:?}",
            t.load_notes
        );
        let shape = |g: &crate::model::Generator| g.store.shapes(true);
        assert_eq!(shape(&t.generator), shape(t.sampling_generator()));
        // What G draws stays within the copies' noise of what the saved G drew.
        use crate::model::test_util::{max_abs_diff, normal};
        let z = normal(&mut crate::rng::Rng::new(2), &[4, 9])
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let (_, c) =
            crate::data::Dataset::batch(data.as_ref(), &[0, 1, 2, 3], &Device::Cpu).unwrap();
        let pass = crate::nn::Pass::eval();
        let img = |g: &crate::model::Generator| g.forward(&z, &c, pass).unwrap();
        let d = max_abs_diff(&img(old.sampling_generator()), &img(t.sampling_generator()));
        assert!(d > 0.0 && d < 0.3, "{d}");
        t.train_step().unwrap();

        // Narrower than the saved G: refused, naming the file.
        let mut cfg = tiny_sequential(true, 0);
        cfg.model.g_ch = 2;
        let mut t = super::Trainer::new(cfg, data, &Device::Cpu).unwrap();
        let e = t.load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(e.contains("generator.safetensors"), "{e}");
    }

    #[test]
    fn grad_norm_is_the_global_l2_norm() {
        // loss = 0.5 |a|^2 + 0.5 |b|^2 -> grad a = a, grad b = b; a = (3, 4), b = (12,):
        // sqrt(9 + 16 + 144) = 13. A third variable outside the loss has no gradient (0).
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3f32, 4.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[12f32], &dev).unwrap()).unwrap();
        let c = Var::from_tensor(&Tensor::new(&[100f32], &dev).unwrap()).unwrap();
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap()
            * 0.5)
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = vec![("a".into(), a), ("b".into(), b), ("c".into(), c)];
        assert!((grad_norm(&grads, &vars).unwrap() - 13.0).abs() < 1e-6);
    }
}
