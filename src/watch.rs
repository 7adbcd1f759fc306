//! Watching the store: the audit log as an ordered, resumable change feed.
//!
//! # Why `seq` order is commit order
//!
//! Every audit row gets `seq` from the database when it is inserted (SQLite
//! `AUTOINCREMENT`, a PostgreSQL identity, MariaDB `AUTO_INCREMENT`). On
//! their own, those would be handed out in insert order, not commit order:
//! on the servers a transaction that took 11 may commit after one that took
//! 12, and a reader that delivered 12 and moved its cursor past it would
//! never see 11. So appends are serialized, and kept short:
//!
//! - every audit append is the last work of its transaction: it takes the
//!   audit log's turn (`db::audit_turn`: on the servers it locks the one
//!   `audit_head` row, `FOR UPDATE`), inserts its row, and commits;
//! - the next append waits for that lock, so it takes its `seq` only once
//!   the one before has committed or rolled back;
//! - hence, whenever a reader sees `seq` n, every committed row below n is
//!   visible too, and a gap below n is a rolled-back append that stays a
//!   gap. Asking for `seq > cursor` never misses a row, on any backend.
//!
//! The lock is never held across a wait for another transaction: by the
//! time an end takes it, it already holds its session's row and has done
//! the rest of its work. An end blocked on one session's
//! row has not reached the lock, so other sessions' ends commit, and are
//! delivered, meanwhile. On SQLite, `BEGIN IMMEDIATE` already serializes
//! every write transaction, so the turn takes no statement.
//!
//! What it costs on the servers: one primary-key read per audit-writing
//! transaction, and the appends of concurrent ends (one insert and the
//! commit each) run one after another. `docs/performance.md` has the figures.
//!
//! The other way, delivering only below the oldest in-flight transaction's
//! horizon, needs each backend's transaction ids (`pg_snapshot_xmin` has no
//! MariaDB counterpart), so it would be a second code path per backend.
//!
//! # Delivery
//!
//! A feed reads pages of at most `Config::watch_page_size` rows in `seq`
//! order and holds no connection between them, so a slow consumer costs one
//! page of memory and an idle feed costs nothing from the pool. Once caught
//! up it waits for a wake-up: at once for this manager's own writes, by
//! `NOTIFY` from other instances on PostgreSQL, and otherwise for
//! `Config::watch_poll_interval`.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::watch;
use uuid::Uuid;

use entity::audit_log;

use crate::query::AuditRecord;
use crate::{AuditEvent, Error, Result, SessionManager};

/// Which audit events [`SessionManager::watch`] delivers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// Deliver events with `seq` greater than this one: the `seq` of the last
    /// event the consumer handled. `Some(0)` starts from the first event.
    /// Below the compaction horizon (a prune deleted rows after it), the
    /// feed yields [`Error::Compacted`] and ends: it never skips silently.
    /// The horizon is the store's, whatever the filters: a feed of one
    /// session below it ends too, even if that session's rows were kept.
    /// `None`: after the newest event committed when the stream is first
    /// polled.
    pub after: Option<i64>,
    /// Only this session's events.
    pub session_id: Option<Uuid>,
    /// Only events of these types (`session_end`, …); empty: every type.
    pub event_types: Vec<String>,
}

impl WatchOptions {
    fn validate(&self) -> Result<()> {
        if let Some(after) = self.after.filter(|after| *after < 0) {
            return Err(Error::InvalidInput {
                field: "after",
                reason: format!("{after} is negative (seq starts at 1; 0 means from the first)"),
            });
        }
        if let Some(id) = self.session_id {
            crate::validate::id("session_id", id)?;
        }
        for event in &self.event_types {
            if AuditEvent::from_name(event).is_none() {
                let known: Vec<_> = AuditEvent::ALL.iter().map(|e| e.as_str()).collect();
                let event = match event.char_indices().nth(64) {
                    Some((end, _)) => format!("{}… ({} bytes)", &event[..end], event.len()),
                    None => event.clone(),
                };
                return Err(Error::InvalidInput {
                    field: "event_types",
                    reason: format!(
                        "{event:?} is not an audit event type; known: {}",
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The feed behind one `watch` stream.
struct Feed {
    manager: SessionManager,
    options: Arc<WatchOptions>,
    /// The `seq` of the last event delivered; `None` until first polled
    /// with `after: None`.
    cursor: Option<i64>,
    page: VecDeque<audit_log::Model>,
    /// Where the cursor goes once `page` is delivered: the newest `seq`
    /// the read saw, when a filtered page held every match up to it.
    caught_up_to: Option<i64>,
    appended: watch::Receiver<u64>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    Running,
    /// The last read failed: wait for a wake-up or a poll interval before
    /// the next.
    Failed,
    Ended,
}

pub(crate) fn watch(
    manager: &SessionManager,
    options: WatchOptions,
) -> impl Stream<Item = Result<AuditRecord>> + Send + 'static {
    let feed = Feed {
        appended: manager.lock_wakers().appended(),
        manager: manager.clone(),
        cursor: options.after,
        options: Arc::new(options),
        page: VecDeque::new(),
        caught_up_to: None,
        state: State::Fresh,
    };
    futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next().await?;
        Some((item, feed))
    })
}

impl Feed {
    /// The next event or error; `None` once the stream has ended.
    async fn next(&mut self) -> Option<Result<AuditRecord>> {
        loop {
            if let Some(row) = self.page.pop_front() {
                // Past it even if it cannot be read: the error
                // (`Error::CorruptRow`) names it.
                self.cursor = Some(row.seq);
                let record = AuditRecord::from_row(row).map_err(Error::from);
                if let Ok(record) = &record {
                    crate::metrics::record_watch_lag(record.event_time);
                }
                return Some(record);
            }
            if let Some(newest) = self.caught_up_to.take() {
                self.cursor = Some(newest);
            }
            match self.state {
                State::Ended => return None,
                State::Fresh => {
                    if let Err(e) = self.options.validate() {
                        self.state = State::Ended;
                        return Some(Err(e));
                    }
                    let manager = &self.manager;
                    if manager.usable().is_ok() {
                        manager
                            .lock_wakers()
                            .ensure_listening(manager.store(), manager.instance_id());
                    }
                    self.state = State::Running;
                }
                State::Failed => {
                    self.wait().await;
                    self.state = State::Running;
                }
                State::Running => {}
            }
            // Marked before the read: a commit after it wakes the wait below.
            self.appended.borrow_and_update();
            match self.read().await {
                Ok(true) => {}
                Ok(false) => self.wait().await,
                Err(e) => {
                    self.state = match e {
                        Error::ManagerClosed | Error::Compacted { .. } => State::Ended,
                        _ => State::Failed,
                    };
                    return Some(Err(e));
                }
            }
        }
    }

    fn poll_interval(&self) -> Duration {
        self.manager.config().watch_poll_interval
    }

    /// Reads the next page after the cursor; whether it had any rows.
    ///
    /// The read runs in a task of its own: a consumer that stops polling
    /// midway (a `select!`, a timeout) never keeps its connection from the
    /// pool, since the task finishes the read and gives the connection back.
    async fn read(&mut self) -> Result<bool> {
        self.manager.usable()?;
        let read = read_page(
            self.manager.connection().clone(),
            self.cursor,
            self.options.clone(),
            self.manager.config().watch_page_size,
        );
        let page = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => match runtime.spawn(read).await {
                Ok(page) => page,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(_) => Err(Error::ManagerClosed),
            },
            Err(_) => read.await,
        }?;
        self.cursor = Some(page.after);
        self.caught_up_to = page.caught_up_to;
        self.page.extend(page.rows);
        Ok(!self.page.is_empty())
    }

    /// Waits for a wake-up or the poll interval, whichever comes first.
    async fn wait(&mut self) {
        let poll = self.poll_interval();
        if let Ok(Err(_)) = tokio::time::timeout(poll, self.appended.changed()).await {
            // No sender left (never while the manager's wakers live): poll.
            tokio::time::sleep(poll).await;
        }
    }
}

/// What one read found: the cursor it read after, the rows after it, and
/// for a filtered read that found every match, the newest `seq` it covered.
struct Page {
    after: i64,
    rows: Vec<audit_log::Model>,
    caught_up_to: Option<i64>,
}

/// The newest `seq` committed, 0 for an empty log.
async fn newest_seq(db: &DatabaseConnection) -> Result<i64> {
    let newest: Option<Option<i64>> = audit_log::Entity::find()
        .select_only()
        .column_as(audit_log::Column::Seq.max(), "newest")
        .into_tuple()
        .one(db)
        .await?;
    Ok(newest.flatten().unwrap_or(0))
}

/// The matching rows after `cursor` in `seq` order, at most `limit`; with no
/// cursor, none, after the newest row.
///
/// A filtered read first takes the newest `seq` and reads only up to it:
/// when fewer than `limit` rows match, nothing else up to it can (seq order
/// is commit order), so the cursor moves there, and the next read starts
/// from the rows committed since rather than from the last match.
async fn read_page(
    db: DatabaseConnection,
    cursor: Option<i64>,
    options: Arc<WatchOptions>,
    limit: u64,
) -> Result<Page> {
    let Some(after) = cursor else {
        let horizon = crate::retention::horizon(&db).await?.unwrap_or(0);
        return Ok(Page {
            after: newest_seq(&db).await?.max(horizon),
            rows: Vec::new(),
            caught_up_to: None,
        });
    };
    let filtered = options.session_id.is_some() || !options.event_types.is_empty();
    let newest = match filtered {
        true => Some(newest_seq(&db).await?),
        false => None,
    };
    let mut query = audit_log::Entity::find().filter(audit_log::Column::Seq.gt(after));
    if let Some(newest) = newest {
        query = query.filter(audit_log::Column::Seq.lte(newest));
    }
    if let Some(session_id) = options.session_id {
        query = query.filter(audit_log::Column::SessionId.eq(session_id.to_string()));
    }
    if !options.event_types.is_empty() {
        query = query.filter(audit_log::Column::EventType.is_in(&options.event_types));
    }
    let rows = query
        .order_by_asc(audit_log::Column::Seq)
        .limit(limit)
        .all(&db)
        .await?;
    // After the rows: a prune that deleted any row after `after` before
    // they were read had raised the horizon above it first.
    crate::retention::check_horizon(&db, after).await?;
    let whole = (rows.len() as u64) < limit;
    Ok(Page {
        after,
        caught_up_to: newest.filter(|_| whole),
        rows,
    })
}
