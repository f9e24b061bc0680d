//! CIFAR-10 in its binary version (`cifar-10-binary.tar.gz`).
//!
//! Each batch file (`data_batch_1.bin` .. `data_batch_5.bin` for training, `test_batch.bin`
//! for testing) is a plain sequence of 3073-byte records: one label byte (0-9) followed by
//! 3072 pixel bytes, 1024 red, then 1024 green, then 1024 blue, each plane a row-major 32x32
//! image. The pixels are therefore already in CHW order and are copied as they are.
//! `batches.meta.txt` beside the batches holds the ten class names, one per line; when it is
//! missing the standard names ([`CLASS_NAMES`]) are used.
//!
//! [`load_cifar10`] takes the folder holding the batches, its parent (the folder the official
//! tarball was unpacked in, holding `cifar-10-batches-bin/`), or one batch file.

use std::fs;
use std::path::{Path, PathBuf};

use super::{ConditionKind, InMemoryDataset};
use crate::error::{Error, Result};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixel bytes of one image (3 x 32 x 32).
pub const IMAGE_LEN: usize = 3 * SIDE * SIDE;
/// Bytes of one record: the label byte and the pixels.
pub const RECORD_LEN: usize = 1 + IMAGE_LEN;
/// The standard class names, in label order (used when `batches.meta.txt` is missing).
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// The training batches, in the order they are loaded.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch.
pub const TEST_FILE: &str = "test_batch.bin";
/// The class names file.
pub const META_FILE: &str = "batches.meta.txt";
/// The folder the official tarball unpacks to.
pub const TARBALL_DIR: &str = "cifar-10-batches-bin";

/// Record length of the CIFAR-100 binary version (coarse and fine label bytes), recognised
/// only to say so in the error.
const CIFAR100_RECORD_LEN: u64 = 2 + IMAGE_LEN as u64;

/// Whether `dir` holds any CIFAR-10 binary batch.
fn has_batches(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain(std::iter::once(&TEST_FILE))
        .any(|f| dir.join(f).is_file())
}

/// A hint for a folder holding the Python (pickle) version instead of the binary one.
fn python_version_hint(dir: &Path) -> &'static str {
    let python = dir.join("cifar-10-batches-py").is_dir()
        || dir.join("data_batch_1").is_file()
        || dir.join("batches.meta").is_file();
    if python {
        " (this looks like the Python/pickle version of CIFAR-10; ganscope reads the binary \
         version, cifar-10-binary.tar.gz, which unpacks to cifar-10-batches-bin/)"
    } else {
        ""
    }
}

/// Find the folder (for `batches.meta.txt`) and the batch files to load for `path`
/// (see [`load_cifar10`]).
pub fn find_cifar10_files(path: &Path, train: bool) -> Result<(PathBuf, Vec<PathBuf>)> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") || name.ends_with(".tar") {
            return Err(Error::bad_file(
                path,
                format!(
                    "is an archive: unpack it first (tar xzf), then pass the {TARBALL_DIR} \
                     folder it creates (or the folder holding it)"
                ),
            ));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return Ok((dir, vec![path.to_path_buf()]));
    }
    let candidates = [path.to_path_buf(), path.join(TARBALL_DIR)];
    let Some(dir) = candidates.iter().find(|d| has_batches(d)) else {
        return Err(Error::bad_file(
            path,
            format!(
                "no CIFAR-10 binary batches found: looked for {} .. {} and {TEST_FILE} in {} \
                 and {}{}",
                TRAIN_FILES[0],
                TRAIN_FILES[4],
                candidates[0].display(),
                candidates[1].display(),
                python_version_hint(path)
            ),
        ));
    };
    let files: Vec<PathBuf> = if train {
        TRAIN_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect()
    } else {
        Some(dir.join(TEST_FILE))
            .filter(|p| p.is_file())
            .into_iter()
            .collect()
    };
    if files.is_empty() {
        let (what, names) = if train {
            (
                "training",
                format!("{} .. {}", TRAIN_FILES[0], TRAIN_FILES[4]),
            )
        } else {
            ("test", TEST_FILE.to_string())
        };
        return Err(Error::bad_file(
            dir,
            format!("holds CIFAR-10 batches, but no {what} batch ({names})"),
        ));
    }
    Ok((dir.clone(), files))
}

/// The class names in `dir/batches.meta.txt`, or [`CLASS_NAMES`] when that file is missing.
/// Blank lines (the official file ends with some) are ignored; any other count than ten is
/// an error.
pub fn class_names_in(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join(META_FILE);
    if !path.is_file() {
        return Ok(CLASS_NAMES.iter().map(|s| s.to_string()).collect());
    }
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::bad_file(&path, "is not UTF-8 text (expected 10 class names)"))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != CLASS_NAMES.len() {
        return Err(Error::bad_file(
            &path,
            format!(
                "holds {} class names, expected {} (one per line)",
                names.len(),
                CLASS_NAMES.len()
            ),
        ));
    }
    Ok(names)
}

/// Read one binary batch file: its labels and its pixels (CHW, image after image).
pub fn read_cifar_batch(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::bad_file(
            path,
            "is a directory, expected a CIFAR-10 batch file",
        ));
    }
    check_size(path, meta.len())?;
    let data = fs::read(path).map_err(|e| Error::io(path, e))?;
    // The file may have changed since; check what was actually read.
    check_size(path, data.len() as u64)?;
    let n = data.len() / RECORD_LEN;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::new();
    pixels
        .try_reserve_exact(n * IMAGE_LEN)
        .map_err(|_| Error::bad_file(path, format!("not enough memory for its {n} images")))?;
    for (i, rec) in data.chunks_exact(RECORD_LEN).enumerate() {
        let label = rec[0];
        if label as usize >= CLASS_NAMES.len() {
            return Err(Error::bad_file(
                path,
                format!(
                    "record {i} (byte offset {}) has label {label}; CIFAR-10 labels are 0..=9",
                    i * RECORD_LEN
                ),
            ));
        }
        labels.push(label);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((labels, pixels))
}

fn check_size(path: &Path, len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::bad_file(
            path,
            format!("file is empty, expected {RECORD_LEN}-byte CIFAR-10 records"),
        ));
    }
    let rec = RECORD_LEN as u64;
    if !len.is_multiple_of(rec) {
        let hint = if len.is_multiple_of(CIFAR100_RECORD_LEN) {
            format!(
                " (it is a multiple of {CIFAR100_RECORD_LEN}: this looks like a CIFAR-100 \
                 batch, which is not supported)"
            )
        } else {
            String::new()
        };
        return Err(Error::bad_file(
            path,
            format!(
                "size {len} bytes is not a multiple of the {RECORD_LEN}-byte record (1 label \
                 byte + {IMAGE_LEN} pixel bytes): {} whole records and {} bytes left over, so \
                 the file is truncated or not a CIFAR-10 binary batch{hint}",
                len / rec,
                len % rec
            ),
        ));
    }
    Ok(())
}

/// Load CIFAR-10 (binary version) as a one-hot conditioned 3x32x32 dataset.
///
/// `path` may be
/// - the folder holding the batch files (`cifar-10-batches-bin/`),
/// - its parent (the folder the official tarball was unpacked in),
/// - one batch file, which is loaded alone whatever `train` says (class names from
///   `batches.meta.txt` beside it, if there).
///
/// With `train` the data batches `data_batch_1.bin` .. `data_batch_5.bin` that exist are
/// loaded in that order (at least one must); otherwise `test_batch.bin`.
pub fn load_cifar10(path: &Path, train: bool) -> Result<InMemoryDataset> {
    let (dir, files) = find_cifar10_files(path, train)?;
    let label_names = class_names_in(&dir)?;
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for f in &files {
        let (l, p) = read_cifar_batch(f)?;
        labels.extend(l.into_iter().map(|l| vec![l as u16]));
        if pixels.is_empty() {
            pixels = p;
        } else {
            pixels.try_reserve(p.len()).map_err(|_| {
                Error::bad_file(f, "not enough memory to add its images to the dataset")
            })?;
            pixels.extend_from_slice(&p);
        }
    }
    let source = if files.len() == 1 {
        files[0].display().to_string()
    } else {
        dir.display().to_string()
    };
    Ok(InMemoryDataset {
        source,
        channels: 3,
        height: SIDE,
        width: SIDE,
        pixels,
        kind: ConditionKind::OneHot,
        label_names,
        labels,
        steps: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::data::test_util::{err_mentions, write};

    const PLANE: usize = SIDE * SIDE;

    /// One record: R plane `r`, G plane `g`, B plane `b`, except pixel (y=1, x=2) of the red
    /// plane, which is `r + 1` (to check row-major order).
    fn record(label: u8, r: u8, g: u8, b: u8) -> Vec<u8> {
        let mut v = vec![label];
        v.extend(std::iter::repeat_n(r, PLANE));
        v.extend(std::iter::repeat_n(g, PLANE));
        v.extend(std::iter::repeat_n(b, PLANE));
        v[1 + SIDE + 2] = r + 1;
        v
    }

    /// `n` records; record i has label `(first_label + i) % 10` and planes 10+i, 20+i, 30+i.
    fn batch(n: usize, first_label: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let i8 = i as u8;
                record((first_label + i8) % 10, 10 + i8, 20 + i8, 30 + i8)
            })
            .collect()
    }

    #[test]
    fn pixels_and_labels_land_right() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "test_batch.bin", &batch(7, 3));
        let ds = load_cifar10(d.path(), false).unwrap();
        assert_eq!(ds.len(), 7);
        assert_eq!(ds.image_shape(), (3, 32, 32));
        assert_eq!(ds.condition_kind(), ConditionKind::OneHot);
        assert_eq!(ds.num_conditions(), 10);
        assert_eq!(ds.label_names()[0], "airplane");
        assert_eq!(ds.label_names()[9], "truck");
        assert_eq!(ds.source, p.display().to_string());
        for i in 0..7 {
            assert_eq!(ds.labels[i], vec![((3 + i) % 10) as u16]);
            let img = ds.image_u8(i);
            let (r, g, b) = (10 + i as u8, 20 + i as u8, 30 + i as u8);
            assert_eq!(img.len(), IMAGE_LEN);
            assert_eq!(img[0], r);
            assert_eq!(img[SIDE + 2], r + 1, "row-major red (1, 2)");
            assert_eq!(img[SIDE + 3], r);
            assert!(img[PLANE..2 * PLANE].iter().all(|&v| v == g));
            assert!(img[2 * PLANE..].iter().all(|&v| v == b));
        }
        let c = ds.condition(0);
        assert_eq!(c.len(), 10);
        assert_eq!(c[3], 1.0);
        assert_eq!(c.iter().sum::<f32>(), 1.0);
        // Through the batch tensor: record 0's red plane is 10 -> 10/127.5 - 1.
        let (x, y) = ds.batch(&[0, 6], &candle_core::Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[2, 3, 32, 32]);
        assert_eq!(y.dims(), &[2, 10]);
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - (10.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((v[IMAGE_LEN + 2 * PLANE] - (36.0 / 127.5 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn train_concatenates_existing_batches_in_order() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "data_batch_1.bin", &batch(2, 0));
        // data_batch_2.bin is missing: whichever exist are loaded.
        write(d.path(), "data_batch_3.bin", &batch(3, 5));
        write(d.path(), "test_batch.bin", &batch(4, 9));
        let ds = load_cifar10(d.path(), true).unwrap();
        assert_eq!(ds.len(), 5);
        let labels: Vec<u16> = ds.labels.iter().map(|l| l[0]).collect();
        assert_eq!(labels, vec![0, 1, 5, 6, 7]);
        assert_eq!(ds.image_u8(2)[0], 10);
        assert_eq!(ds.image_u8(4)[2 * PLANE], 32);
        assert_eq!(ds.source, d.path().display().to_string());
        let test = load_cifar10(d.path(), false).unwrap();
        assert_eq!(test.len(), 4);
        assert_eq!(test.labels[0], vec![9]);
    }

    #[test]
    fn folder_parent_and_file_forms() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join(TARBALL_DIR);
        write(&bin, "data_batch_1.bin", &batch(3, 1));
        let tb = write(&bin, "test_batch.bin", &batch(2, 7));
        // The folder itself and its parent.
        assert_eq!(load_cifar10(&bin, true).unwrap().len(), 3);
        let from_parent = load_cifar10(d.path(), true).unwrap();
        assert_eq!(from_parent.len(), 3);
        assert_eq!(from_parent.labels[0], vec![1]);
        assert_eq!(load_cifar10(d.path(), false).unwrap().len(), 2);
        // One file: loaded alone, whatever `train` says.
        let one = load_cifar10(&tb, true).unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(one.labels, vec![vec![7], vec![8]]);
        assert_eq!(one.source, tb.display().to_string());
        // Any file name works for the file form.
        let odd = write(d.path(), "my-batch.dat", &batch(1, 4));
        assert_eq!(load_cifar10(&odd, false).unwrap().labels, vec![vec![4]]);
    }

    #[test]
    fn truncated_file() {
        let d = tempfile::tempdir().unwrap();
        let mut b = batch(7, 0);
        b.truncate(b.len() - 5);
        let p = write(d.path(), "data_batch_1.bin", &b);
        let size = b.len().to_string();
        err_mentions(
            load_cifar10(d.path(), true),
            &p,
            &["truncated", &size, "3073-byte record", "6 whole records"],
        );
        let p = write(d.path(), "x/test_batch.bin", &b[..100]);
        err_mentions(load_cifar10(&p, false), &p, &["100 bytes", "truncated"]);
        let p = write(d.path(), "y/test_batch.bin", b"");
        err_mentions(load_cifar10(&p, false), &p, &["empty"]);
        // A CIFAR-100 batch (3074-byte records) is recognised.
        let p = write(d.path(), "z/train.bin", &vec![0u8; 3 * 3074]);
        err_mentions(load_cifar10(&p, true), &p, &["CIFAR-100"]);
    }

    #[test]
    fn bad_label() {
        let d = tempfile::tempdir().unwrap();
        let mut b = batch(7, 0);
        b[4 * RECORD_LEN] = 10;
        let p = write(d.path(), "data_batch_2.bin", &b);
        err_mentions(
            load_cifar10(d.path(), true),
            &p,
            &["record 4", "label 10", "0..=9"],
        );
        b[4 * RECORD_LEN] = 255;
        let p = write(d.path(), "test_batch.bin", &b);
        err_mentions(
            load_cifar10(d.path(), false),
            &p,
            &["record 4", "label 255"],
        );
    }

    #[test]
    fn missing_folder_and_missing_split() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nowhere");
        err_mentions(load_cifar10(&missing, true), &missing, &[]);
        // An existing folder without batches: both places are named.
        let empty = d.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        let msg = err_mentions(
            load_cifar10(&empty, true),
            &empty,
            &["no CIFAR-10 binary batches", "data_batch_1.bin", TEST_FILE],
        );
        assert!(msg.contains(&empty.join(TARBALL_DIR).display().to_string()));
        // The Python version is recognised.
        write(&empty, "cifar-10-batches-py/data_batch_1", b"pickle");
        err_mentions(load_cifar10(&empty, true), &empty, &["Python", "binary"]);
        // Only a test batch: asking for training data fails, naming the folder.
        let only_test = d.path().join("t");
        write(&only_test, "test_batch.bin", &batch(1, 0));
        err_mentions(
            load_cifar10(&only_test, true),
            &only_test,
            &["no training batch", "data_batch_1.bin"],
        );
        let only_train = d.path().join("u");
        write(&only_train, "data_batch_5.bin", &batch(1, 0));
        err_mentions(
            load_cifar10(&only_train, false),
            &only_train,
            &["no test batch", TEST_FILE],
        );
        // An archive.
        let tgz = write(d.path(), "cifar-10-binary.tar.gz", b"\x1f\x8b");
        err_mentions(load_cifar10(&tgz, true), &tgz, &["unpack"]);
    }

    #[test]
    fn meta_names() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "test_batch.bin", &batch(2, 0));
        let names = [
            "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "lorry",
        ];
        // The official file ends with blank lines; CRLF is fine too.
        let text = format!("{}\r\n\n\n", names.join("\r\n"));
        write(d.path(), META_FILE, text.as_bytes());
        let ds = load_cifar10(d.path(), false).unwrap();
        assert_eq!(ds.label_names(), names.map(String::from).as_slice());
        // Also for the file form.
        let ds = load_cifar10(&d.path().join("test_batch.bin"), false).unwrap();
        assert_eq!(ds.label_names()[9], "lorry");
        // A wrong count is an error naming the meta file.
        let m = write(d.path(), META_FILE, b"a\nb\nc\n");
        err_mentions(load_cifar10(d.path(), false), &m, &["3 class names", "10"]);
        let m = write(d.path(), META_FILE, b"\xff\xfe\n");
        err_mentions(load_cifar10(d.path(), false), &m, &["UTF-8"]);
        // Missing: the standard names.
        fs::remove_file(&m).unwrap();
        assert_eq!(
            load_cifar10(d.path(), false).unwrap().label_names(),
            CLASS_NAMES.map(String::from).as_slice()
        );
    }
}
