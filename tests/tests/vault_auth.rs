//! Vault Kubernetes auth and per-Pod registration for real: OpenBao's `kubernetes` auth method
//! verifies service-account tokens with this kube-apiserver's `TokenReview`; its roles and
//! policies are the ones the real `wg-sidecar vault bootstrap` writes (an admin token from a file,
//! as in docs/install.md step 2), the gateway record (with its address pool) the one
//! `wg-sidecar keys provision-gateway` writes. The sidecar, configured *only* from what the
//! webhook wrote into a stored Pod (its argument list and its downward-API env, filled in from
//! the stored Pod like a kubelet does), logs in to the one role `wg-pod` with a `TokenRequest`
//! token of the Pod's service account and audience, and registers a key born in the process.
//!
//! What it proves: the Pod's public record lands at `wg/peers/default/shop/web/<uid>` (no private
//! key in it) with a claim naming the Pod; a second load is served without Vault; another
//! service account (same namespace, or the same name in another namespace) logs in to `wg-pod`
//! too but is refused (403) reading or writing web's record and overwriting web's claim, while it
//! may write below its own path; a token of the wrong audience is refused at login with a message
//! that names the login and contains no token.
//!
//! Uses the sidecar's library (`wg_sidecar::cli` → `RunConfig` → `RegisteredKeySource`), the same
//! path `wg-sidecar run` takes before it touches any network interface.
//! Prerequisites: `bash scripts/lab-install.sh` and `cargo build -p wg-sidecar -p wg-injector`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use wg_e2e::control_plane::ControlPlane;
use wg_e2e::injector::start_registered;
use wg_e2e::openbao::OpenBao;
use wg_sidecar::cli::{Cli, Command, KeySourceConfig};
use wg_sidecar::keysource::{KeySource as _, RegisteredKeySource};
use wg_sidecar::registration::PodIdentity;
use wg_sidecar::secret::Secret;
use wg_sidecar::vault::{Vault, VaultAuth, VaultSettings};
use wg_sidecar::SidecarError;

/// Runs the built `wg-sidecar ARGS…` as an operator does in docs/install.md: Vault address and
/// `token` auth from `WG_SIDECAR_*`, the admin token from a file; returns stdout.
fn wg_sidecar(bao: &OpenBao, args: &[&str]) -> String {
    let admin = bao.admin_token_file().unwrap();
    let out = std::process::Command::new(wg_e2e::lab::cargo_binary("wg-sidecar").unwrap())
        .args(["--log-format", "text"])
        .args(args)
        .arg("--vault-token-file")
        .arg(&admin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("WG_SIDECAR_VAULT_ADDR", &bao.addr)
        .env("WG_SIDECAR_VAULT_AUTH", "token")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg-sidecar {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The container's env as flags of `wg-sidecar run`, through clap's own `env = …` names: what
/// clap would read from the environment the kubelet sets. An env var no flag reads fails here.
fn env_as_flags(env: &[(String, String)]) -> Vec<String> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").unwrap();
    env.iter()
        .map(|(name, value)| {
            let arg = run
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| panic!("env {name} is read by no flag of `wg-sidecar run`"));
            format!("--{}={value}", arg.get_long().unwrap())
        })
        .collect()
}

/// A Vault client logging in to `wg-pod` with the service-account token in `jwt_file`.
fn client_with_token(settings: &VaultSettings, jwt_file: &Path) -> Vault {
    let mut settings = settings.clone();
    let VaultAuth::Kubernetes { jwt_file: file, .. } = &mut settings.auth else {
        panic!("the injected sidecar does not use kubernetes auth: {settings:?}");
    };
    jwt_file.clone_into(file);
    Vault::new(settings).unwrap()
}

fn status(e: &SidecarError) -> Option<u16> {
    match e {
        SidecarError::VaultKv { status, .. } => *status,
        _ => None,
    }
}

/// A KV v2 record as the `bao` CLI (root) sees it: (data, version).
fn kv_get(bao: &OpenBao, path: &str) -> (serde_json::Map<String, serde_json::Value>, u64) {
    let out = bao
        .cli(&["kv", "get", "-format=json", &format!("secret/{path}")])
        .unwrap_or_else(|e| panic!("no record at secret/{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["data"]["data"].as_object().unwrap().clone(),
        v["data"]["metadata"]["version"].as_u64().unwrap(),
    )
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Secret::new((*v).to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_logs_in_to_wg_pod_registers_its_own_key_and_no_other_service_account_can_touch_its_record(
) {
    let plane = ControlPlane::start().await.unwrap();
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let admin = plane.admin_client().await.unwrap();

    // OpenBao's reviewer: a service account allowed to create TokenReviews (docs step 1).
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

    // Docs step 2: the roles and policies, then the gateway's keys and public record.
    let written = wg_sidecar(
        &bao,
        &[
            "vault",
            "bootstrap",
            "--gateway",
            "default",
            "--gateway-namespace",
            "vpn",
        ],
    );
    let lines: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pod_role = lines
        .iter()
        .find(|l| l["kind"] == "role" && l["name"] == "wg-pod")
        .unwrap_or_else(|| panic!("bootstrap wrote no wg-pod role: {written}"));
    assert_eq!(pod_role["service_accounts"], serde_json::json!(["*"]));
    assert_eq!(pod_role["namespaces"], serde_json::json!(["*"]));
    wg_sidecar(
        &bao,
        &[
            "keys",
            "provision-gateway",
            "default",
            "--endpoints",
            "127.0.0.1:51820",
            "--allowed-ips",
            "10.0.0.0/8",
            "--pool",
            "10.99.0.0/24",
        ],
    );

    // The injector points sidecars at this OpenBao and at the one role (the chart's
    // `config.vault.roleTemplate: wg-pod`); a Pod of service account `web` in `shop`. The dev
    // OpenBao answers plaintext on loopback, so the config says `allowPlaintext`.
    let config = format!(
        "images:\n  sidecar: localhost/wg-sidecar:e2e\ndefaultGateway: default\ngateways:\n  default:\n    routes: [10.0.0.0/8]\nvault:\n  address: {}\n  allowPlaintext: true\n  tokenAudience: vault\n  roleTemplate: wg-pod\n",
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
    let name = stored.metadata.name.clone().unwrap();
    let uid = stored.metadata.uid.clone().unwrap();
    let spec = stored.spec.clone().unwrap();
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == "wg-sidecar")
        .unwrap_or_else(|| panic!("not injected\n{}", injector.log()));
    let env_names: Vec<&str> = sidecar
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    for wanted in [
        "WG_POD_NAMESPACE",
        "WG_POD_SERVICE_ACCOUNT",
        "WG_POD_NAME",
        "WG_POD_UID",
    ] {
        assert!(
            env_names.contains(&wanted),
            "the injector wrote no {wanted} env on wg-sidecar (registration needs the Pod's \
             namespace, service account, name and UID from the downward API); its env: {env_names:?}"
        );
    }

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

    // The sidecar's command line as the kubelet runs it: the env resolved from the stored Pod
    // (downward API), $(VAR)s expanded; only the token file moves (the kubelet would mount it at
    // the path the injector chose).
    let env = wg_e2e::podman::environment(&stored, sidecar).unwrap();
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let mut argv = vec!["wg-sidecar".to_owned()];
    for arg in sidecar.args.iter().flatten() {
        let arg = wg_injector::inject::expand_kubelet_vars(arg, &vars);
        if arg.starts_with("--vault-token-file=") {
            argv.push(format!("--vault-token-file={}", token_file.display()));
        } else {
            argv.push(arg);
        }
    }
    argv.extend(env_as_flags(&env));
    let Command::Run(run) = Cli::try_parse_from(&argv).unwrap().command else {
        panic!("wg-sidecar container does not run `run`: {argv:?}");
    };
    let run = run.into_config().unwrap();
    let KeySourceConfig::Vault {
        settings,
        kv_mount,
        key_path,
        gateway_path,
        registration,
    } = run.key_source
    else {
        panic!("key source is not vault: {argv:?}");
    };
    assert_eq!(settings.addr, bao.addr);
    assert!(
        matches!(&settings.auth, VaultAuth::Kubernetes { role, .. } if role == "wg-pod"),
        "{settings:?}"
    );
    assert_eq!(key_path, None, "no static identity by default: {argv:?}");
    let (identity, layout) =
        registration.unwrap_or_else(|| panic!("the sidecar would not register: {argv:?}"));
    assert_eq!(
        identity,
        PodIdentity::new("shop", "web", &name, &uid).unwrap()
    );
    assert_eq!(
        (kv_mount.as_str(), gateway_path.as_str()),
        ("secret", "wg/gateways/default")
    );
    let source = RegisteredKeySource::new(
        Arc::new(Vault::new(settings.clone()).unwrap()),
        layout.clone(),
        identity.clone(),
        gateway_path.clone(),
        key_path.clone(),
    );
    source.prepare().await.unwrap();
    let registered = source.load_private().await.unwrap();
    let gateway = source.load_gateway().await.unwrap();
    assert_eq!(gateway.endpoints, ["127.0.0.1:51820"]);
    let pool: Vec<String> = gateway.pool.iter().map(ToString::to_string).collect();
    assert_eq!(pool, ["10.99.0.0/24"]);
    let [address] = registered.addresses.as_slice() else {
        panic!(
            "one address from a one-family pool: {:?}",
            registered.addresses
        );
    };
    assert!(
        gateway.pool[0].contains(&address.addr()) && address.addr().to_string() != "10.99.0.1",
        "{address} is not a Pod address of the pool"
    );
    let psk = registered.preshared_key.clone().expect("a preshared key");

    // The public record, as root reads it: the Pod's identity, public halves, nothing private.
    let record_path = format!("wg/peers/default/shop/web/{uid}");
    let (record, version) = kv_get(&bao, &record_path);
    let text = |k: &str| record.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    assert_eq!(text("public_key"), registered.public_key().unwrap());
    assert_eq!(text("address"), address.to_string());
    assert_eq!(text("preshared_key"), psk.expose());
    assert_eq!(
        (
            text("namespace"),
            text("service_account"),
            text("pod"),
            text("uid")
        ),
        ("shop", "web", name.as_str(), uid.as_str())
    );
    assert!(
        !record.contains_key("private_key"),
        "{record_path}: {record:?}"
    );
    assert!(
        record
            .values()
            .all(|v| v.as_str() != Some(registered.private_key.expose())),
        "the private key was published at {record_path}"
    );
    assert_eq!(version, 1);
    let claim_path = format!(
        "wg/addresses/default/{}",
        wg_sidecar::pool::record_name(address.addr())
    );
    let (claim, _) = kv_get(&bao, &claim_path);
    let claimed = |k: &str| claim.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    assert_eq!(
        (
            claimed("address"),
            claimed("namespace"),
            claimed("service_account"),
            claimed("pod"),
            claimed("uid")
        ),
        (
            address.addr().to_string().as_str(),
            "shop",
            "web",
            name.as_str(),
            uid.as_str()
        ),
        "{claim_path}"
    );

    // Other service accounts (right audience) log in to the same role, but their policy is their
    // own identity's: web's record and claim are out of reach, their own path is not.
    plane.create_namespace("billing", &[]).await.unwrap();
    let foreign = fields(&[
        ("public_key", &registered.public_key().unwrap()),
        ("address", "10.99.0.200/32"),
    ]);
    for (i, (ns, sa)) in [("shop", "other"), ("billing", "web")]
        .into_iter()
        .enumerate()
    {
        let token = plane
            .service_account_token(ns, sa, &audience)
            .await
            .unwrap();
        let file = token_dir.join(format!("{ns}-{sa}"));
        wg_e2e::lab::write_private(&file, token.as_bytes()).unwrap();
        let other = client_with_token(&settings, &file);
        other
            .login()
            .await
            .unwrap_or_else(|e| panic!("{ns}/{sa} could not log in to wg-pod: {e}"));
        let read = other.read("secret", &record_path).await.unwrap_err();
        assert_eq!(
            status(&read),
            Some(403),
            "{ns}/{sa} reading web's record: {read}"
        );
        let write = other
            .write("secret", &record_path, &foreign, None)
            .await
            .unwrap_err();
        assert_eq!(
            status(&write),
            Some(403),
            "{ns}/{sa} writing web's record: {write}"
        );
        let steal = other
            .write("secret", &claim_path, &foreign, None)
            .await
            .unwrap_err();
        assert_eq!(
            status(&steal),
            Some(403),
            "{ns}/{sa} overwriting web's claim: {steal}"
        );
        let web_static = other
            .read("secret", &format!("wg/keys/shop/web/{name}"))
            .await
            .unwrap_err();
        assert_eq!(status(&web_static), Some(403), "{web_static}");
        let own = format!("wg/peers/default/{ns}/{sa}/00000000-0000-4000-8000-{i:012}");
        other
            .write("secret", &own, &foreign, None)
            .await
            .unwrap_or_else(|e| panic!("{ns}/{sa} could not write its own record {own}: {e}"));
        let own_static = other
            .read("secret", &format!("wg/keys/{ns}/{sa}/x"))
            .await
            .unwrap_err();
        assert_eq!(
            status(&own_static),
            Some(404),
            "its own static-identity folder is readable (and empty): {own_static}"
        );
    }
    assert_eq!(
        kv_get(&bao, &record_path).1,
        1,
        "web's record was rewritten"
    );

    // A token of the wrong audience (the Pod's own service account): refused at login, plainly.
    let wrong = plane
        .service_account_token("shop", "web", "not-vault")
        .await
        .unwrap();
    let wrong_file = token_dir.join("wrong-audience");
    wg_e2e::lab::write_private(&wrong_file, wrong.as_bytes()).unwrap();
    let refused = client_with_token(&settings, &wrong_file)
        .login()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, SidecarError::VaultLogin { .. }),
        "{refused}"
    );
    let refused = refused.to_string();
    assert!(
        refused.contains("failed to log in to Vault with kubernetes auth at mount kubernetes"),
        "{refused}"
    );
    assert!(
        refused.contains("audience"),
        "the reason names the audience: {refused}"
    );
    assert!(
        !refused.contains(&wrong) && !refused.contains(&web_token),
        "a token appeared in the error"
    );
    eprintln!("wrong-audience login reads: {refused}");

    // A second load is served from memory: with Vault sealed it still returns the same key,
    // address and preshared key (while a real Vault call fails).
    bao.cli(&["operator", "seal"]).unwrap();
    assert!(source.load_gateway().await.is_err(), "Vault is sealed");
    let again = source.load_private().await.unwrap();
    assert_eq!(again.private_key.expose(), registered.private_key.expose());
    assert_eq!(again.addresses, registered.addresses);
    assert_eq!(again.preshared_key.unwrap().expose(), psk.expose());
}
