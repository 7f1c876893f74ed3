//! Shared plumbing for data-plane tests: network namespaces, veths, a real OpenBao dev server
//! inside a namespace, a `wireguard-go` + `wg` peer, and the `wg-sidecar` binary under test.
//!
//! Everything is named uniquely per test (pid + counter) and removed by drop guards; processes
//! are killed by PID. A missing tool is an error naming `scripts/lab-install.sh` — tests that
//! need it fail, they never skip. Must be run as root (namespaces, TUN devices).
#![allow(dead_code, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use base64::Engine;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique name (≤ 15 bytes): prefix + pid + counter.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// A small unique number for address plans (1..=250).
pub fn subnet_id() -> u8 {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    u8::try_from((std::process::id() + n * 7) % 250 + 1).unwrap()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Finds a lab binary: `$WG_LAB_BIN`, `<workspace>/.cache/lab/bin`, then `PATH`.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut c = Vec::new();
    if let Some(d) = std::env::var_os("WG_LAB_BIN") {
        c.push(PathBuf::from(d).join(name));
    }
    c.push(workspace_root().join(".cache/lab/bin").join(name));
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        c.push(Path::new(dir).join(name));
    }
    if let Some(p) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&p).map(|d| d.join(name)));
    }
    c.into_iter().find(|p| p.is_file()).with_context(|| {
        format!("lab component `{name}` not found ($WG_LAB_BIN, .cache/lab/bin, PATH); run `bash scripts/lab-install.sh`")
    })
}

/// Fails unless running as root (namespaces and TUN devices need it).
pub fn require_root() {
    let uid = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap();
    assert_eq!(
        uid, "0",
        "data-plane tests must run as root (network namespaces, /dev/net/tun)"
    );
}

/// Runs a command, failing with its output when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    check(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `ip ARGS…`
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new(find_binary("ip")?).args(args))
}

/// A memory-backed scratch folder (0700), removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("wg-sidecar-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// Writes a 0600 file.
pub fn write_secret_file(path: &Path, content: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

/// A fresh WireGuard key pair, base64 (private, public).
pub fn keypair() -> (String, String) {
    let k = defguard_wireguard_rs::key::Key::generate();
    (k.to_string(), k.public_key().to_string())
}

/// Hex form of a base64 key (how UAPI and some logs would print it).
pub fn key_hex(b64: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .iter()
        .fold(String::new(), |mut acc, b| {
            use std::fmt::Write as _;
            let _ = write!(acc, "{b:02x}");
            acc
        })
}

/// A network namespace, deleted on drop (with everything inside it).
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates the namespace and brings `lo` up.
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = Self {
            name: unique(prefix),
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program args…` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(find_binary("ip").unwrap());
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a command inside the namespace and returns stdout; fails on non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(find_binary(program)?).args(args))
    }

    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// HTTP GET from inside the namespace: (status, body).
    pub fn http_get(&self, url: &str) -> Result<(u16, String)> {
        let out = self
            .command(find_binary("curl")?)
            .args(["-s", "-m", "2", "-w", "\n%{http_code}", url])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// Connects two namespaces with a veth pair and addresses both ends (`a_addr`, `b_addr` as CIDR).
pub fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> Result<(String, String)> {
    let (ia, ib) = (unique("va"), unique("vb"));
    ip(&[
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", &ia])?;
    b.ip(&["addr", "add", b_addr, "dev", &ib])?;
    a.ip(&["link", "set", &ia, "up"])?;
    b.ip(&["link", "set", &ib, "up"])?;
    Ok((ia, ib))
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
}

impl ChildGuard {
    /// The PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `within`; returns the exit code and the time it took.
    pub fn terminate(&mut self, within: Duration) -> Result<(Option<i32>, Duration)> {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]))?;
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(st) = self.child.try_wait()? {
                return Ok((st.code(), start.elapsed()));
            }
            sleep(Duration::from_millis(10));
        }
        bail!("{} did not exit within {within:?} after SIGTERM", self.what)
    }

    /// Waits for exit and returns (success, stdout, stderr) of piped output.
    pub fn wait_output(&mut self) -> Result<(bool, String, String)> {
        use std::io::Read;
        let (mut so, mut se) = (String::new(), String::new());
        if let Some(mut s) = self.child.stdout.take() {
            s.read_to_string(&mut so)?;
        }
        if let Some(mut s) = self.child.stderr.take() {
            s.read_to_string(&mut se)?;
        }
        Ok((self.child.wait()?.success(), so, se))
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    false
}

/// A real OpenBao dev server running inside a namespace on 127.0.0.1:8200, root token `devroot`.
pub struct OpenBao {
    /// Keep the process (dropped before the scratch folder).
    pub process: ChildGuard,
    /// The namespace it runs in (its name).
    pub netns: String,
    /// Home folder for the CLI's token helper.
    pub home: tempfile::TempDir,
    /// The address as seen inside the namespace.
    pub addr: String,
}

impl OpenBao {
    /// Starts `bao server -dev` inside `ns` and waits until it answers.
    pub fn start(ns: &Netns) -> Result<Self> {
        Self::start_on(ns, "127.0.0.1:8200")
    }

    /// Same, listening on `listen` (`IP:PORT`, an address of `ns`).
    pub fn start_on(ns: &Netns, listen: &str) -> Result<Self> {
        let bao = find_binary("bao")?;
        let home = scratch();
        let addr = format!("http://{listen}");
        let log = fs::File::create(home.path().join("bao.log"))?;
        let child = ns
            .command(&bao)
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=devroot",
                &format!("-dev-listen-address={listen}"),
            ])
            .env_clear()
            .env("HOME", home.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start OpenBao")?;
        let me = Self {
            process: ChildGuard {
                child,
                what: "OpenBao".into(),
            },
            netns: ns.name.clone(),
            home,
            addr,
        };
        let ok = wait_for(Duration::from_secs(15), || {
            me.cli(&["status"], None).is_ok()
        });
        if !ok {
            bail!(
                "OpenBao did not become ready: {}",
                fs::read_to_string(me.home.path().join("bao.log")).unwrap_or_default()
            );
        }
        Ok(me)
    }

    /// Runs the `bao` CLI inside the namespace as root, optionally feeding stdin.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = Command::new(find_binary("ip")?);
        c.args(["netns", "exec", &self.netns])
            .arg(find_binary("bao")?)
            .args(args)
            .env_clear()
            .env("HOME", self.home.path())
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "devroot")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn()?;
        {
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                si.write_all(s.as_bytes())?;
            }
        }
        let out = child.wait_with_output()?;
        check(&c, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a KV v2 secret under `secret/` from JSON given on stdin (values never in argv).
    pub fn put(&self, path: &str, json: &serde_json::Value) -> Result<()> {
        self.cli(
            &["kv", "put", "-mount=secret", path, "-"],
            Some(&json.to_string()),
        )?;
        Ok(())
    }
}

/// An independent WireGuard peer: Debian's `wireguard-go` configured with `wg` and `ip`.
pub struct WgGoPeer {
    /// The wireguard-go process.
    pub process: ChildGuard,
    /// Namespace name.
    pub netns: String,
    /// Interface name.
    pub ifname: String,
    /// Public key (base64).
    pub public_key: String,
    /// Listen port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl WgGoPeer {
    /// Starts wireguard-go in `ns` with a fresh key, address `addr` (CIDR) and UDP `port`.
    pub fn start(ns: &Netns, addr: &str, port: u16) -> Result<Self> {
        Self::start_with_key(ns, addr, port, &keypair())
    }

    /// Same with a given key pair.
    pub fn start_with_key(
        ns: &Netns,
        addr: &str,
        port: u16,
        key: &(String, String),
    ) -> Result<Self> {
        let ifname = unique("wgo");
        let dir = scratch();
        let child = ns
            .command(find_binary("wireguard-go")?)
            .args(["-f", &ifname])
            .env_clear()
            .env("LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let process = ChildGuard {
            child,
            what: "wireguard-go".into(),
        };
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        if !wait_for(Duration::from_secs(5), || sock.exists()) {
            bail!("wireguard-go did not create {}", sock.display());
        }
        let me = Self {
            process,
            netns: ns.name.clone(),
            ifname,
            public_key: key.1.clone(),
            port,
            dir,
        };
        me.set_private_key(&key.0)?;
        ns.run("wg", &["set", &me.ifname, "listen-port", &port.to_string()])?;
        ns.ip(&["addr", "add", addr, "dev", &me.ifname])?;
        ns.ip(&["link", "set", &me.ifname, "up"])?;
        Ok(me)
    }

    fn ns_cmd(&self, program: &str) -> Command {
        let mut c = Command::new(find_binary("ip").unwrap());
        c.args(["netns", "exec", &self.netns])
            .arg(find_binary(program).unwrap());
        c
    }

    /// Sets the private key from a 0600 file (never argv).
    pub fn set_private_key(&self, private_b64: &str) -> Result<()> {
        let f = self.dir.path().join("private_key");
        write_secret_file(&f, private_b64);
        run(self
            .ns_cmd("wg")
            .args(["set", &self.ifname, "private-key"])
            .arg(&f))?;
        fs::remove_file(&f)?;
        Ok(())
    }

    /// Adds or updates a peer; `psk` is written to a 0600 file.
    pub fn set_peer(&self, public_key: &str, allowed_ips: &str, psk: Option<&str>) -> Result<()> {
        let mut c = self.ns_cmd("wg");
        c.args([
            "set",
            &self.ifname,
            "peer",
            public_key,
            "allowed-ips",
            allowed_ips,
        ]);
        let f = self.dir.path().join("psk");
        if let Some(psk) = psk {
            write_secret_file(&f, psk);
            c.arg("preshared-key").arg(&f);
        }
        run(&mut c)?;
        let _ = fs::remove_file(&f);
        Ok(())
    }

    /// Removes a peer.
    pub fn remove_peer(&self, public_key: &str) -> Result<()> {
        run(self
            .ns_cmd("wg")
            .args(["set", &self.ifname, "peer", public_key, "remove"]))?;
        Ok(())
    }

    /// Seconds since the latest handshake with `public_key` (None: never).
    pub fn handshake_age(&self, public_key: &str) -> Result<Option<u64>> {
        let out = run(self
            .ns_cmd("wg")
            .args(["show", &self.ifname, "latest-handshakes"]))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        Ok(out.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == public_key).then_some(())?;
            let t: u64 = it.next()?.parse().ok()?;
            (t > 0).then(|| now.saturating_sub(t))
        }))
    }
}

impl Drop for WgGoPeer {
    fn drop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}

/// The `wg-sidecar` binary under test.
pub fn sidecar_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wg-sidecar"))
}

/// Starts `wg-sidecar ARGS…` inside `ns` with an empty environment (plus `PATH`), logging to
/// `log_path`.
pub fn spawn_sidecar(ns: &Netns, args: &[String], log_path: &Path) -> Result<ChildGuard> {
    let log = fs::File::create(log_path)?;
    let child = ns
        .command(sidecar_bin())
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(ChildGuard {
        child,
        what: "wg-sidecar".into(),
    })
}

/// A TCP echo server (python3) in `ns` on `addr:port`, serving one connection line by line.
pub fn tcp_echo_server(ns: &Netns, addr: &str, port: u16) -> Result<ChildGuard> {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{addr}',{port}))\ns.listen(4)\n\
         while True:\n  c,_=s.accept()\n  while True:\n    d=c.recv(65536)\n    if not d: break\n    c.sendall(d)\n  c.close()\n"
    );
    let child = ns
        .command(find_binary("python3")?)
        .args(["-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let g = ChildGuard {
        child,
        what: "tcp echo server".into(),
    };
    sleep(Duration::from_millis(300));
    Ok(g)
}

/// A TCP client (python3) in `ns` that keeps one connection to `addr:port` for `secs` seconds,
/// exchanging a line every 100 ms; prints `OK <exchanges>` or fails.
pub fn tcp_client(ns: &Netns, addr: &str, port: u16, secs: u32) -> Result<ChildGuard> {
    let code = format!(
        "import socket,time,sys\ns=socket.create_connection(('{addr}',{port}),timeout=30)\n\
         end=time.time()+{secs}\nn=0\nwhile time.time()<end:\n  m=b'ping %d\\n'%n\n  s.sendall(m)\n  got=b''\n\
         \n  while len(got)<len(m):\n    d=s.recv(65536)\n    if not d: sys.exit('closed')\n    got+=d\n\
         \n  assert got==m, got\n  n+=1\n  time.sleep(0.1)\nprint('OK',n)\n"
    );
    let child = ns
        .command(find_binary("python3")?)
        .args(["-c", &code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(ChildGuard {
        child,
        what: "tcp client".into(),
    })
}

/// Reads a metric value by its full series text (e.g. `wg_sidecar_ready`) from an exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real etcd + kube-apiserver on loopback, with a static admin token `admintoken`.
pub struct Kube {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The apiserver's self-signed serving certificate (PEM file).
    pub ca_file: PathBuf,
    apiserver: ChildGuard,
    etcd: ChildGuard,
    dir: tempfile::TempDir,
}

impl Kube {
    /// Starts etcd and kube-apiserver and waits for `/readyz`.
    pub fn start() -> Result<Self> {
        let dir = scratch();
        let d = dir.path();
        let (ec, ep, port) = (free_port(), free_port(), free_port());
        run(Command::new(find_binary("openssl")?)
            .args(["genrsa", "-out"])
            .arg(d.join("sa.key"))
            .arg("2048"))?;
        run(Command::new(find_binary("openssl")?)
            .args(["rsa", "-in"])
            .arg(d.join("sa.key"))
            .args(["-pubout", "-out"])
            .arg(d.join("sa.pub")))?;
        fs::write(
            d.join("tokens.csv"),
            "admintoken,admin,admin,system:masters\n",
        )?;
        let client = format!("http://127.0.0.1:{ec}");
        let peer = format!("http://127.0.0.1:{ep}");
        let etcd_log = fs::File::create(d.join("etcd.log"))?;
        let etcd = Command::new(find_binary("etcd")?)
            .args(["--name", "t", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("t={peer}"),
                "--unsafe-no-fsync",
            ])
            .stdout(etcd_log.try_clone()?)
            .stderr(etcd_log)
            .spawn()?;
        let etcd = ChildGuard {
            child: etcd,
            what: "etcd".into(),
        };
        let api_log = fs::File::create(d.join("apiserver.log"))?;
        let apiserver = Command::new(find_binary("kube-apiserver")?)
            .arg(format!("--etcd-servers={client}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--secure-port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--insecure-port=0",
            ])
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .stdout(api_log.try_clone()?)
            .stderr(api_log)
            .spawn()?;
        let me = Self {
            url: format!("https://127.0.0.1:{port}"),
            ca_file: d.join("certs/apiserver.crt"),
            apiserver: ChildGuard {
                child: apiserver,
                what: "kube-apiserver".into(),
            },
            etcd,
            dir,
        };
        if !wait_for(Duration::from_secs(60), || {
            me.request("GET", "/readyz", None)
                .is_ok_and(|b| b.trim() == "ok")
        }) {
            bail!(
                "kube-apiserver not ready: {}",
                fs::read_to_string(me.dir.path().join("apiserver.log")).unwrap_or_default()
            );
        }
        Ok(me)
    }

    /// An authenticated request as admin (curl); returns the body or fails on HTTP ≥ 400.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String> {
        let mut c = Command::new(find_binary("curl")?);
        c.args(["-sS", "--fail-with-body", "-m", "5", "--cacert"])
            .arg(&self.ca_file)
            .args(["-H", "Authorization: Bearer admintoken", "-X", method])
            .arg(format!("{}{path}", self.url));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
        }
        run(&mut c)
    }

    /// Creates namespace `ns` and service account `sa`, and returns a token for it with `audience`.
    pub fn service_account_token(&self, ns: &str, sa: &str, audience: &str) -> Result<String> {
        self.request(
            "POST",
            "/api/v1/namespaces",
            Some(&serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":ns}})),
        )?;
        self.request(
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            Some(&serde_json::json!({"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":sa}})),
        )?;
        let out = self.request(
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
            Some(
                &serde_json::json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest",
                "spec":{"audiences":[audience],"expirationSeconds":600}}),
            ),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["status"]["token"]
            .as_str()
            .context("no token in TokenRequest answer")?
            .to_owned())
    }
}

/// A real OpenBao dev server on loopback with TLS (`-dev-tls`), root token `devroot`.
pub struct OpenBaoTls {
    /// `https://127.0.0.1:PORT`.
    pub addr: String,
    /// The dev CA that signed the server certificate.
    pub ca_file: PathBuf,
    process: ChildGuard,
    home: tempfile::TempDir,
}

impl OpenBaoTls {
    /// Starts the server and waits until it answers.
    pub fn start() -> Result<Self> {
        let home = scratch();
        let port = free_port();
        let certs = home.path().join("tls");
        fs::create_dir_all(&certs)?;
        let log = fs::File::create(home.path().join("bao.log"))?;
        let child = Command::new(find_binary("bao")?)
            .args(["server", "-dev", "-dev-root-token-id=devroot", "-dev-tls"])
            .arg(format!("-dev-tls-cert-dir={}", certs.display()))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env_clear()
            .env("HOME", home.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let me = Self {
            addr: format!("https://127.0.0.1:{port}"),
            ca_file: certs.join("vault-ca.pem"),
            process: ChildGuard {
                child,
                what: "OpenBao".into(),
            },
            home,
        };
        if !wait_for(Duration::from_secs(15), || {
            me.cli(&["status"], None).is_ok()
        }) {
            bail!(
                "OpenBao (TLS) not ready: {}",
                fs::read_to_string(me.home.path().join("bao.log")).unwrap_or_default()
            );
        }
        Ok(me)
    }

    /// Runs the `bao` CLI as root against this server.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = Command::new(find_binary("bao")?);
        c.args(args)
            .env_clear()
            .env("HOME", self.home.path())
            .env("BAO_ADDR", &self.addr)
            .env("BAO_CACERT", &self.ca_file)
            .env("BAO_TOKEN", "devroot")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn()?;
        {
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                si.write_all(s.as_bytes())?;
            }
        }
        let out = child.wait_with_output()?;
        check(&c, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
