//! Continuous-delivery syncs of the `wg-injector` chart over a running self-managed install:
//! `helm template` (what Argo CD and Flux's kustomize-controller apply; `lookup` finds nothing
//! there) applied with `kubectl apply`, then again with `kubectl apply --server-side
//! --force-conflicts`, over the Secret the injector filled and the `caBundle`s it patched.
//! The CA (`ca.crt`, `ca.key`) and both `caBundle`s must survive each apply, and Pods created
//! continuously meanwhile must all be admitted and injected. Two more cases: `helm upgrade` over
//! the running install (`lookup` renders the stored data, so even the serving pair stays), and
//! syncs of manifests that empty `ca.crt` as older charts did (the injector writes the CA it
//! serves back).
//!
//! The injector runs as in `chart_install.rs`: the built binary with the rendered container's
//! args and env, a token of the chart's ServiceAccount (so only the chart's RBAC), the webhooks'
//! `service` replaced by a loopback `url` (the lab has no Service endpoints). That replacement
//! is made in the manifest itself, so every apply sends the same `clientConfig`. The check
//! interval is 2 s here (`WG_INJECTOR_CERT_CHECK_SECONDS`, chart default 60 s) so the serving
//! pair a sync empties is re-issued within the test.
//!
//! Run: `cargo build -p wg-injector && cargo test -p wg-e2e --test gitops_certs`.
//! Prerequisites: `bash scripts/lab-install.sh` (helm, kubectl, etcd, kube-apiserver).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wg_e2e::charts::{self, chart_command, kind, name, only, run_ok, Template};
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::lab::{find_binary, free_port, scratch_dir};
use wg_e2e::process::ChildGuard;

const RELEASE: &str = "wg-injector";
const NAMESPACE: &str = "wg-system";
const KUBE_VERSION: &str = "1.20.2";
const LABEL: (&str, &str) = ("wg-injector.io/injection", "enabled");
const INJECT: (&str, &str) = ("wg-injector.io/inject", "true");
const SETS: &[&str] = &["config.gateways.default.routes={10.0.0.0/8}"];
const API_AUDIENCE: &str = "https://kubernetes.default.svc";

/// `helm template` output with the webhooks' `service` replaced by `https://127.0.0.1:port`.
fn manifest(port: u16) -> Vec<Value> {
    let mut objects = Template {
        chart: "wg-injector",
        release: RELEASE,
        namespace: NAMESPACE,
        kube_version: KUBE_VERSION,
        values_file: None,
        sets: SETS,
    }
    .render()
    .unwrap();
    for object in &mut objects {
        let path = match kind(object) {
            "MutatingWebhookConfiguration" => "/mutate",
            "ValidatingWebhookConfiguration" => "/validate",
            _ => continue,
        };
        for hook in object["webhooks"].as_array_mut().unwrap() {
            assert!(hook["clientConfig"]["service"].is_object());
            assert!(
                hook["clientConfig"].get("caBundle").is_none(),
                "self-managed: the chart renders no caBundle"
            );
            hook["clientConfig"] = json!({ "url": format!("https://127.0.0.1:{port}{path}") });
        }
    }
    objects
}

/// `kubectl apply -f FILE` (the lab's kubectl, the apiserver's version) plus `extra` flags.
fn kubectl_apply(kubeconfig: &Path, file: &Path, extra: &[&str]) -> String {
    let mut command = Command::new(find_binary("kubectl").unwrap());
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("apply")
        .arg("-f")
        .arg(file)
        .args(extra);
    run_ok(&mut command).unwrap()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": { INJECT.0: INJECT.1 } },
        // Set explicitly: this lab apiserver runs without the ServiceAccount admission plugin.
        "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "nginx:1.27" }] },
    }))
    .unwrap()
}

/// One dry-run admission of an annotated Pod: `Ok` when it comes back injected.
async fn admit(pods: &Api<Pod>, name: &str) -> Result<(), String> {
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match pods.create(&dry, &pod(name)).await {
        Ok(p)
            if p.spec
                .as_ref()
                .unwrap()
                .containers
                .iter()
                .any(|c| c.name == "wg-sidecar") =>
        {
            Ok(())
        }
        Ok(_) => Err(format!("{name}: admitted without the sidecar")),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// What must survive a sync: the CA in the Secret and both webhooks' `caBundle` (PEM text; the
/// CA key only as its length, never printed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trust {
    ca_crt: String,
    ca_key_len: usize,
    ca_key_digest: u64,
    mutating: String,
    validating: String,
}

async fn trust(client: &kube::Client, secret: &str, mutating: &str, validating: &str) -> Trust {
    let data = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(secret)
        .await
        .unwrap()
        .data
        .unwrap_or_default();
    let key = |k: &str| data.get(k).map(|b| b.0.clone()).unwrap_or_default();
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(mutating)
        .await
        .unwrap()
        .webhooks
        .unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .map(|b| b.0)
        .unwrap_or_default();
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get(validating)
        .await
        .unwrap()
        .webhooks
        .unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .map(|b| b.0)
        .unwrap_or_default();
    let ca_key = key("ca.key");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Trust {
        ca_crt: text(key("ca.crt")),
        ca_key_len: ca_key.len(),
        ca_key_digest: {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            ca_key.hash(&mut hasher);
            hasher.finish()
        },
        mutating: text(mutating),
        validating: text(validating),
    }
}

async fn serving_cert(client: &kube::Client, secret: &str) -> Vec<u8> {
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(secret)
        .await
        .unwrap()
        .data
        .unwrap_or_default()
        .get("tls.crt")
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

/// Until a dry-run annotated Pod comes back injected (the injector wrote the `caBundle`).
async fn wait_until_injecting(pods: &Api<Pod>, injector: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = admit(pods, "first").await;
    while last.is_err() && Instant::now() < deadline {
        assert!(injector.is_running(), "{}", injector.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(250)).await;
        last = admit(pods, "first").await;
    }
    last.unwrap_or_else(|e| panic!("never injecting: {e}\n{}", injector.log_tail(4000)));
}

/// Annotated Pods admitted (dry run) one after another until [`Admissions::assert_all_succeeded`].
struct Admissions {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u32, Vec<String>)>,
}

impl Admissions {
    fn start(pods: Api<Pod>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut count, mut failures) = (0_u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    count += 1;
                    if let Err(e) = admit(&pods, &format!("p{count}")).await {
                        failures.push(e);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (count, failures)
            }
        });
        Self { stop, task }
    }

    async fn assert_all_succeeded(self, injector: &ChildGuard) {
        self.stop.store(true, Ordering::Relaxed);
        let (count, failures) = self.task.await.unwrap();
        eprintln!("{count} admissions, {} failed", failures.len());
        assert!(count > 20, "only {count} admissions");
        assert!(
            failures.is_empty(),
            "{} of {count} admissions failed: {failures:?}\n{}",
            failures.len(),
            injector.log_tail(4000)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_template_output_applied_client_side_and_server_side_over_a_running_install_keeps_the_ca_and_every_admission_succeeds(
) {
    let port = free_port().unwrap();
    let objects = manifest(port);
    let secret = name(only(&objects, "Secret")).to_owned();
    let rendered_secret = only(&objects, "Secret");
    assert!(
        rendered_secret["data"].get("ca.crt").is_none()
            && rendered_secret["data"].get("ca.key").is_none(),
        "helm template must never render the CA keys: {}",
        rendered_secret["data"]
    );
    let mutating = name(only(&objects, "MutatingWebhookConfiguration")).to_owned();
    let validating = name(only(&objects, "ValidatingWebhookConfiguration")).to_owned();

    let plane = ControlPlane::start().await.unwrap();
    let client = plane.admin_client().await.unwrap();
    let admin = plane.admin_kubeconfig().unwrap();
    let scratch = scratch_dir("wg-e2e-gitops-certs-").unwrap();
    let file = scratch.path().join("manifest.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({ "apiVersion": "v1", "kind": "List", "items": objects }))
            .unwrap(),
    )
    .unwrap();

    // The first sync creates everything (client-side apply, Argo CD's default).
    plane.create_namespace(NAMESPACE, &[]).await.unwrap();
    kubectl_apply(&admin, &file, &[]);

    let account = only(&objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let token = plane
        .service_account_token(NAMESPACE, account, API_AUDIENCE)
        .await
        .unwrap();
    let kubeconfig = plane.write_kubeconfig("chart-injector", &token).unwrap();
    let mut command = chart_command(&objects, scratch.path(), port, &kubeconfig).unwrap();
    command.env("WG_INJECTOR_CERT_CHECK_SECONDS", "2");
    let mut injector = ChildGuard::spawn("wg-injector", command, scratch.path()).unwrap();

    plane.create_namespace("probe", &[LABEL]).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "probe");
    wait_until_injecting(&pods, &mut injector).await;
    let before = trust(&client, &secret, &mutating, &validating).await;
    assert!(!before.ca_crt.is_empty() && before.ca_key_len > 0);
    assert_eq!(before.mutating, before.ca_crt);
    assert_eq!(before.validating, before.ca_crt);

    // Pods are admitted continuously from here to the end.
    let admissions = Admissions::start(pods.clone());

    for (how, extra) in [
        ("client-side", &[][..]),
        (
            "server-side",
            &[
                "--server-side",
                "--force-conflicts",
                "--field-manager=gitops",
            ][..],
        ),
    ] {
        let served = serving_cert(&client, &secret).await;
        let out = kubectl_apply(&admin, &file, extra);
        assert!(out.contains("secret/"), "{how}: {out}");
        let after = trust(&client, &secret, &mutating, &validating).await;
        assert_eq!(after, before, "{how} apply changed the CA or a caBundle");
        // The sync may have emptied the serving pair: the injector re-issues it from the same CA.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut now = serving_cert(&client, &secret).await;
        while now.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            now = serving_cert(&client, &secret).await;
        }
        assert!(
            !now.is_empty(),
            "{how}: the serving pair was never re-issued"
        );
        eprintln!(
            "{how} apply: serving certificate {}",
            if now == served {
                "unchanged"
            } else {
                "re-issued from the same CA"
            }
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            trust(&client, &secret, &mutating, &validating).await,
            before,
            "{how}: the CA or a caBundle changed after the injector's next check"
        );
    }

    admissions.assert_all_succeeded(&injector).await;
    assert!(injector.is_running(), "{}", injector.log_tail(4000));
    drop(injector);
}

/// `helm upgrade --install` of the chart with the admin kubeconfig, the webhooks' `service`
/// replaced by `https://127.0.0.1:port` in a post-renderer (as `manifest` does).
fn helm_upgrade(kubeconfig: &Path, scratch: &Path, port: u16) -> String {
    let python = charts::lab_python().unwrap();
    let script = scratch.join("loopback-webhooks.py");
    std::fs::write(
        &script,
        format!(
            "#!{}\n\
             import sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d]\n\
             paths = {{'MutatingWebhookConfiguration': '/mutate', 'ValidatingWebhookConfiguration': '/validate'}}\n\
             for d in docs:\n\
             \x20   if d.get('kind') in paths:\n\
             \x20       for hook in d['webhooks']:\n\
             \x20           hook['clientConfig'] = {{'url': 'https://127.0.0.1:{port}' + paths[d['kind']]}}\n\
             sys.stdout.write(yaml.safe_dump_all(docs))\n",
            python.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut command = Command::new(charts::helm3().unwrap());
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["upgrade", "--install", RELEASE])
        .arg(charts::chart_dir("wg-injector"))
        .args(["--namespace", NAMESPACE])
        .arg("--post-renderer")
        .arg(&script);
    for set in SETS {
        command.args(["--set", set]);
    }
    run_ok(&mut command).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrades_over_a_running_install_keep_the_whole_secret_and_every_admission_succeeds() {
    let port = free_port().unwrap();
    let objects = manifest(port);
    let secret = name(only(&objects, "Secret")).to_owned();
    let mutating = name(only(&objects, "MutatingWebhookConfiguration")).to_owned();
    let validating = name(only(&objects, "ValidatingWebhookConfiguration")).to_owned();

    let plane = ControlPlane::start().await.unwrap();
    let client = plane.admin_client().await.unwrap();
    let admin = plane.admin_kubeconfig().unwrap();
    let scratch = scratch_dir("wg-e2e-helm-certs-").unwrap();
    plane.create_namespace(NAMESPACE, &[]).await.unwrap();
    helm_upgrade(&admin, scratch.path(), port);

    let account = only(&objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let token = plane
        .service_account_token(NAMESPACE, account, API_AUDIENCE)
        .await
        .unwrap();
    let kubeconfig = plane.write_kubeconfig("chart-injector", &token).unwrap();
    let mut command = chart_command(&objects, scratch.path(), port, &kubeconfig).unwrap();
    command.env("WG_INJECTOR_CERT_CHECK_SECONDS", "2");
    let mut injector = ChildGuard::spawn("wg-injector", command, scratch.path()).unwrap();
    plane.create_namespace("probe", &[LABEL]).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "probe");
    wait_until_injecting(&pods, &mut injector).await;
    let before = trust(&client, &secret, &mutating, &validating).await;
    let served = serving_cert(&client, &secret).await;
    assert!(!before.ca_crt.is_empty() && !served.is_empty());

    let admissions = Admissions::start(pods.clone());
    for upgrade in 1..=2 {
        // `lookup` finds the filled Secret and renders its data unchanged: nothing changes.
        helm_upgrade(&admin, scratch.path(), port);
        assert_eq!(
            trust(&client, &secret, &mutating, &validating).await,
            before,
            "upgrade {upgrade} changed the CA or a caBundle"
        );
        assert_eq!(
            serving_cert(&client, &secret).await,
            served,
            "upgrade {upgrade} changed the serving certificate"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    admissions.assert_all_succeeded(&injector).await;
    assert!(injector.is_running(), "{}", injector.log_tail(4000));
    drop(injector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_that_empty_the_ca_as_older_charts_did_get_the_served_ca_written_back_and_every_admission_succeeds(
) {
    let port = free_port().unwrap();
    let objects = manifest(port);
    let secret = name(only(&objects, "Secret")).to_owned();
    let mutating = name(only(&objects, "MutatingWebhookConfiguration")).to_owned();
    let validating = name(only(&objects, "ValidatingWebhookConfiguration")).to_owned();
    // What the chart rendered under `helm template` before: an empty ca.crt too.
    let older: Vec<Value> = objects
        .iter()
        .cloned()
        .map(|mut o| {
            if kind(&o) == "Secret" {
                o["data"]["ca.crt"] = "".into();
            }
            o
        })
        .collect();

    let plane = ControlPlane::start().await.unwrap();
    let client = plane.admin_client().await.unwrap();
    let admin = plane.admin_kubeconfig().unwrap();
    let scratch = scratch_dir("wg-e2e-gitops-older-").unwrap();
    let write = |file: &str, items: &[Value]| {
        let path = scratch.path().join(file);
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": items });
        std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
        path
    };
    let (older_file, file) = (
        write("older.json", &older),
        write("manifest.json", &objects),
    );
    plane.create_namespace(NAMESPACE, &[]).await.unwrap();
    kubectl_apply(&admin, &older_file, &[]);

    let account = only(&objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let token = plane
        .service_account_token(NAMESPACE, account, API_AUDIENCE)
        .await
        .unwrap();
    let kubeconfig = plane.write_kubeconfig("chart-injector", &token).unwrap();
    let mut command = chart_command(&objects, scratch.path(), port, &kubeconfig).unwrap();
    command.env("WG_INJECTOR_CERT_CHECK_SECONDS", "2");
    let mut injector = ChildGuard::spawn("wg-injector", command, scratch.path()).unwrap();
    plane.create_namespace("probe", &[LABEL]).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "probe");
    wait_until_injecting(&pods, &mut injector).await;
    let before = trust(&client, &secret, &mutating, &validating).await;
    let admissions = Admissions::start(pods.clone());

    // The older manifest again (it empties ca.crt), then the current one (its client-side
    // apply removes ca.crt, which the last-applied annotation still lists).
    for (how, path) in [
        ("older chart", &older_file),
        ("upgrade to this chart", &file),
    ] {
        kubectl_apply(&admin, path, &[]);
        let lost = trust(&client, &secret, &mutating, &validating).await;
        let start = Instant::now();
        let mut now = lost.clone();
        while now != before && start.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            now = trust(&client, &secret, &mutating, &validating).await;
        }
        assert_eq!(now, before, "{how}: the CA was not written back");
        eprintln!(
            "{how}: ca.crt {} by the sync, written back after {:.1} s",
            if lost.ca_crt.is_empty() {
                "emptied"
            } else {
                "kept"
            },
            start.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            trust(&client, &secret, &mutating, &validating).await,
            before,
            "{how}"
        );
    }
    admissions.assert_all_succeeded(&injector).await;
    assert!(injector.is_running(), "{}", injector.log_tail(4000));
    drop(injector);
}
