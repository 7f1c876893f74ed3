//! The WireGuard interface, behind the [`Tunnel`] seam.
//!
//! Owns: creating the interface (kernel WireGuard when the kernel has it, else the embedded
//! BoringTun userspace device, chosen automatically), addresses and MTU (also changed in place,
//! for `--mtu auto`), the private key, the peer set (add/update/remove without recreating the
//! interface) and per-peer statistics.
//! Must never: touch routes (see `routes`), log keys, or recreate the interface to apply a change.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime},
};

use defguard_boringtun::device::DeviceHandle;
use defguard_wireguard_rs::{
    error::WireguardInterfaceError, key::Key, net::IpAddrMask, peer::Peer, InterfaceConfiguration,
    Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use ipnet::IpNet;

use crate::{
    error::{Result, SidecarError},
    keysource::decode_key,
    secret::Secret,
};

mod link;
mod userspace;
pub use userspace::UserspaceConfig;

/// BoringTun worker threads set by `--userspace-threads` (0: not set, use [`default_threads`]).
static USERSPACE_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Most threads the default picks: one peer's packets are encrypted under that peer's lock, so
/// many threads only add wake-ups. On 2 cores, 2 threads measured best (docs/benchmarks.md).
const DEFAULT_MAX_THREADS: usize = 4;

/// The default thread count: the cores this process may use (cgroup quota and affinity
/// included), at most [`DEFAULT_MAX_THREADS`].
#[must_use]
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(DEFAULT_MAX_THREADS)
}

/// Sets the worker threads of userspace devices created from now on in this process
/// (`--userspace-threads`; 0 restores [`default_threads`]). Kernel WireGuard ignores it.
pub fn set_userspace_threads(threads: usize) {
    USERSPACE_THREADS.store(threads, Ordering::Relaxed);
}

/// The userspace device configuration: the chosen thread count, one shared TUN queue (a TCP
/// flow hashes to one queue, so per-thread queues leave one thread reading all of it; measured
/// 0.78–0.92 × wireguard-go with 3–4 threads on per-thread queues against 1.07 × on one queue),
/// connected per-peer UDP sockets as the library has them (no measurable difference).
fn userspace_config() -> UserspaceConfig {
    let threads = match USERSPACE_THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    };
    UserspaceConfig {
        threads,
        connected_socket: true,
        multi_queue: false,
    }
}

/// Which WireGuard implementation backs the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The Linux kernel module, over netlink.
    Kernel,
    /// BoringTun embedded in this process, over a TUN device.
    Userspace,
}

impl Mode {
    /// `kernel` or `userspace`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

/// The desired state of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Base64 public key.
    pub public_key: String,
    /// Optional preshared key.
    pub preshared_key: Option<Secret>,
    /// Endpoint (already resolved).
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive seconds.
    pub keepalive: Option<u16>,
}

/// What the interface reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// Base64 public key.
    pub public_key: String,
    /// Current endpoint (may have roamed).
    pub endpoint: Option<SocketAddr>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
}

/// The operations the control loop and the gateway need from a WireGuard interface.
pub trait Tunnel: Send {
    /// Kernel or userspace.
    fn mode(&self) -> Mode;
    /// Interface name.
    fn name(&self) -> &str;
    /// Replaces the private key in place.
    fn set_private_key(&mut self, key: &Secret) -> Result<()>;
    /// Adds a peer or updates it (endpoint, allowed IPs, keepalive, preshared key). In userspace
    /// mode an update re-creates the peer, so its session restarts with a new handshake.
    fn set_peer(&mut self, peer: &PeerSpec) -> Result<()>;
    /// Removes a peer by base64 public key.
    fn remove_peer(&mut self, public_key: &str) -> Result<()>;
    /// Per-peer statistics.
    fn peer_stats(&self) -> Result<Vec<PeerStats>>;
    /// Removes the peers `remove`, then adds the peers `add` (none of which may exist), as one
    /// batch where the implementation allows it (the gateway applies thousands this way).
    fn apply_peer_changes(&mut self, remove: &[String], add: &[PeerSpec]) -> Result<()> {
        for key in remove {
            self.remove_peer(key)?;
        }
        for peer in add {
            self.set_peer(peer)?;
        }
        Ok(())
    }
    /// Removes the interface.
    fn remove(&mut self) -> Result<()>;
}

/// Makes the interface's peer set equal to `desired`: removes peers not listed, sets the others.
pub fn replace_peers(tunnel: &mut impl Tunnel, desired: &[PeerSpec]) -> Result<()> {
    let current = tunnel.peer_stats()?;
    for stale in current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.public_key == c.public_key))
    {
        tunnel.remove_peer(&stale.public_key)?;
    }
    for peer in desired {
        tunnel.set_peer(peer)?;
    }
    Ok(())
}

/// Bound on one UAPI exchange with the userspace device.
const UAPI_TIMEOUT: Duration = Duration::from_millis(250);

enum Api {
    Kernel(WGApi<Kernel>),
    /// The configuration API and the device it configures (`None` once removed).
    Userspace(WGApi<Userspace>, Option<DeviceHandle>),
}

/// A real WireGuard interface driven by `defguard_wireguard_rs`.
pub struct WgTunnel {
    name: String,
    api: Api,
    mtu: u32,
    addresses: Vec<IpNet>,
    listen_port: u16,
    /// The firewall mark of the WireGuard UDP socket (UAPI `fwmark=`, or the kernel's).
    fwmark: Option<u32>,
    removed: bool,
}

impl std::fmt::Debug for WgTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgTunnel")
            .field("name", &self.name)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

fn to_mask(net: &IpNet) -> IpAddrMask {
    IpAddrMask::new(net.addr(), net.prefix_len())
}

fn wg_key(field: &str, value: &str) -> Result<Key> {
    let mut raw = decode_key("tunnel", field, value)?;
    let k = Key::new(raw);
    zeroize::Zeroize::zeroize(&mut raw);
    Ok(k)
}

fn to_peer(spec: &PeerSpec) -> Result<Peer> {
    let mut p = Peer::new(wg_key("public_key", &spec.public_key)?);
    p.preshared_key = match &spec.preshared_key {
        Some(psk) => Some(wg_key("preshared_key", psk.expose())?),
        None => None,
    };
    p.endpoint = spec.endpoint;
    p.persistent_keepalive_interval = spec.keepalive;
    p.allowed_ips = spec.allowed_ips.iter().map(to_mask).collect();
    Ok(p)
}

/// Reads peer statistics over UAPI with a short timeout. (The library's reader retries a
/// timed-out read forever; a stuck device must not stall the control loop.)
fn uapi_get(name: &str) -> std::io::Result<Vec<PeerStats>> {
    let path = format!("/var/run/wireguard/{name}.sock");
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(UAPI_TIMEOUT))?;
    s.set_write_timeout(Some(UAPI_TIMEOUT))?;
    s.write_all(b"get=1\n\n")?;
    let mut peers: Vec<PeerStats> = Vec::new();
    let (mut secs, mut nanos) = (0u64, 0u64);
    let finish = |peers: &mut Vec<PeerStats>, secs: u64, nanos: u64| {
        if let Some(p) = peers.last_mut() {
            if secs > 0 || nanos > 0 {
                p.last_handshake = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(secs)
                        + Duration::from_nanos(nanos),
                );
            }
        }
    };
    for line in BufReader::new(s).lines() {
        let line = line?;
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "public_key" => {
                finish(&mut peers, secs, nanos);
                (secs, nanos) = (0, 0);
                let key = Key::decode(v)
                    .map_err(|_| std::io::Error::other("bad public_key in UAPI answer"))?;
                peers.push(PeerStats {
                    public_key: key.to_string(),
                    endpoint: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    last_handshake: None,
                });
            }
            "endpoint" => {
                if let Some(p) = peers.last_mut() {
                    p.endpoint = v.parse().ok();
                }
            }
            "rx_bytes" => {
                if let Some(p) = peers.last_mut() {
                    p.rx_bytes = v.parse().unwrap_or_default();
                }
            }
            "tx_bytes" => {
                if let Some(p) = peers.last_mut() {
                    p.tx_bytes = v.parse().unwrap_or_default();
                }
            }
            "last_handshake_time_sec" => secs = v.parse().unwrap_or_default(),
            "last_handshake_time_nsec" => nanos = v.parse().unwrap_or_default(),
            "errno" => {
                finish(&mut peers, secs, nanos);
                return if v.trim() == "0" {
                    Ok(peers)
                } else {
                    Err(std::io::Error::other(format!("UAPI errno {v}")))
                };
            }
            _ => {}
        }
    }
    Err(std::io::Error::other("UAPI closed without errno"))
}

/// Per-peer statistics of the userspace interface `name`, over UAPI (bounded).
fn userspace_stats(name: &str) -> Result<Vec<PeerStats>> {
    uapi_get(name).map_err(|e| SidecarError::Tunnel {
        op: "read statistics of",
        interface: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Per-peer statistics of the kernel interface `name`, over netlink (through `kernel`).
fn kernel_stats(name: &str, kernel: &dyn WireguardInterfaceApi) -> Result<Vec<PeerStats>> {
    let host = kernel
        .read_interface_data()
        .map_err(|e| SidecarError::Tunnel {
            op: "read",
            interface: name.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(host
        .peers
        .into_values()
        .map(|p| PeerStats {
            public_key: p.public_key.to_string(),
            endpoint: p.endpoint,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            last_handshake: p.last_handshake.filter(|t| *t > SystemTime::UNIX_EPOCH),
        })
        .collect())
}

/// Reads one interface's peer statistics apart from its [`WgTunnel`], from any thread (the
/// `/metrics` handler reads the counters at scrape time while the control loop owns the
/// tunnel). Reads only; cheap to clone.
#[derive(Debug, Clone)]
pub struct StatsReader {
    name: String,
    mode: Mode,
}

impl StatsReader {
    /// Per-peer statistics now (a userspace read is bounded like the control loop's).
    pub fn peer_stats(&self) -> Result<Vec<PeerStats>> {
        if self.mode == Mode::Userspace {
            return userspace_stats(&self.name);
        }
        let kernel =
            WGApi::<Kernel>::new(self.name.as_str()).map_err(|e| SidecarError::Tunnel {
                op: "prepare",
                interface: self.name.clone(),
                reason: e.to_string(),
            })?;
        kernel_stats(&self.name, &kernel)
    }
}

/// True when `e` is the "no DNS backend" failure `remove_interface` reports after removal.
#[must_use]
pub fn is_dns_backend_error(e: &WireguardInterfaceError) -> bool {
    matches!(e, WireguardInterfaceError::DnsError(_))
}

impl WgTunnel {
    /// Creates `name`: kernel WireGuard if available, else userspace; sets MTU, addresses and key,
    /// and marks the packets of its UDP socket with `fwmark` (the Pod's policy routing sends
    /// them by the main table, see `routes`; both implementations apply it to every socket they
    /// open, the listening ones and the per-peer connected ones alike).
    pub fn create(
        name: &str,
        mtu: u32,
        addresses: &[IpNet],
        private_key: &Secret,
        fwmark: u32,
    ) -> Result<Self> {
        Self::create_with(name, mtu, addresses, private_key, 0, Some(fwmark))
    }

    /// Creates `name` like [`WgTunnel::create`] without a mark, listening on UDP `listen_port`
    /// (0: any; the gateway's server side).
    pub fn create_listening(
        name: &str,
        mtu: u32,
        addresses: &[IpNet],
        private_key: &Secret,
        listen_port: u16,
    ) -> Result<Self> {
        Self::create_with(name, mtu, addresses, private_key, listen_port, None)
    }

    fn create_with(
        name: &str,
        mtu: u32,
        addresses: &[IpNet],
        private_key: &Secret,
        listen_port: u16,
        fwmark: Option<u32>,
    ) -> Result<Self> {
        let err = |op: &'static str| {
            move |e: WireguardInterfaceError| SidecarError::Tunnel {
                op,
                interface: name.to_owned(),
                reason: e.to_string(),
            }
        };
        // The name is the sidecar's (the injector reserves it in the Pod): a link of that name
        // is one an earlier run left behind when it was killed without cleanup.
        match link::delete_if_present(name) {
            Ok(true) => tracing::warn!(
                interface = name,
                "removed an interface left behind by an earlier run that did not exit cleanly (OOM kill or SIGKILL); creating it again"
            ),
            Ok(false) => {}
            Err(e) => {
                return Err(SidecarError::Tunnel {
                    op: "remove the leftover",
                    interface: name.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
        let mut kernel = WGApi::<Kernel>::new(name).map_err(err("prepare"))?;
        let api = match kernel.create_interface() {
            Ok(()) => Api::Kernel(kernel),
            Err(e) => {
                tracing::info!(interface = name, reason = %e, "kernel WireGuard unavailable, using the embedded userspace implementation");
                std::fs::create_dir_all("/var/run/wireguard").map_err(|e| {
                    SidecarError::Tunnel {
                        op: "create runtime dir for",
                        interface: name.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                let user = WGApi::<Userspace>::new(name).map_err(err("prepare"))?;
                let cfg = userspace_config();
                let device = userspace::create(name, cfg).map_err(|e| SidecarError::Tunnel {
                    op: "create",
                    interface: name.to_owned(),
                    reason: e.to_string(),
                })?;
                tracing::info!(
                    interface = name,
                    threads = cfg.threads,
                    connected_socket = cfg.connected_socket,
                    multi_queue = cfg.multi_queue,
                    "userspace WireGuard device started"
                );
                Api::Userspace(user, Some(device))
            }
        };
        let mut t = Self {
            name: name.to_owned(),
            api,
            mtu,
            addresses: addresses.to_vec(),
            listen_port,
            fwmark,
            removed: false,
        };
        if let Err(e) = t.configure(private_key, &[]) {
            let _ = t.remove();
            return Err(e);
        }
        tracing::info!(
            interface = name,
            mode = t.mode().as_str(),
            "WireGuard interface created"
        );
        Ok(t)
    }

    /// The interface MTU.
    #[must_use]
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Changes the interface MTU in place (`--mtu auto` after an endpoint change), over netlink
    /// for either implementation (BoringTun reads the TUN device's MTU again within a second; a
    /// smaller MTU holds at once, the kernel enforces it on the TUN device). Later
    /// reconfigurations keep it.
    pub fn set_mtu(&mut self, mtu: u32) -> Result<()> {
        link::set_mtu(&self.name, mtu).map_err(|e| SidecarError::Tunnel {
            op: "set the MTU of",
            interface: self.name.clone(),
            reason: e.to_string(),
        })?;
        self.mtu = mtu;
        Ok(())
    }

    /// A reader of this interface's statistics for another thread (see [`StatsReader`]).
    #[must_use]
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader {
            name: self.name.clone(),
            mode: self.mode(),
        }
    }

    fn iface(&self) -> &dyn WireguardInterfaceApi {
        match &self.api {
            Api::Kernel(a) => a,
            Api::Userspace(a, _) => a,
        }
    }

    fn tunnel_err(
        &self,
        op: &'static str,
    ) -> impl Fn(WireguardInterfaceError) -> SidecarError + '_ {
        move |e| SidecarError::Tunnel {
            op,
            interface: self.name.clone(),
            reason: e.to_string(),
        }
    }

    fn configure(&self, private_key: &Secret, peers: &[Peer]) -> Result<()> {
        let cfg = InterfaceConfiguration {
            name: self.name.clone(),
            prvkey: private_key.expose().to_owned(),
            addresses: self.addresses.iter().map(to_mask).collect(),
            port: self.listen_port,
            peers: peers.to_vec(),
            mtu: Some(self.mtu),
            fwmark: self.fwmark,
        };
        let res = self.iface().configure_interface(&cfg);
        let mut prvkey = cfg.prvkey;
        zeroize::Zeroize::zeroize(&mut prvkey);
        res.map_err(self.tunnel_err("configure"))
    }

    /// Sends one `set=1` UAPI request to the userspace device.
    fn uapi_set(&self, body: &str) -> std::io::Result<()> {
        let path = format!("/var/run/wireguard/{}.sock", self.name);
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(UAPI_TIMEOUT))?;
        s.set_write_timeout(Some(UAPI_TIMEOUT))?;
        s.write_all(b"set=1\n")?;
        s.write_all(body.as_bytes())?;
        s.write_all(b"\n")?;
        for line in BufReader::new(s).lines() {
            let line = line?;
            if let Some(errno) = line.strip_prefix("errno=") {
                return if errno.trim() == "0" {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("UAPI errno {errno}")))
                };
            }
        }
        Err(std::io::Error::other("UAPI closed without errno"))
    }
}

impl Tunnel for WgTunnel {
    fn mode(&self) -> Mode {
        match self.api {
            Api::Kernel(_) => Mode::Kernel,
            Api::Userspace(..) => Mode::Userspace,
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_private_key(&mut self, key: &Secret) -> Result<()> {
        let k = wg_key("private_key", key.expose())?;
        match &self.api {
            Api::Userspace(..) => {
                // Only the key: listen port and peers stay as they are.
                let mut body = format!("private_key={}\n", k.to_lower_hex());
                let res = self.uapi_set(&body);
                zeroize::Zeroize::zeroize(&mut body);
                res.map_err(|e| SidecarError::Tunnel {
                    op: "set private key on",
                    interface: self.name.clone(),
                    reason: e.to_string(),
                })
            }
            Api::Kernel(a) => {
                let peers: Vec<Peer> = a
                    .read_interface_data()
                    .map_err(self.tunnel_err("read"))?
                    .peers
                    .into_values()
                    .collect();
                self.configure(key, &peers)
            }
        }
    }

    fn set_peer(&mut self, peer: &PeerSpec) -> Result<()> {
        let p = to_peer(peer)?;
        // BoringTun cannot modify an existing peer (it asserts); remove it and add it again.
        if matches!(self.api, Api::Userspace(..))
            && self
                .peer_stats()?
                .iter()
                .any(|s| s.public_key == peer.public_key)
        {
            self.remove_peer(&peer.public_key)?;
        }
        self.iface()
            .configure_peer(&p)
            .map_err(self.tunnel_err("configure peer on"))
    }

    fn apply_peer_changes(&mut self, remove: &[String], add: &[PeerSpec]) -> Result<()> {
        if matches!(self.api, Api::Kernel(_)) {
            for key in remove {
                self.remove_peer(key)?;
            }
            for peer in add {
                self.iface()
                    .configure_peer(&to_peer(peer)?)
                    .map_err(self.tunnel_err("configure peer on"))?;
            }
            return Ok(());
        }
        if remove.is_empty() && add.is_empty() {
            return Ok(());
        }
        // BoringTun's UAPI parser does not reset `remove`, `endpoint`, `persistent_keepalive_interval`
        // or `preshared_key` between the peer sections of one request: a section inherits what
        // the previous one set. So removals go in their own request (first, so a new key can take
        // over the allowed IPs of the key it replaces), and additions share one request only
        // when none sets an endpoint or preshared key and all share one keepalive (which every
        // section then sets explicitly); otherwise each gets its own.
        let mut requests: Vec<String> = Vec::new();
        if !remove.is_empty() {
            let mut body = String::new();
            for key in remove {
                body.push_str(&Peer::new(wg_key("public_key", key)?).as_uapi_remove());
            }
            requests.push(body);
        }
        let plain = add.iter().all(|p| {
            p.preshared_key.is_none() && p.endpoint.is_none() && p.keepalive == add[0].keepalive
        });
        if plain && !add.is_empty() {
            let mut body = String::new();
            for peer in add {
                body.push_str(&to_peer(peer)?.as_uapi_update());
            }
            requests.push(body);
        } else {
            for peer in add {
                requests.push(to_peer(peer)?.as_uapi_update());
            }
        }
        for mut body in requests {
            let res = self.uapi_set(&body);
            zeroize::Zeroize::zeroize(&mut body);
            res.map_err(|e| SidecarError::Tunnel {
                op: "apply peer changes on",
                interface: self.name.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn remove_peer(&mut self, public_key: &str) -> Result<()> {
        let k = wg_key("public_key", public_key)?;
        self.iface()
            .remove_peer(&k)
            .map_err(self.tunnel_err("remove peer from"))
    }

    fn peer_stats(&self) -> Result<Vec<PeerStats>> {
        match self.api {
            Api::Userspace(..) => userspace_stats(&self.name),
            Api::Kernel(ref a) => kernel_stats(&self.name, a),
        }
    }

    fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let res = self.iface().remove_interface();
        if let Api::Userspace(_, device) = &mut self.api {
            // Stops the worker threads; the TUN interface goes away with the device.
            drop(device.take());
        }
        match res {
            Ok(()) => Ok(()),
            Err(e) if is_dns_backend_error(&e) => {
                tracing::debug!(interface = %self.name, reason = %e, "no DNS backend to clean up (not an error)");
                Ok(())
            }
            Err(e) => Err(self.tunnel_err("remove")(e)),
        }
    }
}

impl Drop for WgTunnel {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "interface removal on drop failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::{replace_peers, Mode, PeerSpec, PeerStats, Tunnel};
    use crate::{error::Result, secret::Secret};

    #[derive(Default)]
    struct FakeTunnel {
        peers: BTreeMap<String, PeerSpec>,
        ops: Vec<String>,
    }

    impl Tunnel for FakeTunnel {
        fn mode(&self) -> Mode {
            Mode::Userspace
        }
        #[allow(clippy::unnecessary_literal_bound)]
        fn name(&self) -> &str {
            "fake0"
        }
        fn set_private_key(&mut self, _key: &Secret) -> Result<()> {
            self.ops.push("key".into());
            Ok(())
        }
        fn set_peer(&mut self, peer: &PeerSpec) -> Result<()> {
            self.ops.push(format!("set {}", peer.public_key));
            self.peers.insert(peer.public_key.clone(), peer.clone());
            Ok(())
        }
        fn remove_peer(&mut self, public_key: &str) -> Result<()> {
            self.ops.push(format!("remove {public_key}"));
            self.peers.remove(public_key);
            Ok(())
        }
        fn peer_stats(&self) -> Result<Vec<PeerStats>> {
            Ok(self
                .peers
                .keys()
                .map(|k| PeerStats {
                    public_key: k.clone(),
                    endpoint: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    last_handshake: None,
                })
                .collect())
        }
        fn remove(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn spec(k: &str) -> PeerSpec {
        PeerSpec {
            public_key: k.into(),
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec![],
            keepalive: None,
        }
    }

    #[test]
    fn userspace_threads_default_to_the_available_cores_capped_at_four_and_follow_the_flag() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(super::default_threads(), cores.min(4));
        assert_eq!(super::userspace_config().threads, cores.min(4));
        super::set_userspace_threads(3);
        let cfg = super::userspace_config();
        super::set_userspace_threads(0);
        assert_eq!(cfg.threads, 3);
        assert_eq!(super::userspace_config().threads, cores.min(4));
    }

    #[test]
    fn replacing_peers_removes_the_stale_one_and_keeps_the_rest() {
        let mut t = FakeTunnel::default();
        replace_peers(&mut t, &[spec("a"), spec("b")]).unwrap();
        t.ops.clear();
        replace_peers(&mut t, &[spec("b"), spec("c")]).unwrap();
        assert_eq!(t.ops, vec!["remove a", "set b", "set c"]);
        assert_eq!(t.peers.keys().collect::<Vec<_>>(), vec!["b", "c"]);
    }
}
