//! CPU image batches: the form in which generated or real images leave the engine
//! (for sample sheets, the explorer's wall, metrics). Pixels are f32 in [-1, 1], NCHW.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A batch of `n` images, `channels` x `height` x `width`, f32 in [-1, 1], NCHW order.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Images {
    /// Copy a (N, C, H, W) tensor on any device to the CPU.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (n, channels, height, width) = t.dims4()?;
        let data = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            n,
            channels,
            height,
            width,
            data,
        })
    }

    /// Back to a (N, C, H, W) f32 tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.n, self.channels, self.height, self.width),
            device,
        )?)
    }

    /// Number of values in one image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The CHW values of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.image_len();
        &self.data[i * l..(i + 1) * l]
    }

    /// Image `i` as interleaved RGB bytes (grey images are replicated to three channels);
    /// [-1, 1] maps to [0, 255] with clamping.
    pub fn rgb8(&self, i: usize) -> Result<Vec<u8>> {
        if i >= self.n {
            return Err(Error::Msg(format!(
                "image {i} out of range (batch of {})",
                self.n
            )));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::Msg(format!(
                "cannot show {}-channel images as RGB",
                self.channels
            )));
        }
        let img = self.image(i);
        let hw = self.height * self.width;
        let mut out = Vec::with_capacity(hw * 3);
        for p in 0..hw {
            for ch in 0..3 {
                let src = if self.channels == 1 { 0 } else { ch };
                out.push(to_u8(img[src * hw + p]));
            }
        }
        Ok(out)
    }
}

/// [-1, 1] -> [0, 255], rounded, clamped.
pub fn to_u8(v: f32) -> u8 {
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// [0, 255] -> [-1, 1].
pub fn from_u8(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}
