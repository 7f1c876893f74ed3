//! The tunnel label is the injector's, end to end: a real kube-apiserver 1.20 (no
//! ValidatingAdmissionPolicy) calls the real `wg-injector serve` through the mutating webhook
//! and through the chart's own `ValidatingWebhookConfiguration` (rendered by `helm template`
//! for 1.20, pointed at the binary's `/validate` on loopback instead of the Service). And the
//! chart's version gate: the webhook before 1.30 (or with the policy off), the CEL policy from
//! 1.30, each validated by `kubernetes-validate --strict`.
//!
//! Prerequisites: `bash scripts/lab-install.sh` and `cargo build -p wg-injector`. Missing
//! pieces fail the tests.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use wg_e2e::charts::{self, kind, of_kind, Template};
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::injector::start_registered;
use wg_e2e::lab;

const CONFIG: &str = "\
images:
  sidecar: localhost/wg-sidecar:e2e
defaultGateway: default
gateways:
  default:
    routes: [10.0.0.0/8]
  corp:
    routes: [10.20.0.0/16]
vault:
  address: https://openbao.vault.svc:8200
injectByDefault: false
";

const TUNNEL: &str = "wg-injector.io/tunnel";
const VALIDATING_WEBHOOK: &str = "tunnel-label.wg-injector.io";

fn pod(name: &str, labels: &Value, annotations: &Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        // No ServiceAccount admission plugin in this lab apiserver: name it explicitly.
        "spec": { "serviceAccountName": "web",
                  "containers": [{ "name": "app", "image": "nginx:1.27" }] },
    }))
    .unwrap()
}

/// The chart's `ValidatingWebhookConfiguration` as `helm template` renders it for
/// `kube_version`, with `clientConfig` pointed at `url` and trusting `ca_pem`.
fn chart_validating_webhook(kube_version: &str, url: &str, ca_pem: &str) -> Value {
    use base64::Engine as _;
    let objects = Template {
        chart: "wg-injector",
        release: "wg-injector",
        namespace: "wg-injector",
        kube_version,
        values_file: None,
        sets: &[],
    }
    .render()
    .unwrap();
    let mut config = of_kind(&objects, "ValidatingWebhookConfiguration")[0].clone();
    config["webhooks"][0]["clientConfig"] = json!({
        "url": url,
        "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
    });
    config
}

fn tunnel_label(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref()?.get(TUNNEL).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pods_the_injector_injected_carry_the_tunnel_label_and_nobody_moves_it_later() {
    let plane = ControlPlane::start().await.unwrap();
    let mut injector = start_registered(&plane, CONFIG).await.unwrap();
    let client = plane.admin_client().await.unwrap();
    let config: ValidatingWebhookConfiguration = serde_json::from_value(chart_validating_webhook(
        "1.20.2",
        &format!("https://127.0.0.1:{}/validate", injector.port),
        &injector.ca_pem,
    ))
    .unwrap();
    let webhook = &config.webhooks.as_ref().unwrap()[0];
    assert_eq!(webhook.name, VALIDATING_WEBHOOK);
    assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    plane
        .create_namespace("shop", &[("wg-injector.io/injection", "enabled")])
        .await
        .unwrap();
    plane.create_namespace("elsewhere", &[]).await.unwrap();
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "elsewhere");
    let pp = PostParams::default();
    let no_annotations = json!({});

    // Wait until the apiserver calls /validate: a labelled Pod outside any injection-enabled
    // namespace (the mutating webhook never sees it) is refused at CREATE.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let claimant = pod(
        "claimant",
        &json!({ "app": "web", TUNNEL: "default" }),
        &no_annotations,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        match elsewhere.create(&dry, &claimant).await {
            Err(e) if e.to_string().contains(VALIDATING_WEBHOOK) => break e.to_string(),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the apiserver never called /validate: {other:?}\n{}",
                    injector.log()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        refusal.contains("label wg-injector.io/tunnel=\"default\" is set only by wg-injector")
            && refusal.contains("remove the label")
            && refusal.contains("opt in with annotation wg-injector.io/inject"),
        "{refusal}"
    );
    let err = elsewhere
        .create(&pp, &claimant)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(VALIDATING_WEBHOOK), "{err}");
    assert!(elsewhere.get_opt("claimant").await.unwrap().is_none());

    // In an injection-enabled namespace, a Pod that did not opt in is refused by the mutating
    // webhook already (it would leave the Pod untouched, so nothing there set the label).
    let err = shop.create(&pp, &claimant).await.unwrap_err().to_string();
    assert!(
        err.contains("inject.wg-injector.io") && err.contains("is set only by wg-injector"),
        "{err}"
    );

    // A Pod that asks for injection but names its own (other) gateway in the label is refused.
    let err = shop
        .create(
            &pp,
            &pod(
                "own-label",
                &json!({ TUNNEL: "corp" }),
                &json!({ "wg-injector.io/inject": "true" }),
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inject.wg-injector.io")
            && err.contains("label wg-injector.io/tunnel=\"corp\" is set by the injector"),
        "{err}"
    );

    // The injector's Pods are admitted with the injector's label: injected by the webhook, and
    // the offline CLI's output stored where no mutating webhook runs.
    let web = shop
        .create(
            &pp,
            &pod(
                "web",
                &json!({ "app": "web" }),
                &json!({ "wg-injector.io/inject": "true", "wg-injector.io/gateway": "corp" }),
            ),
        )
        .await
        .unwrap();
    assert_eq!(tunnel_label(&web).as_deref(), Some("corp"));
    let mut offline_config = wg_injector::config::Config::from_yaml_str(CONFIG).unwrap();
    offline_config.native_sidecars = false;
    let wg_injector::admission::Verdict::Inject(offline) = wg_injector::admission::evaluate(
        &pod(
            "offline",
            &json!({ "app": "web" }),
            &json!({ "wg-injector.io/inject": "true" }),
        ),
        &offline_config,
    ) else {
        panic!("the offline core did not inject")
    };
    let offline = elsewhere.create(&pp, &offline.pod).await.unwrap();
    assert_eq!(tunnel_label(&offline).as_deref(), Some("default"));
    // Looking injected is not enough: a container named wg-sidecar that is not the injector's.
    let mut fake = pod(
        "fake",
        &json!({ TUNNEL: "default" }),
        &json!({ "wg-injector.io/status": "{}" }),
    );
    fake.spec.as_mut().unwrap().containers[0].name = "wg-sidecar".into();
    let err = elsewhere.create(&pp, &fake).await.unwrap_err().to_string();
    assert!(err.contains(VALIDATING_WEBHOOK), "{err}");

    // On a running Pod the label can be neither changed, added nor removed: `kubectl label
    // --overwrite`, a JSON patch and a merge patch are all refused with the rule's message.
    let kubectl = lab::find_binary("kubectl").unwrap();
    let kubeconfig = plane.admin_kubeconfig().unwrap();
    let output = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "-n",
            "shop",
            "label",
            "--overwrite",
            "pod",
            "web",
            &format!("{TUNNEL}=default"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "kubectl label succeeded");
    assert!(
        stderr.contains(VALIDATING_WEBHOOK)
            && stderr
                .contains("cannot be changed on an existing Pod (from \"corp\" to \"default\")"),
        "{stderr}"
    );
    let bare = elsewhere
        .create(&pp, &pod("bare", &json!({ "app": "web" }), &no_annotations))
        .await
        .unwrap();
    assert_eq!(tunnel_label(&bare), None);
    let add = Patch::Json::<()>(
        serde_json::from_value(json!([
            { "op": "add", "path": "/metadata/labels/wg-injector.io~1tunnel", "value": "default" }
        ]))
        .unwrap(),
    );
    let err = elsewhere
        .patch("bare", &PatchParams::default(), &add)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(VALIDATING_WEBHOOK) && err.contains("cannot be added to an existing Pod"),
        "{err}"
    );
    let remove = Patch::Merge(json!({ "metadata": { "labels": { TUNNEL: null } } }));
    let err = shop
        .patch("web", &PatchParams::default(), &remove)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be removed from an existing Pod"),
        "{err}"
    );
    // An update that leaves the label alone is allowed.
    let annotate = Patch::Merge(json!({ "metadata": { "labels": { "tier": "front" } } }));
    let relabelled = shop
        .patch("web", &PatchParams::default(), &annotate)
        .await
        .unwrap();
    assert_eq!(tunnel_label(&relabelled).as_deref(), Some("corp"));

    // With the injector stopped (failurePolicy Fail), an update of a labelled Pod fails to call
    // the webhook, while an unlabelled Pod's updates are never sent to it and go through.
    injector.stop();
    let err = shop
        .patch("web", &PatchParams::default(), &annotate)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed calling webhook") && err.contains(VALIDATING_WEBHOOK),
        "{err}"
    );
    let touched = elsewhere
        .patch("bare", &PatchParams::default(), &annotate)
        .await
        .unwrap();
    assert_eq!(
        touched
            .metadata
            .labels
            .unwrap()
            .get("tier")
            .map(String::as_str),
        Some("front")
    );
}

fn render(kube_version: &str, sets: &[&str]) -> Vec<Value> {
    Template {
        chart: "wg-injector",
        release: "wg-injector",
        namespace: "wg-system",
        kube_version,
        values_file: None,
        sets,
    }
    .render()
    .unwrap()
}

/// `kubernetes-validate --strict` for `kube_version` on `objects`: every one must pass.
fn validate_strictly(kube_version: &str, objects: &[&Value]) {
    let dir = lab::scratch_dir("tunnel-label-validate").unwrap();
    let file = dir.path().join("objects.yaml");
    let mut text = String::new();
    for object in objects {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(object).unwrap());
    }
    std::fs::write(&file, text).unwrap();
    let output = charts::run(
        Command::new(charts::kubernetes_validate().unwrap())
            .args(["--strict", "-k", kube_version])
            .arg(&file),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let failures: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("INFO")).collect();
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
    assert_eq!(passed, objects.len(), "{stdout}");
}

fn tunnel_label_policy(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| {
            [
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ]
            .contains(&kind(o))
                && charts::name(o).ends_with("-tunnel-label")
        })
        .collect()
}

#[test]
fn before_1_30_the_chart_guards_the_tunnel_label_with_a_webhook_and_from_1_30_with_the_policy() {
    // 1.29: the webhook on /validate, CREATE and UPDATE, labelled Pods only, everywhere but
    // kube-system and the release namespace, Fail, and UPDATEs that keep the label not sent.
    let on_1_29 = render("1.29.0", &["validatingAdmissionPolicy.enabled=true"]);
    assert!(
        tunnel_label_policy(&on_1_29).is_empty(),
        "a VAP before 1.30"
    );
    let webhooks = of_kind(&on_1_29, "ValidatingWebhookConfiguration");
    assert_eq!(webhooks.len(), 1);
    let config = webhooks[0];
    let webhook = &config["webhooks"][0];
    assert_eq!(webhook["name"], VALIDATING_WEBHOOK);
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/validate");
    let mutating = &of_kind(&on_1_29, "MutatingWebhookConfiguration")[0]["webhooks"][0];
    let mut service = mutating["clientConfig"]["service"].clone();
    service["path"] = json!("/validate");
    assert_eq!(
        webhook["clientConfig"]["service"], service,
        "the mutating webhook's Service"
    );
    assert_eq!(
        webhook["rules"][0]["operations"],
        json!(["CREATE", "UPDATE"])
    );
    assert_eq!(webhook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(
        webhook["objectSelector"],
        json!({ "matchExpressions": [{ "key": TUNNEL, "operator": "Exists" }] })
    );
    assert_eq!(
        webhook["namespaceSelector"],
        json!({ "matchExpressions": [{ "key": "kubernetes.io/metadata.name",
                "operator": "NotIn", "values": ["kube-system", "wg-system"] }] })
    );
    assert!(webhook["matchConditions"][0]["expression"]
        .as_str()
        .unwrap()
        .contains("oldObject"));
    // Self-managed certificates: the injector keeps its caBundle, with RBAC for exactly it.
    let args = of_kind(&on_1_29, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .to_string();
    let name = charts::name(config);
    assert!(
        args.contains(&format!("--validating-webhook-config={name}")),
        "{args}"
    );
    let rules = &of_kind(&on_1_29, "ClusterRole")[0]["rules"];
    assert!(
        rules.as_array().unwrap().contains(&json!({
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingwebhookconfigurations"],
            "resourceNames": [name], "verbs": ["get", "patch"]})),
        "{rules}"
    );
    let mut checked: Vec<&Value> = vec![config];
    checked.extend(of_kind(&on_1_29, "ClusterRole"));
    validate_strictly("1.29.0", &checked);

    // Cluster versions before matchConditions (the lab's 1.20) get the webhook without them.
    let on_1_20 = render("1.20.2", &[]);
    let config = of_kind(&on_1_20, "ValidatingWebhookConfiguration")[0];
    assert!(config["webhooks"][0]["matchConditions"].is_null());

    // 1.30 with the policy on: the policy and its binding (always Deny), not the webhook, and
    // the injector is not told to keep a webhook that does not exist.
    let on_1_30 = render(
        "1.30.0",
        &[
            "validatingAdmissionPolicy.enabled=true",
            "validatingAdmissionPolicy.validationActions={Warn}",
        ],
    );
    assert!(of_kind(&on_1_30, "ValidatingWebhookConfiguration").is_empty());
    let policy = tunnel_label_policy(&on_1_30);
    assert_eq!(policy.len(), 2, "the policy and its binding");
    let (vap, binding) = (policy[0], policy[1]);
    assert_eq!(kind(vap), "ValidatingAdmissionPolicy");
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    let constraints = &vap["spec"]["matchConstraints"];
    assert_eq!(
        constraints["resourceRules"][0]["operations"],
        json!(["CREATE", "UPDATE"])
    );
    assert_eq!(constraints["objectSelector"], webhook["objectSelector"]);
    assert_eq!(
        constraints["namespaceSelector"],
        webhook["namespaceSelector"]
    );
    let expressions =
        vap["spec"]["validations"].to_string() + &vap["spec"]["variables"].to_string();
    for needle in [
        "wg-sidecar",
        "wg-injector.io/status",
        "--gateway=",
        "oldObject",
    ] {
        assert!(
            expressions.contains(needle),
            "{needle} not in {expressions}"
        );
    }
    let args = of_kind(&on_1_30, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .to_string();
    assert!(!args.contains("--validating-webhook-config"), "{args}");
    validate_strictly("1.30.0", &policy);

    // 1.30 with the policy off (the default): the webhook guards the label.
    let default_1_30 = render("1.30.0", &[]);
    assert!(tunnel_label_policy(&default_1_30).is_empty());
    assert_eq!(
        of_kind(&default_1_30, "ValidatingWebhookConfiguration").len(),
        1
    );
}
