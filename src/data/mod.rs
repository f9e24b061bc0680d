//! Datasets: everything the trainer reads real images and their conditions from.
//!
//! Images are held once in memory as u8 (CHW per image) and converted to f32 in [-1, 1]
//! per batch. Conditions are vectors of length K: one-hot for class datasets, multi-hot for
//! multi-label sets, empty (K = 0) for unconditional data.

pub mod cifar;
pub mod folder;
pub mod iclevr;
pub mod idx;
pub mod render;
#[cfg(test)]
pub(crate) mod test_util;

use candle_core::{Device, Tensor};

// Defined beside the config that names it (config sits below data); `crate::data::ConditionKind`
// stays the path the rest of the engine uses.
pub use crate::config::ConditionKind;
use crate::error::{Error, Result};
use crate::images::from_u8;

/// A source of real training images with their condition vectors.
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (channels, height, width) of every image.
    fn image_shape(&self) -> (usize, usize, usize);
    /// Names of the K condition entries (class names or label names); empty when K = 0.
    fn label_names(&self) -> &[String];
    fn condition_kind(&self) -> ConditionKind;
    /// Image `i` as CHW bytes.
    fn image_u8(&self, i: usize) -> &[u8];
    /// The condition vector of image `i` (length K; 0/1 entries).
    fn condition(&self, i: usize) -> Vec<f32>;
    /// Where image `i` sits in a scene built one object at a time (i-CLEVR's `_0`, `_1`,
    /// `_2`): the first object, or one object added to an earlier image. `None` where the
    /// data has no such structure or the image's previous step is missing.
    fn scene_step(&self, _i: usize) -> Option<SceneStep> {
        None
    }

    /// K, the length of a condition vector.
    fn num_conditions(&self) -> usize {
        self.label_names().len()
    }

    /// Images `indices` as a (B, C, H, W) tensor in [-1, 1] and their conditions as (B, K).
    fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let (c, h, w) = self.image_shape();
        let k = self.num_conditions();
        let mut px = Vec::with_capacity(indices.len() * c * h * w);
        let mut cond = Vec::with_capacity(indices.len() * k);
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Msg(format!(
                    "batch index {i} out of range (dataset of {})",
                    self.len()
                )));
            }
            px.extend(self.image_u8(i).iter().map(|&v| from_u8(v)));
            cond.extend(self.condition(i));
        }
        let b = indices.len();
        let images = Tensor::from_vec(px, (b, c, h, w), device)?;
        let conds = Tensor::from_vec(cond, (b, k), device)?;
        Ok((images, conds))
    }
}

/// An image's place in a scene built one object at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SceneStep {
    /// The scene's first object, drawn on the empty floor.
    First,
    /// One object added to image `previous` (whose labels are this image's minus one).
    After { previous: usize },
}

/// `CLEVR_train_000123_2.png` -> ("CLEVR_train_000123", 2).
pub(crate) fn split_step(file: &str) -> Option<(&str, usize)> {
    let stem = file.strip_suffix(".png")?;
    let (scene, step) = stem.rsplit_once('_')?;
    if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((scene, step.parse().ok()?))
}

/// The scene steps of i-CLEVR-named entries (`<scene>_<k>.png` -> labels): `_0` with one
/// label is [`SceneStep::First`]; `_k` is [`SceneStep::After`] the same scene's `_<k-1>` when
/// that entry exists and holds exactly this entry's labels but one. Anything else (no step
/// suffix, a missing step, labels that do not grow by one) gets `None`.
pub fn scene_steps(entries: &[(String, Vec<u16>)]) -> Vec<Option<SceneStep>> {
    let index: std::collections::HashMap<(&str, usize), usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, (f, _))| split_step(f).map(|k| (k, i)))
        .collect();
    entries
        .iter()
        .map(|(file, labels)| {
            let (scene, k) = split_step(file)?;
            if k == 0 {
                return (labels.len() == 1).then_some(SceneStep::First);
            }
            let j = *index.get(&(scene, k - 1))?;
            let prev = &entries[j].1;
            let grows = prev.len() + 1 == labels.len() && prev.iter().all(|l| labels.contains(l));
            grows.then_some(SceneStep::After { previous: j })
        })
        .collect()
}

/// The in-memory dataset every loader produces.
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    /// Human-readable origin (path or generator), used in messages.
    pub source: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// All images, CHW each, concatenated.
    pub pixels: Vec<u8>,
    pub kind: ConditionKind,
    pub label_names: Vec<String>,
    /// Per image: the indices of its active labels (one for one-hot, any number for multi-hot).
    pub labels: Vec<Vec<u16>>,
    /// Per image, its place in a scene built one object at a time ([`scene_steps`]); empty
    /// for data without that structure.
    pub steps: Vec<Option<SceneStep>>,
}

impl InMemoryDataset {
    /// Keep only the first `n` images (for quick runs and tests).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.labels.len());
        self.pixels
            .truncate(n * self.channels * self.height * self.width);
        self.labels.truncate(n);
        self.steps.truncate(n);
        // A step whose previous image was cut off has no previous any more.
        for s in &mut self.steps {
            if matches!(s, Some(SceneStep::After { previous }) if *previous >= n) {
                *s = None;
            }
        }
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    fn label_names(&self) -> &[String] {
        match self.kind {
            ConditionKind::None => &[],
            _ => &self.label_names,
        }
    }
    fn condition_kind(&self) -> ConditionKind {
        self.kind
    }
    fn image_u8(&self, i: usize) -> &[u8] {
        let l = self.channels * self.height * self.width;
        &self.pixels[i * l..(i + 1) * l]
    }
    fn condition(&self, i: usize) -> Vec<f32> {
        let mut v = vec![0.0; self.num_conditions()];
        if self.kind != ConditionKind::None {
            for &l in &self.labels[i] {
                v[l as usize] = 1.0;
            }
        }
        v
    }
    fn scene_step(&self, i: usize) -> Option<SceneStep> {
        self.steps.get(i).copied().flatten()
    }
}

/// Scenes in the embedded synthetic i-CLEVR default: as many as the real set has
/// (6003 scenes x 3 steps = 18009 images).
pub const SYNTHETIC_SCENES: usize = 6003;

/// Open the dataset a run config names (training split) at the model's image side `size`
/// (used where the format allows resizing: i-CLEVR and image folders).
/// Limits for decoding dataset images: a declared size of at most 8192 x 8192 pixels and
/// 256 MiB of decoder memory per image (real datasets here are 64-500 px; a 275 KB PNG
/// declaring 16000 x 16000 asked for about 1 GB per decoding thread). With at most 16
/// decoding threads, image decoding stays within 4 GiB.
pub fn decode_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(8192);
    l.max_image_height = Some(8192);
    l.max_alloc = Some(256 << 20);
    l
}

/// Most threads that decode images at once.
pub const MAX_DECODE_THREADS: usize = 16;

pub fn open(cfg: &crate::config::DataConfig, size: usize) -> Result<InMemoryDataset> {
    use crate::config::DataKind;
    let path = cfg.path.as_deref();
    let need_path = |what: &str| {
        path.ok_or_else(|| Error::Config(format!("the {what} dataset needs a path (--data)")))
    };
    let mut ds = match cfg.kind {
        DataKind::Mnist => idx::load_mnist(idx::MnistVariant::Mnist, path, idx::Split::Train)?,
        DataKind::FashionMnist => {
            idx::load_mnist(idx::MnistVariant::FashionMnist, path, idx::Split::Train)?
        }
        DataKind::Cifar10 => cifar::load_cifar10(need_path("CIFAR-10")?, true)?,
        DataKind::ClassFolder => folder::load_class_folder(need_path("class-folder")?, size)?,
        DataKind::Attributes => folder::load_attribute_folder(need_path("attribute")?, size)?,
        DataKind::Iclevr => match path {
            Some(p) => iclevr::load_iclevr(p, size)?,
            None => {
                // The embedded default: rendered in memory, no download.
                let scenes = cfg
                    .limit
                    .map_or(SYNTHETIC_SCENES, |n| n.div_ceil(render::STEPS));
                render::synthetic_dataset(scenes, size, cfg.synthetic_seed, None)
            }
        },
    };
    if let Some(n) = cfg.limit {
        ds.truncate(n);
    }
    Ok(ds)
}

/// Guess the dataset kind of a folder or file (for drag and drop and "Open dataset"):
/// i-CLEVR (`objects.json`), attribute folders (`cartoon_attr.txt`), CIFAR-10 binary batches,
/// MNIST / Fashion-MNIST IDX files (Fashion when the path says so, or a torchvision
/// `FashionMNIST/` root), or one subfolder of images per class.
pub fn detect_kind(path: &std::path::Path) -> Option<crate::config::DataKind> {
    use crate::config::DataKind;
    let lower = path.display().to_string().to_lowercase();
    let mnist_kind = |p: &str| {
        if p.contains("fashion") {
            DataKind::FashionMnist
        } else {
            DataKind::Mnist
        }
    };
    if path.is_file() {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        if name.ends_with(".bin") {
            return Some(DataKind::Cifar10);
        }
        if name.contains("idx") {
            return Some(mnist_kind(&lower));
        }
        if name == "objects.json" || name == "train.json" {
            return Some(DataKind::Iclevr);
        }
        return None;
    }
    if !path.is_dir() {
        return None;
    }
    let has = |n: &str| path.join(n).exists();
    if has("objects.json") {
        return Some(DataKind::Iclevr);
    }
    if has("cartoon_attr.txt") {
        return Some(DataKind::Attributes);
    }
    if has("data_batch_1.bin") || has("cifar-10-batches-bin") {
        return Some(DataKind::Cifar10);
    }
    if has("FashionMNIST") {
        return Some(DataKind::FashionMnist);
    }
    if has("MNIST") {
        return Some(DataKind::Mnist);
    }
    let entries: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains("idx3-ubyte"))
    }) {
        return Some(mnist_kind(&lower));
    }
    if entries.iter().filter(|p| p.is_dir()).count() >= 2 {
        return Some(DataKind::ClassFolder);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(file: &str, labels: &[u16]) -> (String, Vec<u16>) {
        (file.to_string(), labels.to_vec())
    }

    #[test]
    fn scene_steps_link_each_addition_to_its_previous_image() {
        let entries = [
            e("CLEVR_train_000001_1.png", &[3, 5]),
            e("CLEVR_train_000001_0.png", &[5]),
            e("CLEVR_train_000001_2.png", &[3, 5, 9]),
            // A scene whose `_0` is missing: its `_1` has no previous image.
            e("CLEVR_train_000002_1.png", &[1, 2]),
            // Labels that do not grow by one, a first step with two objects, no suffix.
            e("CLEVR_train_000003_0.png", &[4]),
            e("CLEVR_train_000003_1.png", &[6, 7]),
            e("CLEVR_train_000004_0.png", &[1, 2]),
            e("scene.png", &[1]),
        ];
        use SceneStep::*;
        assert_eq!(
            scene_steps(&entries),
            vec![
                Some(After { previous: 1 }),
                Some(First),
                Some(After { previous: 0 }),
                None,
                Some(First),
                None,
                None,
                None,
            ]
        );
    }

    #[test]
    fn synthetic_scenes_come_in_linked_steps_and_truncation_drops_dangling_links() {
        let mut ds = render::synthetic_dataset(4, 16, 2, None);
        assert_eq!(ds.len(), 12);
        for i in 0..ds.len() {
            match ds.scene_step(i) {
                Some(SceneStep::First) => assert_eq!(ds.labels[i].len(), 1, "image {i}"),
                Some(SceneStep::After { previous }) => {
                    let (now, before) = (&ds.labels[i], &ds.labels[previous]);
                    assert_eq!(before.len() + 1, now.len(), "image {i}");
                    assert!(before.iter().all(|l| now.contains(l)), "image {i}");
                }
                None => panic!("image {i} of a synthetic scene has no step"),
            }
        }
        // Truncation keeps the links inside the kept images and drops those that would
        // point past the end.
        ds.truncate(5);
        assert_eq!(ds.steps.len(), 5);
        assert_eq!(ds.scene_step(4), Some(SceneStep::After { previous: 3 }));
        ds.steps[0] = Some(SceneStep::After { previous: 4 });
        ds.truncate(3);
        assert_eq!(ds.scene_step(0), None);
        assert_eq!(ds.scene_step(2), Some(SceneStep::After { previous: 1 }));
    }
}
