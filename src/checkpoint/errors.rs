//! The checkpoint modules' one way to say what went wrong, and where.

use std::path::Path;

use crate::error::Error;

/// A checkpoint error naming the file.
pub(crate) fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
        source: None,
    }
}

/// A checkpoint error caused by a parser's error, kept as its source.
pub(super) fn bad_from(
    path: &Path,
    message: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let message = format!("{}: {source}", message.into());
    Error::Checkpoint {
        path: path.to_path_buf(),
        message,
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
