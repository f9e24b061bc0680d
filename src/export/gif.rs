//! Animated GIFs (interpolation strips, the history of the sample wall).

use std::path::Path;

use std::collections::HashMap;

use image::RgbImage;

use crate::error::{Error, Result};

/// Write `frames` (all the same size) as a looping GIF, `delay_ms` per frame, atomically.
pub fn save_gif(frames: &[RgbImage], delay_ms: u32, path: &Path) -> Result<()> {
    save_gif_with_progress(frames, delay_ms, path, &mut |_, _| {})
}

/// Pixels of each frame sampled to train the palette (a spread over the whole animation).
const PALETTE_SAMPLE_FRAMES: usize = 8;
/// The palette's colours; index 255 is the transparent "unchanged" colour of frame deltas.
const COLOURS: usize = 255;
const TRANSPARENT: u8 = 255;

/// [`save_gif`], calling `progress(done, total)` after each frame. One palette for the whole
/// animation (NeuQuant, trained on up to 8 frames spread over it), and each frame after the
/// first stores only the rectangle that changed, with unchanged pixels transparent: a wall
/// history of 100 frames is a few MB and takes about a second, not 18 MB and 13 s.
pub fn save_gif_with_progress(
    frames: &[RgbImage],
    delay_ms: u32,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Msg(format!("{}: {e}", path.display()));
    let Some(first) = frames.first() else {
        return Err(err(&"no frames to write"));
    };
    let (w, h) = first.dimensions();
    if let Some(bad) = frames.iter().find(|f| f.dimensions() != (w, h)) {
        return Err(err(&format!(
            "frames differ in size ({}x{} vs {w}x{h})",
            bad.width(),
            bad.height()
        )));
    }
    let (gw, gh) = (
        u16::try_from(w).map_err(|_| err(&format!("{w} pixels wide, GIF allows 65535")))?,
        u16::try_from(h).map_err(|_| err(&format!("{h} pixels high, GIF allows 65535")))?,
    );
    let step = frames.len().div_ceil(PALETTE_SAMPLE_FRAMES).max(1);
    let mut sample = Vec::new();
    for f in frames.iter().step_by(step) {
        for p in f.pixels() {
            sample.extend_from_slice(&[p[0], p[1], p[2], 255]);
        }
    }
    // Few colours (flat test images, captions on a plain ground) are kept exactly; photos
    // of generated images get NeuQuant's palette. Colours outside the sample map to the
    // nearest entry.
    let mut distinct: Vec<[u8; 3]> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for px in sample.chunks_exact(4) {
        if seen.insert([px[0], px[1], px[2]]) {
            distinct.push([px[0], px[1], px[2]]);
            if distinct.len() > COLOURS {
                break;
            }
        }
    }
    let quant =
        (distinct.len() > COLOURS).then(|| color_quant::NeuQuant::new(10, COLOURS, &sample));
    let mut palette = match &quant {
        Some(nq) => nq.color_map_rgb(),
        None => distinct.concat(),
    };
    palette.resize(3 * usize::from(TRANSPARENT), 0);
    palette.extend_from_slice(&[0, 0, 0]); // the transparent index
    let mut lookup: HashMap<[u8; 3], u8> = HashMap::new();
    let mut index = |p: &image::Rgb<u8>| -> u8 {
        *lookup.entry(p.0).or_insert_with(|| match &quant {
            Some(nq) => nq.index_of(&[p[0], p[1], p[2], 255]) as u8,
            None => nearest(&distinct, p.0),
        })
    };
    let delay = u16::try_from(delay_ms.div_ceil(10)).unwrap_or(u16::MAX);
    let mut buf = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut buf, gw, gh, &palette).map_err(|e| err(&e))?;
        enc.set_repeat(gif::Repeat::Infinite).map_err(|e| err(&e))?;
        let mut prev: Option<Vec<u8>> = None;
        for (i, f) in frames.iter().enumerate() {
            let idx: Vec<u8> = f.pixels().map(&mut index).collect();
            let (w, h) = (w as usize, h as usize);
            // The rectangle of pixels that differ from the previous frame.
            let rect = match &prev {
                None => Some((0, 0, w, h)),
                Some(p) => changed_rect(p, &idx, w, h),
            };
            let frame = match rect {
                // Nothing changed: a 1x1 transparent frame keeps the timing.
                None => gif::Frame {
                    delay,
                    width: 1,
                    height: 1,
                    transparent: Some(TRANSPARENT),
                    buffer: vec![TRANSPARENT].into(),
                    ..gif::Frame::default()
                },
                Some((x0, y0, x1, y1)) => {
                    let mut part = Vec::with_capacity((x1 - x0) * (y1 - y0));
                    for y in y0..y1 {
                        for x in x0..x1 {
                            let k = y * w + x;
                            let same = prev.as_ref().is_some_and(|p| p[k] == idx[k]);
                            part.push(if same { TRANSPARENT } else { idx[k] });
                        }
                    }
                    gif::Frame {
                        delay,
                        left: x0 as u16,
                        top: y0 as u16,
                        width: (x1 - x0) as u16,
                        height: (y1 - y0) as u16,
                        transparent: prev.is_some().then_some(TRANSPARENT),
                        buffer: part.into(),
                        ..gif::Frame::default()
                    }
                }
            };
            enc.write_frame(&frame).map_err(|e| err(&e))?;
            prev = Some(idx);
            progress(i + 1, frames.len());
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::checkpoint::write_atomic(path, &buf)
}

/// Index of the palette entry closest to `c` (squared RGB distance).
fn nearest(palette: &[[u8; 3]], c: [u8; 3]) -> u8 {
    let d = |p: &[u8; 3]| -> i32 {
        (0..3)
            .map(|i| (i32::from(p[i]) - i32::from(c[i])).pow(2))
            .sum()
    };
    (0..palette.len())
        .min_by_key(|&i| d(&palette[i]))
        .map_or(0, |i| i as u8)
}

/// The bounding box `(x0, y0, x1, y1)` (end exclusive) of the pixels where `a` and `b` differ.
fn changed_rect(a: &[u8], b: &[u8], w: usize, h: usize) -> Option<(usize, usize, usize, usize)> {
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if a[y * w + x] != b[y * w + x] {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x1 > x0).then_some((x0, y0, x1, y1))
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

    #[test]
    fn frame_deltas_decode_to_the_frames() {
        // Five 40x30 frames with 6 colours: each differs from the one before in one small
        // square (frame 3 repeats frame 2). Decoded (deltas composed over the previous
        // frame), every pixel is exact, since 6 colours fit the palette, and the file stays
        // far below five full frames' worth of bytes.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.gif");
        let colours = [
            [250u8, 10, 10],
            [10, 250, 10],
            [10, 10, 250],
            [240, 240, 20],
            [20, 20, 20],
            [200, 200, 200],
        ];
        let mut frames = vec![RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb(colours[((x / 8 + y / 8) % 4) as usize])
        })];
        for i in 1..5u32 {
            let mut f = frames.last().unwrap().clone();
            if i != 3 {
                for y in 10..14 {
                    for x in 5 * i..5 * i + 6 {
                        f.put_pixel(x, y, image::Rgb(colours[4 + (i % 2) as usize]));
                    }
                }
            }
            frames.push(f);
        }
        let mut seen = vec![];
        save_gif_with_progress(&frames, 100, &p, &mut |d, n| seen.push((d, n))).unwrap();
        assert_eq!(seen.last(), Some(&(5, 5)));
        let dec = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&p).unwrap(),
        ))
        .unwrap();
        use image::AnimationDecoder;
        let got = dec.into_frames().collect_frames().unwrap();
        assert_eq!(got.len(), 5);
        for (i, (g, want)) in got.iter().zip(&frames).enumerate() {
            for (x, y, px) in want.enumerate_pixels() {
                let q = g.buffer().get_pixel(x, y);
                assert_eq!([q[0], q[1], q[2]], px.0, "frame {i} pixel ({x}, {y})");
            }
        }
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size < 2000, "{size} bytes");
    }
}
