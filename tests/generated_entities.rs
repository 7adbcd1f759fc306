//! `entity/src/` is exactly what `sea-orm-cli generate entity` writes from a
//! freshly migrated SQLite database: no file is edited by hand.
//!
//! After adding a migration, regenerate the entities with
//!
//! ```sh
//! REGENERATE_ENTITIES=1 cargo test --test generated_entities
//! ```
//!
//! which runs the same generator, with the flags in [`GENERATE`], into
//! `entity/src/`. It is the command
//! `sea-orm-cli generate entity -u sqlite://<migrated file> -o entity/src`
//! followed by those flags, run by sea-orm-cli 2.0.4 built as a library.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sea_orm::Database;
use sea_orm_cli::{Cli, Commands};
use sea_orm_migration::MigratorTrait;

/// The flags of `sea-orm-cli generate entity`, after the database URL and the
/// output directory.
const GENERATE: &[&str] = &["--lib", "--with-prelude", "all", "--with-serde", "both"];

fn entity_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("entity")
        .join("src")
}

/// Every `.rs` file of a directory, by name.
fn rust_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read_to_string(&path).expect("read file"))
        })
        .collect()
}

/// Migrates a fresh SQLite file and runs sea-orm-cli's generator on it into
/// `out`.
async fn generate_into(out: &Path) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("schema.db").display()
    );
    let db = Database::connect(&url).await.expect("connect");
    migration::Migrator::up(&db, None).await.expect("migrate");
    db.close().await.expect("close");

    let out = out.to_str().expect("utf-8 path");
    let mut argv = vec![
        "sea-orm-cli",
        "generate",
        "entity",
        "--database-url",
        &url,
        "--output-dir",
        out,
    ];
    argv.extend_from_slice(GENERATE);
    let cli = <Cli as clap::Parser>::try_parse_from(argv).expect("sea-orm-cli arguments");
    let Commands::Generate { command } = cli.command else {
        panic!("not a generate command");
    };
    sea_orm_cli::run_generate_command(command, false)
        .await
        .expect("sea-orm-cli generate entity");
}

#[tokio::test(flavor = "multi_thread")]
async fn entity_files_are_exactly_what_sea_orm_cli_generates() {
    if std::env::var_os("REGENERATE_ENTITIES").is_some() {
        let src = entity_src();
        for name in rust_files(&src).keys() {
            std::fs::remove_file(src.join(name)).expect("remove old entity file");
        }
        generate_into(&src).await;
        println!("regenerated {}", src.display());
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    generate_into(out.path()).await;
    let generated = rust_files(out.path());
    let committed = rust_files(&entity_src());
    assert!(!generated.is_empty(), "the generator wrote no file");
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "entity/src has other files than sea-orm-cli generates; \
         run REGENERATE_ENTITIES=1 cargo test --test generated_entities"
    );
    for (name, text) in &generated {
        assert_eq!(
            committed[name], *text,
            "entity/src/{name} differs from what sea-orm-cli generates; \
             run REGENERATE_ENTITIES=1 cargo test --test generated_entities"
        );
    }
}
