//! Golden tests of the injection core: every Pod in `testdata/golden/*.yaml` is decided with
//! `testdata/golden-config.yaml`, and the result (injected Pod, skip reason or denial message)
//! is compared with its insta snapshot in `testdata/snapshots/`. Each injected case also checks
//! that the patch applied to the input gives the injected Pod, that injecting twice equals
//! injecting once (empty patch), and that uninject gives the input back.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use wg_injector::admission::{decide, evaluate, Decision, Verdict};
use wg_injector::annotations::STATUS;
use wg_injector::annotations::TUNNEL_LABEL;
use wg_injector::config::Config;
use wg_injector::inject::{
    is_injected_pod, uninject, INIT_CONTAINER, INJECTED_VOLUMES, NAMESPACE_ENV, POD_NAME_ENV,
    POD_UID_ENV, SERVICE_ACCOUNT_ENV, SIDECAR_CONTAINER,
};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata")
}

fn golden_config() -> Config {
    Config::from_yaml_file(&testdata().join("golden-config.yaml")).unwrap()
}

/// Decide `pod`, check every invariant, and return what the snapshot records.
fn check(name: &str, pod: &Pod, config: &Config) -> Value {
    let decision = decide(pod, "shop", config);
    match evaluate(pod, config) {
        Verdict::Inject(outcome) => {
            let Decision::Patch { patch, warnings } = decision else {
                panic!("{name}: evaluate injected but decide said {decision:?}")
            };
            assert_eq!(warnings, outcome.warnings, "{name}");

            let mut patched = serde_json::to_value(pod).unwrap();
            json_patch::patch(&mut patched, &patch.to_json_patch().unwrap()).unwrap();
            assert_eq!(
                patched,
                serde_json::to_value(&outcome.pod).unwrap(),
                "{name}: the patch applied to the input is exactly the injected Pod"
            );

            let Decision::Patch { patch: again, .. } = decide(&outcome.pod, "shop", config) else {
                panic!("{name}: the injected Pod was not injectable again")
            };
            assert!(
                again.0.is_empty(),
                "{name}: injecting twice must equal once: {again:?}"
            );

            assert_eq!(
                uninject(&outcome.pod),
                uninject(pod),
                "{name}: uninject(inject(p)) == uninject(p)"
            );
            let carries_our_marks = is_injected_pod(pod)
                || pod
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(STATUS));
            if !carries_our_marks {
                assert_eq!(
                    &uninject(&outcome.pod),
                    pod,
                    "{name}: uninject(inject(p)) == p"
                );
            }
            json!({
                "decision": "inject",
                "mode": outcome.mode.as_str(),
                "warnings": outcome.warnings,
                "pod": outcome.pod,
            })
        }
        Verdict::Skip(reason) => {
            assert!(
                matches!(decision, Decision::Skip(r) if r == reason),
                "{name}: {decision:?}"
            );
            json!({ "decision": "skip", "reason": reason.as_str() })
        }
        Verdict::Deny(denial) => {
            assert!(
                matches!(&decision, Decision::Deny(d) if *d == denial),
                "{name}: {decision:?}"
            );
            json!({ "decision": "deny", "reason": denial.reason, "message": denial.message })
        }
    }
}

#[test]
fn every_golden_pod_is_injected_skipped_or_denied_as_its_snapshot_says() {
    let config = golden_config();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(testdata().join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::glob!("testdata/golden/*.yaml", |path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let pod: Pod = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let recorded = check(&name, &pod, &config);
            if name.starts_with("deny-") {
                assert_eq!(recorded["decision"], "deny", "{name} must be denied");
            }
            insta::assert_yaml_snapshot!("golden", recorded);
        });
    });
}

#[test]
fn there_are_at_least_25_golden_pods() {
    let count = std::fs::read_dir(testdata().join("golden"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        })
        .count();
    assert!(count >= 25, "only {count} golden Pods");
}

#[test]
fn an_injected_pod_used_as_input_comes_back_unchanged() {
    let config = golden_config();
    for entry in std::fs::read_dir(testdata().join("golden")).unwrap() {
        let path = entry.unwrap().path();
        let pod: Pod = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Verdict::Inject(outcome) = evaluate(&pod, &config) {
            let Verdict::Inject(again) = evaluate(&outcome.pod, &config) else {
                panic!("{}: re-injection was not an injection", path.display())
            };
            assert_eq!(again.pod, outcome.pod, "{}", path.display());
        }
    }
}

#[test]
fn the_example_config_and_manifests_are_accepted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = Config::from_yaml_file(&root.join("examples/injector-config.yaml")).unwrap();
    assert!(config.gateway("corp").is_some());
    let pod: Pod =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("examples/pod.yaml")).unwrap())
            .unwrap();
    for config in [Config::default(), config] {
        let Verdict::Inject(outcome) = evaluate(&pod, &config) else {
            panic!("examples/pod.yaml must be injected")
        };
        assert_eq!(
            outcome.pod.metadata.labels.unwrap()["wg-injector.io/tunnel"],
            "default"
        );
    }
}

fn golden_pod(name: &str) -> Pod {
    let path = testdata().join("golden").join(format!("{name}.yaml"));
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
}

/// Reinvocation (`reinvocationPolicy: IfNeeded`, or an injected template created again): what
/// another webhook changed in an injected Pod and injection does not decide survives. In the
/// injected containers: the image and its pull policy (an image mirror), the resources (a
/// policy engine, a VPA), env vars and volumeMounts of other names; in the Pod: its other
/// labels, annotations, containers and volumes.
#[test]
fn a_second_webhooks_edits_to_an_injected_pod_survive_reinvocation() {
    let config = golden_config();
    let ours = [
        NAMESPACE_ENV,
        SERVICE_ACCOUNT_ENV,
        POD_NAME_ENV,
        POD_UID_ENV,
    ];
    let mut seen = 0;
    for entry in std::fs::read_dir(testdata().join("golden")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let pod = golden_pod(&name);
        if !is_injected_pod(&pod) {
            continue;
        }
        let Verdict::Inject(outcome) = evaluate(&pod, &config) else {
            panic!("{name}: an injected Pod must be injected again")
        };
        seen += 1;
        let after = &outcome.pod;
        for ours_name in [INIT_CONTAINER, SIDECAR_CONTAINER] {
            let (Some(b), Some(a)) = (container(&pod, ours_name), container(after, ours_name))
            else {
                panic!("{name}: {ours_name} missing")
            };
            assert_eq!(a.image, b.image, "{name}: {ours_name} image");
            assert_eq!(
                a.image_pull_policy, b.image_pull_policy,
                "{name}: {ours_name} imagePullPolicy"
            );
            assert_eq!(a.resources, b.resources, "{name}: {ours_name} resources");
            for env in b.env.iter().flatten() {
                if !ours.contains(&env.name.as_str()) {
                    assert!(
                        a.env.iter().flatten().any(|e| e == env),
                        "{name}: {ours_name} lost env {env:?}"
                    );
                }
            }
            for m in b.volume_mounts.iter().flatten() {
                if !INJECTED_VOLUMES.contains(&m.name.as_str()) {
                    assert!(
                        a.volume_mounts.iter().flatten().any(|x| x == m),
                        "{name}: {ours_name} lost volumeMount {m:?}"
                    );
                }
            }
        }
        for (key, value) in pod.metadata.labels.iter().flatten() {
            if key != TUNNEL_LABEL {
                assert_eq!(
                    after.metadata.labels.as_ref().and_then(|l| l.get(key)),
                    Some(value),
                    "{name}: label {key}"
                );
            }
        }
        for (key, value) in pod.metadata.annotations.iter().flatten() {
            if key != STATUS {
                assert_eq!(
                    after.metadata.annotations.as_ref().and_then(|l| l.get(key)),
                    Some(value),
                    "{name}: annotation {key}"
                );
            }
        }
        let spec = pod.spec.as_ref().unwrap();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            if c.name != INIT_CONTAINER && c.name != SIDECAR_CONTAINER {
                assert_eq!(container(after, &c.name), Some(c), "{name}: {}", c.name);
            }
        }
        let after_volumes = after.spec.as_ref().unwrap().volumes.iter().flatten();
        for v in spec.volumes.iter().flatten() {
            if !INJECTED_VOLUMES.contains(&v.name.as_str()) {
                assert!(
                    after_volumes.clone().any(|x| x == v),
                    "{name}: volume {}",
                    v.name
                );
            }
        }
    }
    assert!(seen >= 3, "only {seen} injected Pods among the goldens");
}

/// The image mirror's case exactly: nothing but what a second webhook may change differs from
/// the injector's own output, so re-invoked the injector has nothing to do.
#[test]
fn a_mirror_image_and_a_second_webhooks_label_and_app_env_get_an_empty_patch() {
    let pod =
        golden_pod("reinvocation-keeps-a-mirror-image-and-a-second-webhooks-label-and-app-env");
    let Decision::Patch { patch, .. } = decide(&pod, "shop", &golden_config()) else {
        panic!("an injected Pod must be patched")
    };
    assert!(patch.0.is_empty(), "{patch:?}");
}
