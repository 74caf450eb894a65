//! Whether a run directory or checkpoint path is local or an `s3://` URL.
//!
//! Compiled whatever the features, so that a build without `s3` can refuse a URL
//! with an error that says how to enable it, instead of treating `s3://bucket` as a
//! relative local directory.

use std::path::Path;

use crate::error::Error;

/// True when `path` holds an `s3://` URL rather than a local path.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// The error for an `s3://` URL in a build without the `s3` feature.
#[cfg(not(feature = "s3"))]
pub(crate) fn not_built(path: &Path) -> Error {
    Error::RemoteUnsupported {
        url: path.display().to_string(),
        what: "this build of relume has no s3:// support".into(),
        hint: "build with the `s3` feature (`relume-ckpt/s3`, on by default in the `relume` crate and the CLI)".into(),
    }
}

/// The error for an `s3://` URL given to an operation that only works locally.
pub fn unsupported(path: &Path, what: &str, hint: &str) -> Error {
    Error::RemoteUnsupported {
        url: path.display().to_string(),
        what: what.to_string(),
        hint: hint.to_string(),
    }
}
