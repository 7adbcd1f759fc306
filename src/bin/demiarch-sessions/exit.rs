//! Failures: one line for stderr and an exit code per class (see `--help`).
use demiarch_sessions::Error;
use sea_orm::DbErr;

/// An unexpected failure: a bug, a database error of no known class, a
/// malformed stored row.
pub const INTERNAL: u8 = 1;
/// Bad arguments (clap also exits with 2), a malformed or ambiguous id.
pub const INVALID_INPUT: u8 = 2;
/// No session has that id or prefix.
pub const NOT_FOUND: u8 = 3;
/// The database stayed busy past the budget; nothing changed.
pub const TIMEOUT: u8 = 4;
/// The database cannot be opened or reached, is not a database, or was
/// migrated by a newer version.
pub const UNREACHABLE: u8 = 5;
/// The state of a session or lock forbids the operation: the resource is
/// held (also after waiting for it), or waiting would deadlock.
pub const CONFLICT: u8 = 6;
/// The audit events asked for (after a seq) were partly pruned.
pub const COMPACTED: u8 = 7;
/// A prune's archive file cannot be written.
pub const ARCHIVE: u8 = 8;
/// `serve` cannot listen: the address is in use, or not this machine's.
pub const ADDRESS_IN_USE: u8 = 9;

const LIST_HINT: &str = "`demiarch-sessions sessions list` shows the sessions there are";

/// Why the command failed: printed as `error: {message}` and exited with `code`.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    /// For invalid input: the command-line flag at fault and the reason,
    /// for [`cli_line`](Self::cli_line). (The dashboard, which has no
    /// flags, prints [`line`](Self::line).)
    pub flag: Option<(&'static str, String)>,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            flag: None,
        }
    }

    /// Invalid input naming `field`, which on the command line is `flag`.
    fn invalid_flag(message: String, flag: &'static str, reason: String) -> Self {
        let mut failure = Self::new(INVALID_INPUT, message);
        failure.flag = Some((flag, reason));
        failure
    }

    /// The line printed on stderr by the CLI: as [`line`](Self::line), but
    /// invalid input names the flag that gave it (`--stale-after`) rather
    /// than the library's field.
    pub fn cli_line(&self) -> String {
        match &self.flag {
            Some((flag, reason)) => {
                Self::new(self.code, format!("invalid {flag}: {reason}")).line()
            }
            None => self.line(),
        }
    }

    /// The line printed on stderr: always exactly one line.
    pub fn line(&self) -> String {
        let one_line: Vec<&str> = self.message.split_whitespace().collect();
        format!("error: {}", one_line.join(" "))
    }

    /// Classifies a library error met while `doing` something ("ending
    /// session …"), which prefixes messages that would not say it themselves.
    pub fn during(doing: &str, err: Error) -> Self {
        match err {
            Error::SessionNotFound(id) => {
                Self::new(NOT_FOUND, format!("session {id} not found; {LIST_HINT}"))
            }
            Error::LockPrefixNotFound { prefix } => Self::new(
                NOT_FOUND,
                format!(
                    "no lock id starts with {prefix:?}; `demiarch-sessions locks list` shows \
                     the locks there are"
                ),
            ),
            Error::AgentNotFound(_) | Error::LockNotFound(_) => {
                Self::new(NOT_FOUND, err.to_string())
            }
            Error::SessionPrefixNotFound { prefix } => Self::new(
                NOT_FOUND,
                format!("no session id starts with {prefix:?}; {LIST_HINT}"),
            ),
            Error::AmbiguousId { prefix } => Self::new(
                INVALID_INPUT,
                format!(
                    "session id prefix {prefix:?} matches more than one session; \
                     give more characters"
                ),
            ),
            Error::InvalidInput { field, reason } => match flag_of(field) {
                Some(flag) => {
                    let message = Error::InvalidInput {
                        field,
                        reason: reason.clone(),
                    }
                    .to_string();
                    Self::invalid_flag(message, flag, reason)
                }
                None => Self::new(INVALID_INPUT, format!("invalid {field}: {reason}")),
            },
            Error::ReadOnly { operation } => Self::new(
                INVALID_INPUT,
                format!(
                    "{doing}: {operation} refused: the store was opened read-only \
                     (?mode=ro in the database URL); drop mode=ro to change it"
                ),
            ),
            Error::Timeout { elapsed_ms } => Self::new(
                TIMEOUT,
                format!(
                    "{doing} timed out after {elapsed_ms} ms: another writer holds the \
                     database; nothing was changed, retry later or raise --cleanup-timeout"
                ),
            ),
            Error::NotADatabase { .. } | Error::SchemaTooNew { .. } | Error::MissingRow { .. } => {
                Self::new(UNREACHABLE, err.to_string())
            }
            Error::NotMigrated { .. } => Self::new(UNREACHABLE, not_migrated(&err)),
            Error::CorruptContext { .. } | Error::CorruptRow(_) => Self::new(
                INTERNAL,
                format!("{err}; was the store edited by hand or by another program?"),
            ),
            Error::Database(db) => Self::database(doing, &db),
            Error::SessionNotActive { .. }
            | Error::AgentNotRunning { .. }
            | Error::LockHeld { .. }
            | Error::LockDelay { .. }
            | Error::LockWaitTimeout { .. }
            | Error::Deadlock { .. }
            | Error::AlreadyWaiting { .. }
            | Error::LockNotHeld { .. }
            | Error::SessionStillOpen { .. }
            | Error::ContextTooLarge { .. }
            | Error::ContextTooLargeForServer { .. }
            | Error::PruneInProgress { .. } => Self::new(CONFLICT, err.to_string()),
            Error::Compacted {
                compacted_through, ..
            } => Self::new(
                COMPACTED,
                format!("{err}; run again with --after {compacted_through}"),
            ),
            Error::Archive { .. } => Self::new(ARCHIVE, err.to_string()),
            other => Self::new(INTERNAL, format!("{doing}: {other}")),
        }
    }

    fn database(doing: &str, err: &DbErr) -> Self {
        if is_busy(err) {
            Self::new(
                TIMEOUT,
                format!(
                    "{doing} timed out: another writer holds the database ({err}); \
                     retry later or raise --busy-timeout"
                ),
            )
        } else if matches!(err, DbErr::Conn(_) | DbErr::ConnectionAcquire(_)) {
            Self::new(
                UNREACHABLE,
                format!(
                    "{doing}: cannot reach the database ({err}); check --database-url \
                     or DATABASE_URL and that the database is up"
                ),
            )
        } else {
            Self::new(INTERNAL, format!("{doing}: database error: {err}"))
        }
    }

    /// Classifies a failure to open the database at `url` (already redacted).
    pub fn connect(url: &str, err: Error) -> Self {
        match err {
            Error::NotADatabase { .. } | Error::SchemaTooNew { .. } | Error::MissingRow { .. } => {
                Self::new(UNREACHABLE, format!("{err} ({url})"))
            }
            Error::NotMigrated { .. } => Self::new(UNREACHABLE, not_migrated(&err)),
            Error::CannotOpen { reason, .. } => Self::new(
                UNREACHABLE,
                format!(
                    "cannot open the database {url}: {reason}; check --database-url \
                         or DATABASE_URL"
                ),
            ),
            Error::InvalidInput {
                field: "url",
                reason,
            } => Self::new(
                INVALID_INPUT,
                format!("invalid database URL {url}: {reason}"),
            ),
            Error::InvalidInput { field, reason } => {
                let flag = flag_of(field).unwrap_or(field);
                Self::invalid_flag(format!("invalid {flag}: {reason}"), flag, reason)
            }
            Error::Database(db) if is_busy(&db) => Self::new(
                TIMEOUT,
                format!(
                    "opening the database {url} timed out: another process holds it \
                     ({db}); retry later or raise --busy-timeout"
                ),
            ),
            Error::Database(db) => Self::new(
                UNREACHABLE,
                format!(
                    "cannot open the database {url}: {db}; check --database-url or \
                     DATABASE_URL and that the database is up"
                ),
            ),
            other => Self::during(&format!("opening the database {url}"), other),
        }
    }

    /// A clap parse error as one line, with the exit code clap would use.
    pub fn usage(err: &clap::Error) -> Self {
        let text = err.render().to_string();
        let mut parts = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("Usage:") || line.starts_with("For more information") {
                break;
            }
            if !line.is_empty() {
                parts.push(line.trim_start_matches("error:").trim().to_owned());
            }
        }
        let code = u8::try_from(err.exit_code()).unwrap_or(INVALID_INPUT);
        Self::new(code, format!("{}; see --help", parts.join(" ")))
    }
}

/// The command-line flag that sets a library field or argument, where one
/// does: `Config::cleanup_timeout` is `--cleanup-timeout`, `stale_after`
/// is `--stale-after`.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "Config::cleanup_timeout" => "--cleanup-timeout",
        "Config::busy_timeout" => "--busy-timeout",
        "stale_after" => "--stale-after",
        "completed_after" => "--completed-after",
        "context_after" => "--context-after",
        "audit_after" => "--audit-after",
        "keep_last" => "--keep-last",
        "archive" => "--archive",
        "batch" => "--batch",
        "after" => "--after",
        "event_types" => "--event",
        _ => return None,
    })
}

/// A store not at the latest schema, opened by a command that only reads.
fn not_migrated(err: &Error) -> String {
    format!(
        "{err}; read commands open the store read-only and migrate nothing: any \
         command that writes (e.g. `demiarch-sessions locks sweep`) migrates it"
    )
}

/// The database gave up waiting for another writer (the library's own test).
fn is_busy(err: &DbErr) -> bool {
    // Classified by the library, so the CLI and the library agree on what a
    // busy database looks like on every backend.
    Error::Database(err.clone()).is_timeout()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::RuntimeErr;
    use uuid::Uuid;

    #[test]
    fn classes() {
        let id = Uuid::new_v4();
        assert_eq!(
            Failure::during("x", Error::SessionNotFound(id)).code,
            NOT_FOUND
        );
        let none = Error::SessionPrefixNotFound {
            prefix: "12345678".into(),
        };
        assert_eq!(Failure::during("x", none).code, NOT_FOUND);
        let many = Error::AmbiguousId {
            prefix: "12345678".into(),
        };
        assert_eq!(Failure::during("x", many).code, INVALID_INPUT);
        let timeout = Error::Timeout { elapsed_ms: 5 };
        assert_eq!(Failure::during("x", timeout).code, TIMEOUT);
        let conn = Error::Database(DbErr::Conn(RuntimeErr::Internal("refused".into())));
        assert_eq!(Failure::during("x", conn).code, UNREACHABLE);
    }

    #[test]
    fn lock_refusals_are_conflicts() {
        let agent = Uuid::new_v4();
        let refusals = [
            Error::LockHeld {
                resource_type: "file".into(),
                resource_key: "x".into(),
                holder_agent_id: Some(agent),
                fencing_token: Some(1),
            },
            Error::LockWaitTimeout {
                resource_type: "file".into(),
                resource_key: "x".into(),
                waited_ms: 5,
                holder_agent_id: Some(agent),
            },
            Error::Deadlock {
                agents: vec![agent, Uuid::new_v4()],
            },
            Error::AlreadyWaiting {
                agent_id: agent,
                resource_type: Some("file".into()),
                resource_key: Some("y".into()),
            },
        ];
        for err in refusals {
            let message = err.to_string();
            let failure = Failure::during("x", err);
            assert_eq!(failure.code, CONFLICT, "{message}");
            assert_eq!(failure.message, message);
        }
    }

    #[test]
    fn one_line() {
        let failure = Failure::new(INTERNAL, "a\nb\n  c");
        assert_eq!(failure.line(), "error: a b c");
    }
}
