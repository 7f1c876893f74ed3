//! The gateway publishes its own endpoints: `wg-sidecar gateway --endpoints` (the chart's
//! `server.publicEndpoint`) reaches the `endpoints` field of the gateway's public record at start,
//! so a `helm install … --set server.publicEndpoint=…` alone gives the sidecars the right address.
//!
//! Owns: validating `--endpoints` ([`parse_endpoints`]), the pure decision ([`plan`]: the record
//! as read + the desired endpoints → nothing to do, or the fields to write), and the thin Vault
//! I/O ([`publish`]): read, write with check-and-set on the version read, and on a CAS conflict
//! read again and decide again (several replicas start at once and all render the same value, so
//! the first write lands and the others find nothing left to do: the record's version moves once).
//!
//! A record that does not exist at all is *created* (check-and-set 0: only if still absent, so
//! of all replicas one write lands), from what the gateway knows for certain: its public key
//! (from its private record), `--endpoints`, its pool (the networks of its own addresses, what
//! the gateway already assumes for a record without a `pool`), `--private-networks` as
//! `allowed_ips` and `--peer-keepalive`. Refusing to serve, or serving a record nobody can find,
//! would only leave the chart's required value without effect; the fields written are exactly
//! what `keys provision-gateway` writes for the same key and pool ([`crate::keys::gateway_record_fields`]),
//! and a later `keys provision-gateway` overwrites them as before.
//!
//! Must never: change any field of an existing record but `endpoints` (the public key, the
//! pool, `allowed_ips`, `keepalive` and anything else are written back exactly as read), write
//! without check-and-set, overwrite a record that changed since it was read, or fail the
//! gateway's start (a failed publish is a warning naming the fix; the gateway serves on).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::{
    error::{Result, SidecarError},
    keysource::GatewayRecord,
    secret::Secret,
    vault::{KvRecord, Vault},
};

/// Reads and CAS writes tried before giving up (each conflict means another writer landed).
const MAX_ATTEMPTS: usize = 5;

/// Checks one `--endpoints` value: `host:port` with a DNS name or IPv4 address as host, or
/// `[IPv6]:port`, port 1-65535. Returns it trimmed; the error names the value and the fix.
pub fn parse_endpoint(raw: &str) -> std::result::Result<String, String> {
    let v = raw.trim();
    let bad = |why: &str| {
        format!(
            "--endpoints: {v:?} is not host:port ({why}); give the address sidecars dial, e.g. \
             203.0.113.1:51820, vpn.example.com:51820 or [2001:db8::1]:51820"
        )
    };
    let (host, port) = v.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be a number 1-65535")),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| bad("an IPv6 address needs brackets: [addr]:port"))?;
        inner
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address in the brackets"))?;
        return Ok(v.to_owned());
    }
    if host.contains(':') {
        return Err(bad("an IPv6 address needs brackets: [addr]:port"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad("the host must be a DNS name or an IP address"));
    }
    Ok(v.to_owned())
}

/// [`parse_endpoint`] for each value (empty values, as a trailing comma leaves, are skipped).
pub fn parse_endpoints(raw: &[String]) -> std::result::Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for r in raw.iter().filter(|r| !r.trim().is_empty()) {
        let e = parse_endpoint(r)?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// What the gateway would write if its record were missing (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    /// Base64 public key of the gateway's private key.
    pub public_key: String,
    /// The peers' pools: the networks of the gateway's addresses.
    pub pool: Vec<IpNet>,
    /// `--private-networks`.
    pub allowed_ips: Vec<IpNet>,
    /// `--peer-keepalive` (None: off).
    pub keepalive: Option<u16>,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The record already lists exactly the desired endpoints (in that order).
    Unchanged,
    /// Write `fields` (every field as read, `endpoints` replaced) with CAS on `version`.
    Update {
        /// The record's fields to write.
        fields: BTreeMap<String, Secret>,
        /// The KV version read (the CAS value).
        version: u64,
        /// The endpoints the record listed.
        old: Vec<String>,
    },
    /// No record: create it with CAS 0.
    Create {
        /// The fields of the new record.
        fields: BTreeMap<String, Secret>,
    },
}

/// The pure decision: `read` is the record as read (`None`: absent), `desired` the validated
/// `--endpoints`. An existing record that is not a valid gateway record is an error (the
/// gateway does not repair what it cannot read).
pub fn plan(
    source_name: &str,
    read: Option<&KvRecord>,
    desired: &[String],
    own: &Own,
) -> Result<Plan> {
    let Some(rec) = read else {
        return Ok(Plan::Create {
            fields: crate::keys::gateway_record_fields(
                &own.public_key,
                desired,
                &own.allowed_ips,
                &own.pool,
                own.keepalive.unwrap_or(0),
            ),
        });
    };
    let parsed = GatewayRecord::from_fields(source_name, &rec.data, rec.version)?;
    if parsed.endpoints == desired {
        return Ok(Plan::Unchanged);
    }
    let mut fields = rec.data.clone();
    let (key, value) = crate::keys::endpoints_field(desired);
    fields.insert(key.to_owned(), value);
    Ok(Plan::Update {
        fields,
        version: rec.version,
        old: parsed.endpoints,
    })
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The record already listed the endpoints (maybe after another replica wrote them).
    Unchanged,
    /// The endpoints were replaced: `old` → the desired ones, now at KV `version`.
    Updated {
        /// What the record listed before.
        old: Vec<String>,
        /// The new KV version.
        version: u64,
    },
    /// The record was created at KV `version`.
    Created {
        /// The new KV version (1).
        version: u64,
    },
}

fn status_of(e: &SidecarError) -> Option<u16> {
    match e {
        SidecarError::VaultKv { status, .. } => *status,
        _ => None,
    }
}

/// Reads the record at `mount/path`, decides with [`plan`], writes with check-and-set, and on a
/// conflict (HTTP 400 from KV v2's `cas`) reads again and decides again, at most
/// [`MAX_ATTEMPTS`] times. Never writes without CAS.
pub async fn publish(
    vault: &Vault,
    mount: &str,
    path: &str,
    desired: &[String],
    own: &Own,
) -> Result<Outcome> {
    let source = format!("{mount}/{path}");
    for _ in 0..MAX_ATTEMPTS {
        let read = match vault.read(mount, path).await {
            Ok(r) => Some(r),
            Err(e) if status_of(&e) == Some(404) => None,
            Err(e) => return Err(e),
        };
        let (fields, cas, old) = match plan(&source, read.as_ref(), desired, own)? {
            Plan::Unchanged => return Ok(Outcome::Unchanged),
            Plan::Update {
                fields,
                version,
                old,
            } => (fields, version, Some(old)),
            Plan::Create { fields } => (fields, 0, None),
        };
        let cas = u32::try_from(cas).map_err(|_| SidecarError::Conflict {
            op: "publish the gateway endpoints".into(),
            reason: format!("{source}: version {cas} does not fit a check-and-set"),
        })?;
        match vault.write(mount, path, &fields, Some(cas)).await {
            Ok(version) => {
                return Ok(match old {
                    Some(old) => Outcome::Updated { old, version },
                    None => Outcome::Created { version },
                })
            }
            Err(e) if status_of(&e) == Some(400) => {
                tracing::debug!(record = %source, "check-and-set conflict: another writer landed first; reading again");
            }
            Err(e) => return Err(e),
        }
    }
    Err(SidecarError::Conflict {
        op: "publish the gateway endpoints".into(),
        reason: format!("{source} changed {MAX_ATTEMPTS} times while it was being written"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn own() -> Own {
        let (_, public) = crate::keys::generate_keypair();
        Own {
            public_key: public,
            pool: vec!["10.99.0.0/16".parse().unwrap()],
            allowed_ips: vec!["10.20.0.0/24".parse().unwrap()],
            keepalive: Some(5),
        }
    }

    fn record(own: &Own, endpoints: &str, extra: &[(&str, &str)]) -> KvRecord {
        let mut data = crate::keys::gateway_record_fields(
            &own.public_key,
            &s(&[endpoints]),
            &["10.30.0.0/24".parse().unwrap()],
            &["10.77.0.0/16".parse().unwrap()],
            25,
        );
        for (k, v) in extra {
            data.insert((*k).to_owned(), Secret::new((*v).to_owned()));
        }
        KvRecord {
            data,
            version: 7,
            created_time: None,
        }
    }

    fn expose(f: &BTreeMap<String, Secret>) -> BTreeMap<String, String> {
        f.iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect()
    }

    #[test]
    fn endpoints_are_host_port_and_a_bad_one_is_named_with_the_fix() {
        for ok in [
            "203.0.113.1:51820",
            "vpn.example.com:31820",
            "gw-a:51820",
            "[2001:db8::1]:51820",
            " vpn.example.com.:1 ",
        ] {
            assert!(parse_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "203.0.113.1",
            "vpn.example.com:0",
            "vpn.example.com:65536",
            "vpn.example.com:port",
            "2001:db8::1:51820",
            "[2001:db8::1:51820",
            "[nope]:51820",
            ":51820",
            "bad_host:51820",
            "-x.example:51820",
            "https://vpn.example.com:51820",
        ] {
            let e = parse_endpoint(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{e}");
            assert!(
                e.contains("--endpoints") && e.contains("e.g. 203.0.113.1:51820"),
                "{e}"
            );
        }
        assert_eq!(
            parse_endpoints(&s(&[" a.example:1", "", "a.example:1", "[::1]:2"])).unwrap(),
            s(&["a.example:1", "[::1]:2"])
        );
    }

    #[test]
    fn only_the_endpoints_change_and_every_other_field_is_written_back_as_read() {
        let own = own();
        let read = record(&own, "stale.example:51820", &[("next_public_key", "x")]);
        let desired = s(&["203.0.113.1:51820"]);
        let Plan::Update {
            fields,
            version,
            old,
        } = plan("secret/wg/gateways/corp", Some(&read), &desired, &own).unwrap()
        else {
            panic!("expected an update");
        };
        assert_eq!(version, 7, "CAS on the version read");
        assert_eq!(old, s(&["stale.example:51820"]));
        let mut expected = expose(&read.data);
        expected.insert("endpoints".into(), "203.0.113.1:51820".into());
        assert_eq!(expose(&fields), expected, "nothing but endpoints changed");
        // What the sidecars then read.
        let g = GatewayRecord::from_fields("t", &fields, 8).unwrap();
        assert_eq!(g.endpoints, desired);
        assert_eq!(g.public_key, own.public_key);
        assert_eq!(g.pool, vec!["10.77.0.0/16".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn a_record_without_endpoints_gets_them_and_the_same_list_is_left_alone() {
        let own = own();
        let mut read = record(&own, "x:1", &[]);
        read.data.remove("endpoints");
        let desired = s(&["a.example:1", "b.example:2"]);
        let p = plan("t", Some(&read), &desired, &own).unwrap();
        assert!(
            matches!(&p, Plan::Update { old, .. } if old.is_empty()),
            "{p:?}"
        );
        let now = record(&own, "a.example:1,b.example:2", &[]);
        assert_eq!(
            plan("t", Some(&now), &desired, &own).unwrap(),
            Plan::Unchanged
        );
        // The order is the sidecars' order of trying: another order is a change.
        let swapped = s(&["b.example:2", "a.example:1"]);
        assert!(matches!(
            plan("t", Some(&now), &swapped, &own).unwrap(),
            Plan::Update { .. }
        ));
    }

    #[test]
    fn a_missing_record_is_created_as_provision_gateway_would_write_it() {
        let own = own();
        let desired = s(&["203.0.113.1:51820"]);
        let Plan::Create { fields } = plan("t", None, &desired, &own).unwrap() else {
            panic!("expected a create");
        };
        let g = GatewayRecord::from_fields("t", &fields, 1).unwrap();
        assert_eq!(g.public_key, own.public_key);
        assert_eq!(g.endpoints, desired);
        assert_eq!(g.pool, own.pool);
        assert_eq!(g.allowed_ips, own.allowed_ips);
        assert_eq!(g.keepalive, Some(5));
    }

    #[test]
    fn an_invalid_record_is_not_repaired() {
        let own = own();
        let mut read = record(&own, "x:1", &[]);
        read.data.remove("public_key");
        let e = plan("secret/wg/gateways/corp", Some(&read), &s(&["a:1"]), &own).unwrap_err();
        assert!(e.to_string().contains("public_key"), "{e}");
    }
}
