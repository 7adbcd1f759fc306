//! The README's Rust examples are complete programs, compiled and run as
//! printed (src/lib.rs includes the README as doc tests): none may hide a
//! line from the reader with rustdoc's `# ` prefix.

const README: &str = include_str!("../README.md");

/// Each ```rust block's lines, with the line number of its fence.
fn rust_blocks() -> Vec<(usize, Vec<&'static str>)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, Vec<&str>)> = None;
    for (n, line) in README.lines().enumerate() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```rust") => current = Some((n + 1, Vec::new())),
            (Some(_), fence) if fence.starts_with("```") => blocks.extend(current.take()),
            (Some((_, lines)), _) => lines.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "README ends inside a ```rust block");
    blocks
}

#[test]
fn readme_examples_hide_no_line() {
    let blocks = rust_blocks();
    assert!(!blocks.is_empty(), "the README has Rust examples");
    for (fence, lines) in blocks {
        for line in &lines {
            let trimmed = line.trim_start();
            assert!(
                !(trimmed == "#" || trimmed.starts_with("# ")),
                "README.md line {fence}: the example hides {line:?}; show every line"
            );
        }
        let text = lines.join("\n");
        assert!(
            text.contains("fn main()"),
            "README.md line {fence}: the example is not a complete program"
        );
    }
}

#[test]
fn readme_says_what_an_app_depends_on_and_how_to_install_the_cli() {
    assert!(README.contains("[dependencies]\ndemiarch-sessions = "));
    assert!(README.contains("cargo install --path ."));
    let manifest = include_str!("../Cargo.toml");
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.split('.').next().zip(v.split('.').nth(1)))
        .map(|(major, minor)| format!("{major}.{minor}"))
        .expect("the package version");
    assert!(
        README.contains(&format!("demiarch-sessions = {{ version = \"{version}\"")),
        "the README's [dependencies] name version {version}"
    );
}
