//! Fallible allocation of the buffers whose size the caller controls (O(N·D) and O(B²)), so
//! that a batch too large for the host's memory is [`Error::OutOfMemory`], not an abort.

use crate::error::{Error, Result};

/// `len` copies of `value`, or [`Error::OutOfMemory`] naming `backend` and the bytes.
pub(crate) fn filled<T: Clone>(backend: &'static str, len: usize, value: T) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values
        .try_reserve_exact(len)
        .map_err(|_| Error::OutOfMemory {
            backend,
            bytes: len.saturating_mul(size_of::<T>()),
        })?;
    values.resize(len, value);
    Ok(values)
}
