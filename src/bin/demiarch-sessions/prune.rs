//! `prune`: the retention policy from the command line, with a progress bar
//! on a terminal.
use std::io::IsTerminal;

use demiarch_sessions::{PruneReport, RetentionPolicy};
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::Ctx;
use crate::exit::{Failure, INVALID_INPUT};
use crate::output::{self, count};

impl Ctx {
    pub async fn prune(&self, policy: &RetentionPolicy, dry_run: bool) -> Result<String, Failure> {
        if policy.completed_after.is_none()
            && policy.context_after.is_none()
            && policy.audit_after.is_none()
        {
            return Err(Failure::new(
                INVALID_INPUT,
                "nothing to prune: give --completed-after, --context-after or --audit-after \
                 (ages such as 30d)",
            ));
        }
        let doing = "pruning";
        let report = if dry_run {
            self.manager
                .prune_dry_run(policy)
                .await
                .map_err(|e| Failure::during(doing, e))?
        } else {
            // A bar on a terminal, as long as a dry run counts; none otherwise.
            let bar = match std::io::stderr().is_terminal() && !self.json {
                true => {
                    let planned = self
                        .manager
                        .prune_dry_run(policy)
                        .await
                        .map_err(|e| Failure::during(doing, e))?;
                    progress_bar(total(&planned))
                }
                false => ProgressBar::hidden(),
            };
            let shown = bar.clone();
            let report = self
                .manager
                .prune_with_progress(policy, move |so_far| shown.set_position(total(so_far)))
                .await;
            bar.finish_and_clear();
            report.map_err(|e| Failure::during(doing, e))?
        };
        if self.json {
            return output::json(&report);
        }
        Ok(summary(&report))
    }
}

/// Sessions, contexts and audit rows: what the bar counts.
fn total(report: &PruneReport) -> u64 {
    report.sessions_deleted + report.contexts_cleared + report.audit_deleted
}

/// A bar on stderr.
fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("pruning {bar:40} {pos}/{len} rows ({elapsed}, {eta} left)")
    {
        bar.set_style(style);
    }
    bar
}

fn summary(r: &PruneReport) -> String {
    let verb = |done: &'static str, would: &'static str| if r.dry_run { would } else { done };
    let mut text = format!(
        "{} {} ({}, {}, {}), {} {}, {} {}.\n",
        verb("Deleted", "Would delete"),
        count(r.sessions_deleted, "ended session"),
        count(r.agents_deleted, "agent"),
        count(r.locks_deleted, "lock"),
        count(r.waiters_deleted, "waiter"),
        verb("cleared", "would clear"),
        count(r.contexts_cleared, "saved context"),
        verb("deleted", "would delete"),
        count(r.audit_deleted, "audit row"),
    );
    if let Some(horizon) = r.compacted_through {
        text.push_str(&format!(
            "The audit log {} complete after seq {horizon} (feeds from before it are told).\n",
            verb("is", "would be"),
        ));
    }
    if !r.dry_run {
        text.push_str(&format!(
            "{} in {}.\n",
            count(r.batches, "transaction"),
            output::millis(r.elapsed_ms)
        ));
    }
    text
}
