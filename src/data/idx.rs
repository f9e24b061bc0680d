//! MNIST and Fashion-MNIST in their original IDX format, raw or gzipped.
//!
//! An IDX image file is a 16-byte big-endian header (magic `0x00000803`, count, rows, cols)
//! followed by exactly `count * rows * cols` pixel bytes; a label file is an 8-byte header
//! (magic `0x00000801`, count) followed by `count` label bytes. Gzip is recognised by its
//! magic bytes (`1f 8b`), not by the file name, so `.gz` files that were already unpacked by
//! a browser and unpacked files that kept their `.gz` name both load.
//!
//! [`load_mnist`] finds the files in a plain directory, in a torchvision root
//! (`MNIST/raw/`, `FashionMNIST/raw/`), or beside a named images file, and when no path is
//! given looks in the usual places (see [`default_search_dirs`]).

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

use super::{ConditionKind, InMemoryDataset};
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const IMAGES_HEADER_LEN: usize = 16;
const LABELS_HEADER_LEN: usize = 8;
/// Deflate cannot expand data by more than about this factor; bounds the up-front allocation
/// for a gzipped file whose header claims an absurd size.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Which of the two 28x28 grey ten-class sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MnistVariant {
    /// Handwritten digits.
    Mnist,
    /// Zalando's clothing images.
    FashionMnist,
}

const DIGIT_NAMES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
const FASHION_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

impl MnistVariant {
    /// The ten class names, in label order.
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            MnistVariant::Mnist => &DIGIT_NAMES,
            MnistVariant::FashionMnist => &FASHION_NAMES,
        }
    }

    /// Short name: `mnist` or `fashion-mnist` (also the cache directory name).
    pub fn name(self) -> &'static str {
        match self {
            MnistVariant::Mnist => "mnist",
            MnistVariant::FashionMnist => "fashion-mnist",
        }
    }

    /// The directory torchvision keeps this set in under its root (`<root>/<dir>/raw/`).
    pub fn torchvision_dir(self) -> &'static str {
        match self {
            MnistVariant::Mnist => "MNIST",
            MnistVariant::FashionMnist => "FashionMNIST",
        }
    }
}

impl fmt::Display for MnistVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MnistVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match norm.as_str() {
            "mnist" => Ok(MnistVariant::Mnist),
            "fashionmnist" | "fashion" => Ok(MnistVariant::FashionMnist),
            _ => Err(Error::Msg(format!(
                "unknown MNIST variant `{s}` (expected `mnist` or `fashion-mnist`)"
            ))),
        }
    }
}

/// The training (60,000 images) or test (10,000 images) part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// File name prefix: `train` or `t10k`.
    pub fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    /// Base name of the images file, without `.gz`.
    pub fn images_file_name(self) -> String {
        format!("{}-images-idx3-ubyte", self.file_prefix())
    }

    /// Base name of the labels file, without `.gz`.
    pub fn labels_file_name(self) -> String {
        format!("{}-labels-idx1-ubyte", self.file_prefix())
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading IDX files
// ---------------------------------------------------------------------------------------------

/// An opened IDX file: a reader over its (decompressed) bytes.
struct IdxReader<'a> {
    path: &'a Path,
    gz: bool,
    /// Size of the file on disk (compressed size for gzip).
    file_len: u64,
    inner: Box<dyn Read + 'a>,
}

impl<'a> IdxReader<'a> {
    fn open(path: &'a Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::bad_file(
                path,
                "is a directory, expected an IDX file",
            ));
        }
        let file_len = meta.len();
        let mut magic = [0u8; 2];
        let got = read_full(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let gz = got == 2 && magic == [0x1f, 0x8b];
        let inner: Box<dyn Read + 'a> = if gz {
            Box::new(MultiGzDecoder::new(io::BufReader::with_capacity(
                1 << 16,
                file,
            )))
        } else {
            Box::new(file)
        };
        Ok(Self {
            path,
            gz,
            file_len,
            inner,
        })
    }

    /// "file" or "decompressed data", for messages.
    fn what(&self) -> &'static str {
        if self.gz { "decompressed data" } else { "file" }
    }

    /// Turn a read error into the library error: decoding failures of a gzip stream are
    /// reported as a bad file (with `when` saying how far decoding got), other failures as
    /// I/O errors.
    fn read_error(&self, e: io::Error, when: &str) -> Error {
        if self.gz {
            Error::bad_file(
                self.path,
                format!("corrupt or truncated gzip data ({when}): {e}"),
            )
        } else {
            Error::io(self.path, e)
        }
    }

    /// Read the `len`-byte header; errors if the data is shorter.
    fn header(&mut self, len: usize, kind: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let got = match read_full(&mut self.inner, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                return Err(self.read_error(e, &format!("while decoding the {len}-byte header")));
            }
        };
        if got == 0 {
            let msg = if self.gz {
                format!("gzip stream decompresses to nothing, expected an IDX {kind} file")
            } else {
                format!("file is empty, expected an IDX {kind} file")
            };
            return Err(Error::bad_file(self.path, msg));
        }
        if got < len {
            return Err(Error::bad_file(
                self.path,
                format!(
                    "{} is only {got} bytes, too short for the {len}-byte header of an IDX \
                     {kind} file",
                    self.what()
                ),
            ));
        }
        Ok(buf)
    }

    /// Read exactly `len` payload bytes after the header into one Vec, and check that nothing
    /// follows. `describe` says what the payload is (for the messages).
    fn payload(&mut self, header_len: usize, len: u64, describe: &str) -> Result<Vec<u8>> {
        // Allocate up front what the file can actually hold, never more than the header claims
        // (a corrupt header must not trigger a huge allocation).
        let on_disk = self.file_len.saturating_sub(header_len as u64);
        let cap_bound = if self.gz {
            self.file_len.saturating_mul(MAX_DEFLATE_RATIO)
        } else {
            on_disk
        };
        let cap = len.min(cap_bound).min(isize::MAX as u64 / 2) as usize;
        let mut data = Vec::with_capacity(cap);
        let expected_total = header_len as u64 + len;
        let res = (&mut self.inner)
            .take(len.saturating_add(1))
            .read_to_end(&mut data);
        if let Err(e) = res {
            let got = header_len as u64 + data.len() as u64;
            let when = if got >= expected_total {
                format!(
                    "all {expected_total} bytes the header promises decoded, but what follows \
                     them is not valid gzip"
                )
            } else {
                format!("decoding stopped short of the {expected_total} bytes the header promises")
            };
            return Err(self.read_error(e, &when));
        }
        let got = data.len() as u64;
        if got < len {
            return Err(Error::bad_file(
                self.path,
                format!(
                    "truncated: the header promises {describe} = {len} bytes after the \
                     {header_len}-byte header, but only {got} bytes follow ({} is {} bytes, \
                     expected {expected_total})",
                    self.what(),
                    header_len as u64 + got,
                ),
            ));
        }
        if got > len {
            // Count the rest (without keeping it) to say how much is extra.
            let rest = io::copy(&mut self.inner, &mut io::sink());
            let extra = match rest {
                Ok(n) => format!("{} extra bytes", n + 1),
                Err(e) => {
                    let when = format!(
                        "more than the {expected_total} bytes the header promises, and then \
                         invalid gzip"
                    );
                    return Err(self.read_error(e, &when));
                }
            };
            return Err(Error::bad_file(
                self.path,
                format!(
                    "trailing data: the header promises {describe} = {len} bytes after the \
                     {header_len}-byte header ({} should be {expected_total} bytes), but \
                     {extra} follow",
                    self.what()
                ),
            ));
        }
        Ok(data)
    }
}

/// Read into `buf` until it is full or the reader ends; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn check_magic(path: &Path, found: u32, expected: u32, kind: &str) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    let hint = match found {
        IMAGES_MAGIC => " (this is an IDX images file)",
        LABELS_MAGIC => " (this is an IDX labels file)",
        _ => "",
    };
    Err(Error::bad_file(
        path,
        format!(
            "not an IDX {kind} file: magic number is {found:#010x}, expected {expected:#010x}{hint}"
        ),
    ))
}

/// Read an IDX images file (magic `0x00000803`), raw or gzipped.
///
/// Returns `(n, rows, cols, pixels)` with `pixels.len() == n * rows * cols`, image after
/// image, row-major.
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<(usize, usize, usize, Vec<u8>)> {
    let path = path.as_ref();
    let mut r = IdxReader::open(path)?;
    let h = r.header(IMAGES_HEADER_LEN, "images")?;
    check_magic(path, be_u32(&h, 0), IMAGES_MAGIC, "images")?;
    let (n, rows, cols) = (be_u32(&h, 4), be_u32(&h, 8), be_u32(&h, 12));
    if rows == 0 || cols == 0 {
        return Err(Error::bad_file(
            path,
            format!("header gives an image size of {rows}x{cols}; both must be positive"),
        ));
    }
    let Some(len) = (n as u64)
        .checked_mul(rows as u64)
        .and_then(|l| l.checked_mul(cols as u64))
    else {
        return Err(Error::bad_file(
            path,
            format!("header claims {n} images of {rows}x{cols}, more bytes than any file holds"),
        ));
    };
    let describe = format!("{n} images of {rows}x{cols}");
    let pixels = r.payload(IMAGES_HEADER_LEN, len, &describe)?;
    Ok((n as usize, rows as usize, cols as usize, pixels))
}

/// Read an IDX labels file (magic `0x00000801`), raw or gzipped.
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let mut r = IdxReader::open(path)?;
    let h = r.header(LABELS_HEADER_LEN, "labels")?;
    check_magic(path, be_u32(&h, 0), LABELS_MAGIC, "labels")?;
    let n = be_u32(&h, 4);
    r.payload(LABELS_HEADER_LEN, n as u64, &format!("{n} labels"))
}

// ---------------------------------------------------------------------------------------------
// Finding the files
// ---------------------------------------------------------------------------------------------

/// The first of `dir/name` and `dir/name.gz` that is a file (the unpacked one first: it
/// loads faster).
fn find_in(dir: &Path, name: &str) -> Option<PathBuf> {
    [name.to_string(), format!("{name}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Look for the images and labels of `split` directly in `dir`.
/// `Ok(None)` when neither is there; an error when only one is.
fn pair_in_dir(dir: &Path, split: Split) -> Result<Option<(PathBuf, PathBuf)>> {
    let img_name = split.images_file_name();
    let lbl_name = split.labels_file_name();
    match (find_in(dir, &img_name), find_in(dir, &lbl_name)) {
        (Some(i), Some(l)) => Ok(Some((i, l))),
        (None, None) => Ok(None),
        (Some(i), None) => Err(Error::bad_file(
            i,
            format!(
                "found the images but no labels beside them (looked for {0} and {0}.gz in {1})",
                lbl_name,
                dir.display()
            ),
        )),
        (None, Some(l)) => Err(Error::bad_file(
            l,
            format!(
                "found the labels but no images beside them (looked for {0} and {0}.gz in {1})",
                img_name,
                dir.display()
            ),
        )),
    }
}

/// The directories looked in for a user-given directory `root`, in order: the directory
/// itself, a torchvision root (`<root>/MNIST/raw`), a torchvision set directory
/// (`<root>/raw`), and a data root holding `<root>/mnist` or `<root>/fashion-mnist`.
fn dirs_under(variant: MnistVariant, root: &Path) -> Vec<PathBuf> {
    vec![
        root.to_path_buf(),
        root.join(variant.torchvision_dir()).join("raw"),
        root.join("raw"),
        root.join(variant.name()),
    ]
}

/// Where [`load_mnist`] looks when no path is given, in order: Debian's `fashion-mnist`
/// package (`/usr/share/datasets/fashion-mnist`, Fashion-MNIST only),
/// `$HOME/.cache/ganscope/<mnist|fashion-mnist>`, and a torchvision root at `./data`
/// (`./data/MNIST/raw`, `./data/FashionMNIST/raw`).
pub fn default_search_dirs(variant: MnistVariant) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if variant == MnistVariant::FashionMnist {
        dirs.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        dirs.push(
            PathBuf::from(home)
                .join(".cache")
                .join("ganscope")
                .join(variant.name()),
        );
    }
    dirs.push(
        PathBuf::from("data")
            .join(variant.torchvision_dir())
            .join("raw"),
    );
    dirs
}

/// Search `dirs` in order for the images and labels of `split`.
fn search_dirs(
    variant: MnistVariant,
    split: Split,
    dirs: &[PathBuf],
    origin: &str,
) -> Result<(PathBuf, PathBuf)> {
    for d in dirs {
        if let Some(pair) = pair_in_dir(d, split)? {
            return Ok(pair);
        }
    }
    let img = split.images_file_name();
    let lbl = split.labels_file_name();
    let places: Vec<String> = dirs.iter().map(|d| format!("  {}", d.display())).collect();
    Err(Error::Msg(format!(
        "{variant} {split} set not found {origin}: looked for {img}[.gz] and {lbl}[.gz] in\n{}",
        places.join("\n")
    )))
}

/// The labels file beside an images file named `*images-idx3-ubyte[.gz]`.
fn labels_beside(images: &Path) -> Result<PathBuf> {
    let name = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    let Some(lbl_base) = base
        .contains("images-idx3")
        .then(|| base.replacen("images-idx3", "labels-idx1", 1))
    else {
        return Err(Error::bad_file(
            images,
            "cannot tell where the labels are: an images file should be named \
             `<train|t10k>-images-idx3-ubyte[.gz]` with its `-labels-idx1-ubyte[.gz]` beside it",
        ));
    };
    let dir = images.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    find_in(dir, &lbl_base).ok_or_else(|| {
        Error::bad_file(
            images,
            format!(
                "no labels beside this images file (looked for {0} and {0}.gz in {1})",
                lbl_base,
                dir.display()
            ),
        )
    })
}

/// Find the images and labels files of `split` for `path` (see [`load_mnist`]).
pub fn find_mnist_files(
    variant: MnistVariant,
    path: Option<&Path>,
    split: Split,
) -> Result<(PathBuf, PathBuf)> {
    let Some(path) = path else {
        return search_dirs(
            variant,
            split,
            &default_search_dirs(variant),
            "in the default places (pass the data directory explicitly to load it from elsewhere)",
        );
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        search_dirs(
            variant,
            split,
            &dirs_under(variant, path),
            &format!("under {}", path.display()),
        )
    } else {
        Ok((path.to_path_buf(), labels_beside(path)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Load MNIST or Fashion-MNIST as a one-hot conditioned, one-channel dataset.
///
/// `path` may be
/// - a directory holding `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`
///   (`t10k-...` for [`Split::Test`]),
/// - a torchvision root holding `MNIST/raw/` or `FashionMNIST/raw/` with those files (or
///   the `MNIST/` directory itself, or a data root holding `mnist/` / `fashion-mnist/`),
/// - the images file itself, with its labels file beside it (the file's own split is used),
/// - `None`: the places in [`default_search_dirs`] are searched, and the error lists them all
///   when nothing is found.
pub fn load_mnist(
    variant: MnistVariant,
    path: Option<&Path>,
    split: Split,
) -> Result<InMemoryDataset> {
    let (images_path, labels_path) = find_mnist_files(variant, path, split)?;
    let (n, rows, cols, pixels) = read_idx_images(&images_path)?;
    if n == 0 {
        return Err(Error::bad_file(&images_path, "contains no images"));
    }
    let raw_labels = read_idx_labels(&labels_path)?;
    if raw_labels.len() != n {
        return Err(Error::bad_file(
            &labels_path,
            format!(
                "has {} labels, but the images file {} has {n} images",
                raw_labels.len(),
                images_path.display()
            ),
        ));
    }
    let names = variant.class_names();
    if let Some((i, &l)) = raw_labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= names.len())
    {
        return Err(Error::bad_file(
            &labels_path,
            format!(
                "label {i} is {l}, but {variant} has only {} classes (0..={})",
                names.len(),
                names.len() - 1
            ),
        ));
    }
    Ok(InMemoryDataset {
        source: images_path.display().to_string(),
        channels: 1,
        height: rows,
        width: cols,
        pixels,
        kind: ConditionKind::OneHot,
        label_names: names.iter().map(|s| s.to_string()).collect(),
        labels: raw_labels.into_iter().map(|l| vec![l as u16]).collect(),
        steps: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::data::test_util::{err_mentions, write};
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;
    use std::time::Instant;

    fn shared(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(name);
        if p.is_dir() {
            Some(p)
        } else {
            eprintln!("skipping: {} does not exist", p.display());
            None
        }
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn images_bytes(n: u32, rows: u32, cols: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(IMAGES_MAGIC.to_be_bytes());
        v.extend(n.to_be_bytes());
        v.extend(rows.to_be_bytes());
        v.extend(cols.to_be_bytes());
        v.extend((0..n * rows * cols).map(|i| (i % 256) as u8));
        v
    }

    fn labels_bytes(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(LABELS_MAGIC.to_be_bytes());
        v.extend((labels.len() as u32).to_be_bytes());
        v.extend(labels);
        v
    }

    #[test]
    fn real_mnist_train_and_test() {
        let Some(dir) = shared("mnist") else { return };
        let t = Instant::now();
        let ds = load_mnist(MnistVariant::Mnist, Some(&dir), Split::Train).unwrap();
        eprintln!("MNIST train (60k) loaded in {:?}", t.elapsed());
        assert_eq!(ds.len(), 60_000);
        assert_eq!(ds.image_shape(), (1, 28, 28));
        assert_eq!(ds.pixels.len(), 60_000 * 28 * 28);
        assert_eq!(ds.condition_kind(), ConditionKind::OneHot);
        assert_eq!(ds.labels[0], vec![5]);
        assert_eq!(ds.label_names()[5], "5");
        let c = ds.condition(0);
        assert_eq!(c.len(), 10);
        assert_eq!(c[5], 1.0);
        assert_eq!(c.iter().sum::<f32>(), 1.0);
        assert_eq!(*ds.pixels.iter().min().unwrap(), 0);
        assert_eq!(*ds.pixels.iter().max().unwrap(), 255);
        // Every class is present.
        let mut seen = [false; 10];
        for l in &ds.labels {
            seen[l[0] as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert!(ds.source.contains("train-images-idx3-ubyte"));

        let test = load_mnist(MnistVariant::Mnist, Some(&dir), Split::Test).unwrap();
        assert_eq!(test.len(), 10_000);
        assert_eq!(test.labels[0], vec![7]);
        assert!(test.source.contains("t10k-images"));
    }

    #[test]
    fn real_fashion_mnist() {
        let Some(dir) = shared("fashion-mnist") else {
            return;
        };
        let ds = load_mnist(MnistVariant::FashionMnist, Some(&dir), Split::Train).unwrap();
        assert_eq!(ds.len(), 60_000);
        assert_eq!(ds.image_shape(), (1, 28, 28));
        assert_eq!(ds.labels[0], vec![9]);
        assert_eq!(ds.label_names()[9], "Ankle boot");
        assert_eq!(ds.num_conditions(), 10);
        assert_eq!(*ds.pixels.iter().max().unwrap(), 255);
        let test = load_mnist(MnistVariant::FashionMnist, Some(&dir), Split::Test).unwrap();
        assert_eq!(test.len(), 10_000);
    }

    #[test]
    fn real_images_file_path_and_data_root() {
        let Some(dir) = shared("mnist") else { return };
        let img = dir.join("t10k-images-idx3-ubyte.gz");
        let ds = load_mnist(MnistVariant::Mnist, Some(&img), Split::Test).unwrap();
        assert_eq!(ds.len(), 10_000);
        // `../shared/data` is a data root holding `mnist/`.
        let root = dir.parent().unwrap();
        let ds = load_mnist(MnistVariant::Mnist, Some(root), Split::Test).unwrap();
        assert_eq!(ds.len(), 10_000);
    }

    #[test]
    fn class_names_and_parsing() {
        assert_eq!(MnistVariant::Mnist.class_names().len(), 10);
        assert_eq!(MnistVariant::Mnist.class_names()[0], "0");
        assert_eq!(MnistVariant::FashionMnist.class_names()[0], "T-shirt/top");
        assert_eq!(MnistVariant::FashionMnist.class_names()[9], "Ankle boot");
        assert_eq!(
            "fashion-mnist".parse::<MnistVariant>().unwrap(),
            MnistVariant::FashionMnist
        );
        assert_eq!(
            "MNIST".parse::<MnistVariant>().unwrap(),
            MnistVariant::Mnist
        );
        assert!("cifar".parse::<MnistVariant>().is_err());
        assert_eq!(
            serde_json::to_string(&MnistVariant::FashionMnist).unwrap(),
            "\"fashion-mnist\""
        );
    }

    #[test]
    fn raw_and_gz_files_load_alike() {
        let d = tempfile::tempdir().unwrap();
        let img = images_bytes(3, 4, 5);
        let lbl = labels_bytes(&[1, 2, 9]);
        let raw_i = write(d.path(), "raw/train-images-idx3-ubyte", &img);
        write(d.path(), "raw/train-labels-idx1-ubyte", &lbl);
        // gzip detected by content: the compressed file has no .gz name here.
        let gz_i = write(d.path(), "gz/train-images-idx3-ubyte", &gz(&img));
        write(d.path(), "gz/train-labels-idx1-ubyte.gz", &gz(&lbl));

        let (n, r, c, px) = read_idx_images(&raw_i).unwrap();
        assert_eq!((n, r, c), (3, 4, 5));
        assert_eq!(px, img[16..]);
        assert_eq!(read_idx_images(&gz_i).unwrap().3, img[16..]);

        for sub in ["raw", "gz"] {
            let ds =
                load_mnist(MnistVariant::Mnist, Some(&d.path().join(sub)), Split::Train).unwrap();
            assert_eq!(ds.len(), 3);
            assert_eq!(ds.image_shape(), (1, 4, 5));
            assert_eq!(ds.labels, vec![vec![1], vec![2], vec![9]]);
            assert_eq!(ds.image_u8(1), &img[16 + 20..16 + 40]);
        }
    }

    #[test]
    fn truncated_raw_file() {
        let d = tempfile::tempdir().unwrap();
        let mut img = images_bytes(2, 28, 28);
        img.truncate(img.len() - 100);
        let p = write(d.path(), "train-images-idx3-ubyte", &img);
        err_mentions(
            read_idx_images(&p),
            &p,
            &["truncated", "2 images of 28x28", "1568 bytes", "1468"],
        );
        // Shorter than the header.
        let p = write(d.path(), "short", &img[..10]);
        err_mentions(
            read_idx_images(&p),
            &p,
            &["only 10 bytes", "16-byte header"],
        );
        let p = write(d.path(), "lshort", &labels_bytes(&[1])[..5]);
        err_mentions(read_idx_labels(&p), &p, &["only 5 bytes", "8-byte header"]);
    }

    #[test]
    fn truncated_gz_file() {
        let d = tempfile::tempdir().unwrap();
        let z = gz(&images_bytes(50, 28, 28));
        let p = write(d.path(), "train-images-idx3-ubyte.gz", &z[..z.len() / 2]);
        err_mentions(read_idx_images(&p), &p, &["gzip", "truncated"]);
        // A complete gzip stream of a truncated IDX file.
        let mut img = images_bytes(5, 28, 28);
        img.truncate(img.len() - 1);
        let p = write(d.path(), "t.gz", &gz(&img));
        err_mentions(
            read_idx_images(&p),
            &p,
            &["truncated", "3920 bytes", "only 3919"],
        );
        // Cut inside the gzip header itself.
        let p = write(d.path(), "tiny.gz", &z[..5]);
        err_mentions(read_idx_images(&p), &p, &["gzip"]);
    }

    #[test]
    fn trailing_garbage() {
        let d = tempfile::tempdir().unwrap();
        let mut lbl = labels_bytes(&[1, 2, 3]);
        lbl.extend([0u8; 7]);
        let p = write(d.path(), "l", &lbl);
        err_mentions(read_idx_labels(&p), &p, &["trailing", "7 extra bytes"]);
        let p = write(d.path(), "l.gz", &gz(&lbl));
        err_mentions(read_idx_labels(&p), &p, &["trailing", "7 extra bytes"]);
        // Garbage after a complete gzip member.
        let mut z = gz(&labels_bytes(&[1, 2, 3]));
        z.extend(b"garbage!");
        let p = write(d.path(), "g.gz", &z);
        err_mentions(read_idx_labels(&p), &p, &["gzip", "what follows them"]);
    }

    #[test]
    fn wrong_magic() {
        let d = tempfile::tempdir().unwrap();
        let lbl = labels_bytes(&[1, 2]);
        let p = write(d.path(), "labels-as-images", &lbl);
        // Long enough for the images header.
        let mut padded = lbl.clone();
        padded.extend([0u8; 16]);
        std::fs::write(&p, &padded).unwrap();
        err_mentions(
            read_idx_images(&p),
            &p,
            &["magic", "0x00000801", "expected 0x00000803", "labels file"],
        );
        let img = images_bytes(1, 2, 2);
        let p = write(d.path(), "images-as-labels.gz", &gz(&img));
        err_mentions(
            read_idx_labels(&p),
            &p,
            &["magic", "0x00000803", "expected 0x00000801"],
        );
        let mut bad = images_bytes(1, 2, 2);
        bad[..4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let p = write(d.path(), "bad", &bad);
        err_mentions(read_idx_images(&p), &p, &["0xdeadbeef", "0x00000803"]);
    }

    #[test]
    fn not_gzip_garbage_and_corrupt_gzip() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "train-images-idx3-ubyte.gz",
            b"<html>404 Not Found</html> this is not an IDX file",
        );
        err_mentions(
            read_idx_images(&p),
            &p,
            &["not an IDX images file", "magic"],
        );
        // Gzip magic, then garbage.
        let mut z = gz(&images_bytes(4, 28, 28));
        let mid = z.len() / 2;
        for b in &mut z[20..mid] {
            *b ^= 0x5a;
        }
        let p = write(d.path(), "corrupt.gz", &z);
        err_mentions(read_idx_images(&p), &p, &["corrupt", "gzip"]);
        let p = write(
            d.path(),
            "magic-only.gz",
            &[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        );
        err_mentions(read_idx_labels(&p), &p, &["gzip"]);
    }

    #[test]
    fn empty_files() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "empty", b"");
        err_mentions(read_idx_images(&p), &p, &["empty"]);
        err_mentions(read_idx_labels(&p), &p, &["empty"]);
        let p = write(d.path(), "empty.gz", &gz(b""));
        err_mentions(read_idx_images(&p), &p, &["decompresses to nothing"]);
        let p = write(d.path(), "zero.gz", &gz(&images_bytes(0, 28, 28)));
        assert_eq!(read_idx_images(&p).unwrap().0, 0);
        let p = write(d.path(), "zero-size", &images_bytes(3, 0, 28));
        err_mentions(read_idx_images(&p), &p, &["0x28"]);
        // A directory of empty train files.
        write(
            d.path(),
            "ds/train-images-idx3-ubyte",
            &images_bytes(0, 28, 28),
        );
        write(d.path(), "ds/train-labels-idx1-ubyte", &labels_bytes(&[]));
        let p = d.path().join("ds/train-images-idx3-ubyte");
        err_mentions(
            load_mnist(
                MnistVariant::Mnist,
                Some(&d.path().join("ds")),
                Split::Train,
            ),
            &p,
            &["no images"],
        );
    }

    #[test]
    fn huge_header_claims_do_not_allocate_or_panic() {
        let d = tempfile::tempdir().unwrap();
        let mut img = images_bytes(1, 28, 28);
        img[4..8].copy_from_slice(&[0xff; 4]);
        let p = write(d.path(), "huge", &img);
        err_mentions(read_idx_images(&p), &p, &["truncated", "4294967295 images"]);
        let p = write(d.path(), "huge.gz", &gz(&img));
        err_mentions(read_idx_images(&p), &p, &["truncated", "only 784 bytes"]);
        let mut lbl = labels_bytes(&[1, 2]);
        lbl[4..8].copy_from_slice(&[0xff; 4]);
        let p = write(d.path(), "huge-labels.gz", &gz(&lbl));
        err_mentions(read_idx_labels(&p), &p, &["truncated", "4294967295 labels"]);
        // n * rows * cols overflows 64 bits.
        img[4..16].copy_from_slice(&[0xff; 12]);
        let p = write(d.path(), "overflow", &img);
        err_mentions(read_idx_images(&p), &p, &["more bytes than any file holds"]);
    }

    #[test]
    fn count_mismatch() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "train-images-idx3-ubyte.gz",
            &gz(&images_bytes(3, 4, 4)),
        );
        let l = write(
            d.path(),
            "train-labels-idx1-ubyte.gz",
            &gz(&labels_bytes(&[1, 2])),
        );
        err_mentions(
            load_mnist(MnistVariant::Mnist, Some(d.path()), Split::Train),
            &l,
            &["2 labels", "3 images"],
        );
    }

    #[test]
    fn label_out_of_range() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "t10k-images-idx3-ubyte", &images_bytes(3, 4, 4));
        let l = write(
            d.path(),
            "t10k-labels-idx1-ubyte",
            &labels_bytes(&[1, 12, 3]),
        );
        err_mentions(
            load_mnist(MnistVariant::FashionMnist, Some(d.path()), Split::Test),
            &l,
            &["label 1 is 12", "10 classes"],
        );
    }

    #[test]
    fn torchvision_layout() {
        let d = tempfile::tempdir().unwrap();
        let img = images_bytes(2, 3, 3);
        write(d.path(), "MNIST/raw/train-images-idx3-ubyte", &img);
        write(
            d.path(),
            "MNIST/raw/train-labels-idx1-ubyte",
            &labels_bytes(&[4, 5]),
        );
        write(
            d.path(),
            "FashionMNIST/raw/train-images-idx3-ubyte.gz",
            &gz(&img),
        );
        write(
            d.path(),
            "FashionMNIST/raw/train-labels-idx1-ubyte.gz",
            &gz(&labels_bytes(&[8, 9])),
        );
        let m = load_mnist(MnistVariant::Mnist, Some(d.path()), Split::Train).unwrap();
        assert_eq!(m.labels, vec![vec![4], vec![5]]);
        assert!(m.source.contains("MNIST/raw"), "{}", m.source);
        let f = load_mnist(MnistVariant::FashionMnist, Some(d.path()), Split::Train).unwrap();
        assert_eq!(f.labels, vec![vec![8], vec![9]]);
        assert!(f.source.contains("FashionMNIST/raw"), "{}", f.source);
        // The set directory itself (`<root>/MNIST`) works too.
        let m2 = load_mnist(
            MnistVariant::Mnist,
            Some(&d.path().join("MNIST")),
            Split::Train,
        )
        .unwrap();
        assert_eq!(m2.len(), 2);
        // No test split there: the error lists every place searched.
        let msg = load_mnist(MnistVariant::Mnist, Some(d.path()), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t10k-images-idx3-ubyte"), "{msg}");
        for place in dirs_under(MnistVariant::Mnist, d.path()) {
            assert!(msg.contains(&place.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn images_file_path_finds_labels_beside() {
        let d = tempfile::tempdir().unwrap();
        let img = write(
            d.path(),
            "t10k-images-idx3-ubyte.gz",
            &gz(&images_bytes(2, 2, 2)),
        );
        write(d.path(), "t10k-labels-idx1-ubyte", &labels_bytes(&[3, 0]));
        let ds = load_mnist(MnistVariant::Mnist, Some(&img), Split::Test).unwrap();
        assert_eq!(ds.labels, vec![vec![3], vec![0]]);
        assert_eq!(ds.source, img.display().to_string());

        let lone = write(
            d.path(),
            "x/train-images-idx3-ubyte",
            &images_bytes(1, 2, 2),
        );
        err_mentions(
            load_mnist(MnistVariant::Mnist, Some(&lone), Split::Train),
            &lone,
            &["no labels", "train-labels-idx1-ubyte"],
        );
        let odd = write(d.path(), "pixels.bin", &images_bytes(1, 2, 2));
        err_mentions(
            load_mnist(MnistVariant::Mnist, Some(&odd), Split::Train),
            &odd,
            &["cannot tell where the labels are"],
        );
        // Images without labels in a directory.
        let l = d.path().join("x");
        err_mentions(
            load_mnist(MnistVariant::Mnist, Some(&l), Split::Train),
            &lone,
            &["no labels"],
        );
    }

    #[test]
    fn missing_path_and_default_search() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nowhere");
        err_mentions(
            load_mnist(MnistVariant::Mnist, Some(&missing), Split::Train),
            &missing,
            &[],
        );
        let dirs = default_search_dirs(MnistVariant::FashionMnist);
        assert_eq!(dirs[0], Path::new("/usr/share/datasets/fashion-mnist"));
        assert!(dirs.iter().any(|p| p.ends_with("data/FashionMNIST/raw")));
        assert!(
            !default_search_dirs(MnistVariant::Mnist)
                .iter()
                .any(|p| p.starts_with("/usr/share"))
        );
        // Search a set of empty places: the error names each.
        let places = vec![d.path().join("a"), d.path().join("b")];
        let msg = search_dirs(MnistVariant::Mnist, Split::Train, &places, "in test places")
            .unwrap_err()
            .to_string();
        for p in &places {
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
        // With no path the real default search runs; whatever it finds, it must not panic
        // and a failure must list the places.
        if let Err(e) = load_mnist(MnistVariant::Mnist, None, Split::Test) {
            let msg = e.to_string();
            if msg.contains("not found") {
                for p in default_search_dirs(MnistVariant::Mnist) {
                    assert!(msg.contains(&p.display().to_string()), "{msg}");
                }
            }
        }
    }
}
