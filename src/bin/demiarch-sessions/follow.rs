//! `audit tail --follow`: the newest events, then every new one as it
//! commits, from the change feed, until Ctrl-C or SIGTERM.
use std::io::Write;

use demiarch_sessions::{AuditRecord, Error, WatchOptions};
use futures::StreamExt;

use crate::commands::{Ctx, Tail};
use crate::exit::{Failure, INTERNAL};
use crate::output;

/// Prints as events arrive; what is returned is printed after the last.
pub async fn run(ctx: &Ctx, tail: Tail<'_>) -> Result<String, Failure> {
    let (newest, filter) = ctx.audit_newest(&tail).await?;
    let options = WatchOptions {
        // With --after, everything after it comes through the feed; without,
        // the newest N are printed and the feed goes on after the last one.
        after: match tail.after {
            Some(after) => Some(after),
            None => Some(newest.last().map_or(0, |e| e.seq)),
        },
        session_id: filter.session_id,
        event_types: filter.event_type.into_iter().collect(),
    };
    let mut out = Printer { json: ctx.json };
    if !ctx.json {
        out.line("SEQ\tTIME\tEVENT\tSESSION\tDETAILS")?;
    }
    if tail.after.is_none() {
        for event in &newest {
            out.event(event)?;
        }
    }
    let mut feed = Box::pin(ctx.manager.watch(options));
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        let item = tokio::select! {
            () = &mut stop => return Ok(String::new()),
            item = feed.next() => item,
        };
        match item {
            Some(Ok(event)) => out.event(&event)?,
            // Refused options, a closed manager and a gap a prune left end
            // the feed (exit 2, 1, 7); anything else is retried from the
            // last event printed.
            Some(Err(
                e @ (Error::InvalidInput { .. } | Error::ManagerClosed | Error::Compacted { .. }),
            )) => return Err(Failure::during("following the audit log", e)),
            // The feed goes on after a row it cannot read.
            Some(Err(Error::CorruptRow(row))) => eprintln!("warning: skipped a stored row: {row}"),
            Some(Err(e)) => eprintln!("warning: reading the audit log: {e}; retrying"),
            None => return Ok(String::new()),
        }
    }
}

struct Printer {
    json: bool,
}

impl Printer {
    fn event(&mut self, e: &AuditRecord) -> Result<(), Failure> {
        let line = match self.json {
            true => serde_json::to_string(e)
                .map_err(|e| Failure::new(INTERNAL, format!("cannot encode an event: {e}")))?,
            false => format!(
                "{}\t{}\t{}\t{}\t{}",
                e.seq,
                output::time(e.event_time),
                e.event_type,
                e.session_id
                    .map(output::short)
                    .unwrap_or_else(|| "-".into()),
                output::details(&e.details),
            ),
        };
        self.line(&line)
    }

    /// One line, flushed, so a reader sees each event as it commits.
    fn line(&mut self, line: &str) -> Result<(), Failure> {
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
            Ok(()) => Ok(()),
            // `| head` closed the pipe: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                std::process::exit(0);
            }
            Err(e) => Err(Failure::new(
                INTERNAL,
                format!("cannot write to stdout: {e}"),
            )),
        }
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
