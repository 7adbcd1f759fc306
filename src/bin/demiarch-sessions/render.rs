//! The library's views as text for people: the same documents `--json`
//! prints, laid out as tables.
use chrono::{DateTime, Utc};
use demiarch_sessions::views::{
    AuditPage, LockState, LockView, LocksPage, QueueView, SessionDetail, SessionView, SessionsPage,
    WaiterView,
};
use demiarch_sessions::{CorruptRow, SessionStatus};

use crate::output::{self, count, short};

fn open(status: SessionStatus) -> bool {
    matches!(status, SessionStatus::Active | SessionStatus::Paused)
}

/// Rows the library could not read, named, after a list.
fn corrupt(rows: &[CorruptRow]) -> String {
    let mut text = String::new();
    for row in rows {
        text.push_str(&format!("unreadable row: {row}\n"));
    }
    text
}

/// `4s ago`, `4s ago (stale)`, `never`, or `-` once closed.
fn heartbeat(s: &SessionView, now: DateTime<Utc>) -> String {
    let stale = if s.stale { " (stale)" } else { "" };
    match (open(s.status), s.last_heartbeat_at) {
        (true, Some(at)) => format!("{}{stale}", output::ago(at, now)),
        (true, None) => format!("never{stale}"),
        (false, _) => "-".into(),
    }
}

/// The page as a table; `status` is the filter it was read with, named when
/// nothing matches it.
pub fn sessions(
    page: &SessionsPage,
    status: Option<SessionStatus>,
    url: &str,
    limit: u64,
) -> String {
    let c = &page.counts;
    let mut text = format!(
        "{} active, {} paused, {} interrupted, {} completed\n",
        c.active, c.paused, c.interrupted, c.completed
    );
    if page.sessions.is_empty() {
        text.push_str(&match (c.total(), status) {
            (0, _) => {
                format!("No sessions in {url}. Run `demiarch-sessions demo` to create one.\n")
            }
            (_, Some(status)) => format!("No {status} sessions.\n"),
            (_, None) => "No sessions match.\n".to_owned(),
        });
        text.push_str(&corrupt(&page.corrupt));
        return text;
    }
    let mut table = output::table(["ID", "STATUS", "STARTED", "TOOK", "HEARTBEAT"]);
    for s in &page.sessions {
        table.add_row(vec![
            s.id.to_string(),
            s.status.to_string(),
            output::time_ago(s.started_at, page.now),
            s.completed_at
                .map(|at| output::between(s.started_at, at))
                .unwrap_or_else(|| "-".into()),
            heartbeat(s, page.now),
        ]);
    }
    text.push_str(&output::render(&table));
    text.push('\n');
    text.push_str(&corrupt(&page.corrupt));
    if page.next_cursor.is_some() {
        text.push_str(&format!("(the newest {limit} shown; --limit shows more)\n"));
    }
    text
}

/// `4s ago (owner alive)` or `10m ago (owner silent: …)`.
fn liveness(s: &SessionView, now: DateTime<Utc>) -> String {
    match s.last_heartbeat_at {
        Some(at) if s.alive => format!("{} (owner alive)", output::ago(at, now)),
        Some(at) => format!(
            "{} (owner silent: `demiarch-sessions recover` interrupts it)",
            output::ago(at, now)
        ),
        None => "never".into(),
    }
}

fn context_line(d: &SessionDetail) -> String {
    let context = &d.context;
    if let Some(error) = &context.error {
        return format!("unreadable: {error}");
    }
    if let Some(at) = d.session.context_cleared_at {
        return format!(
            "cleared by a prune at {} (the session was ended before its --context-after)",
            output::time(at)
        );
    }
    if !context.saved {
        return match d.session.status {
            SessionStatus::Interrupted => {
                "none saved (interrupted before it could save its context)".into()
            }
            _ => "not saved yet (its live windows are with the process that owns it)".into(),
        };
    }
    if context.windows == 0 {
        return "saved, no windows".into();
    }
    format!(
        "saved, {} ({}), {} bytes",
        count(context.windows as u64, "window"),
        context.keys.join(", "),
        context.bytes
    )
}

/// `3`, or `the newest 1000` when a section hit its limit.
fn shown(n: usize) -> String {
    match n as u64 >= demiarch_sessions::views::SESSION_DETAIL_LIMIT {
        true => format!("the newest {n}"),
        false => n.to_string(),
    }
}

pub fn session(d: &SessionDetail) -> String {
    let s = &d.session;
    let now = d.now;
    let mut rows = vec![
        ("Session", s.id.to_string()),
        ("Status", s.status.to_string()),
        ("Started", output::time_ago(s.started_at, now)),
    ];
    if let Some(at) = s.completed_at {
        rows.push(("Ended", output::time_ago(at, now)));
        rows.push(("Took", output::between(s.started_at, at)));
    } else if s.status == SessionStatus::Interrupted {
        rows.push(("Interrupted", output::time_ago(s.updated_at, now)));
    } else {
        rows.push(("Updated", output::time_ago(s.updated_at, now)));
    }
    if let Some(owner) = &s.owner_instance {
        rows.push(("Owner", owner.clone()));
    }
    if open(s.status) {
        rows.push(("Last heartbeat", liveness(s, now)));
    }
    rows.push(("Context", context_line(d)));
    let mut text = output::fields(rows);
    text.push_str("\n\n");

    text.push_str(&format!("Agents ({})\n", d.agents.len()));
    if !d.agents.is_empty() {
        let mut table = output::table(["AGENT", "TYPE", "STATUS", "STARTED", "ENDED"]);
        for a in &d.agents {
            table.add_row(vec![
                short(a.id),
                a.agent_type.clone(),
                a.status.to_string(),
                output::time_ago(a.started_at, now),
                a.completed_at
                    .map(|at| output::time_ago(at, now))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        text.push_str(&output::render(&table));
        text.push('\n');
    }

    text.push_str(&format!("\nLocks ({})\n", shown(d.locks.len())));
    if !d.locks.is_empty() {
        text.push_str(&output::render(&lock_table(&d.locks, now, false, true)));
        text.push('\n');
    }

    text.push_str(&format!("\nAudit trail ({})\n", shown(d.audit.len())));
    if !d.audit.is_empty() {
        let mut table = output::table(["SEQ", "TIME", "EVENT", "DETAILS"]);
        for event in &d.audit {
            table.add_row(vec![
                event.seq.to_string(),
                output::time_ago(event.event_time, now),
                event.event_type.to_string(),
                output::details(&event.details),
            ]);
        }
        text.push_str(&output::render(&table));
        text.push('\n');
    }
    text.push_str(&corrupt(&d.corrupt));
    text
}

/// `coder 3f2a9c1d`, or the short id alone when the type is unknown.
pub fn agent_label(id: uuid::Uuid, agent_type: Option<&str>) -> String {
    match agent_type {
        Some(kind) => format!("{kind} {}", short(id)),
        None => short(id),
    }
}

fn lock_state(l: &LockView, now: DateTime<Utc>) -> String {
    match (l.state, l.released_at, l.expires_at) {
        (_, Some(at), _) => format!(
            "released {} ({})",
            output::ago(at, now),
            l.release_reason
                .map(|r| r.to_string())
                .unwrap_or_else(|| "unknown reason".into())
        ),
        (LockState::Expired, None, Some(exp)) => format!(
            "held, expired {} (sweep releases it)",
            output::ago(exp, now)
        ),
        (_, None, Some(exp)) => format!("held, expires {}", output::ago(exp, now)),
        (_, None, None) => "held".into(),
    }
}

/// `3 (next: reviewer 3f2a9c1d)`, or `-` when nobody waits.
fn queue_cell(queue: &[WaiterView]) -> String {
    match queue.first() {
        Some(next) => format!(
            "{} (next: {})",
            queue.len(),
            agent_label(next.agent_id, next.agent_type.as_deref())
        ),
        None => "-".into(),
    }
}

/// The locks as a table; with `with_waiters`, a WAITERS column shows who
/// waits for each (left out where nobody can wait, as after a session's end).
pub fn lock_table(
    locks: &[LockView],
    now: DateTime<Utc>,
    with_session: bool,
    with_waiters: bool,
) -> comfy_table::Table {
    let mut header = vec!["LOCK", "TOKEN", "RESOURCE"];
    if with_session {
        header.push("SESSION");
    }
    header.extend(["AGENT", "ACQUIRED", "STATE"]);
    if with_waiters {
        header.push("WAITERS");
    }
    let mut table = output::table(header);
    for l in locks {
        let mut row = vec![
            short(l.id),
            l.fencing_token.to_string(),
            format!("{}/{}", l.resource_type, l.resource_key),
        ];
        if with_session {
            row.push(short(l.session_id));
        }
        row.extend([
            agent_label(l.agent_id, l.agent_type.as_deref()),
            output::time_ago(l.acquired_at, now),
            lock_state(l, now),
        ]);
        if with_waiters {
            row.push(queue_cell(&l.waiters));
        }
        table.add_row(row);
    }
    table
}

pub fn locks(page: &LocksPage, held: bool, whose: Option<uuid::Uuid>, limit: u64) -> String {
    if page.locks.is_empty() {
        let which = if held { " held" } else { "" };
        let whose = whose
            .map(|id| format!(" by session {}", short(id)))
            .unwrap_or_default();
        return format!("No locks{which}{whose}.\n{}", corrupt(&page.corrupt));
    }
    let mut text = output::render(&lock_table(&page.locks, page.now, true, true));
    text.push('\n');
    text.push_str(&corrupt(&page.corrupt));
    if page.next_cursor.is_some() {
        text.push_str(&format!("(the newest {limit} shown; --limit shows more)\n"));
    }
    text
}

/// The page's rows oldest first, as a log reads.
pub fn audit(page: &AuditPage, now: DateTime<Utc>) -> String {
    if page.events.is_empty() {
        return format!("No audit events match.\n{}", corrupt(&page.corrupt));
    }
    let mut table = output::table(["SEQ", "TIME", "EVENT", "SESSION", "DETAILS"]);
    let mut events: Vec<_> = page.events.iter().collect();
    events.sort_by_key(|e| e.seq);
    for e in events {
        table.add_row(vec![
            e.seq.to_string(),
            output::time_ago(e.event_time, now),
            e.event_type.to_string(),
            e.session_id.map(short).unwrap_or_else(|| "-".into()),
            output::details(&e.details),
        ]);
    }
    let mut text = output::render(&table);
    text.push('\n');
    text.push_str(&corrupt(&page.corrupt));
    text
}

/// A resource's holder and queue, next in line first.
pub fn queue(q: &QueueView) -> String {
    let resource = format!("{}/{}", q.resource_type, q.resource_key);
    let held = match &q.holder {
        Some(h) => format!(
            "held by {}, fencing token {}",
            agent_label(h.agent_id, h.agent_type.as_deref()),
            h.fencing_token
        ),
        None => "not held".into(),
    };
    if q.waiters.is_empty() {
        return format!("Nobody waits for {resource} ({held}).\n");
    }
    let verb = if q.waiters.len() == 1 {
        "waits"
    } else {
        "wait"
    };
    let mut text = format!(
        "{} {verb} for {resource} ({held}), next in line first.\n",
        count(q.waiters.len() as u64, "agent")
    );
    let mut table = output::table(["POSITION", "AGENT", "TYPE", "SESSION", "WAITING SINCE"]);
    for w in &q.waiters {
        table.add_row(vec![
            w.position.to_string(),
            short(w.agent_id),
            w.agent_type.clone().unwrap_or_else(|| "-".into()),
            short(w.session_id),
            output::time_ago(w.since, q.now),
        ]);
    }
    text.push_str(&output::render(&table));
    text.push('\n');
    text
}
