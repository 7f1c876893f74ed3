//! The sidecar's Vault client against a real OpenBao over TLS (CA file), with Kubernetes auth
//! verified by a real kube-apiserver (`TokenReview`), token auth, KV v2 versions,
//! check-and-set writes and listing. Everything listens on 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod lab;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use lab::{write_secret_file, Kube, OpenBaoTls};
use serde_json::json;
use wg_sidecar::{
    keysource::{KeySource, VaultKeySource},
    secret::Secret,
    vault::{TokenCounters, Vault, VaultAuth, VaultSettings},
    SidecarError,
};

fn secret_map(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Secret::new((*v).to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_auth_over_tls_reads_only_its_own_keys_and_rereads_the_token_file() {
    let kube = tokio::task::spawn_blocking(Kube::start)
        .await
        .unwrap()
        .unwrap();
    let bao = tokio::task::spawn_blocking(OpenBaoTls::start)
        .await
        .unwrap()
        .unwrap();
    let jwt = kube.service_account_token("shop", "web", "vault").unwrap();
    bao.cli(&["auth", "enable", "kubernetes"], None).unwrap();
    bao.cli(
        &[
            "write",
            "auth/kubernetes/config",
            &format!("kubernetes_host={}", kube.url),
            &format!("kubernetes_ca_cert=@{}", kube.ca_file.display()),
            "token_reviewer_jwt=admintoken",
            "disable_local_ca_jwt=true",
        ],
        None,
    )
    .unwrap();
    bao.cli(
        &["policy", "write", "wg-shop-web", "-"],
        Some("path \"secret/data/wg/keys/shop/web\" { capabilities = [\"read\"] }\npath \"secret/data/wg/gateways/corp\" { capabilities = [\"read\"] }\n"),
    )
    .unwrap();
    bao.cli(
        &[
            "write",
            "auth/kubernetes/role/wg-shop-web",
            "bound_service_account_names=web",
            "bound_service_account_namespaces=shop",
            "audience=vault",
            "policies=wg-shop-web",
            "ttl=10m",
        ],
        None,
    )
    .unwrap();
    let (pk, _) = lab::keypair();
    let (gk, gpub) = lab::keypair();
    bao.cli(
        &["kv", "put", "-mount=secret", "wg/keys/shop/web", "-"],
        Some(&json!({"private_key": pk, "address": "10.9.0.2/32,fd00::2/128"}).to_string()),
    )
    .unwrap();
    bao.cli(
        &["kv", "put", "-mount=secret", "wg/keys/shop/web", "-"],
        Some(&json!({"private_key": pk, "address": "10.9.0.2/32,fd00::2/128"}).to_string()),
    )
    .unwrap();
    bao.cli(
        &["kv", "put", "-mount=secret", "wg/keys/shop/other", "-"],
        Some(&json!({"private_key": gk}).to_string()),
    )
    .unwrap();
    bao.cli(
        &["kv", "put", "-mount=secret", "wg/gateways/corp", "-"],
        Some(&json!({"public_key": gpub, "endpoints": "gw.example:51820"}).to_string()),
    )
    .unwrap();

    let dir = lab::scratch();
    let jwt_file = dir.path().join("token");
    write_secret_file(&jwt_file, &jwt);
    let settings = VaultSettings {
        addr: bao.addr.clone(),
        ca_file: Some(bao.ca_file.clone()),
        auth: VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: "wg-shop-web".into(),
            jwt_file: jwt_file.clone(),
        },
    };
    let vault = Arc::new(Vault::new(settings.clone()).unwrap());
    vault.login().await.unwrap();
    let rec = vault.read("secret", "wg/keys/shop/web").await.unwrap();
    assert_eq!(rec.version, 2);
    assert_eq!(rec.data["private_key"].expose(), pk);
    match vault
        .read("secret", "wg/keys/shop/other")
        .await
        .unwrap_err()
    {
        SidecarError::VaultKv { status, .. } => assert_eq!(status, Some(403)),
        other => panic!("expected a 403, got {other}"),
    }

    // The key source turns the records into typed, validated keys.
    let src = VaultKeySource::new(
        vault.clone(),
        "secret".into(),
        "wg/keys/shop/web".into(),
        "wg/gateways/corp".into(),
    );
    let p = src.load_private().await.unwrap();
    assert_eq!(p.addresses.len(), 2);
    assert_eq!(p.version, 2);
    let g = src.load_gateway().await.unwrap();
    assert_eq!(g.public_key, gpub);
    assert_eq!(g.endpoints, vec!["gw.example:51820"]);

    // The token file is re-read at every login: a rotated (here: broken) token fails, a good one works.
    write_secret_file(&jwt_file, "not-a-jwt");
    let err = vault.login().await.unwrap_err();
    assert!(matches!(err, SidecarError::VaultLogin { .. }), "{err}");
    assert!(
        !err.to_string().contains(&jwt),
        "token leaked into an error"
    );
    write_secret_file(&jwt_file, &jwt);
    vault.login().await.unwrap();

    // A wrong audience is refused by the role (the apiserver's TokenReview is real).
    let other = kube
        .service_account_token("shop2", "web", "not-vault")
        .unwrap();
    write_secret_file(&jwt_file, &other);
    assert!(vault.login().await.is_err());

    // Without the CA file the server's certificate is not trusted.
    let untrusted = Vault::new(VaultSettings {
        ca_file: None,
        ..settings
    })
    .unwrap();
    write_secret_file(&jwt_file, &jwt);
    assert!(untrusted.login().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn token_auth_claims_with_check_and_set_lists_and_a_released_claim_can_be_claimed_again() {
    let bao = tokio::task::spawn_blocking(OpenBaoTls::start)
        .await
        .unwrap()
        .unwrap();
    let dir = lab::scratch();
    let token = dir.path().join("token");
    write_secret_file(&token, "devroot");
    let vault = Vault::new(VaultSettings {
        addr: bao.addr.clone(),
        ca_file: Some(bao.ca_file.clone()),
        auth: VaultAuth::Token { file: token },
    })
    .unwrap();
    vault.login().await.unwrap();

    // An address claim (registration's layout): `cas=0` succeeds once, then is a 400.
    let claim_path = "wg/addresses/corp/10.0.0.9";
    let claim = secret_map(&[("address", "10.0.0.9"), ("uid", "u-1")]);
    assert_eq!(
        vault
            .write("secret", claim_path, &claim, Some(0))
            .await
            .unwrap(),
        1
    );
    let conflict = vault
        .write("secret", claim_path, &claim, Some(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            conflict,
            SidecarError::VaultKv {
                status: Some(400),
                ..
            }
        ),
        "{conflict}"
    );

    // A Pod's public record: written, rewritten with cas=current (a restart), listed.
    let data = secret_map(&[("public_key", "abc"), ("address", "10.0.0.9/32")]);
    let web = "wg/peers/corp/shop/web";
    let record = format!("{web}/0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d");
    assert_eq!(
        vault
            .write("secret", &record, &data, Some(0))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        vault
            .write("secret", &record, &data, Some(1))
            .await
            .unwrap(),
        2
    );
    vault
        .write(
            "secret",
            &format!("{web}/7e1d0c2a-0000-4000-8000-000000000002"),
            &data,
            None,
        )
        .await
        .unwrap();
    let mut names = vault.list("secret", web).await.unwrap();
    names.sort();
    assert_eq!(
        names,
        [
            "0b5c7f3e-1111-4a2b-9c3d-2e4f5a6b7c8d",
            "7e1d0c2a-0000-4000-8000-000000000002"
        ]
    );
    assert_eq!(
        vault.list("secret", "wg/peers/corp").await.unwrap(),
        ["shop/"],
        "folders end in /"
    );
    let rec = vault.read("secret", &record).await.unwrap();
    assert_eq!(
        (rec.version, rec.data["address"].expose()),
        (2, "10.0.0.9/32")
    );

    // The gateway releases a gone Pod's record and claim with all their versions: the address
    // can be claimed again with cas=0, starting over at version 1.
    vault.delete_all("secret", &record).await.unwrap();
    vault.delete_all("secret", claim_path).await.unwrap();
    match vault.read("secret", &record).await.unwrap_err() {
        SidecarError::VaultKv { status, .. } => assert_eq!(status, Some(404)),
        other => panic!("expected a 404, got {other}"),
    }
    assert_eq!(
        vault
            .write("secret", claim_path, &claim, Some(0))
            .await
            .unwrap(),
        1
    );
}

/// The accessors of every token OpenBao holds (`bao list auth/token/accessors`).
fn accessors(cli: impl Fn(&[&str]) -> anyhow::Result<String>) -> BTreeSet<String> {
    let out = cli(&["list", "-format=json", "auth/token/accessors"]).unwrap();
    serde_json::from_str(&out).unwrap()
}

/// An AppRole `role` whose tokens read `secret/data/wg/keys/shop/web` only, with `ttl` and
/// `max_ttl`; writes the role-id and secret-id files into `dir`.
fn approle_with_short_tokens(
    cli: impl Fn(&[&str], Option<&str>) -> anyhow::Result<String>,
    dir: &std::path::Path,
    ttl: &str,
    max_ttl: &str,
) -> VaultAuth {
    cli(&["auth", "enable", "approle"], None).unwrap();
    cli(
        &["policy", "write", "wg-shop-web", "-"],
        Some("path \"secret/data/wg/keys/shop/web\" { capabilities = [\"read\"] }\npath \"secret/data/wg/gateways/corp\" { capabilities = [\"read\"] }\n"),
    )
    .unwrap();
    cli(
        &[
            "write",
            "auth/approle/role/web",
            "token_policies=wg-shop-web",
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={max_ttl}"),
        ],
        None,
    )
    .unwrap();
    let role_id = cli(
        &["read", "-field=role_id", "auth/approle/role/web/role-id"],
        None,
    )
    .unwrap();
    let secret_id = cli(
        &[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/web/secret-id",
        ],
        None,
    )
    .unwrap();
    write_secret_file(&dir.join("role_id"), &role_id);
    write_secret_file(&dir.join("secret_id"), &secret_id);
    VaultAuth::AppRole {
        mount: "approle".into(),
        role_id_file: dir.join("role_id"),
        secret_id_file: dir.join("secret_id"),
    }
}

fn count(c: &prometheus_client::metrics::counter::Counter) -> u64 {
    c.get()
}

fn relogins(c: &TokenCounters, reason: &str) -> u64 {
    c.relogins
        .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
        .get()
}

/// Issue 18: a token with `token_ttl=3s` and `token_max_ttl=9s` stays in use past its TTL by
/// renewals, is replaced by a new login near its max TTL (the old one revoked), a 403 re-login
/// revokes the token it replaces, and the end of the renewal revokes the last one: OpenBao's
/// token count is back to where it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_renewed_past_its_ttl_replaced_at_its_max_ttl_and_revoked_at_the_end() {
    let bao = tokio::task::spawn_blocking(OpenBaoTls::start)
        .await
        .unwrap()
        .unwrap();
    let dir = lab::scratch();
    let auth = approle_with_short_tokens(|a, i| bao.cli(a, i), dir.path(), "3s", "9s");
    bao.cli(
        &["kv", "put", "-mount=secret", "wg/keys/shop/web", "-"],
        Some(&json!({"private_key": "x", "address": "10.9.0.2/32"}).to_string()),
    )
    .unwrap();
    let list = |a: &[&str]| bao.cli(a, None);
    let baseline = accessors(list);
    let counters = TokenCounters::default();
    let vault = Arc::new(
        Vault::new(VaultSettings {
            addr: bao.addr.clone(),
            ca_file: Some(bao.ca_file.clone()),
            auth,
        })
        .unwrap()
        .with_token_counters(counters.clone()),
    );
    vault.login().await.unwrap();
    let lease = vault.lease().unwrap();
    assert_eq!((lease.ttl.as_secs(), lease.renewable), (3, true));
    let renewal = vault.renew_in_background();
    let mine = || -> Vec<String> { accessors(list).difference(&baseline).cloned().collect() };
    let first = mine();
    assert_eq!(first.len(), 1, "one token after the login: {first:?}");

    // Past the TTL (twice over): the same token, renewed, still reads.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(6500) {
        assert_eq!(
            mine(),
            first,
            "the token changed or another was left behind after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        count(&counters.renewals) >= 2,
        "renewals: {}",
        count(&counters.renewals)
    );
    vault.read("secret", "wg/keys/shop/web").await.unwrap();

    // Past the max TTL: a new token, the old one revoked (never two at once for long).
    let mut replaced = false;
    while start.elapsed() < Duration::from_secs(14) {
        let now = mine();
        assert!(now.len() <= 1, "a replaced token was left behind: {now:?}");
        if now.len() == 1 && now != first {
            replaced = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(replaced, "the token was not replaced after its max TTL");
    assert!(relogins(&counters, "max_ttl") >= 1);
    assert_eq!(count(&counters.revocation_failures), 0);
    vault.read("secret", "wg/keys/shop/web").await.unwrap();

    // A 403 (the policy refuses the path) logs in again and revokes the token it replaces.
    let before = mine();
    match vault
        .read("secret", "wg/keys/shop/other")
        .await
        .unwrap_err()
    {
        SidecarError::VaultKv { status, .. } => assert_eq!(status, Some(403)),
        other => panic!("expected a 403, got {other}"),
    }
    assert_eq!(relogins(&counters, "forbidden"), 1);
    let after = mine();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "the 403 re-login did not replace the token");

    // The clean exit revokes the last token.
    renewal.finish().await;
    assert_eq!(accessors(list), baseline, "a token outlived the client");
    assert!(
        count(&counters.revocations) >= 3,
        "replaced twice, then revoked on exit"
    );
}

/// Issue 18, the sidecar itself: `wg-sidecar run` with AppRole tokens of `token_ttl=3s` stays
/// logged in with one token past the TTL (renewals on `/metrics`, keys still polled), and after
/// SIGTERM its token is revoked: OpenBao's token count is back to the baseline.
#[test]
fn the_sidecar_renews_its_token_past_the_ttl_and_revokes_it_on_sigterm() {
    lab::require_root();
    let ns = lab::Netns::new("hbvault").unwrap();
    let bao = lab::OpenBao::start(&ns).unwrap();
    let dir = lab::scratch();
    let auth = approle_with_short_tokens(|a, i| bao.cli(a, i), dir.path(), "3s", "1h");
    let (pk, _) = lab::keypair();
    let (_, gpub) = lab::keypair();
    bao.put(
        "wg/keys/shop/web",
        &json!({"private_key": pk, "address": "10.78.0.2/32"}),
    )
    .unwrap();
    bao.put(
        "wg/gateways/corp",
        &json!({"public_key": gpub, "endpoints": "127.0.0.1:51999"}),
    )
    .unwrap();
    let VaultAuth::AppRole {
        role_id_file,
        secret_id_file,
        ..
    } = auth
    else {
        unreachable!()
    };
    let list = |a: &[&str]| bao.cli(a, None);
    let baseline = accessors(list);
    let log = dir.path().join("sidecar.log");
    let args: Vec<String> = [
        "run",
        "--interface",
        &lab::unique("ws"),
        "--gateway",
        "corp",
        "--routes",
        "10.78.0.0/24",
        "--vault-addr",
        &bao.addr,
        "--vault-auth",
        "approle",
        "--vault-role-id-file",
        role_id_file.to_str().unwrap(),
        "--vault-secret-id-file",
        secret_id_file.to_str().unwrap(),
        "--vault-key-path",
        "wg/keys/shop/web",
        "--health-addr",
        "127.0.0.1:9901",
        "--poll-interval",
        "1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut sidecar = lab::spawn_sidecar(&ns, &args, &log).unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        lab::wait_for(Duration::from_secs(15), || log_text()
            .contains("keys loaded")),
        "{}",
        log_text()
    );
    let mine = || -> Vec<String> { accessors(list).difference(&baseline).cloned().collect() };
    let first = mine();
    assert_eq!(first.len(), 1, "{first:?}: {}", log_text());
    // 7 s: more than twice the TTL. The key record changes meanwhile; the poll must still read.
    std::thread::sleep(Duration::from_secs(4));
    bao.put(
        "wg/keys/shop/web",
        &json!({"private_key": pk, "address": "10.78.0.2/32"}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        mine(),
        first,
        "the sidecar's token changed or leaked: {}",
        log_text()
    );
    let metrics = || ns.http_get("http://127.0.0.1:9901/metrics").unwrap().1;
    let m = metrics();
    assert!(
        lab::metric(&m, "wg_sidecar_vault_token_renewals_total").unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert_eq!(
        lab::metric(&m, "wg_sidecar_vault_token_renewal_failures_total"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        lab::metric(&m, "wg_sidecar_vault_login_failures_total"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        lab::metric(&m, "wg_sidecar_vault_read_failures_total"),
        Some(0.0),
        "{m}"
    );

    let (code, took) = sidecar.terminate(Duration::from_secs(5)).unwrap();
    assert_eq!(code, Some(0), "took {took:?}: {}", log_text());
    assert_eq!(
        accessors(list),
        baseline,
        "the token outlived the sidecar: {}",
        log_text()
    );
    assert!(log_text().contains("Vault token revoked"), "{}", log_text());
}
