//! Checks on caller input, done before any database work.
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
