//! Admission end to end: the real `wg-injector serve` binary on loopback, called by a real
//! kube-apiserver 1.20 through a `MutatingWebhookConfiguration` like the chart's.
//!
//! Prerequisites: `bash scripts/lab-install.sh` (etcd, kube-apiserver, kube-controller-manager)
//! and `cargo build -p wg-injector` (the binary under test). Missing pieces fail the tests.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use std::time::{Duration, Instant};
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::injector::{start_registered, webhook_configuration, InjectorProcess};
use wg_e2e::second_webhook::{SecondWebhook, LATE_CONTAINER};

/// The injector config of these tests: opt-in per Pod, and `nativeSidecars: true` so that only
/// version discovery (1.20 here) can make `sidecar-mode: auto` pick classic sidecars.
const CONFIG: &str = "\
images:
  sidecar: localhost/wg-sidecar:e2e
  pullPolicy: IfNotPresent
defaultGateway: default
gateways:
  default:
    routes: [10.0.0.0/8]
vault:
  address: https://openbao.vault.svc:8200
  tokenAudience: vault
defaults:
  sidecarMode: auto
injectByDefault: false
nativeSidecars: true
";

const LABEL: (&str, &str) = ("wg-injector.io/injection", "enabled");

fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    let annotations: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "shop" }, "annotations": annotations },
        // serviceAccountName is set explicitly: in a normal cluster the ServiceAccount
        // admission plugin sets it before webhooks run; this lab apiserver runs without it.
        "spec": { "serviceAccountName": "web", "containers": [
            { "name": "app", "image": "nginx:1.27", "ports": [{ "containerPort": 8080, "name": "http" }] },
        ]},
    }))
    .unwrap()
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().unwrap();
    let names = |cs: &Option<Vec<k8s_openapi::api::core::v1::Container>>| {
        cs.iter().flatten().map(|c| c.name.clone()).collect()
    };
    (
        names(&spec.init_containers),
        names(&Some(spec.containers.clone())),
    )
}

async fn start_injector(plane: &ControlPlane) -> InjectorProcess {
    start_registered(plane, CONFIG).await.unwrap()
}

/// The spec, labels and annotations of a stored Pod (what the comparison looks at).
fn essence(pod: &Pod) -> serde_json::Value {
    serde_json::json!({
        "labels": pod.metadata.labels,
        "annotations": pod.metadata.annotations,
        "spec": pod.spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_pods_in_labelled_namespaces_are_stored_injected_exactly_like_the_offline_inject_and_everything_else_untouched(
) {
    let plane = ControlPlane::start().await.unwrap();
    let injector = start_injector(&plane).await;
    let client = plane.admin_client().await.unwrap();
    plane.create_namespace("shop", &[LABEL]).await.unwrap();
    plane.create_namespace("plain", &[]).await.unwrap();
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");
    let pp = PostParams::default();

    // 1. Annotated Pod, labelled namespace: injected, and stored exactly as the offline core
    //    injects it (classic mode: this apiserver is 1.20) once the apiserver's defaults apply.
    let submitted = pod("web", &[("wg-injector.io/inject", "true")]);
    let stored = shop.create(&pp, &submitted).await.unwrap();
    let (init, containers) = container_names(&stored);
    assert_eq!(init, ["wg-init"]);
    assert_eq!(containers, ["wg-sidecar", "app"]);
    let labels = stored.metadata.labels.clone().unwrap();
    assert_eq!(labels["wg-injector.io/tunnel"], "default");
    let status = &stored.metadata.annotations.clone().unwrap()["wg-injector.io/status"];
    assert!(status.contains("\"mode\":\"classic\""), "{status}");
    let volumes: Vec<String> = stored
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    assert!(volumes.contains(&"wg-runtime".to_owned()), "{volumes:?}");
    assert!(volumes.contains(&"wg-token".to_owned()), "{volumes:?}");

    let mut offline_config = wg_injector::config::Config::from_yaml_str(CONFIG).unwrap();
    offline_config.native_sidecars = false; // what the injector discovered from /version
    let wg_injector::admission::Verdict::Inject(outcome) =
        wg_injector::admission::evaluate(&submitted, &offline_config)
    else {
        panic!("offline core did not inject");
    };
    // Store the offline result where no webhook runs, so both get the same API defaults.
    let offline_stored = plain.create(&pp, &outcome.pod).await.unwrap();
    assert_eq!(essence(&stored), essence(&offline_stored));

    // 2. Unannotated Pod in a labelled namespace: untouched.
    let bare = shop.create(&pp, &pod("bare", &[])).await.unwrap();
    assert_eq!(container_names(&bare), (vec![], vec!["app".to_owned()]));
    assert!(!bare
        .metadata
        .labels
        .unwrap()
        .contains_key("wg-injector.io/tunnel"));

    // 3. Annotated Pod in an unlabelled namespace: untouched.
    let elsewhere = plain
        .create(&pp, &pod("elsewhere", &[("wg-injector.io/inject", "true")]))
        .await
        .unwrap();
    assert_eq!(
        container_names(&elsewhere),
        (vec![], vec!["app".to_owned()])
    );

    // 4. kube-system: untouched.
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let sys = system
        .create(&pp, &pod("sys", &[("wg-injector.io/inject", "true")]))
        .await
        .unwrap();
    assert_eq!(container_names(&sys), (vec![], vec!["app".to_owned()]));

    // 5. A bad annotation value: creation fails with the injector's message naming it.
    let err = shop
        .create(
            &pp,
            &pod(
                "bad",
                &[
                    ("wg-injector.io/inject", "true"),
                    ("wg-injector.io/mtu", "99999"),
                ],
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("wg-injector.io/mtu"), "{err}");
    assert!(err.contains("99999"), "{err}");
    assert!(shop.get_opt("bad").await.unwrap().is_none());
    drop(injector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_webhook_mutating_after_ours_still_leaves_exactly_one_sidecar() {
    let plane = ControlPlane::start().await.unwrap();
    let injector = start_injector(&plane).await;
    let second = SecondWebhook::start().await.unwrap();
    let client = plane.admin_client().await.unwrap();
    // Webhooks run in name order: "wg-injector" before "zz-second".
    let mut config = webhook_configuration("zz-second", &second.url(), &second.ca_pem).unwrap();
    config.webhooks.as_mut().unwrap()[0].name = "late.example.invalid".into();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    plane.create_namespace("shop", &[LABEL]).await.unwrap();
    let shop: Api<Pod> = Api::namespaced(client, "shop");
    // Wait until the second webhook is active too (a dry-run Pod gets its container).
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = shop.create(&dry, &pod("probe", &[])).await.unwrap();
        if container_names(&p).1.contains(&LATE_CONTAINER.to_owned()) {
            break;
        }
        assert!(Instant::now() < deadline, "second webhook never called");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let stored = shop
        .create(
            &PostParams::default(),
            &pod("web", &[("wg-injector.io/inject", "true")]),
        )
        .await
        .unwrap();
    let (init, containers) = container_names(&stored);
    assert_eq!(
        init.iter().filter(|n| *n == "wg-init").count(),
        1,
        "{init:?}"
    );
    assert_eq!(
        containers.iter().filter(|n| *n == "wg-sidecar").count(),
        1,
        "{containers:?}"
    );
    assert!(
        containers.contains(&LATE_CONTAINER.to_owned()),
        "{containers:?}"
    );
    let calls_before = second.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert!(calls_before >= 2);
    drop(injector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_injector_stopped_labelled_namespaces_are_refused_and_others_are_unaffected() {
    let plane = ControlPlane::start().await.unwrap();
    let mut injector = start_injector(&plane).await;
    plane.create_namespace("shop", &[LABEL]).await.unwrap();
    plane.create_namespace("plain", &[]).await.unwrap();
    injector.stop();
    let client = plane.admin_client().await.unwrap();
    let pp = PostParams::default();
    let err = Api::<Pod>::namespaced(client.clone(), "shop")
        .create(&pp, &pod("web", &[("wg-injector.io/inject", "true")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed calling webhook") && err.contains("inject.wg-injector.io"),
        "{err}"
    );
    let ok = Api::<Pod>::namespaced(client, "plain")
        .create(&pp, &pod("web", &[("wg-injector.io/inject", "true")]))
        .await
        .unwrap();
    assert_eq!(container_names(&ok), (vec![], vec!["app".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pods_created_by_the_controller_manager_come_out_injected() {
    let mut plane = ControlPlane::start().await.unwrap();
    plane.start_controller_manager().unwrap();
    let injector = start_injector(&plane).await;
    plane.create_namespace("shop", &[LABEL]).await.unwrap();
    let client = plane.admin_client().await.unwrap();
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": {
                    "labels": { "app": "web" },
                    "annotations": { "wg-injector.io/inject": "true" },
                },
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [{ "name": "app", "image": "nginx:1.27" }],
                },
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "shop");
    let deadline = Instant::now() + Duration::from_secs(60);
    let list = loop {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap();
        if list.items.len() == 2 {
            break list;
        }
        assert!(
            Instant::now() < deadline,
            "controller manager made {} Pods\n{}",
            list.items.len(),
            plane.controller_manager_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for p in &list.items {
        let (init, containers) = container_names(p);
        assert_eq!(init, ["wg-init"]);
        assert_eq!(containers, ["wg-sidecar", "app"]);
    }
    drop(injector);
}
