//! Captioned sample sheets: a batch of images laid out on a grid, zoomed by an integer
//! factor, with optional row captions (left margin), column captions (above the columns)
//! and a title, all rendered with the public-domain 8x8 bitmap font of `font8x8`.
//!
//! Used by `ganscope sample`, the trainer's periodic grids and the explorer's export.
//!
//! Geometry (all in pixels; `s` = scale, `p` = padding, `T` = [`TEXT_PAD`]):
//!
//! ```text
//! +--------------------------------------------------+
//! | title band: T + 8 + T              (if a title)  |
//! | column-caption band: T + lines*10-2 + T  (if any)|
//! | row margin |p| cell |p| cell |p| ... |p|        |
//! |            |p|                                   |
//! | T+chars*8+T| cell |p| cell ...                   |
//! +--------------------------------------------------+
//! ```
//!
//! A cell is `width*s` x `height*s`. Row `r`, column `c` starts at
//! `x = left + p + c*(cell_w + p)`, `y = top + p + r*(row_h + p)`, where `left` is the
//! row-caption margin (0 without row captions), `top` the title and column-caption bands,
//! and `row_h` is the cell height (at least one glyph tall when there are row captions).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::images::Images;

/// Sheet background.
pub const BACKGROUND: Rgb<u8> = Rgb([24, 24, 24]);
/// Caption and title colour.
pub const TEXT_COLOR: Rgb<u8> = Rgb([220, 220, 220]);
/// Longest caption line, in characters; longer captions wrap or end in an ellipsis.
pub const MAX_CAPTION_CHARS: usize = 28;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 64;
/// Blank space around text blocks.
pub const TEXT_PAD: u32 = 4;

/// Glyph size of the bitmap font.
const GLYPH: u32 = 8;
/// Line pitch: glyph plus two pixels of leading.
const LINE_H: u32 = 10;
/// Most lines of a row caption (fewer when the row is not tall enough).
const MAX_ROW_LINES: usize = 3;
/// Most lines of a column caption.
const MAX_COL_LINES: usize = 2;
/// Largest sheet side we are willing to allocate.
const MAX_SIDE: u64 = 32_768;
/// Marks truncated text; never produced from user text (non-ASCII becomes '?').
const ELLIPSIS: char = '\u{2026}';
/// A one-cell "...": three 1-pixel-wide dots on the baseline rows.
const ELLIPSIS_GLYPH: [u8; 8] = [0, 0, 0, 0, 0, 0x49, 0x49, 0];

/// How a sheet is laid out. Images go row-major: image `r * cols + c` is at row `r`,
/// column `c`. Caption lists are either empty (no captions) or exactly `rows` / `cols` long.
#[derive(Debug, Clone)]
pub struct SheetLayout {
    pub rows: usize,
    pub cols: usize,
    /// Integer nearest-neighbour zoom (>= 1).
    pub scale: u32,
    /// Gap between cells and around the grid, in pixels.
    pub padding: u32,
    pub row_captions: Vec<String>,
    pub col_captions: Vec<String>,
    pub title: Option<String>,
}

impl Default for SheetLayout {
    fn default() -> Self {
        Self {
            rows: 1,
            cols: 1,
            scale: 2,
            padding: 2,
            row_captions: Vec::new(),
            col_captions: Vec::new(),
            title: None,
        }
    }
}

impl SheetLayout {
    /// A `rows` x `cols` layout with default scale and padding and no captions.
    pub fn grid(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            ..Self::default()
        }
    }

    /// The same layout at another integer zoom.
    pub fn with_scale(mut self, scale: u32) -> Self {
        self.scale = scale;
        self
    }

    /// A near-square layout for `n` images (see [`grid_dims`]).
    pub fn for_count(n: usize) -> Self {
        let (rows, cols) = grid_dims(n);
        Self::grid(rows, cols)
    }
}

/// A near-square `(rows, cols)` for `n` images with `rows * cols == n` exactly (so the result
/// is always accepted by [`sample_sheet`]) and `rows <= cols`: the divisor pair closest to a
/// square. Highly composite counts give square-ish grids (16 -> 4x4, 12 -> 3x4, 10 -> 2x5);
/// a prime count gives a single row. `n == 0` gives `(0, 0)`.
pub fn grid_dims(n: usize) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    let mut rows = n.isqrt();
    while !n.is_multiple_of(rows) {
        rows -= 1;
    }
    (rows, n / rows)
}

/// Render `images` as a captioned sheet (see the module docs for the geometry).
///
/// Errors when `images.n != rows * cols`, when a non-empty caption list does not have
/// `rows` / `cols` entries, when `scale == 0`, when the grid is empty, when the images are
/// neither 1- nor 3-channel, or when the sheet would be unreasonably large.
pub fn sample_sheet(images: &Images, layout: &SheetLayout) -> Result<RgbImage> {
    let geo = Geometry::new(images, layout)?;
    let mut img = RgbImage::from_pixel(geo.width, geo.height, BACKGROUND);

    // Images.
    let s = layout.scale;
    let (w, h) = (images.width as u32, images.height as u32);
    for i in 0..images.n {
        let rgb = images.rgb8(i)?;
        let (x0, y0) = geo.cell_origin(i / layout.cols, i % layout.cols);
        for y in 0..h {
            for x in 0..w {
                let o = ((y * w + x) * 3) as usize;
                let px = Rgb([rgb[o], rgb[o + 1], rgb[o + 2]]);
                for dy in 0..s {
                    for dx in 0..s {
                        img.put_pixel(x0 + x * s + dx, y0 + y * s + dy, px);
                    }
                }
            }
        }
    }

    // Title, centred on the sheet.
    if let Some(line) = &geo.title_line {
        let x = (geo.width - text_width(line)) / 2;
        draw_text(&mut img, x, TEXT_PAD, line);
    }

    // Column captions: centred over their column, each line centred.
    for (c, lines) in geo.col_lines.iter().enumerate() {
        let (cx, _) = geo.cell_origin(0, c);
        for (k, line) in lines.iter().enumerate() {
            let x = cx + (geo.cell_w - text_width(line).min(geo.cell_w)) / 2;
            let y = geo.title_h + TEXT_PAD + k as u32 * LINE_H;
            draw_text(&mut img, x, y, line);
        }
    }

    // Row captions: left-aligned in the margin, block centred on the row.
    for (r, lines) in geo.row_lines.iter().enumerate() {
        if lines.is_empty() {
            continue;
        }
        let (_, ry) = geo.cell_origin(r, 0);
        let block_h = lines.len() as u32 * LINE_H - (LINE_H - GLYPH);
        let y0 = ry + geo.row_h.saturating_sub(block_h) / 2;
        for (k, line) in lines.iter().enumerate() {
            draw_text(&mut img, TEXT_PAD, y0 + k as u32 * LINE_H, line);
        }
    }

    Ok(img)
}

/// `img` encoded as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Msg(format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// Write `img` as a PNG at `path` atomically: encode in memory, write `<path>.tmp-<pid>` in the
/// same directory, fsync it, rename it over `path`. Creates the parent directory if missing.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let bytes = png_bytes(img).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    save_png_bytes(&bytes, path)
}

/// Write PNG bytes (from [`png_bytes`]) at `path` atomically, as [`save_png`] does.
pub fn save_png_bytes(bytes: &[u8], path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Msg(format!("{}: not a file path", path.display())))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    let mut tmp_name = name.to_os_string();
    tmp_name.push(crate::checkpoint::tmp_suffix());
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let write_tmp = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write_tmp() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename itself durable where the platform allows it; best effort.
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(parent.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Everything [`sample_sheet`] needs to know about where things go.
#[derive(Debug)]
struct Geometry {
    width: u32,
    height: u32,
    padding: u32,
    /// Scaled image width.
    cell_w: u32,
    /// Row pitch without padding: `cell_h`, or one glyph if that is taller and rows are captioned.
    row_h: u32,
    /// Row-caption margin width (0 without row captions).
    left: u32,
    /// Title band height (0 without a title).
    title_h: u32,
    /// Title band plus column-caption band.
    top: u32,
    title_line: Option<String>,
    row_lines: Vec<Vec<String>>,
    col_lines: Vec<Vec<String>>,
}

impl Geometry {
    fn new(images: &Images, layout: &SheetLayout) -> Result<Self> {
        let err = |m: String| Err(Error::Msg(format!("sample sheet: {m}")));
        let (rows, cols) = (layout.rows, layout.cols);
        if layout.scale == 0 {
            return err("scale must be at least 1".into());
        }
        if rows == 0 || cols == 0 {
            return err(format!("empty {rows}x{cols} grid"));
        }
        if rows.checked_mul(cols) != Some(images.n) {
            return err(format!(
                "a {rows}x{cols} grid needs {} images, got {}",
                rows.saturating_mul(cols),
                images.n
            ));
        }
        if !layout.row_captions.is_empty() && layout.row_captions.len() != rows {
            return err(format!(
                "{} row captions for {rows} rows",
                layout.row_captions.len()
            ));
        }
        if !layout.col_captions.is_empty() && layout.col_captions.len() != cols {
            return err(format!(
                "{} column captions for {cols} columns",
                layout.col_captions.len()
            ));
        }
        if images.channels != 1 && images.channels != 3 {
            return err(format!(
                "cannot show {}-channel images (need 1 or 3)",
                images.channels
            ));
        }
        if images.width == 0 || images.height == 0 {
            return err(format!("empty {}x{} images", images.width, images.height));
        }
        if images.data.len() != images.n * images.image_len() {
            return err(format!(
                "batch holds {} values, expected {} for {}x{}x{}x{}",
                images.data.len(),
                images.n * images.image_len(),
                images.n,
                images.channels,
                images.height,
                images.width
            ));
        }

        let too_big = || {
            err(format!(
                "a {rows}x{cols} sheet of these images is too large"
            ))
        };
        let s = layout.scale as u64;
        let p = layout.padding as u64;
        let cell_w = images.width as u64 * s;
        let cell_h = images.height as u64 * s;
        if cell_w > MAX_SIDE || cell_h > MAX_SIDE || p > MAX_SIDE {
            return too_big();
        }
        let has_row_caps = !layout.row_captions.is_empty();
        let row_h = if has_row_caps {
            cell_h.max(GLYPH as u64)
        } else {
            cell_h
        };

        // Row captions: as many lines as fit in the row, 1 to MAX_ROW_LINES.
        let row_max_lines = ((row_h + (LINE_H - GLYPH) as u64) / LINE_H as u64)
            .clamp(1, MAX_ROW_LINES as u64) as usize;
        let row_lines: Vec<Vec<String>> = layout
            .row_captions
            .iter()
            .map(|t| wrap(t, MAX_CAPTION_CHARS, row_max_lines))
            .collect();
        let margin_chars = max_chars(&row_lines);
        let left = if margin_chars > 0 {
            2 * TEXT_PAD as u64 + margin_chars as u64 * GLYPH as u64
        } else {
            0
        };

        // Column captions: as many characters as fit in the column, keeping half a glyph
        // free so that neighbouring captions never run into each other.
        let col_chars = ((cell_w.saturating_sub(GLYPH as u64 / 2) / GLYPH as u64) as usize)
            .min(MAX_CAPTION_CHARS);
        let col_lines: Vec<Vec<String>> = layout
            .col_captions
            .iter()
            .map(|t| wrap(t, col_chars, MAX_COL_LINES))
            .collect();
        let col_n_lines = col_lines.iter().map(Vec::len).max().unwrap_or(0) as u64;
        let col_h = if col_n_lines > 0 {
            2 * TEXT_PAD as u64 + col_n_lines * LINE_H as u64 - (LINE_H - GLYPH) as u64
        } else {
            0
        };

        let title_line = layout
            .title
            .as_deref()
            .and_then(|t| wrap(t, MAX_TITLE_CHARS, 1).into_iter().next());
        let title_h = if title_line.is_some() {
            2 * TEXT_PAD as u64 + GLYPH as u64
        } else {
            0
        };
        let title_w = title_line
            .as_ref()
            .map_or(0, |l| 2 * TEXT_PAD as u64 + text_width(l) as u64);

        let grid_w = (cols as u64).checked_mul(cell_w + p).map(|g| g + p + left);
        let grid_h = (rows as u64)
            .checked_mul(row_h + p)
            .map(|g| g + p + title_h + col_h);
        let (Some(grid_w), Some(height)) = (grid_w, grid_h) else {
            return too_big();
        };
        let width = grid_w.max(title_w);
        if width > MAX_SIDE || height > MAX_SIDE {
            return too_big();
        }

        Ok(Self {
            width: width as u32,
            height: height as u32,
            padding: p as u32,
            cell_w: cell_w as u32,
            row_h: row_h as u32,
            left: left as u32,
            title_h: title_h as u32,
            top: (title_h + col_h) as u32,
            title_line,
            row_lines,
            col_lines,
        })
    }

    /// Top-left pixel of the cell at row `r`, column `c`.
    fn cell_origin(&self, r: usize, c: usize) -> (u32, u32) {
        let p = self.padding;
        (
            self.left + p + c as u32 * (self.cell_w + p),
            self.top + p + r as u32 * (self.row_h + p),
        )
    }
}

fn max_chars(lines: &[Vec<String>]) -> usize {
    lines
        .iter()
        .flatten()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
}

/// Pixel width of a rendered line.
fn text_width(line: &str) -> u32 {
    line.chars().count() as u32 * GLYPH
}

/// Whitespace becomes a plain space, printable ASCII stays, anything else becomes '?'.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() {
                ' '
            } else if c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Break `text` into at most `max_lines` lines of at most `width` characters.
///
/// Comma- or semicolon-separated items (i-CLEVR label lists such as
/// `"red cube, blue sphere, gray cylinder"`) are kept whole on a line when they fit; an item
/// too long for a line is word-wrapped, and a word too long for a line is split. Text that does
/// not fit in `max_lines` lines ends in an ellipsis on the last line, which is refilled with as
/// much of the remaining text as fits. Empty or blank text gives no lines.
fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let clean = sanitize(text);
    let flat = clean.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() || width == 0 || max_lines == 0 {
        return Vec::new();
    }
    if flat.len() <= width {
        return vec![flat];
    }

    // Word byte ranges in `flat` (ASCII, so bytes are characters).
    let mut words = Vec::new();
    let mut start = 0;
    for w in flat.split(' ') {
        words.push((start, start + w.len()));
        start += w.len() + 1;
    }
    // Units to place: whole items when they fit, else their words, long words in chunks.
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut item_start = 0;
    for (k, &(_, we)) in words.iter().enumerate() {
        let ends_item = matches!(flat.as_bytes()[we - 1], b',' | b';') || k + 1 == words.len();
        if !ends_item {
            continue;
        }
        let (is, ie) = (words[item_start].0, we);
        if ie - is <= width {
            units.push((is, ie));
        } else {
            for &(a, b) in &words[item_start..=k] {
                let mut a = a;
                while b - a > width {
                    units.push((a, a + width));
                    a += width;
                }
                units.push((a, b));
            }
        }
        item_start = k + 1;
    }
    // Greedy packing; a line is a byte range of `flat`.
    let mut lines: Vec<(usize, usize)> = Vec::new();
    for (a, b) in units {
        match lines.last_mut() {
            Some((ls, le)) if b - *ls <= width => *le = b,
            _ => lines.push((a, b)),
        }
    }

    if lines.len() <= max_lines {
        return lines
            .into_iter()
            .map(|(a, b)| flat[a..b].to_string())
            .collect();
    }
    let mut out: Vec<String> = lines[..max_lines - 1]
        .iter()
        .map(|&(a, b)| flat[a..b].to_string())
        .collect();
    let rest = &flat[lines[max_lines - 1].0..];
    let mut last = rest[..width - 1].trim_end().to_string();
    last.push(ELLIPSIS);
    out.push(last);
    out
}

/// Draw one line of text with its top-left corner at `(x, y)`; pixels off the image are dropped.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, line: &str) {
    for (i, ch) in line.chars().enumerate() {
        let glyph = if ch == ELLIPSIS {
            ELLIPSIS_GLYPH
        } else if ch.is_ascii() {
            font8x8::legacy::BASIC_LEGACY[ch as usize]
        } else {
            font8x8::legacy::BASIC_LEGACY[b'?' as usize]
        };
        let gx = x + i as u32 * GLYPH;
        for (row, bits) in glyph.iter().enumerate() {
            for bit in 0..8 {
                if bits >> bit & 1 == 1 {
                    let (px, py) = (gx + bit, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, TEXT_COLOR);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` images of `channels` x `h` x `w`, image `i` filled with the constant `value(i)`
    /// (the same value in every channel unless `rgb` varies it per channel).
    fn constant_images(
        n: usize,
        channels: usize,
        h: usize,
        w: usize,
        value: impl Fn(usize, usize) -> f32,
    ) -> Images {
        let mut data = Vec::with_capacity(n * channels * h * w);
        for i in 0..n {
            for ch in 0..channels {
                data.extend(std::iter::repeat_n(value(i, ch), h * w));
            }
        }
        Images {
            n,
            channels,
            height: h,
            width: w,
            data,
        }
    }

    fn is_text(p: &Rgb<u8>) -> bool {
        *p == TEXT_COLOR
    }

    #[test]
    fn grid_dims_is_exact_and_near_square() {
        assert_eq!(grid_dims(0), (0, 0));
        assert_eq!(grid_dims(1), (1, 1));
        assert_eq!(grid_dims(16), (4, 4));
        assert_eq!(grid_dims(12), (3, 4));
        assert_eq!(grid_dims(10), (2, 5));
        assert_eq!(grid_dims(64), (8, 8));
        assert_eq!(grid_dims(7), (1, 7));
        for n in 1..200 {
            let (r, c) = grid_dims(n);
            assert_eq!(r * c, n);
            assert!(r <= c);
        }
        let l = SheetLayout::for_count(6);
        assert_eq!((l.rows, l.cols, l.scale, l.padding), (2, 3, 2, 2));
    }

    #[test]
    fn dimensions_of_known_layout() {
        // 2 rows x 3 cols of 3x8x10 (C x H x W) images, scale 3, padding 2.
        // Cell: 10*3 = 30 wide, 8*3 = 24 tall.
        // Row captions "a" and "abcde": one line each (fits in 28 chars), longest 5 chars,
        //   margin = TEXT_PAD + 5*8 + TEXT_PAD = 4 + 40 + 4 = 48.
        // Column captions "x", "y", "z": one line each, band = 4 + 8 + 4 = 16.
        // Title "t": band = 4 + 8 + 4 = 16.
        // Width  = margin + p + cols*(cell_w + p) = 48 + 2 + 3*32 = 146.
        // Height = title + colband + p + rows*(cell_h + p) = 16 + 16 + 2 + 2*26 = 86.
        // Cell (1, 2) starts at x = 48 + 2 + 2*32 = 114, y = 32 + 2 + 1*26 = 60.
        let imgs = constant_images(6, 3, 8, 10, |_, _| 0.0);
        let layout = SheetLayout {
            rows: 2,
            cols: 3,
            scale: 3,
            padding: 2,
            row_captions: vec!["a".into(), "abcde".into()],
            col_captions: vec!["x".into(), "y".into(), "z".into()],
            title: Some("t".into()),
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        assert_eq!(sheet.dimensions(), (146, 86));
        let geo = Geometry::new(&imgs, &layout).unwrap();
        assert_eq!(geo.cell_origin(1, 2), (114, 60));

        // Without any captions: width = 2 + 3*32 = 98, height = 2 + 2*26 = 54.
        let plain = SheetLayout {
            row_captions: vec![],
            col_captions: vec![],
            title: None,
            ..layout
        };
        assert_eq!(sample_sheet(&imgs, &plain).unwrap().dimensions(), (98, 54));
    }

    #[test]
    fn cells_land_where_computed_with_their_colour() {
        // Distinct constant RGB per image: channel ch of image i is a distinct value.
        let val = |i: usize, ch: usize| -0.9 + 0.1 * i as f32 + 0.6 * ch as f32;
        let imgs = constant_images(6, 3, 5, 4, val);
        let layout = SheetLayout {
            rows: 2,
            cols: 3,
            scale: 2,
            padding: 3,
            row_captions: vec!["row zero".into(), "row one".into()],
            col_captions: vec!["c0".into(), "c1".into(), "c2".into()],
            title: Some("colours".into()),
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        let geo = Geometry::new(&imgs, &layout).unwrap();
        for r in 0..2 {
            for c in 0..3 {
                let i = r * 3 + c;
                let want = Rgb([
                    crate::images::to_u8(val(i, 0)),
                    crate::images::to_u8(val(i, 1)),
                    crate::images::to_u8(val(i, 2)),
                ]);
                let (x, y) = geo.cell_origin(r, c);
                // Whole scaled cell has the colour, and the pixel just before it is background.
                for dy in 0..10 {
                    for dx in 0..8 {
                        assert_eq!(*sheet.get_pixel(x + dx, y + dy), want, "image {i}");
                    }
                }
                assert_eq!(*sheet.get_pixel(x - 1, y), BACKGROUND);
                assert_eq!(*sheet.get_pixel(x, y - 1), BACKGROUND);
                assert_eq!(*sheet.get_pixel(x + 8, y), BACKGROUND);
                assert_eq!(*sheet.get_pixel(x, y + 10), BACKGROUND);
            }
        }
    }

    #[test]
    fn nearest_neighbour_scaling_keeps_pixels() {
        // One 1x2x2 grey image with four distinct pixels, scale 3, no padding.
        let imgs = Images {
            n: 1,
            channels: 1,
            height: 2,
            width: 2,
            data: vec![-1.0, -0.5, 0.5, 1.0],
        };
        let layout = SheetLayout {
            scale: 3,
            padding: 0,
            ..SheetLayout::default()
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        assert_eq!(sheet.dimensions(), (6, 6));
        for (k, v) in imgs.data.iter().enumerate() {
            let g = crate::images::to_u8(*v);
            let (x0, y0) = ((k % 2) as u32 * 3, (k / 2) as u32 * 3);
            for d in 0..9 {
                assert_eq!(*sheet.get_pixel(x0 + d % 3, y0 + d / 3), Rgb([g, g, g]));
            }
        }
    }

    #[test]
    fn grey_images_shown_as_grey() {
        let imgs = constant_images(4, 1, 3, 3, |i, _| -0.5 + 0.25 * i as f32);
        let layout = SheetLayout::grid(2, 2);
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        let geo = Geometry::new(&imgs, &layout).unwrap();
        for i in 0..4 {
            let g = crate::images::to_u8(-0.5 + 0.25 * i as f32);
            let (x, y) = geo.cell_origin(i / 2, i % 2);
            assert_eq!(*sheet.get_pixel(x + 5, y + 5), Rgb([g, g, g]));
        }
    }

    #[test]
    fn captions_stay_in_their_bands() {
        // Black images, so every light pixel is text.
        let imgs = constant_images(6, 3, 16, 16, |_, _| -1.0);
        let layout = SheetLayout {
            rows: 2,
            cols: 3,
            scale: 2,
            padding: 2,
            row_captions: vec![
                "red cube, blue sphere, gray cylinder".into(),
                "yellow cylinder".into(),
            ],
            col_captions: vec![],
            title: None,
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        let geo = Geometry::new(&imgs, &layout).unwrap();
        assert!(geo.left > 0);
        let mut per_row = [0usize; 2];
        for (x, y, p) in sheet.enumerate_pixels() {
            if is_text(p) {
                assert!(
                    x < geo.left - TEXT_PAD,
                    "text pixel outside margin at ({x},{y})"
                );
                for (r, count) in per_row.iter_mut().enumerate() {
                    let (_, ry) = geo.cell_origin(r, 0);
                    if (ry..ry + geo.row_h).contains(&y) {
                        *count += 1;
                    }
                }
            }
        }
        assert!(per_row[0] > 50 && per_row[1] > 20, "{per_row:?}");
        // All text pixels are accounted for by the rows they caption.
        let total = sheet.pixels().filter(|p| is_text(p)).count();
        assert_eq!(total, per_row[0] + per_row[1]);

        // Column captions and a title live above the grid, and only there.
        let layout = SheetLayout {
            row_captions: vec![],
            col_captions: vec!["z=0".into(), "z=1".into(), "z=2".into()],
            title: Some("epoch 3".into()),
            ..layout
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        let geo = Geometry::new(&imgs, &layout).unwrap();
        assert_eq!(geo.left, 0);
        let mut title_px = 0;
        let mut col_px = [0usize; 3];
        for (x, y, p) in sheet.enumerate_pixels() {
            if is_text(p) {
                assert!(
                    y < geo.top,
                    "text pixel below the caption bands at ({x},{y})"
                );
                if y < geo.title_h {
                    title_px += 1;
                } else {
                    let c = (0..3)
                        .find(|&c| {
                            let (cx, _) = geo.cell_origin(0, c);
                            (cx..cx + geo.cell_w).contains(&x)
                        })
                        .expect("column caption pixel outside its column");
                    col_px[c] += 1;
                }
            }
        }
        assert!(title_px > 20);
        assert!(col_px.iter().all(|&n| n > 10), "{col_px:?}");
    }

    #[test]
    fn wrapping_and_truncation() {
        let w = |t: &str, n: usize| wrap(t, MAX_CAPTION_CHARS, n);
        assert_eq!(w("red cube", 3), vec!["red cube"]);
        assert_eq!(w("  a \n b\t", 3), vec!["a b"]);
        assert!(w("   ", 3).is_empty());
        // Label lists break between items.
        assert_eq!(
            w("red cube, blue sphere, gray cylinder", 3),
            vec!["red cube, blue sphere,", "gray cylinder"]
        );
        // One line: as much as fits, then an ellipsis.
        let one = w("red cube, blue sphere, gray cylinder", 1);
        assert_eq!(one, vec![format!("red cube, blue sphere, gray{ELLIPSIS}")]);
        assert!(one[0].chars().count() <= MAX_CAPTION_CHARS);
        // Too many lines: the last kept line is refilled and ends in an ellipsis.
        let long = "red cube, blue sphere, gray cylinder, green cube, purple sphere, \
                    cyan cylinder, brown cube, yellow sphere";
        let lines = w(long, 3);
        assert_eq!(lines.len(), 3);
        assert!(lines[2].ends_with(ELLIPSIS));
        assert!(lines.iter().all(|l| l.chars().count() <= MAX_CAPTION_CHARS));
        // A long unbreakable word is split.
        let word = "x".repeat(40);
        assert_eq!(w(&word, 3), vec!["x".repeat(28), "x".repeat(12)]);
        // Non-ASCII becomes '?'.
        assert_eq!(w("café ☕", 1), vec!["caf? ?"]);
        // Narrow columns.
        assert_eq!(wrap("abcdef", 4, 1), vec![format!("abc{ELLIPSIS}")]);
        assert_eq!(wrap("abcdef", 1, 1), vec![ELLIPSIS.to_string()]);
        assert!(wrap("abcdef", 0, 2).is_empty());
    }

    #[test]
    fn row_caption_lines_follow_row_height() {
        let cap = "red cube, blue sphere, gray cylinder, green cube, purple sphere";
        // Lines of 8 px with 2 px leading: n lines need 10n - 2 px.
        // 8..=17 px rows: one line (truncated); 18..=27: two; 28 and more: three at most.
        for (h, lines) in [(8, 1), (17, 1), (18, 2), (27, 2), (28, 3), (64, 3)] {
            let imgs = constant_images(1, 1, h, 4, |_, _| 0.0);
            let layout = SheetLayout {
                scale: 1,
                row_captions: vec![cap.into()],
                ..SheetLayout::default()
            };
            let geo = Geometry::new(&imgs, &layout).unwrap();
            assert_eq!(geo.row_lines[0].len(), lines, "height {h}");
        }
        // Tiny images still get a row one glyph tall for their caption.
        let imgs = constant_images(1, 1, 2, 2, |_, _| 0.0);
        let layout = SheetLayout {
            scale: 1,
            row_captions: vec!["tiny".into()],
            ..SheetLayout::default()
        };
        let geo = Geometry::new(&imgs, &layout).unwrap();
        assert_eq!(geo.row_h, 8);
    }

    #[test]
    fn mismatches_are_errors() {
        let imgs = constant_images(6, 3, 4, 4, |_, _| 0.0);
        let ok = SheetLayout::grid(2, 3);
        assert!(sample_sheet(&imgs, &ok).is_ok());
        let bad = [
            SheetLayout::grid(2, 2),
            SheetLayout::grid(3, 3),
            SheetLayout::grid(0, 3),
            SheetLayout {
                scale: 0,
                ..ok.clone()
            },
            SheetLayout {
                row_captions: vec!["a".into()],
                ..ok.clone()
            },
            SheetLayout {
                col_captions: vec!["a".into(), "b".into()],
                ..ok.clone()
            },
            SheetLayout {
                scale: 100_000,
                ..ok.clone()
            },
        ];
        for layout in &bad {
            let e = sample_sheet(&imgs, layout).expect_err("should fail");
            assert!(e.to_string().starts_with("sample sheet:"), "{e}");
        }
        let two_channel = constant_images(6, 2, 4, 4, |_, _| 0.0);
        assert!(sample_sheet(&two_channel, &ok).is_err());
        let mut short = imgs.clone();
        short.data.pop();
        assert!(sample_sheet(&short, &ok).is_err());
    }

    #[test]
    fn png_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for channels in [1, 3] {
            let imgs = constant_images(4, channels, 6, 5, |i, ch| {
                -1.0 + 0.4 * i as f32 + 0.3 * ch as f32
            });
            let layout = SheetLayout {
                rows: 2,
                cols: 2,
                row_captions: vec!["one".into(), "two".into()],
                title: Some("round trip".into()),
                ..SheetLayout::default()
            };
            let sheet = sample_sheet(&imgs, &layout).unwrap();
            // Parent directory does not exist yet.
            let path = dir.path().join(format!("nested/c{channels}/sheet.png"));
            save_png(&sheet, &path).unwrap();
            // Overwriting works too.
            save_png(&sheet, &path).unwrap();
            let back = image::open(&path).unwrap().to_rgb8();
            assert_eq!(back, sheet);
            let tmp = format!("sheet.png{}", crate::checkpoint::tmp_suffix());
            assert!(!path.with_file_name(tmp).exists());
        }
    }

    #[test]
    fn save_png_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"x").unwrap();
        let path = blocker.join("sheet.png");
        let e = save_png(&RgbImage::new(2, 2), &path).expect_err("parent is a file");
        assert!(e.to_string().contains(&*blocker.to_string_lossy()), "{e}");
    }

    /// Renders an example sheet for eyeballing:
    /// `cargo test --lib export::sheet -- --ignored`, then look at /tmp/sheet_example.png
    /// (or the path in `GANSCOPE_SHEET_EXAMPLE`).
    #[test]
    #[ignore]
    fn render_example_sheet() {
        let (h, w) = (32, 32);
        let mut data = Vec::new();
        for i in 0..12 {
            for ch in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let t = match ch {
                            0 => x as f32 / (w - 1) as f32,
                            1 => y as f32 / (h - 1) as f32,
                            _ => i as f32 / 11.0,
                        };
                        data.push(t * 2.0 - 1.0);
                    }
                }
            }
        }
        let imgs = Images {
            n: 12,
            channels: 3,
            height: h,
            width: w,
            data,
        };
        let layout = SheetLayout {
            rows: 3,
            cols: 4,
            scale: 2,
            padding: 2,
            row_captions: vec![
                "red cube".into(),
                "red cube, blue sphere, gray cylinder".into(),
                "green cube, purple sphere, cyan cylinder, brown cube, yellow sphere".into(),
            ],
            col_captions: vec![
                "seed 0".into(),
                "seed 1, truncation 0.5".into(),
                "z seed 2 (long caption)".into(),
                "naïve".into(),
            ],
            title: Some("i-CLEVR cGAN - epoch 42".into()),
        };
        let sheet = sample_sheet(&imgs, &layout).unwrap();
        let path = std::env::var_os("GANSCOPE_SHEET_EXAMPLE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/sheet_example.png"));
        save_png(&sheet, &path).unwrap();
        eprintln!(
            "wrote {} ({}x{})",
            path.display(),
            sheet.width(),
            sheet.height()
        );
    }
}
