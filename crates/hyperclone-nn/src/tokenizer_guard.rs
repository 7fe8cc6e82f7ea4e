//! The tokenizers library panics on some tokenizer.json files it accepts (a `Replace`
//! normalizer with an empty pattern indexes past the end of the string when encoding; a BPE
//! with a `continuing_subword_prefix` longer than a merged token slices backwards when
//! loading). Every call into it on a user's file goes through [`guarded`], which turns such
//! a panic into one error naming the file instead of a crash with exit 101 and a backtrace.

use crate::error::{NnError, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Guarded calls in flight. The panic hook is process-wide and the library may panic on a
/// rayon worker thread, so the hook is silenced by a count rather than per thread.
static SILENCED: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Wraps the default panic hook once: it stays quiet while a guarded call runs (the panic
/// becomes an error line), and prints as before otherwise.
fn install_hook() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if SILENCED.load(Ordering::SeqCst) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f` (a tokenizers call on `file`, described by `what`: "loading", "encoding"...);
/// a panic inside it becomes `file: the tokenizer panicked while WHAT (MESSAGE)`.
pub fn guarded<T>(file: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_hook();
    SILENCED.fetch_add(1, Ordering::SeqCst);
    let outcome = catch_unwind(AssertUnwindSafe(f));
    SILENCED.fetch_sub(1, Ordering::SeqCst);
    outcome.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(NnError::Input(format!(
            "{}: the tokenizers library failed while {what} ({}); this tokenizer.json uses a setting it cannot handle",
            file.display(),
            message.lines().next().unwrap_or("")
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_the_file() {
        let r: Result<()> = guarded(Path::new("t/tokenizer.json"), "encoding", || {
            panic!("index out of bounds: the len is 11 but the index is 11")
        });
        let e = r.unwrap_err().to_string();
        assert_eq!(
            e,
            "t/tokenizer.json: the tokenizers library failed while encoding (index out of bounds: \
             the len is 11 but the index is 11); this tokenizer.json uses a setting it cannot handle"
        );
        assert_eq!(guarded(Path::new("x"), "loading", || Ok(3)).unwrap(), 3);
    }
}
