//! Retention: ended sessions deleted, old saved contexts cleared and the
//! audit log compacted, in short batches, so the store stops growing.
//!
//! A prune runs its steps in this order, each in batches of at most
//! [`RetentionPolicy::batch`] sessions or audit rows, one transaction per
//! batch:
//!
//! 1. sessions ended (`completed` or `interrupted`) before
//!    `completed_after`: each batch locks the session rows first, as an end
//!    does, then deletes their locks, waiters, agents and rows, so a session
//!    goes whole or not at all;
//! 2. saved contexts of sessions ended before `context_after`: set to NULL,
//!    `context_cleared_at` set;
//! 3. audit rows older than `audit_after`, oldest `seq` first, except those
//!    of open sessions: each batch raises the compaction horizon
//!    (`retention.compacted_through`) to its highest `seq` and deletes the
//!    rows;
//! 4. the audit log says what the prune did: a `sessions_pruned` row with
//!    its counts, and an `audit_compacted` row naming the new horizon.
//!    A prune stopped part-way by a failure or a crash leaves no such row;
//!    its archive, if any, holds what went.
//!
//! Open (`active` or `paused`) sessions, their agents, locks and audit rows
//! are never touched. One prune at a time works on a store: it holds a
//! lease in the `retention` row, renewed before every batch, that other
//! prunes (of any instance) meet as [`Error::PruneInProgress`].
//!
//! On SQLite a prune that freed pages hands them back to the file system
//! (`PRAGMA incremental_vacuum`) where the file allows it: stores created by
//! this library are `auto_vacuum = INCREMENTAL`; in older files the freed
//! pages are reused for new rows instead.
mod archive;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{DynIden, Expr, IntoIden, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Select,
};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use entity::{
    agent_executions, audit_log, global_sessions, lock_resources, lock_waiters, resource_locks,
    retention,
};

use archive::Archive;
pub use archive::ArchiveLine;

use crate::audit::{self, AuditEvent};
use crate::db::{self, millis};
use crate::locks::IDS_PER_STATEMENT;
use crate::status::SessionStatus;
use crate::{validate, Error, Result};

/// The most sessions, contexts or audit rows one prune transaction takes.
pub const MAX_PRUNE_BATCH: u32 = 10_000;

/// What a prune deletes or clears. `Default` keeps everything.
///
/// Ages count from when a session ended (its `updated_at`, which nothing
/// changes once it has ended) and from an audit row's `event_time`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Sessions `completed` or `interrupted` longer ago than this are
    /// deleted, with their agents, locks (released by their end, or by a
    /// sweep) and waiter rows.
    pub completed_after: Option<Duration>,
    /// Sessions ended longer ago than this keep their row, but their saved
    /// context is cleared: [`SessionManager::session_context`](crate::SessionManager::session_context)
    /// then returns no windows and [`SessionInfo::context_cleared_at`](crate::SessionInfo::context_cleared_at)
    /// says when.
    pub context_after: Option<Duration>,
    /// Audit rows older than this are deleted, oldest first, except those
    /// of open sessions; the feed reports the gap
    /// ([`Error::Compacted`]).
    pub audit_after: Option<Duration>,
    /// The most recently ended N sessions are kept whole (row and context)
    /// whatever their age; sessions that ended at the same microsecond as
    /// the Nth are kept too.
    pub keep_last: Option<u64>,
    /// Sessions, contexts or audit rows per transaction: 1 to
    /// [`MAX_PRUNE_BATCH`], 1 000 by default. An end, acquire or recovery
    /// that meets a prune waits for at most one batch.
    pub batch: u32,
    /// Before anything is deleted or cleared, it is appended to this file as
    /// JSON lines ([`ArchiveLine`]) and flushed to disk. If the file cannot
    /// be written, that batch deletes nothing and the prune fails naming it.
    pub archive: Option<PathBuf>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            completed_after: None,
            context_after: None,
            audit_after: None,
            keep_last: None,
            batch: 1_000,
            archive: None,
        }
    }
}

impl RetentionPolicy {
    /// Refuses, naming the field, an age over ten years
    /// ([`MAX_ARGUMENT_DURATION`](crate::MAX_ARGUMENT_DURATION)), a `batch`
    /// of zero or over [`MAX_PRUNE_BATCH`], a `keep_last` over `i64::MAX`,
    /// and an `archive` that is a directory or whose directory does not
    /// exist.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (field, age) in [
            ("completed_after", self.completed_after),
            ("context_after", self.context_after),
            ("audit_after", self.audit_after),
        ] {
            if let Some(age) = age {
                validate::duration(field, age, true)?;
            }
        }
        if !(1..=MAX_PRUNE_BATCH).contains(&self.batch) {
            return Err(Error::InvalidInput {
                field: "batch",
                reason: format!("{} is not between 1 and {MAX_PRUNE_BATCH}", self.batch),
            });
        }
        if let Some(n) = self.keep_last.filter(|n| i64::try_from(*n).is_err()) {
            return Err(Error::InvalidInput {
                field: "keep_last",
                reason: format!("{n} is over {}", i64::MAX),
            });
        }
        if let Some(path) = &self.archive {
            let reason = if path.is_dir() {
                Some(format!("{} is a directory", path.display()))
            } else {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => std::path::Path::new("."),
                };
                (!dir.is_dir()).then(|| {
                    format!(
                        "{}: the directory {} does not exist",
                        path.display(),
                        dir.display()
                    )
                })
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidInput {
                    field: "archive",
                    reason,
                });
            }
        }
        Ok(())
    }
}

/// What a prune did, or with [`SessionManager::prune_dry_run`](crate::SessionManager::prune_dry_run)
/// would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct PruneReport {
    pub sessions_deleted: u64,
    pub contexts_cleared: u64,
    pub agents_deleted: u64,
    pub locks_deleted: u64,
    pub waiters_deleted: u64,
    pub audit_deleted: u64,
    /// The compaction horizon after the prune: audit rows at or below this
    /// `seq` may be gone. `None` while nothing was ever compacted.
    pub compacted_through: Option<i64>,
    /// Transactions that deleted or cleared something.
    pub batches: u64,
    pub elapsed_ms: u64,
    /// Counted only: nothing was deleted.
    pub dry_run: bool,
}

impl PruneReport {
    /// Whether it deleted or cleared anything.
    pub fn changed_anything(&self) -> bool {
        !self.dry_run && self.sessions_deleted + self.contexts_cleared + self.audit_deleted > 0
    }
}

/// Sessions that ended before `before`.
fn ended_before(before: DateTime<Utc>) -> Select<global_sessions::Entity> {
    global_sessions::Entity::find()
        .filter(global_sessions::Column::Status.is_in(SessionStatus::ended_names()))
        .filter(global_sessions::Column::UpdatedAt.lt(before))
}

/// Sessions whose saved context a prune clears.
fn context_kept_before(before: DateTime<Utc>) -> Select<global_sessions::Entity> {
    ended_before(before)
        .filter(global_sessions::Column::ContextData.is_not_null())
        .filter(global_sessions::Column::ContextClearedAt.is_null())
}

/// Audit rows older than `before` that belong to no open session.
fn audit_before(before: DateTime<Utc>) -> Select<audit_log::Entity> {
    let open = Query::select()
        .column(global_sessions::Column::Id)
        .from(global_sessions::Entity)
        .and_where(global_sessions::Column::Status.is_in(SessionStatus::open_names()))
        .to_owned();
    audit_log::Entity::find()
        .filter(audit_log::Column::EventTime.lt(before))
        .filter(
            Condition::any()
                .add(audit_log::Column::SessionId.is_null())
                .add(audit_log::Column::SessionId.not_in_subquery(open)),
        )
}

/// The ages of a policy as times, on one clock reading.
struct Cutoffs {
    sessions: Option<DateTime<Utc>>,
    contexts: Option<DateTime<Utc>>,
    audit: Option<DateTime<Utc>>,
}

impl Cutoffs {
    async fn of(db: &impl ConnectionTrait, policy: &RetentionPolicy) -> Result<Self> {
        let now = db::now();
        let before = |field, age: Option<Duration>| -> Result<Option<DateTime<Utc>>> {
            age.map(|age| Ok(now - validate::duration(field, age, true)?))
                .transpose()
        };
        let mut cutoffs = Self {
            sessions: before("completed_after", policy.completed_after)?,
            contexts: before("context_after", policy.context_after)?,
            audit: before("audit_after", policy.audit_after)?,
        };
        // The most recent `keep_last` ended sessions stay whole.
        if let Some(n) = policy.keep_last.filter(|n| *n > 0) {
            let nth: Option<DateTime<Utc>> = global_sessions::Entity::find()
                .select_only()
                .column(global_sessions::Column::UpdatedAt)
                .filter(global_sessions::Column::Status.is_in(SessionStatus::ended_names()))
                .order_by_desc(global_sessions::Column::UpdatedAt)
                .offset(n - 1)
                .limit(1)
                .into_tuple()
                .one(db)
                .await?;
            let keep = |cutoff: Option<DateTime<Utc>>| match nth {
                // Fewer than n ended sessions: all kept.
                None => None,
                Some(nth) => cutoff.map(|c| c.min(nth)),
            };
            cutoffs.sessions = keep(cutoffs.sessions);
            cutoffs.contexts = keep(cutoffs.contexts);
        }
        Ok(cutoffs)
    }
}

/// How long a prune's lease lasts without renewal: past it, a prune that
/// died is taken over.
const LEASE: Duration = Duration::from_secs(60);

/// The one-prune-at-a-time lease in the `retention` row.
#[derive(Clone, Copy)]
struct Lease {
    id: Uuid,
}

impl Lease {
    /// Takes the lease, free or expired, or refuses naming its holder.
    async fn claim(store: &db::Store) -> Result<Self> {
        let lease = Self { id: Uuid::new_v4() };
        // Twice: a lease given up between the attempt and the look at its
        // holder is taken on the second.
        for _ in 0..2 {
            // A look first, without a lock: a prune under way is refused at
            // once rather than after its batch releases the row.
            if let Some(held) = held(store).await? {
                return Err(held);
            }
            let txn = db::begin_write(store).await?;
            let taken = lease.extend(&*txn, true).await?;
            txn.commit().await?;
            if taken {
                return Ok(lease);
            }
        }
        Err(held(store).await?.unwrap_or(Error::PruneInProgress {
            pruner: "unknown".into(),
            until: None,
        }))
    }

    /// Opens a batch's transaction, extending the lease by [`LEASE`] in it
    /// first; `Error::PruneInProgress` if another prune took the lease
    /// meanwhile (it had expired).
    async fn begin(&self, store: &db::Store) -> Result<db::WriteTxn> {
        let txn = db::begin_write(store).await?;
        if self.extend(&*txn, false).await? {
            return Ok(txn);
        }
        txn.rollback().await?;
        Err(held(store).await?.unwrap_or(Error::PruneInProgress {
            pruner: "unknown".into(),
            until: None,
        }))
    }

    /// Sets the lease to this prune's until [`LEASE`] from now: when it
    /// holds it, or (`or_take`) when it is free or expired. Whether it did.
    async fn extend(&self, txn: &impl ConnectionTrait, or_take: bool) -> Result<bool> {
        let now = db::now();
        let until = now + chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::MAX);
        let mine = retention::Column::Pruner.eq(self.id.to_string());
        let mut holder = Condition::any().add(mine);
        if or_take {
            holder = holder
                .add(retention::Column::PrunerUntil.is_null())
                .add(retention::Column::PrunerUntil.lt(now));
        }
        let updated = retention::Entity::update_many()
            .col_expr(retention::Column::Pruner, Expr::value(self.id.to_string()))
            .col_expr(retention::Column::PrunerUntil, Expr::value(until))
            .filter(retention::Column::Id.eq(1))
            .filter(holder)
            .exec(txn)
            .await?
            .rows_affected;
        Ok(updated == 1)
    }

    /// Gives the lease up; `finished` records the time of this prune.
    async fn release(self, store: &db::Store, finished: bool) -> Result<()> {
        let txn = db::begin_write(store).await?;
        let mut update = retention::Entity::update_many()
            .col_expr(
                retention::Column::Pruner,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                retention::Column::PrunerUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            );
        if finished {
            update = update.col_expr(retention::Column::LastPruneAt, Expr::value(db::now()));
        }
        update
            .filter(retention::Column::Id.eq(1))
            .filter(retention::Column::Pruner.eq(self.id.to_string()))
            .exec(&*txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }
}

/// The prune lease, when another prune holds it and it has not expired.
async fn held(store: &db::Store) -> Result<Option<Error>> {
    let row = retention::Entity::find_by_id(1)
        .one(&**store)
        .await?
        .ok_or_else(no_retention_row)?;
    Ok(match (row.pruner, row.pruner_until) {
        (Some(pruner), Some(until)) if until.to_utc() >= db::now() => {
            Some(Error::PruneInProgress {
                pruner,
                until: Some(until.to_utc()),
            })
        }
        _ => None,
    })
}

fn no_retention_row() -> Error {
    Error::MissingRow { table: "retention" }
}

/// What a prune reports after each batch: its counts so far.
pub(crate) type Progress = Box<dyn Fn(&PruneReport) + Send + Sync>;

/// Runs `policy` on the store, holding the prune lease throughout. Once
/// `stop` turns true, or its sender is gone, no further batch starts.
/// Sessions with a lock released involuntarily within `lock_delay` are
/// kept, since that release still holds the resource off.
///
/// The report counts every batch that committed, also when the prune then
/// failed (the second value).
pub(crate) async fn prune(
    store: &db::Store,
    policy: &RetentionPolicy,
    lock_delay: Duration,
    stop: Option<watch::Receiver<bool>>,
    progress: Option<Progress>,
) -> (PruneReport, Result<()>) {
    let started = Instant::now();
    let mut pruning = Pruning {
        store,
        lease: Lease { id: Uuid::new_v4() },
        batch: u64::from(policy.batch),
        archive: None,
        report: PruneReport::default(),
        stop,
        progress,
    };
    let outcome = pruning.run(policy, lock_delay).await;
    let mut report = pruning.report;
    report.elapsed_ms = millis(started.elapsed());
    if let Ok(horizon) = horizon(&**store).await {
        report.compacted_through = horizon;
    }
    (report, outcome)
}

/// The steps of a prune, in the order they run.
#[derive(Clone, Copy)]
enum Step {
    Sessions,
    Resources,
    Contexts,
    Audit,
}

/// One prune under way: its lease, archive and counts so far.
struct Pruning<'a> {
    store: &'a db::Store,
    lease: Lease,
    batch: u64,
    archive: Option<Archive>,
    report: PruneReport,
    stop: Option<watch::Receiver<bool>>,
    progress: Option<Progress>,
}

impl Pruning<'_> {
    async fn run(&mut self, policy: &RetentionPolicy, lock_delay: Duration) -> Result<()> {
        policy.validate()?;
        self.lease = Lease::claim(self.store).await?;
        let outcome = self.steps(policy, lock_delay).await;
        let finished = outcome.is_ok() && !self.stopped();
        let released = self.lease.release(self.store, finished).await;
        outcome?;
        released?;
        if self.report.changed_anything() {
            // Pages are given back a step at a time; a failure there loses
            // nothing, so it is only logged.
            if let Err(e) = reclaim_pages(self.store, self.stop.as_ref()).await {
                tracing::warn!(error = %e, "could not give freed pages back to the file system");
            }
        }
        Ok(())
    }

    /// Whether the prune was told to stop, or its manager is gone.
    fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(stopping)
    }

    async fn steps(&mut self, policy: &RetentionPolicy, lock_delay: Duration) -> Result<()> {
        if let Some(path) = &policy.archive {
            self.archive = Some(Archive::open(path).await?);
        }
        let mut cutoffs = Cutoffs::of(&**self.store, policy).await?;
        if let (Some(before), false) = (cutoffs.sessions, lock_delay.is_zero()) {
            let delay = chrono::Duration::from_std(lock_delay).unwrap_or(chrono::Duration::MAX);
            cutoffs.sessions = Some(before.min(db::now() - delay));
        }
        if let Some(before) = cutoffs.sessions {
            self.in_batches(Step::Sessions, before).await?;
            self.in_batches(Step::Resources, before).await?;
        }
        if let Some(before) = cutoffs.contexts {
            self.in_batches(Step::Contexts, before).await?;
        }
        if let Some(before) = cutoffs.audit {
            self.in_batches(Step::Audit, before).await?;
        }
        self.record().await
    }

    /// Runs `step` a batch at a time (each renews the lease), until a batch
    /// takes less than a full batch.
    async fn in_batches(&mut self, step: Step, before: DateTime<Utc>) -> Result<()> {
        loop {
            if self.stopped() {
                return Ok(());
            }
            let taken = match step {
                Step::Sessions => self.delete_sessions(before).await?,
                Step::Resources => self.forget_resources(before).await?,
                Step::Contexts => self.clear_contexts(before).await?,
                Step::Audit => self.compact_audit(before).await?,
            };
            if taken > 0 {
                self.report.batches += 1;
                if let Some(progress) = &self.progress {
                    progress(&self.report);
                }
            }
            if taken < self.batch {
                return Ok(());
            }
        }
    }

    /// The ids of the next batch of `sessions`, oldest ended first, their
    /// rows locked as an end locks its session (rows another transaction
    /// holds are left for a later batch).
    async fn take(
        &self,
        txn: &impl ConnectionTrait,
        sessions: Select<global_sessions::Entity>,
    ) -> Result<Vec<String>> {
        Ok(sessions
            .select_only()
            .column(global_sessions::Column::Id)
            .order_by_asc(global_sessions::Column::UpdatedAt)
            .order_by_asc(global_sessions::Column::Id)
            .limit(self.batch)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .into_tuple()
            .all(txn)
            .await?)
    }

    /// One batch of step 1; the number of sessions deleted.
    async fn delete_sessions(&mut self, before: DateTime<Utc>) -> Result<u64> {
        let txn = self.lease.begin(self.store).await?;
        let ids = self.take(&*txn, ended_before(before)).await?;
        if ids.is_empty() {
            txn.rollback().await?;
            return Ok(0);
        }
        if let Some(archive) = &mut self.archive {
            archive_in_chunks(archive, &ids, |chunk| session_lines(&*txn, chunk)).await?;
        }
        let deleted = delete_whole(&*txn, &ids).await;
        let (sessions, agents, locks, waiters) = self.or_unarchive(deleted).await?;
        txn.commit().await?;
        let report = &mut self.report;
        report.sessions_deleted += sessions;
        report.agents_deleted += agents;
        report.locks_deleted += locks;
        report.waiters_deleted += waiters;
        Ok(sessions)
    }

    /// One batch of the turn rows (`lock_resources`) of resources nobody
    /// holds or waits for, and nobody asked for since `before`; the number
    /// deleted. A resource asked for again gets a new row; its fencing
    /// tokens come from the store-wide source, so they still only grow.
    async fn forget_resources(&mut self, before: DateTime<Utc>) -> Result<u64> {
        use sea_orm::sea_query::ExprTrait;
        let on_resource = |table: DynIden, kind: DynIden, key: DynIden| {
            Condition::all()
                .add(
                    Expr::col((table.clone(), kind))
                        .equals((lock_resources::Entity, lock_resources::Column::ResourceType)),
                )
                .add(
                    Expr::col((table, key))
                        .equals((lock_resources::Entity, lock_resources::Column::ResourceKey)),
                )
        };
        let held = Query::select()
            .expr(Expr::val(1))
            .from(resource_locks::Entity)
            .cond_where(on_resource(
                resource_locks::Entity.into_iden(),
                resource_locks::Column::ResourceType.into_iden(),
                resource_locks::Column::ResourceKey.into_iden(),
            ))
            .and_where(
                Expr::col((resource_locks::Entity, resource_locks::Column::ReleasedAt)).is_null(),
            )
            .to_owned();
        let waited = Query::select()
            .expr(Expr::val(1))
            .from(lock_waiters::Entity)
            .cond_where(on_resource(
                lock_waiters::Entity.into_iden(),
                lock_waiters::Column::ResourceType.into_iden(),
                lock_waiters::Column::ResourceKey.into_iden(),
            ))
            .to_owned();
        let txn = self.lease.begin(self.store).await?;
        let idle: Vec<String> = lock_resources::Entity::find()
            .select_only()
            .column(lock_resources::Column::Id)
            .filter(lock_resources::Column::TouchedAt.lt(before))
            .filter(Expr::exists(held).not())
            .filter(Expr::exists(waited).not())
            .limit(self.batch)
            .into_tuple()
            .all(&*txn)
            .await?;
        if idle.is_empty() {
            txn.rollback().await?;
            return Ok(0);
        }
        let found = idle.len() as u64;
        // Asked for again meanwhile: its turn moved `touched_at` on.
        lock_resources::Entity::delete_many()
            .filter(lock_resources::Column::Id.is_in(idle))
            .filter(lock_resources::Column::TouchedAt.lt(before))
            .exec(&*txn)
            .await?;
        txn.commit().await?;
        Ok(found)
    }

    /// The result of a batch's writes, after its lines were archived: if
    /// they failed (before the commit), the lines are cut off again.
    async fn or_unarchive<T>(&mut self, writes: Result<T>) -> Result<T> {
        if let (Err(_), Some(archive)) = (&writes, &mut self.archive) {
            archive.abort().await;
        }
        writes
    }
    /// One batch of step 2; the number of contexts cleared.
    async fn clear_contexts(&mut self, before: DateTime<Utc>) -> Result<u64> {
        let txn = self.lease.begin(self.store).await?;
        let now = db::now();
        let ids = self.take(&*txn, context_kept_before(before)).await?;
        if ids.is_empty() {
            txn.rollback().await?;
            return Ok(0);
        }
        if let Some(archive) = &mut self.archive {
            archive_in_chunks(archive, &ids, |chunk| context_lines(&*txn, chunk, now)).await?;
        }
        let cleared = async {
            let mut cleared = 0;
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                cleared += global_sessions::Entity::update_many()
                    .col_expr(
                        global_sessions::Column::ContextData,
                        Expr::value(sea_orm::Value::Json(None)),
                    )
                    .col_expr(global_sessions::Column::ContextClearedAt, Expr::value(now))
                    .filter(global_sessions::Column::Id.is_in(chunk.iter().map(String::as_str)))
                    .exec(&*txn)
                    .await?
                    .rows_affected;
            }
            Ok(cleared)
        }
        .await;
        let cleared = self.or_unarchive(cleared).await?;
        txn.commit().await?;
        self.report.contexts_cleared += cleared;
        Ok(cleared)
    }

    /// One batch of step 3; the number of audit rows deleted.
    async fn compact_audit(&mut self, before: DateTime<Utc>) -> Result<u64> {
        let txn = self.lease.begin(self.store).await?;
        let horizon: Option<i64> = retention::Entity::find_by_id(1)
            .select_only()
            .column(retention::Column::CompactedThrough)
            .lock_exclusive()
            .into_tuple()
            .one(&*txn)
            .await?;
        let horizon = horizon.ok_or_else(no_retention_row)?;
        let rows: Vec<audit_log::Model> = match self.archive {
            // The whole rows only when they are archived.
            Some(_) => {
                audit_before(before)
                    .order_by_asc(audit_log::Column::Seq)
                    .limit(self.batch)
                    .all(&*txn)
                    .await?
            }
            None => Vec::new(),
        };
        let seqs: Vec<i64> = match self.archive {
            Some(_) => rows.iter().map(|r| r.seq).collect(),
            None => {
                audit_before(before)
                    .select_only()
                    .column(audit_log::Column::Seq)
                    .order_by_asc(audit_log::Column::Seq)
                    .limit(self.batch)
                    .into_tuple()
                    .all(&*txn)
                    .await?
            }
        };
        let Some(highest) = seqs.iter().copied().max() else {
            txn.rollback().await?;
            return Ok(0);
        };
        if let Some(archive) = &mut self.archive {
            let lines: Vec<ArchiveLine> = rows
                .into_iter()
                .map(|row| ArchiveLine::Audit { row })
                .collect();
            archive.begin().await?;
            let written = async {
                archive.write(&lines).await?;
                archive.sync().await
            }
            .await;
            if written.is_err() {
                archive.abort().await;
            }
            written?;
        }
        let deleted = async {
            if highest > horizon {
                retention::Entity::update_many()
                    .col_expr(retention::Column::CompactedThrough, Expr::value(highest))
                    .filter(retention::Column::Id.eq(1))
                    .exec(&*txn)
                    .await?;
            }
            let mut deleted = 0;
            for chunk in seqs.chunks(IDS_PER_STATEMENT) {
                deleted += audit_log::Entity::delete_many()
                    .filter(audit_log::Column::Seq.is_in(chunk.iter().copied()))
                    .exec(&*txn)
                    .await?
                    .rows_affected;
            }
            Ok(deleted)
        }
        .await;
        let deleted = self.or_unarchive(deleted).await?;
        txn.commit().await?;
        self.report.audit_deleted += deleted;
        Ok(deleted)
    }

    /// What the prune did, in the audit log, in one short transaction at
    /// its end: a `sessions_pruned` row with its counts when it deleted
    /// sessions or cleared contexts, and an `audit_compacted` row naming
    /// the new horizon when it deleted audit rows, which every feed after
    /// the horizon sees. (A row per batch would take the audit log's head
    /// through each batch's commit, and ends would queue behind it.)
    async fn record(&mut self) -> Result<()> {
        let report = &self.report;
        let changed = report.sessions_deleted + report.contexts_cleared > 0;
        if !changed && report.audit_deleted == 0 {
            return Ok(());
        }
        let txn = self.lease.begin(self.store).await?;
        let now = db::now();
        let counts = serde_json::json!({
            "sessions_deleted": report.sessions_deleted,
            "contexts_cleared": report.contexts_cleared,
            "agents_deleted": report.agents_deleted,
            "locks_deleted": report.locks_deleted,
            "waiters_deleted": report.waiters_deleted,
            "audit_deleted": report.audit_deleted,
        });
        if changed {
            audit::append(&*txn, AuditEvent::SessionsPruned, None, counts.clone(), now).await?;
        }
        if report.audit_deleted > 0 {
            let mut details = counts;
            details["compacted_through"] = serde_json::json!(horizon(&*txn).await?);
            audit::append(&*txn, AuditEvent::AuditCompacted, None, details, now).await?;
        }
        txn.commit().await?;
        Ok(())
    }
}

/// Deletes the sessions `ids` whole (locks, waiters, agents, rows, in the
/// order an end takes them); the rows deleted: sessions, agents, locks,
/// waiters.
async fn delete_whole(txn: &impl ConnectionTrait, ids: &[String]) -> Result<(u64, u64, u64, u64)> {
    let (mut locks, mut waiters, mut agents, mut sessions) = (0, 0, 0, 0);
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let chunk = || chunk.iter().map(String::as_str);
        locks += resource_locks::Entity::delete_many()
            .filter(resource_locks::Column::SessionId.is_in(chunk()))
            .exec(txn)
            .await?
            .rows_affected;
        waiters += lock_waiters::Entity::delete_many()
            .filter(lock_waiters::Column::SessionId.is_in(chunk()))
            .exec(txn)
            .await?
            .rows_affected;
        agents += agent_executions::Entity::delete_many()
            .filter(agent_executions::Column::SessionId.is_in(chunk()))
            .exec(txn)
            .await?
            .rows_affected;
        sessions += global_sessions::Entity::delete_many()
            .filter(global_sessions::Column::Id.is_in(chunk()))
            .exec(txn)
            .await?
            .rows_affected;
    }
    Ok((sessions, agents, locks, waiters))
}

/// Sessions whose rows one read of an archived batch holds in memory.
const ARCHIVE_CHUNK: usize = 50;

/// Archives a batch a few sessions at a time (`lines` reads their lines)
/// and flushes it to disk; on failure, nothing of the batch stays in the
/// file.
async fn archive_in_chunks<'t, F, Fut>(
    archive: &mut Archive,
    ids: &'t [String],
    lines: F,
) -> Result<()>
where
    F: Fn(&'t [String]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<ArchiveLine>>>,
{
    archive.begin().await?;
    let written = async {
        for chunk in ids.chunks(ARCHIVE_CHUNK) {
            archive.write(&lines(chunk).await?).await?;
        }
        archive.sync().await
    }
    .await;
    if written.is_err() {
        archive.abort().await;
    }
    written
}

/// The archive lines of the sessions `ids`, read inside the deleting
/// transaction.
async fn session_lines(txn: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<ArchiveLine>> {
    use std::collections::HashMap;
    let mut lines = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let chunk = || chunk.iter().map(String::as_str);
        let sessions = global_sessions::Entity::find()
            .filter(global_sessions::Column::Id.is_in(chunk()))
            .all(txn)
            .await?;
        let mut agents: HashMap<String, Vec<agent_executions::Model>> = HashMap::new();
        for agent in agent_executions::Entity::find()
            .filter(agent_executions::Column::SessionId.is_in(chunk()))
            .all(txn)
            .await?
        {
            agents
                .entry(agent.session_id.clone())
                .or_default()
                .push(agent);
        }
        let mut locks: HashMap<String, Vec<resource_locks::Model>> = HashMap::new();
        for lock in resource_locks::Entity::find()
            .filter(resource_locks::Column::SessionId.is_in(chunk()))
            .all(txn)
            .await?
        {
            locks.entry(lock.session_id.clone()).or_default().push(lock);
        }
        let mut waiters: HashMap<String, Vec<lock_waiters::Model>> = HashMap::new();
        for waiter in lock_waiters::Entity::find()
            .filter(lock_waiters::Column::SessionId.is_in(chunk()))
            .all(txn)
            .await?
        {
            waiters
                .entry(waiter.session_id.clone())
                .or_default()
                .push(waiter);
        }
        for session in sessions {
            lines.push(ArchiveLine::Session {
                agents: agents.remove(&session.id).unwrap_or_default(),
                locks: locks.remove(&session.id).unwrap_or_default(),
                waiters: waiters.remove(&session.id).unwrap_or_default(),
                session,
            });
        }
    }
    Ok(lines)
}

/// The archive lines of the saved contexts of `ids`, about to be cleared.
async fn context_lines(
    txn: &impl ConnectionTrait,
    ids: &[String],
    cleared_at: DateTime<Utc>,
) -> Result<Vec<ArchiveLine>> {
    let mut lines = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let rows: Vec<(String, Option<serde_json::Value>)> = global_sessions::Entity::find()
            .select_only()
            .column(global_sessions::Column::Id)
            .column(global_sessions::Column::ContextData)
            .filter(global_sessions::Column::Id.is_in(chunk.iter().map(String::as_str)))
            .into_tuple()
            .all(txn)
            .await?;
        for (id, context) in rows {
            if let Some(context_data) = context {
                lines.push(ArchiveLine::Context {
                    session_id: db::stored_id("global_sessions", &id, "id", &id)?,
                    cleared_at,
                    context_data,
                });
            }
        }
    }
    Ok(lines)
}

/// The compaction horizon: `None` while nothing was ever compacted.
pub(crate) async fn horizon(db: &impl ConnectionTrait) -> Result<Option<i64>> {
    let horizon: Option<i64> = retention::Entity::find_by_id(1)
        .select_only()
        .column(retention::Column::CompactedThrough)
        .into_tuple()
        .one(db)
        .await?;
    Ok(horizon.filter(|h| *h > 0))
}

/// [`Error::Compacted`] when reading after `after` could miss rows a prune
/// deleted.
pub(crate) async fn check_horizon(db: &impl ConnectionTrait, after: i64) -> Result<()> {
    match horizon(db).await? {
        Some(compacted_through) if after < compacted_through => Err(Error::Compacted {
            after,
            compacted_through,
        }),
        _ => Ok(()),
    }
}

/// Whether a stop signal says stop: it turned true, or its sender (the
/// manager that asked for the prune) is gone.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    stop.has_changed().is_err() || *stop.borrow()
}

/// The most pages one step of [`reclaim_pages`] frees, so that the write
/// lock is held briefly.
const VACUUM_STEP_PAGES: u32 = 2_048;

/// On SQLite, returns free pages to the file system, a step at a time
/// through the write gate (a no-op unless the file is
/// `auto_vacuum = INCREMENTAL`).
async fn reclaim_pages(store: &db::Store, stop: Option<&watch::Receiver<bool>>) -> Result<()> {
    if store.get_database_backend() != DatabaseBackend::Sqlite {
        return Ok(());
    }
    let mut before = i64::MAX;
    while !stop.is_some_and(stopping) {
        let _gate = db::write_gate(store).await?;
        let writer = store.writer();
        // Pragmas: SeaORM has no API for SQLite's page management.
        let free: i64 = writer
            .query_one_raw(sea_orm::Statement::from_string(
                DatabaseBackend::Sqlite,
                "PRAGMA freelist_count",
            ))
            .await?
            .map(|row| row.try_get_by_index(0))
            .transpose()?
            .unwrap_or(0);
        let vacuum: i64 = writer
            .query_one_raw(sea_orm::Statement::from_string(
                DatabaseBackend::Sqlite,
                "PRAGMA auto_vacuum",
            ))
            .await?
            .map(|row| row.try_get_by_index(0))
            .transpose()?
            .unwrap_or(0);
        // 2 is INCREMENTAL. A freelist that stopped shrinking (another
        // writer freeing pages as fast) ends it too.
        if free == 0 || vacuum != 2 || free >= before {
            return Ok(());
        }
        before = free;
        writer
            .execute_unprepared(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})"))
            .await?;
        if free <= i64::from(VACUUM_STEP_PAGES) {
            return Ok(());
        }
    }
    Ok(())
}

/// Counts what `policy` would delete and clear now, deleting nothing.
pub(crate) async fn preview(
    db: &impl ConnectionTrait,
    policy: &RetentionPolicy,
) -> Result<PruneReport> {
    policy.validate()?;
    let started = Instant::now();
    let cutoffs = Cutoffs::of(db, policy).await?;
    let batch = u64::from(policy.batch);
    let batches = |n: u64| n.div_ceil(batch);
    let mut report = PruneReport {
        dry_run: true,
        ..PruneReport::default()
    };
    if let Some(before) = cutoffs.sessions {
        let doomed = || {
            Query::select()
                .column(global_sessions::Column::Id)
                .from(global_sessions::Entity)
                .and_where(global_sessions::Column::Status.is_in(SessionStatus::ended_names()))
                .and_where(global_sessions::Column::UpdatedAt.lt(before))
                .to_owned()
        };
        report.sessions_deleted = ended_before(before).count(db).await?;
        report.agents_deleted = agent_executions::Entity::find()
            .filter(agent_executions::Column::SessionId.in_subquery(doomed()))
            .count(db)
            .await?;
        report.locks_deleted = resource_locks::Entity::find()
            .filter(resource_locks::Column::SessionId.in_subquery(doomed()))
            .count(db)
            .await?;
        report.waiters_deleted = lock_waiters::Entity::find()
            .filter(lock_waiters::Column::SessionId.in_subquery(doomed()))
            .count(db)
            .await?;
        report.batches += batches(report.sessions_deleted);
    }
    if let Some(before) = cutoffs.contexts {
        let mut kept = context_kept_before(before);
        if let Some(deleted_before) = cutoffs.sessions {
            // Those deleted first are not cleared.
            kept = kept.filter(global_sessions::Column::UpdatedAt.gte(deleted_before));
        }
        report.contexts_cleared = kept.count(db).await?;
        report.batches += batches(report.contexts_cleared);
    }
    let horizon = horizon(db).await?;
    report.compacted_through = horizon;
    if let Some(before) = cutoffs.audit {
        // Rows of the sessions step 1 deletes count too: once their
        // session is gone it is not open.
        let (count, highest): (i64, Option<i64>) = audit_before(before)
            .select_only()
            .column_as(audit_log::Column::Seq.count(), "n")
            .column_as(audit_log::Column::Seq.max(), "highest")
            .into_tuple()
            .one(db)
            .await?
            .unwrap_or((0, None));
        report.audit_deleted = u64::try_from(count).unwrap_or(0);
        report.batches += batches(report.audit_deleted);
        report.compacted_through = horizon.max(highest);
    }
    report.elapsed_ms = millis(started.elapsed());
    Ok(report)
}
