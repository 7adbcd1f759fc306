//! Errors as HTTP answers: the status from the library's [`Error`], the
//! message as one JSON line.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::Error;

/// The HTTP status of a library error.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::SessionNotFound(_)
        | Error::AgentNotFound(_)
        | Error::LockNotFound(_)
        | Error::SessionPrefixNotFound { .. }
        | Error::LockPrefixNotFound { .. } => StatusCode::NOT_FOUND,
        Error::InvalidInput { .. }
        | Error::AmbiguousId { .. }
        | Error::ContextTooLarge { .. }
        | Error::ContextTooLargeForServer { .. }
        | Error::ContextRefused { .. } => StatusCode::BAD_REQUEST,
        Error::SessionNotActive { .. }
        | Error::AgentNotRunning { .. }
        | Error::LockHeld { .. }
        | Error::LockDelay { .. }
        | Error::LockWaitTimeout { .. }
        | Error::Deadlock { .. }
        | Error::AlreadyWaiting { .. }
        | Error::LockNotHeld { .. }
        | Error::SessionStillOpen { .. }
        | Error::PruneInProgress { .. } => StatusCode::CONFLICT,
        Error::Compacted { .. } => StatusCode::GONE,
        Error::ReadOnly { .. } => StatusCode::FORBIDDEN,
        Error::ManagerShutDown | Error::ManagerClosed => StatusCode::SERVICE_UNAVAILABLE,
        e if e.is_timeout() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer: a status and `{"error": "…"}` on one line.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

#[derive(Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub(crate) struct ErrorBody {
    /// What went wrong, on one line.
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A bad request naming its field.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("invalid {field}: {reason}"),
        )
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_of(&e);
        let message = match status {
            // A database's own words may carry its internals: they go to
            // the server's log, the client gets their kind.
            StatusCode::INTERNAL_SERVER_ERROR => {
                tracing::error!(error = %e, "dashboard request failed");
                match e {
                    Error::CorruptRow(row) => format!("stored row is malformed: {row}"),
                    Error::Database(_) => {
                        "internal error: the database failed; the server's log has the details"
                            .to_owned()
                    }
                    other => other.to_string(),
                }
            }
            _ => e.to_string(),
        };
        Self::new(
            status,
            message.split_whitespace().collect::<Vec<_>>().join(" "),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}
