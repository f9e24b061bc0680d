//! NumPy `.npy` files (format version 1.0: the magic string, a little-endian u16 header length,
//! a Python dict literal with `descr`, `fortran_order` and `shape` padded with spaces to a
//! multiple of 64 bytes and ended by a newline, then the raw little-endian values), so that
//! `numpy.load` reads generated images as a student's `generate(n, c)` returns them.

use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};

/// The bytes of a C-order float32 array of `shape` holding `data`.
pub fn npy_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::Msg(format!(
            "npy: shape {shape:?} holds {n} values, got {}",
            data.len()
        )));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Msg(format!(
            "npy: value {i} is {} (nothing non-finite is written)",
            data[i]
        )));
    }
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // 6 magic + 2 version + 2 length bytes, then the header and its newline: a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let len = u16::try_from(header.len())
        .map_err(|_| Error::Msg(format!("npy: shape {shape:?} makes too long a header")))?;
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Write a float32 array to `path` (atomically).
pub fn save_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_atomic(path, &npy_f32(shape, data)?)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests may unwrap")]
    use super::*;

    #[test]
    fn the_header_is_numpys() {
        // numpy 2.4's `np.save` of np.zeros((2, 3), np.float32): 152 bytes, starting
        // b"\x93NUMPY\x01\x00v\x00" (118 header bytes), the dict below padded with spaces and
        // a newline to byte 128, then 24 bytes of data.
        let b = npy_f32(&[2, 3], &[0.0; 6]).unwrap();
        assert_eq!(b.len(), 152);
        assert_eq!(&b[..10], b"\x93NUMPY\x01\x00\x76\x00");
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let want = format!("{dict}{}\n", " ".repeat(118 - 1 - dict.len()));
        assert_eq!(std::str::from_utf8(&b[10..128]).unwrap(), want);
        let one = npy_f32(&[1], &[1.5]).unwrap();
        assert!(
            std::str::from_utf8(&one[10..one.len() - 4])
                .unwrap()
                .contains("'shape': (1,)")
        );
        assert_eq!(&one[one.len() - 4..], &1.5f32.to_le_bytes());
        assert!(npy_f32(&[2], &[0.0, f32::NAN]).is_err());
        assert!(npy_f32(&[3], &[0.0]).is_err());
    }
}
