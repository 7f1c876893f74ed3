//! The sidecar's Vault client against a real OpenBao over TLS (CA file), with Kubernetes auth
//! verified by a real kube-apiserver (`TokenReview`), token auth, KV v2 versions,
//! check-and-set writes and listing. Everything listens on 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod lab;

use std::{collections::BTreeMap, sync::Arc};

use lab::{write_secret_file, Kube, OpenBaoTls};
use serde_json::json;
use wg_sidecar::{
    keysource::{KeySource, VaultKeySource},
    secret::Secret,
    vault::{Vault, VaultAuth, VaultSettings},
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
