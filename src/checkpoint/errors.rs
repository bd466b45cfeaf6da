//! The checkpoint modules' one way to say what went wrong, and where.

use std::path::Path;

use crate::error::{CheckpointErrorKind, Error};

/// A checkpoint error of `kind` naming the file.
pub(crate) fn bad(path: &Path, kind: CheckpointErrorKind, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        tensor: None,
        kind,
        message: message.into(),
        source: None,
    }
}

/// A checkpoint error of `kind` about tensor `name` (which the message names too).
pub(crate) fn bad_tensor(
    path: &Path,
    kind: CheckpointErrorKind,
    name: &str,
    message: impl Into<String>,
) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        tensor: Some(name.to_string()),
        kind,
        message: message.into(),
        source: None,
    }
}

/// A checkpoint error caused by a parser's error, kept as its source (and not repeated in the
/// message).
pub(crate) fn bad_from(
    path: &Path,
    kind: CheckpointErrorKind,
    message: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        tensor: None,
        kind,
        message: message.into(),
        source: Some(Box::new(source)),
    }
}

/// Wraps an I/O error with the file it happened on.
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
