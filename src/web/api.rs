//! The JSON API: the documents of [`crate::views`] and the reports of the
//! actions, typed end to end.
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::{json, Shared};
use crate::views::{AuditQuery, LockView, LocksQuery, SessionView, SessionsQuery};
use crate::{AgentOutcome, Error, RetentionPolicy, WatchOptions};

type Answer = Result<Response, ApiError>;

/// A query string as `T`, its empty values (`status=` from a form's "any"
/// choice) taken as absent; one that does not parse is a 400 naming the
/// field.
pub(crate) fn query<T: serde::de::DeserializeOwned>(raw: Option<String>) -> Result<T, ApiError> {
    let kept: Vec<&str> = raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.ends_with('='))
        .collect();
    let uri: axum::http::Uri = format!("/?{}", kept.join("&"))
        .parse()
        .map_err(|_| ApiError::invalid("query", "not a query string"))?;
    Query::<T>::try_from_uri(&uri)
        .map(|Query(q)| q)
        .map_err(|e| {
            // serde names the field first: "limit: invalid digit found in string".
            let text = e.body_text();
            let text = text
                .strip_prefix("Failed to deserialize query string: ")
                .unwrap_or(&text);
            match text.split_once(": ") {
                Some((field, reason)) if !field.contains(' ') => ApiError::invalid(field, reason),
                _ => ApiError::invalid("query", text),
            }
        })
}

/// A session named by its full id or a unique prefix of 8+ hex digits.
pub(crate) async fn session_id(web: &Shared, id: &str) -> Result<Uuid, ApiError> {
    Ok(web.manager.find_session(id).await?)
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "This API's OpenAPI 3.1 document", content_type = "application/json")))]
pub(crate) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::openapi_json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions", params(SessionsQuery),
    responses(
        (status = 200, body = crate::views::SessionsPage, description = "A page of sessions, newest first"),
        (status = 400, body = super::error::ErrorBody, description = "A parameter is invalid"),
        (status = 401, body = super::error::ErrorBody, description = "Missing or wrong token"),
    ))]
pub(crate) async fn sessions(State(web): State<Shared>, RawQuery(q): RawQuery) -> Answer {
    let q: SessionsQuery = query(q)?;
    Ok(json(web.views().sessions(&q).await?))
}

#[utoipa::path(get, path = "/api/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "A session id, or a unique prefix of 8+ hex digits")),
    responses(
        (status = 200, body = crate::views::SessionDetail, description = "The session whole"),
        (status = 400, body = super::error::ErrorBody, description = "Not an id or prefix"),
        (status = 404, body = super::error::ErrorBody, description = "No such session (or pruned)"),
    ))]
pub(crate) async fn session(State(web): State<Shared>, Path(id): Path<String>) -> Answer {
    let id = match web.manager.find_session(&id).await {
        Ok(id) => id,
        Err(e @ Error::SessionNotFound(_)) => {
            return Err(pruned(&web, &id).await.unwrap_or(e.into()))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(json(web.views().session(id).await?))
}

/// Why a session given by its full id is missing, when an audit row still
/// tells that it existed: a prune deleted it.
pub(crate) async fn pruned(web: &Shared, id: &str) -> Option<ApiError> {
    let id = Uuid::parse_str(id.trim()).ok()?;
    let last = web
        .manager
        .audit_events(crate::AuditFilter {
            session_id: Some(id),
            limit: Some(1),
            ..crate::AuditFilter::default()
        })
        .await
        .ok()?
        .rows
        .pop()?;
    Some(ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "session {id} was pruned: its rows are gone, its audit rows remain (the last: {} at \
             {}, seq {})",
            last.event_type,
            last.event_time.to_rfc3339(),
            last.seq
        ),
    ))
}

/// Why an operator acts, recorded in the audit row.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct Reason {
    /// Recorded in the action's audit row.
    pub reason: Option<String>,
}

/// A JSON body, or the type's default when there is none; a body that is
/// not that JSON is a bad request.
pub(crate) fn body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("body", e))
}

fn reason_of(bytes: &Bytes) -> Result<Option<String>, ApiError> {
    let r: Reason = body(bytes)?;
    Ok(r.reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty()))
}

/// `?force=true`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndQuery {
    /// End it even though its owner still heartbeats (its live context is
    /// then not saved).
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(post, path = "/api/v1/sessions/{id}/end", tag = "actions",
    params(("id" = String, Path, description = "A session id or unique prefix"), EndQuery),
    request_body(content = Reason, content_type = "application/json"),
    responses(
        (status = 200, body = crate::EndSessionReport, description = "Ended (or it already was)"),
        (status = 404, body = super::error::ErrorBody, description = "No such session"),
        (status = 409, body = super::error::ErrorBody, description = "Its owner still heartbeats: retry with ?force=true"),
        (status = 403, body = super::error::ErrorBody, description = "Read-only access, or another site"),
    ))]
pub(crate) async fn end(
    State(web): State<Shared>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Answer {
    let q: EndQuery = query(q)?;
    let id = session_id(&web, &id).await?;
    let view = SessionView::new(
        web.manager.session(id).await?,
        chrono::Utc::now(),
        web.options.stale_after,
    );
    if view.alive && !q.force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "session {id} is {} and its owner heartbeated {} ms ago: its live context \
                 windows would not be saved; let its owner end it, or retry with ?force=true",
                view.status,
                view.heartbeat_age_ms.unwrap_or(0)
            ),
        ));
    }
    let report = web
        .manager
        .end_session_by(id, &web.operator(reason_of(&body)?))
        .await?;
    Ok(json(report))
}

#[utoipa::path(post, path = "/api/v1/sessions/{id}/pause", tag = "actions",
    params(("id" = String, Path, description = "A session id or unique prefix")),
    request_body(content = Reason, content_type = "application/json"),
    responses(
        (status = 200, body = SessionView, description = "Paused (or it already was)"),
        (status = 404, body = super::error::ErrorBody, description = "No such session"),
        (status = 409, body = super::error::ErrorBody, description = "Not open"),
    ))]
pub(crate) async fn pause(state: State<Shared>, id: Path<String>, body: Bytes) -> Answer {
    set_paused(state, id, body, true).await
}

#[utoipa::path(post, path = "/api/v1/sessions/{id}/unpause", tag = "actions",
    params(("id" = String, Path, description = "A session id or unique prefix")),
    request_body(content = Reason, content_type = "application/json"),
    responses(
        (status = 200, body = SessionView, description = "Active (or it already was)"),
        (status = 404, body = super::error::ErrorBody, description = "No such session"),
        (status = 409, body = super::error::ErrorBody, description = "Not open"),
    ))]
pub(crate) async fn unpause(state: State<Shared>, id: Path<String>, body: Bytes) -> Answer {
    set_paused(state, id, body, false).await
}

async fn set_paused(
    State(web): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
    pause: bool,
) -> Answer {
    let id = session_id(&web, &id).await?;
    let operator = web.operator(reason_of(&body)?);
    match pause {
        true => web.manager.pause_session_by(id, &operator).await?,
        false => web.manager.unpause_session_by(id, &operator).await?,
    }
    let info = web.manager.session(id).await?;
    Ok(json(SessionView::new(
        info,
        chrono::Utc::now(),
        web.options.stale_after,
    )))
}

/// How an agent finished.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct Finish {
    /// Set when it failed: why.
    pub failed: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/agents/{id}/finish", tag = "actions",
    params(("id" = Uuid, Path, description = "The agent's id")),
    request_body(content = Finish, content_type = "application/json"),
    responses(
        (status = 200, body = crate::FinishReport, description = "Finished (or it already was); its locks released"),
        (status = 400, body = super::error::ErrorBody, description = "Not an agent id"),
        (status = 404, body = super::error::ErrorBody, description = "No such agent"),
        (status = 409, body = super::error::ErrorBody, description = "It was cancelled when its session ended"),
    ))]
pub(crate) async fn finish(
    State(web): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let id = Uuid::parse_str(id.trim())
        .map_err(|_| ApiError::invalid("agent id", format!("{id:?} is not a UUID")))?;
    let finish: Finish = self::body(&body)?;
    let outcome = match finish.failed.map(|r| r.trim().to_owned()) {
        Some(reason) if reason.is_empty() => {
            return Err(ApiError::invalid(
                "failed",
                "a failure needs its reason; leave `failed` out for a completed agent",
            ))
        }
        Some(reason) => AgentOutcome::Failed { reason },
        None => AgentOutcome::Completed,
    };
    Ok(json(web.manager.finish_agent(id, outcome).await?))
}

#[utoipa::path(get, path = "/api/v1/locks", tag = "locks", params(LocksQuery),
    responses(
        (status = 200, body = crate::views::LocksPage, description = "A page of locks, newest grant first"),
        (status = 400, body = super::error::ErrorBody, description = "A parameter is invalid"),
    ))]
pub(crate) async fn locks(State(web): State<Shared>, RawQuery(q): RawQuery) -> Answer {
    let q: LocksQuery = query(q)?;
    Ok(json(web.views().locks(&q).await?))
}

#[utoipa::path(post, path = "/api/v1/locks/{id}/release", tag = "actions",
    params(("id" = String, Path, description = "A lock id or unique prefix")),
    request_body(content = Reason, content_type = "application/json"),
    responses(
        (status = 200, body = LockView, description = "Released (or it already was)"),
        (status = 400, body = super::error::ErrorBody, description = "No reason given, or not a lock id"),
        (status = 404, body = super::error::ErrorBody, description = "No such lock"),
    ))]
pub(crate) async fn release(
    State(web): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let Some(reason) = reason_of(&body)? else {
        return Err(ApiError::invalid(
            "reason",
            "a reason is required: send {\"reason\": \"…\"}",
        ));
    };
    let id = web.manager.find_lock(&id).await?;
    web.manager
        .release_lock_by(id, &web.operator(Some(reason)))
        .await?;
    let page = web
        .views()
        .locks(&LocksQuery {
            held: Some(false),
            q: Some(id.to_string()),
            limit: Some(1),
            ..LocksQuery::default()
        })
        .await?;
    match page.locks.into_iter().next() {
        Some(lock) => Ok(json(lock)),
        None => Err(Error::LockNotFound(id).into()),
    }
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, body = crate::views::AuditPage, description = "A page of the audit log"),
        (status = 400, body = super::error::ErrorBody, description = "A parameter is invalid"),
        (status = 410, body = super::error::ErrorBody, description = "Rows after `after` were pruned"),
    ))]
pub(crate) async fn audit(State(web): State<Shared>, RawQuery(q): RawQuery) -> Answer {
    let q: AuditQuery = query(q)?;
    Ok(json(web.views().audit(&q).await?))
}

#[utoipa::path(get, path = "/api/v1/activity", tag = "sessions",
    responses((status = 200, body = crate::views::Activity, description = "Ends and lock waits per minute over the last hour")))]
pub(crate) async fn activity(State(web): State<Shared>) -> Answer {
    Ok(json(web.views().activity().await?))
}

/// `?stale_after=5m`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecoverQuery {
    /// Interrupt open sessions silent for longer than this (`30s`, `5m`);
    /// default: the dashboard's stale threshold.
    pub stale_after: Option<String>,
}

/// A duration such as `30s`, `5m` or `7d`, naming `field` when it is not.
pub(crate) fn duration(field: &str, text: &str) -> Result<Duration, ApiError> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if !d.is_zero() && d <= crate::MAX_ARGUMENT_DURATION => Ok(d),
        Ok(_) => Err(ApiError::invalid(
            field,
            format!(
                "{text:?} must be above zero and at most {:?}",
                crate::MAX_ARGUMENT_DURATION
            ),
        )),
        Err(_) => Err(ApiError::invalid(
            field,
            format!("{text:?} is not a duration such as 30s, 5m or 7d"),
        )),
    }
}

#[utoipa::path(post, path = "/api/v1/recover", tag = "actions", params(RecoverQuery),
    request_body(content = Reason, content_type = "application/json"),
    responses(
        (status = 200, body = crate::RecoveryReport, description = "The sessions interrupted"),
        (status = 400, body = super::error::ErrorBody, description = "Not a duration"),
    ))]
pub(crate) async fn recover(
    State(web): State<Shared>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Answer {
    let q: RecoverQuery = query(q)?;
    let stale_after = match q.stale_after.as_deref() {
        Some(text) => duration("stale_after", text)?,
        None => web.options.stale_after,
    };
    let operator = web.operator(reason_of(&body)?);
    Ok(json(
        web.manager.recover_stale_by(stale_after, &operator).await?,
    ))
}

/// What a prune deletes. Ages are durations such as `30d`; the archive is
/// not offered over HTTP (it writes a file on the server).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub(crate) struct PruneRequest {
    /// Delete sessions ended longer ago than this, whole.
    pub completed_after: Option<String>,
    /// Clear the saved context of sessions ended longer ago than this.
    pub context_after: Option<String>,
    /// Delete audit rows older than this.
    pub audit_after: Option<String>,
    /// Keep the newest N ended sessions whatever their age.
    pub keep_last: Option<u64>,
    /// Sessions per transaction (default 1 000).
    pub batch: Option<u32>,
    /// Count only, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[utoipa::path(post, path = "/api/v1/prune", tag = "actions",
    request_body(content = PruneRequest, content_type = "application/json"),
    responses(
        (status = 200, body = crate::PruneReport, description = "What was (or with dry_run would be) deleted"),
        (status = 400, body = super::error::ErrorBody, description = "An invalid age or batch"),
        (status = 409, body = super::error::ErrorBody, description = "Another prune is under way"),
    ))]
pub(crate) async fn prune(State(web): State<Shared>, body: Bytes) -> Answer {
    let r: PruneRequest = self::body(&body)?;
    let age = |field: &str, v: &Option<String>| -> Result<Option<Duration>, ApiError> {
        v.as_deref().map(|t| duration(field, t)).transpose()
    };
    let policy = RetentionPolicy {
        completed_after: age("completed_after", &r.completed_after)?,
        context_after: age("context_after", &r.context_after)?,
        audit_after: age("audit_after", &r.audit_after)?,
        keep_last: r.keep_last,
        batch: r.batch.unwrap_or(RetentionPolicy::default().batch),
        archive: None,
    };
    let report = match r.dry_run {
        true => web.manager.prune_dry_run(&policy).await?,
        false => web.manager.prune(&policy).await?,
    };
    Ok(json(report))
}

/// `?after=SEQ`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct EventsQuery {
    after: Option<i64>,
}

/// The change feed as Server-Sent Events: each event's id is its seq, so a
/// browser that reconnects resumes after the last one it got.
pub(crate) async fn events(
    State(web): State<Shared>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let q: EventsQuery = query(q)?;
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let after = resumed.or(q.after);
    if let Some(after) = after.filter(|a| *a < 0) {
        return Err(ApiError::invalid("after", format!("{after} is negative")));
    }
    let options = WatchOptions {
        after,
        ..WatchOptions::default()
    };
    let feed = web
        .manager
        .watch(options)
        .map(|item| {
            Ok(match item {
                Ok(record) => Event::default()
                    .id(record.seq.to_string())
                    .event("audit")
                    .json_data(&record)
                    .unwrap_or_else(|_| {
                        Event::default()
                            .event("feed-error")
                            .data("an event could not be encoded")
                    }),
                // Rows after the browser's last event were pruned: told, and
                // its next reconnection resumes after the horizon (the feed
                // ends here).
                Err(Error::Compacted {
                    compacted_through, ..
                }) => Event::default()
                    .id(compacted_through.to_string())
                    .event("compacted")
                    .data(compacted_through.to_string()),
                // A read failed; the feed retries by itself.
                Err(e) => Event::default().event("feed-error").data(e.to_string()),
            })
        })
        .take_until(web.stopped());
    Ok(Sse::new(feed).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

pub(crate) async fn metrics(State(web): State<Shared>) -> Answer {
    let Some(prometheus) = &web.options.metrics else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are not exported here (WebOptions::metrics is not set)",
        ));
    };
    web.manager.record_store_gauges().await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus.render(),
    )
        .into_response())
}
