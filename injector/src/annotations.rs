//! The user contract: every `wg-injector.io/` annotation and label key, and the parser that
//! turns a Pod's annotations into a typed, validated [`InjectionSpec`].
//!
//! This module owns the annotation names (an API: change them only with a migration note), the
//! value rules and the wording of the denial messages (each names the annotation, the value and
//! what is allowed). It never echoes a value that looks like key material, never does IO and
//! knows nothing of the Pod spec beyond its annotations.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::admission::Denial;
use crate::routes;

/// The prefix every annotation and label of the contract starts with.
pub const PREFIX: &str = "wg-injector.io/";
/// `"true"` / `"false"`: opt in or out.
pub const INJECT: &str = "wg-injector.io/inject";
/// Name of a gateway profile from the injector config.
pub const GATEWAY: &str = "wg-injector.io/gateway";
/// Comma-separated CIDRs sent through the tunnel.
pub const ROUTES: &str = "wg-injector.io/routes";
/// Comma-separated DNS servers reached through the tunnel.
pub const DNS: &str = "wg-injector.io/dns";
/// Comma-separated `host:port` gateway endpoints, overriding the profile's.
pub const ENDPOINTS: &str = "wg-injector.io/endpoints";
/// Interface MTU: `auto` or an integer ([`Mtu`]).
pub const MTU: &str = "wg-injector.io/mtu";
/// Persistent keepalive seconds.
pub const KEEPALIVE: &str = "wg-injector.io/keepalive";
/// `vault` or `secret:<name>` (the name may hold [`POD_PLACEHOLDER`]).
pub const KEY_SOURCE: &str = "wg-injector.io/key-source";
/// Vault Kubernetes-auth role.
pub const VAULT_ROLE: &str = "wg-injector.io/vault-role";
/// KV path of the Pod's keys (template): a static identity instead of a key born in the Pod.
pub const VAULT_PATH: &str = "wg-injector.io/vault-path";
/// `"true"` / `"false"`: drop tunnelled traffic while the tunnel is down.
pub const KILL_SWITCH: &str = "wg-injector.io/kill-switch";
/// `native`, `classic` or `auto`.
pub const SIDECAR_MODE: &str = "wg-injector.io/sidecar-mode";
/// CPU request of the injected containers.
pub const SIDECAR_CPU_REQUEST: &str = "wg-injector.io/sidecar-cpu-request";
/// CPU limit of the injected containers.
pub const SIDECAR_CPU_LIMIT: &str = "wg-injector.io/sidecar-cpu-limit";
/// Memory request of the injected containers.
pub const SIDECAR_MEMORY_REQUEST: &str = "wg-injector.io/sidecar-memory-request";
/// Memory limit of the injected containers.
pub const SIDECAR_MEMORY_LIMIT: &str = "wg-injector.io/sidecar-memory-limit";
/// Written by the injector: what was injected, by which version. Never trusted alone.
pub const STATUS: &str = "wg-injector.io/status";

/// Pod label added by the injector: the gateway the Pod tunnels to (for NetworkPolicies).
pub const TUNNEL_LABEL: &str = "wg-injector.io/tunnel";
/// Namespace label that makes a namespace eligible (the webhook's `namespaceSelector`).
pub const NAMESPACE_LABEL: &str = "wg-injector.io/injection";

/// Every annotation a Pod may carry under [`PREFIX`]; any other key is denied (typo protection).
pub const KNOWN_ANNOTATIONS: &[&str] = &[
    INJECT,
    GATEWAY,
    ROUTES,
    DNS,
    ENDPOINTS,
    MTU,
    KEEPALIVE,
    KEY_SOURCE,
    VAULT_ROLE,
    VAULT_PATH,
    KILL_SWITCH,
    SIDECAR_MODE,
    SIDECAR_CPU_REQUEST,
    SIDECAR_CPU_LIMIT,
    SIDECAR_MEMORY_REQUEST,
    SIDECAR_MEMORY_LIMIT,
    STATUS,
];

/// Smallest MTU accepted (the IPv6 minimum).
pub const MTU_MIN: u16 = 1280;
/// Largest MTU accepted (jumbo frames).
pub const MTU_MAX: u16 = 9000;

/// What is allowed for an MTU, in denials and config errors.
pub const MTU_ALLOWED: &str = "allowed is \"auto\" or an integer from 1280 to 9000";

/// The interface MTU of the `mtu` annotation and `defaults.mtu`, rendered as the sidecar's
/// `--mtu`: `auto` (the sidecar takes the path MTU to the gateway endpoint minus WireGuard's
/// overhead, see `wg-sidecar`'s `mtu` module) or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mtu {
    /// Measured by the sidecar (the default).
    #[default]
    Auto,
    /// As given ([`MTU_MIN`]–[`MTU_MAX`]).
    Fixed(u16),
}

impl Mtu {
    /// `"auto"` or an integer from [`MTU_MIN`] to [`MTU_MAX`]; anything else is `None`.
    #[must_use]
    pub fn parse(v: &str) -> Option<Self> {
        if v == "auto" {
            return Some(Self::Auto);
        }
        v.parse::<u16>()
            .ok()
            .filter(|m| (MTU_MIN..=MTU_MAX).contains(m))
            .map(Self::Fixed)
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Mtu {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Fixed(n) => s.serialize_u16(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Mtu {
    /// `auto` or an integer (also as a string); the range is checked by `Config::validate`,
    /// which names the key.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad = |v: &dyn fmt::Display| {
            serde::de::Error::custom(format!("mtu {v} is invalid: {MTU_ALLOWED}"))
        };
        match Raw::deserialize(d)? {
            Raw::Number(n) => u16::try_from(n).map(Self::Fixed).map_err(|_| bad(&n)),
            Raw::Text(t) if t == "auto" => Ok(Self::Auto),
            Raw::Text(t) => t
                .parse::<u16>()
                .map(Self::Fixed)
                .map_err(|_| bad(&format!("{t:?}"))),
        }
    }
}

/// Placeholder for the Pod's namespace in Vault role and path templates.
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";
/// Placeholder for the Pod's service account in Vault role and path templates.
pub const SERVICE_ACCOUNT_PLACEHOLDER: &str = "{serviceAccount}";
/// Placeholder for the Pod's name in Vault path templates (filled in by the kubelet, like the
/// two above) and in a `key-source: secret:<name>` (filled in by the injector at admission, see
/// `crate::identity`). Not allowed in Vault roles: a role is per workload, not per Pod.
pub const POD_PLACEHOLDER: &str = "{pod}";

/// How the sidecar container is placed in the Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// Init container with `restartPolicy: Always` (Kubernetes ≥ 1.29).
    Native,
    /// First app container.
    Classic,
    /// Native when the config says the cluster supports it, classic otherwise.
    #[default]
    Auto,
}

impl SidecarMode {
    /// The annotation spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
            SidecarMode::Auto => "auto",
        }
    }
}

/// Where the sidecar gets the Pod's WireGuard keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// Vault KV v2, logging in with the projected service-account token: the key is born in the
    /// Pod, or read from a static path (`vault-path`, `vault.keyPathTemplate`).
    Vault,
    /// A Secret (in the Pod's namespace) mounted into the sidecar. As [`parse`] returns it the
    /// name may hold [`POD_PLACEHOLDER`]; `crate::identity::resolve` replaces it with the Pod's
    /// name before injection.
    Secret(String),
}

/// A gateway endpoint: `host:port`, IPv6 hosts in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// DNS name or IP address (without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const ALLOWED: &str = "host:port with a DNS name, an IPv4 address or a bracketed IPv6 address and a port 1–65535 (e.g. vpn.example.com:51820, [2001:db8::1]:51820)";
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest.split_once("]:").ok_or(ALLOWED)?;
            let addr: std::net::Ipv6Addr = v6.parse().map_err(|_| ALLOWED)?;
            (addr.to_string(), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or(ALLOWED)?;
            if host.contains(':') {
                return Err(ALLOWED.to_owned());
            }
            if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
                (v4.to_string(), port)
            } else {
                validate_dns_name(host).map_err(|()| ALLOWED)?;
                (host.to_ascii_lowercase(), port)
            }
        };
        let port: u16 = port.parse().map_err(|_| ALLOWED)?;
        if port == 0 {
            return Err(ALLOWED.to_owned());
        }
        Ok(Endpoint { host, port })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Per-pod resource overrides (validated Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct ResourceOverrides {
    /// `sidecar-cpu-request`.
    pub cpu_request: Option<String>,
    /// `sidecar-cpu-limit`.
    pub cpu_limit: Option<String>,
    /// `sidecar-memory-request`.
    pub memory_request: Option<String>,
    /// `sidecar-memory-limit`.
    pub memory_limit: Option<String>,
}

/// The validated per-pod annotations. `None` means "use the config's default".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InjectionSpec {
    /// Gateway profile name.
    pub gateway: Option<String>,
    /// Tunnelled CIDRs (canonical, none overlapping another, in the order given).
    pub routes: Option<Vec<IpNet>>,
    /// DNS servers.
    pub dns: Option<Vec<IpAddr>>,
    /// Gateway endpoints overriding the profile's.
    pub endpoints: Option<Vec<Endpoint>>,
    /// Interface MTU.
    pub mtu: Option<Mtu>,
    /// Persistent keepalive seconds.
    pub keepalive: Option<u16>,
    /// Where keys come from.
    pub key_source: KeySource,
    /// Vault role (template).
    pub vault_role: Option<String>,
    /// Vault KV path of the Pod's keys (template): a static identity.
    pub vault_path: Option<String>,
    /// Kill switch.
    pub kill_switch: Option<bool>,
    /// Sidecar placement.
    pub sidecar_mode: Option<SidecarMode>,
    /// Resource overrides.
    pub resources: ResourceOverrides,
}

fn bad(key: &str, value: &str, allowed: &str) -> Denial {
    Denial {
        reason: "bad_annotation",
        message: format!("annotation {key}={value:?} is invalid: {allowed}"),
    }
}

/// Refuse annotations that could carry key material and unknown `wg-injector.io/` keys.
///
/// Runs on every Pod the injector sees, opted in or not: a typo such as
/// `wg-injector.io/injcet` would otherwise silently leave a Pod without its tunnel.
pub fn screen(annotations: &BTreeMap<String, String>) -> Result<(), Denial> {
    for (key, value) in annotations.iter().filter(|(k, _)| k.starts_with(PREFIX)) {
        if let Some(kind) = looks_like_key_material(value) {
            // Only a known key is echoed: an unknown one is free text and may hold the secret too.
            let key = if KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                key.as_str()
            } else {
                "(an unknown wg-injector.io/ key, not echoed)"
            };
            return Err(Denial {
                reason: "key_material",
                message: format!(
                    "annotation {key} holds what looks like key material ({kind}); the value is not echoed. \
                     Keys and tokens never go into annotations: keep them in Vault (key-source: vault) \
                     or in a Secret (key-source: secret:<name>)"
                ),
            });
        }
    }
    let unknown: Vec<&str> = annotations
        .keys()
        .filter(|k| k.starts_with(PREFIX) && !KNOWN_ANNOTATIONS.contains(&k.as_str()))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(Denial {
            reason: "unknown_annotation",
            message: format!(
                "unknown annotation {} (known wg-injector.io annotations: {})",
                unknown.join(", "),
                KNOWN_ANNOTATIONS
                    .iter()
                    .map(|k| k.trim_start_matches(PREFIX))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(())
}

/// Whether the Pod asks for injection: `inject: "true"`, or no annotation and
/// `inject_by_default`. `Ok(None)` when the annotation is absent.
pub fn inject_requested(annotations: &BTreeMap<String, String>) -> Result<Option<bool>, Denial> {
    annotations
        .get(INJECT)
        .map(|v| parse_bool(INJECT, v))
        .transpose()
}

fn parse_bool(key: &str, value: &str) -> Result<bool, Denial> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value, "allowed are \"true\" and \"false\"")),
    }
}

/// Parse and validate every annotation of the contract (after [`screen`]).
// One flat list of annotations reads better than the same list split over helpers.
#[allow(clippy::too_many_lines)]
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<InjectionSpec, Denial> {
    let get = |key: &str| annotations.get(key).map(String::as_str);
    let gateway = get(GATEWAY)
        .map(|v| {
            validate_gateway_name(v)
                .map(|()| v.to_owned())
                .map_err(|a| bad(GATEWAY, v, &a))
        })
        .transpose()?;
    let routes = get(ROUTES).map(parse_routes).transpose()?;
    let dns = get(DNS)
        .map(|v| {
            parse_list(
                DNS,
                v,
                "a comma-separated list of IPv4/IPv6 addresses (e.g. 10.0.0.53,fd00::53)",
                |item| item.parse::<IpAddr>().map_err(|_| ()),
            )
        })
        .transpose()?;
    let endpoints = get(ENDPOINTS)
        .map(|v| {
            parse_list(
                ENDPOINTS,
                v,
                "a comma-separated list of host:port (IPv6 in brackets, e.g. vpn.example.com:51820,[2001:db8::1]:51820)",
                |item| item.parse::<Endpoint>().map_err(|_| ()),
            )
        })
        .transpose()?;
    let mtu = get(MTU)
        .map(|v| Mtu::parse(v).ok_or_else(|| bad(MTU, v, MTU_ALLOWED)))
        .transpose()?;
    let keepalive = get(KEEPALIVE)
        .map(|v| {
            v.parse::<u16>().map_err(|_| {
                bad(
                    KEEPALIVE,
                    v,
                    "allowed is an integer number of seconds from 0 (off) to 65535",
                )
            })
        })
        .transpose()?;
    let key_source = match get(KEY_SOURCE) {
        None | Some("vault") => KeySource::Vault,
        Some(v) => {
            const ALLOWED: &str =
                "allowed are \"vault\" and \"secret:<name>\" with a DNS-1123 Secret name, which may hold the placeholder {pod}";
            let name = v
                .strip_prefix("secret:")
                .ok_or_else(|| bad(KEY_SOURCE, v, ALLOWED))?;
            validate_dns1123_subdomain(&name.replace(POD_PLACEHOLDER, "x"))
                .map_err(|_| bad(KEY_SOURCE, v, ALLOWED))?;
            KeySource::Secret(name.to_owned())
        }
    };
    let vault_role = get(VAULT_ROLE)
        .map(|v| {
            validate_vault_role(v)
                .map(|()| v.to_owned())
                .map_err(|a| bad(VAULT_ROLE, v, &a))
        })
        .transpose()?;
    let vault_path = get(VAULT_PATH)
        .map(|v| {
            validate_vault_path(v)
                .map(|()| v.to_owned())
                .map_err(|a| bad(VAULT_PATH, v, &a))
        })
        .transpose()?;
    if key_source != KeySource::Vault {
        for key in [VAULT_ROLE, VAULT_PATH] {
            if let Some(v) = get(key) {
                return Err(bad(
                    key,
                    v,
                    "Vault settings are only allowed with key-source: vault (this Pod reads its keys from a Secret)",
                ));
            }
        }
    }
    let kill_switch = get(KILL_SWITCH)
        .map(|v| parse_bool(KILL_SWITCH, v))
        .transpose()?;
    let sidecar_mode = get(SIDECAR_MODE)
        .map(|v| match v {
            "native" => Ok(SidecarMode::Native),
            "classic" => Ok(SidecarMode::Classic),
            "auto" => Ok(SidecarMode::Auto),
            _ => Err(bad(
                SIDECAR_MODE,
                v,
                "allowed are \"native\", \"classic\" and \"auto\"",
            )),
        })
        .transpose()?;
    let quantity = |key: &str| {
        get(key)
            .map(|v| {
                parse_quantity(v)
                    .map(|_| v.to_owned())
                    .map_err(|a| bad(key, v, &a))
            })
            .transpose()
    };
    let resources = ResourceOverrides {
        cpu_request: quantity(SIDECAR_CPU_REQUEST)?,
        cpu_limit: quantity(SIDECAR_CPU_LIMIT)?,
        memory_request: quantity(SIDECAR_MEMORY_REQUEST)?,
        memory_limit: quantity(SIDECAR_MEMORY_LIMIT)?,
    };
    Ok(InjectionSpec {
        gateway,
        routes,
        dns,
        endpoints,
        mtu,
        keepalive,
        key_source,
        vault_role,
        vault_path,
        kill_switch,
        sidecar_mode,
        resources,
    })
}

/// The comma-separated items of `value`, trimmed, duplicates dropped.
fn parse_list<T: PartialEq>(
    key: &str,
    value: &str,
    allowed: &str,
    item: impl Fn(&str) -> Result<T, ()>,
) -> Result<Vec<T>, Denial> {
    let mut out = Vec::new();
    for parsed in parse_items(key, value, allowed, item)? {
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

/// The comma-separated items of `value`, trimmed, all of them.
fn parse_items<T>(
    key: &str,
    value: &str,
    allowed: &str,
    item: impl Fn(&str) -> Result<T, ()>,
) -> Result<Vec<T>, Denial> {
    value
        .split(',')
        .map(|raw| {
            let raw = raw.trim();
            item(raw).map_err(|()| {
                bad(
                    key,
                    value,
                    &format!("{raw:?} is not valid; allowed is {allowed}"),
                )
            })
        })
        .collect()
}

/// The routes annotation: canonical CIDRs, none overlapping another (a duplicate included).
/// Whether they cover what the sidecar needs outside the tunnel depends on the config and is
/// checked at injection (`crate::inject::plan`, [`routes::lockout`]).
fn parse_routes(value: &str) -> Result<Vec<IpNet>, Denial> {
    const ALLOWED: &str = "a comma-separated list of CIDRs in canonical form (IPv4 or IPv6, e.g. 10.20.0.0/16,fd00:20::/64)";
    let routes = parse_items(ROUTES, value, ALLOWED, |item| {
        item.parse::<IpNet>().map_err(|_| ())
    })?;
    for route in &routes {
        if route.trunc() != *route {
            return Err(bad(
                ROUTES,
                value,
                &format!(
                    "{route} has host bits set (did you mean {}?); allowed is {ALLOWED}",
                    route.trunc()
                ),
            ));
        }
    }
    if let Some(overlap) = routes::overlap(&routes) {
        return Err(Denial {
            reason: "overlapping_routes",
            message: format!("annotation {ROUTES}={value:?} is invalid: {overlap}"),
        });
    }
    Ok(routes)
}

/// A DNS-1123 label (gateway profile names are also label values): lowercase letters, digits
/// and `-`, 1–63 characters, starting and ending with a letter or digit.
pub fn validate_gateway_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("allowed is a DNS-1123 label: 1–63 lowercase letters, digits or '-', starting and ending with a letter or digit".to_owned())
    }
}

/// A DNS-1123 subdomain (Secret and ConfigMap names).
pub fn validate_dns1123_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err("allowed is a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters".to_owned())
    }
}

pub(crate) fn validate_dns_name(host: &str) -> Result<(), ()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

fn strip_placeholders(template: &str, placeholders: &[&str]) -> String {
    placeholders
        .iter()
        .fold(template.to_owned(), |t, p| t.replace(p, "x"))
}

/// A Vault role name (template): letters, digits, `.`, `_`, `-`, placeholders `{namespace}` and
/// `{serviceAccount}`, at most 128 characters.
pub fn validate_vault_role(role: &str) -> Result<(), String> {
    let plain = strip_placeholders(role, &[NAMESPACE_PLACEHOLDER, SERVICE_ACCOUNT_PLACEHOLDER]);
    let ok = !role.is_empty()
        && role.len() <= 128
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("allowed is 1–128 letters, digits, '.', '_' or '-', with the placeholders {namespace} and {serviceAccount}".to_owned())
    }
}

/// A Vault KV path (template): `/`-separated segments of letters, digits, `.`, `_`, `-` and the
/// placeholders `{namespace}` / `{serviceAccount}` / `{pod}`; no empty, `.` or `..` segment, no
/// leading or trailing `/`, no control characters, at most 512 characters.
pub fn validate_vault_path(path: &str) -> Result<(), String> {
    let plain = strip_placeholders(
        path,
        &[
            NAMESPACE_PLACEHOLDER,
            SERVICE_ACCOUNT_PLACEHOLDER,
            POD_PLACEHOLDER,
        ],
    );
    let ok = !path.is_empty()
        && path.len() <= 512
        && plain.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err("allowed is a relative KV path like wg/keys/{namespace}/{pod}: '/'-separated segments of letters, digits, '.', '_' or '-' and the placeholders {namespace}, {serviceAccount} and {pod}, no '..' or empty segment, no control characters".to_owned())
    }
}

/// A Vault mount path: like a KV path, without placeholders.
pub fn validate_mount(mount: &str) -> Result<(), String> {
    if mount.contains('{') {
        return Err("allowed is a mount path without placeholders".to_owned());
    }
    validate_vault_path(mount)
}

/// Parse a Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1G`, `1e3`) into its value.
/// Negative quantities are refused.
pub fn parse_quantity(value: &str) -> Result<f64, String> {
    const ALLOWED: &str =
        "allowed is a non-negative Kubernetes quantity such as 100m, 0.5, 64Mi or 1G";
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    if number.is_empty()
        || number.starts_with('.') && number.len() == 1
        || number.matches('.').count() > 1
    {
        return Err(ALLOWED.to_owned());
    }
    let n: f64 = number.parse().map_err(|_| ALLOWED.to_owned())?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| ALLOWED.to_owned())?;
            if !(-18..=18).contains(&e) {
                return Err(ALLOWED.to_owned());
            }
            10f64.powi(e)
        }
        _ => return Err(ALLOWED.to_owned()),
    };
    Ok(n * multiplier)
}

/// What kind of key material `value` looks like, if any: a WireGuard key (44 base64
/// characters decoding to 32 bytes), a PEM block, or a Vault token (`hvs.`, `hvb.`, `hvr.`,
/// legacy `s.`/`b.`/`r.`).
#[must_use]
pub fn looks_like_key_material(value: &str) -> Option<&'static str> {
    if value.contains("-----BEGIN") {
        return Some("a PEM block");
    }
    let token_char = |c: char| c.is_ascii_alphanumeric() || "+/=._-".contains(c);
    for token in value
        .split(|c: char| !token_char(c))
        .filter(|t| !t.is_empty())
    {
        if token.len() == 44 {
            let std = base64::engine::general_purpose::STANDARD.decode(token);
            let url = base64::engine::general_purpose::URL_SAFE.decode(token);
            if std.or(url).is_ok_and(|bytes| bytes.len() == 32) {
                return Some("a base64 WireGuard key");
            }
        }
        for prefix in ["hvs.", "hvb.", "hvr."] {
            if token
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.len() >= 20)
            {
                return Some("a Vault token");
            }
        }
        for prefix in ["s.", "b.", "r."] {
            if token.strip_prefix(prefix).is_some_and(|rest| {
                rest.len() >= 24 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
            }) {
                return Some("a Vault token");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn denial(pairs: &[(&str, &str)]) -> Denial {
        let a = annotations(pairs);
        screen(&a).and_then(|()| parse(&a)).unwrap_err()
    }

    #[test]
    fn no_annotations_parse_to_all_defaults() {
        let spec = parse(&BTreeMap::new()).unwrap();
        assert_eq!(spec.key_source, KeySource::Vault);
        assert!(spec.gateway.is_none() && spec.routes.is_none() && spec.mtu.is_none());
    }

    #[test]
    fn every_annotation_is_parsed_into_the_spec() {
        let spec = parse(&annotations(&[
            (GATEWAY, "corp"),
            (ROUTES, "10.20.0.0/16, fd00:20::/64"),
            (DNS, "10.20.0.53,fd00:20::53"),
            (
                ENDPOINTS,
                "vpn.example.com:51820,[2001:db8::1]:51821,192.0.2.1:51820",
            ),
            (MTU, "1380"),
            (KEEPALIVE, "0"),
            (VAULT_ROLE, "shop-web"),
            (VAULT_PATH, "team/{namespace}/wg/{serviceAccount}"),
            (KILL_SWITCH, "false"),
            (SIDECAR_MODE, "classic"),
            (SIDECAR_CPU_REQUEST, "50m"),
            (SIDECAR_CPU_LIMIT, "1"),
            (SIDECAR_MEMORY_REQUEST, "32Mi"),
            (SIDECAR_MEMORY_LIMIT, "128Mi"),
        ]))
        .unwrap();
        assert_eq!(spec.gateway.as_deref(), Some("corp"));
        let routes: Vec<String> = spec
            .routes
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(routes, ["10.20.0.0/16", "fd00:20::/64"], "trimmed");
        assert_eq!(spec.dns.unwrap().len(), 2);
        let endpoints: Vec<String> = spec
            .endpoints
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            endpoints,
            [
                "vpn.example.com:51820",
                "[2001:db8::1]:51821",
                "192.0.2.1:51820"
            ]
        );
        assert_eq!(
            (spec.mtu, spec.keepalive, spec.kill_switch),
            (Some(Mtu::Fixed(1380)), Some(0), Some(false))
        );
        assert_eq!(spec.sidecar_mode, Some(SidecarMode::Classic));
        assert_eq!(spec.resources.memory_limit.as_deref(), Some("128Mi"));
    }

    #[test]
    fn a_non_canonical_cidr_is_denied_with_the_canonical_suggestion() {
        let d = denial(&[(ROUTES, "10.1.2.3/8")]);
        assert_eq!(d.reason, "bad_annotation");
        assert_eq!(
            d.message,
            "annotation wg-injector.io/routes=\"10.1.2.3/8\" is invalid: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?); allowed is a comma-separated list of CIDRs in canonical form (IPv4 or IPv6, e.g. 10.20.0.0/16,fd00:20::/64)"
        );
    }

    #[test]
    fn routes_that_overlap_each_other_are_denied_naming_both() {
        let d = denial(&[(ROUTES, "10.0.0.0/8, 10.20.0.0/16")]);
        assert_eq!(d.reason, "overlapping_routes");
        assert_eq!(
            d.message,
            "annotation wg-injector.io/routes=\"10.0.0.0/8, 10.20.0.0/16\" is invalid: 10.20.0.0/16 lies inside 10.0.0.0/8, and routes may not overlap; keep 10.0.0.0/8 alone (it already sends 10.20.0.0/16 through the tunnel), or list prefixes that do not overlap"
        );
        let d = denial(&[(ROUTES, "10.20.0.0/16,fd00:20::/64,10.20.0.0/16")]);
        assert_eq!(d.reason, "overlapping_routes");
        assert!(
            d.message
                .ends_with("is invalid: 10.20.0.0/16 is listed twice; list each route once"),
            "{}",
            d.message
        );
        let d = denial(&[(ROUTES, "0.0.0.0/0,10.20.0.0/16")]);
        assert_eq!(
            d.reason, "overlapping_routes",
            "the full tunnel overlaps too"
        );
        let spec = parse(&annotations(&[(ROUTES, "0.0.0.0/0,::/0")])).unwrap();
        assert_eq!(
            spec.routes.unwrap().len(),
            2,
            "the two families do not overlap"
        );
    }

    #[test]
    fn dns_servers_and_endpoints_listed_twice_are_still_deduplicated() {
        let spec = parse(&annotations(&[(DNS, "10.0.0.53,10.0.0.53")])).unwrap();
        assert_eq!(spec.dns.unwrap().len(), 1);
    }

    #[test]
    fn a_route_that_is_not_a_cidr_is_denied_naming_the_item() {
        let d = denial(&[(ROUTES, "10.0.0.0/8,fd00::/129")]);
        assert!(d.message.starts_with("annotation wg-injector.io/routes=\"10.0.0.0/8,fd00::/129\" is invalid: \"fd00::/129\" is not valid"), "{}", d.message);
        let d = denial(&[(ROUTES, "")]);
        assert!(
            d.message.contains("\"\" is not valid"),
            "an empty list is refused: {}",
            d.message
        );
    }

    #[test]
    fn a_bad_dns_server_is_denied() {
        let d = denial(&[(DNS, "dns.example.com")]);
        assert!(
            d.message.contains("wg-injector.io/dns=\"dns.example.com\"")
                && d.message.contains("IPv4/IPv6 addresses"),
            "{}",
            d.message
        );
    }

    #[test]
    fn endpoints_need_a_port_and_brackets_around_ipv6() {
        for value in [
            "vpn.example.com",
            "2001:db8::1:51820",
            "[2001:db8::1]",
            "vpn.example.com:0",
            "vpn.example.com:70000",
            "bad_host:51820",
        ] {
            let d = denial(&[(ENDPOINTS, value)]);
            assert!(d.message.contains("host:port"), "{value}: {}", d.message);
        }
    }

    #[test]
    fn mtu_is_auto_or_1280_to_9000_and_anything_else_is_denied() {
        for value in ["1279", "9001", "abc", "-1", "Auto", "auto ", ""] {
            let d = denial(&[(MTU, value)]);
            assert_eq!(d.message, format!("annotation wg-injector.io/mtu={value:?} is invalid: allowed is \"auto\" or an integer from 1280 to 9000"));
        }
        assert_eq!(
            parse(&annotations(&[(MTU, "1280")])).unwrap().mtu,
            Some(Mtu::Fixed(1280))
        );
        assert_eq!(
            parse(&annotations(&[(MTU, "9000")])).unwrap().mtu,
            Some(Mtu::Fixed(9000))
        );
        assert_eq!(
            parse(&annotations(&[(MTU, "auto")])).unwrap().mtu,
            Some(Mtu::Auto)
        );
        assert_eq!(Mtu::Auto.to_string(), "auto");
        assert_eq!(Mtu::Fixed(1380).to_string(), "1380");
    }

    #[test]
    fn keepalive_outside_0_to_65535_is_denied() {
        let d = denial(&[(KEEPALIVE, "65536")]);
        assert_eq!(d.message, "annotation wg-injector.io/keepalive=\"65536\" is invalid: allowed is an integer number of seconds from 0 (off) to 65535");
    }

    #[test]
    fn key_source_accepts_vault_and_secret_with_a_dns_name() {
        assert_eq!(
            parse(&annotations(&[(KEY_SOURCE, "secret:wg-keys.web")]))
                .unwrap()
                .key_source,
            KeySource::Secret("wg-keys.web".into())
        );
        for value in ["secret:", "secret:Bad_Name", "file", "vault:x"] {
            let d = denial(&[(KEY_SOURCE, value)]);
            assert!(
                d.message
                    .contains("allowed are \"vault\" and \"secret:<name>\""),
                "{value}: {}",
                d.message
            );
        }
    }

    #[test]
    fn vault_settings_with_a_secret_key_source_are_denied() {
        let d = denial(&[(KEY_SOURCE, "secret:keys"), (VAULT_ROLE, "web")]);
        assert!(
            d.message.contains("only allowed with key-source: vault"),
            "{}",
            d.message
        );
    }

    #[test]
    fn vault_paths_with_traversal_or_control_characters_are_denied() {
        for value in [
            "wg/../root",
            "/wg/keys",
            "wg//keys",
            "wg/keys/",
            "wg/ke\nys",
            "wg/{node}/x",
            "wg/./x",
        ] {
            let d = denial(&[(VAULT_PATH, value)]);
            assert!(d.message.contains("no '..'"), "{value:?}: {}", d.message);
        }
    }

    #[test]
    fn pod_is_a_placeholder_of_vault_paths_and_secret_names_but_not_of_roles() {
        let spec = parse(&annotations(&[(VAULT_PATH, "wg/keys/{namespace}/{pod}")])).unwrap();
        assert_eq!(
            spec.vault_path.as_deref(),
            Some("wg/keys/{namespace}/{pod}")
        );
        let spec = parse(&annotations(&[(KEY_SOURCE, "secret:wg-{pod}")])).unwrap();
        assert_eq!(
            spec.key_source,
            KeySource::Secret("wg-{pod}".into()),
            "filled in later, by identity::resolve"
        );
        let d = denial(&[(KEY_SOURCE, "secret:wg-{namespace}")]);
        assert!(d.message.contains("placeholder {pod}"), "{}", d.message);
        let d = denial(&[(VAULT_ROLE, "wg-{pod}")]);
        assert_eq!(d.reason, "bad_annotation", "{}", d.message);
    }

    #[test]
    fn vault_roles_with_odd_characters_are_denied() {
        let d = denial(&[(VAULT_ROLE, "web role")]);
        assert!(d.message.starts_with("annotation wg-injector.io/vault-role=\"web role\" is invalid: allowed is 1–128 letters"), "{}", d.message);
    }

    #[test]
    fn booleans_are_exactly_true_or_false() {
        let d = denial(&[(KILL_SWITCH, "yes")]);
        assert_eq!(d.message, "annotation wg-injector.io/kill-switch=\"yes\" is invalid: allowed are \"true\" and \"false\"");
        assert!(inject_requested(&annotations(&[(INJECT, "True")])).is_err());
        assert_eq!(
            inject_requested(&annotations(&[(INJECT, "false")])).unwrap(),
            Some(false)
        );
        assert_eq!(inject_requested(&BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn sidecar_mode_is_native_classic_or_auto() {
        let d = denial(&[(SIDECAR_MODE, "sidecar")]);
        assert_eq!(d.message, "annotation wg-injector.io/sidecar-mode=\"sidecar\" is invalid: allowed are \"native\", \"classic\" and \"auto\"");
    }

    #[test]
    fn gateway_names_are_dns_labels() {
        let d = denial(&[(GATEWAY, "Corp")]);
        assert!(d.message.contains("DNS-1123 label"), "{}", d.message);
    }

    #[test]
    fn resource_quantities_follow_kubernetes_syntax() {
        for value in ["100m", "0.5", "2", "64Mi", "1G", "1e3", "1.5Gi"] {
            assert!(parse_quantity(value).is_ok(), "{value}");
        }
        for value in ["", "-1", "100 m", "1.2.3", "10MB", "abc", "1e99", "."] {
            assert!(parse_quantity(value).is_err(), "{value}");
        }
        let d = denial(&[(SIDECAR_MEMORY_LIMIT, "64MB")]);
        assert_eq!(d.message, "annotation wg-injector.io/sidecar-memory-limit=\"64MB\" is invalid: allowed is a non-negative Kubernetes quantity such as 100m, 0.5, 64Mi or 1G");
        assert!((parse_quantity("64Mi").unwrap() - 67_108_864.0).abs() < 1.0);
    }

    #[test]
    fn a_wireguard_key_in_any_annotation_is_refused_without_echoing_it() {
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let d = denial(&[(DNS, key)]);
        assert_eq!(d.reason, "key_material");
        assert!(
            !d.message.contains(key),
            "the key is not echoed: {}",
            d.message
        );
        assert!(
            d.message.contains("wg-injector.io/dns") && d.message.contains("base64 WireGuard key")
        );
        let d = denial(&[(ROUTES, &format!("10.0.0.0/8,{key}"))]);
        assert_eq!(d.reason, "key_material", "a key hidden in a list is found");
    }

    #[test]
    fn pem_blocks_and_vault_tokens_are_refused() {
        assert_eq!(
            looks_like_key_material("-----BEGIN PRIVATE KEY-----\nMII…"),
            Some("a PEM block")
        );
        assert_eq!(
            looks_like_key_material("hvs.CAESIJ2v9kq3ZKcP3xLq0pBvF7Gd"),
            Some("a Vault token")
        );
        assert_eq!(
            looks_like_key_material("s.Qf1s5zigZ4OX6akYjQXJC1jY"),
            Some("a Vault token")
        );
        assert_eq!(looks_like_key_material("10.0.0.0/8,fd00::/64"), None);
        assert_eq!(
            looks_like_key_material("wg/keys/{namespace}/{serviceAccount}"),
            None
        );
        let d = denial(&[(
            "wg-injector.io/vault-role",
            "hvs.CAESIJ2v9kq3ZKcP3xLq0pBvF7Gd",
        )]);
        assert_eq!(d.reason, "key_material");
    }

    #[test]
    fn unknown_wg_injector_annotations_are_denied_with_the_known_list() {
        let d = denial(&[
            ("wg-injector.io/injcet", "true"),
            ("example.com/other", "x"),
        ]);
        assert_eq!(d.reason, "unknown_annotation");
        assert!(d.message.starts_with("unknown annotation wg-injector.io/injcet (known wg-injector.io annotations: inject, gateway, routes,"), "{}", d.message);
    }
}
