//! Animated GIFs (interpolation strips, the history of the sample wall).

use std::path::Path;

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbImage, RgbaImage};

use crate::error::{Error, Result};

/// Write `frames` (all the same size) as a looping GIF, `delay_ms` per frame, atomically.
pub fn save_gif(frames: &[RgbImage], delay_ms: u32, path: &Path) -> Result<()> {
    let Some(first) = frames.first() else {
        return Err(Error::Msg(format!(
            "{}: no frames to write",
            path.display()
        )));
    };
    let (w, h) = first.dimensions();
    if let Some(bad) = frames.iter().find(|f| f.dimensions() != (w, h)) {
        return Err(Error::Msg(format!(
            "{}: frames differ in size ({}x{} vs {w}x{h})",
            path.display(),
            bad.width(),
            bad.height()
        )));
    }
    let mut buf = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut buf, 10);
        enc.set_repeat(Repeat::Infinite)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        for f in frames {
            let rgba: RgbaImage = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            let frame = Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1));
            enc.encode_frame(frame)
                .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::checkpoint::write_atomic(path, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gif_round_trip_frame_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gif");
        let frames: Vec<RgbImage> = (0..3u8)
            .map(|i| RgbImage::from_pixel(8, 4, image::Rgb([i * 100, 0, 255 - i * 100])))
            .collect();
        save_gif(&frames, 80, &p).unwrap();
        let dec = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&p).unwrap(),
        ))
        .unwrap();
        use image::AnimationDecoder;
        let got = dec.into_frames().collect_frames().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].buffer().get_pixel(0, 0)[0], 200);
        let bad = save_gif(&[], 80, &p).unwrap_err();
        assert!(bad.to_string().contains("no frames"));
    }
}
