//! The injector's configuration: images, gateway profiles, Vault settings, defaults and the
//! opt-in policy, as one typed struct that tests build directly.
//!
//! This module owns the configuration file format (YAML, camelCase keys, unknown keys refused)
//! and its validation. It never reads the environment and never talks to Vault or the cluster:
//! it only describes what the injector writes into Pods.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::annotations::{self, Endpoint, SidecarMode};
use crate::error::Error;
use crate::routes::{self, Need, Protected};

/// Name of the gateway profile that [`Config::default`] carries and that Pods without a
/// `wg-injector.io/gateway` annotation use (unless `defaultGateway` says otherwise).
pub const DEFAULT_GATEWAY: &str = "default";

/// The injector's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The image of `wg-init` and `wg-sidecar` (its ENTRYPOINT is `wg-sidecar`).
    pub images: Images,
    /// Gateway profiles by name (`wg-injector.io/gateway` picks one).
    pub gateways: BTreeMap<String, GatewayProfile>,
    /// The profile used when a Pod names none.
    pub default_gateway: String,
    /// How the sidecar reaches Vault.
    pub vault: VaultSettings,
    /// The cluster's own networks, which no tunnelled route may cover.
    pub cluster: ClusterNetworks,
    /// Defaults of the per-pod annotations.
    pub defaults: Defaults,
    /// Inject Pods that carry no `wg-injector.io/inject` annotation (they opt out with `"false"`).
    pub inject_by_default: bool,
    /// Whether the cluster supports native sidecars (init containers with
    /// `restartPolicy: Always`, Kubernetes ≥ 1.29); `sidecar-mode: auto` resolves from it.
    /// `false` when unknown: classic sidecars work everywhere.
    pub native_sidecars: bool,
    /// How the sidecar gets `/dev/net/tun`.
    pub tun_device: TunDevice,
    /// Namespaces never injected, whatever their labels say (defence in depth behind the
    /// webhook's `namespaceSelector`, which cannot match namespace names before Kubernetes 1.21).
    pub excluded_namespaces: Vec<String>,
}

/// Image settings of the injected containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Images {
    /// Image reference of `wg-sidecar` (also used by `wg-init`).
    pub sidecar: String,
    /// `imagePullPolicy` of both containers (`Always`, `IfNotPresent`, `Never`).
    pub pull_policy: String,
}

/// One gateway the sidecar can connect to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayProfile {
    /// Endpoints tried in turn; empty means "from the Vault gateway record".
    pub endpoints: Vec<Endpoint>,
    /// The gateway's Vault record; empty means `wg/gateways/<name>`.
    pub vault_gateway_path: Option<String>,
    /// CIDRs tunnelled when a Pod sets no `wg-injector.io/routes`.
    pub routes: Vec<IpNet>,
    /// DNS servers reached through the tunnel when a Pod sets no `wg-injector.io/dns`.
    pub dns: Vec<IpAddr>,
    /// Search domains of the Pod's resolver when the injector sets its `dnsConfig` (a Pod with
    /// DNS servers through the tunnel; see [`crate::inject`]). Empty: none, so short names are
    /// not expanded with the cluster's domains and sent to the tunnel's servers.
    pub dns_searches: Vec<String>,
    /// Resolver options (`ndots:2`, `edns0`), as `name` or `name:value`.
    pub dns_options: Vec<String>,
}

/// The cluster's Pod and Service networks and DNS servers: what the sidecar reaches outside the
/// tunnel before the tunnel is up, so a Pod whose routes cover any of them is denied (see
/// [`crate::routes`]).
///
/// All empty by default, which turns that part of the check off: Kubernetes has no standard Pod
/// or Service CIDR (kubeadm's Service default is `10.96.0.0/12`, its Pod network is the CNI's
/// choice), and a guessed default would deny valid Pods.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterNetworks {
    /// The Pod CIDRs (`kube-controller-manager --cluster-cidr`, e.g. `10.244.0.0/16`).
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    /// The Service CIDRs (`kube-apiserver --service-cluster-ip-range`, e.g. `10.96.0.0/12`).
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Vec<IpNet>,
    /// The cluster DNS servers (the kube-dns Service's `clusterIP`, e.g. `10.96.0.10`).
    pub dns: Vec<IpAddr>,
}

impl ClusterNetworks {
    /// Refuse a CIDR with host bits set (what else serde cannot say), naming the key.
    fn validate(&self) -> Result<(), String> {
        for (key, cidrs) in [
            ("cluster.podCIDRs", &self.pod_cidrs),
            ("cluster.serviceCIDRs", &self.service_cidrs),
        ] {
            for cidr in cidrs {
                if cidr.trunc() != *cidr {
                    return Err(format!(
                        "{key}: {cidr} has host bits set (did you mean {}?)",
                        cidr.trunc()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How the sidecar reaches and authenticates to Vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultSettings {
    /// Vault / OpenBao address (`https://vault.vault.svc:8200`); `http://` only with
    /// `allow_plaintext`.
    pub address: String,
    /// Accept an `http://` address: every sidecar's Vault token and keys then cross the network
    /// in the clear (refused at validation without it; the injector warns at start with it).
    pub allow_plaintext: bool,
    /// Kubernetes auth mount.
    pub auth_mount: String,
    /// CA bundle path inside the sidecar image (mutually exclusive with `caConfigMap`).
    pub ca_file: Option<String>,
    /// A ConfigMap in the Pod's namespace holding the CA bundle under `ca.crt`, mounted into
    /// the sidecar.
    pub ca_config_map: Option<String>,
    /// KV v2 mount.
    pub kv_mount: String,
    /// Audience of the projected service-account token.
    pub token_audience: String,
    /// Lifetime of the projected token (Kubernetes allows ≥ 600).
    pub token_expiration_seconds: i64,
    /// Default Kubernetes-auth role; `{namespace}` and `{serviceAccount}` are filled in by the
    /// kubelet from the Pod itself (downward API).
    pub role_template: String,
    /// A static identity for every Pod that sets no `wg-injector.io/vault-path`: the KV path
    /// its sidecar reads its key from, with the placeholders `{namespace}`, `{serviceAccount}`
    /// and `{pod}`. Empty (the default): no `--vault-key-path` is rendered and each sidecar
    /// generates its key in the Pod and registers it under its Pod UID. A template without
    /// `{pod}` gives every replica one key, so Pods of a ReplicaSet, Job, DaemonSet or
    /// StatefulSet are denied under it (`crate::identity`).
    pub key_path_template: String,
    /// In-place rotation of the keys born in the Pods (`wg-sidecar run
    /// --key-rotation-interval`, e.g. `24h`; at least `1m`); `None` (the default): a Pod's key
    /// lives as long as its sidecar. Never rendered for a static identity.
    pub key_rotation_interval: Option<String>,
}

/// Defaults of the per-pod annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Defaults {
    /// Interface MTU: `auto` (the default: the sidecar measures the path to the gateway
    /// endpoint) or 1280–9000.
    pub mtu: annotations::Mtu,
    /// Persistent keepalive in seconds (0 = off).
    pub keepalive: u16,
    /// Sidecar mode when a Pod sets none.
    pub sidecar_mode: SidecarMode,
    /// Kill switch when a Pod sets none.
    pub kill_switch: bool,
    /// Resources of both injected containers.
    pub resources: Resources,
}

/// Requests and limits of the injected containers (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU request.
    pub cpu_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory request.
    pub memory_request: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
}

/// Where `/dev/net/tun` comes from inside the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TunDevice {
    /// A `hostPath` volume of type `CharDevice` for `/dev/net/tun` (containerd does not create
    /// the node by default).
    #[default]
    HostPath,
    /// Nothing: the runtime (or a device plugin) provides `/dev/net/tun`.
    None,
}

impl Default for Config {
    fn default() -> Self {
        let mut gateways = BTreeMap::new();
        gateways.insert(
            DEFAULT_GATEWAY.to_owned(),
            GatewayProfile {
                endpoints: Vec::new(),
                vault_gateway_path: None,
                routes: vec![IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 0, 0, 0), 8)
                        .unwrap_or_default(),
                )],
                dns: Vec::new(),
                dns_searches: Vec::new(),
                dns_options: Vec::new(),
            },
        );
        Self {
            images: Images::default(),
            gateways,
            default_gateway: DEFAULT_GATEWAY.to_owned(),
            vault: VaultSettings::default(),
            cluster: ClusterNetworks::default(),
            defaults: Defaults::default(),
            inject_by_default: false,
            native_sidecars: false,
            tun_device: TunDevice::HostPath,
            excluded_namespaces: vec!["kube-system".to_owned(), "kube-public".to_owned()],
        }
    }
}

impl Default for Images {
    fn default() -> Self {
        Self {
            sidecar: format!("localhost/wg-sidecar:{}", env!("CARGO_PKG_VERSION")),
            pull_policy: "IfNotPresent".to_owned(),
        }
    }
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            address: "https://vault.vault.svc:8200".to_owned(),
            allow_plaintext: false,
            auth_mount: "kubernetes".to_owned(),
            ca_file: None,
            ca_config_map: None,
            kv_mount: "secret".to_owned(),
            token_audience: "vault".to_owned(),
            token_expiration_seconds: 600,
            role_template: "wg-pod".to_owned(),
            key_path_template: String::new(),
            key_rotation_interval: None,
        }
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            mtu: annotations::Mtu::Auto,
            keepalive: 25,
            sidecar_mode: SidecarMode::Auto,
            kill_switch: true,
            resources: Resources::default(),
        }
    }
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu_request: Some("10m".to_owned()),
            cpu_limit: None,
            memory_request: Some("16Mi".to_owned()),
            memory_limit: Some("64Mi".to_owned()),
        }
    }
}

impl VaultSettings {
    /// Whether the sidecars talk to Vault over plaintext `http://` (the scheme in any case).
    #[must_use]
    pub fn is_plaintext(&self) -> bool {
        has_scheme(&self.address, "http://")
    }

    /// The configured static key path template; `None` when `keyPathTemplate` is empty (each
    /// Pod's key is born in the Pod).
    #[must_use]
    pub fn key_path_template(&self) -> Option<&str> {
        Some(self.key_path_template.as_str()).filter(|t| !t.is_empty())
    }

    /// `keyRotationInterval`: unset, or a duration of at least a minute (what `wg-sidecar run
    /// --key-rotation-interval` accepts, parsed the same way).
    fn validate_key_rotation_interval(&self) -> Result<(), String> {
        let Some(interval) = &self.key_rotation_interval else {
            return Ok(());
        };
        let at_least_a_minute = interval
            .trim()
            .parse::<jiff::SignedDuration>()
            .is_ok_and(|d| d >= jiff::SignedDuration::from_secs(60));
        if at_least_a_minute {
            Ok(())
        } else {
            Err(format!(
                "vault.keyRotationInterval is {interval:?}: expected a duration of at least 1m, e.g. 24h or 90m (or unset: no rotation)"
            ))
        }
    }

    /// Vault's address when the host of `address` is an IP literal (`https://10.96.0.20:8200`,
    /// `https://[fd00::20]:8200`); `None` for a host name, which the injector does not resolve.
    #[must_use]
    pub fn ip(&self) -> Option<IpAddr> {
        let rest = self.address.split_once("://")?.1;
        let authority = rest.split(['/', '?', '#']).next()?;
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if let Some(v6) = host_port.strip_prefix('[') {
            return v6.split_once(']')?.0.parse().ok();
        }
        let host = host_port.split_once(':').map_or(host_port, |(h, _)| h);
        host.parse().ok()
    }
}

impl Config {
    /// Read and validate a YAML configuration file. Missing keys take their defaults; a file
    /// that lists `gateways` replaces the built-in `default` profile.
    pub fn from_yaml_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml_str(&text).map_err(|e| match e {
            Error::ParseConfig { source, .. } => Error::ParseConfig {
                path: path.to_owned(),
                source,
            },
            Error::InvalidConfig { message, .. } => Error::InvalidConfig {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parse and validate a YAML configuration (errors name the path `<string>`).
    pub fn from_yaml_str(text: &str) -> Result<Config, Error> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|source| Error::ParseConfig {
                path: "<string>".into(),
                source,
            })?
        };
        config.validate().map_err(|message| Error::InvalidConfig {
            path: "<string>".into(),
            message,
        })?;
        Ok(config)
    }

    /// Check the rules serde cannot express; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.images.sidecar.trim().is_empty() {
            return Err("images.sidecar must not be empty".to_owned());
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.images.pull_policy.as_str()) {
            return Err(format!(
                "images.pullPolicy is {:?}: allowed are Always, IfNotPresent, Never",
                self.images.pull_policy
            ));
        }
        if !self.gateways.contains_key(&self.default_gateway) {
            return Err(format!(
                "defaultGateway {:?} is not a key of gateways (known: {})",
                self.default_gateway,
                self.gateways.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        self.cluster.validate()?;
        for (name, profile) in &self.gateways {
            annotations::validate_gateway_name(name)
                .map_err(|allowed| format!("gateways.{name}: the name {allowed}"))?;
            if let Some(path) = &profile.vault_gateway_path {
                annotations::validate_vault_path(path)
                    .map_err(|allowed| format!("gateways.{name}.vaultGatewayPath: {allowed}"))?;
            }
            for route in &profile.routes {
                if route.trunc() != *route {
                    return Err(format!(
                        "gateways.{name}.routes: {route} has host bits set (did you mean {}?)",
                        route.trunc()
                    ));
                }
            }
        }
        let address = &self.vault.address;
        if !has_scheme(address, "https://") && !self.vault.is_plaintext() {
            return Err(format!(
                "vault.address is {address:?}: expected an https:// URL, e.g. https://vault.vault.svc:8200"
            ));
        }
        if self.vault.is_plaintext() && !self.vault.allow_plaintext {
            return Err(format!(
                "vault.address is {address:?}: plaintext, so every sidecar's Vault token and keys \
                 would cross the network in the clear; use an https:// address (Vault's CA in \
                 vault.caConfigMap or vault.caFile), or accept plaintext explicitly with \
                 vault.allowPlaintext: true"
            ));
        }
        if self.vault.ca_file.is_some() && self.vault.ca_config_map.is_some() {
            return Err("vault.caFile and vault.caConfigMap are mutually exclusive".to_owned());
        }
        if let Some(name) = &self.vault.ca_config_map {
            annotations::validate_dns1123_subdomain(name)
                .map_err(|allowed| format!("vault.caConfigMap: {allowed}"))?;
        }
        if self.vault.token_expiration_seconds < 600 {
            return Err(format!(
                "vault.tokenExpirationSeconds is {}: Kubernetes requires at least 600",
                self.vault.token_expiration_seconds
            ));
        }
        annotations::validate_vault_role(&self.vault.role_template)
            .map_err(|allowed| format!("vault.roleTemplate: {allowed}"))?;
        if let Some(template) = self.vault.key_path_template() {
            annotations::validate_vault_path(template)
                .map_err(|allowed| format!("vault.keyPathTemplate: {allowed} (or empty)"))?;
        }
        self.vault.validate_key_rotation_interval()?;
        annotations::validate_mount(&self.vault.auth_mount)
            .map_err(|allowed| format!("vault.authMount: {allowed}"))?;
        annotations::validate_mount(&self.vault.kv_mount)
            .map_err(|allowed| format!("vault.kvMount: {allowed}"))?;
        if let annotations::Mtu::Fixed(n) = self.defaults.mtu {
            if !(annotations::MTU_MIN..=annotations::MTU_MAX).contains(&n) {
                return Err(format!("defaults.mtu is {n}: {}", annotations::MTU_ALLOWED));
            }
        }
        let r = &self.defaults.resources;
        for (key, value) in [
            ("cpuRequest", &r.cpu_request),
            ("cpuLimit", &r.cpu_limit),
            ("memoryRequest", &r.memory_request),
            ("memoryLimit", &r.memory_limit),
        ] {
            if let Some(v) = value {
                annotations::parse_quantity(v)
                    .map_err(|allowed| format!("defaults.resources.{key} is {v:?}: {allowed}"))?;
            }
        }
        self.validate_profile_routes()
    }

    /// Refuse a profile whose default routes overlap each other or cover what the sidecar must
    /// reach outside the tunnel ([`Config::protected`], with the profile's endpoints).
    ///
    /// Checked here, at load, and not only when a Pod uses them: a bad default would deny
    /// every Pod of the profile with a message its authors cannot act on, while the operator
    /// who can fix it sees it at startup. (Admission checks them again, against a Pod's own
    /// `wg-injector.io/endpoints`.)
    fn validate_profile_routes(&self) -> Result<(), String> {
        for (name, profile) in &self.gateways {
            crate::inject::dns_settings(profile).map_err(|e| format!("gateways.{name}.{e}"))?;
            if let Some(overlap) = routes::overlap(&profile.routes) {
                return Err(format!("gateways.{name}.routes: {overlap}"));
            }
            let protected = self.protected(
                &profile.endpoints,
                &format!("config gateways.{name}.endpoints"),
            );
            if let Some(lockout) = routes::lockout(&profile.routes, &protected) {
                return Err(format!("gateways.{name}.routes: {lockout}"));
            }
        }
        Ok(())
    }

    /// The profile named `name`, if configured.
    #[must_use]
    pub fn gateway(&self, name: &str) -> Option<&GatewayProfile> {
        self.gateways.get(name)
    }

    /// What a Pod's routes must leave outside the tunnel ([`routes::lockout`]): the cluster's
    /// Service and Pod networks and DNS servers, Vault's address, and the Pod's gateway
    /// `endpoints` (named by `endpoints_origin`). Host names (of Vault, of an endpoint) are not
    /// resolved, so they are not checked.
    ///
    /// The tunnel pool is not among them: it lives in the gateway's Vault record
    /// (`wg/gateways/<name>`), which the injector never reads, and no profile names it.
    #[must_use]
    pub fn protected(&self, endpoints: &[Endpoint], endpoints_origin: &str) -> Vec<Protected> {
        let cluster = &self.cluster;
        let networks = |cidrs: &[IpNet], need, origin: &str| {
            cidrs
                .iter()
                .map(|&net| Protected {
                    net,
                    need,
                    origin: format!("config {origin}"),
                })
                .collect::<Vec<_>>()
        };
        let mut protected = networks(
            &cluster.service_cidrs,
            Need::ServiceNetwork,
            "cluster.serviceCIDRs",
        );
        protected.extend(networks(
            &cluster.pod_cidrs,
            Need::PodNetwork,
            "cluster.podCIDRs",
        ));
        protected.extend(
            cluster.dns.iter().map(|&ip| {
                Protected::address(ip, Need::ClusterDns, "config cluster.dns".to_owned())
            }),
        );
        protected.extend(
            self.vault
                .ip()
                .map(|ip| Protected::address(ip, Need::Vault, "config vault.address".to_owned())),
        );
        protected.extend(endpoints.iter().filter_map(|endpoint| {
            let ip = endpoint.host.parse::<IpAddr>().ok()?;
            Some(Protected::address(
                ip,
                Need::GatewayEndpoint,
                format!("{endpoint} of {endpoints_origin}"),
            ))
        }));
        protected
    }
}

/// Whether `url` starts with `scheme` (`"https://"`), ignoring the scheme's case.
fn has_scheme(url: &str, scheme: &str) -> bool {
    url.get(..scheme.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_config_is_valid_and_has_a_default_gateway() {
        let config = Config::default();
        config.validate().unwrap();
        assert!(config.gateway(DEFAULT_GATEWAY).is_some());
        assert!(!config.inject_by_default);
    }

    #[test]
    fn empty_yaml_gives_the_default_config() {
        assert_eq!(Config::from_yaml_str("").unwrap(), Config::default());
    }

    #[test]
    fn yaml_keys_are_camel_case_and_missing_ones_take_defaults() {
        let config = Config::from_yaml_str(
            "injectByDefault: true\ndefaultGateway: corp\ngateways:\n  corp:\n    endpoints: ['vpn.example.com:51820', '[2001:db8::1]:51820']\n    routes: [10.20.0.0/16, 'fd00:20::/64']\n",
        )
        .unwrap();
        assert!(config.inject_by_default);
        let corp = config.gateway("corp").unwrap();
        assert_eq!(corp.endpoints.len(), 2);
        assert_eq!(corp.endpoints[1].to_string(), "[2001:db8::1]:51820");
        assert_eq!(config.defaults.mtu, crate::annotations::Mtu::Auto);
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let err = Config::from_yaml_str("injectByDefaults: true\n").unwrap_err();
        assert!(err.to_string().contains("injectByDefaults"), "{err}");
    }

    #[test]
    fn a_default_gateway_missing_from_the_profiles_is_refused() {
        let err = Config::from_yaml_str("defaultGateway: nope\n").unwrap_err();
        assert!(err.to_string().contains("defaultGateway \"nope\""), "{err}");
    }

    #[test]
    fn defaults_mtu_is_auto_or_an_integer_from_1280_to_9000() {
        use crate::annotations::Mtu;
        let mtu = |yaml: &str| Config::from_yaml_str(&format!("defaults:\n  mtu: {yaml}\n"));
        assert_eq!(mtu("auto").unwrap().defaults.mtu, Mtu::Auto);
        assert_eq!(mtu("1380").unwrap().defaults.mtu, Mtu::Fixed(1380));
        assert_eq!(mtu("'1380'").unwrap().defaults.mtu, Mtu::Fixed(1380));
        for bad in ["1279", "99999", "big", "-1"] {
            let err = mtu(bad).unwrap_err().to_string();
            assert!(
                err.contains("mtu")
                    && err.contains("allowed is \"auto\" or an integer from 1280 to 9000"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_token_expiry_below_the_kubernetes_minimum_is_refused() {
        let err = Config::from_yaml_str("vault:\n  tokenExpirationSeconds: 60\n").unwrap_err();
        assert!(err.to_string().contains("tokenExpirationSeconds"), "{err}");
    }

    #[test]
    fn a_key_rotation_interval_must_be_a_duration_of_at_least_a_minute() {
        let with = |v: &str| {
            let mut c = Config::default();
            c.vault.key_rotation_interval = Some(v.to_owned());
            c.validate()
        };
        assert_eq!(with("24h"), Ok(()));
        assert_eq!(with("1m"), Ok(()));
        for bad in ["30s", "soon", ""] {
            let e = with(bad).unwrap_err();
            assert!(
                e.contains("vault.keyRotationInterval") && e.contains("at least 1m"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_key_path_template_is_empty_by_default_and_validated_when_set() {
        assert_eq!(Config::default().vault.key_path_template(), None);
        let empty = Config::from_yaml_str("vault:\n  keyPathTemplate: \"\"\n").unwrap();
        assert_eq!(empty.vault.key_path_template(), None);
        let set = Config::from_yaml_str("vault:\n  keyPathTemplate: wg/keys/{namespace}/{pod}\n")
            .unwrap();
        assert_eq!(
            set.vault.key_path_template(),
            Some("wg/keys/{namespace}/{pod}")
        );
        let err = Config::from_yaml_str("vault:\n  keyPathTemplate: wg/../keys\n").unwrap_err();
        assert!(err.to_string().contains("vault.keyPathTemplate"), "{err}");
    }

    #[test]
    fn a_plaintext_vault_address_is_refused_with_the_value_and_both_fixes() {
        let err = Config::from_yaml_str("vault:\n  address: http://vault.vault.svc:8200\n")
            .unwrap_err()
            .to_string();
        for wanted in [
            "vault.address is \"http://vault.vault.svc:8200\"",
            "https://",
            "vault.caConfigMap",
            "vault.allowPlaintext: true",
        ] {
            assert!(err.contains(wanted), "{wanted:?} missing from: {err}");
        }
        // The scheme's case does not hide it.
        let upper = Config::from_yaml_str("vault:\n  address: HTTP://10.0.0.1:8200\n");
        assert!(upper
            .unwrap_err()
            .to_string()
            .contains("vault.allowPlaintext"));
    }

    #[test]
    fn a_plaintext_vault_address_is_accepted_with_allow_plaintext() {
        let config = Config::from_yaml_str(
            "vault:\n  address: http://127.0.0.1:8200\n  allowPlaintext: true\n",
        )
        .unwrap();
        assert!(config.vault.allow_plaintext && config.vault.is_plaintext());
        assert!(!Config::default().vault.is_plaintext());
        assert!(!Config::default().vault.allow_plaintext);
    }

    #[test]
    fn a_vault_address_without_a_scheme_is_refused() {
        let err = Config::from_yaml_str("vault:\n  address: vault.vault.svc:8200\n").unwrap_err();
        assert!(
            err.to_string().contains("expected an https:// URL"),
            "{err}"
        );
    }

    #[test]
    fn the_cluster_networks_are_empty_by_default_and_read_from_camel_case_keys() {
        assert_eq!(Config::default().cluster, ClusterNetworks::default());
        assert!(Config::default().protected(&[], "x").is_empty());
        let config = Config::from_yaml_str(
            "cluster:\n  podCIDRs: [10.244.0.0/16, 'fd00:10:244::/56']\n  serviceCIDRs: [10.96.0.0/12]\n  dns: [10.96.0.10]\ngateways:\n  default:\n    routes: [10.20.0.0/16]\n",
        )
        .unwrap();
        assert_eq!(config.cluster.pod_cidrs.len(), 2);
        assert_eq!(config.cluster.service_cidrs[0].to_string(), "10.96.0.0/12");
        assert_eq!(config.cluster.dns[0].to_string(), "10.96.0.10");
    }

    #[test]
    fn bad_cluster_networks_are_refused_naming_the_field() {
        for (yaml, wanted) in [
            ("cluster:\n  podCIDRs: [10.244.0.0/33]\n", "podCIDRs"),
            ("cluster:\n  serviceCIDRs: [banana]\n", "serviceCIDRs"),
            (
                "gateways:\n  default:\n    dnsSearches: [\"bad domain\"]\n",
                "gateways.default.dnsSearches: \"bad domain\" is not a DNS name",
            ),
            (
                "gateways:\n  default:\n    dnsOptions: [\"ndots:\"]\n",
                "gateways.default.dnsOptions: \"ndots:\" is not name or name:value",
            ),
            ("cluster:\n  dns: [10.96.0.0/12]\n", "cluster.dns"),
            ("cluster:\n  podCidrs: [10.244.0.0/16]\n", "podCidrs"),
            (
                "cluster:\n  serviceCIDRs: [10.96.0.1/12]\n",
                "cluster.serviceCIDRs: 10.96.0.1/12 has host bits set (did you mean 10.96.0.0/12?)",
            ),
            (
                "cluster:\n  podCIDRs: ['fd00:10:244::1/56']\n",
                "cluster.podCIDRs: fd00:10:244::1/56 has host bits set",
            ),
        ] {
            let err = Config::from_yaml_str(yaml).unwrap_err().to_string();
            assert!(
                err.contains(wanted),
                "{yaml}: {wanted:?} missing from: {err}"
            );
        }
    }

    #[test]
    fn profile_routes_over_the_cluster_networks_are_refused_at_load() {
        let err = Config::from_yaml_str(
            "cluster:\n  serviceCIDRs: [10.96.0.0/12]\ngateways:\n  default:\n    routes: [10.0.0.0/8]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gateways.default.routes: 10.0.0.0/8 covers the cluster's Service network 10.96.0.0/12 (config cluster.serviceCIDRs): the sidecar could not reach Vault or cluster DNS before the tunnel is up; route narrower prefixes"),
            "{err}"
        );
        let err = Config::from_yaml_str(
            "cluster:\n  dns: ['fd00:96::a']\ngateways:\n  default:\n    routes: ['fd00::/8']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("covers the cluster DNS server fd00:96::a (config cluster.dns)"),
            "{err}"
        );
    }

    #[test]
    fn profile_routes_over_vault_or_their_own_endpoint_or_each_other_are_refused_at_load() {
        let err = Config::from_yaml_str("vault:\n  address: https://10.96.0.20:8200\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateways.default.routes: 10.0.0.0/8 covers Vault's address 10.96.0.20 (config vault.address)"),
            "the built-in default profile's 10.0.0.0/8 meets an IP Vault: {err}"
        );
        let err = Config::from_yaml_str(
            "gateways:\n  default:\n    endpoints: ['[2001:db8::10]:51820']\n    routes: ['2001:db8::/32']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("covers the gateway endpoint 2001:db8::10 ([2001:db8::10]:51820 of config gateways.default.endpoints): the tunnel's own packets"),
            "{err}"
        );
        let err = Config::from_yaml_str(
            "gateways:\n  default:\n    routes: [10.0.0.0/8, 10.20.0.0/16]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("gateways.default.routes: 10.20.0.0/16 lies inside 10.0.0.0/8"),
            "{err}"
        );
        // A host name is not resolved, so it is not checked; the full tunnel is exempt.
        Config::from_yaml_str(
            "vault:\n  address: https://vault.vault.svc:8200\ncluster:\n  serviceCIDRs: [10.96.0.0/12]\ngateways:\n  default:\n    endpoints: ['vpn.example.com:51820', '192.0.2.1:51820']\n    routes: [0.0.0.0/0]\n",
        )
        .unwrap();
    }

    #[test]
    fn vaults_ip_is_read_from_an_ip_literal_host_only() {
        let ip = |address: &str| {
            VaultSettings {
                address: address.to_owned(),
                ..VaultSettings::default()
            }
            .ip()
            .map(|ip| ip.to_string())
        };
        assert_eq!(ip("https://10.96.0.20:8200").as_deref(), Some("10.96.0.20"));
        assert_eq!(ip("https://10.96.0.20/v1/").as_deref(), Some("10.96.0.20"));
        assert_eq!(ip("https://[fd00::20]:8200").as_deref(), Some("fd00::20"));
        assert_eq!(ip("HTTP://user@192.0.2.7").as_deref(), Some("192.0.2.7"));
        assert_eq!(ip("https://vault.vault.svc:8200"), None);
        assert_eq!(ip("https://10.96.0.20.nip.io:8200"), None);
    }

    #[test]
    fn a_missing_config_file_names_the_path() {
        let err = Config::from_yaml_file(Path::new("/nonexistent/wg.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/wg.yaml"), "{err}");
    }
}
