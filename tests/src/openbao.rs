//! A real OpenBao server (the Vault API) on a free loopback port, driven with its own CLI.
//!
//! Test scaffolding, two kinds: [`OpenBao::start`], the dev server (everything in memory, root
//! token the throwaway `devroot`), and [`OpenBao::start_persistent`], a real server (Raft storage
//! and a static auto-unseal key in the memory-backed scratch folder) that can be stopped and
//! started again on the same address with the same data, for outage tests. The admin token is
//! handed to the CLI child processes only, or written to a 0600 file on request. Killed by PID on
//! drop. Secret values are passed to the CLI as `@file` (0600, memory-backed), never on argv.

use crate::lab::{find_binary, free_port, scratch_dir, write_private};
use crate::process::ChildGuard;
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROOT_TOKEN: &str = "devroot";

/// A running OpenBao server.
#[derive(Debug)]
pub struct OpenBao {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    bin: PathBuf,
    child: ChildGuard,
    dir: tempfile::TempDir,
    token: String,
    /// The config file of a persistent server (`None`: the dev server, whose data dies with it).
    config: Option<PathBuf>,
    /// How many times the server was started (names the log of each run).
    starts: u32,
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
            token: ROOT_TOKEN.to_owned(),
            config: None,
            starts: 1,
        };
        bao.wait_until(|b| b.cli(&["status"]).is_ok(), "answering")?;
        Ok(bao)
    }

    /// Start a server whose data survives a restart ([`Self::stop`], then [`Self::start_again`]):
    /// Raft storage and a static seal key in the scratch folder, initialised (one recovery
    /// share) and with a KV v2 engine at `secret/` like the dev server's.
    pub fn start_persistent() -> anyhow::Result<Self> {
        let bin = find_binary("bao")?;
        let dir = scratch_dir("wg-e2e-bao-")?;
        let (port, cluster_port) = (free_port()?, free_port()?);
        let data = dir.path().join("raft");
        std::fs::create_dir(&data)?;
        let seal_key = dir.path().join("seal.key");
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
            .context("failed to read /dev/urandom")?;
        write_private(&seal_key, &key)?;
        let config = dir.path().join("openbao.hcl");
        write_private(
            &config,
            format!(
                "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"wg-e2e\"\n}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
                 cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = true\n}}\n\
                 seal \"static\" {{\n  current_key_id = \"wg-e2e\"\n  \
                 current_key = \"file://{key}\"\n}}\n\
                 api_addr = \"http://127.0.0.1:{port}\"\n\
                 cluster_addr = \"http://127.0.0.1:{cluster_port}\"\n",
                data = data.display(),
                key = seal_key.display(),
            )
            .as_bytes(),
        )?;
        let child = Self::spawn_server(&bin, &config, dir.path(), 1)?;
        let mut bao = Self {
            addr: format!("http://127.0.0.1:{port}"),
            bin,
            child,
            dir,
            token: String::new(),
            config: Some(config),
            starts: 1,
        };
        // `bao status` exits 2 while uninitialised or sealed: any answer with output will do.
        bao.wait_until(
            |b| {
                b.command(&["status", "-format=json"])
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty())
            },
            "answering",
        )?;
        let init = bao.cli(&[
            "operator",
            "init",
            "-recovery-shares=1",
            "-recovery-threshold=1",
            "-format=json",
        ])?;
        let init: serde_json::Value =
            serde_json::from_str(&init).context("bao operator init printed no JSON")?;
        init["root_token"]
            .as_str()
            .context("bao operator init printed no root token")?
            .clone_into(&mut bao.token);
        bao.wait_active()?;
        bao.cli(&["secrets", "enable", "-path=secret", "kv-v2"])?;
        // A new KV v2 mount upgrades itself for a moment before it takes writes.
        bao.wait_until(
            |b| {
                b.cli(&["kv", "put", "secret/wg-e2e-probe", "ready=1"])
                    .is_ok()
            },
            "taking KV writes",
        )?;
        bao.cli(&["kv", "metadata", "delete", "secret/wg-e2e-probe"])?;
        Ok(bao)
    }

    fn spawn_server(bin: &Path, config: &Path, dir: &Path, run: u32) -> anyhow::Result<ChildGuard> {
        let mut cmd = Command::new(bin);
        cmd.arg("server")
            .arg(format!("-config={}", config.display()))
            .env("HOME", dir);
        ChildGuard::spawn(&format!("openbao-{run}"), cmd, dir)
    }

    /// Stop the server now (SIGKILL by its PID): clients get "connection refused" until
    /// [`Self::start_again`].
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Start a persistent server again on the same address with the same data (auto-unsealed),
    /// and wait until it serves requests.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let Some(config) = self.config.clone() else {
            bail!(
                "the dev server keeps its data in memory: use OpenBao::start_persistent to restart"
            );
        };
        self.child.stop();
        self.starts += 1;
        self.child = Self::spawn_server(&self.bin, &config, self.dir.path(), self.starts)?;
        self.wait_active()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    fn wait_active(&mut self) -> anyhow::Result<()> {
        // Listing the mounts needs an unsealed, active node.
        self.wait_until(|b| b.cli(&["secrets", "list"]).is_ok(), "active")
    }

    fn wait_until(&mut self, ready: impl Fn(&Self) -> bool, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.child.is_running() {
                bail!("openbao exited\n{}", self.child.log_tail(3000));
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("openbao not {what}\n{}", self.child.log_tail(3000));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env("HOME", self.dir.path());
        cmd
    }

    /// Run `bao ARGS…` as root against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
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

    /// The admin (root) token in a private file (0600, memory-backed), for
    /// `--vault-auth token --vault-token-file …` as an operator runs `wg-sidecar` with it.
    pub fn admin_token_file(&self) -> anyhow::Result<PathBuf> {
        self.private_file("admin.token", self.token.as_bytes())
    }

    /// The output of the server so far (all runs of a persistent server), for failure messages.
    #[must_use]
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|run| {
                let name = if self.config.is_some() {
                    format!("openbao-{run}.log")
                } else {
                    "openbao.log".to_owned()
                };
                std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- restarted ---\n")
    }

    /// The scratch folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
