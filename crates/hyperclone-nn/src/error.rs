#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error(transparent)]
    Core(#[from] hyperclone_core::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Input(String),
    /// An operating-system error where the caller adds the file (see [`Context`]).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// What was being done when `source` failed; printed as `message: source` by the CLI,
    /// which walks the chain (as with anyhow's context).
    #[error("{message}")]
    Context {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

/// anyhow-style context for library errors: the orchestration moved out of the CLI keeps
/// its messages word for word.
pub trait Context<T> {
    fn context(self, message: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, message: F) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| NnError::Context {
            message: message.into(),
            source: Box::new(e),
        })
    }
    fn with_context<F: FnOnce() -> String>(self, message: F) -> Result<T> {
        self.map_err(|e| NnError::Context {
            message: message(),
            source: Box::new(e),
        })
    }
}

/// A missing value becomes an error that is just the message.
impl<T> Context<T> for Option<T> {
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| NnError::Input(message.into()))
    }
    fn with_context<F: FnOnce() -> String>(self, message: F) -> Result<T> {
        self.ok_or_else(|| NnError::Input(message()))
    }
}

/// `Err("interrupted")` once `cancel` is set: long work (a streamed verify) checks it
/// between its steps so Ctrl-C takes effect promptly.
pub fn stop_if_cancelled(cancel: &std::sync::atomic::AtomicBool) -> Result<()> {
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(NnError::Input("interrupted".into()));
    }
    Ok(())
}
