//! Checks on caller input, done before any database work.
use std::time::Duration;

use uuid::Uuid;

use crate::{Error, Result};

/// Longest agent_type, resource_type or resource_key accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;

pub(crate) fn id(field: &'static str, value: Uuid) -> Result<()> {
    if value.is_nil() {
        return Err(Error::InvalidInput {
            field,
            reason: "must not be the nil UUID".into(),
        });
    }
    Ok(())
}

pub(crate) fn name(field: &'static str, value: &str) -> Result<()> {
    let reason = if value.trim().is_empty() {
        "must not be empty or only whitespace".to_owned()
    } else if value.len() > MAX_NAME_BYTES {
        format!(
            "is {} bytes, over the {MAX_NAME_BYTES}-byte limit",
            value.len()
        )
    } else if value.contains('\0') {
        // PostgreSQL text cannot hold NUL; refuse it everywhere alike.
        "must not contain a NUL character".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::InvalidInput { field, reason })
}

/// The longest duration an argument takes (a lock's `ttl`, `stale_after`):
/// ten years, so every time computed from it is one every backend stores.
pub const MAX_ARGUMENT_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// A duration argument as chrono's, refused by name when zero (unless
/// `zero_ok`) or longer than [`MAX_ARGUMENT_DURATION`].
pub(crate) fn duration(
    field: &'static str,
    value: Duration,
    zero_ok: bool,
) -> Result<chrono::Duration> {
    let reason = if value.is_zero() && !zero_ok {
        "must be longer than zero".to_owned()
    } else if value > MAX_ARGUMENT_DURATION {
        format!("{value:?} is longer than ten years")
    } else {
        return chrono::Duration::from_std(value).map_err(|e| Error::InvalidInput {
            field,
            reason: format!("{value:?}: {e}"),
        });
    };
    Err(Error::InvalidInput { field, reason })
}
