//! Property tests of the injection core over generated Pods: random app and init containers
//! (some named or shaped like ours, some with clashing ports), volumes, labels, a controller
//! (or none), a name or only a `generateName`, and annotations that mix valid, invalid,
//! arbitrary and unknown `wg-injector.io/` values.
//!
//! Properties, for two injector configs (the golden one: native sidecars, inject by default;
//! the built-in default: classic, opt-in):
//! - deciding never panics, and `decide` agrees with `evaluate`;
//! - the patch applied to the input is exactly the injected Pod;
//! - injecting twice equals injecting once (empty patch, same Pod);
//! - `uninject(inject(p)) == p` for Pods that carried none of our parts;
//! - `uninject` of any Pod never panics and is idempotent;
//! - the webhook's memo (`decide_with`) answers exactly like `decide`, for the Pod that filled
//!   an entry and for a sibling with the same annotations and shape but other contents.
//!
//! 256 cases per property (`PROPTEST_CASES` overrides) keep the suite at a few seconds.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, Pod, PodSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use wg_injector::admission::{decide, decide_with, evaluate, Answered, Decision, Verdict};
use wg_injector::annotations::{self, STATUS, TUNNEL_LABEL};
use wg_injector::config::Config;
use wg_injector::inject::{self, uninject, INIT_CONTAINER, INJECTED_VOLUMES, SIDECAR_CONTAINER};
use wg_injector::memo::PatchMemo;

fn golden_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::from_yaml_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/golden-config.yaml"),
        )
        .unwrap()
    })
}

fn default_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(Config::default)
}

/// Values for one annotation: mostly valid ones from the contract, sometimes invalid ones, and
/// now and then an arbitrary string.
fn value_for(key: &'static str) -> BoxedStrategy<String> {
    let (valid, invalid): (&[&str], &[&str]) = match key {
        annotations::INJECT => (&["true", "false"], &["True", "yes", ""]),
        annotations::GATEWAY => (&["default", "corp", "v6only"], &["nope", "Corp", "-x"]),
        annotations::ROUTES => (
            &[
                "10.1.0.0/16",
                "10.20.0.0/16,fd00:20::/64",
                "fd00::/8, 192.168.0.0/24",
                "0.0.0.0/0",
            ],
            &["10.1.2.3/16", "banana", "10.0.0.0/33", ""],
        ),
        annotations::DNS => (
            &["10.0.0.53", "10.0.0.53,fd00::53"],
            &["dns.example", ",", ""],
        ),
        annotations::ENDPOINTS => (
            &[
                "vpn.example.com:51820",
                "[2001:db8::1]:51820,192.0.2.1:51820",
            ],
            &[
                "2001:db8::1:51820",
                "vpn.example.com",
                "vpn.example.com:99999",
                "[::1]:",
            ],
        ),
        annotations::MTU => (
            &["1280", "1420", "9000", "auto"],
            &["1279", "9001", "70000", "abc", "-1", "Auto"],
        ),
        annotations::KEEPALIVE => (&["0", "25", "65535"], &["65536", "-1", "x"]),
        annotations::KEY_SOURCE => (
            &["vault", "secret:wg-keys", "secret:a.b-c", "secret:wg-{pod}"],
            &["secret:", "secret:UPPER", "file", "secret:{namespace}"],
        ),
        annotations::VAULT_ROLE => (&["shop-web", "{namespace}-{serviceAccount}"], &["a b", ""]),
        annotations::VAULT_PATH => (
            &[
                "wg/keys/{namespace}/{serviceAccount}",
                "teams/x/wg",
                "wg/keys/{namespace}/{pod}",
            ],
            &["../etc/passwd", "/abs", "a//b", "", "wg/{node}"],
        ),
        annotations::KILL_SWITCH => (&["true", "false"], &["yes"]),
        annotations::SIDECAR_MODE => (&["native", "classic", "auto"], &["sidecar"]),
        annotations::SIDECAR_CPU_REQUEST | annotations::SIDECAR_CPU_LIMIT => {
            (&["10m", "0.5", "1", "2e3"], &["1e99", "ten", ".", ""])
        }
        annotations::SIDECAR_MEMORY_REQUEST | annotations::SIDECAR_MEMORY_LIMIT => (
            &["16Mi", "64Mi", "1Gi", "128974848", "1.5Gi"],
            &["-1Mi", "Mi"],
        ),
        _ => (&["{\"version\":\"0.0.0\"}", "spoofed"], &[]),
    };
    let invalid = if invalid.is_empty() { valid } else { invalid };
    prop_oneof![
        12 => proptest::sample::select(valid).prop_map(str::to_owned),
        3 => proptest::sample::select(invalid).prop_map(str::to_owned),
        1 => "\\PC{0,24}",
    ]
    .boxed()
}

fn annotations_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    let ours = annotations::KNOWN_ANNOTATIONS
        .iter()
        .map(|&key| {
            // Each annotation is absent most of the time, so most Pods get through parsing.
            proptest::option::weighted(0.1, value_for(key))
                .prop_map(move |v| v.map(|v| (key.to_owned(), v)))
                .boxed()
        })
        .collect::<Vec<_>>();
    let inject = proptest::option::weighted(
        0.8,
        prop_oneof![9 => Just("true".to_owned()), 1 => value_for(annotations::INJECT)],
    );
    let foreign =
        proptest::collection::btree_map("[a-z]{1,8}(\\.io/[a-z]{1,8})?", "\\PC{0,12}", 0..3);
    let typo = proptest::option::weighted(
        0.03,
        Just(("wg-injector.io/injetc".to_owned(), "true".to_owned())),
    );
    (ours, inject, foreign, typo).prop_map(|(ours, inject, mut map, typo)| {
        map.extend(ours.into_iter().flatten());
        if let Some(v) = inject {
            map.insert(annotations::INJECT.to_owned(), v);
        }
        map.extend(typo);
        map
    })
}

fn container_strategy(names: &'static [&'static str]) -> impl Strategy<Value = Container> {
    (
        prop_oneof![
            20 => "[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4})?",
            1 => proptest::sample::select(names).prop_map(str::to_owned),
        ],
        proptest::option::of("[a-z]{1,8}(:[0-9]{1,2})?"),
        proptest::option::weighted(
            0.3,
            proptest::collection::vec(
                prop_oneof![
                    Just("run".to_owned()),
                    Just("init".to_owned()),
                    "[a-z-]{1,8}"
                ],
                0..3,
            ),
        ),
        proptest::option::weighted(
            0.3,
            proptest::collection::vec(
                prop_oneof![5 => 1..65535_i32, 1 => Just(inject::HEALTH_PORT)],
                0..3,
            ),
        ),
        proptest::option::weighted(0.3, proptest::collection::vec("v[0-9]", 0..2)),
        proptest::option::weighted(0.1, Just("Always".to_owned())),
    )
        .prop_map(
            |(name, image, args, ports, mounts, restart_policy)| Container {
                name,
                image,
                args,
                ports: ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| ContainerPort {
                            container_port: p,
                            ..ContainerPort::default()
                        })
                        .collect()
                }),
                volume_mounts: mounts.map(|mounts| {
                    mounts
                        .into_iter()
                        .map(|name| VolumeMount {
                            mount_path: format!("/mnt/{name}"),
                            name,
                            ..VolumeMount::default()
                        })
                        .collect()
                }),
                restart_policy,
                ..Container::default()
            },
        )
}

/// Container names must be unique within a Pod for the API server; dedupe like it would refuse.
fn unique_names(containers: Vec<Container>) -> Vec<Container> {
    let mut seen = std::collections::BTreeSet::new();
    containers
        .into_iter()
        .filter(|c| seen.insert(c.name.clone()))
        .collect()
}

fn pod_strategy() -> impl Strategy<Value = Pod> {
    const NAMES: &[&str] = &[
        INIT_CONTAINER,
        SIDECAR_CONTAINER,
        "istio-init",
        "vault-agent-init",
    ];
    let volumes = proptest::collection::vec(
        prop_oneof![
            10 => "v[0-9]",
            1 => proptest::sample::select(INJECTED_VOLUMES).prop_map(str::to_owned),
        ],
        0..4,
    );
    let labels = proptest::option::of(proptest::collection::btree_map(
        prop_oneof![
            20 => "[a-z]{1,6}",
            1 => Just(TUNNEL_LABEL.to_owned()),
        ],
        "[a-z0-9]{0,6}",
        1..3,
    ));
    // The controller: none (a bare Pod), one the shared-key rule knows, or another kind.
    let owner = proptest::option::of(proptest::sample::select(
        &["ReplicaSet", "StatefulSet", "Job", "DaemonSet", "TaskRun"][..],
    ));
    (
        // Mostly named; sometimes only a generateName, as a ReplicaSet's Pods at admission.
        proptest::option::weighted(0.8, "[a-z]{1,10}"),
        proptest::option::of(Just("shop".to_owned())),
        labels,
        proptest::option::weighted(0.9, annotations_strategy()),
        proptest::collection::vec(container_strategy(NAMES), 1..4),
        proptest::option::weighted(
            0.4,
            proptest::collection::vec(container_strategy(NAMES), 1..3),
        ),
        volumes,
        proptest::option::weighted(0.05, any::<bool>()),
        proptest::option::of("[a-z]{1,8}"),
        owner,
    )
        .prop_map(
            |(
                name,
                namespace,
                labels,
                annotations,
                containers,
                inits,
                volumes,
                host,
                sa,
                owner,
            )| {
                let mut seen = std::collections::BTreeSet::new();
                let volumes: Vec<Volume> = volumes
                    .into_iter()
                    .filter(|v| seen.insert(v.clone()))
                    .map(|name| Volume {
                        name,
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    })
                    .collect();
                // Empty maps and lists are absent in what the API server sends.
                Pod {
                    metadata: ObjectMeta {
                        generate_name: name.is_none().then(|| "gen-".to_owned()),
                        name,
                        namespace,
                        owner_references: owner.map(|kind| {
                            vec![OwnerReference {
                                api_version: "apps/v1".to_owned(),
                                kind: kind.to_owned(),
                                name: "owner".to_owned(),
                                uid: "1f0c".to_owned(),
                                controller: Some(true),
                                ..OwnerReference::default()
                            }]
                        }),
                        labels,
                        annotations: annotations.filter(|a| !a.is_empty()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(PodSpec {
                        containers: unique_names(containers),
                        init_containers: inits.map(unique_names),
                        volumes: (!volumes.is_empty()).then_some(volumes),
                        host_network: host,
                        service_account_name: sa,
                        ..PodSpec::default()
                    }),
                    ..Pod::default()
                }
            },
        )
}

/// Whether `pod` carries anything inject adds or uninject removes.
fn has_our_parts(pod: &Pod) -> bool {
    inject::is_injected_pod(pod)
        || pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(STATUS))
}

fn check_invariants(pod: &Pod, config: &Config) -> Result<(), TestCaseError> {
    let decision = decide(pod, "shop", config);
    match evaluate(pod, config) {
        Verdict::Inject(outcome) => {
            let Decision::Patch { patch, warnings } = decision else {
                return Err(TestCaseError::fail(format!(
                    "evaluate injected but decide said {decision:?}"
                )));
            };
            prop_assert_eq!(&warnings, &outcome.warnings);

            let mut patched = serde_json::to_value(pod).unwrap();
            json_patch::patch(&mut patched, &patch.to_json_patch().unwrap())
                .map_err(|e| TestCaseError::fail(format!("the patch does not apply: {e}")))?;
            let injected = serde_json::to_value(&outcome.pod).unwrap();
            prop_assert_eq!(&patched, &injected, "patch(input) must be the injected Pod");
            let reparsed: Pod = serde_json::from_value(patched).unwrap();
            prop_assert_eq!(&reparsed, &outcome.pod);

            let Verdict::Inject(again) = evaluate(&outcome.pod, config) else {
                return Err(TestCaseError::fail(
                    "the injected Pod was not injectable again",
                ));
            };
            prop_assert_eq!(&again.pod, &outcome.pod, "inject(inject(p)) == inject(p)");
            let Decision::Patch { patch: again, .. } = decide(&outcome.pod, "shop", config) else {
                return Err(TestCaseError::fail(
                    "the injected Pod was not patchable again",
                ));
            };
            prop_assert!(again.0.is_empty(), "second patch not empty: {again:?}");

            prop_assert_eq!(uninject(&outcome.pod), uninject(pod));
            if !has_our_parts(pod) {
                prop_assert_eq!(&uninject(&outcome.pod), pod, "uninject(inject(p)) == p");
            }
        }
        Verdict::Skip(reason) => {
            prop_assert!(
                matches!(decision, Decision::Skip(r) if r == reason),
                "{decision:?}"
            );
        }
        Verdict::Deny(denial) => {
            prop_assert!(
                matches!(&decision, Decision::Deny(d) if *d == denial),
                "{decision:?}"
            );
            prop_assert!(!denial.message.is_empty());
        }
    }
    let once = uninject(pod);
    prop_assert_eq!(uninject(&once), once.clone(), "uninject is idempotent");
    if !has_our_parts(pod) {
        prop_assert_eq!(
            &once,
            pod,
            "uninject of a Pod without our parts changes nothing"
        );
    }
    Ok(())
}

/// 256 cases unless `PROPTEST_CASES` asks for more (a longer local hunt).
/// `decide_with` through `memo` agrees with `decide`: the same patch and warnings for a fresh
/// injection, the same decision (by its debug text) for everything else.
fn check_memo_agrees(
    pod: &Pod,
    config: &std::sync::Arc<Config>,
    memo: &PatchMemo,
) -> Result<(), TestCaseError> {
    let expected = decide(pod, "shop", config);
    match decide_with(pod, "shop", config, memo) {
        Answered::Fresh(fresh, _) => {
            let Decision::Patch { patch, warnings } = expected else {
                return Err(TestCaseError::fail(format!(
                    "the memo patched but decide said {expected:?}"
                )));
            };
            prop_assert_eq!(&fresh.patch, &patch);
            prop_assert_eq!(&fresh.warnings, &warnings);
            let encoded = patch.to_base64_json().unwrap();
            prop_assert_eq!(fresh.encoded.get(), encoded.get());
        }
        Answered::Decided(decision) => {
            prop_assert_eq!(format!("{decision:?}"), format!("{expected:?}"));
        }
    }
    Ok(())
}

/// A Pod with the same annotations and shape as `pod` but other contents: every container
/// gets another image and an extra environment variable, every volume another name.
fn sibling(pod: &Pod) -> Pod {
    let mut sibling = pod.clone();
    sibling.metadata.name = Some("sibling".to_owned());
    if let Some(spec) = sibling.spec.as_mut() {
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.image = Some(format!("sibling/{}:2", c.name));
            c.env
                .get_or_insert_with(Vec::new)
                .push(k8s_openapi::api::core::v1::EnvVar {
                    name: "SIBLING".to_owned(),
                    value: Some("yes".to_owned()),
                    ..Default::default()
                });
        }
        for v in spec.volumes.iter_mut().flatten() {
            v.name = format!("sibling-{}", v.name);
        }
    }
    sibling
}

fn memo_for(config: &'static Config) -> (std::sync::Arc<Config>, PatchMemo) {
    (std::sync::Arc::new(config.clone()), PatchMemo::new(64))
}

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn every_generated_pod_keeps_the_invariants_under_the_golden_config(pod in pod_strategy()) {
        check_invariants(&pod, golden_config())?;
    }

    #[test]
    fn every_generated_pod_keeps_the_invariants_under_the_default_config(pod in pod_strategy()) {
        check_invariants(&pod, default_config())?;
    }

    #[test]
    fn the_memo_answers_like_decide_for_a_pod_and_its_sibling(pod in pod_strategy()) {
        static GOLDEN: OnceLock<(std::sync::Arc<Config>, PatchMemo)> = OnceLock::new();
        static DEFAULT: OnceLock<(std::sync::Arc<Config>, PatchMemo)> = OnceLock::new();
        for (config, memo) in [
            GOLDEN.get_or_init(|| memo_for(golden_config())),
            DEFAULT.get_or_init(|| memo_for(default_config())),
        ] {
            check_memo_agrees(&pod, config, memo)?;
            check_memo_agrees(&pod, config, memo)?;
            check_memo_agrees(&sibling(&pod), config, memo)?;
        }
    }

    #[test]
    fn annotation_parsing_never_panics_on_arbitrary_maps(
        map in proptest::collection::btree_map(
            prop_oneof![
                3 => proptest::sample::select(annotations::KNOWN_ANNOTATIONS).prop_map(str::to_owned),
                1 => "\\PC{0,30}",
            ],
            "\\PC{0,60}",
            0..8,
        )
    ) {
        let screened = annotations::screen(&map);
        let parsed = annotations::parse(&map);
        let requested = annotations::inject_requested(&map);
        if let Err(denial) = screened.as_ref().and(parsed.as_ref().map(|_| ())).and(requested.as_ref().map(|_| ())) {
            prop_assert!(!denial.message.is_empty());
        }
    }
}

/// Enough Pods are injected for the properties above to mean something (not all denials).
#[test]
fn the_generator_produces_injected_skipped_and_denied_pods() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut injected, mut skipped, mut denied) = (0, 0, 0);
    for _ in 0..256 {
        let pod = pod_strategy().new_tree(&mut runner).unwrap().current();
        match evaluate(&pod, golden_config()) {
            Verdict::Inject(_) => injected += 1,
            Verdict::Skip(_) => skipped += 1,
            Verdict::Deny(_) => denied += 1,
        }
    }
    assert!(
        injected >= 40 && skipped >= 5 && denied >= 40,
        "injected {injected}, skipped {skipped}, denied {denied} of 256"
    );
}
