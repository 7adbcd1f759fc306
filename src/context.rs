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
/// An end refuses windows that could not be read back (nested deeper than
/// [`MAX_CONTEXT_DEPTH`], or holding a NUL character) with
/// [`Error::ContextRefused`](crate::Error::ContextRefused), changing nothing;
/// an implementation should refuse such values when they come in, as the
/// registry does, since copying or dropping a value nested thousands of
/// levels deep overflows the stack.
pub trait ContextSource: Send + Sync {
    /// The session's windows, in the order they should be saved.
    fn windows(&self, session_id: Uuid) -> Vec<ContextWindow>;
    /// Called once the session's end has committed (its windows are saved),
    /// or once an end found it already ended elsewhere (they can no longer be
    /// saved; the report counts them as discarded). Not called when the end
    /// fails.
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
    ///
    /// # Errors
    /// [`Error::ContextRefused`](crate::Error::ContextRefused), and nothing is
    /// stored, when the window could not be saved by an end: its data nests
    /// deeper than [`MAX_CONTEXT_DEPTH`], or its key or data holds a NUL
    /// character. A refused value is taken apart without recursion, so even a
    /// value nested a million levels deep is refused safely.
    pub fn put(
        &self,
        session_id: Uuid,
        key: impl Into<String>,
        data: serde_json::Value,
    ) -> crate::Result<()> {
        let key = key.into();
        if let Some(reason) = unsavable(&key, &data) {
            dismantle(data);
            return Err(crate::Error::ContextRefused {
                session_id,
                key,
                reason,
            });
        }
        let mut sessions = self.guard();
        let windows = sessions.entry(session_id).or_default();
        match windows.iter_mut().find(|w| w.key == key) {
            Some(window) => window.data = data,
            None => windows.push(ContextWindow { key, data }),
        }
        Ok(())
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

/// The deepest a window's data may nest (arrays and objects inside each
/// other). The saved envelope adds three levels, and every backend must store
/// and read back the whole: MariaDB's JSON validation refuses 32 levels.
pub const MAX_CONTEXT_DEPTH: usize = 28;

/// Why a window cannot be saved, if it cannot: data nested deeper than
/// [`MAX_CONTEXT_DEPTH`], or a NUL character in its key or anywhere in its
/// data (PostgreSQL's `jsonb` cannot hold one). Walks without recursion.
pub(crate) fn unsavable(key: &str, data: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    const NUL: &str = "holds a NUL character (U+0000), which PostgreSQL cannot store";
    if key.contains('\0') {
        return Some(format!("its key {NUL}"));
    }
    let mut pending = vec![(data, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        let inner = depth + 1;
        match value {
            Value::String(text) if text.contains('\0') => return Some(NUL.to_owned()),
            Value::Array(_) | Value::Object(_) if inner > MAX_CONTEXT_DEPTH => {
                return Some(format!("nests deeper than {MAX_CONTEXT_DEPTH} levels"));
            }
            Value::Array(items) => pending.extend(items.iter().map(|v| (v, inner))),
            Value::Object(fields) => {
                for (name, v) in fields {
                    if name.contains('\0') {
                        return Some(NUL.to_owned());
                    }
                    pending.push((v, inner));
                }
            }
            _ => {}
        }
    }
    None
}

/// Drops a JSON value without recursion: serde_json's own drop recurses once
/// per level and would overflow the stack on a deeply nested value.
fn dismantle(value: serde_json::Value) {
    use serde_json::Value;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(fields) => pending.extend(fields.into_iter().map(|(_, v)| v)),
            _ => {}
        }
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

/// The envelope as written: borrows the windows, so they are serialized
/// straight into the text, never copied into an intermediate JSON value.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    version: u32,
    windows: &'a [ContextWindow],
}

/// A session's context as the end saves it: the envelope as a JSON value,
/// built before the end's transaction opens, and its size as JSON text.
pub(crate) struct SavedContext {
    pub data: serde_json::Value,
    pub windows: u64,
    pub bytes: u64,
}

impl SavedContext {
    /// Checks every window can be saved, measures them against the size
    /// limit and wraps them in the envelope. The windows are moved into it,
    /// never copied.
    pub fn capture(
        session_id: Uuid,
        windows: Vec<ContextWindow>,
        limit: usize,
    ) -> crate::Result<Self> {
        if let Some((key, reason)) = windows
            .iter()
            .find_map(|w| unsavable(&w.key, &w.data).map(|reason| (w.key.clone(), reason)))
        {
            windows.into_iter().for_each(|w| dismantle(w.data));
            return Err(crate::Error::ContextRefused {
                session_id,
                key,
                reason,
            });
        }
        let envelope = EnvelopeRef {
            version: CONTEXT_FORMAT_VERSION,
            windows: &windows,
        };
        let mut size = ByteCount(0);
        // Keys are strings and the data is already JSON, so this cannot fail;
        // if it ever did, say so rather than save something else.
        serde_json::to_writer(&mut size, &envelope).map_err(|e| crate::Error::InvalidInput {
            field: "context",
            reason: format!("context windows do not serialize to JSON: {e}"),
        })?;
        let bytes = size.0;
        if bytes > limit {
            return Err(crate::Error::ContextTooLarge { bytes, limit });
        }
        let count = windows.len() as u64;
        let windows = windows
            .into_iter()
            .map(|w| {
                let mut window = serde_json::Map::new();
                window.insert("key".to_owned(), w.key.into());
                window.insert("data".to_owned(), w.data);
                serde_json::Value::Object(window)
            })
            .collect();
        let mut envelope = serde_json::Map::new();
        envelope.insert("version".to_owned(), CONTEXT_FORMAT_VERSION.into());
        envelope.insert("windows".to_owned(), serde_json::Value::Array(windows));
        Ok(Self {
            data: serde_json::Value::Object(envelope),
            windows: count,
            bytes: bytes as u64,
        })
    }
}

/// Counts the bytes written to it and keeps none.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
