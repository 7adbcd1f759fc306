//! Connecting per backend, SQLite pragmas, and the one transaction helper.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, IsolationLevel, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use crate::{Config, CorruptRow, Error, Result};

/// The current time as stored: UTC, truncated to microseconds so that every
/// backend (PostgreSQL and MariaDB keep microseconds) reads back what was written.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A UUID as stored (its hyphenated text), read back from `column` of the
/// row `id` of `table`.
pub(crate) fn stored_id(
    table: &'static str,
    id: &str,
    column: &'static str,
    text: &str,
) -> Result<uuid::Uuid, CorruptRow> {
    uuid::Uuid::parse_str(text).map_err(|_| corrupt(table, id, column, text))
}

/// A value as stored (its text, such as a status), read back from `column`
/// of the row `id` of `table`.
pub(crate) fn stored<T: std::str::FromStr>(
    table: &'static str,
    id: &str,
    column: &'static str,
    text: &str,
) -> Result<T, CorruptRow> {
    text.parse().map_err(|_| corrupt(table, id, column, text))
}

/// The [`CorruptRow`] naming `value` in `column` of the row `id` of `table`.
pub(crate) fn corrupt(
    table: &'static str,
    id: &str,
    column: &'static str,
    value: &str,
) -> CorruptRow {
    CorruptRow {
        table,
        id: id.to_owned(),
        column,
        value: value.to_owned(),
    }
}

fn is_sqlite_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Held while a connect of this process checks and runs the migrations.
static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Connects, applies the production settings, and runs pending migrations.
///
/// On a SQLite file the store also opens its writer: one more connection, with
/// the same settings, that every gated write goes through (see [`Store`]).
///
/// Read-only (`Config::read_only`, or a SQLite URL with `?mode=ro`), it
/// creates nothing, migrates nothing and opens no writer: it checks that the
/// schema is at the latest migration ([`Error::NotMigrated`] otherwise).
pub(crate) async fn connect(url: &str, config: &Config) -> Result<Store> {
    let sqlite = url.starts_with("sqlite:");
    let memory = sqlite && is_sqlite_memory(url);
    let read_only = config.read_only || (sqlite && sqlite_url_read_only(url));
    if read_only && memory {
        return Err(Error::InvalidInput {
            field: "Config::read_only",
            reason: "an in-memory SQLite database starts empty, so there is nothing to \
                     read; open a file read-only, or an in-memory database writable"
                .into(),
        });
    }
    if read_only && sqlite {
        refuse_missing_sqlite_file(url)?;
    }
    let created = sqlite && !memory && !read_only && create_private_sqlite_file(url)?;
    let sqlite_path = sqlite.then(|| sqlite_display_path(url));
    let not_a_database = |e: sea_orm::DbErr| match &sqlite_path {
        Some(path) if is_not_a_database(&e) => Error::NotADatabase { path: path.clone() },
        _ => Error::Database(e),
    };
    let pool_size = if memory {
        // One connection per in-memory database: a second would be a second database.
        1
    } else {
        config.max_connections.max(1)
    };
    if created {
        // A new file is made `auto_vacuum = INCREMENTAL` (with its header
        // written by WAL mode) before anything else opens it: the setting
        // holds only in an empty database, and setting it on every
        // connection would take the write lock each time.
        let mut options = connect_options(url, config, 1, Access::ReadWrite);
        options.map_sqlx_sqlite_opts(|opts| {
            opts.auto_vacuum(sea_orm::sqlx::sqlite::SqliteAutoVacuum::Incremental)
        });
        Database::connect(options)
            .await
            .map_err(not_a_database)?
            .close()
            .await?;
    }
    let access = if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let db = match Database::connect(connect_options(url, config, pool_size, access)).await {
        // A WAL store on a read-only medium: SQLite cannot create the -shm
        // index a read-only open needs. Without a -wal file nothing is
        // pending, and nobody can write there: read the file as it is.
        Err(e) if read_only && sqlite && is_cannot_open(&e) && !sqlite_wal_exists(url) => {
            tracing::info!(
                url,
                "cannot create the SQLite index files beside the store (a read-only \
                 medium?); reading it as immutable"
            );
            let options = connect_options(url, config, pool_size, Access::Immutable);
            Database::connect(options).await.map_err(not_a_database)?
        }
        other => other.map_err(not_a_database)?,
    };
    let schema_error = |e| match e {
        Error::Database(e) => not_a_database(e),
        other => other,
    };
    if read_only {
        refuse_newer_schema(&db).await.map_err(schema_error)?;
        let store = sqlite_path.clone().unwrap_or_else(|| server_display(url));
        refuse_unmigrated(&db, store).await.map_err(schema_error)?;
    } else {
        // One migrator at a time in this process: a connect whose caller gave
        // up still finishes migrating, and a retry must not race it.
        let _migrating = MIGRATING.lock().await;
        refuse_newer_schema(&db).await.map_err(schema_error)?;
        migration::Migrator::up(&db, None).await?;
    }
    let writer = if sqlite && !memory && !read_only {
        let mut options = connect_options(url, config, 1, Access::ReadWrite);
        // Kept open for the manager's life: a reopened writer starts cold.
        options.idle_timeout(None).max_lifetime(None);
        Some(Database::connect(options).await.map_err(not_a_database)?)
    } else {
        None
    };
    let mut store = Store::with_writer(db, writer, config.busy_timeout);
    store.read_only = read_only;
    // Read up front, so that no end of this store waits for it.
    store.context_limit().await?;
    if sqlite && !memory && !read_only {
        store.file = FileIdentity::of(url);
        if store.file.is_none() {
            tracing::warn!(
                url,
                "cannot identify the SQLite file; a deleted or replaced file will not be noticed"
            );
        }
    }
    Ok(store)
}

/// The SQLite file a store opened, as the file system knew it then: a write
/// first checks the path still names that file, since SQLite would go on
/// writing to a deleted or replaced file (its open descriptor) and
/// acknowledge work that no reader of the path will ever see.
#[derive(Clone, Debug)]
struct FileIdentity {
    path: std::path::PathBuf,
    #[cfg(unix)]
    id: (u64, u64),
}

impl FileIdentity {
    fn of(url: &str) -> Option<Self> {
        let options: sea_orm::sqlx::sqlite::SqliteConnectOptions = url.parse().ok()?;
        let path = std::fs::canonicalize(options.get_filename()).ok()?;
        Some(Self {
            #[cfg(unix)]
            id: Self::id_of(&path)?,
            path,
        })
    }

    #[cfg(unix)]
    fn id_of(path: &Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    /// [`Error::DatabaseMoved`] unless the path still names the file opened.
    fn check(&self) -> Result<()> {
        #[cfg(unix)]
        if Self::id_of(&self.path) != Some(self.id) {
            return Err(Error::DatabaseMoved {
                path: self.path.display().to_string(),
            });
        }
        Ok(())
    }
}

/// Whether a SQLite URL asks for a read-only open (`mode=ro` in its query).
fn sqlite_url_read_only(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| pair.eq_ignore_ascii_case("mode=ro"))
    })
}

/// A read-only open creates nothing: a missing file is refused by name.
fn refuse_missing_sqlite_file(url: &str) -> Result<()> {
    let options: sea_orm::sqlx::sqlite::SqliteConnectOptions =
        url.parse().map_err(|e| Error::InvalidInput {
            field: "url",
            reason: format!("{e}"),
        })?;
    let path = options.get_filename();
    if path.exists() {
        return Ok(());
    }
    Err(Error::CannotOpen {
        path: path.display().to_string(),
        reason: "no such file, and a read-only open creates none; open it writable once \
                 to create the store"
            .into(),
    })
}

/// A server URL fit for messages: without its password.
fn server_display(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.split_once('@') {
            let user = auth.split_once(':').map_or(auth, |(user, _)| user);
            return format!("{scheme}://{user}@{host}");
        }
    }
    url.to_owned()
}

/// How a connection opens the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    /// SQLite opens the file `SQLITE_OPEN_READONLY` (creating nothing,
    /// changing no journal mode); a server runs every transaction of the
    /// connection `READ ONLY`.
    ReadOnly,
    /// As `ReadOnly`, and SQLite takes the file for one nobody writes
    /// (`immutable=1`: no locks, no -shm index), for a read-only medium.
    Immutable,
}

/// SQLITE_CANTOPEN (14): the file, or the -shm index a WAL store needs, cannot be opened.
fn is_cannot_open(err: &sea_orm::DbErr) -> bool {
    err.to_string().contains("(code: 14)")
}

/// Whether the SQLite store has a -wal file beside it (writes not yet
/// checkpointed into the file, or a writer at work).
fn sqlite_wal_exists(url: &str) -> bool {
    url.parse::<sea_orm::sqlx::sqlite::SqliteConnectOptions>()
        .map(|o| {
            let mut wal = o.get_filename().as_os_str().to_owned();
            wal.push("-wal");
            Path::new(&wal).exists()
        })
        .unwrap_or(true)
}

/// The pool's settings: SQLite's pragmas, or the servers' session setup.
fn connect_options(url: &str, config: &Config, pool_size: u32, access: Access) -> ConnectOptions {
    let read_only = access != Access::ReadWrite;
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(config.connect_timeout)
        .acquire_timeout(config.connect_timeout)
        .max_connections(pool_size);
    if url.starts_with("sqlite:") {
        let memory = is_sqlite_memory(url);
        // An embedded connection cannot go stale the way a socket can: the
        // ping sqlx sends before handing one out would cost every call a
        // round trip to the connection's worker thread for nothing.
        options.test_before_acquire(false);
        let busy_timeout = config.busy_timeout;
        options.map_sqlx_sqlite_opts(move |opts| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            let opts = opts
                .create_if_missing(!read_only)
                .read_only(read_only)
                .immutable(access == Access::Immutable)
                .foreign_keys(true)
                .busy_timeout(busy_timeout)
                // FULL: a committed end survives power loss, not only a crash.
                .synchronous(SqliteSynchronous::Full);
            // Setting the journal mode writes the file's header: a read-only
            // open reads the file in whatever mode its writers left it.
            if memory || read_only {
                opts
            } else {
                opts.journal_mode(SqliteJournalMode::Wal)
            }
        });
    } else {
        configure_server_sessions(&mut options, config, read_only);
    }
    options
}

/// Refuses, for a read-only open, a store some migration of this library
/// was not applied to: a read-only manager cannot apply it.
async fn refuse_unmigrated(db: &DatabaseConnection, store: String) -> Result<()> {
    use sea_orm::EntityTrait;
    use sea_orm_migration::seaql_migrations;
    let manager = sea_orm_migration::SchemaManager::new(db);
    let applied: Vec<String> = if manager.has_table("seaql_migrations").await? {
        seaql_migrations::Entity::find()
            .all(db)
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect()
    } else {
        Vec::new()
    };
    let missing: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .filter(|name| !applied.contains(name))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NotMigrated { store, missing })
    }
}

/// Refuses a database migrated by a newer library before anything is written.
async fn refuse_newer_schema(db: &DatabaseConnection) -> Result<()> {
    use sea_orm::EntityTrait;
    use sea_orm_migration::seaql_migrations;
    let manager = sea_orm_migration::SchemaManager::new(db);
    if !manager.has_table("seaql_migrations").await? {
        return Ok(());
    }
    let known: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let unknown: Vec<String> = seaql_migrations::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .map(|m| m.version)
        .filter(|v| !known.contains(v))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::SchemaTooNew { unknown })
    }
}

fn sqlite_display_path(url: &str) -> String {
    url.parse::<sea_orm::sqlx::sqlite::SqliteConnectOptions>()
        .map(|o| o.get_filename().display().to_string())
        .unwrap_or_else(|_| url.to_owned())
}

/// SQLITE_NOTADB (26): the file exists but is not a database.
fn is_not_a_database(err: &sea_orm::DbErr) -> bool {
    let text = err.to_string();
    text.contains("file is not a database") || text.contains("(code: 26)")
}

/// Every pooled server connection runs at READ COMMITTED and gives up waiting
/// for a row lock after `Config::cleanup_timeout` on the server itself (on
/// MariaDB rounded up to whole seconds); the client's timer is [`backstop`].
///
/// READ COMMITTED is what closes the end/acquire race together with the row
/// locks taken on the session (see `session::end` and `locks::acquire`): each
/// statement sees the rows committed before it started, so the release of a
/// session's locks, run after the session row is locked, sees every lock that
/// an acquire committed before it. Under REPEATABLE READ (MariaDB's default)
/// the snapshot could predate such a lock.
///
/// The server-side lock timeout means a blocked statement is ended by the
/// server, so a connection never goes back to the pool stuck inside one.
///
/// A read-only store's connections also run every transaction `READ ONLY`,
/// so the server itself refuses a write that got past the manager's checks.
#[allow(unused_variables)]
fn configure_server_sessions(options: &mut ConnectOptions, config: &Config, read_only: bool) {
    let lock_wait_ms = config.cleanup_timeout.as_millis().max(1);
    #[cfg(feature = "postgres")]
    {
        // Session settings on each new connection: SeaORM has no API for them.
        let access = if read_only { ", READ ONLY" } else { "" };
        let setup = format!(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED{access}; \
             SET lock_timeout = '{lock_wait_ms}ms'"
        );
        options.map_sqlx_postgres_pool_opts(move |pool| {
            let setup = setup.clone();
            pool.after_connect(move |conn, _meta| {
                let setup = setup.clone();
                Box::pin(async move {
                    use sea_orm::sqlx::Executor;
                    conn.execute(sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(setup)))
                        .await
                        .map(|_| ())
                })
            })
        });
    }
    #[cfg(feature = "mysql")]
    {
        // innodb_lock_wait_timeout counts whole seconds.
        let lock_wait_s = lock_wait_ms.div_ceil(1000);
        // Session settings on each new connection: SeaORM has no API for them.
        let mut setup = vec![
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
            format!("SET SESSION innodb_lock_wait_timeout = {lock_wait_s}"),
        ];
        if read_only {
            // The server refuses any write on this connection: the backstop
            // behind the manager's own refusal (SeaORM has no API for it).
            setup.push("SET SESSION TRANSACTION READ ONLY".to_owned());
        }
        options.map_sqlx_mysql_pool_opts(move |pool| {
            let setup = setup.clone();
            pool.after_connect(move |conn, _meta| {
                let setup = setup.clone();
                Box::pin(async move {
                    use sea_orm::sqlx::Executor;
                    for statement in setup {
                        conn.execute(sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(
                            statement,
                        )))
                        .await?;
                    }
                    Ok(())
                })
            })
        });
    }
}

/// The client's timer for a write whose lock waits the server bounds by
/// `budget`: a quarter later (at least 20 ms), so that the server, not the
/// timer, ends a blocked statement. The statement then fails and its
/// transaction rolls back cleanly; a statement cut midway by the timer can
/// leave its pooled connection unusable. The timer stays the bound for every
/// other stall (a busy SQLite file, an unreachable server).
pub(crate) fn backstop(budget: Duration) -> Duration {
    budget.saturating_add((budget / 4).max(Duration::from_millis(20)))
}

/// Whether the call gave up waiting: for a lock (SQLite busy, a PostgreSQL
/// lock or statement timeout, a MariaDB/MySQL lock-wait or statement-time
/// limit), or for a pooled connection (`Config::connect_timeout`; on a SQLite
/// file, the writer held by the app through `write_connection`).
pub(crate) fn is_lock_timeout(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};
    let sqlx_err = match err {
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => return true,
        DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e))
        | DbErr::Conn(RuntimeErr::SqlxError(e)) => e,
        _ => return false,
    };
    let Some(db_err) = sqlx_err.as_database_error() else {
        return false;
    };
    #[cfg(feature = "mysql")]
    if let Some(my) = db_err.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        // 1205 lock wait timeout, 1969 MariaDB max_statement_time, 3024 MySQL max_execution_time.
        return matches!(my.number(), 1205 | 1969 | 3024);
    }
    match db_err.code().as_deref() {
        // SQLITE_BUSY, SQLITE_LOCKED and their extended codes.
        Some("5" | "6" | "261" | "262" | "517" | "773") => true,
        // lock_not_available, query_canceled (statement_timeout).
        Some("55P03" | "57014") => true,
        _ => false,
    }
}

/// Creates a missing SQLite file readable by its owner only: it will hold
/// users' code and prompts. SQLite gives its -wal and -shm files the same mode.
/// Whether it created it.
fn create_private_sqlite_file(url: &str) -> Result<bool> {
    let options: sea_orm::sqlx::sqlite::SqliteConnectOptions =
        url.parse().map_err(|e| Error::InvalidInput {
            field: "url",
            reason: format!("{e}"),
        })?;
    let path: &Path = options.get_filename();
    if path.as_os_str().is_empty() || path.exists() {
        return Ok(false);
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    match open.open(path) {
        Ok(_) => Ok(true),
        // Lost a race with another process creating it: fine.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::CannotOpen {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The connection pool together with the manager's SQLite write gate and,
/// on a SQLite file opened by [`connect`], its writer connection.
///
/// SQLite lets one writer in at a time. Without the gate, writers that find
/// the write lock taken wait in SQLite's busy handler, which polls by sleeping
/// (1, 2, 5, 10 … ms): eight tasks ending sessions at once spend most of their
/// time asleep while the lock is free. With it, the writers of one
/// `SessionManager` (and its clones, which share the gate) queue on a fair
/// async mutex and each enters `BEGIN IMMEDIATE` just as the previous one
/// commits. Writers outside it (another manager built with `new` on the same
/// database, another process, the app's own writes) still meet the busy
/// handler, bounded by `Config::busy_timeout`. PostgreSQL and MariaDB need no gate: their row
/// locks let writers of different sessions run in parallel.
///
/// Since the gate lets one write in at a time, every gated write goes through
/// one dedicated connection, the writer, while reads use the pool. In WAL mode
/// a connection throws its whole page cache away when it finds that another
/// connection wrote since its last transaction; writes spread over the pool's
/// connections would each start cold and read every page they touch again.
/// The writer starts warm unless something outside the gate wrote. A manager
/// built with `SessionManager::new` (the app's own connection) has no writer
/// and writes through that connection.
#[derive(Clone)]
pub(crate) struct Store {
    conn: DatabaseConnection,
    writer: Option<DatabaseConnection>,
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
    gate_timeout: Duration,
    /// PostgreSQL's `lock_timeout` for each write transaction, on a connection
    /// the app set up (the library's own connections set it when they open).
    txn_lock_timeout: Option<Duration>,
    /// The SQLite file opened by [`connect`], checked before each write.
    file: Option<FileIdentity>,
    /// Opened read-only: [`write_gate`] refuses every write.
    read_only: bool,
    /// MariaDB/MySQL's `max_allowed_packet`, read once per manager (at
    /// connect, or at the first end on an app's connection: a later change
    /// on the server is seen by a new manager); `None` elsewhere.
    packet_limit: Arc<tokio::sync::OnceCell<Option<u64>>>,
}

/// Room an end's `UPDATE` needs in one packet besides its context: the
/// statement id and the other parameters, with ample margin.
const STATEMENT_OVERHEAD: u64 = 64 * 1024;

impl Store {
    /// A store on a connection the app set up: no writer, and each write
    /// transaction on PostgreSQL bounds its lock waits by `lock_timeout`.
    pub(crate) fn new(
        conn: DatabaseConnection,
        gate_timeout: Duration,
        lock_timeout: Duration,
        read_only: bool,
    ) -> Self {
        let mut store = Self::with_writer(conn, None, gate_timeout);
        store.txn_lock_timeout = Some(lock_timeout);
        store.read_only = read_only;
        store
    }

    /// Whether the store was opened read-only.
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    fn with_writer(
        conn: DatabaseConnection,
        writer: Option<DatabaseConnection>,
        gate_timeout: Duration,
    ) -> Self {
        let gate = (conn.get_database_backend() == DatabaseBackend::Sqlite)
            .then(|| Arc::new(tokio::sync::Mutex::new(())));
        Self {
            conn,
            writer,
            gate,
            gate_timeout,
            txn_lock_timeout: None,
            file: None,
            read_only: false,
            packet_limit: Arc::default(),
        }
    }

    /// The most bytes of context the server takes in the one statement that
    /// saves it, when the server caps a statement's size: on MariaDB/MySQL,
    /// `max_allowed_packet` less [`STATEMENT_OVERHEAD`]; `None` on SQLite
    /// and PostgreSQL, where `Config::max_context_bytes` is the only bound.
    pub(crate) async fn context_limit(&self) -> Result<Option<(u64, u64)>> {
        if self.conn.get_database_backend() != DatabaseBackend::MySql {
            return Ok(None);
        }
        let packet = self
            .packet_limit
            .get_or_try_init(|| async {
                // A server variable: SeaORM's query builder has no expression for it.
                let statement = sea_orm::Statement::from_string(
                    DatabaseBackend::MySql,
                    "SELECT @@max_allowed_packet AS packet",
                );
                let row = self.conn.query_one_raw(statement).await?;
                let packet: Option<u64> = match row {
                    Some(row) => Some(row.try_get("", "packet")?),
                    None => None,
                };
                Ok::<_, Error>(packet)
            })
            .await?;
        Ok(packet.map(|packet| (packet.saturating_sub(STATEMENT_OVERHEAD), packet)))
    }

    /// The connection for writes: the writer where there is one. Use it only
    /// while holding the write gate; outside the gate, the writer's one
    /// connection may be busy with a gated write.
    pub(crate) fn writer(&self) -> &DatabaseConnection {
        self.writer.as_ref().unwrap_or(&self.conn)
    }

    /// Closes the writer, if any, then the pool.
    pub(crate) async fn close(&self) -> std::result::Result<(), sea_orm::DbErr> {
        if let Some(writer) = &self.writer {
            writer.clone().close().await?;
        }
        self.conn.clone().close().await
    }
}

impl std::ops::Deref for Store {
    type Target = DatabaseConnection;

    fn deref(&self) -> &DatabaseConnection {
        &self.conn
    }
}

/// A write transaction and, on SQLite, the manager's write gate, held until the
/// transaction commits, rolls back or is dropped.
pub(crate) struct WriteTxn {
    // Declared first, so it is dropped (and its rollback queued) before the
    // gate opens.
    txn: DatabaseTransaction,
    _gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTxn {
    pub(crate) async fn commit(self) -> std::result::Result<(), sea_orm::DbErr> {
        self.txn.commit().await
    }

    pub(crate) async fn rollback(self) -> std::result::Result<(), sea_orm::DbErr> {
        self.txn.rollback().await
    }
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

/// Waits for the manager's SQLite write gate (none on the servers), at most
/// `Config::busy_timeout`. Hold the guard for the life of the write.
///
/// On a SQLite file opened by [`connect`] it then checks that the path still
/// names the file opened ([`Error::DatabaseMoved`] if not).
///
/// Every write passes here, so a read-only store refuses it here
/// ([`Error::ReadOnly`]); the manager's write calls refuse first, naming
/// themselves.
pub(crate) async fn write_gate(store: &Store) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>> {
    if store.read_only {
        return Err(Error::ReadOnly { operation: "write" });
    }
    let Some(gate) = &store.gate else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    let guard = tokio::time::timeout(store.gate_timeout, gate.clone().lock_owned())
        .await
        .map_err(|_| Error::Timeout {
            elapsed_ms: millis(started.elapsed()),
        })?;
    if let Some(file) = &store.file {
        file.check()?;
    }
    Ok(Some(guard))
}

/// Opens the transaction every write goes through. On SQLite it is
/// `BEGIN IMMEDIATE`, entered through the pool's write gate: the write lock is
/// taken up front, so two writers that both read first can never deadlock on a
/// lock upgrade ("database is locked").
///
/// Waiting for the gate is bounded by `Config::busy_timeout`, as waiting for
/// SQLite's own lock is; past it the call fails with [`Error::Timeout`].
/// Waiting for the writer's connection (busy only if the app holds it through
/// `write_connection`) is bounded by `Config::connect_timeout`; past it the
/// error is one for which `Error::is_timeout` is true.
pub(crate) async fn begin_write(store: &Store) -> Result<WriteTxn> {
    let gate = write_gate(store).await?;
    let db = store.writer();
    let sqlite = db.get_database_backend() == DatabaseBackend::Sqlite;
    let options = TransactionOptions {
        // The library's own server connections are READ COMMITTED already
        // (see `configure_server_sessions`); an app's connection may not be.
        isolation_level: (!sqlite && store.txn_lock_timeout.is_some())
            .then_some(IsolationLevel::ReadCommitted),
        access_mode: None,
        sqlite_transaction_mode: sqlite.then_some(SqliteTransactionMode::Immediate),
    };
    let txn = db.begin_with_options(options).await?;
    if let (Some(timeout), DatabaseBackend::Postgres) =
        (store.txn_lock_timeout, db.get_database_backend())
    {
        // A connection setting SeaORM has no API for; `SET LOCAL` ends with
        // the transaction, so the app's connection is left as it was.
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
        txn.execute_unprepared(&format!("SET LOCAL lock_timeout = {ms}"))
            .await?;
    }
    Ok(WriteTxn { txn, _gate: gate })
}

/// Takes the resource's turn, held until the caller's transaction ends: the
/// grants and queueings of one resource take turns, those of different
/// resources do not wait for each other. On the servers it writes the
/// resource's row in `lock_resources` (inserting it the first time); on
/// SQLite the write transaction already holds the only write lock.
pub(crate) async fn resource_turn(
    txn: &DatabaseTransaction,
    resource: &crate::locks::wake::Resource,
) -> Result<()> {
    use entity::lock_resources;
    use sea_orm::sea_query::OnConflict;
    use sea_orm::{ActiveValue::Set, EntityTrait};
    if txn.get_database_backend() == DatabaseBackend::Sqlite {
        return Ok(());
    }
    let row = lock_resources::ActiveModel {
        id: Set(resource_id(resource).to_string()),
        resource_type: Set(resource.0.clone()),
        resource_key: Set(resource.1.clone()),
        touched_at: Set(now().into()),
    };
    lock_resources::Entity::insert(row)
        .on_conflict(
            OnConflict::column(lock_resources::Column::Id)
                .update_column(lock_resources::Column::TouchedAt)
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    Ok(())
}

/// The name-based id of a resource's row in `lock_resources`.
pub(crate) fn resource_id(resource: &crate::locks::wake::Resource) -> uuid::Uuid {
    /// The namespace of resource ids (a fixed random UUID).
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3c1e_97a4_5b0d_4f6e_a2d8_71c9_e5f3_0b42);
    // The type's length first, so ("ab", "c") and ("a", "bc") differ.
    let mut name = Vec::with_capacity(8 + resource.0.len() + resource.1.len());
    name.extend_from_slice(&(resource.0.len() as u64).to_le_bytes());
    name.extend_from_slice(resource.0.as_bytes());
    name.extend_from_slice(resource.1.as_bytes());
    uuid::Uuid::new_v5(&NAMESPACE, &name)
}

/// Takes the store-wide order of queueings, held until the caller's
/// transaction ends: on the servers the `lock_fencing` row, `FOR UPDATE`; on
/// SQLite the write transaction already holds the only write lock.
pub(crate) async fn wait_order(txn: &DatabaseTransaction) -> Result<()> {
    use entity::lock_fencing;
    lock_first_row::<lock_fencing::Entity>(txn, lock_fencing::Column::Id, "lock_fencing").await
}

/// Locks the row `id = 1` of a one-row table (`FOR UPDATE`) until the
/// caller's transaction ends, on the servers; nothing on SQLite, whose write
/// transaction already holds the only write lock.
async fn lock_first_row<E: sea_orm::EntityTrait>(
    txn: &impl ConnectionTrait,
    id: E::Column,
    table: &'static str,
) -> Result<()>
where
    <E::PrimaryKey as sea_orm::PrimaryKeyTrait>::ValueType: From<i64>,
{
    use sea_orm::QuerySelect;
    if txn.get_database_backend() == DatabaseBackend::Sqlite {
        return Ok(());
    }
    let row: Option<i64> = E::find_by_id(1i64)
        .select_only()
        .column(id)
        .lock_exclusive()
        .into_tuple()
        .one(txn)
        .await?;
    row.map(|_| ()).ok_or(Error::MissingRow { table })
}

/// Runs `update`, which changes at most the row `id`, and returns that row
/// as it left it, or `None` if it changed nothing: one statement with
/// `RETURNING` where the backend has it (PostgreSQL, SQLite), else the
/// update and then a read of the row.
pub(crate) async fn update_one_returning<E>(
    txn: &DatabaseTransaction,
    update: sea_orm::UpdateMany<E>,
    id: <E::PrimaryKey as sea_orm::PrimaryKeyTrait>::ValueType,
) -> Result<Option<E::Model>>
where
    E: sea_orm::EntityTrait,
{
    if txn.support_returning() {
        return Ok(update.exec_with_returning(txn).await?.into_iter().next());
    }
    if update.exec(txn).await?.rows_affected == 0 {
        return Ok(None);
    }
    Ok(E::find_by_id(id).one(txn).await?)
}

/// [`update_one_returning`] as a write of its own. On the library's own
/// PostgreSQL connections it is one statement in the database's own
/// transaction: no `BEGIN` and `COMMIT` round trips. Elsewhere it is a write
/// transaction: SQLite's `BEGIN IMMEDIATE` (a lone write could fail on a
/// stale snapshot instead of waiting), the bounded lock waits of a
/// connection the app set up, the read-back where there is no `RETURNING`.
pub(crate) async fn update_one_alone<E>(
    store: &Store,
    update: sea_orm::UpdateMany<E>,
    id: <E::PrimaryKey as sea_orm::PrimaryKeyTrait>::ValueType,
) -> Result<Option<E::Model>>
where
    E: sea_orm::EntityTrait,
{
    let writer = store.writer();
    let alone = writer.get_database_backend() == DatabaseBackend::Postgres
        && store.txn_lock_timeout.is_none();
    if alone {
        let _gate = write_gate(store).await?;
        return Ok(update.exec_with_returning(writer).await?.into_iter().next());
    }
    let txn = begin_write(store).await?;
    let row = update_one_returning(&txn, update, id).await?;
    txn.commit().await?;
    Ok(row)
}

/// Takes the audit log's turn, held until the caller's transaction ends, so
/// that `seq` is handed out in commit order: on the servers the `audit_head`
/// row, `FOR UPDATE`; on SQLite the write transaction already holds the only
/// write lock.
pub(crate) async fn audit_turn<C: ConnectionTrait>(txn: &C) -> Result<()> {
    use entity::audit_head;
    lock_first_row::<audit_head::Entity>(txn, audit_head::Column::Id, "audit_head").await
}

/// Draws the next fencing token (also a queue's ticket) inside the caller's
/// transaction. On PostgreSQL from `lock_fencing_seq`: a sequence holds no
/// lock until commit, so grants of different resources never wait for each
/// other. On SQLite (one writer at a time) and MariaDB/MySQL from the
/// `lock_fencing` row, whose update holds it until commit. Either way the
/// values only grow in the order they are drawn, and callers draw with
/// their resource's row held, so a resource's tokens only grow.
pub(crate) async fn next_token(txn: &DatabaseTransaction) -> Result<i64> {
    use entity::lock_fencing;
    use sea_orm::sea_query::{Expr, ExprTrait, Query};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let missing = || Error::MissingRow {
        table: "lock_fencing",
    };
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        // A sequence, which the query builder can only call as custom SQL.
        let draw = Query::select()
            .expr(Expr::cust("nextval('lock_fencing_seq')"))
            .to_owned();
        let row = txn.query_one(&draw).await?.ok_or_else(missing)?;
        return Ok(row.try_get_by_index::<i64>(0)?);
    }
    let update = lock_fencing::Entity::update_many()
        .col_expr(
            lock_fencing::Column::LastToken,
            // 64-bit, as the column: sqlx caches a statement's parameter
            // types by its text, so every binding of it must agree.
            Expr::col(lock_fencing::Column::LastToken).add(1i64),
        )
        .filter(lock_fencing::Column::Id.eq(1));
    let counter = update_one_returning(txn, update, 1).await?;
    counter.map(|c| c.last_token).ok_or_else(missing)
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a write bounded by `budget` (with `tokio::time::timeout`) came to.
/// The budget running out, and the server (or SQLite's busy handler) giving up
/// on a lock first, both mean the write was rolled back: [`Error::Timeout`].
pub(crate) fn within_budget<T>(
    outcome: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    started: std::time::Instant,
) -> Result<T> {
    let timed_out = || {
        let elapsed_ms = millis(started.elapsed());
        tracing::warn!(elapsed_ms, "write timed out and was rolled back");
        Err(Error::Timeout { elapsed_ms })
    };
    match outcome {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(Error::Database(e))) if is_lock_timeout(&e) => timed_out(),
        Ok(Err(e)) => Err(e),
        Err(_) => timed_out(),
    }
}
