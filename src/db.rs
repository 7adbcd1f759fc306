//! Connecting per backend, SQLite pragmas, and the one transaction helper.
use std::path::Path;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{
    ConnectOptions, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use crate::{Config, Error, Result};

/// The current time as stored: UTC, truncated to microseconds so that every
/// backend (PostgreSQL and MariaDB keep microseconds) reads back what was written.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn is_sqlite_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Connects, applies the production settings, and runs pending migrations.
pub(crate) async fn connect(url: &str, config: &Config) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false);
    if url.starts_with("sqlite:") {
        let memory = is_sqlite_memory(url);
        if !memory {
            create_private_sqlite_file(url)?;
        }
        // One connection per in-memory database: a second would be a second database.
        options.max_connections(if memory { 1 } else { config.max_connections.max(1) });
        let busy_timeout = config.busy_timeout;
        options.map_sqlx_sqlite_opts(move |opts| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            let opts = opts
                .create_if_missing(true)
                .foreign_keys(true)
                .busy_timeout(busy_timeout)
                // FULL: a committed end survives power loss, not only a crash.
                .synchronous(SqliteSynchronous::Full);
            if memory {
                opts
            } else {
                opts.journal_mode(SqliteJournalMode::Wal)
            }
        });
    } else {
        options.max_connections(config.max_connections.max(1));
    }
    let db = Database::connect(options).await?;
    migration::Migrator::up(&db, None).await?;
    Ok(db)
}

/// Creates a missing SQLite file readable by its owner only: it will hold
/// users' code and prompts. SQLite gives its -wal and -shm files the same mode.
fn create_private_sqlite_file(url: &str) -> Result<()> {
    let options: sea_orm::sqlx::sqlite::SqliteConnectOptions = url
        .parse()
        .map_err(|e| Error::InvalidInput { field: "url", reason: format!("{e}") })?;
    let path: &Path = options.get_filename();
    if path.as_os_str().is_empty() || path.exists() {
        return Ok(());
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    match open.open(path) {
        Ok(_) => Ok(()),
        // Lost a race with another process creating it: fine.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::InvalidInput {
            field: "url",
            reason: format!("cannot create SQLite file {}: {e}", path.display()),
        }),
    }
}

/// Opens the transaction every write goes through. On SQLite it is
/// `BEGIN IMMEDIATE`: the write lock is taken up front, so two writers that
/// both read first can never deadlock on a lock upgrade ("database is locked").
pub(crate) async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction> {
    let options = TransactionOptions {
        isolation_level: None,
        access_mode: None,
        sqlite_transaction_mode: (db.get_database_backend() == DatabaseBackend::Sqlite)
            .then_some(SqliteTransactionMode::Immediate),
    };
    Ok(db.begin_with_options(options).await?)
}
