//! Helpers shared by the loaders' unit tests.

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Write `bytes` to `dir/name` (creating parent folders) and return the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().expect("a file path has a parent")).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The error message of `r`, asserting it names `path` and contains every one of `needles`.
pub fn err_mentions<T: std::fmt::Debug>(r: Result<T>, path: &Path, needles: &[&str]) -> String {
    let msg = r.expect_err("expected an error").to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    for n in needles {
        assert!(msg.contains(n), "error lacks `{n}`: {msg}");
    }
    msg
}
