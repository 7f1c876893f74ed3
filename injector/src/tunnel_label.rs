//! Who may carry the `wg-injector.io/tunnel` label: the rule that makes it trustworthy.
//!
//! The gateway watches Pods by `wg-injector.io/tunnel=<profile>` and NetworkPolicies select
//! tunnelled Pods by it, so the label must mean "the injector injected this Pod for that
//! gateway". This module owns that rule, as two pure checks that only ever allow or refuse
//! (with a message naming the label, the value and what to do instead):
//!
//! - [`check_create`]: a new Pod may carry the label only when it is the injector's output: it
//!   has the `wg-sidecar` container the injector renders (name and `wg-sidecar run`
//!   subcommand, [`inject::sidecar_gateway`]), the `wg-injector.io/status` annotation, and the
//!   label names the gateway that container connects to (`--gateway=`). An unlabelled Pod is
//!   always allowed here.
//! - [`check_update`]: on an existing Pod the label may not be added, changed or removed. The
//!   injector sets it once, at creation; nothing after that may move a Pod to another gateway or
//!   out of the selectors that count on it.
//!
//! Where it runs: the mutating webhook applies [`check_create`] to every Pod it leaves
//! untouched (not opted in, `hostNetwork`, excluded namespace), because such a Pod carries the
//! label only if its author set it ([`crate::admission`]); a Pod it injects gets the label from
//! the injector, and one that set it itself while asking for injection is denied there too
//! (`reserved_label`, [`inject`]'s conflict check). The mutating webhook only sees opted-in
//! namespaces on CREATE, so `POST /validate` ([`crate::review::answer_validation`]) applies
//! both checks in every namespace, on CREATE and UPDATE, for clusters without
//! ValidatingAdmissionPolicy; on ≥ 1.30 the chart's policy says the same in CEL
//! (`charts/wg-injector/templates/validatingadmissionpolicy.yaml`). Keep the three in step.
//!
//! What the label then proves, and what it does not: that the Pod runs the injected sidecar for
//! that gateway, not who wrote the spec. The offline `wg-injector inject` output is a legitimate
//! injected Pod and is admitted like the webhook's, so a spec written by hand to look the same is
//! too; the gateway admits a peer only from the Pod's own Vault record, so looking injected gains
//! nothing a real injection would not have given. A status annotation alone (spoofable, and
//! never trusted alone for idempotence) proves nothing either; both are required.
//!
//! Never does IO and never reads anything but the Pod(s) it is given.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::admission::Denial;
use crate::annotations::{GATEWAY, INJECT, NAMESPACE_LABEL, STATUS, TUNNEL_LABEL};
use crate::inject::{self, SIDECAR_CONTAINER};

/// The value of the tunnel label on `metadata`, if it carries one (an empty value counts: it
/// still matches a selector that asks for the key).
#[must_use]
pub fn tunnel_label(metadata: &ObjectMeta) -> Option<&str> {
    metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TUNNEL_LABEL))
        .map(String::as_str)
}

/// CREATE: refuse a Pod that carries the tunnel label without being the injector's output
/// for the gateway the label names.
pub fn check_create(pod: &Pod) -> Result<(), Denial> {
    let Some(value) = tunnel_label(&pod.metadata) else {
        return Ok(());
    };
    let shown = shown(value);
    let Some(gateway) = inject::sidecar_gateway(pod) else {
        return Err(Denial {
            reason: "reserved_label",
            message: format!(
                "label {TUNNEL_LABEL}={shown} is set only by wg-injector, on the Pods it injects, and this Pod has no injected {SIDECAR_CONTAINER} container: remove the label; to tunnel the Pod, opt in with annotation {INJECT}: \"true\" in a namespace labelled {NAMESPACE_LABEL}=enabled"
            ),
        });
    };
    let has_status = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS));
    if !has_status {
        return Err(Denial {
            reason: "reserved_label",
            message: format!(
                "label {TUNNEL_LABEL}={shown} is set only by wg-injector, on the Pods it injects, and this Pod has a {SIDECAR_CONTAINER} container but no {STATUS} annotation, so the injector did not make it: remove the label and the {SIDECAR_CONTAINER} container, and opt in with annotation {INJECT}: \"true\""
            ),
        });
    }
    if gateway != value {
        return Err(Denial {
            reason: "tunnel_label_mismatch",
            message: format!(
                "label {TUNNEL_LABEL}={shown} does not name the gateway that the injected {SIDECAR_CONTAINER} of the Pod connects to ({}): only wg-injector sets this label, from annotation {GATEWAY}; remove the label or set it to {}",
                self::shown(gateway),
                self::shown(gateway)
            ),
        });
    }
    Ok(())
}

/// UPDATE: refuse adding, changing or removing the tunnel label (`old` is the stored Pod's
/// metadata, `new` what the update would store).
pub fn check_update(old: &ObjectMeta, new: &ObjectMeta) -> Result<(), Denial> {
    let message = match (tunnel_label(old), tunnel_label(new)) {
        (before, after) if before == after => return Ok(()),
        (None, Some(after)) => format!(
            "label {TUNNEL_LABEL} cannot be added to an existing Pod (here {}): only wg-injector sets it, when it injects a Pod at creation; create the Pod with annotation {INJECT}: \"true\" instead",
            shown(after)
        ),
        (Some(before), Some(after)) => format!(
            "label {TUNNEL_LABEL} cannot be changed on an existing Pod (from {} to {}): only wg-injector sets it, at creation, to the gateway that the {SIDECAR_CONTAINER} of the Pod connects to; to use another gateway, recreate the Pod with annotation {GATEWAY}",
            shown(before),
            shown(after)
        ),
        (Some(before), None) => format!(
            "label {TUNNEL_LABEL}={} cannot be removed from an existing Pod: only wg-injector sets it, at creation, and the gateway and NetworkPolicies select tunnelled Pods by it; delete the Pod instead",
            shown(before)
        ),
        (None, None) => return Ok(()),
    };
    Err(Denial {
        reason: "tunnel_label_changed",
        message,
    })
}

/// A label value as a message shows it: quoted when it is a valid label value (what the
/// apiserver stores), otherwise not echoed (the mutating webhook runs before validation, so
/// the value may be anything the client sent).
fn shown(value: &str) -> String {
    let valid = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric());
    if valid {
        format!("{value:?}")
    } else {
        "(not a valid label value, not echoed)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::admission::{evaluate, Verdict};
    use crate::config::Config;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn meta(labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    /// A Pod as the injector injects it (gateway `default` of the default config).
    fn injected() -> Pod {
        let input = pod("metadata: {name: web, annotations: {wg-injector.io/inject: 'true'}}\nspec:\n  containers: [{name: app, image: nginx}]\n");
        let Verdict::Inject(outcome) = evaluate(&input, &Config::default()) else {
            panic!()
        };
        outcome.pod
    }

    fn labelled(mut p: Pod, value: &str) -> Pod {
        p.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(TUNNEL_LABEL.to_owned(), value.to_owned());
        p
    }

    #[test]
    fn a_pod_without_the_label_is_allowed_whatever_it_contains() {
        check_create(&pod(
            "metadata: {name: web}\nspec:\n  containers: [{name: app}]\n",
        ))
        .unwrap();
        let mut no_label = injected();
        no_label.metadata.labels = None;
        check_create(&no_label).unwrap();
    }

    #[test]
    fn a_pod_the_injector_injected_keeps_its_label() {
        let p = injected();
        assert_eq!(tunnel_label(&p.metadata), Some("default"));
        check_create(&p).unwrap();
    }

    #[test]
    fn a_pod_that_set_the_label_itself_is_refused_with_a_message_naming_it_and_the_opt_in() {
        for value in ["default", "corp", ""] {
            let p = labelled(
                pod("metadata: {name: web}\nspec:\n  containers: [{name: app}]\n"),
                value,
            );
            let d = check_create(&p).unwrap_err();
            assert_eq!(d.reason, "reserved_label");
            assert!(
                d.message
                    .contains(&format!("label wg-injector.io/tunnel={value:?}"))
                    && d.message.contains("set only by wg-injector")
                    && d.message.contains("remove the label")
                    && d.message.contains("wg-injector.io/inject: \"true\""),
                "{}",
                d.message
            );
        }
    }

    #[test]
    fn a_container_merely_named_wg_sidecar_does_not_entitle_a_pod_to_the_label() {
        let p = pod("metadata: {name: web, labels: {wg-injector.io/tunnel: default}, annotations: {wg-injector.io/status: '{}'}}\nspec:\n  containers: [{name: wg-sidecar, image: evil, args: [sleep]}]\n");
        assert_eq!(check_create(&p).unwrap_err().reason, "reserved_label");
    }

    #[test]
    fn an_injected_sidecar_without_the_status_annotation_is_refused() {
        let mut p = injected();
        p.metadata.annotations.as_mut().unwrap().remove(STATUS);
        let d = check_create(&p).unwrap_err();
        assert_eq!(d.reason, "reserved_label");
        assert!(
            d.message.contains("no wg-injector.io/status"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_label_naming_another_gateway_than_the_sidecars_is_refused() {
        let d = check_create(&labelled(injected(), "corp")).unwrap_err();
        assert_eq!(d.reason, "tunnel_label_mismatch");
        assert!(
            d.message.contains("\"corp\"") && d.message.contains("(\"default\")"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_value_that_is_not_a_label_value_is_not_echoed() {
        let long = "x".repeat(200);
        let d = check_create(&labelled(
            pod("metadata: {}\nspec: {containers: []}\n"),
            &long,
        ))
        .unwrap_err();
        assert!(!d.message.contains(&long) && d.message.contains("not echoed"));
    }

    #[test]
    fn an_update_may_not_add_change_or_remove_the_label() {
        let none = meta(&[("app", "web")]);
        let a = meta(&[("app", "web"), (TUNNEL_LABEL, "default")]);
        let b = meta(&[(TUNNEL_LABEL, "corp")]);
        let empty = meta(&[(TUNNEL_LABEL, "")]);
        for (old, new, says) in [
            (&none, &a, "cannot be added"),
            (&none, &empty, "cannot be added"),
            (&a, &b, "from \"default\" to \"corp\""),
            (&a, &empty, "cannot be changed"),
            (&a, &none, "cannot be removed"),
        ] {
            let d = check_update(old, new).unwrap_err();
            assert_eq!(d.reason, "tunnel_label_changed");
            assert!(
                d.message.contains(says) && d.message.contains("only wg-injector sets it"),
                "{}",
                d.message
            );
        }
    }

    #[test]
    fn an_update_that_keeps_the_label_as_it_was_is_allowed() {
        let a = meta(&[(TUNNEL_LABEL, "default")]);
        let a_relabelled = meta(&[(TUNNEL_LABEL, "default"), ("tier", "front")]);
        check_update(&a, &a_relabelled).unwrap();
        check_update(&meta(&[]), &meta(&[("tier", "front")])).unwrap();
        check_update(&ObjectMeta::default(), &ObjectMeta::default()).unwrap();
    }
}
