//! `demo`: one session end to end, the first thing a new user runs.
use std::collections::HashMap;

use demiarch_sessions::{Error, LockFilter, LockGrant};
use serde_json::json;
use uuid::Uuid;

use crate::commands::{lock_view, value, Ctx, LockView};
use crate::exit::Failure;
use crate::output::{self, count, short, Spinner};

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
    let locks = manager
        .locks(LockFilter {
            session_id: Some(session),
            ..LockFilter::default()
        })
        .await
        .map_err(fail("reading the demo locks"))?;
    let agent_types: HashMap<Uuid, String> = HashMap::from([
        (coder, "coder".to_owned()),
        (reviewer, "reviewer".to_owned()),
    ]);

    if ctx.json {
        let locks: Vec<LockView> = locks.iter().map(|l| lock_view(l, &agent_types)).collect();
        let agents: Vec<_> = ["coder", "reviewer"]
            .iter()
            .map(|kind| json!({"agent_type": kind, "id": agent(kind)}))
            .collect();
        return output::json(&json!({
            "session_id": session,
            "agents": agents,
            "locks": locks,
            "refused": {
                "agent_type": "reviewer",
                "resource_type": contested.resource_type,
                "resource_key": contested.key,
                "error": refusal,
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
    text.push_str(&output::render(&ctx.lock_table(
        &locks,
        &agent_types,
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
