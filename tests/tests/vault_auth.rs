//! Vault Kubernetes auth for real: OpenBao's `kubernetes` auth method verifies service-account
//! tokens with this kube-apiserver's `TokenReview`; the sidecar, configured *only* from the
//! argument list the webhook wrote into a stored Pod, logs in with a `TokenRequest` token of
//! the Pod's service account and the audience of the Pod's projected volume, and reads its
//! keys. Another service account's token is refused, and the sidecar says so plainly.
//!
//! Uses the sidecar's library (`wg_sidecar::cli` → `RunConfig` → `VaultKeySource`), the same
//! path `wg-sidecar run` takes before it touches any network interface.
//! Prerequisites: `bash scripts/lab-install.sh` and `cargo build -p wg-injector`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use clap::Parser as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::injector::start_registered;
use wg_e2e::openbao::OpenBao;
use wg_sidecar::cli::{Cli, Command, KeySourceConfig};
use wg_sidecar::keysource::{KeySource as _, VaultKeySource};
use wg_sidecar::vault::{Vault, VaultAuth};

fn wg_genkey() -> String {
    let out = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg genkey failed (install wireguard-tools)"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn wg_pubkey(private: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_sidecar_logs_in_with_its_service_account_token_and_reads_its_keys_while_another_account_is_refused(
) {
    let plane = ControlPlane::start().await.unwrap();
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let admin = plane.admin_client().await.unwrap();

    // OpenBao's reviewer: a service account allowed to create TokenReviews.
    plane.create_namespace("vault", &[]).await.unwrap();
    let reviewer = plane
        .service_account_token("vault", "openbao", "https://kubernetes.default.svc")
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "openbao-tokenreview" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator" },
        "subjects": [{ "kind": "ServiceAccount", "name": "openbao", "namespace": "vault" }],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let reviewer_file = bao
        .private_file("reviewer.jwt", reviewer.as_bytes())
        .unwrap();
    bao.cli(&["auth", "enable", "kubernetes"]).unwrap();
    bao.cli(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", plane.url),
        &format!("kubernetes_ca_cert=@{}", plane.ca_file().display()),
        &format!("token_reviewer_jwt=@{}", reviewer_file.display()),
        "disable_local_ca_jwt=true",
    ])
    .unwrap();
    let policy = bao
        .private_file(
            "wg-shop-web.hcl",
            b"path \"secret/data/wg/keys/shop/web\" { capabilities = [\"read\"] }\n\
              path \"secret/data/wg/gateways/*\" { capabilities = [\"read\"] }\n",
        )
        .unwrap();
    bao.cli(&[
        "policy",
        "write",
        "wg-shop-web",
        &policy.display().to_string(),
    ])
    .unwrap();
    // The role name the injector writes: wg-$(namespace)-$(serviceAccount).
    bao.cli(&[
        "write",
        "auth/kubernetes/role/wg-shop-web",
        "bound_service_account_names=web",
        "bound_service_account_namespaces=shop",
        "audience=vault",
        "policies=wg-shop-web",
        "ttl=10m",
    ])
    .unwrap();
    let private_key = wg_genkey();
    let keys = serde_json::json!({ "private_key": private_key, "address": "10.99.0.2/32" });
    let keys_file = bao
        .private_file("keys.json", keys.to_string().as_bytes())
        .unwrap();
    bao.cli(&[
        "kv",
        "put",
        "secret/wg/keys/shop/web",
        &format!("@{}", keys_file.display()),
    ])
    .unwrap();
    let gateway = serde_json::json!({
        "public_key": wg_pubkey(&wg_genkey()),
        "endpoints": "127.0.0.1:51820",
        "allowed_ips": "10.0.0.0/8",
    });
    let gateway_file = bao
        .private_file("gateway.json", gateway.to_string().as_bytes())
        .unwrap();
    bao.cli(&[
        "kv",
        "put",
        "secret/wg/gateways/default",
        &format!("@{}", gateway_file.display()),
    ])
    .unwrap();

    // The injector points sidecars at this OpenBao; a Pod of service account `web` in `shop`.
    let config = format!(
        "images:\n  sidecar: localhost/wg-sidecar:e2e\ndefaultGateway: default\ngateways:\n  default:\n    routes: [10.0.0.0/8]\nvault:\n  address: {}\n  tokenAudience: vault\n",
        bao.addr
    );
    let injector = start_registered(&plane, &config).await.unwrap();
    plane
        .create_namespace("shop", &[("wg-injector.io/injection", "enabled")])
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web", "annotations": { "wg-injector.io/inject": "true" } },
        "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "app:1" }] },
    }))
    .unwrap();
    let stored = Api::<Pod>::namespaced(admin.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let spec = stored.spec.clone().unwrap();
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == "wg-sidecar")
        .unwrap_or_else(|| panic!("not injected\n{}", injector.log()));

    // The token the kubelet would project: the Pod's service account, the volume's audience.
    let projected = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.clone())
        .expect("a projected service-account token volume");
    let audience = projected.audience.clone().unwrap();
    assert_eq!(audience, "vault");
    let token_dir = bao.dir().join("pod-token");
    std::fs::create_dir(&token_dir).unwrap();
    let token_file = token_dir.join(&projected.path);
    let web_token = plane
        .service_account_token("shop", "web", &audience)
        .await
        .unwrap();
    wg_e2e::lab::write_private(&token_file, web_token.as_bytes()).unwrap();

    // The sidecar's argument list as the kubelet runs it: $(VAR)s expanded; only the token
    // file moves (the kubelet would mount it at the path the injector chose).
    let vars = BTreeMap::from([
        ("WG_POD_NAMESPACE".to_owned(), "shop".to_owned()),
        ("WG_POD_SERVICE_ACCOUNT".to_owned(), "web".to_owned()),
    ]);
    let mut argv = vec!["wg-sidecar".to_owned()];
    for arg in sidecar.args.iter().flatten() {
        let arg = wg_injector::inject::expand_kubelet_vars(arg, &vars);
        if arg.starts_with("--vault-token-file=") {
            argv.push(format!("--vault-token-file={}", token_file.display()));
        } else {
            argv.push(arg);
        }
    }
    let Command::Run(run) = Cli::try_parse_from(&argv).unwrap().command else {
        panic!("wg-sidecar container does not run `run`: {argv:?}");
    };
    let run = run.into_config().unwrap();
    let KeySourceConfig::Vault {
        settings,
        kv_mount,
        key_path,
        gateway_path,
    } = run.key_source
    else {
        panic!("key source is not vault: {argv:?}");
    };
    assert_eq!(settings.addr, bao.addr);
    let source = VaultKeySource::new(
        Arc::new(Vault::new(settings.clone()).unwrap()),
        kv_mount.clone(),
        key_path.clone(),
        gateway_path.clone(),
    );
    source.prepare().await.unwrap();
    let private = source.load_private().await.unwrap();
    assert_eq!(private.public_key().unwrap(), wg_pubkey(&private_key));
    let gateway = source.load_gateway().await.unwrap();
    assert_eq!(gateway.public_key, gateway_public_key_of(&bao));
    assert_eq!(gateway.endpoints, ["127.0.0.1:51820"]);

    // Another service account's token (same namespace, right audience): refused, plainly.
    let other_token = plane
        .service_account_token("shop", "other", &audience)
        .await
        .unwrap();
    let other_file = token_dir.join("other");
    wg_e2e::lab::write_private(&other_file, other_token.as_bytes()).unwrap();
    let mut other_settings = settings;
    let VaultAuth::Kubernetes { jwt_file, .. } = &mut other_settings.auth else {
        panic!("not kubernetes auth");
    };
    *jwt_file = other_file;
    let other = VaultKeySource::new(
        Arc::new(Vault::new(other_settings).unwrap()),
        kv_mount,
        key_path,
        gateway_path,
    );
    let refused = other.prepare().await.unwrap_err().to_string();
    assert!(
        refused.contains("failed to log in to Vault with kubernetes auth at mount kubernetes"),
        "{refused}"
    );
    assert!(refused.contains("status 403"), "{refused}");
    assert!(
        !refused.contains(&other_token),
        "the token must never appear in errors"
    );
    eprintln!("refused login reads: {refused}");
}

fn gateway_public_key_of(bao: &OpenBao) -> String {
    let out = bao
        .cli(&[
            "kv",
            "get",
            "-field=public_key",
            "secret/wg/gateways/default",
        ])
        .unwrap();
    out.trim().to_owned()
}
