//! hyperclone-nn: one generic decoder-only transformer on candle, used to verify clones
//! without Python and to train them: the decoder ([`model`]), its training step
//! ([`train`]), the training run with its checkpoint and resume format ([`trainer`]),
//! generation ([`generate`]) and carrying AdamW moments to a clone ([`optimizer_carry`]).

/// `return Err(NnError::Input(format!(..)))`: a refused input or state, in one line.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::NnError::Input(format!($($arg)*)))
    };
}

pub(crate) mod adamw_kernels;
pub mod arch;
pub mod attention;
pub(crate) mod bf16_kernel;
pub mod check;
pub mod corpus;
pub mod error;
pub(crate) mod f32_kernel;
pub(crate) mod fused;
pub mod generate;
pub mod init;
pub mod model;
pub mod optimizer_carry;
pub(crate) mod packed_linear;
pub mod packed_schedule;
pub mod rng;
pub mod shard;
pub mod softmax;
pub mod spec;
pub mod stream;
#[cfg(test)]
mod test_util;
pub mod tokenizer_guard;
pub mod train;
pub mod trainer;
pub(crate) mod vexp;

/// The working precision of a forward pass or verification (candle's dtype), re-exported so
/// callers need not depend on candle.
pub use candle_core::DType;
pub use error::{Context, NnError, Result};
pub use model::{Decoder, Dropout, ForwardOutput, Param};
pub mod verify;
