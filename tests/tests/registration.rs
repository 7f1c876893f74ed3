//! Per-Pod registration (`wg_sidecar::registration`, `RegisteredKeySource`) against a real
//! OpenBao: the address claim race, a sidecar restart, the failure labels of the
//! `wg_sidecar_registration_failures` metric, and a Vault outage at start.
//!
//! Gateway records are written by the real `wg-sidecar keys provision-gateway` (built binary,
//! admin token from a file). Token auth stands in for Kubernetes auth here; where the policy
//! matters (the race under a create-only claim policy) the token carries the real `wg-pod`
//! policy from `wg_sidecar::bootstrap::plan`. A token cannot evaluate the policy's identity
//! templates, so only its claim lines apply to it: the scoping of records to the caller's own
//! namespace and service account is proven with Kubernetes auth in `vault_auth.rs`.
//! Prerequisites: `bash scripts/lab-install.sh` and `cargo build -p wg-sidecar`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use wg_e2e::openbao::OpenBao;
use wg_sidecar::bootstrap::{plan, BootstrapArgs};
use wg_sidecar::keys::PeerRecord;
use wg_sidecar::keysource::{KeySource as _, RegisteredKeySource};
use wg_sidecar::registration::{self, failure_reason, Claim, Layout, PodIdentity};
use wg_sidecar::vault::{Vault, VaultAuth, VaultSettings};
use wg_sidecar::SidecarError;

/// Pods racing for the last two addresses of a pool.
const RACERS: u32 = 16;

fn layout() -> Layout {
    Layout {
        kv_mount: "secret".into(),
        peers_prefix: "wg/peers".into(),
        addresses_prefix: "wg/addresses".into(),
        verdicts_prefix: "wg/verdicts".into(),
    }
}

/// Pod `name` in `shop`, service account `web`, with a UID made from `n`.
fn pod(name: &str, n: u32) -> PodIdentity {
    PodIdentity::new(
        "shop",
        "web",
        name,
        &format!("7e1d0c2a-0000-4000-8000-{n:012}"),
    )
    .unwrap()
}

/// A Vault client with token auth from `token_file`, logged in.
async fn vault(bao: &OpenBao, token_file: &Path) -> Arc<Vault> {
    let v = Vault::new(VaultSettings {
        addr: bao.addr.clone(),
        ca_file: None,
        auth: VaultAuth::Token {
            file: token_file.to_owned(),
        },
    })
    .unwrap();
    v.login().await.unwrap();
    Arc::new(v)
}

/// `wg-sidecar keys provision-gateway corp --pool POOL` with the admin token from a file.
fn provision_gateway(bao: &OpenBao, pool: &str) {
    let admin = bao.admin_token_file().unwrap();
    let out = std::process::Command::new(wg_e2e::lab::cargo_binary("wg-sidecar").unwrap())
        .args(["--log-format", "text", "keys", "provision-gateway", "corp"])
        .args(["--endpoints", "127.0.0.1:51820", "--pool", pool])
        .args(["--vault-addr", &bao.addr, "--vault-auth", "token"])
        .arg("--vault-token-file")
        .arg(&admin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "provision-gateway failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn source(vault: &Arc<Vault>, pod: &PodIdentity) -> RegisteredKeySource {
    RegisteredKeySource::new(
        vault.clone(),
        layout(),
        pod.clone(),
        "wg/gateways/corp".into(),
        None,
    )
}

/// The claims of gateway `corp`: address record names.
async fn claims(vault: &Vault) -> BTreeSet<String> {
    wg_sidecar::keys::list_opt(vault, "secret", "wg/addresses/corp")
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn record(vault: &Vault, pod: &PodIdentity) -> PeerRecord {
    let path = layout().record_path("corp", pod);
    let rec = vault.read("secret", &path).await.unwrap();
    PeerRecord::from_fields(&path, &rec.data, rec.version).unwrap()
}

/// The real `wg-pod` policy text, as `wg-sidecar vault bootstrap` writes it.
fn wg_pod_policy() -> String {
    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        bootstrap: BootstrapArgs,
    }
    let args = Args::try_parse_from([
        "bootstrap",
        "--gateway",
        "corp",
        "--gateway-namespace",
        "vpn",
        "--vault-addr",
        "http://127.0.0.1:1",
    ])
    .unwrap();
    let plan = plan(&args.bootstrap, "auth_kubernetes_unused");
    let (name, hcl) = &plan.policies[0];
    assert_eq!(name, "wg-pod");
    hcl.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn pods_racing_for_the_last_two_addresses_get_one_each_and_the_rest_are_told_the_pool_is_exhausted(
) {
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let root = vault(&bao, &bao.admin_token_file().unwrap()).await;
    // Claims are create-only under wg-pod: a lost race shows as 400 (cas) or 403 (the claim
    // exists by the time the policy is checked); both must read as "taken, try another".
    let policy = bao
        .private_file("wg-pod.hcl", wg_pod_policy().as_bytes())
        .unwrap();
    bao.cli(&["policy", "write", "wg-pod", &policy.display().to_string()])
        .unwrap();
    let pod_token = bao
        .cli(&[
            "token",
            "create",
            "-policy=wg-pod",
            "-ttl=10m",
            "-field=token",
        ])
        .unwrap();
    let pod_token_file = bao
        .private_file("pod.token", pod_token.trim().as_bytes())
        .unwrap();

    // 10.99.0.0/29: .2–.6 are Pod addresses (.1 is the gateway's); three Pods hold three of them.
    let pool = "10.99.0.0/29".parse().unwrap();
    let mut earlier = BTreeSet::new();
    for n in 0..3 {
        let a = registration::claim(&root, &layout(), "corp", pool, &pod(&format!("old-{n}"), n))
            .await
            .unwrap();
        earlier.insert(a);
    }
    assert_eq!(claims(&root).await.len(), 3);

    let start = Arc::new(tokio::sync::Barrier::new(RACERS as usize));
    let mut tasks = Vec::new();
    for n in 0..RACERS {
        let v = vault(&bao, &pod_token_file).await;
        let start = start.clone();
        let p = pod(&format!("new-{n}"), 100 + n);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = registration::claim(&v, &layout(), "corp", pool, &p).await;
            (p, r)
        }));
    }
    let mut winners = Vec::new();
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            (p, Ok(a)) => winners.push((a, p)),
            (p, Err(e)) => {
                assert!(
                    matches!(e, SidecarError::PoolExhausted { .. }),
                    "{}: {e}",
                    p.name
                );
                assert_eq!(failure_reason(&e), "pool_exhausted");
                let text = e.to_string();
                assert!(
                    text.contains("10.99.0.0/29"),
                    "the message names the pool: {text}"
                );
                exhausted += 1;
            }
        }
    }
    let won: BTreeSet<_> = winners.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        (winners.len(), won.len(), exhausted),
        (2, 2, RACERS - 2),
        "two winners on two addresses: {winners:?}"
    );
    assert!(won.is_disjoint(&earlier), "{won:?} vs {earlier:?}");

    // Vault holds five claims, each naming the Pod that won it.
    assert_eq!(claims(&root).await.len(), 5);
    for (a, p) in &winners {
        let path = layout().claim_path("corp", *a);
        let rec = root.read("secret", &path).await.unwrap();
        let claim = Claim::from_fields(&path, &rec.data).unwrap();
        assert_eq!((&claim.pod, rec.version), (p, 1), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_keeps_its_address_and_overwrites_its_record_with_its_new_public_key() {
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let root = vault(&bao, &bao.admin_token_file().unwrap()).await;
    tokio::task::block_in_place(|| provision_gateway(&bao, "10.98.0.0/24"));
    let web = pod("web-0", 1);

    let first = source(&root, &web).load_private().await.unwrap();
    let rec = record(&root, &web).await;
    assert_eq!(rec.public_key, first.public_key().unwrap());
    assert_eq!(rec.addresses, first.addresses);
    assert_eq!(rec.pod.as_ref(), Some(&web));
    assert_eq!(rec.version, 1);

    // The same Pod (same UID) after a container restart: a new process, a new key.
    let second = source(&root, &web).load_private().await.unwrap();
    assert_ne!(second.private_key.expose(), first.private_key.expose());
    assert_eq!(second.addresses, first.addresses, "the address is kept");
    let rec = record(&root, &web).await;
    assert_eq!(rec.public_key, second.public_key().unwrap());
    assert_eq!(
        rec.preshared_key.as_ref().map(|k| k.expose().to_owned()),
        second.preshared_key.as_ref().map(|k| k.expose().to_owned())
    );
    assert_ne!(
        second.preshared_key.unwrap().expose(),
        first.preshared_key.unwrap().expose()
    );
    assert_eq!(rec.version, 2, "the record was overwritten, not duplicated");
    assert_eq!(
        claims(&root).await.len(),
        1,
        "no second claim for a restart"
    );

    // Another Pod of the same service account is another identity: its own address.
    let other = source(&root, &pod("web-1", 2))
        .load_private()
        .await
        .unwrap();
    assert_ne!(other.addresses, first.addresses);
    assert_eq!(claims(&root).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_failures_are_labelled_pool_exhausted_and_vault_refused() {
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let root = vault(&bao, &bao.admin_token_file().unwrap()).await;
    // 10.97.0.0/30 has one Pod address (.2): the second Pod finds the pool exhausted.
    tokio::task::block_in_place(|| provision_gateway(&bao, "10.97.0.0/30"));
    let first = source(&root, &pod("web-0", 1))
        .load_private()
        .await
        .unwrap();
    assert_eq!(first.addresses[0].to_string(), "10.97.0.2/32");
    let e = source(&root, &pod("web-1", 2))
        .load_private()
        .await
        .unwrap_err();
    assert_eq!(failure_reason(&e), "pool_exhausted", "{e}");
    assert!(
        e.to_string()
            .contains("address pool 10.97.0.0/30 is exhausted"),
        "{e}"
    );

    // A token whose policy reads the gateway record but may not publish a Pod's record, and a
    // token Vault does not know: both refused by Vault, neither token in the message.
    let policy = bao
        .private_file(
            "gateways-only.hcl",
            b"path \"secret/data/wg/gateways/*\" { capabilities = [\"read\"] }\n",
        )
        .unwrap();
    bao.cli(&[
        "policy",
        "write",
        "gateways-only",
        &policy.display().to_string(),
    ])
    .unwrap();
    let limited = bao
        .cli(&[
            "token",
            "create",
            "-policy=gateways-only",
            "-ttl=10m",
            "-field=token",
        ])
        .unwrap();
    let limited = limited.trim().to_owned();
    let unknown = "s.wg-e2e-no-such-token-3b8d".to_owned();
    for (what, token) in [("limited", &limited), ("unknown", &unknown)] {
        let file = bao
            .private_file(&format!("{what}.token"), token.as_bytes())
            .unwrap();
        let v = Arc::new(
            Vault::new(VaultSettings {
                addr: bao.addr.clone(),
                ca_file: None,
                auth: VaultAuth::Token { file },
            })
            .unwrap(),
        );
        let src = source(&v, &pod("web-2", 3));
        src.prepare().await.unwrap();
        let e = src.load_private().await.unwrap_err();
        assert_eq!(failure_reason(&e), "vault_refused", "{what}: {e}");
        let text = e.to_string();
        assert!(text.contains("status 403"), "{what}: {text}");
        assert!(
            !text.contains(token.as_str()),
            "{what}: the token is in the message"
        );
    }
    assert_eq!(
        claims(&root).await.len(),
        1,
        "a refused Pod claimed nothing"
    );
}

/// Calls `load_private` until it succeeds (as the sidecar's start loop does, every 200 ms here),
/// returning the record and the failure labels seen on the way.
async fn register_with_retry(
    src: &RegisteredKeySource,
    within: Duration,
) -> (
    wg_sidecar::keysource::PrivateRecord,
    Vec<(&'static str, String)>,
) {
    let deadline = Instant::now() + within;
    let mut failures = Vec::new();
    loop {
        match src.load_private().await {
            Ok(p) => return (p, failures),
            Err(e) => {
                failures.push((failure_reason(&e), e.to_string()));
                assert!(
                    Instant::now() < deadline,
                    "no registration within {within:?}: {failures:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_vault_is_down_registration_fails_as_vault_unavailable_and_succeeds_once_vault_is_back(
) {
    let mut bao = tokio::task::spawn_blocking(OpenBao::start_persistent)
        .await
        .unwrap()
        .unwrap();
    tokio::task::block_in_place(|| provision_gateway(&bao, "10.96.0.0/24"));
    let admin: PathBuf = bao.admin_token_file().unwrap();
    let admin_token = std::fs::read_to_string(&admin).unwrap();
    let v = vault(&bao, &admin).await;
    let web = pod("web-0", 1);
    let src = source(&v, &web);

    // Vault's process is gone: a clear "unavailable", naming what failed, no token.
    bao.stop();
    let e = src.load_private().await.unwrap_err();
    assert_eq!(failure_reason(&e), "vault_unavailable", "{e}");
    let text = e.to_string();
    assert!(
        text.contains("failed to read Vault KV v2 secret/wg/gateways/corp"),
        "{text}"
    );
    assert!(
        !text.contains(admin_token.trim()),
        "the token is in the message"
    );
    eprintln!("while Vault is down, registration fails with: {text}");

    // The sidecar keeps trying; Vault comes back on the same address with the same data.
    let restart = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(2));
        bao.start_again().map(|()| bao)
    });
    let (registered, failures) = register_with_retry(&src, Duration::from_secs(60)).await;
    let mut bao = restart.await.unwrap().unwrap();
    assert!(
        !failures.is_empty(),
        "no attempt failed while Vault was down"
    );
    for (reason, text) in &failures {
        assert_eq!(*reason, "vault_unavailable", "{text}");
    }
    assert!(bao.is_running());
    let rec = record(&v, &web).await;
    assert_eq!(rec.public_key, registered.public_key().unwrap());
    assert_eq!(rec.addresses, registered.addresses);
    // The gateway record written before the outage is what it registered against.
    let gateway = src.load_gateway().await.unwrap();
    assert_eq!(gateway.pool.len(), 1);
    assert!(
        gateway.pool[0].contains(&registered.addresses[0].addr()),
        "{:?} outside {:?}",
        registered.addresses,
        gateway.pool
    );
}

/// A static identity (a StatefulSet Pod with `wg-injector.io/vault-path: wg/keys/{namespace}/{serviceAccount}/{pod}`,
/// rendered as `--vault-key-path wg/keys/db/db/db-0`): the fixed key from its private record is
/// registered like a born one, and the record's fixed address is claimed as is; a second Pod
/// asking for the same fixed address is refused as a claim conflict, naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_identity_registers_its_fixed_key_and_address_and_a_second_holder_is_refused() {
    let bao = tokio::task::spawn_blocking(OpenBao::start)
        .await
        .unwrap()
        .unwrap();
    let root = vault(&bao, &bao.admin_token_file().unwrap()).await;
    tokio::task::block_in_place(|| provision_gateway(&bao, "10.96.8.0/24"));
    let (private, public) = wg_sidecar::keys::generate_keypair();
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("private_key".to_owned(), private);
    fields.insert(
        "address".to_owned(),
        wg_sidecar::secret::Secret::new("10.96.8.40/32".into()),
    );
    root.write("secret", "wg/keys/db/db/db-0", &fields, None)
        .await
        .unwrap();
    let db0 = PodIdentity::new("db", "db", "db-0", "9a8b7c6d-0000-4000-8000-000000000001").unwrap();
    let static_source = |pod: &PodIdentity| {
        RegisteredKeySource::new(
            root.clone(),
            layout(),
            pod.clone(),
            "wg/gateways/corp".into(),
            Some("wg/keys/db/db/db-0".into()),
        )
    };
    let loaded = static_source(&db0).load_private().await.unwrap();
    assert_eq!(
        loaded.public_key().unwrap(),
        public,
        "the fixed key, not a born one"
    );
    assert_eq!(loaded.addresses, ["10.96.8.40/32".parse().unwrap()]);
    let rec = record(&root, &db0).await;
    assert_eq!(rec.public_key, public);
    assert_eq!(rec.pod.as_ref(), Some(&db0));
    let claim = root
        .read("secret", "wg/addresses/corp/10.96.8.40")
        .await
        .unwrap();
    assert_eq!(
        Claim::from_fields("claim", &claim.data).unwrap().pod,
        db0,
        "the fixed address is claimed for db-0"
    );

    // Another Pod (a second StatefulSet that copied the path) cannot hold the same address.
    let intruder = PodIdentity::new(
        "db",
        "db",
        "db-copy",
        "9a8b7c6d-0000-4000-8000-000000000002",
    )
    .unwrap();
    let e = static_source(&intruder).load_private().await.unwrap_err();
    assert_eq!(failure_reason(&e), "claim_conflict", "{e}");
    assert!(e.to_string().contains("10.96.8.40"), "{e}");
}
