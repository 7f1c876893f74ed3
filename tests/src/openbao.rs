//! A real OpenBao dev server (the Vault API) on a free loopback port, driven with its own CLI.
//!
//! Test scaffolding: the dev server keeps everything in memory and its root token is the
//! throwaway `devroot`, handed to the CLI child processes only. Killed by PID on drop. Secret
//! values are passed to the CLI as `@file` (0600, memory-backed), never on argv.

use crate::lab::{find_binary, free_port, scratch_dir, write_private};
use crate::process::ChildGuard;
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROOT_TOKEN: &str = "devroot";

/// A running `bao server -dev`.
#[derive(Debug)]
pub struct OpenBao {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    bin: PathBuf,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl OpenBao {
    /// Start the dev server and wait until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = find_binary("bao")?;
        let dir = scratch_dir("wg-e2e-bao-")?;
        let port = free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", dir.path());
        let child = ChildGuard::spawn("openbao", cmd, dir.path())?;
        let mut bao = Self {
            addr: format!("http://127.0.0.1:{port}"),
            bin,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !bao.child.is_running() {
                bail!("openbao exited\n{}", bao.child.log_tail(3000));
            }
            if bao.cli(&["status"]).is_ok() {
                return Ok(bao);
            }
            if Instant::now() > deadline {
                bail!("openbao not ready\n{}", bao.child.log_tail(3000));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `bao ARGS…` as root against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", ROOT_TOKEN)
            .env("HOME", self.dir.path())
            .output()
            .with_context(|| format!("failed to run bao {args:?}"))?;
        if !out.status.success() {
            bail!(
                "bao {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Write a private file (0600) in this server's scratch folder, for `@file` arguments.
    pub fn private_file(&self, name: &str, contents: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        write_private(&path, contents)?;
        Ok(path)
    }

    /// The scratch folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
