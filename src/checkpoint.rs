//! Crash-safe storage of a run folder.
//!
//! A run folder holds `config.json`, the three checkpoint files named in [`FILES`] and
//! `metrics.jsonl`. This module knows nothing about models: a checkpoint is three maps of named
//! tensors (generator, discriminator, optimizer) plus a step number.
//!
//! # Save protocol
//!
//! Every save writes all three files with the same `save_id` in their safetensors metadata
//! (together with `step`, `format` = [`FORMAT`], the save time and a checksum of the tensor
//! data). The files are written to `<name>.tmp-<pid>` (the writer's process id, so that no two
//! processes ever share a temporary name) and fsynced; then, role by role, the current
//! `<name>` is renamed to `<name>.prev` and the temporary file is renamed to `<name>`, with a directory
//! fsync after each rename. At every instant, for every role, the newest complete set is
//! present as `<name>` or `<name>.prev`, so a crash can cost the save in progress but never
//! the last good checkpoint.
//!
//! A crash can leave a mixed state (say `generator.safetensors` from the new save,
//! everything else from the old one). The next save therefore first works out which complete
//! set [`load_latest`] would return, and only rotates a `<name>` into `<name>.prev` when
//! `<name>` belongs to that set; a `<name>` from an unfinished save is simply replaced, so the
//! good copy in `<name>.prev` survives.
//!
//! # Load
//!
//! [`load_latest`] considers `<name>` and `<name>.prev` for each role (never `.tmp`), skips
//! files that are missing, truncated or corrupt (the checksum catches flipped bits in tensor
//! data), groups the rest by `save_id` and returns the newest step whose three files are all
//! present and readable.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;

use crate::error::{Error, Result};

/// The three checkpoint files of a run folder, in role order.
pub const FILES: [&str; 3] = [
    "generator.safetensors",
    "discriminator.safetensors",
    "optimizer.safetensors",
];
/// Index of the generator in [`FILES`] and in [`CheckpointSet::files`].
pub const GENERATOR: usize = 0;
/// Index of the discriminator in [`FILES`] and in [`CheckpointSet::files`].
pub const DISCRIMINATOR: usize = 1;
/// Index of the optimizer state in [`FILES`] and in [`CheckpointSet::files`].
pub const OPTIMIZER: usize = 2;

/// Value of the `format` metadata key written into every checkpoint file.
pub const FORMAT: &str = "ganscope-1";
/// The run configuration file (write it with [`write_atomic`]).
pub const CONFIG_FILE: &str = "config.json";
/// The metrics log: one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Suffix of the backup copy of the previous save.
pub const PREV_SUFFIX: &str = ".prev";
/// Start of the suffix of a file being written (`<name>.tmp-<pid>`, see [`tmp_suffix`]);
/// such files are never read back.
pub const TMP_SUFFIX: &str = ".tmp";

/// The suffix this process gives the files it is writing: `.tmp-<process id>`, unique among
/// the processes running, so that two writers never write (or rename) the same temporary file.
pub fn tmp_suffix() -> String {
    format!("{TMP_SUFFIX}-{}", std::process::id())
}

/// Whether `name` is a temporary file of `base` (`<base>.tmp` from older versions, or
/// `<base>.tmp-<digits>`) left by any process.
fn is_tmp_of(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|r| r.strip_prefix(TMP_SUFFIX))
        .is_some_and(|r| {
            r.is_empty()
                || r.strip_prefix('-')
                    .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Metadata keys written into every checkpoint file.
pub const KEY_STEP: &str = "step";
pub const KEY_SAVE_ID: &str = "save_id";
pub const KEY_FORMAT: &str = "format";
pub const KEY_SAVED_AT: &str = "saved_at_ns";
pub const KEY_DATA_HASH: &str = "data_hash";
/// Checksum of the header itself (tensor names, dtypes, shapes, offsets and the other
/// metadata), computed with this value set to the placeholder. Files written before it
/// existed have none and are checked on their data only.
pub const KEY_HEADER_HASH: &str = "header_hash";

/// Safetensors refuses headers larger than this; so do we, before allocating.
const MAX_HEADER: u64 = 100_000_000;
const HASH_PLACEHOLDER: &str = "0000000000000000";

/// One complete checkpoint, as returned by [`load_latest`].
#[derive(Debug, Clone)]
pub struct CheckpointSet {
    pub step: u64,
    /// Identifier shared by the three files of one save.
    pub save_id: String,
    /// Tensors of each role, indexed like [`FILES`].
    pub files: [HashMap<String, Tensor>; 3],
    /// Safetensors metadata of each file (`step`, `save_id`, `format`, ...).
    pub metadata: [HashMap<String, String>; 3],
    /// The file each role was read from (`<name>` or `<name>.prev`); use these in error messages.
    pub paths: [PathBuf; 3],
    /// Human-readable remarks about what was skipped (corrupt files, newer incomplete saves).
    /// Empty in the normal case; worth logging when not.
    pub notes: Vec<String>,
}

/// The folders where shipped checkpoints are looked for, in order: `./checkpoints`,
/// `checkpoints/` beside the executable, three levels up from it (cargo's
/// `target/<profile>/`), and the source tree's (`CARGO_MANIFEST_DIR`, for a binary run from
/// another folder on the machine that built it).
pub fn checkpoint_roots() -> Vec<PathBuf> {
    let mut places = vec![PathBuf::from("checkpoints")];
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        places.push(exe_dir.join("checkpoints"));
        if let Some(root) = exe_dir.ancestors().nth(2) {
            places.push(root.join("checkpoints"));
        }
    }
    places.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints"));
    places
}

/// Path of the current file of a role.
pub fn file_path(dir: &Path, role: usize) -> PathBuf {
    dir.join(FILES[role])
}

fn suffixed(dir: &Path, role: usize, suffix: &str) -> PathBuf {
    dir.join(format!("{}{suffix}", FILES[role]))
}

/// Sibling `<file name><suffix>` of `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

// ---------------------------------------------------------------------------------------------
// Low-level file operations
// ---------------------------------------------------------------------------------------------

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_synced_with(path, bytes, |f, b| f.write_all(b))
}

/// [`write_synced`] through `write`. A file that could not be written whole and synced (a full
/// disk) is removed again, so a failed save gives its space back and leaves nothing half
/// written behind.
fn write_synced_with(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    if let Err(e) = write(&mut f, bytes).and_then(|()| f.sync_all()) {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(Error::io(path, e));
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| {
        Error::io(
            from,
            std::io::Error::new(e.kind(), format!("cannot rename to {}: {e}", to.display())),
        )
    })
}

/// Make renames and file creations in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replace `path` with `bytes` atomically: write `<path>.tmp-<pid>`, fsync it, rename it over
/// `path` and fsync the directory. Readers see either the old or the new contents, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, &tmp_suffix());
    write_synced(&tmp, bytes)?;
    rename(&tmp, path)?;
    sync_dir(parent_dir(path))
}

// ---------------------------------------------------------------------------------------------
// Checksum
// ---------------------------------------------------------------------------------------------

/// Offset in `header` of the 16 hex digits of the `header_hash` value (exactly one).
fn header_hash_value_at(header: &[u8]) -> Option<usize> {
    let key = format!("\"{KEY_HEADER_HASH}\":\"");
    let at = find(header, key.as_bytes())?;
    if find(&header[at + 1..], key.as_bytes()).is_some() {
        return None;
    }
    let v = at + key.len();
    (header.len() > v + HASH_PLACEHOLDER.len() && header[v + HASH_PLACEHOLDER.len()] == b'"')
        .then_some(v)
}

/// Check a header against its own `header_hash` (when it has one).
fn verify_header(header: &[u8], meta: &HashMap<String, String>) -> std::result::Result<(), String> {
    let Some(stored) = meta.get(KEY_HEADER_HASH) else {
        return Ok(());
    };
    let at = header_hash_value_at(header)
        .ok_or_else(|| "corrupt: the header checksum entry is malformed".to_string())?;
    let mut h = header.to_vec();
    h[at..at + HASH_PLACEHOLDER.len()].copy_from_slice(HASH_PLACEHOLDER.as_bytes());
    let computed = format!("{:016x}", data_hash(&h));
    if *stored != computed {
        return Err(format!(
            "corrupt: header checksum {computed} does not match the stored {stored} (tensor \
             names, dtypes, shapes or metadata changed)"
        ));
    }
    Ok(())
}

/// 64-bit checksum of the tensor data. Every step is a bijection of the state, so any change
/// confined to one 8-byte word is always detected; this guards against bit rot and torn
/// writes, not against deliberate tampering.
pub(crate) fn data_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |h: u64, w: u64| (h.rotate_left(23) ^ w).wrapping_mul(K);
    let mut h = 0x243F_6A88_85A3_08D3 ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = mix(
            h,
            u64::from_le_bytes(<[u8; 8]>::try_from(c).unwrap_or_default()),
        );
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(buf));
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^ (h >> 33)
}

fn header_len(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok()?;
    (n.checked_add(8)? <= bytes.len()).then_some(n)
}

// ---------------------------------------------------------------------------------------------
// Save
// ---------------------------------------------------------------------------------------------

fn new_save_id(step: u64, saved_at: u128) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{step}-{saved_at}-{}-{n}", std::process::id())
}

/// Serialise one role's tensors with the checkpoint metadata and the data checksum.
/// The first NaN or infinity of a floating-point tensor, if any (integer tensors: None).
fn first_non_finite(t: &Tensor) -> Result<Option<f64>> {
    let first = |v: Vec<f64>| v.into_iter().find(|x| !x.is_finite());
    Ok(match t.dtype() {
        DType::F64 => first(t.flatten_all()?.to_vec1::<f64>()?),
        DType::F32 => t
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .find(|x| !x.is_finite())
            .map(f64::from),
        d if d.is_float() => first(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
        _ => None,
    })
}

fn serialize_file(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        // candle's `View` impl unwraps its conversion: rule out every way it can fail first.
        if matches!(
            t.dtype(),
            DType::F6E2M3 | DType::F6E3M2 | DType::F4 | DType::F8E8M0
        ) {
            return Err(Error::bad_file(
                path,
                format!(
                    "cannot save tensor `{name}`: dtype {:?} is not supported in checkpoints",
                    t.dtype()
                ),
            ));
        }
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        if let Some(bad) = first_non_finite(&t)? {
            return Err(Error::bad_file(
                path,
                format!("refusing to save tensor `{name}`: it holds a non-finite value ({bad})"),
            ));
        }
        cpu.push((name.as_str(), t));
    }
    let mut meta = meta.clone();
    meta.insert(KEY_DATA_HASH.to_string(), HASH_PLACEHOLDER.to_string());
    meta.insert(KEY_HEADER_HASH.to_string(), HASH_PLACEHOLDER.to_string());
    let mut bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (*n, t)), Some(meta))
        .map_err(|e| Error::bad_file(path, format!("cannot serialise checkpoint: {e}")))?;

    // Patch the checksum of the data section into the (fixed-width) placeholder.
    let internal = |msg: &str| Error::bad_file(path, format!("internal error: {msg}"));
    let n = header_len(&bytes).ok_or_else(|| internal("serialised header is malformed"))?;
    let pattern = format!("\"{KEY_DATA_HASH}\":\"{HASH_PLACEHOLDER}\"");
    let header = &bytes[8..8 + n];
    let at = find(header, pattern.as_bytes())
        .ok_or_else(|| internal("checksum placeholder not found in the header"))?;
    if find(&header[at + 1..], pattern.as_bytes()).is_some() {
        return Err(internal("checksum placeholder is ambiguous"));
    }
    let digits = format!("{:016x}", data_hash(&bytes[8 + n..]));
    let start = 8 + at + pattern.len() - 1 - HASH_PLACEHOLDER.len();
    bytes[start..start + HASH_PLACEHOLDER.len()].copy_from_slice(digits.as_bytes());
    // Then the header's own checksum, over the header with the data checksum in place.
    let at = header_hash_value_at(&bytes[8..8 + n])
        .ok_or_else(|| internal("header checksum placeholder not found"))?;
    let digits = format!("{:016x}", data_hash(&bytes[8..8 + n]));
    bytes[8 + at..8 + at + HASH_PLACEHOLDER.len()].copy_from_slice(digits.as_bytes());
    Ok(bytes)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Counts filesystem operations for fault injection.
struct Ops {
    crash_after: Option<usize>,
    done: usize,
}

impl Ops {
    /// Whether the next operation may run; counts it if so.
    fn go(&mut self) -> bool {
        match self.crash_after {
            Some(limit) if self.done >= limit => false,
            _ => {
                self.done += 1;
                true
            }
        }
    }
    fn crashed(&self) -> Error {
        Error::Msg(format!(
            "simulated crash after {} filesystem operations",
            self.done
        ))
    }
}

/// Save a checkpoint: `files` are the generator, discriminator and optimizer tensors, in the
/// order of [`FILES`]. Crash-safe: see the module docs. Creates `dir` if needed.
pub fn save(dir: &Path, step: u64, files: [&HashMap<String, Tensor>; 3]) -> Result<()> {
    save_impl(dir, step, files, None)
}

/// Test-only fault injection: like [`save`], but stops (as if the process died) after
/// `crash_after` filesystem operations. Operations are: each `.tmp` write+fsync (3), and each
/// rename (up to 6). If the crash hits a `.tmp` write, half of that file is written first, like
/// a torn write. Returns `Ok(())` only if the save ran to completion.
#[doc(hidden)]
pub fn save_with_crash(
    dir: &Path,
    step: u64,
    files: [&HashMap<String, Tensor>; 3],
    crash_after: usize,
) -> Result<()> {
    save_impl(dir, step, files, Some(crash_after))
}

/// The metadata every file of one save carries: step, a new save id, format, save time.
fn save_metadata(step: u64) -> HashMap<String, String> {
    let saved_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    HashMap::from([
        (KEY_STEP.to_string(), step.to_string()),
        (KEY_SAVE_ID.to_string(), new_save_id(step, saved_at)),
        (KEY_FORMAT.to_string(), FORMAT.to_string()),
        (KEY_SAVED_AT.to_string(), saved_at.to_string()),
    ])
}

fn save_impl(
    dir: &Path,
    step: u64,
    files: [&HashMap<String, Tensor>; 3],
    crash_after: Option<usize>,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta = save_metadata(step);
    let mut blobs = Vec::with_capacity(3);
    for (role, tensors) in files.iter().enumerate() {
        blobs.push(serialize_file(&file_path(dir, role), tensors, &meta)?);
    }

    // The set that must survive this save: the one `load_latest` would pick right now.
    let keep = resolve(dir, None).chosen.map(|c| c.paths);

    let mut ops = Ops {
        crash_after,
        done: 0,
    };
    for (role, bytes) in blobs.iter().enumerate() {
        let tmp = suffixed(dir, role, &tmp_suffix());
        if !ops.go() {
            let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&bytes[..bytes.len() / 2])
                .map_err(|e| Error::io(&tmp, e))?;
            return Err(ops.crashed());
        }
        write_synced(&tmp, bytes)?;
    }
    sync_dir(dir)?;

    for role in 0..3 {
        let cur = file_path(dir, role);
        let prev = suffixed(dir, role, PREV_SUFFIX);
        let tmp = suffixed(dir, role, &tmp_suffix());
        let rotate = match &keep {
            // Rotate only the survivor's file; anything else in `<name>` is from an unfinished
            // save or corrupt, and then the survivor's copy of this role is `<name>.prev`.
            Some(paths) => paths[role] == cur,
            // Nothing complete to protect: plain rotation.
            None => fs::symlink_metadata(&cur).is_ok(),
        };
        if rotate {
            if !ops.go() {
                return Err(ops.crashed());
            }
            rename(&cur, &prev)?;
            sync_dir(dir)?;
        }
        if !ops.go() {
            return Err(ops.crashed());
        }
        rename(&tmp, &cur)?;
        sync_dir(dir)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Header {
    step: u64,
    save_id: String,
    saved_at: u128,
}

enum Probe {
    Missing,
    Invalid(String),
    Valid(Header),
}

/// Read and validate only the header of a checkpoint file (cheap): structure, total length,
/// and the ganscope metadata.
fn probe(path: &Path) -> Probe {
    let mut f = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Probe::Missing,
        Err(e) => return Probe::Invalid(format!("cannot open: {e}")),
    };
    match probe_header(&mut f) {
        Ok(h) => Probe::Valid(h),
        Err(msg) => Probe::Invalid(msg),
    }
}

fn probe_header(f: &mut File) -> std::result::Result<Header, String> {
    let meta = read_header_meta(f)?;
    check_meta(meta.as_ref())
}

/// The metadata of a safetensors file whose structure and total length check out.
fn read_header_meta(f: &mut File) -> std::result::Result<Option<HashMap<String, String>>, String> {
    let len = f.metadata().map_err(|e| format!("cannot stat: {e}"))?.len();
    if len < 8 {
        return Err(format!(
            "truncated: {len} bytes, shorter than a safetensors header"
        ));
    }
    let mut nb = [0u8; 8];
    f.read_exact(&mut nb)
        .map_err(|e| format!("cannot read: {e}"))?;
    let n = u64::from_le_bytes(nb);
    if n > MAX_HEADER {
        return Err(format!(
            "corrupt: header length {n} is not plausible (not a safetensors file?)"
        ));
    }
    if 8 + n > len {
        return Err(format!(
            "truncated: the header needs {n} bytes but the file has only {len}"
        ));
    }
    let mut hb = vec![0u8; n as usize];
    f.read_exact(&mut hb)
        .map_err(|e| format!("cannot read: {e}"))?;
    let text = std::str::from_utf8(&hb).map_err(|_| "corrupt: header is not UTF-8".to_string())?;
    let meta: Metadata = serde_json::from_str(text).map_err(|e| format!("corrupt header: {e}"))?;
    let expected = (meta.data_len() as u64).saturating_add(8 + n);
    if expected != len {
        return Err(if len < expected {
            format!("truncated: {len} bytes, the header describes {expected}")
        } else {
            format!("corrupt: {len} bytes, the header describes only {expected}")
        });
    }
    Ok(meta.metadata().clone())
}

fn check_meta(meta: Option<&HashMap<String, String>>) -> std::result::Result<Header, String> {
    let Some(meta) = meta else {
        return Err("not a ganscope checkpoint (no metadata)".to_string());
    };
    match meta.get(KEY_FORMAT) {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(format!(
                "unsupported checkpoint format `{f}` (want `{FORMAT}`)"
            ));
        }
        None => return Err("not a ganscope checkpoint (no `format` metadata)".to_string()),
    }
    let step = meta
        .get(KEY_STEP)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| "corrupt metadata: missing or invalid `step`".to_string())?;
    let save_id = meta
        .get(KEY_SAVE_ID)
        .filter(|s| !s.is_empty())
        .cloned()
        .ok_or_else(|| "corrupt metadata: missing `save_id`".to_string())?;
    let saved_at = meta
        .get(KEY_SAVED_AT)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Header {
        step,
        save_id,
        saved_at,
    })
}

/// Metadata and tensors of one verified file.
type Verified = (HashMap<String, String>, HashMap<String, Tensor>);

/// Fully read and verify one file (structure, metadata, checksum) and, given a device, load
/// its tensors (without a device the tensor map is empty).
fn read_verified(
    path: &Path,
    want: &Header,
    device: Option<&Device>,
) -> std::result::Result<Verified, String> {
    let bytes = read_regular(path).map_err(|e| format!("cannot read: {e}"))?;
    let (n, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| format!("corrupt: {e}"))?;
    let got = check_meta(meta.metadata().as_ref())?;
    if got.save_id != want.save_id || got.step != want.step {
        return Err("changed while being read".to_string());
    }
    let meta = meta.metadata().clone().unwrap_or_default();
    let stored = meta
        .get(KEY_DATA_HASH)
        .ok_or_else(|| "corrupt metadata: missing `data_hash`".to_string())?;
    verify_header(&bytes[8..8 + n], &meta)?;
    let computed = format!("{:016x}", data_hash(&bytes[8 + n..]));
    if *stored != computed {
        return Err(format!(
            "corrupt: tensor data checksum {computed} does not match the stored {stored}"
        ));
    }
    let tensors = match device {
        Some(device) => candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| format!("cannot load tensors: {e}"))?,
        None => HashMap::new(),
    };
    Ok((meta, tensors))
}

struct Candidate {
    role: usize,
    path: PathBuf,
    is_prev: bool,
    header: Header,
}

struct Group {
    step: u64,
    saved_at: u128,
    save_id: String,
    slots: [Option<usize>; 3],
}

impl Group {
    /// The candidate indices of the three roles, if all are present.
    fn complete(&self) -> Option<[usize; 3]> {
        match self.slots {
            [Some(a), Some(b), Some(c)] => Some([a, b, c]),
            _ => None,
        }
    }
}

struct Chosen {
    step: u64,
    save_id: String,
    paths: [PathBuf; 3],
    metadata: [HashMap<String, String>; 3],
    /// Empty maps unless a device was given.
    tensors: [HashMap<String, Tensor>; 3],
}

struct Resolution {
    chosen: Option<Chosen>,
    /// Status of each of the six candidate files, in role order: file name and what is wrong
    /// (`None` for a file that is fine).
    status: Vec<(String, Option<String>)>,
    /// Incomplete saves newer than the chosen one (or all of them if nothing was chosen).
    incomplete: Vec<String>,
}

/// Group candidates by save, newest first.
fn group(cands: &[Candidate]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, c) in cands.iter().enumerate() {
        let k = match groups.iter().position(|g| g.save_id == c.header.save_id) {
            Some(k) => k,
            None => {
                groups.push(Group {
                    step: c.header.step,
                    saved_at: c.header.saved_at,
                    save_id: c.header.save_id.clone(),
                    slots: [None; 3],
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[k];
        if c.header.step != g.step {
            continue; // same id, different step: not a save we wrote; ignore the stray
        }
        // Prefer `<name>` over `<name>.prev` when both carry the same save.
        match g.slots[c.role] {
            Some(j) if !cands[j].is_prev => {}
            _ => g.slots[c.role] = Some(i),
        }
    }
    groups.sort_by(|a, b| (b.step, b.saved_at, &b.save_id).cmp(&(a.step, a.saved_at, &a.save_id)));
    groups
}

fn describe_group(g: &Group) -> String {
    let has: Vec<&str> = (0..3)
        .filter(|&r| g.slots[r].is_some())
        .map(|r| FILES[r])
        .collect();
    let lacks: Vec<&str> = (0..3)
        .filter(|&r| g.slots[r].is_none())
        .map(|r| FILES[r])
        .collect();
    format!(
        "save `{}` (step {}) has {} but lacks {}",
        g.save_id,
        g.step,
        has.join(", "),
        lacks.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Weights-only folders (shipped generators)
// ---------------------------------------------------------------------------------------------

/// Metadata key marking the files of a weights-only folder ([`save_weights`]).
pub const KEY_CONTENTS: &str = "contents";
/// Value of [`KEY_CONTENTS`] in a weights-only folder.
pub const CONTENTS_WEIGHTS: &str = "weights";

/// Write a weights-only folder: `generator.safetensors` and `discriminator.safetensors` of one
/// save (same `save_id`, step and checksums as a run's), without optimizer state. This is how
/// generators ship (`checkpoints/<name>/`): a few MB instead of a run's three files, loadable
/// for sampling ([`load_weights`]) and as the start of further training (fresh Adam moments).
/// Refuses a run folder, whose optimizer state it would orphan.
pub fn save_weights(
    dir: &Path,
    step: u64,
    generator: &HashMap<String, Tensor>,
    discriminator: &HashMap<String, Tensor>,
) -> Result<()> {
    for suffix in ["", PREV_SUFFIX] {
        let p = suffixed(dir, OPTIMIZER, suffix);
        if fs::symlink_metadata(&p).is_ok() {
            return Err(Error::bad_file(
                &p,
                "this is a run folder (it has optimizer state); write the weights to a new folder",
            ));
        }
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = save_metadata(step);
    meta.insert(KEY_CONTENTS.to_string(), CONTENTS_WEIGHTS.to_string());
    for (role, tensors) in [(GENERATOR, generator), (DISCRIMINATOR, discriminator)] {
        let path = file_path(dir, role);
        let bytes = serialize_file(&path, tensors, &meta)?;
        write_atomic(&path, &bytes)?;
    }
    Ok(())
}

/// Open `path` for reading if it is a regular file (following links). A FIFO named like a
/// checkpoint would block `open` forever; a device or folder is not a file either.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a folder, FIFO, socket or device)",
        ));
    }
    File::open(path)
}

/// [`fs::read`] of a regular file only (see [`open_regular`]).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Remove the temporary files of a run folder (checkpoint files, config.json, metrics.jsonl;
/// `<name>.tmp` and `<name>.tmp-<pid>` of any process) that an interrupted save left behind.
/// Call only while holding the folder's lock.
fn remove_stale_tmp(dir: &Path) -> Result<()> {
    let bases: Vec<&str> = FILES
        .iter()
        .copied()
        .chain([CONFIG_FILE, METRICS_FILE])
        .collect();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !bases.iter().any(|b| is_tmp_of(name, b)) {
            continue;
        }
        let p = entry.path();
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
            fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Rename every checkpoint file of `dir` that failed to load (corrupt, truncated, not a
/// regular file; not merely missing or from a newer incomplete save) to
/// `<name>.rejected-<unix seconds>`, so that the next save cannot overwrite the evidence.
/// Call while holding the folder's [`RunLock`], before training into it. Returns one line
/// per file set aside, with the reason.
pub fn set_aside_rejected(dir: &Path) -> Result<Vec<String>> {
    let res = resolve(dir, Some(&Device::Cpu));
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = Vec::new();
    for (name, why) in &res.status {
        let Some(why) = why.as_deref().filter(|w| *w != "missing") else {
            continue;
        };
        let from = dir.join(name);
        if fs::symlink_metadata(&from).is_err() {
            continue;
        }
        let to = dir.join(format!("{name}.rejected-{secs}"));
        rename(&from, &to)?;
        out.push(format!(
            "{} set aside as {}: {why}",
            from.display(),
            to.display()
        ));
    }
    if !out.is_empty() {
        sync_dir(dir)?;
    }
    Ok(out)
}

/// Bytes an unprivileged process may still write on the filesystem that holds `dir`
/// (`statvfs`' `f_bavail * f_frsize`); `None` where the platform does not say.
pub fn free_bytes(dir: &Path) -> Result<Option<u64>> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| Error::bad_file(dir, "the path holds a NUL byte"))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to
        // writable memory of the size `statvfs` fills.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
        // SAFETY: `statvfs` returned 0, so it filled the whole struct.
        let st = unsafe { st.assume_init() };
        #[allow(
            clippy::unnecessary_cast,
            reason = "the field types differ between platforms"
        )]
        let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
        Ok(Some(free))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(None)
    }
}

/// Refuse to start work whose saves would not fit: `need` bytes must be free on the
/// filesystem of `dir` (an existing folder). Training checks this before its first step, so a
/// full disk is an error at the start and not a failed save after the work.
pub fn check_free_space(dir: &Path, need: u64) -> Result<()> {
    match free_bytes(dir)? {
        Some(free) if free < need => Err(Error::bad_file(
            dir,
            format!(
                "not enough free space: {} free, about {} needed for this run's checkpoints \
                 (the current, the previous and the one being written)",
                human_bytes(free),
                human_bytes(need)
            ),
        )),
        _ => Ok(()),
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Name of the lock file in a run folder.
pub const LOCK_FILE: &str = ".ganscope.lock";

/// An exclusive advisory lock on a run folder (`flock` on Unix, `LockFileEx` on Windows),
/// held for as long as a process trains or saves into it; released when dropped (or when
/// the process dies). The lock file holds the holder's process id.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Lock `dir` (created if missing), or say which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| Error::io(&path, e))?;
                writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
                // With the lock held, no other process is writing here: temporary files are
                // leftovers of an interrupted save (they are never loaded; removing them
                // gives their space back before this run's saves need it).
                remove_stale_tmp(dir)?;
                Ok(Self { _file: file, path })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                };
                Err(Error::bad_file(
                    dir,
                    format!(
                        "this run folder is in use: {who} is training or saving into it (lock \
                         {}); wait for it to finish or choose another folder",
                        path.display()
                    ),
                ))
            }
            Err(fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

/// True when `dir/generator.safetensors` is readable and marked as weights-only.
pub fn is_weights_folder(dir: &Path) -> bool {
    read_meta(&file_path(dir, GENERATOR))
        .is_ok_and(|m| m.get(KEY_CONTENTS).map(String::as_str) == Some(CONTENTS_WEIGHTS))
}

fn read_meta(path: &Path) -> std::result::Result<HashMap<String, String>, String> {
    let mut f = open_regular(path).map_err(|e| format!("cannot open: {e}"))?;
    Ok(read_header_meta(&mut f)?.unwrap_or_default())
}

/// Load a weights-only folder written by [`save_weights`]: the verified generator, and the
/// discriminator when its file belongs to the same save (else an empty map and a note). The
/// optimizer role is an empty map.
pub fn load_weights(dir: &Path, device: &Device) -> Result<CheckpointSet> {
    let gp = file_path(dir, GENERATOR);
    let fail = |path: &Path, msg: String| Error::bad_file(path, msg);
    let header = match probe(&gp) {
        Probe::Valid(h) => h,
        Probe::Missing => return Err(fail(&gp, "missing".into())),
        Probe::Invalid(msg) => return Err(fail(&gp, msg)),
    };
    let (gm, g) = read_verified(&gp, &header, Some(device)).map_err(|m| fail(&gp, m))?;
    if gm.get(KEY_CONTENTS).map(String::as_str) != Some(CONTENTS_WEIGHTS) {
        return Err(fail(
            &gp,
            "part of a run's checkpoint, not a weights-only folder".into(),
        ));
    }
    let dp = file_path(dir, DISCRIMINATOR);
    let mut notes = Vec::new();
    let (dm, d) = match probe(&dp) {
        Probe::Valid(h) if h.save_id == header.save_id => {
            read_verified(&dp, &header, Some(device)).map_err(|m| fail(&dp, m))?
        }
        Probe::Valid(_) => {
            notes.push(format!(
                "skipped {}: from another save",
                FILES[DISCRIMINATOR]
            ));
            Default::default()
        }
        Probe::Missing => {
            notes.push(format!("{} missing: D starts fresh", FILES[DISCRIMINATOR]));
            Default::default()
        }
        Probe::Invalid(msg) => return Err(fail(&dp, msg)),
    };
    Ok(CheckpointSet {
        step: header.step,
        save_id: header.save_id,
        files: [g, d, HashMap::new()],
        metadata: [gm, dm, HashMap::new()],
        paths: [gp, dp, file_path(dir, OPTIMIZER)],
        notes,
    })
}

/// Find the newest complete, verified set. With a device, also loads its tensors.
fn resolve(dir: &Path, device: Option<&Device>) -> Resolution {
    let mut status = Vec::with_capacity(6);
    let mut cands = Vec::with_capacity(6);
    for (role, file) in FILES.iter().enumerate() {
        for is_prev in [false, true] {
            let suffix = if is_prev { PREV_SUFFIX } else { "" };
            let path = suffixed(dir, role, suffix);
            let name = format!("{file}{suffix}");
            match probe(&path) {
                Probe::Missing => status.push((name, Some("missing".to_string()))),
                Probe::Invalid(msg) => status.push((name, Some(msg))),
                Probe::Valid(header) => {
                    status.push((name, None));
                    cands.push(Candidate {
                        role,
                        path,
                        is_prev,
                        header,
                    });
                }
            }
        }
    }

    loop {
        let groups = group(&cands);
        let Some((pos, idx)) = groups
            .iter()
            .enumerate()
            .find_map(|(pos, g)| g.complete().map(|idx| (pos, idx)))
        else {
            let incomplete = groups.iter().map(describe_group).collect();
            return Resolution {
                chosen: None,
                status,
                incomplete,
            };
        };
        let mut loaded: [(HashMap<String, String>, HashMap<String, Tensor>); 3] =
            Default::default();
        let mut failed = None;
        for (slot, &i) in loaded.iter_mut().zip(&idx) {
            match read_verified(&cands[i].path, &cands[i].header, device) {
                Ok(l) => *slot = l,
                Err(msg) => {
                    failed = Some((i, msg));
                    break;
                }
            }
        }
        if let Some((i, msg)) = failed {
            let c = cands.remove(i);
            status[c.role * 2 + usize::from(c.is_prev)].1 = Some(msg);
            continue;
        }
        let best = &groups[pos];
        let [l0, l1, l2] = loaded;
        return Resolution {
            chosen: Some(Chosen {
                step: best.step,
                save_id: best.save_id.clone(),
                paths: idx.map(|i| cands[i].path.clone()),
                metadata: [l0.0, l1.0, l2.0],
                tensors: [l0.1, l1.1, l2.1],
            }),
            status,
            incomplete: groups[..pos].iter().map(describe_group).collect(),
        };
    }
}

/// Load the newest complete checkpoint in `dir` onto `device`.
///
/// Fails with [`Error::NoCheckpoint`], describing every candidate file, if there is none.
pub fn load_latest(dir: &Path, device: &Device) -> Result<CheckpointSet> {
    let res = resolve(dir, Some(device));
    let Some(chosen) = res.chosen else {
        return Err(Error::NoCheckpoint {
            dir: dir.to_path_buf(),
            msg: failure_message(&res.status, &res.incomplete),
        });
    };
    let mut notes: Vec<String> = res
        .status
        .iter()
        .filter_map(|(name, msg)| {
            let msg = msg.as_deref()?;
            // A missing backup is normal (first save), a missing current file is not.
            (!(msg == "missing" && name.ends_with(PREV_SUFFIX)))
                .then(|| format!("skipped {name}: {msg}"))
        })
        .collect();
    notes.extend(
        res.incomplete
            .iter()
            .map(|g| format!("ignored newer incomplete {g}")),
    );
    Ok(CheckpointSet {
        step: chosen.step,
        save_id: chosen.save_id,
        files: chosen.tensors,
        metadata: chosen.metadata,
        paths: chosen.paths,
        notes,
    })
}

fn failure_message(status: &[(String, Option<String>)], incomplete: &[String]) -> String {
    if status.iter().all(|(_, m)| m.as_deref() == Some("missing")) {
        return format!(
            "none of {} (or their {PREV_SUFFIX} backups) exist",
            FILES.join(", ")
        );
    }
    let mut parts: Vec<String> = status
        .iter()
        .map(|(name, msg)| match msg {
            Some(m) => format!("{name}: {m}"),
            None => format!("{name}: readable"),
        })
        .collect();
    if !incomplete.is_empty() {
        parts.push(format!("incomplete saves: {}", incomplete.join("; ")));
    }
    parts.join("; ")
}

// ---------------------------------------------------------------------------------------------
// Shape checks
// ---------------------------------------------------------------------------------------------

/// Check that `found` (read from `path`) holds exactly the `expected` tensors with the
/// expected shapes. Reports the first missing tensor or shape mismatch in `expected` order,
/// then any tensors that the model does not have.
pub fn check_shapes(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
) -> Result<()> {
    for (name, shape) in expected {
        let Some(t) = found.get(name) else {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        };
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
    }
    let mut extra: Vec<&str> = found
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .map(String::as_str)
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        const SHOWN: usize = 10;
        let mut list = extra
            .iter()
            .take(SHOWN)
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if extra.len() > SHOWN {
            list.push_str(&format!(" and {} more", extra.len() - SHOWN));
        }
        return Err(Error::bad_file(
            path,
            format!(
                "{} unexpected tensor(s) that the model built from the config does not have: {list}",
                extra.len()
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn metrics_path(dir: &Path) -> PathBuf {
    dir.join(METRICS_FILE)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match read_regular(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn trim(line: &[u8]) -> &[u8] {
    line.trim_ascii()
}

/// Append one JSON value as a line to `metrics.jsonl` (created if missing). If the file ends
/// in a torn line from a crash, that fragment is cut off first so it cannot swallow the new
/// line. The line is handed to the OS but not fsynced.
pub fn append_metrics(dir: &Path, line: &serde_json::Value) -> Result<()> {
    let path = metrics_path(dir);
    let mut text = serde_json::to_string(line)
        .map_err(|e| Error::bad_file(&path, format!("cannot serialise metrics line: {e}")))?;
    text.push('\n');
    let io = |e| Error::io(&path, e);
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1)).map_err(io)?;
        f.read_exact(&mut last).map_err(io)?;
        if last[0] != b'\n' {
            let data = read_regular(&path).map_err(io)?;
            let start = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            if serde_json::from_slice::<serde_json::Value>(trim(&data[start..])).is_ok() {
                f.write_all(b"\n").map_err(io)?;
            } else {
                f.set_len(start as u64).map_err(io)?;
            }
        }
    }
    f.write_all(text.as_bytes()).map_err(io)?;
    f.flush().map_err(io)
}

/// Read `metrics.jsonl` (empty if missing). Also returns how many lines were skipped: a last
/// line that does not parse (torn by a crash, or being written right now) is skipped; an
/// unparsable line elsewhere is an error naming its line number.
pub fn read_metrics_counted(dir: &Path) -> Result<(Vec<serde_json::Value>, usize)> {
    let path = metrics_path(dir);
    let Some(data) = read_optional(&path)? else {
        return Ok((Vec::new(), 0));
    };
    let lines: Vec<(usize, &[u8])> = data
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, trim(l)))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut values = Vec::with_capacity(lines.len());
    let mut skipped = 0;
    for (k, (lineno, line)) in lines.iter().enumerate() {
        match serde_json::from_slice(line) {
            Ok(v) => values.push(v),
            Err(_) if k + 1 == lines.len() => skipped += 1,
            Err(e) => {
                return Err(Error::bad_file(
                    &path,
                    format!("line {lineno}: invalid JSON: {e}"),
                ));
            }
        }
    }
    Ok((values, skipped))
}

/// [`read_metrics_counted`] without the count.
pub fn read_metrics(dir: &Path) -> Result<Vec<serde_json::Value>> {
    read_metrics_counted(dir).map(|(v, _)| v)
}

/// Atomically rewrite `metrics.jsonl` keeping only the lines with `"step" <= step` (call on
/// resume from a checkpoint at `step`, so the steps trained after it are not logged twice).
/// Lines without a numeric `"step"` are kept if they come before the first line past `step`.
/// Unparsable lines are dropped; returns how many. A missing file is not an error.
pub fn truncate_metrics_after(dir: &Path, step: u64) -> Result<usize> {
    let path = metrics_path(dir);
    let Some(data) = read_optional(&path)? else {
        return Ok(0);
    };
    let mut out = Vec::with_capacity(data.len());
    let mut malformed = 0;
    let mut past = false;
    for line in data.split(|&b| b == b'\n').map(trim) {
        if line.is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            malformed += 1;
            continue;
        };
        let keep = match v.get("step").and_then(serde_json::Value::as_u64) {
            Some(s) if s <= step => true,
            Some(_) => {
                past = true;
                false
            }
            None => !past,
        };
        if keep {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    if out != data {
        write_atomic(&path, &out)?;
    }
    Ok(malformed)
}

#[cfg(test)]
mod tests;
