//! `fuzz/` is a crate of its own (outside the workspace, for its sanitizer flags) with
//! its own `Cargo.lock`, which CI builds with `--locked`. A dependency added to the
//! gateway leaves that lockfile stale, and CI would fail only at its last step; this
//! test fails at once, naming the fix.

use std::process::Command;

#[test]
fn the_fuzz_crates_lockfile_matches_the_gateways_dependencies() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .arg("--manifest-path")
        .arg(format!("{root}/fuzz/Cargo.toml"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "fuzz/Cargo.lock is stale: run `cd fuzz && cargo tree` and commit fuzz/Cargo.lock\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
