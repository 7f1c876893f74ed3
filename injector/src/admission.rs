//! The admission decision for one Pod: inject (with a patch), skip (with a reason) or deny
//! (with a message a user can act on). Shared by the webhook and the offline CLI.
//!
//! This module owns the order of the checks (screen annotations → opt-in → hostNetwork →
//! parse → identity → inject → diff). It is pure: no IO, no clock, no environment. The
//! namespace label is not checked here: the webhook's `namespaceSelector` does that.
//!
//! A Pod that is left untouched (any [`SkipReason`]) but carries the `wg-injector.io/tunnel`
//! label is denied unless it is already the injector's output ([`tunnel_label::check_create`]):
//! nothing injects it now, so its author set the label, and the gateway and NetworkPolicies
//! would take it for tunnelled. A Pod that is injected gets the label from the injection (one
//! that set it itself is denied by the conflict check, `reserved_label`; a re-invoked injected
//! Pod whose label a later webhook changed gets the injector's value back).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::annotations::{self, InjectionSpec};
use crate::config::Config;
use crate::identity::{self, Owner};
#[cfg(debug_assertions)]
use crate::inject::Injection;
use crate::inject::{self, Outcome};
use crate::memo::{FreshPatch, Key, Lookup, PatchMemo, Shape};
use crate::patch::{self, Parts};
use crate::tunnel_label;

/// What the injector decided for one Pod.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Patch the Pod (the patch may be empty when it is already injected).
    Patch {
        /// JSON Patch that turns the input Pod into the injected Pod.
        patch: patch::Patch,
        /// Admission warnings shown to the user (e.g. the Pod Security level).
        warnings: Vec<String>,
    },
    /// Leave the Pod untouched.
    Skip(SkipReason),
    /// Refuse the Pod.
    Deny(Denial),
}

/// Why a Pod was left untouched (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The Pod did not opt in (no annotation without `inject_by_default`, or `"false"`).
    NotRequested,
    /// The Pod uses `hostNetwork` and did not explicitly ask for injection: a tunnel would
    /// change the node's network, so it is left alone.
    HostNetwork,
    /// The namespace is in the config's `excludedNamespaces` (`kube-system`, `kube-public`).
    ExcludedNamespace,
}

impl SkipReason {
    /// The metrics label for this reason.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotRequested => "not_requested",
            SkipReason::HostNetwork => "host_network",
            SkipReason::ExcludedNamespace => "excluded_namespace",
        }
    }
}

/// A refusal: `reason` is a short metrics label, `message` names the annotation, the bad value
/// and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Short, stable label for metrics: `bad_annotation`, `unknown_annotation`,
    /// `key_material`, `unknown_gateway`, `no_routes`, `overlapping_routes`,
    /// `bootstrap_lockout`, `name_conflict`, `port_conflict`,
    /// `reserved_label`, `host_network`, `no_spec`, `shared_key`, `pod_name_unknown`, and from
    /// [`tunnel_label`]: `tunnel_label_mismatch`, `tunnel_label_changed`.
    pub reason: &'static str,
    /// The message returned to the user.
    pub message: String,
}

/// [`decide`] before the diff: the injected Pod itself, for callers that want the Pod (the
/// offline CLI, tests) rather than a patch.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The injected Pod (equal to the input when it was already injected).
    Inject(Box<Outcome>),
    /// Leave the Pod untouched.
    Skip(SkipReason),
    /// Refuse the Pod.
    Deny(Denial),
}

/// The checks before injection: a Pod that passes them has a spec and opted in, its
/// annotations parse into an [`InjectionSpec`], and its static key (if any) is not shared by the
/// Pods of `owner` ([`identity::resolve`], which also fills `{pod}` into a Secret name).
fn gate(pod: &Pod, owner: Option<&Owner>, config: &Config) -> Result<InjectionSpec, Stop> {
    let empty = std::collections::BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    annotations::screen(annotations).map_err(Stop::Deny)?;
    let explicit = annotations::inject_requested(annotations).map_err(Stop::Deny)?;
    if !explicit.unwrap_or(config.inject_by_default) {
        return Err(skip(pod, SkipReason::NotRequested));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Stop::Deny(Denial {
            reason: "no_spec",
            message: "the Pod has no spec to inject into".to_owned(),
        }));
    };
    if spec.host_network == Some(true) {
        if explicit == Some(true) {
            return Err(Stop::Deny(Denial {
                reason: "host_network",
                message: format!(
                    "annotation {}=\"true\" cannot be honoured on a hostNetwork Pod: the tunnel and kill switch would change the node's network; remove the annotation or hostNetwork",
                    annotations::INJECT
                ),
            }));
        }
        return Err(skip(pod, SkipReason::HostNetwork));
    }
    let parsed = annotations::parse(annotations).map_err(Stop::Deny)?;
    identity::resolve(pod, owner, parsed, config).map_err(Stop::Deny)
}

/// Why [`gate`] stopped a Pod before injection.
enum Stop {
    Skip(SkipReason),
    Deny(Denial),
}

/// Leave `pod` untouched for `reason`, unless it carries the tunnel label without being the
/// injector's output: then nothing here set the label, and it is refused.
fn skip(pod: &Pod, reason: SkipReason) -> Stop {
    match tunnel_label::check_create(pod) {
        Ok(()) => Stop::Skip(reason),
        Err(denial) => Stop::Deny(denial),
    }
}

/// Run every check and the injection on `pod`, owned by its controller ownerReference
/// ([`Owner::controller_of`]).
#[must_use]
pub fn evaluate(pod: &Pod, config: &Config) -> Verdict {
    evaluate_owned_by(pod, Owner::controller_of(pod).as_ref(), config)
}

/// [`evaluate`] with the owner given: the offline CLI passes the workload whose template `pod`
/// is, which has no ownerReferences of its own.
#[must_use]
pub fn evaluate_owned_by(pod: &Pod, owner: Option<&Owner>, config: &Config) -> Verdict {
    let spec = match gate(pod, owner, config) {
        Ok(spec) => spec,
        Err(Stop::Skip(reason)) => return Verdict::Skip(reason),
        Err(Stop::Deny(denial)) => return Verdict::Deny(denial),
    };
    match inject::inject(pod, &spec, config) {
        Ok(outcome) => Verdict::Inject(Box::new(outcome)),
        Err(denial) => Verdict::Deny(denial),
    }
}

/// Decide what to do with `pod`, created in `namespace`.
///
/// The namespace only matters for `excludedNamespaces`: Vault role and path templates are
/// filled in by the kubelet from the Pod's own namespace and service account (downward API), so
/// the same Pod is injected identically by the webhook and the offline CLI.
///
/// The patch is the diff between `pod` and its injected twin ([`evaluate`]). For a Pod that
/// carries nothing of an earlier injection (every Pod the apiserver sends, but for
/// reinvocation) the twin is not built: the injection is diffed as a view over `pod`
/// ([`Injection::place`]), which gives the same patch without cloning the Pod (debug builds
/// check it against the twin). A re-invoked Pod is diffed against its twin, which keeps what
/// other webhooks changed in the injected containers and injection does not decide (an image
/// mirror's `image`, a policy engine's `resources`, env and mounts of their own:
/// [`inject::Injection::keep_edits`]), so an unchanged injected Pod still gets an empty patch.
#[must_use]
pub fn decide(pod: &Pod, namespace: &str, config: &Config) -> Decision {
    match screen(pod, namespace, config) {
        Ok(spec) => after_gate(pod, &spec, config),
        Err(decision) => decision,
    }
}

/// What [`decide_with`] found: a fresh injection's patch (shared with the memo) or any other
/// decision.
#[derive(Debug, Clone)]
pub enum Answered {
    /// A Pod with nothing of an earlier injection, patched.
    Fresh(Arc<FreshPatch>, Lookup),
    /// Everything else, as [`decide`] decides it.
    Decided(Decision),
}

/// [`decide`] for the webhook: every check runs on every Pod, and then a fresh injection (a
/// Pod with nothing of an earlier injection and no conflict) is looked up in `memo` by its
/// annotations and [`Shape`]; on a miss it is computed like [`decide`] computes it and
/// remembered. Debug builds recompute every hit and check it equals the remembered patch.
#[must_use]
pub fn decide_with(pod: &Pod, namespace: &str, config: &Arc<Config>, memo: &PatchMemo) -> Answered {
    let spec = match screen(pod, namespace, config) {
        Ok(spec) => spec,
        Err(decision) => return Answered::Decided(decision),
    };
    let shape = Shape::of(pod);
    let Some(shape) = shape.filter(|_| inject::is_pristine(pod)) else {
        return Answered::Decided(after_gate(pod, &spec, config));
    };
    if let Err(denial) = inject::check_conflicts(pod) {
        return Answered::Decided(Decision::Deny(denial));
    }
    let key = Key { spec, shape };
    if let Some(fresh) = memo.get(config, &key) {
        #[cfg(debug_assertions)]
        {
            let Decision::Patch { patch, warnings } = after_gate(pod, &key.spec, config) else {
                panic!("a remembered injection must be an injection for this Pod too");
            };
            assert_eq!(
                patch, fresh.patch,
                "a remembered patch differs from the diff"
            );
            assert_eq!(warnings, fresh.warnings);
        }
        return Answered::Fresh(fresh, Lookup::Hit);
    }
    match after_gate(pod, &key.spec, config) {
        Decision::Patch { patch, warnings } if !patch.0.is_empty() => {
            let Ok(encoded) = patch.to_base64_json() else {
                return Answered::Decided(serialize_failed());
            };
            let fresh = Arc::new(FreshPatch {
                patch,
                encoded,
                warnings,
            });
            memo.insert(config, key, Arc::clone(&fresh));
            Answered::Fresh(fresh, Lookup::Miss)
        }
        decision => Answered::Decided(decision),
    }
}

/// The checks up to the parsed annotations and the identity: `Err` holds the decision for a Pod
/// that stops here. The owner is the Pod's controller ownerReference.
fn screen(pod: &Pod, namespace: &str, config: &Config) -> Result<InjectionSpec, Decision> {
    let stop = if config.excluded_namespaces.iter().any(|n| n == namespace) {
        skip(pod, SkipReason::ExcludedNamespace)
    } else {
        match gate(pod, Owner::controller_of(pod).as_ref(), config) {
            Ok(spec) => return Ok(spec),
            Err(stop) => stop,
        }
    };
    Err(match stop {
        Stop::Skip(reason) => Decision::Skip(reason),
        Stop::Deny(denial) => Decision::Deny(denial),
    })
}

/// Inject `pod` (which passed [`gate`] with `spec`) and diff.
fn after_gate(pod: &Pod, spec: &InjectionSpec, config: &Config) -> Decision {
    if inject::is_pristine(pod) {
        let mut injection = match inject::plan(pod, spec, config) {
            Ok(injection) => injection,
            Err(denial) => return Decision::Deny(denial),
        };
        let warnings = std::mem::take(&mut injection.warnings);
        if let (Some(before), Some(after)) = (Parts::of(pod), injection.place(pod)) {
            let decision = match patch::diff_parts(&before, &after) {
                Ok(patch) => Decision::Patch { patch, warnings },
                Err(_) => serialize_failed(),
            };
            #[cfg(debug_assertions)]
            check_against_twin(pod, injection, &decision);
            return decision;
        }
    }
    match inject::inject(pod, spec, config) {
        Ok(outcome) => patch_for(pod, outcome),
        Err(denial) => Decision::Deny(denial),
    }
}

fn patch_for(pod: &Pod, outcome: Outcome) -> Decision {
    match patch::diff_pods(pod, &outcome.pod) {
        Ok(patch) => Decision::Patch {
            patch,
            warnings: outcome.warnings,
        },
        Err(_) => serialize_failed(),
    }
}

fn serialize_failed() -> Decision {
    Decision::Deny(Denial {
        reason: "internal",
        message: "failed to serialize the Pod".to_owned(),
    })
}

/// Debug builds (every test): the patch of the view equals the patch of the injected twin.
#[cfg(debug_assertions)]
fn check_against_twin(pod: &Pod, injection: Injection, decision: &Decision) {
    let twin = injection.apply(pod.clone());
    let (Decision::Patch { patch, .. }, Ok(expected)) =
        (decision, patch::diff_pods(pod, &twin.pod))
    else {
        return;
    };
    debug_assert_eq!(patch, &expected, "the view's patch differs from the twin's");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const PLAIN: &str = "metadata: {name: web}\nspec:\n  containers: [{name: app, image: nginx}]\n";

    #[test]
    fn a_pod_without_the_annotation_is_skipped_by_default() {
        let d = decide(&pod(PLAIN), "shop", &Config::default());
        assert!(
            matches!(d, Decision::Skip(SkipReason::NotRequested)),
            "{d:?}"
        );
    }

    #[test]
    fn an_annotated_pod_in_kube_system_is_skipped_even_if_the_namespace_is_labelled() {
        let input = pod("metadata: {name: web, annotations: {wg-injector.io/inject: 'true'}}\nspec:\n  containers: [{name: app, image: nginx}]\n");
        for namespace in ["kube-system", "kube-public"] {
            let d = decide(&input, namespace, &Config::default());
            assert!(
                matches!(d, Decision::Skip(SkipReason::ExcludedNamespace)),
                "{namespace}: {d:?}"
            );
        }
        assert!(matches!(
            decide(&input, "shop", &Config::default()),
            Decision::Patch { .. }
        ));
    }

    #[test]
    fn inject_by_default_injects_a_pod_without_the_annotation_but_not_one_that_opts_out() {
        let config = Config {
            inject_by_default: true,
            ..Config::default()
        };
        let Decision::Patch { patch, warnings } = decide(&pod(PLAIN), "shop", &config) else {
            panic!()
        };
        assert!(!patch.0.is_empty());
        assert_eq!(warnings, [inject::PRIVILEGED_WARNING]);
        let opted_out = pod("metadata: {name: web, annotations: {wg-injector.io/inject: 'false'}}\nspec:\n  containers: [{name: app, image: nginx}]\n");
        assert!(matches!(
            decide(&opted_out, "shop", &config),
            Decision::Skip(SkipReason::NotRequested)
        ));
    }

    #[test]
    fn an_injected_pod_gets_an_empty_patch() {
        let input = pod("metadata: {name: web, annotations: {wg-injector.io/inject: 'true'}}\nspec:\n  containers: [{name: app, image: nginx}]\n");
        let Verdict::Inject(outcome) = evaluate(&input, &Config::default()) else {
            panic!()
        };
        let Decision::Patch { patch, .. } = decide(&outcome.pod, "shop", &Config::default()) else {
            panic!()
        };
        assert!(patch.0.is_empty(), "{patch:?}");
    }

    #[test]
    fn a_host_network_pod_is_skipped_unless_it_asked_explicitly() {
        let config = Config {
            inject_by_default: true,
            ..Config::default()
        };
        let host =
            "metadata: {name: web}\nspec:\n  hostNetwork: true\n  containers: [{name: app}]\n";
        assert!(matches!(
            decide(&pod(host), "ns", &config),
            Decision::Skip(SkipReason::HostNetwork)
        ));
        let asked = "metadata: {name: web, annotations: {wg-injector.io/inject: 'true'}}\nspec:\n  hostNetwork: true\n  containers: [{name: app}]\n";
        let Decision::Deny(d) = decide(&pod(asked), "ns", &config) else {
            panic!()
        };
        assert_eq!(d.reason, "host_network");
    }

    #[test]
    fn a_typo_in_an_annotation_key_is_denied_even_without_opting_in() {
        let typo = "metadata: {name: web, annotations: {wg-injector.io/injetc: 'true'}}\nspec:\n  containers: [{name: app}]\n";
        let Decision::Deny(d) = decide(&pod(typo), "ns", &Config::default()) else {
            panic!()
        };
        assert_eq!(d.reason, "unknown_annotation");
    }

    #[test]
    fn a_pod_left_untouched_that_carries_the_tunnel_label_itself_is_denied() {
        let config = Arc::new(Config::default());
        let memo = PatchMemo::new(4);
        for (yaml, namespace) in [
            ("metadata: {name: web, labels: {wg-injector.io/tunnel: default}}
spec:
  containers: [{name: app}]
", "shop"),
            ("metadata: {name: web, labels: {wg-injector.io/tunnel: default}, annotations: {wg-injector.io/inject: 'false'}}
spec:
  containers: [{name: app}]
", "shop"),
            ("metadata: {name: web, labels: {wg-injector.io/tunnel: corp}}
spec:
  hostNetwork: true
  containers: [{name: app}]
", "shop"),
            ("metadata: {name: web, labels: {wg-injector.io/tunnel: default}, annotations: {wg-injector.io/inject: 'true'}}
spec:
  containers: [{name: app}]
", "kube-system"),
        ] {
            let p = pod(yaml);
            for decision in [
                decide(&p, namespace, &config),
                match decide_with(&p, namespace, &config, &memo) {
                    Answered::Decided(d) => d,
                    Answered::Fresh(..) => panic!("{yaml}"),
                },
            ] {
                let Decision::Deny(d) = decision else {
                    panic!("{yaml}: {decision:?}")
                };
                assert_eq!(d.reason, "reserved_label", "{yaml}");
                assert!(d.message.contains("set only by wg-injector"), "{}", d.message);
            }
        }
        let Verdict::Deny(d) = evaluate(
            &pod(
                "metadata: {name: web, labels: {wg-injector.io/tunnel: default}}
spec:
  containers: [{name: app}]
",
            ),
            &config,
        ) else {
            panic!("the offline CLI refuses it too")
        };
        assert_eq!(d.reason, "reserved_label");
    }

    #[test]
    fn a_pod_that_asks_for_injection_and_sets_the_tunnel_label_itself_is_denied() {
        for value in ["default", "elsewhere"] {
            let p = pod(&format!("metadata: {{name: web, labels: {{wg-injector.io/tunnel: {value}}}, annotations: {{wg-injector.io/inject: 'true'}}}}
spec:
  containers: [{{name: app}}]
"));
            let Decision::Deny(d) = decide(&p, "shop", &Config::default()) else {
                panic!("{value}")
            };
            assert_eq!(d.reason, "reserved_label");
            assert!(d.message.contains("wg-injector.io/tunnel"), "{}", d.message);
        }
    }

    #[test]
    fn an_injected_pod_left_untouched_keeps_its_label_and_a_changed_one_is_put_back() {
        let Verdict::Inject(outcome) = evaluate(
            &pod(
                "metadata: {name: web, annotations: {wg-injector.io/inject: 'true'}}
spec:
  containers: [{name: app}]
",
            ),
            &Config::default(),
        ) else {
            panic!()
        };
        // The offline CLI's output, applied with inject "false": left alone, label and all.
        let mut opted_out = outcome.pod.clone();
        opted_out
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(annotations::INJECT.to_owned(), "false".to_owned());
        assert!(matches!(
            decide(&opted_out, "shop", &Config::default()),
            Decision::Skip(SkipReason::NotRequested)
        ));
        // Re-invoked after a later webhook changed the label: the patch puts the injector's back.
        let mut relabelled = outcome.pod.clone();
        relabelled.metadata.labels.as_mut().unwrap().insert(
            crate::annotations::TUNNEL_LABEL.to_owned(),
            "corp".to_owned(),
        );
        let Decision::Patch { patch, .. } = decide(&relabelled, "shop", &Config::default()) else {
            panic!()
        };
        let mut patched = serde_json::to_value(&relabelled).unwrap();
        json_patch::patch(&mut patched, &patch.to_json_patch().unwrap()).unwrap();
        assert_eq!(
            patched["metadata"]["labels"]["wg-injector.io/tunnel"],
            "default"
        );
        assert_eq!(patched, serde_json::to_value(&outcome.pod).unwrap());
    }

    fn fresh_patch(p: &Pod, config: &Arc<Config>, memo: &PatchMemo) -> String {
        match decide_with(p, "shop", config, memo) {
            Answered::Fresh(fresh, _) => serde_json::to_string(&fresh.patch).unwrap(),
            Answered::Decided(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn the_memo_does_not_let_a_replica_set_pod_share_the_secret_a_bare_pod_was_allowed() {
        let config = Arc::new(Config::default());
        let memo = PatchMemo::new(4);
        let bare = pod("metadata: {name: one, annotations: {wg-injector.io/inject: 'true', wg-injector.io/key-source: 'secret:x'}}\nspec:\n  containers: [{name: app}]\n");
        let mut replica = bare.clone();
        replica.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".to_owned(),
                kind: "ReplicaSet".to_owned(),
                name: "web-5d8f".to_owned(),
                uid: "1".to_owned(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        // Twice, so the bare Pod's patch is remembered.
        for _ in 0..2 {
            fresh_patch(&bare, &config, &memo);
        }
        let Answered::Decided(Decision::Deny(d)) = decide_with(&replica, "shop", &config, &memo)
        else {
            panic!("a ReplicaSet's Pod must be denied the fixed Secret, memo or not")
        };
        assert_eq!(d.reason, "shared_key");
    }

    #[test]
    fn the_memo_gives_each_stateful_set_pod_the_secret_named_after_it() {
        let config = Arc::new(Config::default());
        let memo = PatchMemo::new(4);
        let of = |name: &str| {
            pod(&format!("metadata: {{name: {name}, annotations: {{wg-injector.io/inject: 'true', wg-injector.io/key-source: 'secret:wg-{{pod}}'}}, ownerReferences: [{{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: '1', controller: true}}]}}\nspec:\n  containers: [{{name: app}}]\n"))
        };
        for _ in 0..2 {
            assert!(fresh_patch(&of("db-0"), &config, &memo).contains("\"wg-db-0\""));
        }
        let second = fresh_patch(&of("db-1"), &config, &memo);
        assert!(
            second.contains("\"wg-db-1\"") && !second.contains("wg-db-0"),
            "{second}"
        );
    }

    #[test]
    fn the_memo_does_not_give_a_jobs_pod_the_warnings_of_a_deployments_pod_with_the_same_annotations(
    ) {
        let config = Arc::new(Config {
            inject_by_default: true,
            ..Config::default()
        });
        let memo = PatchMemo::new(4);
        let forever = pod(PLAIN);
        let once = pod("metadata: {name: web}\nspec:\n  restartPolicy: Never\n  containers: [{name: app, image: nginx}]\n");
        let warnings = |p: &Pod| match decide_with(p, "shop", &config, &memo) {
            Answered::Fresh(fresh, _) => fresh.warnings.clone(),
            Answered::Decided(d) => panic!("{d:?}"),
        };
        // Twice, so the Deployment-like Pod's answer is remembered.
        for _ in 0..2 {
            assert_eq!(warnings(&forever), [inject::PRIVILEGED_WARNING]);
        }
        assert_eq!(
            warnings(&once),
            [
                inject::PRIVILEGED_WARNING.to_owned(),
                inject::classic_run_once_warning()
            ]
        );
        assert_eq!(warnings(&forever), [inject::PRIVILEGED_WARNING]);
    }
}
