//! The `wg-sidecar` command line (the contract in `docs/sidecar-cli.md`) and its validated config.
//!
//! Owns: the clap definition of every subcommand and flag (each also read from `WG_SIDECAR_…`),
//! and turning parsed flags into a validated [`RunConfig`] that tests can also build directly.
//! Must never: accept key material or tokens as flag values, or read the environment elsewhere.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::{
    error::{Result, SidecarError},
    mtu::MtuSetting,
    registration::{Layout, PodIdentity},
    vault::{VaultAuth, VaultSettings},
};

/// `wg-sidecar`: WireGuard data plane for injected Pods.
#[derive(Debug, Parser)]
#[command(name = "wg-sidecar", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "WG_SIDECAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Worker threads of the embedded BoringTun device when the kernel has no WireGuard
    /// (`run` and `gateway`; 0: the cores available to the process, at most 4).
    #[arg(long, global = true, env = "WG_SIDECAR_USERSPACE_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub userspace_threads: u16,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install the kill switch routes (the `wg-init` init container).
    Init(InitArgs),
    /// Run the tunnel (the `wg-sidecar` container).
    Run(Box<RunArgs>),
    /// Run the VPN gateway (the WireGuard server side).
    Gateway(Box<crate::gateway::GatewayArgs>),
    /// Key operations in Vault: provision, rotate, provision-gateway.
    Keys(Box<crate::keys::KeysArgs>),
    /// Vault administration: bootstrap (the policies and roles of a gateway and its Pods).
    Vault(Box<crate::bootstrap::VaultCommandArgs>),
    /// Wait until the sidecar's `/ready` answers 200 (the classic-mode `postStart` hook that
    /// holds the app until the tunnel is up; see `lifecycle`).
    Wait(WaitArgs),
}

/// Flags of `wg-sidecar wait`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The sidecar's health address.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub addr: SocketAddr,
    /// Give up (exit 1) after this long (`120s`, `5m`).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// A duration flag (`30s`, `5m`, `1h30m`), with an error naming the value.
fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    v.trim()
        .parse::<jiff::SignedDuration>()
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .ok_or_else(|| format!("{v:?} is not a duration (e.g. 30s, 5m)"))
}

/// Flags of `wg-sidecar init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Tunnelled CIDRs (IPv4 and IPv6).
    #[arg(
        long,
        env = "WG_SIDECAR_ROUTES",
        value_delimiter = ',',
        required = true
    )]
    pub routes: Vec<IpNet>,
    /// CIDRs kept outside the tunnel whatever the routes say (Vault, the gateway endpoints, the
    /// cluster's networks): a rule sends them to the main table before the tunnel's. Repeat the
    /// flag or separate with commas. Host names cannot be exempted: the full tunnel needs them
    /// as IP literals here.
    #[arg(long, env = "WG_SIDECAR_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<IpNet>,
    /// DNS servers reached through the tunnel (as `run`'s): each one outside `--routes` gets the
    /// kill switch as a host route.
    #[arg(long, env = "WG_SIDECAR_DNS", value_delimiter = ',')]
    pub dns: Vec<IpAddr>,
    /// Install high-metric unreachable routes for every CIDR.
    #[arg(long, env = "WG_SIDECAR_KILL_SWITCH", action = ArgAction::Set, default_value_t = true)]
    pub kill_switch: bool,
}

/// Where keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeySourceKind {
    /// Vault / OpenBao KV v2.
    Vault,
    /// A mounted folder (Secret, CSI, External Secrets Operator).
    File,
}

/// Vault auth method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VaultAuthKind {
    /// Kubernetes auth with the projected service-account token.
    Kubernetes,
    /// AppRole with role-id and secret-id files.
    Approle,
    /// A Vault token read from a file.
    Token,
}

/// Flags of `wg-sidecar run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// WireGuard interface name.
    #[arg(long, env = "WG_SIDECAR_INTERFACE", default_value = "wg0")]
    pub interface: String,
    /// Gateway profile name.
    #[arg(long, env = "WG_SIDECAR_GATEWAY")]
    pub gateway: String,
    /// Gateway endpoints (`host:port`), tried in turn; override the record's.
    #[arg(long, env = "WG_SIDECAR_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Tunnelled CIDRs.
    #[arg(
        long,
        env = "WG_SIDECAR_ROUTES",
        value_delimiter = ',',
        required = true
    )]
    pub routes: Vec<IpNet>,
    /// CIDRs kept outside the tunnel whatever the routes say (Vault, the gateway endpoints, the
    /// cluster's networks): a rule sends them to the main table before the tunnel's. Repeat the
    /// flag or separate with commas. Host names cannot be exempted: the full tunnel needs them
    /// as IP literals here.
    #[arg(long, env = "WG_SIDECAR_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<IpNet>,
    /// DNS servers reached through the tunnel.
    #[arg(long, env = "WG_SIDECAR_DNS", value_delimiter = ',')]
    pub dns: Vec<IpAddr>,
    /// Interface MTU: `auto` (the path MTU to the gateway endpoint minus WireGuard's overhead,
    /// see `mtu`) or 1280–9000.
    #[arg(long, env = "WG_SIDECAR_MTU", default_value = "1420", value_parser = clap::value_parser!(MtuSetting))]
    pub mtu: MtuSetting,
    /// Persistent keepalive seconds (0 = off).
    #[arg(long, env = "WG_SIDECAR_KEEPALIVE", default_value_t = 25)]
    pub keepalive: u16,
    /// Keep the kill-switch routes while running.
    #[arg(long, env = "WG_SIDECAR_KILL_SWITCH", action = ArgAction::Set, default_value_t = true)]
    pub kill_switch: bool,
    /// Where keys come from.
    #[arg(long, env = "WG_SIDECAR_KEY_SOURCE", value_enum, default_value_t = KeySourceKind::Vault)]
    pub key_source: KeySourceKind,
    /// With `file`: the key folder.
    #[arg(
        long,
        env = "WG_SIDECAR_KEY_DIR",
        default_value = "/var/run/secrets/wg-keys"
    )]
    pub key_dir: PathBuf,
    /// Vault / OpenBao address.
    #[arg(long, env = "WG_SIDECAR_VAULT_ADDR")]
    pub vault_addr: Option<String>,
    /// CA bundle for Vault's TLS.
    #[arg(long, env = "WG_SIDECAR_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// Vault auth method.
    #[arg(long, env = "WG_SIDECAR_VAULT_AUTH", value_enum, default_value_t = VaultAuthKind::Kubernetes)]
    pub vault_auth: VaultAuthKind,
    /// Auth mount path (default `kubernetes` or `approle`).
    #[arg(long, env = "WG_SIDECAR_VAULT_AUTH_MOUNT")]
    pub vault_auth_mount: Option<String>,
    /// Kubernetes-auth role.
    #[arg(long, env = "WG_SIDECAR_VAULT_ROLE")]
    pub vault_role: Option<String>,
    /// Service-account JWT (kubernetes) or Vault token (token) file; re-read at every login.
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_TOKEN_FILE",
        default_value = "/var/run/secrets/wg-injector/token"
    )]
    pub vault_token_file: PathBuf,
    /// AppRole role-id file.
    #[arg(long, env = "WG_SIDECAR_VAULT_ROLE_ID_FILE")]
    pub vault_role_id_file: Option<PathBuf>,
    /// AppRole secret-id file.
    #[arg(long, env = "WG_SIDECAR_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// KV v2 mount.
    #[arg(long, env = "WG_SIDECAR_VAULT_KV_MOUNT", default_value = "secret")]
    pub vault_kv_mount: String,
    /// A static identity's private record (a fixed key, one per Pod, e.g.
    /// `wg/keys/db/db/db-0`). Without it the key is born in the Pod and registered.
    #[arg(long, env = "WG_SIDECAR_VAULT_KEY_PATH")]
    pub vault_key_path: Option<String>,
    /// Folder of the Pods' public records (`<path>/<gateway>/<ns>/<sa>/<pod-uid>`).
    #[arg(long, env = "WG_SIDECAR_VAULT_PEERS_PATH", default_value = "wg/peers")]
    pub vault_peers_path: String,
    /// Folder of the tunnel-address claims (`<path>/<gateway>/<address>`).
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_ADDRESSES_PATH",
        default_value = "wg/addresses"
    )]
    pub vault_addresses_path: String,
    /// Folder of the gateways' verdicts (`<path>/<gateway>/<ns>/<sa>/<pod-uid>`): while the
    /// sidecar has no handshake it reads its own, and `/ready` says why the gateway refuses it.
    #[arg(
        long,
        env = "WG_SIDECAR_VAULT_VERDICTS_PATH",
        default_value = "wg/verdicts"
    )]
    pub vault_verdicts_path: String,
    /// The Pod's namespace (downward API).
    #[arg(long, env = "WG_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The Pod's service account (downward API).
    #[arg(long, env = "WG_POD_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// The Pod's name (downward API).
    #[arg(long, env = "WG_POD_NAME")]
    pub pod_name: Option<String>,
    /// The Pod's UID (downward API); with it the sidecar registers itself (see
    /// `registration`), together with the three flags above.
    #[arg(long, env = "WG_POD_UID")]
    pub pod_uid: Option<String>,
    /// The gateway record (default `wg/gateways/<gateway>`).
    #[arg(long, env = "WG_SIDECAR_VAULT_GATEWAY_PATH")]
    pub vault_gateway_path: Option<String>,
    /// Address of `/healthz`, `/ready`, `/metrics`; the default `[::]` takes IPv6 and IPv4
    /// clients (`0.0.0.0` on a host without IPv6).
    #[arg(long, env = "WG_SIDECAR_HEALTH_ADDR", default_value = crate::health::DEFAULT_ADDR)]
    pub health_addr: SocketAddr,
    /// KV version polling interval in seconds (jittered ±20%).
    #[arg(long, env = "WG_SIDECAR_POLL_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval: u64,
    /// No handshake for this many seconds → next endpoint / re-resolve.
    #[arg(long, env = "WG_SIDECAR_FAILOVER_AFTER", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub failover_after: u64,
    /// Rotate the key born in the Pod in place this often (`24h`, `90m`; at least `1m`; jittered
    /// ±10 %): new key, same address, connections kept (docs/rotation.md, "Pod keys"). Unset:
    /// the key lives as long as the sidecar.
    #[arg(long, env = "WG_SIDECAR_KEY_ROTATION_INTERVAL")]
    pub key_rotation_interval: Option<String>,
    /// After SIGTERM, keep the tunnel up while another process of the Pod holds a TCP socket,
    /// for at most this long (`25s`; `0s`: stop at once). The injector sets it in classic mode,
    /// where the app is stopped at the same time as the sidecar (see `lifecycle`).
    #[arg(long, env = "WG_SIDECAR_DRAIN_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Where the running sidecar gets its keys, validated.
// Built once at startup and moved into the run loop: boxing the Vault variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum KeySourceConfig {
    /// Vault / OpenBao.
    Vault {
        /// Connection and auth.
        settings: VaultSettings,
        /// KV v2 mount.
        kv_mount: String,
        /// A static identity's private record (`None`: the key is born in the Pod).
        key_path: Option<String>,
        /// The gateway record.
        gateway_path: String,
        /// Registration (the Pod's identity and the record layout); `None` for a hand-wired
        /// sidecar outside Kubernetes, which reads a complete private record from `key_path`.
        registration: Option<(PodIdentity, Layout)>,
    },
    /// A mounted folder.
    File {
        /// The folder.
        dir: PathBuf,
    },
}

/// Validated configuration of `wg-sidecar run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Interface name.
    pub interface: String,
    /// Gateway profile name.
    pub gateway: String,
    /// Endpoint override (empty: use the record's).
    pub endpoints: Vec<String>,
    /// Tunnelled CIDRs (DNS servers included as host routes).
    pub routes: Vec<IpNet>,
    /// CIDRs kept outside the tunnel (`--exclude`).
    pub exclude: Vec<IpNet>,
    /// Interface MTU: fixed or `auto`.
    pub mtu: MtuSetting,
    /// Persistent keepalive (None = off).
    pub keepalive: Option<u16>,
    /// Keep the kill switch while running.
    pub kill_switch: bool,
    /// Key source.
    pub key_source: KeySourceConfig,
    /// Health listen address.
    pub health_addr: SocketAddr,
    /// KV polling interval (before jitter).
    pub poll_interval: Duration,
    /// Failover deadline.
    pub failover_after: Duration,
    /// In-place rotation of the key born in the Pod (`None`: off).
    pub key_rotation_interval: Option<Duration>,
    /// The longest drain after SIGTERM (zero: none).
    pub drain_timeout: Duration,
}

/// What goes through the tunnel: `routes` (host bits cleared) and, as host routes, the `dns`
/// servers outside them. `init` and `run` both take it, so the kill switch covers the DNS
/// servers from `wg-init` on.
#[must_use]
pub fn tunnelled(routes: &[IpNet], dns: &[IpAddr]) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
    for dns in dns {
        if !all.iter().any(|r| r.contains(dns)) {
            all.push(IpNet::from(*dns));
        }
    }
    all
}

/// Linux interface names are at most 15 bytes.
const MAX_IFNAME: usize = 15;

impl RunArgs {
    /// The Pod identity and record layout when the four `--pod-*` flags are given.
    fn registration(&self) -> Result<Option<(PodIdentity, Layout)>> {
        let bad = |m: &str| SidecarError::InvalidConfig(m.to_owned());
        Ok(match (
            &self.pod_namespace,
            &self.service_account,
            &self.pod_name,
            &self.pod_uid,
        ) {
            // An older injector sets only the namespace and service account (for
            // its key-path placeholders): no UID, no registration.
            (_, _, _, None) => None,
            (Some(ns), Some(sa), Some(name), Some(uid)) => Some((
                PodIdentity::new(ns, sa, name, uid)?,
                Layout {
                    kv_mount: self.vault_kv_mount.clone(),
                    peers_prefix: self.vault_peers_path.trim_end_matches('/').to_owned(),
                    addresses_prefix: self
                        .vault_addresses_path
                        .trim_end_matches('/')
                        .to_owned(),
                    verdicts_prefix: self.vault_verdicts_path.trim_end_matches('/').to_owned(),
                },
            )),
            _ => {
                return Err(bad(
                    "--pod-uid needs --pod-namespace, --service-account and --pod-name (WG_POD_*; the injector sets all four)",
                ))
            }
        })
    }

    /// `--key-rotation-interval`, validated against the rest of the flags.
    fn key_rotation_interval(&self) -> Result<Option<Duration>> {
        let Some(v) = &self.key_rotation_interval else {
            return Ok(None);
        };
        let bad = |m: String| SidecarError::InvalidConfig(m);
        let d = v
            .trim()
            .parse::<jiff::SignedDuration>()
            .ok()
            .and_then(|d| Duration::try_from(d).ok())
            .ok_or_else(|| {
                bad(format!(
                    "--key-rotation-interval {v:?} is not a duration (e.g. 24h, 90m)"
                ))
            })?;
        if d < crate::rotation::MIN_POD_KEY_ROTATION {
            return Err(bad(format!(
                "--key-rotation-interval {v:?} is shorter than 1m (each rotation costs every gateway replica a Vault read and the Pod a pause of about a second)"
            )));
        }
        if self.key_source != KeySourceKind::Vault || self.pod_uid.is_none() {
            return Err(bad("--key-rotation-interval rotates a key born in the Pod: it needs --key-source vault and the Pod's identity (WG_POD_*)".into()));
        }
        if self.vault_key_path.is_some() {
            return Err(bad("--key-rotation-interval does not apply to a static identity (--vault-key-path): its fixed key is rotated by `wg-sidecar keys rotate`".into()));
        }
        Ok(Some(d))
    }

    /// Validates the flags; errors name the flag at fault.
    pub fn into_config(self) -> Result<RunConfig> {
        let bad = |m: &str| SidecarError::InvalidConfig(m.to_owned());
        let key_rotation_interval = self.key_rotation_interval()?;
        if self.interface.is_empty()
            || self.interface.len() > MAX_IFNAME
            || self.interface.contains(['/', ' '])
        {
            return Err(bad(
                "--interface must be 1-15 characters without '/' or spaces",
            ));
        }
        if self.routes.is_empty() {
            return Err(bad("--routes needs at least one CIDR"));
        }
        let routes = tunnelled(&self.routes, &self.dns);
        let key_source = match self.key_source {
            KeySourceKind::File => KeySourceConfig::File { dir: self.key_dir },
            KeySourceKind::Vault => {
                let registration = self.registration()?;
                let addr = self
                    .vault_addr
                    .ok_or_else(|| bad("--vault-addr is required with --key-source vault"))?;
                let key_path = self.vault_key_path;
                if registration.is_none() && key_path.is_none() {
                    return Err(bad(
                        "--key-source vault needs the Pod's identity (--pod-namespace, --service-account, --pod-name, --pod-uid; the injector sets WG_POD_*) to register a key born in the Pod, or --vault-key-path for a hand-wired sidecar",
                    ));
                }
                let auth = match self.vault_auth {
                    VaultAuthKind::Kubernetes => VaultAuth::Kubernetes {
                        mount: self.vault_auth_mount.unwrap_or_else(|| "kubernetes".into()),
                        role: self.vault_role.ok_or_else(|| {
                            bad("--vault-role is required with --vault-auth kubernetes")
                        })?,
                        jwt_file: self.vault_token_file,
                    },
                    VaultAuthKind::Approle => VaultAuth::AppRole {
                        mount: self.vault_auth_mount.unwrap_or_else(|| "approle".into()),
                        role_id_file: self.vault_role_id_file.ok_or_else(|| {
                            bad("--vault-role-id-file is required with --vault-auth approle")
                        })?,
                        secret_id_file: self.vault_secret_id_file.ok_or_else(|| {
                            bad("--vault-secret-id-file is required with --vault-auth approle")
                        })?,
                    },
                    VaultAuthKind::Token => VaultAuth::Token {
                        file: self.vault_token_file,
                    },
                };
                KeySourceConfig::Vault {
                    settings: VaultSettings {
                        addr,
                        ca_file: self.vault_ca_file,
                        auth,
                    },
                    kv_mount: self.vault_kv_mount,
                    key_path,
                    gateway_path: self
                        .vault_gateway_path
                        .unwrap_or_else(|| format!("wg/gateways/{}", self.gateway)),
                    registration,
                }
            }
        };
        Ok(RunConfig {
            interface: self.interface,
            gateway: self.gateway,
            endpoints: self.endpoints,
            routes,
            exclude: self.exclude.iter().map(IpNet::trunc).collect(),
            mtu: self.mtu,
            keepalive: (self.keepalive > 0).then_some(self.keepalive),
            kill_switch: self.kill_switch,
            key_source,
            health_addr: self.health_addr,
            poll_interval: Duration::from_secs(self.poll_interval),
            failover_after: Duration::from_secs(self.failover_after),
            key_rotation_interval,
            drain_timeout: self.drain_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::{Cli, Command};

    fn run(args: &[&str]) -> super::RunArgs {
        let mut full = vec!["wg-sidecar", "run"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Run(r) => *r,
            _ => panic!("expected run"),
        }
    }

    #[test]
    fn the_documented_run_flags_parse_and_validate() {
        let cfg = run(&[
            "--interface=wg0",
            "--gateway=corp",
            "--routes=10.0.0.0/8,fd00::/64",
            "--dns=10.0.0.53,192.168.1.1",
            "--mtu=1380",
            "--keepalive=0",
            "--kill-switch=true",
            "--vault-addr=https://vault:8200",
            "--vault-role=wg-shop-web",
            "--vault-key-path=wg/keys/shop/web",
        ])
        .into_config()
        .unwrap();
        assert_eq!(cfg.keepalive, None);
        assert_eq!(cfg.mtu, crate::mtu::MtuSetting::Fixed(1380));
        // 10.0.0.53 is inside 10.0.0.0/8; 192.168.1.1 becomes a host route.
        assert_eq!(cfg.routes.len(), 3);
        match cfg.key_source {
            super::KeySourceConfig::Vault { gateway_path, .. } => {
                assert_eq!(gateway_path, "wg/gateways/corp");
            }
            super::KeySourceConfig::File { .. } => panic!("expected vault"),
        }
    }

    #[test]
    fn init_parses_routes_and_kill_switch() {
        let cli = Cli::try_parse_from([
            "wg-sidecar",
            "init",
            "--routes",
            "10.1.0.0/16",
            "--kill-switch",
            "false",
        ])
        .unwrap();
        match cli.command {
            Command::Init(i) => {
                assert_eq!(i.routes.len(), 1);
                assert!(!i.kill_switch);
            }
            _ => panic!("expected init"),
        }
    }

    #[test]
    fn exclude_is_repeatable_and_comma_separated_on_init_and_run() {
        let cli = Cli::try_parse_from([
            "wg-sidecar",
            "init",
            "--routes=0.0.0.0/0,::/0",
            "--exclude=10.96.0.0/12",
            "--exclude=192.0.2.1/32,fd00::1/128",
        ])
        .unwrap();
        match cli.command {
            Command::Init(i) => assert_eq!(i.exclude.len(), 3),
            _ => panic!("expected init"),
        }
        let cfg = run(&[
            "--gateway=g",
            "--routes=0.0.0.0/0",
            "--exclude=10.96.0.1/12",
            "--key-source=file",
        ])
        .into_config()
        .unwrap();
        assert_eq!(cfg.exclude, vec!["10.96.0.0/12".parse().unwrap()]);
    }

    #[test]
    fn key_rotation_interval_takes_a_duration_and_refuses_short_or_static_ones_naming_the_flag() {
        let pod = [
            "--gateway=g",
            "--routes=10.0.0.0/8",
            "--vault-addr=http://vault:8200",
            "--vault-role=r",
            "--pod-namespace=shop",
            "--service-account=web",
            "--pod-name=web-1",
            "--pod-uid=0001",
        ];
        let with = |extra: &[&str]| {
            let mut a = pod.to_vec();
            a.extend_from_slice(extra);
            run(&a).into_config()
        };
        assert_eq!(
            with(&[]).unwrap().key_rotation_interval,
            None,
            "off by default"
        );
        assert_eq!(
            with(&["--key-rotation-interval=24h"])
                .unwrap()
                .key_rotation_interval,
            Some(std::time::Duration::from_secs(86_400))
        );
        for (v, says) in [("30s", "shorter than 1m"), ("soon", "not a duration")] {
            let e = with(&[&format!("--key-rotation-interval={v}")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--key-rotation-interval") && e.contains(says),
                "{e}"
            );
        }
        let e = with(&[
            "--key-rotation-interval=1h",
            "--vault-key-path=wg/keys/db/db/db-0",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("static identity"), "{e}");
    }

    #[test]
    fn mtu_is_auto_or_1280_to_9000_and_1420_when_not_given() {
        use crate::mtu::MtuSetting;
        let mtu = |extra: &[&str]| {
            let mut args = vec!["--gateway=g", "--routes=10.0.0.0/8", "--key-source=file"];
            args.extend_from_slice(extra);
            run(&args).into_config().unwrap().mtu
        };
        assert_eq!(mtu(&["--mtu=auto"]), MtuSetting::Auto);
        assert_eq!(mtu(&["--mtu", "1280"]), MtuSetting::Fixed(1280));
        assert_eq!(mtu(&["--mtu=9000"]), MtuSetting::Fixed(9000));
        assert_eq!(mtu(&[]), MtuSetting::Fixed(1420));
        for bad in ["--mtu=500", "--mtu=9001", "--mtu=Auto"] {
            let e = Cli::try_parse_from([
                "wg-sidecar",
                "run",
                "--gateway=g",
                "--routes=10.0.0.0/8",
                bad,
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("allowed are \"auto\" and an integer from 1280 to 9000"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn vault_source_without_address_names_the_missing_flag() {
        let err = run(&[
            "--gateway=g",
            "--routes=10.0.0.0/8",
            "--vault-role=r",
            "--vault-key-path=p",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--vault-addr"), "{err}");
    }

    #[test]
    fn kubernetes_auth_without_role_names_the_missing_flag() {
        let err = run(&[
            "--gateway=g",
            "--routes=10.0.0.0/8",
            "--vault-addr=http://v",
            "--vault-key-path=p",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--vault-role"), "{err}");
    }

    #[test]
    fn file_source_needs_no_vault_flags() {
        let cfg = run(&[
            "--gateway=g",
            "--routes=10.0.0.0/8",
            "--key-source=file",
            "--key-dir=/k",
        ])
        .into_config()
        .unwrap();
        assert!(matches!(
            cfg.key_source,
            super::KeySourceConfig::File { .. }
        ));
    }

    #[test]
    fn overlong_interface_names_are_refused() {
        let err = run(&[
            "--interface=abcdefghijklmnop",
            "--gateway=g",
            "--routes=10.0.0.0/8",
            "--key-source=file",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--interface"));
    }
}
