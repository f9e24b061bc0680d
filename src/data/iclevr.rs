//! The i-CLEVR folder format (NYCU "Deep Learning and Practice" course files).
//!
//! A folder holds
//! - `objects.json`: the K = 24 object classes as a name -> id map
//!   (`{"gray cube": 0, ..., "yellow cylinder": 23}`: 8 colours x {cube, sphere, cylinder}),
//! - `train.json`: file name -> list of object names
//!   (`{"CLEVR_train_002066_0.png": ["cyan cube"], ...}`); scenes come in threes, `_0`,
//!   `_1`, `_2`, each adding one object to the same scene,
//! - the 320x240 PNGs, directly in the folder or in an `images/` subfolder.
//!
//! `test.json` and `new_test.json` are lists of object-name lists (the evaluation
//! conditions); [`read_conditions`] reads them.
//!
//! Images are resized as a whole frame to `size` x `size` (no crop, like the course code's
//! `transforms.Resize((64, 64))`), so the 4:3 frame is squashed to a square.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::{ConditionKind, InMemoryDataset};
use crate::error::{Error, Result};

/// The 24 i-CLEVR object classes in `objects.json` order (id = index): colour
/// `id % 8`, shape `id / 8` (cube, sphere, cylinder).
pub const OBJECT_NAMES: [&str; 24] = [
    "gray cube",
    "red cube",
    "blue cube",
    "green cube",
    "brown cube",
    "purple cube",
    "cyan cube",
    "yellow cube",
    "gray sphere",
    "red sphere",
    "blue sphere",
    "green sphere",
    "brown sphere",
    "purple sphere",
    "cyan sphere",
    "yellow sphere",
    "gray cylinder",
    "red cylinder",
    "blue cylinder",
    "green cylinder",
    "brown cylinder",
    "purple cylinder",
    "cyan cylinder",
    "yellow cylinder",
];

/// [`OBJECT_NAMES`] as owned strings.
pub fn default_object_names() -> Vec<String> {
    OBJECT_NAMES.iter().map(|s| s.to_string()).collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

/// The most object names an `objects.json` may hold (the most conditions a model takes; ids
/// are stored as `u16`).
pub const MAX_OBJECTS: usize = 1000;

/// Read `objects.json`: a map from object name to id, with ids `0..K` each used exactly
/// once. Returns the names in id order.
pub fn read_objects(path: &Path) -> Result<Vec<String>> {
    let map: BTreeMap<String, serde_json::Value> = read_json(path)?;
    if map.is_empty() {
        return Err(Error::bad_file(
            path,
            "no objects (expected a name -> id map)",
        ));
    }
    let k = map.len();
    if k > MAX_OBJECTS {
        return Err(Error::bad_file(
            path,
            format!("{k} objects; at most {MAX_OBJECTS} are supported"),
        ));
    }
    let mut names: Vec<Option<String>> = vec![None; k];
    for (name, v) in map {
        let id = v.as_u64().ok_or_else(|| {
            Error::bad_file(
                path,
                format!("object `{name}` has id {v}; ids must be integers 0..{k}"),
            )
        })?;
        let slot = names.get_mut(id as usize).ok_or_else(|| {
            Error::bad_file(
                path,
                format!("object `{name}` has id {id}; with {k} objects ids must be 0..{k}"),
            )
        })?;
        if let Some(other) = slot {
            return Err(Error::bad_file(
                path,
                format!("id {id} is used twice (`{other}` and `{name}`)"),
            ));
        }
        *slot = Some(name);
    }
    // K names, K slots, no slot used twice: every slot is filled.
    Ok(names.into_iter().map(|n| n.unwrap_or_default()).collect())
}

/// Map a list of object names to ids. `what` says where the list is (for messages).
fn label_ids(path: &Path, what: &str, labels: &[String], names: &[String]) -> Result<Vec<u16>> {
    if labels.is_empty() {
        return Err(Error::bad_file(path, format!("{what}: empty object list")));
    }
    let mut ids = Vec::with_capacity(labels.len());
    for label in labels {
        let id = names.iter().position(|n| n == label).ok_or_else(|| {
            let e = Error::UnknownLabel {
                label: label.clone(),
                known: names.to_vec(),
            };
            Error::bad_file(path, format!("{what}: {e}"))
        })? as u16;
        if ids.contains(&id) {
            return Err(Error::bad_file(
                path,
                format!("{what}: object `{label}` is listed twice"),
            ));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Read a conditions file (`test.json`, `new_test.json`): a list of non-empty lists of
/// object names, without repeats inside a list. Returns the ids, in file order.
pub fn read_conditions(path: &Path, names: &[String]) -> Result<Vec<Vec<u16>>> {
    let lists: Vec<Vec<String>> = read_json(path)?;
    lists
        .iter()
        .enumerate()
        .map(|(i, l)| label_ids(path, &format!("entry {i}"), l, names))
        .collect()
}

/// Read `train.json`: file name -> list of object names. Returns `(file, ids)` sorted by
/// file name, so the order does not depend on the JSON's key order.
pub fn read_train_labels(path: &Path, names: &[String]) -> Result<Vec<(String, Vec<u16>)>> {
    let map: BTreeMap<String, Vec<String>> = read_json(path)?;
    if map.is_empty() {
        return Err(Error::bad_file(path, "no entries"));
    }
    map.into_iter()
        .map(|(file, labels)| {
            if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
                return Err(Error::bad_file(
                    path,
                    format!("`{file}` is not a plain file name"),
                ));
            }
            let ids = label_ids(path, &format!("entry `{file}`"), &labels, names)?;
            Ok((file, ids))
        })
        .collect()
}

/// Decode one PNG, drop alpha, resize the whole frame to `size` x `size` (bilinear with
/// antialiasing, like PIL's resize) and write it as CHW bytes into `out`.
fn decode_into(path: &Path, size: usize, out: &mut [u8]) -> Result<()> {
    let bytes = crate::checkpoint::read_regular(path).map_err(|e| Error::io(path, e))?;
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
    reader.limits(super::decode_limits());
    let img = reader
        .decode()
        .map_err(|e| Error::bad_file(path, format!("cannot decode PNG: {e}")))?
        .to_rgb8();
    let img = if img.width() as usize == size && img.height() as usize == size {
        img
    } else {
        image::imageops::resize(&img, size as u32, size as u32, FilterType::Triangle)
    };
    let hw = size * size;
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * hw + p] = px.0[c];
        }
    }
    Ok(())
}

/// Number of worker threads for bulk work.
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, super::MAX_DECODE_THREADS)
}

/// Load an i-CLEVR folder: `objects.json` (if absent, the standard [`OBJECT_NAMES`]),
/// `train.json` and its PNGs (in `dir` or `dir/images`), every image resized to
/// `size` x `size`. Images come in file-name order. A missing or undecodable PNG is an
/// error naming the file.
pub fn load_iclevr(dir: &Path, size: usize) -> Result<InMemoryDataset> {
    if size == 0 {
        return Err(Error::Msg("i-CLEVR: image size must be positive".into()));
    }
    let objects = dir.join("objects.json");
    let names = if objects.exists() {
        read_objects(&objects)?
    } else {
        default_object_names()
    };
    let entries = read_train_labels(&dir.join("train.json"), &names)?;

    let sub = dir.join("images");
    let image_dirs: Vec<PathBuf> = if sub.is_dir() {
        vec![sub, dir.to_path_buf()]
    } else {
        vec![dir.to_path_buf()]
    };
    let locate = |file: &str| -> Result<PathBuf> {
        image_dirs
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                let looked: Vec<String> =
                    image_dirs.iter().map(|d| d.display().to_string()).collect();
                Error::bad_file(
                    dir.join(file),
                    format!(
                        "image listed in train.json not found (looked in {})",
                        looked.join(" and ")
                    ),
                )
            })
    };

    let len = 3 * size * size;
    let mut pixels = vec![0u8; entries.len() * len];
    let threads = worker_threads().min(entries.len()).max(1);
    let per = entries.len().div_ceil(threads);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = pixels
            .chunks_mut(per * len)
            .zip(entries.chunks(per))
            .map(|(out, ents)| {
                let locate = &locate;
                s.spawn(move || -> Result<()> {
                    for ((file, _), img) in ents.iter().zip(out.chunks_mut(len)) {
                        decode_into(&locate(file)?, size, img)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Msg("i-CLEVR loader thread panicked".into())))
            })
            .collect()
    });
    // The first error in file order, whatever the thread count.
    for r in results {
        r?;
    }

    Ok(InMemoryDataset {
        source: dir.display().to_string(),
        channels: 3,
        height: size,
        width: size,
        pixels,
        kind: ConditionKind::MultiHot,
        label_names: names,
        steps: super::scene_steps(&entries),
        labels: entries.into_iter().map(|(_, ids)| ids).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::data::test_util::write;

    fn shared() -> Option<PathBuf> {
        let p = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/iclevr"
        ));
        if p.join("train.json").is_file() {
            Some(p)
        } else {
            eprintln!("{} not found; skipping", p.display());
            None
        }
    }

    fn err_string<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    fn png_bytes(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(f(x, y)));
        let mut v = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    }

    #[test]
    fn real_label_files() {
        let Some(dir) = shared() else { return };
        let names = read_objects(&dir.join("objects.json")).unwrap();
        assert_eq!(names, default_object_names());

        let train = read_train_labels(&dir.join("train.json"), &names).unwrap();
        assert_eq!(train.len(), 18009);
        assert!(train.windows(2).all(|w| w[0].0 < w[1].0));
        let find = |f: &str| train.iter().find(|(n, _)| n == f).unwrap().1.clone();
        assert_eq!(find("CLEVR_train_002066_0.png"), vec![6]);
        assert_eq!(find("CLEVR_train_002066_1.png"), vec![6, 14]);
        assert_eq!(find("CLEVR_train_002066_2.png"), vec![6, 14, 20]);
        // Every scene's steps extend the previous one, in order.
        for w in train.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.0[..a.0.len() - 6] == b.0[..b.0.len() - 6] {
                assert_eq!(&b.1[..a.1.len()], &a.1[..], "{} -> {}", a.0, b.0);
                assert_eq!(b.1.len(), a.1.len() + 1);
            }
        }

        let test = read_conditions(&dir.join("test.json"), &names).unwrap();
        assert_eq!(test.len(), 32);
        assert_eq!(test.iter().map(Vec::len).sum::<usize>(), 72);
        assert_eq!(test[0], vec![0]);
        assert_eq!(test[3], vec![2, 3]);
        let new_test = read_conditions(&dir.join("new_test.json"), &names).unwrap();
        assert_eq!(new_test.len(), 32);
        assert_eq!(new_test.iter().map(Vec::len).sum::<usize>(), 84);
        assert_eq!(new_test[0], vec![0, 1, 8]);
    }

    #[test]
    fn malformed_label_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let names = default_object_names();

        // Bad JSON: the file, line and column are named.
        let p = write(d, "bad.json", b"[[\"gray cube\"],\n [\"red cube\" \"x\"]]");
        let e = err_string(read_conditions(&p, &names));
        assert!(e.contains("bad.json") && e.contains("line 2"), "{e}");
        assert!(e.contains("column"), "{e}");

        // Unknown label: file, entry index, label and the known labels.
        let p = write(
            d,
            "unk.json",
            br#"[["gray cube"], ["red cube", "pink cube"]]"#,
        );
        let e = err_string(read_conditions(&p, &names));
        assert!(e.contains("unk.json") && e.contains("entry 1"), "{e}");
        assert!(
            e.contains("`pink cube`") && e.contains("yellow cylinder"),
            "{e}"
        );

        // More objects than ids fit (they were cast to u16 unchecked).
        let many: serde_json::Map<String, serde_json::Value> = (0..70_000u32)
            .map(|i| (format!("o{i}"), i.into()))
            .collect();
        let p = write(
            d,
            "many.json",
            serde_json::to_string(&many).unwrap().as_bytes(),
        );
        let e = err_string(read_objects(&p));
        assert!(e.contains("many.json") && e.contains("at most 1000"), "{e}");

        // Duplicates and empty lists.
        let p = write(d, "dup.json", br#"[["red cube", "red cube"]]"#);
        let e = err_string(read_conditions(&p, &names));
        assert!(e.contains("dup.json") && e.contains("twice"), "{e}");
        let p = write(d, "empty.json", br#"[["red cube"], []]"#);
        let e = err_string(read_conditions(&p, &names));
        assert!(e.contains("entry 1") && e.contains("empty"), "{e}");

        // train.json with an unknown label names the entry.
        let p = write(
            d,
            "train.json",
            br#"{"CLEVR_train_000000_0.png": ["blue blob"]}"#,
        );
        let e = err_string(read_train_labels(&p, &names));
        assert!(
            e.contains("CLEVR_train_000000_0.png") && e.contains("blue blob"),
            "{e}"
        );
        let p = write(d, "train2.json", br#"{"../x.png": ["red cube"]}"#);
        assert!(err_string(read_train_labels(&p, &names)).contains("plain file name"));

        // objects.json: duplicate id, gap, non-integer id, not a map.
        let p = write(d, "o1.json", br#"{"a": 0, "b": 1, "c": 1}"#);
        let e = err_string(read_objects(&p));
        assert!(
            e.contains("o1.json") && e.contains("id 1 is used twice"),
            "{e}"
        );
        let p = write(d, "o2.json", br#"{"a": 0, "b": 2}"#);
        let e = err_string(read_objects(&p));
        assert!(e.contains("o2.json") && e.contains("id 2"), "{e}");
        let p = write(d, "o3.json", br#"{"a": 0, "b": "1"}"#);
        assert!(err_string(read_objects(&p)).contains("o3.json"));
        let p = write(d, "o4.json", br#"["a", "b"]"#);
        assert!(err_string(read_objects(&p)).contains("o4.json"));
        let p = write(d, "o5.json", br#"{"b": 1, "a": 0}"#);
        assert_eq!(read_objects(&p).unwrap(), vec!["a", "b"]);
        // Missing file: an I/O error naming it.
        let e = err_string(read_objects(&d.join("nope.json")));
        assert!(e.contains("nope.json"), "{e}");
    }

    /// A small folder: objects.json, train.json and three 8x6 RGBA PNGs.
    fn small_folder(d: &Path, in_images: bool) {
        let objects: BTreeMap<&str, usize> = OBJECT_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i))
            .collect();
        write(d, "objects.json", &serde_json::to_vec(&objects).unwrap());
        write(
            d,
            "train.json",
            br#"{"CLEVR_train_000001_0.png": ["red cube"],
                 "CLEVR_train_000000_1.png": ["gray cube", "yellow cylinder"],
                 "CLEVR_train_000000_0.png": ["gray cube"]}"#,
        );
        let img_dir = if in_images {
            fs::create_dir(d.join("images")).unwrap();
            d.join("images")
        } else {
            d.to_path_buf()
        };
        for (i, f) in [
            "CLEVR_train_000000_0.png",
            "CLEVR_train_000000_1.png",
            "CLEVR_train_000001_0.png",
        ]
        .iter()
        .enumerate()
        {
            let v = 40 * i as u8;
            write(
                &img_dir,
                f,
                &png_bytes(8, 6, |x, _| [v, 100 + x as u8, 200, 7]),
            );
        }
    }

    #[test]
    fn load_small_folder() {
        for in_images in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            small_folder(tmp.path(), in_images);
            let ds = load_iclevr(tmp.path(), 4).unwrap();
            assert_eq!(ds.len(), 3);
            assert_eq!(ds.image_shape(), (3, 4, 4));
            assert_eq!(ds.condition_kind(), ConditionKind::MultiHot);
            assert_eq!(ds.num_conditions(), 24);
            assert_eq!(ds.labels, vec![vec![0], vec![0, 23], vec![1]]);
            let c = ds.condition(1);
            assert_eq!((c[0], c[23], c.iter().sum::<f32>()), (1.0, 1.0, 2.0));
            // Channels are planes; R is constant per image, B is 200, alpha dropped.
            let img = ds.image_u8(2);
            assert!(img[..16].iter().all(|&v| v == 80), "{:?}", &img[..16]);
            assert!(img[32..].iter().all(|&v| v == 200));
            // G rises left to right after the resize.
            assert!(img[16] < img[19]);
        }
    }

    #[test]
    fn broken_pngs_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        small_folder(d, false);
        let victim = d.join("CLEVR_train_000000_1.png");

        // Truncated.
        let bytes = fs::read(&victim).unwrap();
        fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
        let e = err_string(load_iclevr(d, 4));
        assert!(e.contains("CLEVR_train_000000_1.png"), "{e}");

        // A tiny PNG that declares 16000 x 16000 pixels (its IHDR patched, CRC fixed):
        // refused by the decoding limits before anything that size is allocated.
        let mut huge = png_bytes(1, 1, |_, _| [1, 2, 3, 255]);
        assert_eq!(&huge[12..16], b"IHDR");
        huge[16..20].copy_from_slice(&16000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&16000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        fs::write(&victim, &huge).unwrap();
        let e = err_string(load_iclevr(d, 4));
        assert!(
            e.contains("CLEVR_train_000000_1.png") && e.to_lowercase().contains("limit"),
            "{e}"
        );

        // Corrupt (not a PNG at all).
        fs::write(&victim, b"GIF89a not really").unwrap();
        let e = err_string(load_iclevr(d, 4));
        assert!(
            e.contains("CLEVR_train_000000_1.png") && e.contains("PNG"),
            "{e}"
        );

        // Missing.
        fs::remove_file(&victim).unwrap();
        let e = err_string(load_iclevr(d, 4));
        assert!(
            e.contains("CLEVR_train_000000_1.png") && e.contains("not found"),
            "{e}"
        );

        // Missing train.json.
        fs::remove_file(d.join("train.json")).unwrap();
        let e = err_string(load_iclevr(d, 4));
        assert!(e.contains("train.json"), "{e}");
    }

    /// Loader throughput on 320x240 frames like the real ones:
    /// `cargo test --release --lib data::iclevr::tests::bench_load -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_load() {
        use crate::data::render::{RenderOptions, render_frame, sample_scene};
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir(d.join("images")).unwrap();
        let mut pngs = Vec::new();
        for k in 0..12u16 {
            let mut rng = crate::rng::Rng::new(k as u64);
            let objects = sample_scene(&mut rng, &[k, k + 8, (k + 3) % 8 + 16]);
            let chw = render_frame(&objects, 320, 240, RenderOptions::default());
            let hw = 320 * 240;
            let img = image::RgbImage::from_fn(320, 240, |x, y| {
                let o = (y * 320 + x) as usize;
                image::Rgb([chw[o], chw[hw + o], chw[2 * hw + o]])
            });
            let mut v = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
                .unwrap();
            pngs.push(v);
        }
        let n = 1500;
        let mut train = serde_json::Map::new();
        for i in 0..n {
            let f = format!("CLEVR_train_{:06}_{}.png", i / 3, i % 3);
            write(&d.join("images"), &f, &pngs[i % pngs.len()]);
            train.insert(f, serde_json::json!(["red cube"]));
        }
        write(d, "train.json", &serde_json::to_vec(&train).unwrap());
        let t = std::time::Instant::now();
        let ds = load_iclevr(d, 64).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(ds.len(), n);
        eprintln!(
            "{n} PNGs of 320x240 -> 64x64 on {} threads: {s:.2} s = {:.0} images/s \
             (18009 would take {:.0} s)",
            worker_threads(),
            n as f64 / s,
            18009.0 * s / n as f64
        );
    }
}
