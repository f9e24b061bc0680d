//! Library error type. Every variant names the file or item it is about, so a user sees
//! *what* went wrong *where* without a backtrace.

use std::path::PathBuf;

/// Errors raised by the ganscope engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io error is part of the message, not a `source` (a `{:#}` chain would print it
    /// twice).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A data or checkpoint file exists but its contents are not what they should be.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A tensor in a checkpoint does not match the tensor the configured model expects.
    #[error(
        "{path}: tensor `{name}` has shape {found:?}, but the model built from the config expects {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` is missing (the config expects it)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("no complete checkpoint in {dir}: {msg}")]
    NoCheckpoint { dir: PathBuf, msg: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("unknown label `{label}`{}", if .known.is_empty() { String::new() } else { format!(" (known labels: {})", .known.join(", ")) })]
    UnknownLabel { label: String, known: Vec<String> },
    /// A loss came out NaN or infinite in training step `step` (1-based); the update that
    /// step would have made (to the network whose loss it is) was not applied.
    #[error("{what} became {value} at step {step}; the weights were not updated")]
    NonFinite {
        what: &'static str,
        value: f64,
        step: u64,
    },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
