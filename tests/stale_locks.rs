//! Stale locks on every backend: time to live, renewal, sweeps of expired and
//! orphaned locks in batches, lock delay, fencing, and the metrics the
//! manager keeps about ends and sweeps. Every test reads the rows back.
mod common;
use common::id;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use common::*;
use demiarch_sessions::{Config, Error, LockGrant, LockOptions, MetricsSnapshot, SweepReport};
use entity::{audit_log, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::json;
use uuid::Uuid;

// ---- helpers local to this file ------------------------------------------------

fn ttl_ms(ms: u64) -> LockOptions {
    LockOptions {
        ttl: Some(Duration::from_millis(ms)),
        wait: None,
    }
}

/// Sleeps until `at` has passed by a margin: the only kind of sleep here.
async fn sleep_past(at: DateTime<FixedOffset>) {
    let left = (at.to_utc() - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(left + Duration::from_millis(30)).await;
}

async fn lock_row(db: &TestDb, id: Uuid) -> resource_locks::Model {
    resource_locks::Entity::find_by_id(id.to_string())
        .one(db.manager.connection())
        .await
        .expect("query lock")
        .unwrap_or_else(|| panic!("lock {id} row missing"))
}

/// The `locks_swept` audit rows, oldest first.
async fn swept_rows(db: &TestDb) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .filter(audit_log::Column::EventType.eq("locks_swept"))
        .order_by_asc(audit_log::Column::EventTime)
        .all(db.manager.connection())
        .await
        .expect("query audit")
}

/// What a `locks_swept` row says about one lock it released.
fn swept_entry(lock: &resource_locks::Model, reason: &str) -> serde_json::Value {
    json!({
        "lock_id": id(&lock.id).to_string(),
        "resource_type": lock.resource_type,
        "resource_key": lock.resource_key,
        "agent_id": id(&lock.agent_id).to_string(),
        "session_id": id(&lock.session_id).to_string(),
        "fencing_token": lock.fencing_token,
        "reason": reason,
    })
}

/// The lock ids a `locks_swept` row names.
fn swept_ids(row: &audit_log::Model) -> Vec<Uuid> {
    row.details["locks"]
        .as_array()
        .unwrap_or_else(|| panic!("details.locks is not an array: {}", row.details))
        .iter()
        .map(|l| {
            l["lock_id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad lock_id in {l}"))
        })
        .collect()
}

/// A started session with one registered agent.
async fn session_with_agent(db: &TestDb, agent_type: &str) -> (Uuid, Uuid) {
    let session = db.manager.start_session().await.expect("start");
    let agent = db
        .manager
        .register_agent(session, agent_type)
        .await
        .expect("register");
    (session, agent)
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

// ---- 1. Time to live and one sweep ---------------------------------------------

#[tokio::test]
async fn expired_lock_fails_fencing_and_is_swept_with_an_audit_row() {
    each_backend(
        "expired_lock_fails_fencing_and_is_swept_with_an_audit_row",
        |db| async move {
            let m = &db.manager;
            let (session, agent) = session_with_agent(&db, "coder").await;
            let grant = m
                .acquire_lock_with(agent, "file", "ttl.txt", ttl_ms(100))
                .await
                .expect("acquire with ttl");

            let row = lock_row(&db, grant.lock_id).await;
            let expires_at = row.expires_at.expect("expires_at set");
            let lived = expires_at - row.acquired_at;
            assert!(
                (lived - ms(100)).abs() <= ms(3),
                "expires_at - acquired_at = {lived}, want 100 ms"
            );
            assert!(row.released_at.is_none());
            let valid = m
                .validate_fence("file", "ttl.txt", grant.fencing_token)
                .await
                .expect("validate");
            // Only a call that finished before the expiry must have said yes.
            if Utc::now() < expires_at {
                assert!(valid, "a live holder's token is refused");
            }

            sleep_past(expires_at).await;
            assert!(
                !m.validate_fence("file", "ttl.txt", grant.fencing_token)
                    .await
                    .expect("validate"),
                "an expired holder's token is refused"
            );
            assert_eq!(
                lock_row(&db, grant.lock_id).await,
                row,
                "validating changed nothing"
            );
            assert!(swept_rows(&db).await.is_empty());

            let report = m.sweep_locks().await.expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    expired: 1,
                    orphaned: 0,
                    batches: 1
                }
            );

            let swept = lock_row(&db, grant.lock_id).await;
            assert_eq!(swept.release_reason.as_deref(), Some("expired"));
            let released_at = swept.released_at.expect("released_at set");
            assert!(released_at >= expires_at, "{released_at} < {expires_at}");
            assert_eq!(swept.expires_at, Some(expires_at), "expires_at kept");

            let audit = swept_rows(&db).await;
            assert_eq!(audit.len(), 1, "exactly one locks_swept row");
            assert_eq!(audit[0].event_time, released_at);
            assert_eq!(
                audit[0].details,
                json!({"expired": 1, "orphaned": 0, "locks": [swept_entry(&row, "expired")]})
            );

            // The session and its agent are left alone.
            assert_eq!(session_row(&db, session).await.status, "active");
            assert_eq!(agent_rows(&db, session).await[0].status, "running");

            // Nothing left: a second sweep releases and writes nothing.
            let before = snapshot(&db).await;
            assert_eq!(
                m.sweep_locks().await.expect("sweep again"),
                SweepReport::default()
            );
            assert_eq!(snapshot(&db).await, before);
        },
    )
    .await;
}

#[tokio::test]
async fn acquiring_over_an_expired_unswept_holder_releases_it_and_fences_it_out() {
    each_backend(
        "acquiring_over_an_expired_unswept_holder_releases_it_and_fences_it_out",
        |db| async move {
            let m = &db.manager;
            let (_, a1) = session_with_agent(&db, "slow").await;
            let (s2, a2) = session_with_agent(&db, "next").await;
            let old = m
                .acquire_lock_with(a1, "file", "shared", ttl_ms(100))
                .await
                .expect("acquire with ttl");
            let old_row = lock_row(&db, old.lock_id).await;

            sleep_past(old_row.expires_at.expect("expires_at")).await;
            let before_sweeps = swept_rows(&db).await.len();

            let new = m
                .acquire_lock(a2, "file", "shared")
                .await
                .expect("acquire over an expired holder");
            assert!(new.fencing_token > old.fencing_token);

            let old_now = lock_row(&db, old.lock_id).await;
            assert_eq!(old_now.release_reason.as_deref(), Some("expired"));
            let released_at = old_now.released_at.expect("released_at");
            let new_row = lock_row(&db, new.lock_id).await;
            assert_eq!(id(&new_row.agent_id), a2);
            assert_eq!(id(&new_row.session_id), s2);
            assert!(new_row.released_at.is_none());
            assert_eq!(new_row.expires_at, None);
            assert!(new_row.acquired_at >= released_at);

            let audit = swept_rows(&db).await;
            assert_eq!(audit.len(), before_sweeps + 1, "one locks_swept row");
            let row = audit.last().expect("locks_swept row");
            assert_eq!(row.event_time, released_at);
            assert_eq!(row.session_id, None);
            assert_eq!(
                row.details,
                json!({"expired": 1, "orphaned": 0, "locks": [swept_entry(&old_row, "expired")]})
            );

            assert!(!m
                .validate_fence("file", "shared", old.fencing_token)
                .await
                .expect("validate old"));
            assert!(m
                .validate_fence("file", "shared", new.fencing_token)
                .await
                .expect("validate new"));
        },
    )
    .await;
}

// ---- 2. Renewal -----------------------------------------------------------------

#[tokio::test]
async fn renewal_extends_a_held_lock_and_cannot_revive_a_dead_one() {
    each_backend(
        "renewal_extends_a_held_lock_and_cannot_revive_a_dead_one",
        |db| async move {
            let m = &db.manager;
            let (session, agent) = session_with_agent(&db, "coder").await;
            let lapsing = m
                .acquire_lock_with(agent, "file", "lapsing", ttl_ms(100))
                .await
                .expect("acquire lapsing");
            let released = m
                .acquire_lock(agent, "file", "released")
                .await
                .expect("acquire released");
            m.release_lock(released.lock_id).await.expect("release");
            let (s2, a2) = session_with_agent(&db, "ended").await;
            let ended = m
                .acquire_lock_with(a2, "file", "ended", ttl_ms(60_000))
                .await
                .expect("acquire ended");
            m.end_session(s2).await.expect("end");

            // Taken last, so that its ttl has not run out when it is renewed.
            let kept = m
                .acquire_lock_with(agent, "file", "kept", ttl_ms(500))
                .await
                .expect("acquire kept");
            let first = lock_row(&db, kept.lock_id).await;
            let first_expiry = first.expires_at.expect("expires_at");
            let renew_called = Utc::now();
            m.renew_lock(kept.lock_id, Duration::from_secs(10))
                .await
                .expect("renew a held lock");
            let renewed = lock_row(&db, kept.lock_id).await;
            let new_expiry = renewed.expires_at.expect("expires_at");
            assert!(new_expiry > first_expiry, "{new_expiry} <= {first_expiry}");
            assert!(
                new_expiry >= renew_called + chrono::Duration::seconds(10) - ms(1)
                    && new_expiry <= Utc::now() + chrono::Duration::seconds(10),
                "renewed to 10 s from the call: {new_expiry}"
            );
            assert_eq!(
                (
                    renewed.acquired_at,
                    renewed.fencing_token,
                    renewed.released_at
                ),
                (first.acquired_at, first.fencing_token, None),
                "renewal changes only expires_at"
            );

            // Past the original expiry, the renewed lock is still held.
            let lapse_at = lock_row(&db, lapsing.lock_id)
                .await
                .expires_at
                .expect("expires_at");
            sleep_past(first_expiry.max(lapse_at)).await;
            assert!(m
                .validate_fence("file", "kept", kept.fencing_token)
                .await
                .expect("validate"));

            // Expired but not yet swept: renewal refuses and changes nothing.
            let before = snapshot(&db).await;
            match m.renew_lock(lapsing.lock_id, Duration::from_secs(10)).await {
                Err(Error::LockNotHeld { lock_id, reason }) => {
                    assert_eq!(lock_id, lapsing.lock_id);
                    assert_eq!(reason, "expired");
                }
                other => panic!("expected LockNotHeld, got {other:?}"),
            }
            assert_eq!(
                snapshot(&db).await,
                before,
                "refused renewal changed nothing"
            );

            let report = m.sweep_locks().await.expect("sweep");
            assert_eq!(
                (report.expired, report.orphaned),
                (1, 0),
                "only the lapsed lock"
            );
            assert_eq!(
                lock_row(&db, lapsing.lock_id)
                    .await
                    .release_reason
                    .as_deref(),
                Some("expired")
            );
            assert!(lock_row(&db, kept.lock_id).await.released_at.is_none());

            let before = snapshot(&db).await;
            for (id, want) in [
                (lapsing.lock_id, "expired"),
                (released.lock_id, "released"),
                (ended.lock_id, "session_end"),
            ] {
                match m.renew_lock(id, Duration::from_secs(10)).await {
                    Err(Error::LockNotHeld { lock_id, reason }) => {
                        assert_eq!(lock_id, id);
                        assert_eq!(reason, want);
                    }
                    other => panic!("renew a {want} lock: expected LockNotHeld, got {other:?}"),
                }
            }
            let unknown = Uuid::new_v4();
            match m.renew_lock(unknown, Duration::from_secs(10)).await {
                Err(Error::LockNotFound(id)) => assert_eq!(id, unknown),
                other => panic!("expected LockNotFound, got {other:?}"),
            }
            assert_eq!(
                snapshot(&db).await,
                before,
                "refused renewals changed nothing"
            );
            assert_eq!(session_row(&db, session).await.status, "active");
        },
    )
    .await;
}

// ---- 3. Orphans -----------------------------------------------------------------

#[tokio::test]
async fn held_locks_of_interrupted_sessions_are_swept_as_orphaned() {
    each_backend(
        "held_locks_of_interrupted_sessions_are_swept_as_orphaned",
        |db| async move {
            let m = &db.manager;
            let (interrupted, _) = populated_session(&db, 2, 2).await;
            let (active, _) = populated_session(&db, 1, 3).await;
            let (paused, _) = populated_session(&db, 1, 1).await;
            // Interrupted by hand, bypassing the library: its locks stay held.
            set_session_status(&db, interrupted, "interrupted").await;
            set_session_status(&db, paused, "paused").await;
            let orphans = lock_rows(&db, interrupted).await;
            assert_eq!(orphans.len(), 4);
            assert!(orphans.iter().all(|l| l.released_at.is_none()));
            let interrupted_before = rows_of(&db, interrupted).await;
            let active_before = rows_of(&db, active).await;
            let paused_before = rows_of(&db, paused).await;

            let report = m.sweep_locks().await.expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    expired: 0,
                    orphaned: 4,
                    batches: 1
                }
            );

            let audit = swept_rows(&db).await;
            assert_eq!(audit.len(), 1);
            let swept_at = audit[0].event_time;
            let mut expected: Vec<_> = orphans.iter().map(|l| swept_entry(l, "orphaned")).collect();
            let mut named = audit[0].details["locks"].as_array().expect("locks").clone();
            let by_id = |v: &serde_json::Value| v["lock_id"].as_str().unwrap_or("").to_owned();
            expected.sort_by_key(by_id);
            named.sort_by_key(by_id);
            assert_eq!(named, expected, "the audit row names every orphan");
            assert_eq!(audit[0].details["orphaned"], json!(4));
            assert_eq!(audit[0].details["expired"], json!(0));

            let (session, agents, locks, own_audit) = rows_of(&db, interrupted).await;
            assert_eq!(session, interrupted_before.0, "session row untouched");
            assert_eq!(agents, interrupted_before.1, "agents untouched");
            assert_eq!(own_audit, interrupted_before.3);
            for (lock, was) in locks.iter().zip(&interrupted_before.2) {
                assert_eq!(lock.release_reason.as_deref(), Some("orphaned"));
                assert_eq!(lock.released_at, Some(swept_at));
                assert_eq!(
                    (lock.fencing_token, lock.acquired_at, lock.expires_at),
                    (was.fencing_token, was.acquired_at, was.expires_at)
                );
            }
            assert_eq!(
                rows_of(&db, active).await,
                active_before,
                "an active session's locks stay"
            );
            assert_eq!(
                rows_of(&db, paused).await,
                paused_before,
                "a paused session's locks stay"
            );

            let before = snapshot(&db).await;
            assert_eq!(
                m.sweep_locks().await.expect("sweep"),
                SweepReport::default()
            );
            assert_eq!(snapshot(&db).await, before);
        },
    )
    .await;
}

// ---- 4. Batches -----------------------------------------------------------------

#[tokio::test]
async fn a_sweep_releases_everything_in_batches_of_sweep_batch() {
    let config = Config {
        sweep_batch: 3,
        ..Default::default()
    };
    each_backend_with(
        "a_sweep_releases_everything_in_batches_of_sweep_batch",
        config,
        |db| async move {
            let m = &db.manager;
            let (session, agents) = populated_session(&db, 2, 1).await;
            let control = lock_rows(&db, session).await;
            assert_eq!(control.len(), 2, "two held locks without a ttl");
            let mut ids = BTreeSet::new();
            for k in 0..10 {
                let grant = m
                    .acquire_lock_with(agents[k % 2], "file", &format!("batch/{k}"), ttl_ms(100))
                    .await
                    .expect("acquire with ttl");
                ids.insert(grant.lock_id);
            }
            let last = lock_rows(&db, session)
                .await
                .iter()
                .filter_map(|l| l.expires_at)
                .max()
                .expect("expiring locks");
            sleep_past(last).await;

            let report = m.sweep_locks().await.expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    expired: 10,
                    orphaned: 0,
                    batches: 4
                }
            );

            let audit = swept_rows(&db).await;
            assert_eq!(audit.len(), 4, "one locks_swept row per batch");
            let mut sizes: Vec<usize> = audit.iter().map(|r| swept_ids(r).len()).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, vec![1, 3, 3, 3]);
            let mut named = BTreeSet::new();
            for row in &audit {
                let in_row = swept_ids(row);
                assert_eq!(row.details["expired"], json!(in_row.len()));
                assert_eq!(row.details["orphaned"], json!(0));
                for id in in_row {
                    assert!(named.insert(id), "lock {id} named twice");
                    let lock = lock_row(&db, id).await;
                    assert_eq!(lock.release_reason.as_deref(), Some("expired"));
                    assert_eq!(
                        lock.released_at,
                        Some(row.event_time),
                        "released in the batch that names it"
                    );
                }
            }
            assert_eq!(named, ids, "every expired lock named exactly once");
            for lock in &control {
                assert_eq!(
                    &lock_row(&db, id(&lock.id)).await,
                    lock,
                    "no-ttl lock untouched"
                );
            }

            let before = snapshot(&db).await;
            assert_eq!(
                m.sweep_locks().await.expect("sweep again"),
                SweepReport::default()
            );
            assert_eq!(snapshot(&db).await, before, "an empty sweep writes nothing");
            assert_eq!(swept_rows(&db).await.len(), 4);
        },
    )
    .await;
}

#[tokio::test]
async fn sweeping_one_sessions_expired_locks_leaves_other_sessions_alone() {
    each_backend(
        "sweeping_one_sessions_expired_locks_leaves_other_sessions_alone",
        |db| async move {
            let m = &db.manager;
            let (stale, stale_agent) = session_with_agent(&db, "stale").await;
            let mut stale_ids = Vec::new();
            for k in 0..2 {
                let grant = m
                    .acquire_lock_with(stale_agent, "file", &format!("stale/{k}"), ttl_ms(100))
                    .await
                    .expect("acquire");
                stale_ids.push(grant.lock_id);
            }
            let (other, other_agents) = populated_session(&db, 2, 2).await;
            m.acquire_lock_with(other_agents[0], "file", "long-ttl", ttl_ms(60_000))
                .await
                .expect("acquire long ttl");
            let other_before = rows_of(&db, other).await;
            let stale_before = rows_of(&db, stale).await;

            let last = stale_before.2.iter().filter_map(|l| l.expires_at).max();
            sleep_past(last.expect("expiring locks")).await;
            let report = m.sweep_locks().await.expect("sweep");
            assert_eq!((report.expired, report.orphaned), (2, 0));

            assert_eq!(
                rows_of(&db, other).await,
                other_before,
                "the other session's rows are unchanged"
            );
            let (session, agents, locks, audit) = rows_of(&db, stale).await;
            assert_eq!(session, stale_before.0);
            assert_eq!(agents, stale_before.1);
            assert_eq!(audit, stale_before.3);
            assert!(locks
                .iter()
                .all(|l| l.release_reason.as_deref() == Some("expired")));
            let mut named = swept_ids(&swept_rows(&db).await[0]);
            named.sort();
            stale_ids.sort();
            assert_eq!(named, stale_ids);
        },
    )
    .await;
}

// ---- 5. Lock delay --------------------------------------------------------------

#[tokio::test]
async fn lock_delay_holds_back_involuntarily_released_resources_only() {
    let config = Config {
        lock_delay: Duration::from_millis(300),
        ..Default::default()
    };
    each_backend_with(
        "lock_delay_holds_back_involuntarily_released_resources_only",
        config,
        |db| async move {
            let m = &db.manager;
            let (s1, a1) = session_with_agent(&db, "first").await;
            let (s2, a2) = session_with_agent(&db, "second").await;

            let first = m
                .acquire_lock_with(a1, "file", "delayed", ttl_ms(100))
                .await
                .expect("acquire with ttl");
            sleep_past(lock_row(&db, first.lock_id).await.expires_at.expect("ttl")).await;
            assert_eq!(m.sweep_locks().await.expect("sweep").expired, 1);
            let released_at = lock_row(&db, first.lock_id)
                .await
                .released_at
                .expect("released");

            let before = (all_locks(&db).await, fencing_counter(&db).await);
            match m.acquire_lock(a2, "file", "delayed").await {
                Err(Error::LockDelay {
                    resource_type,
                    resource_key,
                    retry_after_ms,
                }) => {
                    assert_eq!(
                        (resource_type.as_str(), resource_key.as_str()),
                        ("file", "delayed")
                    );
                    assert!(
                        retry_after_ms > 0 && retry_after_ms <= 300,
                        "retry_after_ms {retry_after_ms}"
                    );
                }
                other => panic!("expected LockDelay, got {other:?}"),
            }
            assert!(matches!(
                m.acquire_lock_with(a1, "file", "delayed", ttl_ms(100))
                    .await,
                Err(Error::LockDelay { .. })
            ));
            assert_eq!(
                (all_locks(&db).await, fencing_counter(&db).await),
                before,
                "a delayed acquire writes no lock row and issues no token"
            );
            // The delay is per resource.
            m.acquire_lock(a2, "file", "not-delayed")
                .await
                .expect("another resource is free");

            sleep_past(released_at + ms(300)).await;
            let second = m
                .acquire_lock(a2, "file", "delayed")
                .await
                .expect("free after the delay");
            assert!(second.fencing_token > first.fencing_token);
            assert_eq!(id(&lock_row(&db, second.lock_id).await.agent_id), a2);

            // A clean release frees the resource at once.
            m.release_lock(second.lock_id).await.expect("release");
            let third = m
                .acquire_lock(a1, "file", "delayed")
                .await
                .expect("no delay after a clean release");
            assert_eq!(
                lock_row(&db, second.lock_id)
                    .await
                    .release_reason
                    .as_deref(),
                Some("released")
            );

            // So does ending the holder's session.
            m.end_session(s1).await.expect("end");
            let fourth = m
                .acquire_lock(a2, "file", "delayed")
                .await
                .expect("no delay after a session end");
            assert_eq!(
                lock_row(&db, third.lock_id).await.release_reason.as_deref(),
                Some("session_end")
            );
            let held = lock_row(&db, fourth.lock_id).await;
            assert_eq!((id(&held.agent_id), id(&held.session_id)), (a2, s2));
            assert!(held.released_at.is_none());

            // An orphan sweep is involuntary too.
            let (s3, a3) = session_with_agent(&db, "orphan").await;
            m.acquire_lock(a3, "file", "orphaned")
                .await
                .expect("acquire");
            set_session_status(&db, s3, "interrupted").await;
            assert_eq!(m.sweep_locks().await.expect("sweep").orphaned, 1);
            let before = (all_locks(&db).await, fencing_counter(&db).await);
            assert!(
                matches!(
                    m.acquire_lock(a2, "file", "orphaned").await,
                    Err(Error::LockDelay { .. })
                ),
                "an orphaned resource is delayed"
            );
            assert_eq!((all_locks(&db).await, fencing_counter(&db).await), before);

            // The delay belongs to that exact key: not to one that differs in
            // case or by a trailing space.
            for key in ["Orphaned", "orphaned ", " orphaned"] {
                let grant = m.acquire_lock(a2, "file", key).await.unwrap_or_else(|e| {
                    panic!(
                        "{}: {key:?} is not the delayed \"orphaned\": {e:?}",
                        db.backend.name()
                    )
                });
                assert_eq!(lock_row(&db, grant.lock_id).await.resource_key, key);
            }
        },
    )
    .await;
}

// ---- 6. Fencing -----------------------------------------------------------------

#[tokio::test]
async fn only_the_current_holders_token_passes_the_fence() {
    each_backend(
        "only_the_current_holders_token_passes_the_fence",
        |db| async move {
            let m = &db.manager;
            let (_, a1) = session_with_agent(&db, "first").await;
            let (_, a2) = session_with_agent(&db, "second").await;
            let fence = |grant: LockGrant| async move {
                m.validate_fence("file", "fenced", grant.fencing_token)
                    .await
                    .expect("validate")
            };

            let first = m.acquire_lock(a1, "file", "fenced").await.expect("acquire");
            assert!(fence(first).await, "the holder's token passes");
            for token in [first.fencing_token - 1, first.fencing_token + 1, 0, -1] {
                assert!(!m
                    .validate_fence("file", "fenced", token)
                    .await
                    .expect("validate"));
            }
            for (rtype, key) in [("file", "unknown"), ("dir", "fenced"), ("FILE", "fenced")] {
                assert!(
                    !m.validate_fence(rtype, key, first.fencing_token)
                        .await
                        .expect("validate"),
                    "{rtype}/{key} is not the fenced resource"
                );
            }

            m.release_lock(first.lock_id).await.expect("release");
            assert!(!fence(first).await, "a released lock's token fails");

            let second = m
                .acquire_lock(a2, "file", "fenced")
                .await
                .expect("re-acquire");
            assert!(second.fencing_token > first.fencing_token);
            assert!(fence(second).await, "the new holder's token passes");
            assert!(!fence(first).await, "the older token fails");

            m.release_lock(second.lock_id).await.expect("release");
            assert!(!fence(second).await, "nobody holds it now");

            let rows = all_locks(&db).await;
            assert_eq!(rows.len(), 2);
            assert_eq!(
                rows.iter()
                    .map(|l| (id(&l.id), l.fencing_token, l.release_reason.as_deref()))
                    .collect::<Vec<_>>(),
                vec![
                    (first.lock_id, first.fencing_token, Some("released")),
                    (second.lock_id, second.fencing_token, Some("released")),
                ]
            );
            assert_eq!(fencing_counter(&db).await, second.fencing_token);
        },
    )
    .await;
}

// ---- 7. Metrics -----------------------------------------------------------------

#[tokio::test]
async fn metrics_count_ends_sweeps_and_released_locks() {
    each_backend(
        "metrics_count_ends_sweeps_and_released_locks",
        |db| async move {
            let m = &db.manager;
            assert_eq!(
                m.metrics(),
                MetricsSnapshot::default(),
                "a new manager counts nothing"
            );

            let mut sessions = Vec::new();
            for (agents, locks) in [(1, 2), (2, 2), (1, 1)] {
                sessions.push(populated_session(&db, agents, locks).await.0);
            }
            let mut released_by_end = 0;
            for &s in &sessions {
                let report = m.end_session(s).await.expect("end");
                assert!(!report.already_ended);
                released_by_end += report.locks_released;
            }
            assert_eq!(released_by_end, 7);
            assert!(
                m.end_session(sessions[0])
                    .await
                    .expect("again")
                    .already_ended
            );
            assert!(matches!(
                m.end_session(Uuid::new_v4()).await,
                Err(Error::SessionNotFound(_))
            ));

            let (live, agent) = session_with_agent(&db, "ttl").await;
            for k in 0..2 {
                m.acquire_lock_with(agent, "file", &format!("m/{k}"), ttl_ms(100))
                    .await
                    .expect("acquire");
            }
            let last = lock_rows(&db, live)
                .await
                .iter()
                .filter_map(|l| l.expires_at)
                .max()
                .expect("ttl");
            sleep_past(last).await;
            assert_eq!(m.sweep_locks().await.expect("sweep").expired, 2);

            let got = m.metrics();
            assert_eq!(got.sessions_ended, 3);
            assert_eq!(got.ends_already_ended, 1);
            assert_eq!(got.end_timeouts, 0);
            assert_eq!(got.end_failures, 1, "the unknown session");
            assert_eq!(got.locks_released_by_end, released_by_end);
            assert_eq!(got.sweeps, 1);
            assert_eq!(got.locks_swept, 2);
            assert!(got.cleanup_p50_ms > 0.0, "{got:?}");
            assert!(got.cleanup_p99_ms >= got.cleanup_p50_ms, "{got:?}");
            assert!(got.cleanup_max_ms > 0.0, "{got:?}");

            // The rows agree with the counters.
            let locks = all_locks(&db).await;
            let count = |reason: &str| {
                locks
                    .iter()
                    .filter(|l| l.release_reason.as_deref() == Some(reason))
                    .count() as u64
            };
            assert_eq!(count("session_end"), got.locks_released_by_end);
            assert_eq!(count("expired"), got.locks_swept);
            let mut ends = 0;
            for &s in &sessions {
                ends += audit_of(&db, s, "session_end").await.len() as u64;
                assert_eq!(session_row(&db, s).await.status, "completed");
            }
            assert_eq!(ends, got.sessions_ended);
            assert_eq!(swept_rows(&db).await.len() as u64, got.sweeps);

            // A peer manager has counters of its own.
            if db.backend != Backend::SqliteMemory {
                assert_eq!(
                    db.peer_manager().await.metrics(),
                    MetricsSnapshot::default()
                );
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_timed_out_end_is_counted_and_changes_nothing() {
    let config = Config {
        cleanup_timeout: Duration::from_millis(200),
        busy_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    each_backend_with(
        "a_timed_out_end_is_counted_and_changes_nothing",
        config,
        |db| async move {
            if db.backend == Backend::SqliteMemory {
                eprintln!("timeout metric: skipped on sqlite-memory (one connection)");
                return;
            }
            let m = &db.manager;
            let (session, _) = populated_session(&db, 2, 2).await;
            let before = snapshot(&db).await;

            let (blocker, blocking) = block_session(&db, session).await;

            match m.end_session(session).await {
                Err(Error::Timeout { elapsed_ms }) => assert!(elapsed_ms >= 200),
                other => panic!("expected Timeout, got {other:?}"),
            }
            let got = m.metrics();
            assert_eq!(got.end_timeouts, 1);
            assert_eq!(got.sessions_ended, 0);
            assert_eq!(got.end_failures, 0, "a timeout is not counted as a failure");

            blocking.rollback().await.expect("rollback blocker");
            blocker.close().await.expect("close blocker");
            assert_eq!(
                snapshot(&db).await,
                before,
                "the timed-out end changed nothing"
            );

            let report = m.end_session(session).await.expect("end once unblocked");
            assert_eq!(report.locks_released, 4);
            let got = m.metrics();
            assert_eq!((got.end_timeouts, got.sessions_ended), (1, 1));
            assert_eq!(got.locks_released_by_end, 4);
            assert_eq!(session_row(&db, session).await.status, "completed");
            assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
        },
    )
    .await;
}
