//! The sidecar command-line contract (docs/sidecar-cli.md): every argument list the injector
//! writes into a Pod parses with `wg-sidecar`'s own clap definition, as the kubelet would run
//! it (image ENTRYPOINT `wg-sidecar`, `$(VAR)` references expanded from the container's env),
//! every env var it writes is one a flag of that subcommand reads (`env = …`), and the result
//! validates into the sidecar's `RunConfig`: a Vault-keyed sidecar registers as the Pod the
//! downward API names (namespace, service account, name, UID), unless the Pod has a static
//! identity (`wg-injector.io/vault-path`).
//!
//! Inputs: every golden Pod of the injection core (`injector/tests/testdata/golden`) under the
//! golden config, plus annotation combinations that exercise every flag the injector writes.
#![allow(clippy::unwrap_used)]

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::core::v1::{Container, Pod};
use std::collections::BTreeMap;
use std::path::PathBuf;
use wg_injector::admission::{evaluate, Verdict};
use wg_injector::config::Config;
use wg_injector::inject::expand_kubelet_vars;
use wg_sidecar::cli::{Cli, Command, KeySourceConfig};
use wg_sidecar::registration::PodIdentity;

/// The Pod the downward API stands in for: `web-0` of service account `web` in `shop`.
const NAMESPACE: &str = "shop";
const SERVICE_ACCOUNT: &str = "web";
const POD_NAME: &str = "web-0";
const POD_UID: &str = "0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d";

fn golden_dir() -> PathBuf {
    wg_e2e::lab::workspace_root().join("injector/tests/testdata")
}

fn golden_config() -> Config {
    Config::from_yaml_file(&golden_dir().join("golden-config.yaml")).unwrap()
}

/// What the kubelet would run: `$(VAR)` expanded from the container's env (downward-API
/// values of the stand-in Pod above), and the env itself as the flags clap reads it from.
fn argv(container: &Container) -> Vec<String> {
    let mut vars = BTreeMap::new();
    for env in container.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.namespace") => NAMESPACE.to_owned(),
                Some("spec.serviceAccountName") => SERVICE_ACCOUNT.to_owned(),
                Some("metadata.name") => POD_NAME.to_owned(),
                Some("metadata.uid") => POD_UID.to_owned(),
                other => panic!(
                    "{}: env {} from an unknown field {other:?}",
                    container.name, env.name
                ),
            },
            (None, None) => String::new(),
        };
        vars.insert(env.name.clone(), value);
    }
    let mut argv = container
        .command
        .clone()
        .unwrap_or_else(|| vec!["wg-sidecar".to_owned()]);
    argv.extend(
        container
            .args
            .iter()
            .flatten()
            .map(|a| expand_kubelet_vars(a, &vars)),
    );
    let subcommand = argv.get(1).cloned().unwrap_or_default();
    argv.extend(env_as_flags(&container.name, &subcommand, &vars));
    argv
}

/// The env as flags of `wg-sidecar SUBCOMMAND`, found through clap's own `env = …` names: an env
/// var of ours (`WG_…`) that no flag reads is a broken contract (the sidecar would never see it).
/// Other names are another webhook's (reinvocation keeps them, e.g. a policy engine's `TZ`).
fn env_as_flags(container: &str, subcommand: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let cli = Cli::command();
    let Some(sub) = cli.find_subcommand(subcommand) else {
        return Vec::new(); // `try_parse_from` reports the unknown subcommand
    };
    env.iter()
        .filter(|(name, _)| name.starts_with("WG_"))
        .map(|(name, value)| {
            let arg = sub
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| {
                    panic!(
                        "{container}: env {name} is read by no flag of `wg-sidecar {subcommand}`"
                    )
                });
            format!("--{}={value}", arg.get_long().unwrap())
        })
        .collect()
}

/// Check every injected container of `pod`; returns how many argument lists were checked.
fn check(pod: &Pod, origin: &str) -> usize {
    let spec = pod.spec.as_ref().unwrap();
    let mut checked = 0;
    let injected = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| c.name == "wg-init" || c.name == "wg-sidecar");
    for container in injected {
        let argv = argv(container);
        assert_eq!(argv[0], "wg-sidecar", "{origin}: {argv:?}");
        let parsed = Cli::try_parse_from(&argv).unwrap_or_else(|e| {
            panic!("{origin}: {} does not parse: {e}\n{argv:?}", container.name)
        });
        match (container.name.as_str(), parsed.command) {
            ("wg-init", Command::Init(_)) => {}
            ("wg-sidecar", Command::Run(run)) => {
                let config = run.into_config().unwrap_or_else(|e| {
                    panic!("{origin}: wg-sidecar's flags do not validate: {e}\n{argv:?}")
                });
                check_identity(&config.key_source, &argv, origin);
            }
            (name, command) => panic!("{origin}: {name} runs {command:?}"),
        }
        checked += 1;
        // The classic-mode postStart hook (on the sidecar among the app containers, only there):
        // the image's binary, a `wait` the sidecar accepts.
        let classic = spec.containers.iter().any(|c| std::ptr::eq(c, container));
        let hook = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone());
        assert_eq!(
            hook.is_some(),
            classic && container.name == "wg-sidecar",
            "{origin}: {} hook {hook:?}",
            container.name
        );
        if let Some(command) = hook {
            assert_eq!(
                command[0], "/usr/local/bin/wg-sidecar",
                "{origin}: {command:?}"
            );
            let mut hook_argv = command.clone();
            "wg-sidecar".clone_into(&mut hook_argv[0]);
            let parsed = Cli::try_parse_from(&hook_argv).unwrap_or_else(|e| {
                panic!("{origin}: the postStart hook does not parse: {e}\n{command:?}")
            });
            assert!(
                matches!(parsed.command, Command::Wait(_)),
                "{origin}: {command:?}"
            );
        }
    }
    checked
}

/// `vault.keyRotationInterval` reaches every Pod whose key is born in the Pod as a flag the
/// sidecar accepts and turns into its rotation interval; a static identity gets none.
#[test]
fn a_configured_key_rotation_interval_is_accepted_by_the_sidecar_as_rendered() {
    let mut config = golden_config();
    config.vault.key_rotation_interval = Some("24h".to_owned());
    let mut rotating = 0;
    for entry in std::fs::read_dir(golden_dir().join("golden")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let pod: Pod = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let Verdict::Inject(outcome) = evaluate(&pod, &config) else {
            continue;
        };
        check(&outcome.pod, &path.display().to_string());
        let spec = outcome.pod.spec.as_ref().unwrap();
        let Some(sidecar) = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .find(|c| c.name == "wg-sidecar")
        else {
            continue;
        };
        let argv = argv(sidecar);
        let Command::Run(run) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!("{argv:?}");
        };
        let static_identity = argv.iter().any(|a| a.starts_with("--vault-key-path"));
        let vault = argv.iter().any(|a| a == "--key-source=vault");
        let interval = run.into_config().unwrap().key_rotation_interval;
        if vault && !static_identity {
            assert_eq!(
                interval,
                Some(std::time::Duration::from_secs(86_400)),
                "{}",
                path.display()
            );
            rotating += 1;
        } else {
            assert_eq!(interval, None, "{}", path.display());
        }
    }
    assert!(
        rotating >= 3,
        "only {rotating} Pods with keys born in the Pod"
    );
}

/// A Vault-keyed sidecar without a static identity registers as exactly the stand-in Pod; one
/// with a static identity still knows the Pod (its record is published under the UID too).
fn check_identity(key_source: &KeySourceConfig, argv: &[String], origin: &str) {
    let KeySourceConfig::Vault {
        registration,
        key_path,
        ..
    } = key_source
    else {
        return; // a mounted key folder: nothing to register
    };
    let (pod, _) = registration.as_ref().unwrap_or_else(|| {
        panic!("{origin}: a Vault-keyed sidecar that would not register: {argv:?}")
    });
    assert_eq!(
        pod,
        &PodIdentity::new(NAMESPACE, SERVICE_ACCOUNT, POD_NAME, POD_UID).unwrap(),
        "{origin}"
    );
    let static_identity = argv.iter().any(|a| a.starts_with("--vault-key-path="));
    assert_eq!(key_path.is_some(), static_identity, "{origin}: {argv:?}");
}

#[test]
fn every_argument_list_the_injector_writes_for_the_golden_pods_parses_and_validates_with_the_sidecar_cli(
) {
    let config = golden_config();
    let mut checked = 0;
    let mut injected = 0;
    for entry in std::fs::read_dir(golden_dir().join("golden")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let pod: Pod = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Verdict::Inject(outcome) = evaluate(&pod, &config) {
            injected += 1;
            checked += check(&outcome.pod, &path.display().to_string());
        }
    }
    assert!(injected >= 5, "only {injected} golden Pods were injected");
    assert_eq!(
        checked,
        injected * 2,
        "each injected Pod has wg-init and wg-sidecar"
    );
}

#[test]
fn every_flag_combination_from_the_annotations_parses_and_validates_with_the_sidecar_cli() {
    let config = golden_config();
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("wg-injector.io/gateway", "corp")],
        &[
            ("wg-injector.io/gateway", "v6only"),
            ("wg-injector.io/kill-switch", "false"),
        ],
        &[
            ("wg-injector.io/routes", "10.1.0.0/16,fd00:1::/64"),
            ("wg-injector.io/dns", "10.1.0.53,fd00:1::53"),
            ("wg-injector.io/mtu", "1280"),
            ("wg-injector.io/keepalive", "0"),
        ],
        &[("wg-injector.io/key-source", "secret:web-wg-keys")],
        &[
            ("wg-injector.io/vault-role", "shop-web"),
            ("wg-injector.io/vault-path", "wg/keys/shop/custom"),
        ],
        &[("wg-injector.io/sidecar-mode", "native")],
        &[("wg-injector.io/sidecar-mode", "classic")],
    ];
    for (i, annotations) in cases.iter().enumerate() {
        let mut all: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        all.insert("wg-injector.io/inject".into(), "true".into());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": format!("case-{i}"), "annotations": all },
            "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "app:1" }] },
        }))
        .unwrap();
        match evaluate(&pod, &config) {
            Verdict::Inject(outcome) => {
                assert_eq!(check(&outcome.pod, &format!("{annotations:?}")), 2);
            }
            other => panic!("{annotations:?} was not injected: {other:?}"),
        }
    }
}
