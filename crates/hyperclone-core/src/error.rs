//! One error type for the core. Every variant names the file (and the tensor where there is
//! one) so the CLI can print a single self-explaining line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a file we read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are not what its format promises (corrupt safetensors, bad JSON).
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// A tensor that is missing, unexpected, or has the wrong dtype or shape.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// config.json describes something we cannot grow (unknown family, missing field, ...).
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// Growth options that make no sense (factor 0, head_dim change, ...).
    #[error("{0}")]
    Options(String),
    /// The finished clone failed its check before being moved into place; nothing was kept.
    #[error("verification failed, nothing was written: {0}")]
    Verification(String),
    /// An output exists and the caller did not allow replacing it (the `force` option).
    /// How to pass an option is the front end's to say ([`Error::phrased`]).
    #[error("{}: {role}already exists (pass force to replace it)", path.display())]
    NeedsForce {
        path: PathBuf,
        /// What the path is to the command, with its separator (`--out: `), or empty.
        role: String,
    },
    /// A source tensor holds NaN or infinite values and the caller did not allow cloning
    /// them (the `allow_nonfinite` option).
    #[error("{}: tensor `{tensor}`: {message} (pass allow_nonfinite to clone them anyway)", path.display())]
    NonFinite {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// The user interrupted a long operation (Ctrl-C); partial output was removed.
    #[error("interrupted; the partial output was removed")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }
    /// The error's one line, with the options that would allow what was refused spelled
    /// by the front end: `spell("force")` is `--force` for the CLI, `force=True` for Python.
    pub fn phrased(&self, spell: impl Fn(&str) -> String) -> String {
        match self {
            Error::NeedsForce { path, role } => format!(
                "{}: {role}already exists (pass {} to replace it)",
                path.display(),
                spell("force")
            ),
            Error::NonFinite {
                path,
                tensor,
                message,
            } => format!(
                "{}: tensor `{tensor}`: {message} (pass {} to clone them anyway)",
                path.display(),
                spell("allow_nonfinite")
            ),
            other => other.to_string(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// An error chain (outermost first) as the one line front ends print: each cause once (the
/// core's messages already include their OS error), and only the first line of each (candle
/// appends a backtrace when RUST_BACKTRACE is set).
pub fn one_line<I, S>(causes: I) -> String
where
    I: IntoIterator<Item = S>,
    S: std::fmt::Display,
{
    let mut line = String::new();
    for cause in causes {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim_end();
        if first.is_empty() || line.contains(first) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(first);
    }
    line
}

/// [`one_line`] of a standard error and its sources.
pub fn one_line_of(e: &(dyn std::error::Error + 'static)) -> String {
    one_line(std::iter::successors(Some(e), |e| e.source()))
}
