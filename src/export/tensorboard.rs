//! TensorBoard event files, written without TensorFlow: `tensorboard --logdir runs` shows
//! ganscope runs beside PyTorch ones (whose `SummaryWriter` writes the same format).
//!
//! A file `events.out.tfevents.<unix seconds>.<host>.ganscope` is a sequence of TFRecords
//! (u64 length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each an
//! `Event` protocol buffer (tensorflow/core/util/event.proto): `wall_time` (1, double), `step`
//! (2, int64), `file_version` (3, the first record: "brain.Event:2") or a `summary` (5) of
//! `Value`s: `tag` (1), `simple_value` (2, float) or `image` (4: height 1, width 2, colorspace
//! 3, encoded PNG 4). The few fields needed are encoded by hand below.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An `Event` with its wall time and step, and `rest` (already-encoded fields) after them.
fn event(wall_time: f64, step: i64, rest: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(rest.len() + 20);
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step as u64);
    e.extend_from_slice(rest);
    e
}

/// A `Summary.Value` with a scalar.
fn scalar_value(tag: &str, v: f32) -> Vec<u8> {
    let mut val = Vec::new();
    bytes_field(&mut val, 1, tag.as_bytes());
    key(&mut val, 2, 5);
    val.extend_from_slice(&v.to_le_bytes());
    val
}

/// A `Summary.Value` with a PNG image.
fn image_value(tag: &str, png: &[u8], height: u32, width: u32, channels: u32) -> Vec<u8> {
    let mut img = Vec::new();
    key(&mut img, 1, 0);
    varint(&mut img, u64::from(height));
    key(&mut img, 2, 0);
    varint(&mut img, u64::from(width));
    key(&mut img, 3, 0);
    varint(&mut img, u64::from(channels));
    bytes_field(&mut img, 4, png);
    let mut val = Vec::new();
    bytes_field(&mut val, 1, tag.as_bytes());
    bytes_field(&mut val, 4, &img);
    val
}

/// The seconds since the Unix epoch, as TensorBoard's wall time.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file, appended to record by record (each record flushed).
pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), starting with the version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let wall = now();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.ganscope",
            wall as u64,
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = Self { file, path };
        let mut version = Vec::new();
        bytes_field(&mut version, 3, b"brain.Event:2");
        w.record(&event(wall, 0, &version))?;
        Ok(w)
    }

    fn record(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&tfrecord(event))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Scalars at `step`, one event; non-finite values are left out (nothing non-finite is
    /// written).
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            if v.is_finite() {
                bytes_field(&mut summary, 1, &scalar_value(tag, *v as f32));
            }
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut rest = Vec::new();
        bytes_field(&mut rest, 5, &summary);
        self.record(&event(now(), step as i64, &rest))
    }

    /// An RGB image at `step`: `png` is its PNG encoding ([`crate::export::sheet::png_bytes`]).
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> Result<()> {
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &image_value(tag, png, height, width, 3));
        let mut rest = Vec::new();
        bytes_field(&mut rest, 5, &summary);
        self.record(&event(now(), step as i64, &rest))
    }
}

/// The records of an event file: (wall time, step, [(tag, scalar)], [(tag, png bytes)]), with
/// every CRC checked (for tests and `ganscope` itself; TensorBoard reads the file directly).
pub type Record = (f64, i64, Vec<(String, f32)>, Vec<(String, Vec<u8>)>);

/// Read back an event file written by [`EventWriter`].
pub fn read_events(path: &Path) -> Result<Vec<Record>> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::bad_file(path, m.to_string());
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let head = b
            .get(i..i + 12)
            .ok_or_else(|| bad("truncated record header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().map_err(|_| bad("header"))?) as usize;
        if u32::from_le_bytes(head[8..12].try_into().map_err(|_| bad("header"))?)
            != masked_crc(&head[..8])
        {
            return Err(bad("length CRC mismatch"));
        }
        let data = b
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| bad("truncated record"))?;
        let crc = b
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| bad("truncated record CRC"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| bad("crc"))?) != masked_crc(data) {
            return Err(bad("data CRC mismatch"));
        }
        out.push(parse_event(data).ok_or_else(|| bad("not an Event record"))?);
        i += 16 + len;
    }
    Ok(out)
}

/// (field, wire type, value or bytes) of each field of a message.
fn fields(mut m: &[u8]) -> Option<Vec<(u32, u64, &[u8])>> {
    fn read_varint(m: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = m.split_first()?;
            *m = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !m.is_empty() {
        let k = read_varint(&mut m)?;
        let (field, wire) = ((k >> 3) as u32, k & 7);
        match wire {
            0 => {
                let v = read_varint(&mut m)?;
                out.push((field, v, &[][..]));
            }
            1 => {
                let (v, rest) = m.split_at_checked(8)?;
                m = rest;
                out.push((field, 1, v));
            }
            2 => {
                let n = read_varint(&mut m)? as usize;
                let (v, rest) = m.split_at_checked(n)?;
                m = rest;
                out.push((field, 2, v));
            }
            5 => {
                let (v, rest) = m.split_at_checked(4)?;
                m = rest;
                out.push((field, 5, v));
            }
            _ => return None,
        }
    }
    Some(out)
}

fn parse_event(data: &[u8]) -> Option<Record> {
    let (mut wall, mut step) = (0.0, 0i64);
    let (mut scalars, mut images) = (Vec::new(), Vec::new());
    for (f, v, b) in fields(data)? {
        match f {
            1 => wall = f64::from_le_bytes(b.try_into().ok()?),
            2 => step = v as i64,
            5 => {
                for (vf, _, value) in fields(b)? {
                    if vf != 1 {
                        continue;
                    }
                    let mut tag = String::new();
                    for (f, _, b) in fields(value)? {
                        match f {
                            1 => tag = String::from_utf8(b.to_vec()).ok()?,
                            2 => {
                                scalars.push((tag.clone(), f32::from_le_bytes(b.try_into().ok()?)))
                            }
                            4 => {
                                let png = fields(b)?.into_iter().find(|x| x.0 == 4)?.2.to_vec();
                                images.push((tag.clone(), png));
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some((wall, step, scalars, images))
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;

    #[test]
    fn crc32c_and_records_by_hand() {
        // The standard CRC-32C check value (RFC 3720, appendix B.4: "123456789").
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        let r = tfrecord(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        // A 300-byte varint is two bytes: 0xAC 0x02.
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }

    #[test]
    fn scalars_and_images_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(
            7,
            &[
                ("train/d_loss".into(), 1.25),
                ("train/nan".into(), f64::NAN),
                ("train/g_loss".into(), -0.5),
            ],
        )
        .unwrap();
        let img =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = crate::export::sheet::png_bytes(&img).unwrap();
        w.image(9, "samples/wall", &png, 5, 3).unwrap();
        let recs = read_events(&w.path).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1].1, 7);
        assert_eq!(
            recs[1].2,
            vec![
                ("train/d_loss".to_string(), 1.25),
                ("train/g_loss".to_string(), -0.5)
            ]
        );
        assert_eq!(recs[2].1, 9);
        let (tag, png) = &recs[2].3[0];
        assert_eq!(tag, "samples/wall");
        let back = image::load_from_memory(png).unwrap().to_rgb8();
        assert_eq!(back, img);
        // A flipped byte is a CRC error naming the file.
        let mut b = std::fs::read(&w.path).unwrap();
        let n = b.len();
        b[n - 10] ^= 1;
        std::fs::write(&w.path, b).unwrap();
        let e = read_events(&w.path).unwrap_err().to_string();
        assert!(
            e.contains("CRC") && e.contains("events.out.tfevents"),
            "{e}"
        );
    }
}
