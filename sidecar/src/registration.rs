//! Per-Pod registration: how a Pod's sidecar makes itself known to its gateway through Vault.
//!
//! Owns: the Pod's identity ([`PodIdentity`]: namespace, service account, name, UID), the record
//! layout under the KV mount ([`Layout`]), the address claim (one KV record per tunnel address,
//! written with check-and-set `cas=0` so a race has exactly one winner) and [`register`]: claim
//! (or keep, after a sidecar restart) an address from the gateway's pool, then publish the Pod's
//! public record — public key, addresses, preshared key, Pod name and UID.
//!
//! ```text
//! <peers>/<gateway>/<namespace>/<serviceAccount>/<pod-uid>   the Pod's public record
//! <addresses>/<gateway>/<address>                            the claim naming the Pod
//! <verdicts>/<gateway>/<namespace>/<serviceAccount>/<pod-uid> the gateway's refusal, if any
//! ```
//!
//! Vault's templated policy (`wg-sidecar vault bootstrap`) lets a Pod write only below its own
//! namespace and service account, and create (never update or delete) claims; the gateway reads
//! both and releases them when the Pod is gone. When the gateway refuses a live Pod it writes a
//! [`Verdict`] the Pod may read (and nothing else of it), so the sidecar's `/ready` can say why.
//! Must never: put the private key into Vault (only the public key and the preshared key go), or
//! overwrite another Pod's claim.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::{
    error::{Result, SidecarError},
    keys::{list_opt, PeerRecord},
    keysource::GatewayRecord,
    pool,
    secret::Secret,
    vault::Vault,
};

/// How many claim races one registration may lose before it reports a conflict.
const CLAIM_ATTEMPTS: usize = 32;

/// The Pod a sidecar runs in, from the downward API (`WG_POD_*`, written by the injector).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodIdentity {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl PodIdentity {
    /// Validates the four names; the error names the flag and the value.
    pub fn new(namespace: &str, service_account: &str, name: &str, uid: &str) -> Result<Self> {
        let check = |flag: &str, v: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(SidecarError::InvalidConfig(format!(
                    "{flag} {v:?} is not a Kubernetes name (the injector sets it from the downward API)"
                )))
            }
        };
        check("--pod-namespace", namespace, is_dns_name(namespace))?;
        check(
            "--service-account",
            service_account,
            is_dns_name(service_account),
        )?;
        check("--pod-name", name, is_dns_name(name))?;
        check("--pod-uid", uid, is_uid(uid))?;
        Ok(Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        })
    }

    /// `namespace/name` (for logs).
    #[must_use]
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The identity in a record's fields, `None` when the record has none (a record written by
    /// `keys provision`); a partial identity is invalid.
    pub fn from_fields(
        source_name: &str,
        fields: &BTreeMap<String, Secret>,
    ) -> Result<Option<Self>> {
        let get = |k: &str| fields.get(k).map(Secret::expose).filter(|v| !v.is_empty());
        match (
            get("namespace"),
            get("service_account"),
            get("pod"),
            get("uid"),
        ) {
            (None, None, None, None) => Ok(None),
            (Some(ns), Some(sa), Some(pod), Some(uid)) => Self::new(ns, sa, pod, uid)
                .map(Some)
                .map_err(|e| SidecarError::InvalidRecord {
                    source_name: source_name.to_owned(),
                    reason: e.to_string(),
                }),
            _ => Err(SidecarError::InvalidRecord {
                source_name: source_name.to_owned(),
                reason: "namespace, service_account, pod and uid must be set together".into(),
            }),
        }
    }

    /// Writes the identity's four fields into `m`.
    pub fn write_fields(&self, m: &mut BTreeMap<String, Secret>) {
        m.insert("namespace".into(), Secret::new(self.namespace.clone()));
        m.insert(
            "service_account".into(),
            Secret::new(self.service_account.clone()),
        );
        m.insert("pod".into(), Secret::new(self.name.clone()));
        m.insert("uid".into(), Secret::new(self.uid.clone()));
    }
}

/// Where registration records live under the KV mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// KV v2 mount (`secret`).
    pub kv_mount: String,
    /// Folder of the Pods' public records (`wg/peers`).
    pub peers_prefix: String,
    /// Folder of the address claims (`wg/addresses`).
    pub addresses_prefix: String,
    /// Folder of the gateways' verdicts on refused Pods (`wg/verdicts`).
    pub verdicts_prefix: String,
}

impl Layout {
    /// `<peers>/<gateway>`: every record of one gateway, three folders deep.
    #[must_use]
    pub fn peers_folder(&self, gateway: &str) -> String {
        format!("{}/{gateway}", self.peers_prefix.trim_end_matches('/'))
    }

    /// `<peers>/<gateway>/<ns>/<sa>/<uid>`.
    #[must_use]
    pub fn record_path(&self, gateway: &str, pod: &PodIdentity) -> String {
        format!(
            "{}/{}/{}/{}",
            self.peers_folder(gateway),
            pod.namespace,
            pod.service_account,
            pod.uid
        )
    }

    /// `<verdicts>/<gateway>`: every verdict of one gateway, three folders deep.
    #[must_use]
    pub fn verdicts_folder(&self, gateway: &str) -> String {
        format!("{}/{gateway}", self.verdicts_prefix.trim_end_matches('/'))
    }

    /// `<verdicts>/<gateway>/<ns>/<sa>/<uid>`.
    #[must_use]
    pub fn verdict_path(&self, gateway: &str, pod: &PodIdentity) -> String {
        format!(
            "{}/{}/{}/{}",
            self.verdicts_folder(gateway),
            pod.namespace,
            pod.service_account,
            pod.uid
        )
    }

    /// `<addresses>/<gateway>`.
    #[must_use]
    pub fn claims_folder(&self, gateway: &str) -> String {
        format!("{}/{gateway}", self.addresses_prefix.trim_end_matches('/'))
    }

    /// `<addresses>/<gateway>/<address>`.
    #[must_use]
    pub fn claim_path(&self, gateway: &str, addr: IpAddr) -> String {
        format!(
            "{}/{}",
            self.claims_folder(gateway),
            pool::record_name(addr)
        )
    }
}

/// The gateway a record path belongs to: the last segment of the gateway record's path
/// (`wg/gateways/corp` → `corp`).
#[must_use]
pub fn gateway_name(gateway_path: &str) -> &str {
    gateway_path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(gateway_path)
}

/// An address claim: who holds one tunnel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The address.
    pub address: IpAddr,
    /// The Pod holding it.
    pub pod: PodIdentity,
}

impl Claim {
    /// The claim's KV fields.
    #[must_use]
    pub fn to_fields(&self) -> BTreeMap<String, Secret> {
        let mut m = BTreeMap::new();
        m.insert("address".into(), Secret::new(self.address.to_string()));
        self.pod.write_fields(&mut m);
        m
    }

    /// Parses a claim record.
    pub fn from_fields(source_name: &str, fields: &BTreeMap<String, Secret>) -> Result<Self> {
        let bad = |reason: &str| SidecarError::InvalidRecord {
            source_name: source_name.to_owned(),
            reason: reason.to_owned(),
        };
        let address = fields
            .get("address")
            .and_then(|v| v.expose().parse::<IpAddr>().ok())
            .ok_or_else(|| bad("field address is not an IP address"))?;
        let pod = PodIdentity::from_fields(source_name, fields)?
            .ok_or_else(|| bad("a claim must name its Pod"))?;
        Ok(Self { address, pod })
    }
}

/// A gateway's refusal of a live Pod, written by the gateway below the Pod's own namespace,
/// service account and UID (`<verdicts>/<gateway>/<ns>/<sa>/<uid>`) and read by its sidecar while
/// it has no handshake: what `/ready` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The refusal's stable label (`reason` of `wg_gateway_peers_refused_total`).
    pub reason: String,
    /// What the Pod's owner can act on.
    pub message: String,
    /// The gateway that refused.
    pub gateway: String,
    /// When the gateway decided (RFC 3339).
    pub time: jiff::Timestamp,
    /// The Pod refused.
    pub pod: PodIdentity,
}

impl Verdict {
    /// The verdict's KV fields.
    #[must_use]
    pub fn to_fields(&self) -> BTreeMap<String, Secret> {
        let mut m = BTreeMap::new();
        m.insert("reason".into(), Secret::new(self.reason.clone()));
        m.insert("message".into(), Secret::new(self.message.clone()));
        m.insert("gateway".into(), Secret::new(self.gateway.clone()));
        m.insert("time".into(), Secret::new(self.time.to_string()));
        self.pod.write_fields(&mut m);
        m
    }

    /// Parses a verdict record.
    pub fn from_fields(source_name: &str, fields: &BTreeMap<String, Secret>) -> Result<Self> {
        let bad = |reason: String| SidecarError::InvalidRecord {
            source_name: source_name.to_owned(),
            reason,
        };
        let get = |k: &str| {
            fields
                .get(k)
                .map(|v| v.expose().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| bad(format!("missing field {k}")))
        };
        let time = get("time")?
            .parse::<jiff::Timestamp>()
            .map_err(|e| bad(format!("field time is not RFC 3339: {e}")))?;
        let pod = PodIdentity::from_fields(source_name, fields)?
            .ok_or_else(|| bad("a verdict must name its Pod".into()))?;
        Ok(Self {
            reason: get("reason")?,
            message: get("message")?,
            gateway: get("gateway")?,
            time,
            pod,
        })
    }

    /// True when `other` says the same (the time aside): no need to write it again.
    #[must_use]
    pub fn same_as(&self, other: &Self) -> bool {
        (&self.reason, &self.message, &self.gateway, &self.pod)
            == (&other.reason, &other.message, &other.gateway, &other.pod)
    }

    /// What the sidecar's `/ready` says while the verdict stands.
    #[must_use]
    pub fn ready_reason(&self) -> String {
        format!("refused by gateway {}: {}", self.gateway, self.message)
    }
}

/// Why a registration failed, as a short stable label (`reason` of the failure metric).
#[must_use]
pub fn failure_reason(e: &SidecarError) -> &'static str {
    match e {
        SidecarError::PoolExhausted { .. } => "pool_exhausted",
        SidecarError::VaultKv {
            status: Some(401 | 403),
            ..
        }
        | SidecarError::VaultLogin { .. } => "vault_refused",
        SidecarError::VaultKv { op: "write", .. } => "write_failed",
        SidecarError::Conflict { .. } => "claim_conflict",
        SidecarError::InvalidRecord { .. } => "invalid_record",
        _ => "vault_unavailable",
    }
}

/// What the Pod needs to register: the public halves and the preshared key it generated.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    /// The Pod.
    pub pod: &'a PodIdentity,
    /// The gateway's name (folder of its records).
    pub gateway: &'a str,
    /// The gateway's public record (its pool).
    pub gateway_record: &'a GatewayRecord,
    /// The Pod's base64 public key.
    pub public_key: &'a str,
    /// The per-Pod preshared key.
    pub preshared_key: &'a Secret,
    /// Addresses a static identity insists on (its private record's); empty: from the pool.
    pub fixed_addresses: &'a [IpNet],
    /// When the Pod publishes its next key (`--key-rotation-interval`; `None`: never).
    pub rotates_at: Option<jiff::Timestamp>,
}

/// The result of [`register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The Pod's tunnel addresses (host prefixes).
    pub addresses: Vec<IpNet>,
    /// True when the addresses came from this Pod's earlier record (a sidecar restart).
    pub reused: bool,
    /// KV version of the published record.
    pub version: u64,
    /// The published record (its `version` set).
    pub record: PeerRecord,
}

fn status_of(e: &SidecarError) -> Option<u16> {
    match e {
        SidecarError::VaultKv { status, .. } => *status,
        _ => None,
    }
}

async fn taken(vault: &Vault, layout: &Layout, gateway: &str) -> Result<HashSet<IpAddr>> {
    Ok(
        list_opt(vault, &layout.kv_mount, &layout.claims_folder(gateway))
            .await?
            .iter()
            .filter_map(|n| pool::parse_record_name(n))
            .collect(),
    )
}

/// Claims one free address of `pool_net` for `pod` (check-and-set `cas=0`). A lost race shows
/// as a CAS mismatch (400) or, under a create-only policy, as 403 on a claim that the next
/// listing shows; either way the next free address is tried.
pub async fn claim(
    vault: &Vault,
    layout: &Layout,
    gateway: &str,
    pool_net: IpNet,
    pod: &PodIdentity,
) -> Result<IpAddr> {
    let mut taken = taken(vault, layout, gateway).await?;
    for _ in 0..CLAIM_ATTEMPTS {
        let addr = pool::pick_free(pool_net, &taken, rand::random::<u64>())?;
        let claim = Claim {
            address: addr,
            pod: pod.clone(),
        };
        let path = layout.claim_path(gateway, addr);
        match vault
            .write(&layout.kv_mount, &path, &claim.to_fields(), Some(0))
            .await
        {
            Ok(_) => return Ok(addr),
            Err(e) if status_of(&e) == Some(400) => {
                tracing::debug!(%addr, "address claimed concurrently; trying another");
                taken.insert(addr);
            }
            Err(e) if status_of(&e) == Some(403) => {
                let now = self::taken(vault, layout, gateway).await?;
                if !now.contains(&addr) {
                    return Err(e);
                }
                tracing::debug!(%addr, "address claimed concurrently; trying another");
                taken = now;
            }
            Err(e) => return Err(e),
        }
    }
    Err(SidecarError::Conflict {
        op: format!("claim an address from {pool_net}"),
        reason: format!("lost {CLAIM_ATTEMPTS} check-and-set races"),
    })
}

/// Registers the Pod: keeps the addresses of its own earlier record (same Pod UID: the sidecar
/// restarted) or claims one per pool family, then publishes the public record.
pub async fn register(vault: &Vault, layout: &Layout, r: &Registration<'_>) -> Result<Registered> {
    let path = layout.record_path(r.gateway, r.pod);
    let earlier = match vault.read(&layout.kv_mount, &path).await {
        Ok(rec) => PeerRecord::from_fields(&path, &rec.data, rec.version)
            .ok()
            .map(|p| p.addresses),
        Err(e) if status_of(&e) == Some(404) => None,
        Err(e) => return Err(e),
    };
    let pools = &r.gateway_record.pool;
    let in_pool = |a: &IpNet| pools.iter().any(|p| p.contains(&a.addr()));
    let (addresses, reused) = match earlier {
        Some(a) if !a.is_empty() && a.iter().all(in_pool) => (a, true),
        _ if !r.fixed_addresses.is_empty() => {
            for a in r.fixed_addresses {
                let claim = Claim {
                    address: a.addr(),
                    pod: r.pod.clone(),
                };
                let cpath = layout.claim_path(r.gateway, a.addr());
                vault
                    .write(&layout.kv_mount, &cpath, &claim.to_fields(), Some(0))
                    .await
                    .map_err(|e| match status_of(&e) {
                        Some(400 | 403) => SidecarError::Conflict {
                            op: format!("claim the static address {a}"),
                            reason: "another Pod holds it".into(),
                        },
                        _ => e,
                    })?;
            }
            (r.fixed_addresses.to_vec(), false)
        }
        _ => {
            if pools.is_empty() {
                return Err(SidecarError::InvalidRecord {
                    source_name: r.gateway.to_owned(),
                    reason: "the gateway record has no pool (re-run `wg-sidecar keys provision-gateway --pool …`)".into(),
                });
            }
            let mut out = Vec::new();
            for p in pools {
                out.push(pool::host_net(
                    claim(vault, layout, r.gateway, *p, r.pod).await?,
                ));
            }
            (out, false)
        }
    };
    let record = PeerRecord {
        public_key: r.public_key.to_owned(),
        addresses: addresses.clone(),
        next_public_key: None,
        activate_at: None,
        rotates_at: r.rotates_at,
        preshared_key: Some(r.preshared_key.clone()),
        pod: Some(r.pod.clone()),
        version: 0,
    };
    let version = vault
        .write(&layout.kv_mount, &path, &record.to_fields(), None)
        .await?;
    Ok(Registered {
        addresses,
        reused,
        version,
        record: PeerRecord { version, ..record },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod() -> PodIdentity {
        PodIdentity::new(
            "shop",
            "web",
            "web-5d8f-abcde",
            "0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d",
        )
        .unwrap()
    }

    #[test]
    fn the_layout_puts_each_pod_under_its_own_namespace_and_service_account() {
        let l = Layout {
            kv_mount: "secret".into(),
            peers_prefix: "wg/peers/".into(),
            addresses_prefix: "wg/addresses".into(),
            verdicts_prefix: "wg/verdicts/".into(),
        };
        assert_eq!(
            l.record_path("corp", &pod()),
            "wg/peers/corp/shop/web/0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d"
        );
        assert_eq!(
            l.verdict_path("corp", &pod()),
            "wg/verdicts/corp/shop/web/0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d"
        );
        assert_eq!(
            l.claim_path("corp", "fd00::2".parse().unwrap()),
            "wg/addresses/corp/fd00--2"
        );
        assert_eq!(gateway_name("wg/gateways/corp"), "corp");
    }

    #[test]
    fn a_verdict_round_trips_and_reads_as_the_reason_on_ready() {
        let v = Verdict {
            reason: "namespace_not_selected".into(),
            message:
                "namespace shop does not match the gateway's access.namespaceSelector team=payments"
                    .into(),
            gateway: "corp".into(),
            time: "2030-01-01T00:00:00Z".parse().unwrap(),
            pod: pod(),
        };
        let back = Verdict::from_fields("v", &v.to_fields()).unwrap();
        assert_eq!(back, v);
        let mut later = v.clone();
        later.time = "2030-01-02T00:00:00Z".parse().unwrap();
        assert!(later.same_as(&v), "the time alone is no news");
        later.reason = "service_account_not_allowed".into();
        assert!(!later.same_as(&v));
        assert_eq!(
            v.ready_reason(),
            "refused by gateway corp: namespace shop does not match the gateway's access.namespaceSelector team=payments"
        );
        let mut f = v.to_fields();
        f.remove("message");
        assert!(Verdict::from_fields("v", &f)
            .unwrap_err()
            .to_string()
            .contains("message"));
    }

    #[test]
    fn a_bad_pod_identity_names_the_flag_and_value() {
        let e = PodIdentity::new("Shop", "web", "p", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pod-namespace") && e.contains("Shop"), "{e}");
        let e = PodIdentity::new("shop", "web", "p", "not a uid")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pod-uid"), "{e}");
    }

    #[test]
    fn a_claim_round_trips_and_a_partial_identity_is_refused() {
        let c = Claim {
            address: "10.203.0.7".parse().unwrap(),
            pod: pod(),
        };
        assert_eq!(Claim::from_fields("c", &c.to_fields()).unwrap(), c);
        let mut f = c.to_fields();
        f.remove("uid");
        assert!(PodIdentity::from_fields("c", &f).is_err());
    }
}
