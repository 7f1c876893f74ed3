//! The rendered `wg-injector` chart installed on a real kube-apiserver 1.20, and the injector
//! run with the chart's own arguments, ServiceAccount and RBAC.
//!
//! `helm template` (Helm 3 CLI, `--kube-version 1.20.2`, default values but the gateway's routes) renders the chart;
//! EVERY rendered object is server-side applied through discovery (`pinned_kind`), so an
//! object the 1.20 apiserver has no API for fails the test. The lab has no kubelet, scheduler
//! or kube-proxy, so the chart's Deployment never runs and its Service has no endpoints. The
//! test therefore:
//! - runs the built `wg-injector` binary itself with the rendered container's `args` and
//!   `env` (`fieldRef: metadata.namespace` resolved to the release namespace), the ConfigMap
//!   "mounted" by writing its keys under a scratch folder in place of the volume's mountPath,
//!   and only `--listen` moved from `0.0.0.0:8443` to a free loopback port;
//! - authenticates it with a `TokenRequest` token of the chart's ServiceAccount, so the
//!   chart's Role/ClusterRole are what let it write its Secret and the webhook's `caBundle`;
//! - adds `WG_INJECTOR_CERT_EXTRA_NAMES=127.0.0.1` (the chart offers no value for extra
//!   certificate names; the binary's env twin of `--cert-extra-names`), so the self-managed
//!   certificate also covers the loopback address;
//! - patches ONLY `clientConfig` of the applied `MutatingWebhookConfiguration` from the
//!   chart's `service` to `url: https://127.0.0.1:PORT/mutate` (and of the tunnel-label
//!   `ValidatingWebhookConfiguration` to `…/validate`); selectors, failurePolicy,
//!   reinvocationPolicy, sideEffects and timeout stay the chart's (asserted), and both
//!   `caBundle`s are written by the injector itself (chart default `certificates.mode:
//!   selfManaged`).
//!
//! Run: `cargo build -p wg-injector && cargo test -p wg-e2e --test chart_install`.
//! Prerequisites: `bash scripts/lab-install.sh` (helm, etcd, kube-apiserver). A missing piece
//! fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use anyhow::{bail, Context as _};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{pinned_kind, Scope};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wg_e2e::charts::{self, chart_command, kind, name, only, Template};
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::lab::{free_port, scratch_dir};
use wg_e2e::process::ChildGuard;

const RELEASE: &str = "wg-injector";
const NAMESPACE: &str = "wg-system";
const KUBE_VERSION: &str = "1.20.2";
const LABEL: (&str, &str) = ("wg-injector.io/injection", "enabled");
const INJECT: (&str, &str) = ("wg-injector.io/inject", "true");
/// The one value an install must set: the chart's default gateway profile has no routes, and
/// the injector refuses a Pod with nothing to tunnel.
const SETS: &[&str] = &["config.gateways.default.routes={10.0.0.0/8}"];
/// The audience of in-cluster ServiceAccount tokens (the apiserver's issuer).
const API_AUDIENCE: &str = "https://kubernetes.default.svc";

fn render() -> Vec<Value> {
    Template {
        chart: "wg-injector",
        release: RELEASE,
        namespace: NAMESPACE,
        kube_version: KUBE_VERSION,
        values_file: None,
        sets: SETS,
    }
    .render()
    .unwrap()
}

fn gvk(object: &Value) -> GroupVersionKind {
    let api_version = charts::api_version(object);
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind(object))
}

/// Server-side apply every object (as `helm install` would create them), through discovery:
/// an object whose kind the apiserver does not serve is an error naming it.
async fn apply_all(client: &kube::Client, objects: &[Value]) -> anyhow::Result<()> {
    let params = PatchParams::apply("wg-e2e-chart-install");
    for object in objects {
        let id = format!(
            "{} {}/{}",
            charts::api_version(object),
            kind(object),
            name(object)
        );
        let (resource, caps) = pinned_kind(client, &gvk(object))
            .await
            .with_context(|| format!("the 1.20 apiserver has no API for {id}"))?;
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let namespace = object["metadata"]["namespace"].as_str();
            if namespace != Some(NAMESPACE) {
                bail!("{id} is namespaced but names namespace {namespace:?}, not the release's");
            }
            Api::namespaced_with(client.clone(), NAMESPACE, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        api.patch(name(object), &params, &Patch::Apply(object))
            .await
            .with_context(|| format!("apply {id}"))?;
        api.get(name(object))
            .await
            .with_context(|| format!("{id} not stored"))?;
    }
    Ok(())
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": annotations },
        // Set explicitly: this lab apiserver runs without the ServiceAccount admission plugin.
        "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "nginx:1.27" }] },
    }))
    .unwrap()
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().unwrap();
    (
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect(),
        spec.containers.iter().map(|c| c.name.clone()).collect(),
    )
}

/// Wait until the apiserver calls the injector for a labelled namespace: a dry-run annotated
/// Pod in `probe` comes back injected (the injector has written the `caBundle` by then).
async fn wait_until_injecting(client: &kube::Client, injector: &mut ChildGuard) {
    let probe: Api<Pod> = Api::namespaced(client.clone(), "probe");
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        assert!(
            injector.is_running(),
            "injector exited\n{}",
            injector.log_tail(4000)
        );
        match probe.create(&dry, &pod("probe", &[INJECT])).await {
            Ok(p) if container_names(&p).1.contains(&"wg-sidecar".to_owned()) => return,
            Ok(_) => "created without the sidecar".clone_into(&mut last),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "the apiserver never got an injected Pod: {last}\n{}",
        injector.log_tail(4000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_chart_applies_to_kubernetes_1_20_and_the_injector_run_with_its_args_and_rbac_injects_only_annotated_pods_of_labelled_namespaces(
) {
    let objects = render();
    let plane = ControlPlane::start().await.unwrap();
    let client = plane.admin_client().await.unwrap();
    // `helm install --create-namespace`: the release namespace exists before the objects.
    plane.create_namespace(NAMESPACE, &[]).await.unwrap();
    apply_all(&client, &objects).await.unwrap();

    // Only clientConfig of the chart's webhook changes: service -> loopback url.
    let rendered_config = only(&objects, "MutatingWebhookConfiguration");
    let config_name = name(rendered_config);
    let [rendered_webhook] = rendered_config["webhooks"].as_array().unwrap().as_slice() else {
        panic!("the chart should register one webhook");
    };
    assert!(rendered_webhook["clientConfig"]["service"].is_object());
    let port = free_port().unwrap();
    let url = format!("https://127.0.0.1:{port}/mutate");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .patch(
            config_name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "webhooks": [{
                "name": rendered_webhook["name"],
                "clientConfig": { "service": null, "url": url },
            }]})),
        )
        .await
        .unwrap();
    let stored = serde_json::to_value(configs.get(config_name).await.unwrap()).unwrap();
    let stored_webhook = &stored["webhooks"][0];
    assert_eq!(stored_webhook["clientConfig"], json!({ "url": url }));
    for (key, value) in rendered_webhook.as_object().unwrap() {
        if key != "clientConfig" {
            assert_eq!(&stored_webhook[key], value, "webhook field {key} changed");
        }
    }
    // The same for the tunnel-label check (labelled Pods only; the injected ones are).
    let rendered_validating = only(&objects, "ValidatingWebhookConfiguration");
    let validating_name = name(rendered_validating);
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    validating
        .patch(
            validating_name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "webhooks": [{
                "name": rendered_validating["webhooks"][0]["name"],
                "clientConfig": { "service": null,
                                  "url": format!("https://127.0.0.1:{port}/validate") },
            }]})),
        )
        .await
        .unwrap();

    // The injector as the chart runs it, with a token of the chart's ServiceAccount.
    let deployment = only(&objects, "Deployment");
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let token = plane
        .service_account_token(NAMESPACE, account, API_AUDIENCE)
        .await
        .unwrap();
    let kubeconfig = plane.write_kubeconfig("chart-injector", &token).unwrap();
    let scratch = scratch_dir("wg-e2e-chart-install-").unwrap();
    let command = chart_command(&objects, scratch.path(), port, &kubeconfig).unwrap();
    let mut injector = ChildGuard::spawn("wg-injector", command, scratch.path()).unwrap();

    plane.create_namespace("probe", &[LABEL]).await.unwrap();
    wait_until_injecting(&client, &mut injector).await;

    // The injector wrote the chart's pre-created Secret and the webhook's caBundle itself.
    let secret_name = only(&objects, "Secret")["metadata"]["name"]
        .as_str()
        .unwrap();
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(secret_name)
        .await
        .unwrap();
    let data = secret.data.unwrap();
    assert!(!data["tls.crt"].0.is_empty() && !data["tls.key"].0.is_empty());
    let ca_bundle = configs.get(config_name).await.unwrap().webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("the injector never patched caBundle");
    assert_eq!(ca_bundle.0, data["ca.crt"].0);
    let validating_ca_bundle = validating
        .get(validating_name)
        .await
        .unwrap()
        .webhooks
        .unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("the injector never patched the validating webhook's caBundle");
    assert_eq!(validating_ca_bundle.0, data["ca.crt"].0);

    plane.create_namespace("shop", &[LABEL]).await.unwrap();
    plane.create_namespace("plain", &[]).await.unwrap();
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");
    let pp = PostParams::default();

    // Annotated Pod, labelled namespace: stored with wg-init and wg-sidecar (classic: 1.20).
    let web = shop.create(&pp, &pod("web", &[INJECT])).await.unwrap();
    let (init, containers) = container_names(&web);
    assert_eq!(init, ["wg-init"]);
    assert_eq!(containers, ["wg-sidecar", "app"]);
    let stored_web = shop.get("web").await.unwrap();
    assert_eq!(container_names(&stored_web), (init, containers));

    // Unannotated Pod, labelled namespace: untouched.
    let bare = shop.create(&pp, &pod("bare", &[])).await.unwrap();
    assert_eq!(container_names(&bare), (vec![], vec!["app".to_owned()]));
    assert!(!bare
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("wg-injector.io/status"));

    // Annotated Pod, unlabelled namespace: untouched.
    let elsewhere = plain
        .create(&pp, &pod("elsewhere", &[INJECT]))
        .await
        .unwrap();
    assert_eq!(
        container_names(&elsewhere),
        (vec![], vec!["app".to_owned()])
    );

    // The chart's own Pod template (role label), annotated, in a labelled namespace: the
    // chart's objectSelector keeps the injector out of its own Pods.
    let mut template = deployment["spec"]["template"].clone();
    template["metadata"]["name"] = "injector-pod".into();
    template["metadata"]["annotations"][INJECT.0] = INJECT.1.into();
    let own: Pod = serde_json::from_value(template).unwrap();
    let own = shop.create(&pp, &own).await.unwrap();
    assert_eq!(
        container_names(&own),
        (vec![], vec!["wg-injector".to_owned()])
    );

    assert!(injector.is_running(), "{}", injector.log_tail(4000));
    drop(injector);
}
