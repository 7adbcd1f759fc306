//! Context windows: the in-memory registry, the trait an app's own source
//! implements, and the envelope saved to `global_sessions.context_data`.
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One named piece of a session's working context (a prompt, a file summary…).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextWindow {
    pub key: String,
    pub data: serde_json::Value,
}

/// Where `end_session` reads a session's live context windows from.
///
/// [`ContextRegistry`] implements it; an app that keeps its windows elsewhere
/// implements it too and passes it to
/// [`SessionManager::with_context_source`](crate::SessionManager::with_context_source).
pub trait ContextSource: Send + Sync {
    /// The session's windows, in the order they should be saved.
    fn windows(&self, session_id: Uuid) -> Vec<ContextWindow>;
    /// Called once the session's end has committed: its windows are saved and
    /// may be dropped. Not called when the end fails.
    fn clear(&self, session_id: Uuid);
}

/// In-memory, per-session context windows. Thread-safe; cheap to share.
#[derive(Debug, Default)]
pub struct ContextRegistry {
    sessions: Mutex<HashMap<Uuid, Vec<ContextWindow>>>,
}

impl ContextRegistry {
    fn guard(&self) -> MutexGuard<'_, HashMap<Uuid, Vec<ContextWindow>>> {
        // A panic elsewhere while holding the lock leaves the map consistent
        // (every mutation is a single push or assignment), so keep serving it.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a window; a window with the same key is replaced in place, keeping
    /// its position.
    pub fn put(&self, session_id: Uuid, key: impl Into<String>, data: serde_json::Value) {
        let key = key.into();
        let mut sessions = self.guard();
        let windows = sessions.entry(session_id).or_default();
        match windows.iter_mut().find(|w| w.key == key) {
            Some(window) => window.data = data,
            None => windows.push(ContextWindow { key, data }),
        }
    }

    /// The session's windows in insertion order (empty if it has none).
    pub fn windows(&self, session_id: Uuid) -> Vec<ContextWindow> {
        self.guard().get(&session_id).cloned().unwrap_or_default()
    }

    /// Replaces all of a session's windows, e.g. when resuming from saved context.
    pub fn replace(&self, session_id: Uuid, windows: Vec<ContextWindow>) {
        self.guard().insert(session_id, windows);
    }

    /// Drops the session's windows.
    pub fn remove(&self, session_id: Uuid) {
        self.guard().remove(&session_id);
    }
}

impl ContextSource for ContextRegistry {
    fn windows(&self, session_id: Uuid) -> Vec<ContextWindow> {
        ContextRegistry::windows(self, session_id)
    }

    fn clear(&self, session_id: Uuid) {
        self.remove(session_id);
    }
}

/// The version of the `context_data` layout this library writes and reads.
pub const CONTEXT_FORMAT_VERSION: u32 = 1;

/// What `context_data` holds: `{"version":1,"windows":[{"key":…,"data":…},…]}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ContextEnvelope {
    pub version: u32,
    pub windows: Vec<ContextWindow>,
}

/// A session's context, serialized once before the end's transaction opens.
pub(crate) struct SavedContext {
    pub value: serde_json::Value,
    pub windows: u64,
    pub bytes: u64,
}

impl SavedContext {
    /// Serializes the windows and enforces the size limit.
    pub fn capture(windows: Vec<ContextWindow>, limit: usize) -> crate::Result<Self> {
        let count = windows.len() as u64;
        // Built by moving the windows' data in, not by `to_value`, which would
        // rebuild every value: a context can be megabytes. Same layout as
        // `ContextEnvelope`, which reads it back.
        let windows: Vec<serde_json::Value> = windows
            .into_iter()
            .map(|w| serde_json::json!({ "key": w.key, "data": w.data }))
            .collect();
        let value = serde_json::json!({ "version": CONTEXT_FORMAT_VERSION, "windows": windows });
        let bytes = json_len(&value);
        if bytes > limit {
            return Err(crate::Error::ContextTooLarge { bytes, limit });
        }
        Ok(Self {
            value,
            windows: count,
            bytes: bytes as u64,
        })
    }
}

/// Serialized length of a JSON value, without allocating the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Reads `context_data` back into windows.
pub(crate) fn decode(
    session_id: Uuid,
    value: serde_json::Value,
) -> crate::Result<Vec<ContextWindow>> {
    let envelope: ContextEnvelope =
        serde_json::from_value(value).map_err(|e| crate::Error::CorruptContext {
            session_id,
            reason: e.to_string(),
        })?;
    if envelope.version != CONTEXT_FORMAT_VERSION {
        return Err(crate::Error::CorruptContext {
            session_id,
            reason: format!(
                "format version {} is not the supported version {CONTEXT_FORMAT_VERSION}",
                envelope.version
            ),
        });
    }
    Ok(envelope.windows)
}
