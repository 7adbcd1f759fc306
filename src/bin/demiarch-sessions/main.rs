//! `demiarch-sessions`: the operator CLI of the session store.
//!
//! ```text
//! demiarch-sessions demo
//! demiarch-sessions sessions list [--status S] [--limit N]
//! demiarch-sessions sessions show ID
//! demiarch-sessions sessions end ID [--force]
//! demiarch-sessions sessions pause ID | sessions unpause ID
//! demiarch-sessions locks list [--held] [--session ID] [--limit N]
//! demiarch-sessions locks waiters TYPE KEY
//! demiarch-sessions locks sweep
//! demiarch-sessions locks release LOCK_ID --reason TEXT
//! demiarch-sessions agents finish AGENT_ID [--failed REASON]
//! demiarch-sessions recover [--stale-after 5m]
//! demiarch-sessions audit tail [-n N] [--session ID] [--event E] [--after SEQ] [--follow]
//! demiarch-sessions prune [--completed-after AGE] [--context-after AGE] [--audit-after AGE]
//!                        [--keep-last N] [--archive FILE] [--batch N] [--dry-run]
//! ```
//!
//! Every command takes `--json` and `--database-url`; exit codes are listed
//! in `--help` and in `exit.rs`.
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod args;
mod commands;
mod demo;
mod exit;
mod follow;
mod output;
mod prune;
mod render;
mod serve;

use exit::{Failure, INTERNAL};

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stderr(),
            "error: internal error{place}; this is a bug in demiarch-sessions, please report it"
        );
        std::process::exit(i32::from(INTERNAL));
    }));

    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // No subcommand: the help, on stderr, as a usage error.
            let _ = e.print();
            return ExitCode::from(exit::INVALID_INPUT);
        }
        Err(e) => return fail(&Failure::usage(&e)),
    };
    init_logging();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return fail(&Failure::new(
                INTERNAL,
                format!("cannot start the async runtime: {e}"),
            ))
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            // `| head` closed the pipe: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => fail(&Failure::new(
                INTERNAL,
                format!("cannot write to stdout: {e}"),
            )),
        },
        Err(failure) => fail(&failure),
    }
}

fn fail(failure: &Failure) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "{}", failure.cli_line());
    ExitCode::from(failure.code)
}

/// Logs to stderr only when `RUST_LOG` is set, so output stays clean.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
}
