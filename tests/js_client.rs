//! The JavaScript client's own unit tests (`clients/js/*.test.js`), run by Node's
//! built-in test runner so that `cargo test` runs them too. Node comes with the
//! machine image; `.ci/run` installs it where missing.

use std::process::Command;

#[test]
fn the_javascript_clients_unit_tests_pass_under_node() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): `.ci/run` installs Node.js; by hand: apt-get install -y nodejs"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{report}");
    let ran = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("ℹ tests "))
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert!(ran.is_some_and(|n| n > 0), "node ran no tests:\n{report}");
}
