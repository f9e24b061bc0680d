//! Datasets from folders of images: one subfolder per class ([`load_class_folder`]) or a
//! multi-label attribute list beside the images ([`load_attribute_folder`], the layout of the
//! selected CartoonSet-100k faces and of CelebA's `list_attr_celeba.txt`).
//!
//! Images are decoded (PNG and GIF: JPEG and the other formats are not built in, and asking
//! for them is an error that says so), converted to RGB (grey is replicated to three channels;
//! transparent pixels are composited over white), resized to `size` x `size` with a triangle
//! (bilinear) filter — the aspect ratio is not kept — and stored CHW. Decoding runs on all
//! cores, over contiguous chunks of the (sorted, so deterministic) list of images; when
//! several images fail, the error is always about the first of them in that order.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageFormat, ImageReader, Rgb, RgbImage};

use super::{ConditionKind, InMemoryDataset};
use crate::error::{Error, Result};

/// The message for JPEG files (the `jpeg` feature of `image` is not enabled).
pub const JPEG_UNSUPPORTED: &str = "JPEG is not supported in this build; convert to PNG";
/// Names of the attribute list looked for in a folder given to [`load_attribute_folder`], in
/// order.
pub const ATTRIBUTE_FILE_NAMES: [&str; 2] = ["cartoon_attr.txt", "list_attr_celeba.txt"];
/// Subfolders (besides the list's own folder) where the listed images are looked for.
pub const ATTRIBUTE_IMAGE_DIRS: [&str; 2] = ["images", "img_align_celeba"];
/// Largest accepted image side.
pub const MAX_SIZE: usize = 4096;
/// Most decoding threads.
const MAX_THREADS: usize = super::MAX_DECODE_THREADS;

// ---------------------------------------------------------------------------------------------
// One image
// ---------------------------------------------------------------------------------------------

/// What a file's extension says about it.
enum Kind {
    /// PNG or GIF: decodable.
    Image,
    /// An image format this build cannot decode; the message says so.
    Unsupported(String),
    /// Not an image file.
    Other,
}

fn kind_of(path: &Path) -> Kind {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" | "gif" => Kind::Image,
        "jpg" | "jpeg" | "jpe" | "jfif" => Kind::Unsupported(JPEG_UNSUPPORTED.to_string()),
        "bmp" | "webp" | "tif" | "tiff" | "avif" | "heic" | "heif" | "ico" | "tga" | "qoi"
        | "exr" | "hdr" | "dds" | "pnm" | "ppm" | "pgm" | "pbm" | "pam" | "ff" => {
            Kind::Unsupported(unsupported_msg(&ext.to_ascii_uppercase()))
        }
        _ => Kind::Other,
    }
}

fn unsupported_msg(format: &str) -> String {
    format!("{format} images are not supported in this build (only PNG and GIF); convert to PNG")
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn check_size(size: usize) -> Result<u32> {
    if size == 0 || size > MAX_SIZE {
        return Err(Error::Msg(format!(
            "image size {size} is out of range (1..={MAX_SIZE})"
        )));
    }
    Ok(size as u32)
}

/// RGB with transparent pixels composited over white.
fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as u32;
        Rgb([0, 1, 2].map(|c| ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8))
    })
}

/// Decode `path` into `out` (3 x size x size, CHW). `context` is appended to every message
/// (e.g. " (listed on line 5 of ...)").
fn read_into(path: &Path, size: u32, context: &str, out: &mut [u8]) -> Result<()> {
    let bad = |msg: String| Error::bad_file(path, format!("{msg}{context}"));
    if let Kind::Unsupported(msg) = kind_of(path) {
        return Err(bad(msg));
    }
    let mut reader = ImageReader::open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad("image not found".to_string())
            } else {
                bad(format!("cannot open image: {e}"))
            }
        })?
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Gif) => {}
        Some(ImageFormat::Jpeg) => return Err(bad(JPEG_UNSUPPORTED.to_string())),
        Some(f) => {
            let name = f.extensions_str().first().copied().unwrap_or("this format");
            return Err(bad(unsupported_msg(&name.to_ascii_uppercase())));
        }
        None => {
            return Err(bad(
                "not a recognised image (expected a PNG or GIF file)".to_string()
            ));
        }
    }
    reader.limits(super::decode_limits());
    // Decoders are not supposed to panic on bad data; make sure one cannot take the load
    // down if it does.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| bad("the image decoder crashed on this file".to_string()))?
        .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    let mut rgb = to_rgb(decoded);
    if rgb.dimensions() != (size, size) {
        if rgb.width() == 0 || rgb.height() == 0 {
            return Err(bad("image has no pixels".to_string()));
        }
        rgb = imageops::resize(&rgb, size, size, FilterType::Triangle);
    }
    let plane = (size * size) as usize;
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c];
        }
    }
    Ok(())
}

/// Decode one PNG or GIF image as RGB, resized to `size` x `size`, CHW bytes.
pub fn read_image_chw(path: &Path, size: usize) -> Result<Vec<u8>> {
    let s = check_size(size)?;
    let mut out = vec![0u8; 3 * size * size];
    read_into(path, s, "", &mut out)?;
    Ok(out)
}

/// Decode many images (see [`read_image_chw`]) on all cores; the result is their CHW bytes
/// concatenated in the order of `paths`.
pub fn read_images_chw(paths: &[PathBuf], size: usize) -> Result<Vec<u8>> {
    let jobs: Vec<(PathBuf, String)> = paths.iter().map(|p| (p.clone(), String::new())).collect();
    load_all(&jobs, size, default_threads())
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_THREADS)
}

/// Decode `jobs` (path, message context) with `threads` threads over contiguous chunks.
/// Deterministic: the pixels come in job order, and of several failures the one of the
/// earliest job is returned.
fn load_all(jobs: &[(PathBuf, String)], size: usize, threads: usize) -> Result<Vec<u8>> {
    let s = check_size(size)?;
    let image_len = 3 * size * size;
    let total = jobs.len().checked_mul(image_len).ok_or_else(|| {
        Error::Msg(format!(
            "{} images of 3x{size}x{size} are more than memory can hold",
            jobs.len()
        ))
    })?;
    let mut pixels: Vec<u8> = Vec::new();
    pixels.try_reserve_exact(total).map_err(|_| {
        Error::Msg(format!(
            "not enough memory for {} images of 3x{size}x{size} ({total} bytes)",
            jobs.len()
        ))
    })?;
    pixels.resize(total, 0);
    if jobs.is_empty() {
        return Ok(pixels);
    }
    let threads = threads.clamp(1, jobs.len());
    let chunk = jobs.len().div_ceil(threads);
    if threads == 1 {
        for ((path, ctx), out) in jobs.iter().zip(pixels.chunks_exact_mut(image_len)) {
            read_into(path, s, ctx, out)?;
        }
        return Ok(pixels);
    }
    // The lowest chunk index that failed; chunks after it stop early, chunks before it go on
    // (one of them may still fail at an earlier image).
    let failed = AtomicUsize::new(usize::MAX);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut results = Vec::new();
        for (ci, (js, out)) in jobs
            .chunks(chunk)
            .zip(pixels.chunks_mut(chunk * image_len))
            .enumerate()
        {
            let failed = &failed;
            let work = move || -> Result<()> {
                for ((path, ctx), o) in js.iter().zip(out.chunks_exact_mut(image_len)) {
                    if failed.load(Ordering::Relaxed) < ci {
                        return Ok(());
                    }
                    if let Err(e) = read_into(path, s, ctx, o) {
                        failed.fetch_min(ci, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            };
            match std::thread::Builder::new()
                .name(format!("ganscope-load-{ci}"))
                .spawn_scoped(scope, work)
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    failed.fetch_min(0, Ordering::Relaxed);
                    results.push(Err(Error::Msg(format!(
                        "cannot start an image loading thread: {e}"
                    ))));
                    break;
                }
            }
        }
        let mut joined: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Msg("an image loading thread panicked".to_string()))
                })
            })
            .collect();
        joined.append(&mut results);
        joined
    });
    for r in results {
        r?;
    }
    Ok(pixels)
}

// ---------------------------------------------------------------------------------------------
// Class folders
// ---------------------------------------------------------------------------------------------

/// The entries of `dir`, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names: Vec<OsString> = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        names.push(e.map_err(|e| Error::io(dir, e))?.file_name());
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Load a folder holding one subfolder per class (their sorted names are the class names)
/// with PNG (or GIF) images inside, as a one-hot conditioned RGB dataset of `size` x `size`
/// images. Files that are not images are skipped (see [`load_class_folder_with_skipped`]);
/// JPEG and other undecodable image formats are errors.
pub fn load_class_folder(dir: &Path, size: usize) -> Result<InMemoryDataset> {
    load_class_folder_with_skipped(dir, size).map(|(ds, _)| ds)
}

/// [`load_class_folder`], also returning the paths it skipped: hidden entries, files that are
/// not images, folders inside class folders, and files beside the class folders.
pub fn load_class_folder_with_skipped(
    dir: &Path,
    size: usize,
) -> Result<(InMemoryDataset, Vec<PathBuf>)> {
    check_size(size)?;
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::bad_file(
            dir,
            "is a file, expected a folder with one subfolder of images per class",
        ));
    }
    let mut skipped = Vec::new();
    let mut classes = Vec::new();
    let mut loose_images = 0usize;
    for p in sorted_entries(dir)? {
        if is_hidden(&p) {
            skipped.push(p);
        } else if p.is_dir() {
            classes.push(p);
        } else {
            if !matches!(kind_of(&p), Kind::Other) {
                loose_images += 1;
            }
            skipped.push(p);
        }
    }
    if classes.is_empty() {
        let hint = if loose_images > 0 {
            format!(
                "; it holds {loose_images} images directly: move each class's images into a \
                 subfolder named after the class"
            )
        } else {
            String::new()
        };
        return Err(Error::bad_file(
            dir,
            format!("no class subfolders (expected one subfolder of images per class){hint}"),
        ));
    }
    if classes.len() > u16::MAX as usize + 1 {
        return Err(Error::bad_file(
            dir,
            format!(
                "has {} class subfolders, more than the {} supported",
                classes.len(),
                u16::MAX as usize + 1
            ),
        ));
    }
    let mut jobs = Vec::new();
    let mut labels = Vec::new();
    let mut label_names = Vec::new();
    for (ci, class_dir) in classes.iter().enumerate() {
        let before = jobs.len();
        for p in sorted_entries(class_dir)? {
            if is_hidden(&p) || p.is_dir() {
                skipped.push(p);
                continue;
            }
            match kind_of(&p) {
                Kind::Image => {
                    jobs.push((p, String::new()));
                    labels.push(vec![ci as u16]);
                }
                Kind::Unsupported(msg) => return Err(Error::bad_file(&p, msg)),
                Kind::Other => skipped.push(p),
            }
        }
        if jobs.len() == before {
            return Err(Error::bad_file(
                class_dir,
                "class folder holds no PNG images",
            ));
        }
        label_names.push(
            class_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    let pixels = load_all(&jobs, size, default_threads())?;
    let ds = InMemoryDataset {
        source: dir.display().to_string(),
        channels: 3,
        height: size,
        width: size,
        pixels,
        kind: ConditionKind::OneHot,
        label_names,
        labels,
        steps: vec![],
    };
    Ok((ds, skipped))
}

// ---------------------------------------------------------------------------------------------
// Attribute lists
// ---------------------------------------------------------------------------------------------

/// A parsed attribute list (`cartoon_attr.txt`, `list_attr_celeba.txt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeList {
    /// The list file.
    pub path: PathBuf,
    /// The attribute names of line 2.
    pub names: Vec<String>,
    /// One entry per listed image, in file order.
    pub entries: Vec<AttributeEntry>,
}

/// One image line of an attribute list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeEntry {
    /// The image file name as listed (relative to the images folder).
    pub file: String,
    /// 1-based line number in the list file.
    pub line: usize,
    /// Indices of the attributes that are 1.
    pub labels: Vec<u16>,
}

/// Parse an attribute list: line 1 the number of images N, line 2 the attribute names
/// separated by whitespace, then N lines `file v1 .. vK` with each value 0 or 1 (or -1 and 1,
/// as in CelebA; -1 means 0). Blank lines are ignored. Every error names the file and line.
pub fn read_attribute_list(path: &Path) -> Result<AttributeList> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(Error::bad_file(
                path,
                format!("line {line}: not UTF-8 text"),
            ));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let bad = |line: usize, msg: String| Error::bad_file(path, format!("line {line}: {msg}"));
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));

    let Some((_, first)) = lines.next() else {
        return Err(Error::bad_file(
            path,
            "file is empty, expected the number of images on line 1, the attribute names on \
             line 2, then one line per image",
        ));
    };
    let count: usize = first.trim().parse().map_err(|_| {
        bad(
            1,
            format!(
                "expected the number of images, found `{}`",
                first.trim().chars().take(60).collect::<String>()
            ),
        )
    })?;

    let Some((_, second)) = lines.next() else {
        return Err(bad(
            2,
            "missing: the file ends after line 1; line 2 should hold the attribute names"
                .to_string(),
        ));
    };
    let names: Vec<String> = second.split_whitespace().map(str::to_string).collect();
    if names.is_empty() {
        return Err(bad(
            2,
            "expected the attribute names, found an empty line".to_string(),
        ));
    }
    if names.len() > u16::MAX as usize + 1 {
        return Err(bad(
            2,
            format!("{} attribute names, more than supported", names.len()),
        ));
    }
    for (i, n) in names.iter().enumerate() {
        if let Some(j) = names[..i].iter().position(|m| m == n) {
            return Err(bad(
                2,
                format!(
                    "attribute `{n}` appears twice (names {} and {})",
                    j + 1,
                    i + 1
                ),
            ));
        }
    }

    let k = names.len();
    let mut entries = Vec::with_capacity(count.min(text.len() / 2 + 1));
    let mut last_line = 2;
    for (ln, line) in lines {
        last_line = ln;
        let mut tokens = line.split_whitespace();
        let Some(file) = tokens.next() else { continue };
        if entries.len() == count {
            return Err(bad(
                ln,
                format!("more image lines than the {count} that line 1 gives"),
            ));
        }
        if !stays_inside(file) {
            return Err(bad(
                ln,
                format!(
                    "`{file}` leaves the folder of the list (image names must be relative paths \
                     without `..`)"
                ),
            ));
        }
        let values: Vec<&str> = tokens.collect();
        if values.len() != k {
            return Err(bad(
                ln,
                format!(
                    "`{file}` has {} values, expected {k} (one per attribute named on line 2)",
                    values.len()
                ),
            ));
        }
        let mut labels = Vec::new();
        for (j, v) in values.iter().enumerate() {
            match *v {
                "1" => labels.push(j as u16),
                "0" | "-1" => {}
                _ => {
                    return Err(bad(
                        ln,
                        format!(
                            "value `{v}` for attribute `{}` of `{file}` is not 0, 1 or -1",
                            names[j]
                        ),
                    ));
                }
            }
        }
        entries.push(AttributeEntry {
            file: file.to_string(),
            line: ln,
            labels,
        });
    }
    if entries.len() < count {
        return Err(bad(
            1,
            format!(
                "gives {count} images, but only {} image lines follow (the file ends at line \
                 {last_line})",
                entries.len()
            ),
        ));
    }
    Ok(AttributeList {
        path: path.to_path_buf(),
        names,
        entries,
    })
}

/// Whether an image name from a list stays inside the list's folder: a relative path made
/// of plain names only (no root, drive prefix or `..`).
fn stays_inside(file: &str) -> bool {
    use std::path::Component;
    !file.contains('\\')
        && Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The attribute list for `path`: the file itself, or the first of
/// [`ATTRIBUTE_FILE_NAMES`] in the folder.
fn find_attribute_file(path: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Ok(path.to_path_buf());
    }
    ATTRIBUTE_FILE_NAMES
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::bad_file(
                path,
                format!(
                    "no attribute list here (looked for {})",
                    ATTRIBUTE_FILE_NAMES.join(", ")
                ),
            )
        })
}

/// Load images with multi-label attributes, as in the selected CartoonSet-100k release:
/// `cartoon_attr.txt` (see [`read_attribute_list`] for its format) beside the images or
/// beside an `images/` folder holding them. `path` is the folder holding the list or the
/// list file itself; CelebA's `list_attr_celeba.txt` (with `img_align_celeba/`) is found too,
/// though its JPEG images must be converted to PNG first.
///
/// The result is multi-hot conditioned with the attribute names as label names, RGB,
/// `size` x `size`, in list order. Which folder holds the images is decided by the first
/// listed image; any listed image that is missing or cannot be decoded is an error naming
/// it and its line in the list.
pub fn load_attribute_folder(path: &Path, size: usize) -> Result<InMemoryDataset> {
    check_size(size)?;
    let list_path = find_attribute_file(path)?;
    let list = read_attribute_list(&list_path)?;
    let Some(first) = list.entries.first() else {
        return Err(Error::bad_file(
            &list_path,
            "line 1: the list holds no images",
        ));
    };
    let base = match list_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let candidates: Vec<PathBuf> = std::iter::once(base.clone())
        .chain(ATTRIBUTE_IMAGE_DIRS.iter().map(|d| base.join(d)))
        .collect();
    let Some(image_dir) = candidates.iter().find(|d| d.join(&first.file).is_file()) else {
        let places: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        return Err(Error::bad_file(
            base.join(&first.file),
            format!(
                "not found (listed on line {} of {}; looked in {})",
                first.line,
                list_path.display(),
                places.join(", ")
            ),
        ));
    };
    let jobs: Vec<(PathBuf, String)> = list
        .entries
        .iter()
        .map(|e| {
            (
                image_dir.join(&e.file),
                format!(" (listed on line {} of {})", e.line, list_path.display()),
            )
        })
        .collect();
    let pixels = load_all(&jobs, size, default_threads())?;
    Ok(InMemoryDataset {
        source: list_path.display().to_string(),
        channels: 3,
        height: size,
        width: size,
        pixels,
        kind: ConditionKind::MultiHot,
        label_names: list.names,
        labels: list.entries.into_iter().map(|e| e.labels).collect(),
        steps: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::data::test_util::{err_mentions, write};
    use image::{GrayImage, Luma, Rgba, RgbaImage};

    fn png(dir: &Path, name: &str, w: u32, h: u32, rgb: [u8; 3]) -> PathBuf {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, Rgb(rgb))
            .save_with_format(&p, ImageFormat::Png)
            .unwrap();
        p
    }

    /// Image `i` of `ds` is the constant colour `rgb`.
    fn assert_constant(ds: &InMemoryDataset, i: usize, rgb: [u8; 3]) {
        let img = ds.image_u8(i);
        let plane = ds.height * ds.width;
        for c in 0..3 {
            assert!(
                img[c * plane..(c + 1) * plane].iter().all(|&v| v == rgb[c]),
                "image {i} channel {c}: {:?}, expected {}",
                &img[c * plane..(c + 1) * plane],
                rgb[c]
            );
        }
    }

    const FACE_ATTRS: [&str; 15] = [
        "hair.0",
        "hair.1",
        "hair.2",
        "hair.3",
        "hair.4",
        "hair.5",
        "eye.0",
        "eye.1",
        "eye.2",
        "eye.3",
        "face.0",
        "face.1",
        "face.2",
        "glasses.0",
        "glasses.1",
    ];

    /// A cartoon_attr.txt text: header for `n` images and the 15 attributes, then `rows`.
    fn attr_text(n: &str, rows: &[String]) -> String {
        let mut t = format!("{n}\n{}\n", FACE_ATTRS.join(" "));
        for r in rows {
            t.push_str(r);
            t.push('\n');
        }
        t
    }

    /// A row with attributes `on` set (15 values, 0/1).
    fn row(file: &str, on: &[usize]) -> String {
        let vals: Vec<&str> = (0..15)
            .map(|j| if on.contains(&j) { "1" } else { "0" })
            .collect();
        format!("{file} {}", vals.join(" "))
    }

    #[test]
    fn class_folder_labels_names_and_pixels() {
        let d = tempfile::tempdir().unwrap();
        // Written out of order: loading sorts classes and files by name.
        png(d.path(), "dog/b.png", 10, 6, [200, 100, 50]);
        png(d.path(), "dog/a.png", 8, 8, [1, 2, 3]);
        png(d.path(), "cat/z.png", 3, 17, [9, 8, 7]);
        png(d.path(), "ant/x.png", 4, 4, [40, 41, 42]);
        // Grey PNG: replicated into RGB.
        let g = d.path().join("cat/grey.png");
        GrayImage::from_pixel(5, 5, Luma([77])).save(&g).unwrap();
        // RGBA: transparent over white, opaque as is.
        let t = d.path().join("ant/y.png");
        let rgba = RgbaImage::from_pixel(4, 4, Rgba([10, 20, 30, 0]));
        rgba.save(&t).unwrap();
        let o = d.path().join("ant/w.png");
        RgbaImage::from_pixel(4, 4, Rgba([10, 20, 30, 255]))
            .save(&o)
            .unwrap();

        let ds = load_class_folder(d.path(), 4).unwrap();
        assert_eq!(ds.label_names(), ["ant", "cat", "dog"].map(String::from));
        assert_eq!(ds.condition_kind(), ConditionKind::OneHot);
        assert_eq!(ds.image_shape(), (3, 4, 4));
        assert_eq!(ds.len(), 7);
        let labels: Vec<u16> = ds.labels.iter().map(|l| l[0]).collect();
        assert_eq!(labels, vec![0, 0, 0, 1, 1, 2, 2]);
        // ant: w.png, x.png, y.png; cat: grey.png, z.png; dog: a.png, b.png.
        assert_constant(&ds, 0, [10, 20, 30]);
        assert_constant(&ds, 1, [40, 41, 42]);
        assert_constant(&ds, 2, [255, 255, 255]);
        assert_constant(&ds, 3, [77, 77, 77]);
        assert_constant(&ds, 4, [9, 8, 7]);
        assert_constant(&ds, 5, [1, 2, 3]);
        // 10x6 -> 4x4 of a constant colour stays that colour.
        assert_constant(&ds, 6, [200, 100, 50]);
        assert_eq!(ds.condition(6), vec![0.0, 0.0, 1.0]);
        assert_eq!(ds.source, d.path().display().to_string());
    }

    #[test]
    fn resize_keeps_layout_chw() {
        let d = tempfile::tempdir().unwrap();
        // Left half red, right half blue, 8x8 -> 4x4: columns 0-1 red, 2-3 blue.
        let p = d.path().join("c/half.png");
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_fn(8, 8, |x, _| {
            if x < 4 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
        .save(&p)
        .unwrap();
        let chw = read_image_chw(&p, 4).unwrap();
        assert_eq!(chw.len(), 48);
        for y in 0..4 {
            assert_eq!(chw[y * 4], 255, "red at (y={y}, x=0)");
            assert_eq!(chw[32 + y * 4], 0, "no blue at (y={y}, x=0)");
            assert_eq!(chw[y * 4 + 3], 0, "no red at (y={y}, x=3)");
            assert_eq!(chw[32 + y * 4 + 3], 255, "blue at (y={y}, x=3)");
        }
        // Same size: no resampling at all.
        let same = read_image_chw(&p, 8).unwrap();
        assert_eq!(same[3], 255);
        assert_eq!(same[4], 0);
        assert_eq!(same[128 + 4], 255);
    }

    #[test]
    fn class_folder_skips_non_images() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a/1.png", 2, 2, [5, 5, 5]);
        png(d.path(), "b/1.gif.png", 2, 2, [6, 6, 6]);
        let skipped = [
            write(d.path(), "README.md", b"hello"),
            write(d.path(), "a/notes.txt", b"x"),
            write(d.path(), "a/.DS_Store", b"x"),
            png(d.path(), "a/nested/2.png", 2, 2, [0, 0, 0]),
            png(d.path(), ".hidden/3.png", 2, 2, [0, 0, 0]),
        ];
        let (ds, got) = load_class_folder_with_skipped(d.path(), 2).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.label_names(), ["a", "b"].map(String::from));
        for s in &skipped {
            let s = if s.ends_with("2.png") || s.ends_with("3.png") {
                s.parent().unwrap()
            } else {
                s
            };
            assert!(
                got.iter().any(|g| g == s),
                "{} not skipped: {got:?}",
                s.display()
            );
        }
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn jpeg_and_other_formats_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a/1.png", 2, 2, [5, 5, 5]);
        let j = write(d.path(), "a/2.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00");
        err_mentions(load_class_folder(d.path(), 2), &j, &[JPEG_UNSUPPORTED]);
        fs::remove_file(&j).unwrap();
        let j = write(d.path(), "a/3.JPEG", b"\xff\xd8\xff");
        err_mentions(load_class_folder(d.path(), 2), &j, &[JPEG_UNSUPPORTED]);
        fs::remove_file(&j).unwrap();
        // JPEG data under a .png name: recognised by content.
        let j = write(
            d.path(),
            "a/4.png",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x02",
        );
        err_mentions(load_class_folder(d.path(), 2), &j, &[JPEG_UNSUPPORTED]);
        fs::remove_file(&j).unwrap();
        let b = write(d.path(), "a/5.bmp", b"BM");
        err_mentions(
            load_class_folder(d.path(), 2),
            &b,
            &["BMP", "not supported"],
        );
        fs::remove_file(&b).unwrap();
        assert_eq!(load_class_folder(d.path(), 2).unwrap().len(), 1);
    }

    #[test]
    fn class_folder_errors() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nowhere");
        err_mentions(load_class_folder(&missing, 8), &missing, &[]);
        let empty = d.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        err_mentions(
            load_class_folder(&empty, 8),
            &empty,
            &["no class subfolders"],
        );
        let loose = d.path().join("loose");
        png(&loose, "1.png", 2, 2, [0, 0, 0]);
        let f = png(&loose, "2.png", 2, 2, [0, 0, 0]);
        err_mentions(
            load_class_folder(&loose, 8),
            &loose,
            &["2 images directly", "subfolder"],
        );
        err_mentions(load_class_folder(&f, 8), &f, &["is a file"]);
        let root = d.path().join("r");
        png(&root, "a/1.png", 2, 2, [0, 0, 0]);
        let b = root.join("b");
        write(&b, "readme.txt", b"no images");
        err_mentions(load_class_folder(&root, 8), &b, &["no PNG images"]);
        fs::remove_dir_all(&b).unwrap();
        // Undecodable PNG.
        let bad = write(&root, "a/2.png", b"\x89PNG\r\n\x1a\nnot really");
        err_mentions(load_class_folder(&root, 8), &bad, &["cannot decode"]);
        let bad2 = write(&root, "a/2.png", b"garbage");
        err_mentions(load_class_folder(&root, 8), &bad2, &["decode"]);
        fs::remove_file(&bad).unwrap();
        // Sizes out of range.
        assert!(
            load_class_folder(&root, 0)
                .unwrap_err()
                .to_string()
                .contains("size 0")
        );
        assert!(load_class_folder(&root, 1 << 20).is_err());
        assert_eq!(load_class_folder(&root, 1).unwrap().len(), 1);
    }

    #[test]
    fn parallel_load_is_ordered_and_reports_the_first_failure() {
        let d = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..23u8)
            .map(|i| {
                png(
                    d.path(),
                    &format!("c/{i:02}.png"),
                    3,
                    3,
                    [i, 2 * i, 100 + i],
                )
            })
            .collect();
        let jobs: Vec<(PathBuf, String)> =
            paths.iter().map(|p| (p.clone(), String::new())).collect();
        let one = load_all(&jobs, 2, 1).unwrap();
        for threads in [2, 3, 4, 7, 23, 64] {
            assert_eq!(
                load_all(&jobs, 2, threads).unwrap(),
                one,
                "{threads} threads"
            );
        }
        for i in 0..23u8 {
            let img = &one[i as usize * 12..(i as usize + 1) * 12];
            assert_eq!(img, [[i; 4], [2 * i; 4], [100 + i; 4]].concat());
        }
        assert_eq!(read_images_chw(&paths, 2).unwrap(), one);
        // Two bad files in different chunks: always the earlier one.
        write(d.path(), "c/05.png", b"bad");
        write(d.path(), "c/19.png", b"bad");
        for threads in [1, 2, 4, 23] {
            for _ in 0..3 {
                err_mentions(load_all(&jobs, 2, threads), &paths[5], &[]);
            }
        }
        let ds_err = load_class_folder(d.path(), 2);
        err_mentions(ds_err, &paths[5], &[]);
        assert!(load_all(&[], 2, 4).unwrap().is_empty());
    }

    #[test]
    fn attribute_folder_cartoon_layout() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "images/cs1.png", 6, 6, [10, 20, 30]);
        png(d.path(), "images/cs2.png", 12, 9, [200, 100, 50]);
        png(d.path(), "images/cs3.png", 4, 4, [0, 0, 0]);
        let rows = [
            row("cs2.png", &[0, 6, 14]),
            row("cs1.png", &[]),
            row("cs3.png", &[5, 9, 10, 13]),
        ];
        let txt = write(
            d.path(),
            "cartoon_attr.txt",
            attr_text("3", &rows).as_bytes(),
        );
        for p in [d.path(), txt.as_path()] {
            let ds = load_attribute_folder(p, 4).unwrap();
            assert_eq!(ds.condition_kind(), ConditionKind::MultiHot);
            assert_eq!(ds.label_names(), FACE_ATTRS.map(String::from).as_slice());
            assert_eq!(ds.num_conditions(), 15);
            assert_eq!(ds.image_shape(), (3, 4, 4));
            assert_eq!(ds.len(), 3);
            // List order, not file-name order.
            assert_eq!(ds.labels, vec![vec![0, 6, 14], vec![], vec![5, 9, 10, 13]]);
            assert_constant(&ds, 0, [200, 100, 50]);
            assert_constant(&ds, 1, [10, 20, 30]);
            let c = ds.condition(2);
            assert_eq!(c.iter().sum::<f32>(), 4.0);
            assert_eq!((c[5], c[9], c[10], c[13], c[0]), (1.0, 1.0, 1.0, 1.0, 0.0));
            assert_eq!(ds.source, txt.display().to_string());
        }
    }

    #[test]
    fn attribute_list_names_that_leave_the_folder_are_refused() {
        // Issue 19: an absolute path (or `..`) in cartoon_attr.txt read images from anywhere.
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let abs = png(outside.path(), "x.png", 4, 4, [1, 2, 3]);
        png(d.path(), "images/ok.png", 4, 4, [1, 2, 3]);
        for (i, bad) in [
            abs.display().to_string(),
            "../x.png".into(),
            "images/../../x.png".into(),
            "a\\..\\x.png".into(),
        ]
        .into_iter()
        .enumerate()
        {
            let rows = [row("ok.png", &[1]), row(&bad, &[2])];
            let txt = write(
                d.path(),
                &format!("list{i}.txt"),
                attr_text("2", &rows).as_bytes(),
            );
            let e = load_attribute_folder(&txt, 4).unwrap_err().to_string();
            assert!(
                e.contains("leaves the folder") && e.contains(&bad) && e.contains("line 4"),
                "{e}"
            );
        }
        // Relative names into a subfolder stay allowed.
        let rows = [row("ok.png", &[1]), row("./ok.png", &[2])];
        let txt = write(
            d.path(),
            "images/list.txt",
            attr_text("2", &rows).as_bytes(),
        );
        assert_eq!(load_attribute_folder(&txt, 4).unwrap().len(), 2);
    }

    #[test]
    fn attribute_folder_celeba_style_values_and_same_folder_images() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "000001.png", 5, 5, [1, 1, 1]);
        png(d.path(), "000002.png", 5, 5, [2, 2, 2]);
        // CelebA style: -1/1, double spaces, CRLF, trailing blank lines; any file name.
        let text = "2\r\n5_o_Clock_Shadow Arched_Eyebrows Attractive \r\n\
                    000001.png -1  1  1\r\n000002.png  1 -1 -1\r\n\r\n";
        let txt = write(d.path(), "attrs.txt", text.as_bytes());
        let ds = load_attribute_folder(&txt, 5).unwrap();
        assert_eq!(
            ds.label_names(),
            ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive"].map(String::from)
        );
        assert_eq!(ds.labels, vec![vec![1, 2], vec![0]]);
        assert_constant(&ds, 1, [2, 2, 2]);
        // The folder form finds the CelebA list name and img_align_celeba/.
        let c = d.path().join("celeba");
        png(&c, "img_align_celeba/000001.png", 5, 5, [3, 3, 3]);
        png(&c, "img_align_celeba/000002.png", 5, 5, [4, 4, 4]);
        write(&c, "list_attr_celeba.txt", text.as_bytes());
        let ds = load_attribute_folder(&c, 2).unwrap();
        assert_constant(&ds, 0, [3, 3, 3]);
        // Real CelebA images are JPEG: the error says to convert them.
        write(&c, "img_align_celeba/000003.jpg", b"\xff\xd8\xff");
        let t = "1\na b\n000003.jpg 1 -1\n";
        let l = write(&c, "list_attr_celeba.txt", t.as_bytes());
        let msg = err_mentions(
            load_attribute_folder(&c, 2),
            &c.join("img_align_celeba/000003.jpg"),
            &[JPEG_UNSUPPORTED, "line 3"],
        );
        assert!(msg.contains(&l.display().to_string()), "{msg}");
    }

    #[test]
    fn attribute_list_malformed() {
        let d = tempfile::tempdir().unwrap();
        let r = |i: usize| row(&format!("cs{i}.png"), &[i % 15]);
        let cases: Vec<(String, &[&str])> = vec![
            (
                attr_text("three", &[r(1)]),
                &["line 1", "number of images", "`three`"],
            ),
            (attr_text("", &[]), &["line 1", "number of images"]),
            (
                attr_text("3", &[r(1), r(2)]),
                &["line 1", "gives 3 images", "only 2", "line 4"],
            ),
            (
                attr_text("1", &[r(1), r(2)]),
                &["line 4", "more image lines than the 1"],
            ),
            (
                attr_text("2", &[r(1), "cs2.png 1 0 1".to_string()]),
                &["line 4", "`cs2.png` has 3 values, expected 15"],
            ),
            (
                attr_text("2", &[r(1), row("cs2.png", &[]).replacen(" 0", " 2", 1)]),
                &["line 4", "value `2`", "`hair.0`", "not 0, 1 or -1"],
            ),
            (
                attr_text("2", &[r(1), row("cs2.png", &[]).replace(" 0", " yes")]),
                &["line 4", "value `yes`"],
            ),
            ("".to_string(), &["empty"]),
            ("3\n".to_string(), &["line 2", "attribute names"]),
            ("3\n   \n".to_string(), &["line 2", "empty line"]),
            (
                "1\na b a\nx.png 1 1 1\n".to_string(),
                &["line 2", "`a` appears twice"],
            ),
            ("1\na b\nx.png 1 \u{0}\n".to_string(), &["line 3", "value"]),
        ];
        for (i, (text, needles)) in cases.iter().enumerate() {
            let p = write(
                d.path(),
                &format!("case{i}/cartoon_attr.txt"),
                text.as_bytes(),
            );
            err_mentions(read_attribute_list(&p), &p, needles);
            err_mentions(load_attribute_folder(&p, 4), &p, needles);
            err_mentions(load_attribute_folder(p.parent().unwrap(), 4), &p, needles);
        }
        // Not UTF-8, on line 3.
        let p = write(d.path(), "bin/cartoon_attr.txt", b"1\na\n\xff\xfe 1\n");
        err_mentions(read_attribute_list(&p), &p, &["line 3", "UTF-8"]);
        // Zero images.
        let p = write(d.path(), "zero/cartoon_attr.txt", b"0\na b\n");
        assert!(read_attribute_list(&p).unwrap().entries.is_empty());
        err_mentions(load_attribute_folder(&p, 4), &p, &["no images"]);
        // No list in the folder; a missing path.
        let none = d.path().join("none");
        fs::create_dir_all(&none).unwrap();
        err_mentions(
            load_attribute_folder(&none, 4),
            &none,
            &["cartoon_attr.txt"],
        );
        let missing = d.path().join("missing.txt");
        err_mentions(load_attribute_folder(&missing, 4), &missing, &[]);
    }

    #[test]
    fn attribute_images_missing_or_undecodable() {
        let d = tempfile::tempdir().unwrap();
        let rows: Vec<String> = (1..=4).map(|i| row(&format!("cs{i}.png"), &[i])).collect();
        let txt = write(
            d.path(),
            "cartoon_attr.txt",
            attr_text("4", &rows).as_bytes(),
        );
        let txt_s = txt.display().to_string();
        // The first listed image is nowhere: every place looked in is named.
        let msg = err_mentions(
            load_attribute_folder(d.path(), 4),
            &d.path().join("cs1.png"),
            &["not found", "line 3", &txt_s],
        );
        assert!(
            msg.contains(&d.path().join("images").display().to_string()),
            "{msg}"
        );
        // A later one is missing.
        for i in [1, 2, 4] {
            png(d.path(), &format!("images/cs{i}.png"), 4, 4, [i as u8; 3]);
        }
        let missing = d.path().join("images/cs3.png");
        err_mentions(
            load_attribute_folder(d.path(), 4),
            &missing,
            &["image not found", "line 5", &txt_s],
        );
        // Undecodable.
        write(d.path(), "images/cs3.png", b"\x89PNG\r\n\x1a\ntruncated");
        err_mentions(
            load_attribute_folder(&txt, 4),
            &missing,
            &["cannot decode", "line 5", &txt_s],
        );
        png(d.path(), "images/cs3.png", 4, 4, [3; 3]);
        let ds = load_attribute_folder(&txt, 4).unwrap();
        assert_constant(&ds, 2, [3, 3, 3]);
        assert_eq!(ds.labels[3], vec![4]);
    }
}
