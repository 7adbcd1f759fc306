use sea_orm_migration::prelude::*;

/// Used when neither `-u/--database-url` nor `DATABASE_URL` is given: the same
/// embedded file the quickstart and the library default to.
const DEFAULT_DATABASE_URL: &str = "sqlite://demiarch-sessions.db?mode=rwc";

fn main() {
    let url_given = std::env::args().any(|a| {
        a == "-u"
            || a == "--database-url"
            || a.starts_with("--database-url=")
            || a.starts_with("-u")
    });
    if !url_given && std::env::var_os("DATABASE_URL").is_none() {
        // Still single-threaded here: the runtime starts below.
        std::env::set_var("DATABASE_URL", DEFAULT_DATABASE_URL);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(cli::run_cli(migration::Migrator));
}
