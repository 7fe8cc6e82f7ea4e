//! hyperclone-nn: one generic decoder-only transformer on candle, used to verify clones
//! without Python and (later) to train them.

pub mod arch;
pub mod check;
pub mod corpus;
pub mod error;
pub mod init;
pub mod model;
pub mod rng;
pub mod softmax;
pub mod spec;
pub mod train;

pub use error::{NnError, Result};
pub use model::{Decoder, Dropout, ForwardOutput, Param};
pub mod verify;
