use std::path::Path;

#[test]
fn crate_dependencies_follow_the_architecture() {
    // Read when the test runs, not when it was compiled: a test binary reused from the
    // build cache of another checkout must check this one.
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
    let root = Path::new(&dir).join("../..");
    let violations = laminardb_depcheck::violations(&root);
    assert!(violations.is_empty(), "forbidden dependency edges:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_a_forbidden_edge() {
    let manifest = "[package]\nname = \"x\"\n[dependencies]\nlaminardb-planner = { workspace = true }\n";
    assert_eq!(laminardb_depcheck::dependencies(manifest), vec!["laminardb-planner"]);
    let dir = std::env::temp_dir().join(format!("depcheck-{}", std::process::id()));
    for krate in ["engine", "planner", "shards", "connectors", "pybind", "benches"] {
        std::fs::create_dir_all(dir.join(krate)).unwrap();
        let body = if krate == "shards" { manifest } else { "[dependencies]\n" };
        std::fs::write(dir.join(krate).join("Cargo.toml"), body).unwrap();
    }
    let v = laminardb_depcheck::violations(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(v, vec!["shards must not depend on laminardb-planner".to_string()]);
}
