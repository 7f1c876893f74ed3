//! Per-Pod egress inside the tunnel, compiled from the Pods' own NetworkPolicies.
//!
//! Traffic inside the tunnel leaves the Pod as UDP to the gateway, so the CNI's NetworkPolicy
//! enforcement never sees it: the gateway enforces it instead. This module is the pure step from
//! the NetworkPolicies of a Pod's namespace and the Pod's labels to what that Pod may reach
//! through the tunnel ([`compile`]), with NetworkPolicy's semantics:
//!
//! - a policy *selects* the Pod when its `podSelector` matches the Pod's labels and it has the
//!   `Egress` policy type (explicit, or implied by an `egress` section when `policyTypes` is
//!   unset, as the apiserver defaults it);
//! - a Pod selected by no such policy is unrestricted by policy ([`Egress::Unrestricted`]: the
//!   gateway's networks, or nothing under the gateway's `defaultDeny`);
//! - a selected Pod may reach the union of the rules of every policy selecting it; an empty union
//!   is "deny all egress";
//! - a rule with no `to` allows every destination, with no `ports` every port; `ipBlock` with
//!   `except`, `port`/`endPort` ranges and the protocols TCP (default), UDP and SCTP are
//!   supported.
//!
//! What cannot apply in the tunnel is reported ([`Unsupported`]) and dropped, never widened:
//! `podSelector`/`namespaceSelector` peers (they select cluster Pods; the gateway never forwards
//! to the cluster), named ports (a destination outside the cluster has no container port names),
//! unparsable CIDRs. A rule whose every peer or every port was dropped allows nothing.
//!
//! Must never: do IO, or make a Pod's allowance wider than its policies say.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// A transport protocol NetworkPolicy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (NetworkPolicy's default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The nftables name (`tcp`, `udp`, `sctp`).
    #[must_use]
    pub fn nft(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// Ports of one protocol, `first..=last` (`0..=65535`: every port of the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Ports {
    /// Protocol.
    pub protocol: Protocol,
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

/// One `ipBlock`: a network minus its exceptions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Block {
    /// The network.
    pub cidr: IpNet,
    /// Networks inside it that are not allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

/// One compiled egress rule: destinations × ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Allow {
    /// Destinations; `None`: every destination (the gateway's networks bound it anyway).
    pub to: Option<Vec<Block>>,
    /// Ports; `None`: every port of every protocol.
    pub ports: Option<Vec<Ports>>,
}

/// What a Pod may reach through the tunnel, by policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// No egress policy selects the Pod.
    Unrestricted,
    /// The union of these rules (empty: no egress at all).
    Allowed(Vec<Allow>),
}

/// Something in a policy that cannot apply inside the tunnel, reported and dropped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Unsupported {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// What was dropped and why.
    pub what: String,
}

/// The result of [`compile`] for one Pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Compiled {
    /// The allowance.
    pub egress: Egress,
    /// The egress policies selecting the Pod (`namespace/name`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selected_by: Vec<String>,
    /// What was dropped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<Unsupported>,
}

/// Whether `selector` matches `labels` (Kubernetes label-selector semantics: every
/// `matchLabels` pair and every `matchExpressions` requirement must hold; an empty selector
/// matches everything). An unknown operator is an error (the apiserver refuses those).
pub fn matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for r in selector.match_expressions.iter().flatten() {
        let values = r.values.as_deref().unwrap_or_default();
        let value = labels.get(&r.key);
        let ok = match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("unknown label selector operator {other:?}")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn policy_name(p: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// True when the policy constrains egress (explicit type, or an `egress` section with no types).
fn has_egress_type(p: &NetworkPolicy) -> bool {
    let Some(spec) = &p.spec else { return false };
    match &spec.policy_types {
        Some(types) => types.iter().any(|t| t == "Egress"),
        None => spec.egress.is_some(),
    }
}

fn ports_of(
    name: &str,
    ports: &[NetworkPolicyPort],
    unsupported: &mut Vec<Unsupported>,
) -> Vec<Ports> {
    let mut out = BTreeSet::new();
    for p in ports {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                unsupported.push(Unsupported {
                    policy: name.to_owned(),
                    what: format!("protocol {other:?}: dropped"),
                });
                continue;
            }
        };
        let (first, last) = match &p.port {
            None => (0, u16::MAX),
            Some(IntOrString::String(named)) => {
                unsupported.push(Unsupported {
                    policy: name.to_owned(),
                    what: format!("named port {named:?}: a destination outside the cluster has no port names; dropped"),
                });
                continue;
            }
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                match (u16::try_from(*n), u16::try_from(end)) {
                    (Ok(a), Ok(b)) if a >= 1 && a <= b => (a, b),
                    _ => {
                        unsupported.push(Unsupported {
                            policy: name.to_owned(),
                            what: format!("port range {n}..{end}: not 1-65535 in order; dropped"),
                        });
                        continue;
                    }
                }
            }
        };
        out.insert(Ports {
            protocol,
            first,
            last,
        });
    }
    out.into_iter().collect()
}

fn rule_of(
    name: &str,
    rule: &NetworkPolicyEgressRule,
    unsupported: &mut Vec<Unsupported>,
) -> Option<Allow> {
    let ports = match rule.ports.as_deref() {
        None | Some([]) => None,
        Some(list) => {
            let kept = ports_of(name, list, unsupported);
            if kept.is_empty() {
                return None;
            }
            Some(kept)
        }
    };
    let to = match rule.to.as_deref() {
        None | Some([]) => None,
        Some(peers) => {
            let mut blocks = BTreeSet::new();
            for peer in peers {
                if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                    unsupported.push(Unsupported {
                        policy: name.to_owned(),
                        what: "egress peer podSelector/namespaceSelector: it selects cluster Pods, which the gateway never forwards to; dropped".into(),
                    });
                    continue;
                }
                let Some(b) = &peer.ip_block else { continue };
                let Ok(cidr) = b.cidr.parse::<IpNet>() else {
                    unsupported.push(Unsupported {
                        policy: name.to_owned(),
                        what: format!("ipBlock cidr {:?} is not a CIDR; dropped", b.cidr),
                    });
                    continue;
                };
                let mut except = BTreeSet::new();
                for e in b.except.iter().flatten() {
                    if let Ok(n) = e.parse::<IpNet>() {
                        except.insert(n.trunc());
                    } else {
                        // Dropping an exception would widen the block: drop the block.
                        unsupported.push(Unsupported {
                            policy: name.to_owned(),
                            what: format!(
                                "ipBlock {cidr} except {e:?} is not a CIDR; the whole block is dropped"
                            ),
                        });
                        except.clear();
                        except.insert(cidr.trunc());
                        break;
                    }
                }
                if except.contains(&cidr.trunc()) {
                    continue;
                }
                blocks.insert(Block {
                    cidr: cidr.trunc(),
                    except: except.into_iter().collect(),
                });
            }
            if blocks.is_empty() {
                return None;
            }
            Some(blocks.into_iter().collect())
        }
    };
    Some(Allow { to, ports })
}

/// What the Pod (in `namespace`, with `labels`) may reach through the tunnel under
/// `policies` (the NetworkPolicies of the cluster; only those of the Pod's namespace apply).
#[must_use]
pub fn compile(
    policies: &[NetworkPolicy],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Compiled {
    let mut selected_by = Vec::new();
    let mut unsupported = Vec::new();
    let mut allows = BTreeSet::new();
    let mut ordered: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| has_egress_type(p))
        .collect();
    ordered.sort_by_key(|p| policy_name(p));
    for p in ordered {
        let name = policy_name(p);
        let Some(spec) = &p.spec else { continue };
        let everything = LabelSelector::default();
        let selector = spec.pod_selector.as_ref().unwrap_or(&everything);
        match matches(selector, labels) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                unsupported.push(Unsupported {
                    policy: name,
                    what: format!("podSelector: {e}; the policy is ignored"),
                });
                continue;
            }
        }
        selected_by.push(name.clone());
        for rule in spec.egress.iter().flatten() {
            if let Some(a) = rule_of(&name, rule, &mut unsupported) {
                allows.insert(a);
            }
        }
    }
    unsupported.sort();
    unsupported.dedup();
    Compiled {
        egress: if selected_by.is_empty() {
            Egress::Unrestricted
        } else {
            Egress::Allowed(allows.into_iter().collect())
        },
        selected_by,
        unsupported,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_pod_selected_by_no_egress_policy_is_unrestricted() {
        let ingress_only = policy(
            "metadata: {name: i, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
        );
        let other_ns = policy(
            "metadata: {name: e, namespace: other}\nspec: {podSelector: {}, policyTypes: [Egress]}",
        );
        let c = compile(
            &[ingress_only, other_ns],
            "shop",
            &labels(&[("app", "web")]),
        );
        assert_eq!(c.egress, Egress::Unrestricted);
    }

    #[test]
    fn an_egress_policy_without_rules_denies_everything() {
        let p = policy(
            "metadata: {name: deny, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress]}",
        );
        let c = compile(&[p], "shop", &labels(&[]));
        assert_eq!(c.egress, Egress::Allowed(vec![]));
        assert_eq!(c.selected_by, ["shop/deny"]);
    }

    #[test]
    fn expressions_follow_label_selector_semantics() {
        let sel: LabelSelector = serde_yaml_ng::from_str(
            "matchExpressions: [{key: tier, operator: In, values: [web, api]}, {key: canary, operator: DoesNotExist}]",
        )
        .unwrap();
        assert!(matches(&sel, &labels(&[("tier", "web")])).unwrap());
        assert!(!matches(&sel, &labels(&[("tier", "db")])).unwrap());
        assert!(!matches(&sel, &labels(&[("tier", "web"), ("canary", "1")])).unwrap());
        let bad: LabelSelector =
            serde_yaml_ng::from_str("matchExpressions: [{key: a, operator: Near}]").unwrap();
        assert!(matches(&bad, &labels(&[])).is_err());
    }

    #[test]
    fn a_rule_whose_every_peer_is_unsupported_allows_nothing_and_says_why() {
        let p = policy(
            "metadata: {name: pods, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n  - ports: [{port: http}]",
        );
        let c = compile(&[p], "shop", &labels(&[]));
        assert_eq!(c.egress, Egress::Allowed(vec![]));
        assert_eq!(c.unsupported.len(), 2, "{:?}", c.unsupported);
    }
}
