//! Grants are ordered per resource: a grant of one resource in flight holds
//! up that resource's grants and nobody else's, and a resource's fencing
//! tokens keep growing however its grants interleave with other resources'.
mod common;

use std::time::Duration;

use common::*;
use demiarch_sessions::LockOptions;
use entity::{lock_resources, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, TransactionTrait};
use tokio::task::JoinSet;

/// The held lock row of a resource, if any.
async fn held(db: &TestDb, key: &str) -> Option<resource_locks::Model> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::ResourceType.eq("file"))
        .filter(resource_locks::Column::ResourceKey.eq(key))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .one(db.manager.connection())
        .await
        .expect("read held lock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_in_flight_holds_up_its_own_resource_only() {
    each_backend(
        "a_grant_in_flight_holds_up_its_own_resource_only",
        |db| async move {
            if db.is_sqlite() {
                eprintln!(
                    "a_grant_in_flight_holds_up_its_own_resource_only: skipped on {}: \
                     SQLite lets one writer at a time in, whatever it writes",
                    db.backend.name()
                );
                return;
            }
            let m = &db.manager;
            let session = m.start_session().await.expect("start");
            let a = m.register_agent(session, "a").await.expect("agent a");
            let b = m.register_agent(session, "b").await.expect("agent b");
            let first = m.acquire_lock(a, "file", "one").await.expect("first grant");
            m.release_lock(first.lock_id).await.expect("release");

            // Another instance's grant of "one" in flight: it holds the
            // resource's row until it commits.
            let other = db.second_connection().await;
            let txn = other.begin().await.expect("begin");
            let row = lock_resources::Entity::find()
                .filter(lock_resources::Column::ResourceType.eq("file"))
                .filter(lock_resources::Column::ResourceKey.eq("one"))
                .lock_exclusive()
                .one(&txn)
                .await
                .expect("lock the resource row");
            assert!(row.is_some(), "the first grant wrote the resource's row");

            // Another resource is granted meanwhile.
            let two =
                tokio::time::timeout(Duration::from_secs(30), m.acquire_lock(b, "file", "two"))
                    .await
                    .expect("a grant of another resource does not wait for \"one\"")
                    .expect("grant of two");
            assert_eq!(
                held(&db, "two").await.map(|l| l.fencing_token),
                Some(two.fencing_token)
            );

            // The same resource waits for the grant in flight.
            let waiting = {
                let m = m.clone();
                tokio::spawn(async move { m.acquire_lock(a, "file", "one").await })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !waiting.is_finished(),
                "a grant of \"one\" waits for the one in flight"
            );
            assert!(held(&db, "one").await.is_none());
            txn.rollback().await.expect("rollback");
            let second = waiting.await.expect("task").expect("second grant of one");
            assert!(second.fencing_token > first.fencing_token);
            assert_eq!(
                held(&db, "one").await.map(|l| (l.id, l.fencing_token)),
                Some((second.lock_id.to_string(), second.fencing_token))
            );
            other.close().await.expect("close");
        },
    )
    .await;
}

/// Many tasks over two managers take turns on three resources, each grant
/// released at once: every resource's tokens grow in the order its locks
/// were granted, and no two locks share a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_resource_s_tokens_grow_in_grant_order() {
    each_backend(
        "each_resource_s_tokens_grow_in_grant_order",
        |db| async move {
            let managers = [db.manager.clone(), db.peer_manager().await];
            let session = db.manager.start_session().await.expect("start");
            let mut tasks = JoinSet::new();
            for t in 0..12 {
                let m = managers[t % 2].clone();
                let agent = m.register_agent(session, "worker").await.expect("agent");
                tasks.spawn(async move {
                    for i in 0..8 {
                        let key = format!("r{}", (t + i) % 3);
                        let options = LockOptions {
                            wait: Some(Duration::from_secs(60)),
                            ..LockOptions::default()
                        };
                        let grant = m
                            .acquire_lock_with(agent, "file", &key, options)
                            .await
                            .expect("grant");
                        m.release_lock(grant.lock_id).await.expect("release");
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("task");
            }
            let locks = resource_locks::Entity::find()
                .all(db.manager.connection())
                .await
                .expect("locks");
            assert_eq!(locks.len(), 96);
            let mut tokens: Vec<i64> = locks.iter().map(|l| l.fencing_token).collect();
            tokens.sort_unstable();
            tokens.dedup();
            assert_eq!(tokens.len(), 96, "no two locks share a token");
            for key in ["r0", "r1", "r2"] {
                let mut of_key: Vec<_> = locks.iter().filter(|l| l.resource_key == key).collect();
                of_key.sort_by_key(|l| l.fencing_token);
                for pair in of_key.windows(2) {
                    // A grant reads the time once it has the resource's turn,
                    // so by token the grants are in the order they were made.
                    assert!(
                        pair[0].acquired_at <= pair[1].acquired_at,
                        "{key}: token {} was granted after token {}",
                        pair[0].fencing_token,
                        pair[1].fencing_token
                    );
                    assert!(pair[0].released_at.is_some(), "{key}: released");
                }
            }
            if db.backend != Backend::SqliteMemory {
                managers[1].close().await.expect("close the second manager");
            }
        },
    )
    .await;
}
