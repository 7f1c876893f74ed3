//! Where the lab's real components live and how tests reach them: binary lookup
//! (`WG_LAB_BIN`, then `<workspace>/.cache/lab/bin`, then `PATH`), free loopback ports and
//! memory-backed scratch folders.
//!
//! This module never installs anything: a missing component is an error that names the
//! install script, so a test that needs it fails instead of skipping.

use anyhow::{bail, Context as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the root `Cargo.toml`).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Find a lab binary by name: `$WG_LAB_BIN/NAME`, then `<workspace>/.cache/lab/bin/NAME`,
/// then every folder of `PATH`.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("WG_LAB_BIN") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    candidates.push(workspace_root().join(".cache/lab/bin").join(name));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(name)));
    }
    candidates
        .into_iter()
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "lab component `{name}` not found in $WG_LAB_BIN, .cache/lab/bin or PATH; \
                 run `bash scripts/lab-install.sh`"
            )
        })
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind `:0`, read, release).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A scratch folder in memory (`/dev/shm` when present) so tokens and keys written by a test
/// never reach a disk; removed on drop.
pub fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    };
    dir.context("failed to create a scratch folder")
}

/// Write `contents` to `path` with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("failed to write {}", path.display()))
}

/// The path of a binary built by cargo in this workspace (`target/debug/NAME`, honouring
/// `CARGO_TARGET_DIR`). The test command builds it first (`cargo build -p wg-injector -p
/// wg-sidecar`); a missing binary is an error saying so.
pub fn cargo_binary(name: &str) -> anyhow::Result<PathBuf> {
    cargo_binary_of("debug", name)
}

/// [`cargo_binary`] of the release profile (`target/release/NAME`), for benchmarks: built
/// with `cargo build --release -p NAME`.
pub fn cargo_release_binary(name: &str) -> anyhow::Result<PathBuf> {
    cargo_binary_of("release", name)
}

fn cargo_binary_of(profile: &str, name: &str) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join(profile).join(name);
    if !path.is_file() {
        let flag = if profile == "release" {
            " --release"
        } else {
            ""
        };
        bail!(
            "{} not found: build it first with `cargo build{flag} -p {name}`",
            path.display()
        );
    }
    Ok(path)
}
