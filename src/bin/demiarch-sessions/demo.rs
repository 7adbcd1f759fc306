//! `demo`: one session end to end, the first thing a new user runs.
use std::time::Duration;

use demiarch_sessions::views::{LocksQuery, Views, MAX_PAGE};
use demiarch_sessions::{Error, LockGrant, LockOptions, LockWaiter, SessionManager};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::commands::{value, Ctx};
use crate::exit::{Failure, INTERNAL};
use crate::output::{self, count, short, Spinner};

/// How long the reviewer waits for the coder's lock.
const WAIT: Duration = Duration::from_secs(5);

/// How often the demo looks whether the reviewer has joined the queue.
const QUEUE_POLL: Duration = Duration::from_millis(5);

/// The reviewer's wait for the coder's lock, up to its hand-over.
struct HandOff {
    /// The reviewer's place in the queue, as `lock_waiters` listed it while
    /// the coder still held the lock (`None` if it never showed there).
    waiter: Option<LockWaiter>,
    /// The coder's grant, released.
    from: LockGrant,
    /// The reviewer's grant, handed over.
    to: LockGrant,
    /// From the reviewer's request to its grant.
    waited: Duration,
}

/// A lock the demo takes.
struct Take {
    agent: &'static str,
    resource_type: &'static str,
    key: String,
}

pub async fn run(ctx: &Ctx) -> Result<String, Failure> {
    let manager = &ctx.manager;
    let outcome = steps(ctx).await;
    // Whatever happened, leave no session of ours open: shutdown ends it.
    let shutdown = {
        let _spinner = Spinner::start("shutting down");
        manager.shutdown(manager.config().cleanup_timeout).await
    };
    let text = outcome?;
    shutdown.map_err(|e| Failure::during("shutting down", e))?;
    Ok(text)
}

async fn steps(ctx: &Ctx) -> Result<String, Failure> {
    let manager = &ctx.manager;
    let fail = |doing: &str| {
        let doing = doing.to_owned();
        move |e: Error| Failure::during(&doing, e)
    };

    let session = manager
        .start_session()
        .await
        .map_err(fail("starting the demo session"))?;
    let coder = manager
        .register_agent(session, "coder")
        .await
        .map_err(fail("registering the demo agents"))?;
    let reviewer = manager
        .register_agent(session, "reviewer")
        .await
        .map_err(fail("registering the demo agents"))?;
    let agent = |kind: &str| if kind == "coder" { coder } else { reviewer };

    // Keys carry the session's short id, so demos never contend with real
    // locks or with each other.
    let tag = format!("demo-{}", short(session));
    let takes = [
        Take {
            agent: "coder",
            resource_type: "file",
            key: format!("{tag}/src/main.rs"),
        },
        Take {
            agent: "coder",
            resource_type: "file",
            key: format!("{tag}/src/lib.rs"),
        },
        Take {
            agent: "reviewer",
            resource_type: "branch",
            key: format!("{tag}/feature/session-end"),
        },
    ];
    let mut grants: Vec<(&Take, LockGrant)> = Vec::new();
    for take in &takes {
        let grant = manager
            .acquire_lock(agent(take.agent), take.resource_type, &take.key)
            .await
            .map_err(fail("taking the demo locks"))?;
        grants.push((take, grant));
    }

    // A second holder is refused by the database's unique index.
    let contested = &takes[0];
    let refusal = match manager
        .acquire_lock(agent("reviewer"), contested.resource_type, &contested.key)
        .await
    {
        Err(e @ Error::LockHeld { .. }) => e.to_string(),
        Err(e) => return Err(Failure::during("contending for a demo lock", e)),
        Ok(grant) => format!(
            "unexpectedly granted (fencing token {}): the store let two agents hold it",
            grant.fencing_token
        ),
    };

    // Waiting instead: the coder's release hands the lock to the reviewer.
    let from = grants[0].1;
    let hand_off = hand_off(manager, reviewer, contested, from).await?;

    manager
        .contexts()
        .put(
            session,
            "plan",
            json!({"goal": "end sessions cleanly", "step": 3}),
        )
        .map_err(|e| Failure::during("putting a context window", e))?;
    manager
        .contexts()
        .put(session, "notes", json!(["locks released", "context saved"]))
        .map_err(|e| Failure::during("putting a context window", e))?;

    let report = manager
        .end_session(session)
        .await
        .map_err(fail("ending the demo session"))?;
    let locks = Views::new(manager, Duration::from_secs(300))
        .locks(&LocksQuery {
            held: Some(false),
            session: Some(session),
            limit: Some(MAX_PAGE),
            ..LocksQuery::default()
        })
        .await
        .map_err(fail("reading the demo locks"))?;

    if ctx.json {
        let agents: Vec<_> = ["coder", "reviewer"]
            .iter()
            .map(|kind| json!({"agent_type": kind, "id": agent(kind)}))
            .collect();
        return output::json(&json!({
            "session_id": session,
            "agents": agents,
            "locks": locks.locks,
            "refused": {
                "agent_type": "reviewer",
                "resource_type": contested.resource_type,
                "resource_key": contested.key,
                "error": refusal,
            },
            "handed_over": {
                "from_agent_type": "coder",
                "to_agent_type": "reviewer",
                "resource_type": contested.resource_type,
                "resource_key": contested.key,
                "waiter": hand_off.waiter,
                "from": hand_off.from,
                "to": hand_off.to,
                "waited_ms": u64::try_from(hand_off.waited.as_millis()).unwrap_or(u64::MAX),
            },
            "context_keys": ["plan", "notes"],
            "report": value(&report),
        }));
    }

    let mut text = format!("Demo on {}\n\n", ctx.url);
    let mut step = 0;
    let mut say = |line: String| {
        step += 1;
        text.push_str(&format!("{step}. {line}\n"));
    };
    say(format!("Started session {session}."));
    say(format!(
        "Registered agents coder ({}) and reviewer ({}).",
        short(agent("coder")),
        short(agent("reviewer"))
    ));
    for (take, grant) in &grants {
        say(format!(
            "{} locked {}/{} (fencing token {}).",
            take.agent, take.resource_type, take.key, grant.fencing_token
        ));
    }
    say(format!(
        "reviewer asked for {}/{} too and was refused: {refusal}.",
        contested.resource_type, contested.key
    ));
    let place = match &hand_off.waiter {
        Some(w) if w.position == 1 => "queued at position 1, next in line".to_owned(),
        Some(w) => format!("queued at position {}", w.position),
        None => "queued".to_owned(),
    };
    say(format!(
        "reviewer asked again, willing to wait up to {}: it is {place}.",
        output::span(WAIT)
    ));
    say(format!(
        "coder released it: the lock was handed to reviewer with fencing token {} \
         (coder's was {}), {} after it asked.",
        hand_off.to.fencing_token,
        hand_off.from.fencing_token,
        output::span(hand_off.waited),
    ));
    say("Put context windows plan and notes.".to_owned());
    say(format!(
        "Ended the session in {}: {} released, {} cancelled, {} ({} bytes) saved.",
        output::millis(report.cleanup_ms),
        count(report.locks_released, "lock"),
        count(report.agents_cancelled, "agent"),
        count(report.context_windows, "context window"),
        report.context_bytes,
    ));
    text.push_str("\nLocks after the end\n");
    text.push_str(&output::render(&crate::render::lock_table(
        &locks.locks,
        locks.now,
        false,
        false,
    )));
    text.push_str(&format!(
        "\n\nNext:\n  demiarch-sessions sessions list\n  demiarch-sessions sessions show {}\n  \
         demiarch-sessions audit tail --session {}\n",
        short(session),
        short(session)
    ));
    Ok(text)
}

/// The reviewer queues for the coder's lock `from` in a task of its own; once
/// `lock_waiters` lists it, the coder releases the lock and the reviewer's
/// wait returns the hand-over.
async fn hand_off(
    manager: &SessionManager,
    reviewer: Uuid,
    take: &Take,
    from: LockGrant,
) -> Result<HandOff, Failure> {
    let started = Instant::now();
    let waiting: JoinHandle<Result<LockGrant, Error>> = {
        let manager = manager.clone();
        let resource_type = take.resource_type;
        let key = take.key.clone();
        tokio::spawn(async move {
            let options = LockOptions {
                wait: Some(WAIT),
                ..LockOptions::default()
            };
            manager
                .acquire_lock_with(reviewer, resource_type, &key, options)
                .await
        })
    };
    let waiter = loop {
        let queue = manager
            .lock_waiters(take.resource_type, &take.key)
            .await
            .map_err(|e| Failure::during("reading the demo queue", e))?;
        if let Some(w) = queue.into_iter().find(|w| w.agent_id == reviewer) {
            break Some(w);
        }
        if waiting.is_finished() || started.elapsed() >= WAIT {
            break None;
        }
        tokio::time::sleep(QUEUE_POLL).await;
    };
    manager
        .release_lock(from.lock_id)
        .await
        .map_err(|e| Failure::during("releasing the demo lock", e))?;
    let to = waiting
        .await
        .map_err(|e| Failure::new(INTERNAL, format!("the demo's waiting agent stopped: {e}")))?
        .map_err(|e| Failure::during("waiting for the demo lock", e))?;
    let waited = started.elapsed();
    Ok(HandOff {
        waiter,
        from,
        to,
        waited,
    })
}
