//! The README's first command works: `isthmus-demo --once` walks the migration and prints the
//! closing table with zero failures (short steps here, `--quick`).

use std::process::Command;

#[test]
fn the_demo_walks_the_migration_and_prints_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus-demo"))
        .args(["--once", "--quick", "--id", "99", "--dir"])
        .arg(dir.path().join("world"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo exited {}:\n{stdout}\n{stderr}",
        out.status
    );
    for expected in [
        "step 1 orders served in diego",
        "step 3 cutover: diego stops exporting",
        "step 5 rollback: orders back in diego",
        "requests failures",
        "k8s → billing",
        "diego → echo",
        " 0 failed.",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // --once leaves nothing running: the world's processes are gone with it.
    let ps = Command::new("pgrep")
        .args(["-f", &format!("{}/world/config", dir.path().display())])
        .output();
    if let Ok(ps) = ps {
        assert!(
            String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
            "components still running after the demo exited"
        );
    }
}
