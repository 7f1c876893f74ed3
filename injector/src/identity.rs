//! The Pod's WireGuard identity. By default a Pod's key is born in the Pod: the sidecar
//! generates it at start and registers it in Vault under the Pod's UID, so no two Pods ever share
//! one. A *static* identity is a key that exists before the Pod: a `key-source: secret:<name>`,
//! a `wg-injector.io/vault-path` annotation or the injector's `vault.keyPathTemplate`.
//!
//! This module owns the rule that one static key is never shared by the Pods of one controller
//! (two peers with one key steal each other's tunnel at the gateway), the owner kinds that make
//! several Pods from one template, the `{pod}` expansion of a Secret name, and the wording of the
//! `shared_key` and `pod_name_unknown` denials. It is pure: it reads the Pod's metadata and the
//! parsed annotations, never does IO, and knows nothing of the injected spec.

use k8s_openapi::api::core::v1::Pod;

use crate::admission::Denial;
use crate::annotations::{self, InjectionSpec, KeySource, POD_PLACEHOLDER};
use crate::config::Config;

/// Owner kinds whose Pods come from one template and so would share a static key that does not
/// hold `{pod}`. The webhook sees a Pod's controller (`ReplicaSet`, `ReplicationController`,
/// `Job`, `DaemonSet`, `StatefulSet`); the offline CLI sees the workload itself, hence
/// `Deployment` and `CronJob` too (their Pods are owned by a ReplicaSet and a Job).
///
/// Any other controller kind (an operator's own) is not known to replicate and is allowed, like
/// a bare Pod.
pub const REPLICATING_KINDS: &[&str] = &[
    "ReplicaSet",
    "ReplicationController",
    "Job",
    "DaemonSet",
    "StatefulSet",
    "Deployment",
    "CronJob",
];

/// The object that makes a Pod: its controller `ownerReference` (webhook), or the workload whose
/// template the offline CLI injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `kind`, e.g. `ReplicaSet`.
    pub kind: String,
    /// `name`, e.g. `web-5d8f`.
    pub name: String,
}

impl Owner {
    /// The controller of `pod`: its `metadata.ownerReferences[]` entry with `controller: true`.
    /// `None` for a bare Pod.
    #[must_use]
    pub fn controller_of(pod: &Pod) -> Option<Owner> {
        pod.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map(|r| Owner {
                kind: r.kind.clone(),
                name: r.name.clone(),
            })
    }

    /// Whether this owner makes several Pods from one template ([`REPLICATING_KINDS`]).
    #[must_use]
    pub fn replicates(&self) -> bool {
        REPLICATING_KINDS.contains(&self.kind.as_str())
    }

    fn is_stateful_set(&self) -> bool {
        self.kind == "StatefulSet"
    }
}

/// A static key that is the same for every Pod of a template: where it was set and its value.
enum FixedKey<'a> {
    /// `key-source: secret:<name>` without `{pod}`.
    Secret(&'a str),
    /// A `vault-path` annotation without `{pod}`.
    VaultAnnotation(&'a str),
    /// The injector's `vault.keyPathTemplate` without `{pod}`.
    VaultTemplate(&'a str),
}

/// Check the Pod's identity and return `spec` ready for injection: a `{pod}` in a Secret name is
/// replaced with the Pod's name.
///
/// Denied (`shared_key`): a fixed static key — a `secret:<name>`, or a Vault path (annotation or
/// `vault.keyPathTemplate`) without `{pod}` — on a Pod whose `owner` replicates
/// ([`Owner::replicates`]). A bare Pod (`owner` `None`) may use any static key.
/// Denied (`pod_name_unknown`): `{pod}` in a Secret name on a Pod that has no name at admission
/// (named from `generateName`, as the Pods of a ReplicaSet, Job or DaemonSet are, or a template).
/// A `{pod}` in a Vault path needs no name here: the kubelet fills it in from the downward API.
pub fn resolve(
    pod: &Pod,
    owner: Option<&Owner>,
    mut spec: InjectionSpec,
    config: &Config,
) -> Result<InjectionSpec, Denial> {
    let fixed = match &spec.key_source {
        KeySource::Secret(name) if name.contains(POD_PLACEHOLDER) => {
            let resolved = secret_name_for(pod, name)?;
            spec.key_source = KeySource::Secret(resolved);
            None
        }
        KeySource::Secret(name) => Some(FixedKey::Secret(name)),
        KeySource::Vault => match (spec.vault_path.as_deref(), config.vault.key_path_template()) {
            (Some(path), _) if !path.contains(POD_PLACEHOLDER) => {
                Some(FixedKey::VaultAnnotation(path))
            }
            (None, Some(template)) if !template.contains(POD_PLACEHOLDER) => {
                Some(FixedKey::VaultTemplate(template))
            }
            _ => None,
        },
    };
    match (fixed, owner) {
        (Some(fixed), Some(owner)) if owner.replicates() => Err(shared_key(&fixed, owner)),
        _ => Ok(spec),
    }
}

/// The Secret name `template` with `{pod}` replaced by the Pod's name.
fn secret_name_for(pod: &Pod, template: &str) -> Result<String, Denial> {
    let value = format!("secret:{template}");
    let Some(name) = pod.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        let why = match pod.metadata.generate_name.as_deref() {
            Some(prefix) => format!(
                "it is named from generateName {prefix:?} only after admission, as the Pods of a ReplicaSet, Job or DaemonSet are"
            ),
            None => "a Pod template has no name: its Pods are named when they are created".to_owned(),
        };
        return Err(Denial {
            reason: "pod_name_unknown",
            message: format!(
                "{} {value:?} names the Secret after the Pod, but this Pod has no name yet ({why}); remove the annotation so each Pod's key is born in the Pod, or let the webhook inject the Pods of a StatefulSet, which are named before admission",
                annotations::KEY_SOURCE
            ),
        });
    };
    let resolved = template.replace(POD_PLACEHOLDER, name);
    annotations::validate_dns1123_subdomain(&resolved).map_err(|allowed| Denial {
        reason: "bad_annotation",
        message: format!(
            "annotation {}={value:?} is invalid: with {POD_PLACEHOLDER} = {name:?} the Secret name is {resolved:?}; {allowed}",
            annotations::KEY_SOURCE
        ),
    })?;
    Ok(resolved)
}

/// The `shared_key` denial: names where the key was set, its value, the owner and the fix.
fn shared_key(fixed: &FixedKey<'_>, owner: &Owner) -> Denial {
    let stateful = owner.is_stateful_set();
    let (subject, fix) = match *fixed {
        FixedKey::Secret(name) => (
            format!("{} \"secret:{name}\"", annotations::KEY_SOURCE),
            if stateful {
                format!("remove the annotation so each Pod's key is born in the Pod, or put \"{POD_PLACEHOLDER}\" in the name (e.g. \"secret:{name}-{POD_PLACEHOLDER}\")")
            } else {
                format!("remove the annotation so each Pod's key is born in the Pod, or use a StatefulSet with \"{POD_PLACEHOLDER}\" in the name")
            },
        ),
        FixedKey::VaultAnnotation(path) => (
            format!("{} {path:?}", annotations::VAULT_PATH),
            if stateful {
                format!("remove the annotation so each Pod's key is born in the Pod, or put \"{POD_PLACEHOLDER}\" in the path (e.g. \"{path}/{POD_PLACEHOLDER}\")")
            } else {
                format!("remove the annotation so each Pod's key is born in the Pod, or use a StatefulSet with \"{POD_PLACEHOLDER}\" in the path")
            },
        ),
        FixedKey::VaultTemplate(template) => (
            format!("the injector's vault.keyPathTemplate {template:?}"),
            format!("clear vault.keyPathTemplate (chart value config.vault.keyPathTemplate) so each Pod's key is born in the Pod, or put \"{POD_PLACEHOLDER}\" in it"),
        ),
    };
    Denial {
        reason: "shared_key",
        message: format!(
            "{subject} would give every Pod of {} {} one WireGuard key (replicas would steal each other's tunnel); {fix}",
            owner.kind, owner.name
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// A Pod with `annotations` (YAML flow mapping entries), `name` or `generateName`, and a
    /// controller of `kind` (none when empty).
    fn pod_of(kind: &str, owner: &str, name: &str, annotations: &str) -> Pod {
        let owner = if kind.is_empty() {
            String::new()
        } else {
            format!(", ownerReferences: [{{apiVersion: apps/v1, kind: {kind}, name: {owner}, uid: 1f0c, controller: true}}]")
        };
        pod(&format!(
            "metadata: {{{name}, annotations: {{{annotations}}}{owner}}}\nspec:\n  containers: [{{name: app}}]\n"
        ))
    }

    fn check(pod: &Pod, config: &Config) -> Result<InjectionSpec, Denial> {
        let spec = annotations::parse(pod.metadata.annotations.as_ref().unwrap()).unwrap();
        resolve(pod, Owner::controller_of(pod).as_ref(), spec, config)
    }

    fn denial(pod: &Pod, config: &Config) -> Denial {
        check(pod, config).unwrap_err()
    }

    #[test]
    fn a_secret_key_on_a_replica_sets_pod_is_denied_naming_the_annotation_owner_and_fix() {
        let p = pod_of(
            "ReplicaSet",
            "web-5d8f",
            "generateName: web-5d8f-",
            "wg-injector.io/key-source: 'secret:wg-key'",
        );
        let d = denial(&p, &Config::default());
        assert_eq!(d.reason, "shared_key");
        assert_eq!(
            d.message,
            "wg-injector.io/key-source \"secret:wg-key\" would give every Pod of ReplicaSet web-5d8f one WireGuard key (replicas would steal each other's tunnel); remove the annotation so each Pod's key is born in the Pod, or use a StatefulSet with \"{pod}\" in the name"
        );
    }

    #[test]
    fn a_static_vault_path_on_a_jobs_pod_is_denied_suggesting_a_stateful_set() {
        let p = pod_of(
            "Job",
            "report-28",
            "generateName: report-28-",
            "wg-injector.io/vault-path: wg/keys/shop/report",
        );
        assert_eq!(
            denial(&p, &Config::default()).message,
            "wg-injector.io/vault-path \"wg/keys/shop/report\" would give every Pod of Job report-28 one WireGuard key (replicas would steal each other's tunnel); remove the annotation so each Pod's key is born in the Pod, or use a StatefulSet with \"{pod}\" in the path"
        );
    }

    #[test]
    fn a_fixed_key_on_a_stateful_sets_pod_is_denied_suggesting_pod_in_the_value() {
        let secret = pod_of(
            "StatefulSet",
            "db",
            "name: db-0",
            "wg-injector.io/key-source: 'secret:db-wg'",
        );
        assert_eq!(
            denial(&secret, &Config::default()).message,
            "wg-injector.io/key-source \"secret:db-wg\" would give every Pod of StatefulSet db one WireGuard key (replicas would steal each other's tunnel); remove the annotation so each Pod's key is born in the Pod, or put \"{pod}\" in the name (e.g. \"secret:db-wg-{pod}\")"
        );
        let path = pod_of(
            "StatefulSet",
            "db",
            "name: db-0",
            "wg-injector.io/vault-path: 'wg/keys/{namespace}/db'",
        );
        assert_eq!(
            denial(&path, &Config::default()).message,
            "wg-injector.io/vault-path \"wg/keys/{namespace}/db\" would give every Pod of StatefulSet db one WireGuard key (replicas would steal each other's tunnel); remove the annotation so each Pod's key is born in the Pod, or put \"{pod}\" in the path (e.g. \"wg/keys/{namespace}/db/{pod}\")"
        );
    }

    #[test]
    fn a_configured_template_without_pod_is_denied_naming_the_config_key() {
        let config = Config {
            vault: crate::config::VaultSettings {
                key_path_template: "wg/keys/{namespace}/{serviceAccount}".to_owned(),
                ..crate::config::VaultSettings::default()
            },
            ..Config::default()
        };
        let p = pod_of(
            "DaemonSet",
            "agent",
            "generateName: agent-",
            "wg-injector.io/inject: 'true'",
        );
        assert_eq!(
            denial(&p, &config).message,
            "the injector's vault.keyPathTemplate \"wg/keys/{namespace}/{serviceAccount}\" would give every Pod of DaemonSet agent one WireGuard key (replicas would steal each other's tunnel); clear vault.keyPathTemplate (chart value config.vault.keyPathTemplate) so each Pod's key is born in the Pod, or put \"{pod}\" in it"
        );
        // The annotation overrides the template: with {pod} it is a per-Pod identity.
        let own = pod_of(
            "DaemonSet",
            "agent",
            "generateName: agent-",
            "wg-injector.io/vault-path: 'wg/keys/{pod}'",
        );
        assert!(check(&own, &config).is_ok());
    }

    #[test]
    fn every_replicating_owner_kind_is_denied_a_fixed_key() {
        for kind in REPLICATING_KINDS {
            let p = pod_of(
                kind,
                "x",
                "name: x-0",
                "wg-injector.io/key-source: 'secret:k'",
            );
            assert_eq!(
                denial(&p, &Config::default()).reason,
                "shared_key",
                "{kind}"
            );
        }
    }

    #[test]
    fn a_bare_pod_or_an_unknown_controller_may_use_a_fixed_key() {
        for kind in ["", "TaskRun"] {
            let p = pod_of(
                kind,
                "x",
                "name: one",
                "wg-injector.io/key-source: 'secret:x'",
            );
            assert_eq!(
                check(&p, &Config::default()).unwrap().key_source,
                KeySource::Secret("x".to_owned()),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_owner_reference_that_is_not_the_controller_does_not_count() {
        let p = pod("metadata: {name: one, annotations: {wg-injector.io/key-source: 'secret:x'}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: rs, uid: 1}]}\nspec:\n  containers: [{name: app}]\n");
        assert_eq!(Owner::controller_of(&p), None);
        assert!(check(&p, &Config::default()).is_ok());
    }

    #[test]
    fn the_default_vault_key_is_born_in_the_pod_and_never_denied() {
        let p = pod_of(
            "ReplicaSet",
            "web-5d8f",
            "generateName: web-5d8f-",
            "wg-injector.io/inject: 'true'",
        );
        assert!(check(&p, &Config::default()).is_ok());
    }

    #[test]
    fn pod_in_a_secret_name_is_filled_in_from_the_stateful_sets_pod_name() {
        let p = pod_of(
            "StatefulSet",
            "db",
            "name: db-1",
            "wg-injector.io/key-source: 'secret:wg-{pod}'",
        );
        assert_eq!(
            check(&p, &Config::default()).unwrap().key_source,
            KeySource::Secret("wg-db-1".to_owned())
        );
    }

    #[test]
    fn pod_in_a_secret_name_of_a_pod_without_a_name_is_denied_saying_why() {
        let p = pod_of(
            "ReplicaSet",
            "web-5d8f",
            "generateName: web-5d8f-",
            "wg-injector.io/key-source: 'secret:wg-{pod}'",
        );
        let d = denial(&p, &Config::default());
        assert_eq!(d.reason, "pod_name_unknown");
        assert_eq!(
            d.message,
            "wg-injector.io/key-source \"secret:wg-{pod}\" names the Secret after the Pod, but this Pod has no name yet (it is named from generateName \"web-5d8f-\" only after admission, as the Pods of a ReplicaSet, Job or DaemonSet are); remove the annotation so each Pod's key is born in the Pod, or let the webhook inject the Pods of a StatefulSet, which are named before admission"
        );
    }

    #[test]
    fn a_secret_name_too_long_once_pod_is_filled_in_is_denied() {
        // A Pod name may be 253 characters long: "wg-" makes 256.
        let long = "a".repeat(253);
        let p = pod_of(
            "",
            "",
            &format!("name: {long}"),
            "wg-injector.io/key-source: 'secret:wg-{pod}'",
        );
        let d = denial(&p, &Config::default());
        assert_eq!(d.reason, "bad_annotation");
        assert!(d.message.contains("DNS-1123 subdomain"), "{}", d.message);
    }
}
