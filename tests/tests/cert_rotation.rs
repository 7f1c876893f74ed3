//! Self-managed certificates end to end: two `wg-injector serve --cert-mode self-managed`
//! replicas with only the chart's RBAC (Secret get/update, webhook configuration get/patch, by
//! name) against a real kube-apiserver; short lifetimes so several renewals (and a CA
//! rotation) happen while Pods are created continuously, with zero failed admissions.
//!
//! Prerequisites: `bash scripts/lab-install.sh` and `cargo build -p wg-injector`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, PostParams};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::injector::{webhook_configuration, Certificates, InjectorProcess};
use wg_e2e::lab::free_port;

const NS: &str = "wg-injector";
const SECRET: &str = "wg-injector-tls";
const WEBHOOK_CONFIG: &str = "wg-injector";
const CONFIG: &str = "\
images:
  sidecar: localhost/wg-sidecar:e2e
defaultGateway: default
gateways:
  default:
    routes: [10.0.0.0/8]
vault:
  address: https://openbao.vault.svc:8200
injectByDefault: false
";

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap()
}

/// The chart's self-managed RBAC (templates/rbac.yaml), for service account `wg-injector`.
async fn grant_chart_rbac(plane: &ControlPlane) {
    let client = plane.admin_client().await.unwrap();
    let pp = PostParams::default();
    Api::<Role>::namespaced(client.clone(), NS)
        .create(
            &pp,
            &object(serde_json::json!({
                "metadata": { "name": "wg-injector" },
                "rules": [{ "apiGroups": [""], "resources": ["secrets"],
                            "resourceNames": [SECRET], "verbs": ["get", "update"] }],
            })),
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), NS)
        .create(&pp, &object(serde_json::json!({
            "metadata": { "name": "wg-injector" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "wg-injector" },
            "subjects": [{ "kind": "ServiceAccount", "name": "wg-injector", "namespace": NS }],
        })))
        .await
        .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(
            &pp,
            &object(serde_json::json!({
                "metadata": { "name": "wg-injector-webhook" },
                "rules": [{ "apiGroups": ["admissionregistration.k8s.io"],
                            "resources": ["mutatingwebhookconfigurations"],
                            "resourceNames": [WEBHOOK_CONFIG], "verbs": ["get", "patch"] }],
            })),
        )
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&pp, &object(serde_json::json!({
            "metadata": { "name": "wg-injector-webhook" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "wg-injector-webhook" },
            "subjects": [{ "kind": "ServiceAccount", "name": "wg-injector", "namespace": NS }],
        })))
        .await
        .unwrap();
    // Pre-created empty, as the chart does (so no create permission is needed).
    Api::<Secret>::namespaced(client, NS)
        .create(
            &pp,
            &object(serde_json::json!({
                "metadata": { "name": SECRET },
                "type": "kubernetes.io/tls",
                "data": { "tls.crt": "", "tls.key": "", "ca.crt": "" },
            })),
        )
        .await
        .unwrap();
}

fn pod(name: &str) -> Pod {
    object(serde_json::json!({
        "metadata": { "name": name, "annotations": { "wg-injector.io/inject": "true" } },
        "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "nginx:1.27" }] },
    }))
}

fn is_injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.containers.iter().any(|c| c.name == "wg-sidecar"))
}

fn first_cert(pem: &[u8]) -> String {
    let text = String::from_utf8_lossy(pem);
    let end = text.find("-----END CERTIFICATE-----").unwrap_or(0);
    text[..end].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_self_managed_replicas_share_one_ca_and_pods_keep_being_injected_across_several_renewals(
) {
    let plane = ControlPlane::start().await.unwrap();
    let admin = plane.admin_client().await.unwrap();
    plane.create_namespace(NS, &[]).await.unwrap();
    plane
        .create_namespace("shop", &[("wg-injector.io/injection", "enabled")])
        .await
        .unwrap();
    let token = plane
        .service_account_token(NS, "wg-injector", "https://kubernetes.default.svc")
        .await
        .unwrap();
    grant_chart_rbac(&plane).await;
    let kubeconfig = plane.write_kubeconfig("injector", &token).unwrap();

    // The registration exists before the injector (the chart creates it without caBundle).
    let port_a = free_port().unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    configs
        .create(
            &PostParams::default(),
            &webhook_configuration(
                WEBHOOK_CONFIG,
                &format!("https://127.0.0.1:{port_a}/mutate"),
                "",
            )
            .unwrap(),
        )
        .await
        .unwrap();

    let flags = || {
        Certificates::SelfManaged(
            [
                "--cert-secret=wg-injector-tls",
                "--webhook-config=wg-injector",
                "--service=wg-injector",
                "--namespace=wg-injector",
                "--cert-extra-names=127.0.0.1",
                "--cert-lifetime-seconds=30",
                "--ca-lifetime-seconds=90",
                "--cert-check-seconds=2",
            ]
            .map(String::from)
            .to_vec(),
        )
    };
    let a = InjectorProcess::start_on(port_a, CONFIG, Some(&kubeconfig), &flags()).unwrap();
    let b = InjectorProcess::start(CONFIG, Some(&kubeconfig), &flags()).unwrap();

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let mut leaves = BTreeSet::new();
    let mut cas = BTreeSet::new();
    let (mut created, mut failures) = (0_u32, Vec::new());
    // The apiserver needs the patched caBundle before the first admission succeeds.
    let started = Instant::now();
    let mut warmed_up = false;
    let mut i = 0_u32;
    while started.elapsed() < Duration::from_secs(80) {
        i += 1;
        let secret = secrets.get(SECRET).await.unwrap();
        let data = secret.data.unwrap_or_default();
        if let Some(leaf) = data.get("tls.crt").filter(|b| !b.0.is_empty()) {
            leaves.insert(first_cert(&leaf.0));
        }
        if let Some(ca) = data.get("ca.crt").filter(|b| !b.0.is_empty()) {
            cas.insert(first_cert(&ca.0));
        }
        match pods
            .create(&PostParams::default(), &pod(&format!("web-{i}")))
            .await
        {
            Ok(p) if is_injected(&p) => {
                warmed_up = true;
                created += 1;
            }
            Ok(_) => failures.push(format!("web-{i}: stored without sidecar")),
            Err(e) if !warmed_up && started.elapsed() < Duration::from_secs(15) => {
                let _ = e; // caBundle not yet seen by the apiserver
            }
            Err(e) => failures.push(format!("web-{i}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{created} Pods injected in 80 s, {} serving certificates, {} CAs, {} failed admissions",
        leaves.len(),
        cas.len(),
        failures.len()
    );
    let logs = format!(
        "--- replica a ---\n{}\n--- replica b ---\n{}",
        a.log(),
        b.log()
    );
    assert!(warmed_up, "no Pod was ever injected\n{logs}");
    assert!(
        failures.is_empty(),
        "failed admissions: {failures:#?}\n{logs}"
    );
    assert!(created > 100, "only {created} Pods created");
    assert!(
        leaves.len() >= 3,
        "only {} serving certificates in 80 s with a 30 s lifetime\n{logs}",
        leaves.len()
    );
    assert!(cas.len() >= 2, "the 90 s CA was never rotated\n{logs}");
    // Both replicas served what the Secret holds: each logged the renewals it swapped in.
    for (name, log) in [("a", a.log()), ("b", b.log())] {
        let swaps = log
            .matches("serving renewed self-managed certificate")
            .count();
        assert!(swaps >= 2, "replica {name} swapped {swaps} times\n{log}");
    }
    // One CA in the end: the webhook's caBundle equals the Secret's bundle.
    let secret = secrets.get(SECRET).await.unwrap();
    let bundle = secret.data.unwrap()["ca.crt"].0.clone();
    let config = configs.get(WEBHOOK_CONFIG).await.unwrap();
    let published = config.webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap()
        .0;
    assert_eq!(published, bundle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_mode_without_its_secret_permission_fails_at_start_naming_the_call() {
    let plane = ControlPlane::start().await.unwrap();
    plane.create_namespace(NS, &[]).await.unwrap();
    let token = plane
        .service_account_token(NS, "wg-injector", "https://kubernetes.default.svc")
        .await
        .unwrap();
    let kubeconfig = plane.write_kubeconfig("injector", &token).unwrap();
    let err = InjectorProcess::start(
        CONFIG,
        Some(&kubeconfig),
        &Certificates::SelfManaged(
            [
                "--cert-secret=wg-injector-tls",
                "--webhook-config=wg-injector",
                "--service=wg-injector",
                "--namespace=wg-injector",
            ]
            .map(String::from)
            .to_vec(),
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("get Secret wg-injector/wg-injector-tls"),
        "{err}"
    );
    assert!(err.contains("forbidden"), "{err}");
}
