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
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;
