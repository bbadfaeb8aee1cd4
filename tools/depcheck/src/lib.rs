//! The crate dependency rules of ARCHITECTURE.md, checked against the Cargo manifests.
//!
//! ```text
//! pybind ──▶ planner    ──▶ engine
//!    ├─────▶ shards     ──▶ engine
//!    └─────▶ connectors ──▶ engine
//! ```
//! planner, shards and connectors never depend on each other; nothing depends on pybind or benches
//! (which sees the crates below pybind, like pybind); engine and
//! planner never see glommio or PyO3; only pybind sees PyO3.

use std::path::Path;

/// (crate directory, workspace crates it may depend on, external crates it must not use)
pub const RULES: &[(&str, &[&str], &[&str])] = &[
    ("engine", &[], &["glommio", "pyo3", "pyo3-arrow", "tokio", "io-uring", "core_affinity"]),
    ("planner", &["laminardb-engine"], &["glommio", "pyo3", "pyo3-arrow", "io-uring", "core_affinity"]),
    ("shards", &["laminardb-engine"], &["pyo3", "pyo3-arrow", "tokio"]),
    ("connectors", &["laminardb-engine"], &["glommio", "pyo3", "pyo3-arrow", "io-uring", "core_affinity"]),
    ("pybind", &["laminardb-engine", "laminardb-planner", "laminardb-shards", "laminardb-connectors"], &["glommio", "tokio"]),
    ("benches", &["laminardb-engine", "laminardb-planner", "laminardb-shards", "laminardb-connectors"], &["pyo3", "pyo3-arrow"]),
];

/// Names of the dependencies declared in a manifest's dependency tables.
pub fn dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line.ends_with("dependencies]");
            continue;
        }
        if !in_deps || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, _)) = line.split_once('=') {
            out.push(name.trim().trim_matches('"').to_string());
        }
    }
    out
}

/// Every violation of [`RULES`] in the workspace rooted at `root`.
pub fn violations(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for (dir, allowed_internal, forbidden) in RULES {
        let path = root.join(dir).join("Cargo.toml");
        let manifest = match std::fs::read_to_string(&path) {
            Ok(m) => m,
            Err(e) => {
                found.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        for dep in dependencies(&manifest) {
            if dep.starts_with("laminardb-") && !allowed_internal.contains(&dep.as_str()) {
                found.push(format!("{dir} must not depend on {dep}"));
            }
            if forbidden.contains(&dep.as_str()) {
                found.push(format!("{dir} must not depend on {dep}"));
            }
        }
    }
    found
}
