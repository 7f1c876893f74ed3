//! The Helm charts (`charts/wg-injector`, `charts/wg-gateway`) checked with the real tools:
//! `helm lint --strict` (Helm 3 CLI and Helm 4 engine), Helm 3 and Helm 4 rendering the same
//! objects, every object validated with `kubernetes-validate --strict` for Kubernetes 1.25,
//! 1.29 and 1.33 in every scenario, the version gates for 1.20, the negative cases (missing
//! `server.publicEndpoint`, values of the wrong type, a plaintext Vault address without
//! `allowPlaintext`), and Vault over TLS: https by default, the CA ConfigMap mounted and passed.
//!
//! Run: `cargo test -p wg-e2e --test charts`. Needs the lab tools (`bash scripts/lab-install.sh`);
//! a missing tool fails the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use wg_e2e::charts::{
    self, api_version, helm4_render, kind, name, of_kind, split_documents, Helm4Render, Template,
    CRD_KINDS,
};
use wg_e2e::lab;

const VALIDATED_VERSIONS: &[&str] = &["1.25.0", "1.29.0", "1.33.0"];
const NAMESPACE: &str = "wg-system";
const CA_BUNDLE: &str =
    "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=";

/// One way of installing a chart: its values and a name for messages and files.
struct Scenario {
    name: &'static str,
    chart: &'static str,
    release: &'static str,
    values: Value,
}

fn scenarios() -> Vec<Scenario> {
    let all_injector_extras = json!({
        "metrics": {
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": true},
            "grafanaDashboard": {"enabled": true}
        },
        "validatingAdmissionPolicy": {"enabled": true},
        "networkPolicy": {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    });
    let mut cert_manager = all_injector_extras.clone();
    cert_manager["certificates"] = json!({"mode": "certManager"});
    let mut cert_manager_issuer = json!({"certificates": {"mode": "certManager",
        "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}});
    cert_manager_issuer["podDisruptionBudget"] = json!({"minAvailable": "50%"});
    vec![
        Scenario {
            name: "injector-defaults",
            chart: "wg-injector",
            release: "wg-injector",
            values: json!({}),
        },
        Scenario {
            name: "injector-self-managed-everything",
            chart: "wg-injector",
            release: "wg-injector",
            values: all_injector_extras,
        },
        Scenario {
            name: "injector-cert-manager",
            chart: "wg-injector",
            release: "wg-injector",
            values: cert_manager,
        },
        Scenario {
            name: "injector-cert-manager-cluster-issuer",
            chart: "wg-injector",
            release: "canary",
            values: cert_manager_issuer,
        },
        Scenario {
            name: "injector-existing-secret-inject-by-default",
            chart: "wg-injector",
            release: "wg-injector",
            values: json!({
                "certificates": {"mode": "existingSecret",
                    "existingSecret": {"name": "injector-tls", "caBundle": CA_BUNDLE}},
                "webhook": {"injectByDefault": true, "failurePolicy": "Ignore"},
                "validatingAdmissionPolicy": {"enabled": true, "validationActions": ["Warn", "Audit"]},
                "rbac": {"create": false},
                "serviceAccount": {"create": false, "name": "injector"}
            }),
        },
        Scenario {
            name: "gateway-defaults",
            chart: "wg-gateway",
            release: "vpn-gateway",
            values: json!({"server": {"publicEndpoint": "203.0.113.1:51820"}}),
        },
        Scenario {
            name: "gateway-hpa-nodeport-monitoring",
            chart: "wg-gateway",
            release: "vpn-gateway",
            values: json!({
                "server": {"publicEndpoint": "vpn.example.com:31820", "name": "corp",
                           "privateNetworks": ["10.20.0.0/16", "fd00:20::/64"]},
                "service": {"type": "NodePort", "nodePort": 31820,
                            "externalDNS": {"hostname": "vpn.example.com"}},
                "autoscaling": {"enabled": true, "activePeers": {"enabled": true}},
                "vault": {"caConfigMap": "vault-ca"},
                "metrics": {"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}},
                "nodeSelector": {"node.example.com/fast-nic": "true"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "network",
                                 "effect": "NoSchedule"}]
            }),
        },
        Scenario {
            name: "gateway-clusterip-minimal",
            chart: "wg-gateway",
            release: "vpn-gateway",
            values: json!({
                "server": {"publicEndpoint": "[2001:db8::1]:51820", "userspace": false},
                "service": {"type": "ClusterIP"},
                "headless": {"enabled": false},
                "rotation": {"enabled": false},
                "podDisruptionBudget": {"enabled": false},
                "networkPolicy": {"enabled": false},
                "forwarding": "none"
            }),
        },
    ]
}

/// Write a scenario's values as a file Helm 3 reads with `-f` (JSON is YAML).
fn values_file(dir: &Path, scenario: &Scenario) -> std::path::PathBuf {
    let path = dir.join(format!("{}.values.json", scenario.name));
    std::fs::write(&path, scenario.values.to_string()).unwrap();
    path
}

fn render3(scenario: &Scenario, file: &Path, kube_version: &str) -> Vec<Value> {
    Template {
        chart: scenario.chart,
        release: scenario.release,
        namespace: NAMESPACE,
        kube_version,
        values_file: Some(file),
        sets: &[],
    }
    .render()
    .unwrap_or_else(|e| panic!("scenario {}: {e:#}", scenario.name))
}

fn render_defaults(chart: &str, kube_version: &str, sets: &[&str]) -> Vec<Value> {
    Template {
        chart,
        release: "t",
        namespace: NAMESPACE,
        kube_version,
        values_file: None,
        sets,
    }
    .render()
    .unwrap()
}

fn stderr_of(command: &mut Command) -> String {
    let output = charts::run(command).unwrap();
    assert!(
        !output.status.success(),
        "{command:?} was expected to fail but succeeded"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn helm3_lint_strict_passes_for_both_charts_in_every_scenario() {
    let dir = lab::scratch_dir("charts-lint").unwrap();
    let helm = charts::helm3().unwrap();
    for scenario in scenarios() {
        let file = values_file(dir.path(), &scenario);
        let stdout = charts::run_ok(
            Command::new(&helm)
                .args(["lint", "--strict", "--namespace", NAMESPACE])
                .arg(charts::chart_dir(scenario.chart))
                .arg("--values")
                .arg(&file),
        )
        .unwrap_or_else(|e| panic!("scenario {}: {e:#}", scenario.name));
        assert!(
            stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "scenario {}: {stdout}",
            scenario.name
        );
    }
}

#[test]
fn helm4_engine_lints_both_charts_strictly_without_errors() {
    for scenario in scenarios() {
        for kube_version in ["v1.20.2", "v1.33.0"] {
            let report =
                charts::helm4_lint(scenario.chart, &scenario.values, kube_version).unwrap();
            let problems: Vec<&Value> = report["messages"]
                .as_array()
                .unwrap()
                .iter()
                // severity 1 is info (e.g. "icon is recommended"); warnings fail under strict.
                .filter(|m| m["severity"].as_u64() != Some(1))
                .collect();
            assert!(
                problems.is_empty() && report["errors"].as_array().is_none_or(Vec::is_empty),
                "scenario {} on {kube_version}: {report}",
                scenario.name
            );
        }
    }
}

#[test]
fn helm4_engine_renders_exactly_the_objects_helm3_template_renders() {
    let kube_version = charts::helm4_default_kube_version().unwrap();
    assert!(
        kube_version.starts_with("v1."),
        "unexpected Helm 4 version: {kube_version}"
    );
    let dir = lab::scratch_dir("charts-h4").unwrap();
    for scenario in scenarios() {
        let file = values_file(dir.path(), &scenario);
        let from_helm3 = render3(&scenario, &file, &kube_version);
        let Helm4Render::Rendered(manifests) = helm4_render(
            scenario.chart,
            &scenario.values,
            scenario.release,
            NAMESPACE,
        )
        .unwrap() else {
            panic!("Helm 4 refused scenario {}", scenario.name);
        };
        let mut from_helm4 = Vec::new();
        for (path, text) in &manifests {
            from_helm4.extend(split_documents(text).unwrap_or_else(|e| panic!("{path}: {e:#}")));
        }
        let key = |o: &Value| {
            format!(
                "{} {} {}/{}",
                api_version(o),
                kind(o),
                o["metadata"]["namespace"].as_str().unwrap_or("-"),
                name(o)
            )
        };
        let set3: BTreeSet<String> = from_helm3.iter().map(key).collect();
        let set4: BTreeSet<String> = from_helm4.iter().map(key).collect();
        assert!(
            !set3.is_empty(),
            "scenario {} rendered nothing",
            scenario.name
        );
        assert_eq!(set3, set4, "scenario {}: object sets differ", scenario.name);
        assert_eq!(
            from_helm3.len(),
            from_helm4.len(),
            "scenario {}: duplicate objects",
            scenario.name
        );
        for object in &from_helm3 {
            let twin = from_helm4.iter().find(|o| key(o) == key(object)).unwrap();
            assert_eq!(
                object,
                twin,
                "scenario {}: {} differs",
                scenario.name,
                key(object)
            );
        }
    }
}

#[test]
fn every_rendered_manifest_validates_strictly_for_kubernetes_1_25_1_29_and_1_33() {
    let dir = lab::scratch_dir("charts-validate").unwrap();
    let validate = charts::kubernetes_validate().unwrap();
    let mut crd_kinds_seen = BTreeSet::new();
    for kube_version in VALIDATED_VERSIONS {
        let mut files = Vec::new();
        let mut expected_objects = 0;
        for scenario in scenarios() {
            let values = values_file(dir.path(), &scenario);
            let mut schema_checked = Vec::new();
            for object in render3(&scenario, &values, kube_version) {
                if let Some((crd_kind, crd_api)) = CRD_KINDS
                    .iter()
                    .find(|(crd_kind, _)| *crd_kind == kind(&object))
                {
                    // No schema ships for CRDs: check the shape and the apiVersion instead.
                    assert_eq!(
                        api_version(&object),
                        *crd_api,
                        "{crd_kind} in {}",
                        scenario.name
                    );
                    assert!(!name(&object).is_empty(), "{crd_kind} without a name");
                    assert_eq!(object["metadata"]["namespace"], NAMESPACE);
                    assert!(object["spec"].is_object(), "{crd_kind} without a spec");
                    crd_kinds_seen.insert(*crd_kind);
                } else {
                    schema_checked.push(object);
                }
            }
            expected_objects += schema_checked.len();
            let file = dir
                .path()
                .join(format!("{}-{kube_version}.yaml", scenario.name));
            let mut text = String::new();
            for object in &schema_checked {
                text.push_str("---\n");
                text.push_str(&serde_yaml_ng::to_string(object).unwrap());
            }
            std::fs::write(&file, text).unwrap();
            files.push(file);
        }
        // One invocation per Kubernetes version for every scenario (batching keeps it fast).
        let output = charts::run(
            Command::new(&validate)
                .args(["--strict", "-k", kube_version])
                .args(&files),
        )
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let failures: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("INFO")).collect();
        // A kind without a schema only WARNs in kubernetes-validate: we count it as a failure.
        assert!(
            output.status.success() && failures.is_empty(),
            "Kubernetes {kube_version}:\n{}\n{}",
            failures.join("\n"),
            String::from_utf8_lossy(&output.stderr)
        );
        let passed = stdout
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, expected_objects,
            "Kubernetes {kube_version}: not every object was validated:\n{stdout}"
        );
    }
    let all: BTreeSet<&str> = CRD_KINDS.iter().map(|(k, _)| *k).collect();
    assert_eq!(crd_kinds_seen, all, "some CRD kind was never rendered");
}

#[test]
fn kubernetes_1_20_render_has_no_match_conditions_no_admission_policy_and_old_api_versions() {
    let injector = render_defaults(
        "wg-injector",
        "1.20.2",
        &["validatingAdmissionPolicy.enabled=true"],
    );
    let text = serde_json::to_string(&injector).unwrap();
    assert!(!text.contains("matchConditions"), "matchConditions on 1.20");
    assert!(of_kind(&injector, "ValidatingAdmissionPolicy").is_empty());
    assert!(of_kind(&injector, "ValidatingAdmissionPolicyBinding").is_empty());
    assert_eq!(
        api_version(of_kind(&injector, "PodDisruptionBudget")[0]),
        "policy/v1beta1"
    );

    let gateway = render_defaults(
        "wg-gateway",
        "1.20.2",
        &[
            "server.publicEndpoint=203.0.113.1:51820",
            "autoscaling.enabled=true",
        ],
    );
    assert_eq!(
        api_version(of_kind(&gateway, "PodDisruptionBudget")[0]),
        "policy/v1beta1"
    );
    assert_eq!(
        api_version(of_kind(&gateway, "CronJob")[0]),
        "batch/v1beta1"
    );
    assert_eq!(
        api_version(of_kind(&gateway, "HorizontalPodAutoscaler")[0]),
        "autoscaling/v2beta2"
    );
    // Every object uses an API group/version that a 1.20 apiserver serves.
    let served_by_1_20 = [
        "v1",
        "apps/v1",
        "policy/v1beta1",
        "batch/v1beta1",
        "autoscaling/v2beta2",
        "networking.k8s.io/v1",
        "rbac.authorization.k8s.io/v1",
        "admissionregistration.k8s.io/v1",
    ];
    for object in injector.iter().chain(&gateway) {
        assert!(
            served_by_1_20.contains(&api_version(object)),
            "{} {} is not served by Kubernetes 1.20",
            api_version(object),
            kind(object)
        );
    }
}

#[test]
fn newer_clusters_get_match_conditions_and_the_admission_policy_when_enabled() {
    let on_1_27 = render_defaults("wg-injector", "1.27.0", &[]);
    assert!(on_1_27[..]
        .iter()
        .all(|o| o["webhooks"][0]["matchConditions"].is_null()));
    let on_1_29 = render_defaults(
        "wg-injector",
        "1.29.0",
        &["validatingAdmissionPolicy.enabled=true"],
    );
    let webhook = of_kind(&on_1_29, "MutatingWebhookConfiguration")[0];
    let condition = webhook["webhooks"][0]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(condition.contains("wg-injector.io/"), "{condition}");
    assert!(
        of_kind(&on_1_29, "ValidatingAdmissionPolicy").is_empty(),
        "VAP before 1.30"
    );

    let on_1_33 = render_defaults(
        "wg-injector",
        "1.33.0",
        &["validatingAdmissionPolicy.enabled=true"],
    );
    let policy = of_kind(&on_1_33, "ValidatingAdmissionPolicy")[0];
    let binding = of_kind(&on_1_33, "ValidatingAdmissionPolicyBinding")[0];
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert!(policy["spec"]["validations"][0]["expression"]
        .as_str()
        .unwrap()
        .contains("wg-sidecar"));
    // injectByDefault: every Pod must reach the webhook, so no matchConditions filter.
    let by_default = render_defaults("wg-injector", "1.33.0", &["webhook.injectByDefault=true"]);
    let webhook = of_kind(&by_default, "MutatingWebhookConfiguration")[0];
    assert!(webhook["webhooks"][0]["matchConditions"].is_null());
}

#[test]
fn webhook_configuration_carries_the_admission_contract() {
    let objects = render_defaults("wg-injector", "1.33.0", &[]);
    let webhook = &of_kind(&objects, "MutatingWebhookConfiguration")[0]["webhooks"][0];
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["timeoutSeconds"], 5);
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(webhook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(webhook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/mutate");
    let namespace_rules = &webhook["namespaceSelector"]["matchExpressions"];
    assert_eq!(
        namespace_rules[0],
        json!({"key": "wg-injector.io/injection", "operator": "In", "values": ["enabled"]})
    );
    assert_eq!(
        namespace_rules[1],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
               "values": ["kube-system", "kube-public", NAMESPACE]})
    );
    // The injector's own Pods carry the label the objectSelector excludes.
    let deployment = of_kind(&objects, "Deployment")[0];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let excluded = &webhook["objectSelector"]["matchExpressions"][0];
    assert_eq!(excluded["operator"], "NotIn");
    let key = excluded["key"].as_str().unwrap();
    assert_eq!(pod_labels[key], excluded["values"][0]);
    // Restricted Pod Security and a rollout that never lowers capacity.
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        spec["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert!(container["readinessProbe"].is_object() && container["livenessProbe"].is_object());
}

#[test]
fn self_managed_mode_rbac_is_scoped_by_resource_names_and_other_modes_get_only_the_node_read() {
    let objects = render_defaults("wg-injector", "1.33.0", &[]);
    let secret = of_kind(&objects, "Secret")[0];
    let webhook = of_kind(&objects, "MutatingWebhookConfiguration")[0];
    let role = of_kind(&objects, "Role")[0];
    let cluster_role = of_kind(&objects, "ClusterRole")[0];
    let validating = of_kind(&objects, "ValidatingWebhookConfiguration")[0];
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules[0]["resources"], json!(["secrets"]));
    assert_eq!(rules[0]["resourceNames"], json!([name(secret)]));
    assert_eq!(rules[0]["verbs"], json!(["get", "update"]));
    assert_eq!(rules.len(), 1, "only the Secret: no Lease, no create");
    assert_eq!(
        cluster_role["rules"],
        json!([{"apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [name(webhook)], "verbs": ["get", "patch"]},
               {"apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["validatingwebhookconfigurations"],
                "resourceNames": [name(validating)], "verbs": ["get", "patch"]}])
    );
    // The serve arguments name exactly these objects.
    let args =
        &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--cert-mode=self-managed"), "{args:?}");
    assert!(
        args.contains(&format!("--cert-secret={}", name(secret)).as_str()),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--webhook-config={}", name(webhook)).as_str()),
        "{args:?}"
    );

    for mode in [
        "certificates.mode=certManager",
        "certificates.mode=existingSecret",
    ] {
        let objects = render_defaults(
            "wg-injector",
            "1.33.0",
            &[
                mode,
                "certificates.existingSecret.name=tls",
                &format!("certificates.existingSecret.caBundle={CA_BUNDLE}"),
            ],
        );
        for rbac_kind in ["Role", "RoleBinding"] {
            assert!(
                of_kind(&objects, rbac_kind).is_empty(),
                "{rbac_kind} with {mode}"
            );
        }
        // Only the read of the Nodes' kubelet versions (`sidecar-mode: auto`) is left.
        let cluster_roles = of_kind(&objects, "ClusterRole");
        assert_eq!(cluster_roles.len(), 1, "{mode}");
        assert!(name(cluster_roles[0]).ends_with("-nodes"), "{mode}");
        assert_eq!(
            cluster_roles[0]["rules"],
            json!([{"apiGroups": [""], "resources": ["nodes"],
                    "verbs": ["get", "list", "watch"]}]),
            "{mode}"
        );
        assert_eq!(of_kind(&objects, "ClusterRoleBinding").len(), 1, "{mode}");
    }
}

#[test]
fn the_documented_gateway_install_command_renders_a_udp_load_balancer() {
    // Exactly the README/DESIGN command, run from the workspace root.
    let stdout = charts::run_ok(
        Command::new(charts::helm3().unwrap())
            .current_dir(lab::workspace_root())
            .args([
                "template",
                "vpn-gateway",
                "./charts/wg-gateway",
                "--set",
                "server.publicEndpoint=203.0.113.1:51820",
            ]),
    )
    .unwrap();
    let objects = split_documents(&stdout).unwrap();
    let service = of_kind(&objects, "Service")
        .into_iter()
        .find(|s| s["spec"]["type"] == "LoadBalancer")
        .expect("a LoadBalancer Service");
    assert_eq!(service["spec"]["ports"][0]["protocol"], "UDP");
    let container =
        &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN"])
    );
    let args = container["args"].to_string();
    assert!(
        args.contains("--vault-gateway-path=wg/gateways/vpn-gateway"),
        "{args}"
    );
    // server.publicEndpoint reaches the gateway as the flag it publishes in its Vault record
    // (docs/gateway.md, "What the gateway writes at start"), and SIGTERM drains for 5 s inside
    // the Pod's grace period.
    assert!(
        args.contains("\"--endpoints=203.0.113.1:51820\"")
            && args.contains("\"--shutdown-delay=5\""),
        "{args}"
    );
    let pod = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 5,
        "{pod}"
    );
    assert_eq!(of_kind(&objects, "CronJob").len(), 1);
}

#[test]
fn gateway_private_networks_reach_the_gateway_as_a_flag_its_cli_accepts() {
    use clap::Parser as _;
    let gateway_args = |sets: &[&str]| -> Vec<String> {
        let objects = render_defaults("wg-gateway", "1.31.0", sets);
        let container =
            &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let endpoint = "server.publicEndpoint=203.0.113.1:51820";
    let default = gateway_args(&[endpoint]);
    assert!(
        !default.iter().any(|a| a.starts_with("--private-networks")),
        "{default:?}"
    );
    let limited = gateway_args(&[
        endpoint,
        "server.privateNetworks={10.20.0.0/16,fd00:20::/64}",
    ]);
    assert!(
        limited
            .iter()
            .any(|a| a == "--private-networks=10.20.0.0/16,fd00:20::/64"),
        "{limited:?}"
    );
    // The rendered argument list is one the gateway's own command line accepts.
    let argv = std::iter::once("wg-sidecar".to_owned()).chain(limited);
    wg_sidecar::cli::Cli::try_parse_from(argv).unwrap();
}

#[test]
fn gateway_chart_without_public_endpoint_fails_with_a_message_naming_it() {
    let stderr = stderr_of(
        &mut Template {
            chart: "wg-gateway",
            release: "vpn-gateway",
            namespace: NAMESPACE,
            kube_version: "1.33.0",
            values_file: None,
            sets: &[],
        }
        .command()
        .unwrap(),
    );
    assert!(stderr.contains("publicEndpoint is required"), "{stderr}");

    let Helm4Render::Refused(message) =
        helm4_render("wg-gateway", &json!({}), "vpn-gateway", NAMESPACE).unwrap()
    else {
        panic!("Helm 4 rendered the gateway without server.publicEndpoint");
    };
    assert!(message.contains("publicEndpoint"), "{message}");

    // A malformed endpoint is refused too.
    let stderr = stderr_of(
        &mut Template {
            chart: "wg-gateway",
            release: "vpn-gateway",
            namespace: NAMESPACE,
            kube_version: "1.33.0",
            values_file: None,
            sets: &["server.publicEndpoint=203.0.113.1"],
        }
        .command()
        .unwrap(),
    );
    assert!(stderr.contains("server.publicEndpoint"), "{stderr}");
}

#[test]
fn a_value_of_the_wrong_type_fails_schema_validation_in_both_engines() {
    let cases: [(&str, &[&str], Value, &str); 3] = [
        (
            "wg-injector",
            &["replicaCount=two"],
            json!({"replicaCount": "two"}),
            "replicaCount",
        ),
        (
            "wg-injector",
            &["webhook.timeoutSeconds=60"],
            json!({"webhook": {"timeoutSeconds": 60}}),
            "timeoutSeconds",
        ),
        (
            "wg-gateway",
            &[
                "server.publicEndpoint=203.0.113.1:51820",
                "server.listenPort=udp",
            ],
            json!({"server": {"publicEndpoint": "203.0.113.1:51820", "listenPort": "udp"}}),
            "listenPort",
        ),
    ];
    for (chart, sets, values, field) in cases {
        let stderr = stderr_of(
            &mut Template {
                chart,
                release: "t",
                namespace: NAMESPACE,
                kube_version: "1.33.0",
                values_file: None,
                sets,
            }
            .command()
            .unwrap(),
        );
        assert!(
            stderr.contains("schema") && stderr.contains(field),
            "{chart} {sets:?}: {stderr}"
        );
        let Helm4Render::Refused(message) = helm4_render(chart, &values, "t", NAMESPACE).unwrap()
        else {
            panic!("Helm 4 accepted {chart} with {values}");
        };
        assert!(message.contains(field), "{message}");
    }
}

#[test]
fn existing_secret_mode_without_a_ca_bundle_is_refused() {
    let stderr = stderr_of(
        &mut Template {
            chart: "wg-injector",
            release: "t",
            namespace: NAMESPACE,
            kube_version: "1.33.0",
            values_file: None,
            sets: &[
                "certificates.mode=existingSecret",
                "certificates.existingSecret.name=tls",
            ],
        }
        .command()
        .unwrap(),
    );
    assert!(stderr.contains("caBundle"), "{stderr}");
}

/// The args of the injector container and the `config.yaml` of its ConfigMap.
fn injector_args_and_config(objects: &[Value]) -> (Vec<String>, String) {
    let container = &of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let config = of_kind(objects, "ConfigMap")
        .into_iter()
        .find(|c| name(c).ends_with("-config"))
        .expect("the injector's config ConfigMap");
    (
        args,
        config["data"]["config.yaml"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn the_rendered_injector_config_is_accepted_by_the_injectors_own_parser() {
    let dir = lab::scratch_dir("charts-config").unwrap();
    for scenario in scenarios().iter().filter(|s| s.chart == "wg-injector") {
        let file = values_file(dir.path(), scenario);
        let (_, config) = injector_args_and_config(&render3(scenario, &file, "1.33.0"));
        let parsed = wg_injector::config::Config::from_yaml_str(&config)
            .unwrap_or_else(|e| panic!("scenario {}: {e}\n{config}", scenario.name));
        assert!(parsed.gateway(&parsed.default_gateway).is_some());
        assert_eq!(
            parsed.inject_by_default,
            scenario.values["webhook"]["injectByDefault"] == json!(true),
            "scenario {}",
            scenario.name
        );
    }
    // Values a user sets reach the binary's config: a routed corporate profile.
    let objects = render_defaults(
        "wg-injector",
        "1.33.0",
        &[
            "config.gateways.corp.endpoints[0]=vpn.example.com:51820",
            "config.gateways.corp.routes[0]=10.20.0.0/16",
            "config.defaultGateway=corp",
        ],
    );
    let (_, config) = injector_args_and_config(&objects);
    let parsed = wg_injector::config::Config::from_yaml_str(&config).unwrap();
    assert_eq!(parsed.default_gateway, "corp");
    assert_eq!(
        parsed.gateway("corp").unwrap().routes[0].to_string(),
        "10.20.0.0/16"
    );
}

#[test]
fn cluster_networks_set_in_values_reach_the_injectors_config_and_bad_ones_are_refused() {
    use wg_injector::config::{ClusterNetworks, Config};
    let config_of =
        |sets: &[&str]| injector_args_and_config(&render_defaults("wg-injector", "1.33.0", sets)).1;
    let parsed = Config::from_yaml_str(&config_of(&[])).unwrap();
    assert_eq!(
        parsed.cluster,
        ClusterNetworks::default(),
        "empty by default"
    );
    let config = config_of(&[
        "config.cluster.podCIDRs={10.244.0.0/16,fd00:10:244::/56}",
        "config.cluster.serviceCIDRs={10.96.0.0/12}",
        "config.cluster.dns={10.96.0.10}",
        "config.gateways.default.routes={10.20.0.0/16}",
    ]);
    let parsed = Config::from_yaml_str(&config).unwrap_or_else(|e| panic!("{e}\n{config}"));
    assert_eq!(parsed.cluster.pod_cidrs[1].to_string(), "fd00:10:244::/56");
    assert_eq!(parsed.cluster.service_cidrs[0].to_string(), "10.96.0.0/12");
    assert_eq!(parsed.cluster.dns[0].to_string(), "10.96.0.10");
    // Helm cannot know the overlap; the binary refuses the profile at startup, naming both.
    let config = config_of(&[
        "config.cluster.serviceCIDRs={10.96.0.0/12}",
        "config.gateways.default.routes={10.0.0.0/8}",
    ]);
    let err = Config::from_yaml_str(&config).unwrap_err().to_string();
    assert!(
        err.contains("gateways.default.routes: 10.0.0.0/8 covers the cluster's Service network 10.96.0.0/12 (config cluster.serviceCIDRs)"),
        "{err}"
    );
    // A typo in a key and a value that is no CIDR fail the schema, in both engines.
    let cases: [(&[&str], Value, &str); 2] = [
        (
            &["config.cluster.podCidrs={10.244.0.0/16}"],
            json!({"config": {"cluster": {"podCidrs": ["10.244.0.0/16"]}}}),
            "podCidrs",
        ),
        (
            &["config.cluster.serviceCIDRs={kube-dns}"],
            json!({"config": {"cluster": {"serviceCIDRs": ["kube-dns"]}}}),
            "serviceCIDRs",
        ),
    ];
    for (sets, values, field) in cases {
        let stderr = stderr_of(
            &mut Template {
                chart: "wg-injector",
                release: "t",
                namespace: NAMESPACE,
                kube_version: "1.33.0",
                values_file: None,
                sets,
            }
            .command()
            .unwrap(),
        );
        assert!(
            stderr.contains("schema") && stderr.contains(field),
            "{sets:?}: {stderr}"
        );
        let Helm4Render::Refused(message) =
            helm4_render("wg-injector", &values, "t", NAMESPACE).unwrap()
        else {
            panic!("Helm 4 accepted {values}");
        };
        assert!(message.contains(field), "{message}");
    }
}

fn assert_serve_args_parse(sets: &[&str]) {
    use clap::Parser as _;
    let (args, _) = injector_args_and_config(&render_defaults("wg-injector", "1.33.0", sets));
    let command_line = std::iter::once("wg-injector".to_owned()).chain(args.iter().cloned());
    if let Err(e) = wg_injector::cli::Cli::try_parse_from(command_line) {
        panic!("wg-injector rejects the chart's args {args:?}:\n{e}");
    }
}

#[test]
fn the_injector_binary_parses_the_serve_args_of_the_file_certificate_modes() {
    assert_serve_args_parse(&["certificates.mode=certManager"]);
    assert_serve_args_parse(&[
        "certificates.mode=existingSecret",
        "certificates.existingSecret.name=tls",
        &format!("certificates.existingSecret.caBundle={CA_BUNDLE}"),
    ]);
}

#[test]
fn the_injector_binary_parses_the_serve_args_of_the_self_managed_mode() {
    assert_serve_args_parse(&[]);
}

const PLAINTEXT_VAULT: &str = "http://vault.vault.svc:8200";

/// The `args` of the first container of a Pod spec, as strings.
fn container_args(pod_spec: &Value) -> Vec<String> {
    pod_spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The Pod specs of the gateway Deployment and of its rotation CronJob.
fn gateway_pod_specs(objects: &[Value]) -> [(&'static str, &Value); 2] {
    let deployment = &of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"];
    let cronjob =
        &of_kind(objects, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    [("Deployment", deployment), ("CronJob", cronjob)]
}

#[test]
fn both_charts_talk_to_vault_over_https_by_default() {
    let objects = render_defaults(
        "wg-gateway",
        "1.33.0",
        &["server.publicEndpoint=203.0.113.1:51820"],
    );
    for (kind, pod) in gateway_pod_specs(&objects) {
        let args = container_args(pod);
        assert!(
            args.contains(&"--vault-addr=https://vault.vault.svc:8200".to_owned()),
            "{kind}: {args:?}"
        );
    }
    let (_, config) = injector_args_and_config(&render_defaults("wg-injector", "1.33.0", &[]));
    let parsed = wg_injector::config::Config::from_yaml_str(&config).unwrap();
    assert_eq!(parsed.vault.address, "https://vault.vault.svc:8200");
    assert!(!parsed.vault.allow_plaintext && !parsed.vault.is_plaintext());
}

#[test]
fn a_plaintext_vault_address_without_allow_plaintext_fails_rendering_naming_the_value_and_both_fixes(
) {
    let gateway_address = format!("vault.address={PLAINTEXT_VAULT}");
    let injector_address = format!("config.vault.address={PLAINTEXT_VAULT}");
    let cases: [(&str, Vec<&str>, Value, &str); 2] = [
        (
            "wg-gateway",
            vec!["server.publicEndpoint=203.0.113.1:51820", &gateway_address],
            json!({"server": {"publicEndpoint": "203.0.113.1:51820"},
                   "vault": {"address": PLAINTEXT_VAULT}}),
            "vault.",
        ),
        (
            "wg-injector",
            vec![&injector_address],
            json!({"config": {"vault": {"address": PLAINTEXT_VAULT}}}),
            "config.vault.",
        ),
    ];
    for (chart, sets, values, prefix) in cases {
        let wanted = [
            format!("{prefix}address is {PLAINTEXT_VAULT}"),
            "https://".to_owned(),
            format!("--set {prefix}caConfigMap="),
            format!("--set {prefix}allowPlaintext=true"),
        ];
        let stderr = stderr_of(
            &mut Template {
                chart,
                release: "t",
                namespace: NAMESPACE,
                kube_version: "1.33.0",
                values_file: None,
                sets: &sets,
            }
            .command()
            .unwrap(),
        );
        let Helm4Render::Refused(message) = helm4_render(chart, &values, "t", NAMESPACE).unwrap()
        else {
            panic!("Helm 4 rendered {chart} with a plaintext Vault address");
        };
        for text in [&stderr, &message] {
            for w in &wanted {
                assert!(
                    text.contains(w.as_str()),
                    "{chart}: {w:?} missing from: {text}"
                );
            }
        }
    }
}

#[test]
fn a_plaintext_vault_address_with_allow_plaintext_renders_and_the_notes_warn() {
    let gateway = json!({"server": {"publicEndpoint": "203.0.113.1:51820"},
                         "vault": {"address": PLAINTEXT_VAULT, "allowPlaintext": true}});
    let objects = render_defaults(
        "wg-gateway",
        "1.33.0",
        &[
            "server.publicEndpoint=203.0.113.1:51820",
            &format!("vault.address={PLAINTEXT_VAULT}"),
            "vault.allowPlaintext=true",
        ],
    );
    for (kind, pod) in gateway_pod_specs(&objects) {
        let args = container_args(pod);
        assert!(
            args.contains(&format!("--vault-addr={PLAINTEXT_VAULT}")),
            "{kind}: {args:?}"
        );
    }
    let injector =
        json!({"config": {"vault": {"address": PLAINTEXT_VAULT, "allowPlaintext": true}}});
    let (_, config) = injector_args_and_config(&render_defaults(
        "wg-injector",
        "1.33.0",
        &[
            &format!("config.vault.address={PLAINTEXT_VAULT}"),
            "config.vault.allowPlaintext=true",
        ],
    ));
    // The injector's own validation accepts what the chart rendered (and warns at start).
    let parsed = wg_injector::config::Config::from_yaml_str(&config).unwrap();
    assert!(parsed.vault.allow_plaintext && parsed.vault.is_plaintext());

    for (chart, values, key) in [
        ("wg-gateway", &gateway, "vault.address"),
        ("wg-injector", &injector, "config.vault.address"),
    ] {
        let notes = charts::helm4_notes(chart, values, "t", NAMESPACE).unwrap();
        let warning = format!("WARNING: {key} is {PLAINTEXT_VAULT}, plaintext");
        assert!(
            notes.contains(&warning) && notes.contains("in the clear"),
            "{chart}:\n{notes}"
        );
    }
    // Over https there is nothing to warn about.
    let https_gateway = json!({"server": {"publicEndpoint": "203.0.113.1:51820"}});
    for (chart, values) in [("wg-gateway", &https_gateway), ("wg-injector", &json!({}))] {
        let notes = charts::helm4_notes(chart, values, "t", NAMESPACE).unwrap();
        assert!(!notes.contains("WARNING"), "{chart}:\n{notes}");
    }
}

#[test]
fn vault_ca_config_map_is_mounted_into_the_gateway_and_the_rotation_job_as_vault_ca_file() {
    use clap::Parser as _;
    let objects = render_defaults(
        "wg-gateway",
        "1.33.0",
        &[
            "server.publicEndpoint=203.0.113.1:51820",
            "vault.caConfigMap=vault-ca",
        ],
    );
    for (kind, pod) in gateway_pod_specs(&objects) {
        let args = container_args(pod);
        let ca_file = args
            .iter()
            .find_map(|a| a.strip_prefix("--vault-ca-file="))
            .unwrap_or_else(|| panic!("{kind}: no --vault-ca-file in {args:?}"));
        let (dir, file) = ca_file.rsplit_once('/').unwrap();
        assert_eq!(file, "ca.crt", "{kind}");
        let container = &pod["containers"][0];
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{kind}: nothing mounted at {dir}"));
        assert_eq!(mount["readOnly"], true, "{kind}");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(
            volume["configMap"],
            json!({"name": "vault-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}),
            "{kind}"
        );
        // The CA reaches the binary as a flag its command line accepts, not as env as well.
        let env = container["env"].to_string();
        assert!(!env.contains("VAULT_CA_FILE"), "{kind}: {env}");
        let command_line = std::iter::once("wg-sidecar".to_owned()).chain(args.iter().cloned());
        if let Err(e) = wg_sidecar::cli::Cli::try_parse_from(command_line) {
            panic!("{kind}: wg-sidecar rejects {args:?}:\n{e}");
        }
    }
    // Without it: no CA volume and no flag (system roots).
    let objects = render_defaults(
        "wg-gateway",
        "1.33.0",
        &["server.publicEndpoint=203.0.113.1:51820"],
    );
    for (kind, pod) in gateway_pod_specs(&objects) {
        assert!(
            !container_args(pod)
                .iter()
                .any(|a| a.starts_with("--vault-ca-file")),
            "{kind}"
        );
        assert!(!pod["volumes"].to_string().contains("vault-ca"), "{kind}");
    }
}

#[test]
fn the_gateway_sets_ipv6_forwarding_only_when_it_forwards_ipv6_and_listens_for_health_on_both_families(
) {
    let endpoint = "server.publicEndpoint=203.0.113.1:51820";
    let sysctls = |sets: &[&str]| -> Vec<String> {
        let objects = render_defaults("wg-gateway", "1.33.0", sets);
        let pod = gateway_pod_specs(&objects)[0].1;
        pod["securityContext"]["sysctls"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|s| {
                        format!(
                            "{}={}",
                            s["name"].as_str().unwrap(),
                            s["value"].as_str().unwrap()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let v4 = "net.ipv4.ip_forward=1";
    let v6 = "net.ipv6.conf.all.forwarding=1";
    assert_eq!(
        sysctls(&[endpoint]),
        Vec::<String>::new(),
        "IPv4 only, auto"
    );
    assert_eq!(sysctls(&[endpoint, "forwarding=sysctl"]), [v4]);
    let v6_network = "server.privateNetworks={10.20.0.0/16,fd00:20::/64}";
    assert_eq!(
        sysctls(&[endpoint, v6_network]),
        [v6],
        "an IPv6 network, auto"
    );
    assert_eq!(
        sysctls(&[endpoint, "server.ipv6=true"]),
        [v6],
        "an IPv6 pool, auto"
    );
    assert_eq!(
        sysctls(&[endpoint, "server.ipv6=true", "forwarding=sysctl"]),
        [v4, v6]
    );
    assert_eq!(
        sysctls(&[endpoint, v6_network, "forwarding=none"]),
        Vec::<String>::new(),
        "none: the node or the CNI forwards"
    );
    // The health port takes IPv6 and IPv4 probes (kubelet probes the Pod IP of either family).
    let objects = render_defaults("wg-gateway", "1.33.0", &[endpoint]);
    let args = container_args(gateway_pod_specs(&objects)[0].1);
    assert!(
        args.iter().any(|a| a == "--health-addr=[::]:9901"),
        "{args:?}"
    );
}

/// The `MatchConditions` of the sidecar-present policy, by name.
fn policy_conditions(policy: &Value) -> Vec<(String, String)> {
    policy["spec"]["matchConditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["expression"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_sidecar_present_policy_skips_exactly_what_the_injector_skips_and_validates_for_1_30() {
    let sets = [
        "validatingAdmissionPolicy.enabled=true",
        "webhook.injectByDefault=true",
        "webhook.excludeNamespaces={monitoring}",
    ];
    let objects = render_defaults("wg-injector", "1.30.0", &sets);
    let policy = of_kind(&objects, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|p| name(p).ends_with("-sidecar-present"))
        .expect("the sidecar-present policy");
    let webhook = &of_kind(&objects, "MutatingWebhookConfiguration")[0]["webhooks"][0];
    let constraints = &policy["spec"]["matchConstraints"];
    // The webhook's Pods: the same object selector and namespace label...
    assert_eq!(constraints["objectSelector"], webhook["objectSelector"]);
    let expressions = |selector: &Value| selector["matchExpressions"].as_array().unwrap().clone();
    let (policy_ns, webhook_ns) = (
        expressions(&constraints["namespaceSelector"]),
        expressions(&webhook["namespaceSelector"]),
    );
    assert_eq!(policy_ns[0], webhook_ns[0], "the injection label");
    // ...minus every namespace the injector skips (its config's excludedNamespaces) and the
    // webhook's excluded ones.
    let (_, config) = injector_args_and_config(&objects);
    let config = wg_injector::config::Config::from_yaml_str(&config).unwrap();
    let excluded: BTreeSet<&str> = policy_ns[1]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(policy_ns[1]["operator"], "NotIn");
    for namespace in config
        .excluded_namespaces
        .iter()
        .map(String::as_str)
        .chain(["monitoring", NAMESPACE])
    {
        assert!(excluded.contains(namespace), "{namespace}: {excluded:?}");
    }
    // injectByDefault: a hostNetwork Pod that did not ask explicitly is skipped by the
    // injector, so the policy must not match it.
    let conditions = policy_conditions(policy);
    let names: Vec<&str> = conditions.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["injection-requested", "not-host-network-by-default"]
    );
    let host_network = &conditions[1].1;
    assert!(
        host_network.contains("object.spec.hostNetwork")
            && host_network.contains("['wg-injector.io/inject'] == 'true'"),
        "{host_network}"
    );
    // Opt-in only: every matched Pod asked explicitly, so hostNetwork needs no condition (the
    // injector denies an explicit hostNetwork Pod, and so does the policy).
    let opt_in = render_defaults(
        "wg-injector",
        "1.30.0",
        &["validatingAdmissionPolicy.enabled=true"],
    );
    let opt_in_policy = of_kind(&opt_in, "ValidatingAdmissionPolicy")[0];
    assert_eq!(policy_conditions(opt_in_policy).len(), 1);

    // Both renders are valid 1.30 objects.
    let dir = lab::scratch_dir("charts-vap").unwrap();
    let file = dir.path().join("policies.yaml");
    let mut text = String::new();
    for object in [&objects, &opt_in].into_iter().flatten().filter(|o| {
        matches!(
            kind(o),
            "ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding"
        )
    }) {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(object).unwrap());
    }
    std::fs::write(&file, text).unwrap();
    let output = charts::run(
        Command::new(charts::kubernetes_validate().unwrap())
            .args(["--strict", "-k", "1.30.0"])
            .arg(&file),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.lines().all(|l| l.starts_with("INFO")),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches(" passed for resource ").count(), 8);
}

#[test]
fn helm_template_renders_the_self_managed_secret_without_the_ca_and_the_webhooks_without_ca_bundle()
{
    // What Argo CD and Flux apply (`lookup` finds nothing): only the two placeholder keys a
    // kubernetes.io/tls Secret must have, so a sync can never empty the CA the injector wrote
    // (tests/tests/gitops_certs.rs applies this over a running install).
    let objects = render_defaults("wg-injector", "1.30.0", &[]);
    let secret = of_kind(&objects, "Secret")[0];
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["data"], json!({"tls.crt": "", "tls.key": ""}));
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let config = of_kind(&objects, kind)[0];
        assert!(
            config["webhooks"][0]["clientConfig"]
                .get("caBundle")
                .is_none(),
            "{kind}: the injector patches caBundle; a rendered one would be reverted by every sync"
        );
    }
}
