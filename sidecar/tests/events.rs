//! Connection events (`docs/events.md`) from a real gateway and a real sidecar.
//!
//! Topology (namespaces `hc*`, made here): pod (OpenBao on 0.0.0.0:8200, sidecar) ──veth
//! 192.168.83.0/24── gw. The gateway (vault pod source, JSON logs) advertises 10.23.0.0/24; the
//! sidecar tunnels 10.23.0.0/24 and 10.24.0.0/24, so a ping to 10.24.0.1 reaches the gateway and
//! is dropped there (outside its networks: a policy denial). The sidecar dials a dead endpoint
//! first (failover after 2 s), a second record reuses the Pod's key (refused: duplicate key),
//! `keys rotate` rotates the Pod's and the gateway's keys, a second source address on the Pod's
//! veth makes its endpoint roam at the gateway, and deleting the Pod's record removes the peer.
//! (`handshake_lost` takes 180 s of silence: it is covered by the unit tests of `events.rs`.)
//!
//! Every `wg_event` line of both JSON logs is parsed and checked against the schema below (the
//! one `docs/events.md` documents): required fields present with their types, no field outside
//! the schema, fingerprints of 8 characters that are a prefix of a known public key, no full
//! public key, and no value containing a private key, a preshared key or the Vault token.
//!
//! Run as root: `cargo test -p wg-sidecar --test events` (lab tools: `bash scripts/lab-install.sh`).
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_lines
)]

mod lab;

use std::{collections::BTreeSet, fs, path::Path, time::Duration};

use lab::{require_root, scratch, spawn_sidecar, veth, wait_for, Netns, OpenBao};
use serde_json::Value;

/// A field's JSON type in the schema.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    Count,
}

/// A field of the schema: (name, type, required).
type Field = (&'static str, Kind, bool);

/// The fields of every event.
const COMMON: &[Field] = &[
    ("message", Kind::Str, true),
    ("event", Kind::Str, true),
    ("source", Kind::Str, true),
    ("gateway", Kind::Str, true),
    ("namespace", Kind::Str, false),
    ("pod", Kind::Str, false),
    ("service_account", Kind::Str, false),
    ("public_key_fingerprint", Kind::Str, false),
    ("identity", Kind::Str, false),
];

/// Each event's own fields: (event, [(field, type, required)]).
const FACTS: &[(&str, &[Field])] = &[
    (
        "peer_admitted",
        &[("public_key_fingerprint", Kind::Str, true)],
    ),
    (
        "peer_refused",
        &[("reason", Kind::Str, true), ("detail", Kind::Str, true)],
    ),
    (
        "peer_removed",
        &[
            ("reason", Kind::Str, true),
            ("public_key_fingerprint", Kind::Str, true),
        ],
    ),
    (
        "handshake_established",
        &[
            ("public_key_fingerprint", Kind::Str, true),
            ("age_seconds", Kind::Count, true),
            ("endpoint", Kind::Str, false),
        ],
    ),
    (
        "handshake_lost",
        &[
            ("public_key_fingerprint", Kind::Str, true),
            ("age_seconds", Kind::Count, false),
            ("endpoint", Kind::Str, false),
        ],
    ),
    (
        "endpoint_roamed",
        &[
            ("public_key_fingerprint", Kind::Str, true),
            ("previous_endpoint", Kind::Str, true),
            ("endpoint", Kind::Str, true),
        ],
    ),
    (
        "key_rotated",
        &[
            ("public_key_fingerprint", Kind::Str, true),
            ("previous_key_fingerprint", Kind::Str, false),
            ("version", Kind::Count, false),
        ],
    ),
    (
        "policy_denials",
        &[
            ("interval_seconds", Kind::Count, true),
            ("policy", Kind::Count, true),
            ("outside_networks", Kind::Count, true),
        ],
    ),
    (
        "failover",
        &[
            ("reason", Kind::Str, true),
            ("previous_endpoint", Kind::Str, false),
            ("endpoint", Kind::Str, false),
        ],
    ),
];

/// The `fields` of every `wg_event` line of a JSON log.
fn events(log: &str) -> Vec<serde_json::Map<String, Value>> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "wg_event")
        .map(|v| {
            assert_eq!(v["level"], "INFO", "{v}");
            v["fields"].as_object().unwrap().clone()
        })
        .collect()
}

/// Schema violations of one event (empty: it conforms).
fn violations(
    e: &serde_json::Map<String, Value>,
    public_keys: &[String],
    secrets: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    let kind = e.get("event").and_then(Value::as_str).unwrap_or("");
    let Some((_, own)) = FACTS.iter().find(|(k, _)| *k == kind) else {
        return vec![format!("unknown event {kind:?}")];
    };
    for (field, ty, required) in COMMON.iter().chain(own.iter()) {
        let required = *required || own.iter().any(|(f, _, r)| f == field && *r);
        match (e.get(*field), ty) {
            (None, _) if required => out.push(format!("{kind}: `{field}` missing")),
            (None, _) | (Some(Value::String(_)), Kind::Str) => {}
            (Some(v), Kind::Count) if v.as_u64().is_some() => {}
            (Some(v), _) => out.push(format!("{kind}: `{field}` is {v}, not {ty:?}")),
        }
    }
    for field in e.keys() {
        if !COMMON.iter().chain(own.iter()).any(|(f, _, _)| f == field) {
            out.push(format!("{kind}: `{field}` is not in the schema"));
        }
    }
    if e["message"] != kind {
        out.push(format!("{kind}: message {} is not the kind", e["message"]));
    }
    if !matches!(e["source"].as_str(), Some("gateway" | "sidecar")) {
        out.push(format!("{kind}: source {}", e["source"]));
    }
    for f in ["public_key_fingerprint", "previous_key_fingerprint"] {
        if let Some(fp) = e.get(f).and_then(Value::as_str) {
            if fp.len() != 8 || !public_keys.iter().any(|k| k.starts_with(fp)) {
                out.push(format!(
                    "{kind}: `{f}` {fp} is not 8 characters of a known key"
                ));
            }
        }
    }
    for (field, v) in e {
        let text = v.to_string();
        if public_keys.iter().any(|k| text.contains(k.as_str())) {
            out.push(format!("{kind}: `{field}` holds a whole public key"));
        }
        if secrets.iter().any(|s| text.contains(s.as_str())) {
            out.push(format!("{kind}: `{field}` holds secret material"));
        }
    }
    out
}

/// Every value of a `*_key` field of KV record `path` (private, preshared and public keys).
fn key_fields(bao: &OpenBao, path: &str) -> Vec<(String, String)> {
    let out = bao
        .cli(&["kv", "get", "-mount=secret", "-format=json", path], None)
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["data"]["data"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with("_key"))
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// Does `evs` have an event of `kind` from `source` with every (field, value) of `with`?
fn has(evs: &[serde_json::Map<String, Value>], kind: &str, with: &[(&str, &str)]) -> bool {
    evs.iter().any(|e| {
        e["event"] == kind
            && with
                .iter()
                .all(|(f, v)| e.get(*f).and_then(Value::as_str) == Some(*v))
    })
}

#[test]
fn the_gateway_and_the_sidecar_log_one_event_per_fact_in_the_documented_schema() {
    require_root();
    let pod = Netns::new("hcp").unwrap();
    let gw = Netns::new("hcg").unwrap();
    let (pod_if, _) = veth(&pod, "192.168.83.2/24", &gw, "192.168.83.1/24").unwrap();
    // 10.24.0.0/24 is routed by the gateway's namespace but not advertised by the gateway:
    // tunnel packets to it reach the forward filter and are dropped there.
    gw.ip(&["route", "add", "10.24.0.0/24", "via", "192.168.83.2"])
        .unwrap();
    let bao = OpenBao::start_on(&pod, "0.0.0.0:8200").unwrap();
    let dir = scratch();
    let token = dir.path().join("token");
    lab::write_secret_file(&token, "devroot\n");
    let vault = |addr: &str| -> Vec<String> {
        [
            "--vault-addr",
            addr,
            "--vault-auth",
            "token",
            "--vault-token-file",
            token.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let keys = |args: &[&str]| -> Vec<Value> {
        let out = pod
            .command(lab::sidecar_bin())
            .args(["--log-format", "text", "keys"])
            .args(args)
            .args(vault("http://127.0.0.1:8200"))
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keys {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    keys(&[
        "provision-gateway",
        "corp",
        "--endpoints",
        "192.168.83.1:51820",
        "--allowed-ips",
        "10.23.0.0/24",
        "--pool",
        "10.97.0.0/16",
    ]);
    let web = keys(&[
        "provision",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--pool",
        "10.97.0.0/16",
    ])
    .remove(0);
    let web_key = web["public_key"].as_str().unwrap().to_owned();
    // A second record with the Pod's key (and an address of its own): refused, duplicate key
    // (identities are taken in order: `shop/zz-dup` comes after `shop/web`).
    bao.put(
        "wg/peers/shop/zz-dup",
        &serde_json::json!({"public_key": web_key, "address": "10.97.200.1/32"}),
    )
    .unwrap();

    let gwlog = dir.path().join("gateway.log");
    let mut args: Vec<String> = [
        "gateway",
        "--interface",
        &lab::unique("hcw"),
        "--listen-port",
        "51820",
        "--vault-gateway-path",
        "wg/gateways/corp",
        "--health-addr",
        "127.0.0.1:9901",
        "--poll-interval",
        "1",
        "--pod-source",
        "vault",
        // Well below the sidecar's --failover-after (2 s): the session is never silent.
        "--peer-keepalive",
        "1",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(vault("http://192.168.83.2:8200"));
    let _gateway = spawn_sidecar(&gw, &args, &gwlog).unwrap();
    let log = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(15), || gw
            .http_get("http://127.0.0.1:9901/ready")
            .is_ok_and(|r| r.0 == 200)),
        "gateway never ready: {}",
        log(&gwlog)
    );

    let routes = "10.23.0.0/24,10.24.0.0/24";
    let init = pod
        .command(lab::sidecar_bin())
        .args(["init", "--routes", routes])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let sclog = dir.path().join("sidecar.log");
    let mut args: Vec<String> = [
        "run",
        "--interface",
        &lab::unique("hcs"),
        "--gateway",
        "corp",
        "--routes",
        routes,
        // Nothing listens on the first endpoint: the sidecar fails over to the second.
        "--endpoints",
        "192.168.83.1:51999,192.168.83.1:51820",
        "--failover-after",
        "2",
        // The Pod speaks every second, so the gateway sees a new source address at once.
        "--keepalive",
        "1",
        "--vault-key-path",
        "wg/keys/shop/web",
        "--health-addr",
        "127.0.0.1:9911",
        "--poll-interval",
        "1",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(vault("http://127.0.0.1:8200"));
    let _sidecar = spawn_sidecar(&pod, &args, &sclog).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || pod
            .http_get("http://127.0.0.1:9911/ready")
            .is_ok_and(|r| r.0 == 200)),
        "sidecar never ready:\nsidecar: {}\ngateway: {}",
        log(&sclog),
        log(&gwlog)
    );
    // Denied at the gateway: outside its networks.
    let _ = pod
        .command(lab::find_binary("ping").unwrap())
        .args(["-c", "3", "-i", "0.2", "-W", "1", "10.24.0.1"])
        .output()
        .unwrap();

    // Both keys rotate in place (the Pod's static identity and the gateway's key).
    let gw_old = key_fields(&bao, "wg/gateways/corp");
    let rotated = keys(&[
        "rotate",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--activate-after",
        "2",
        "--vault-gateway-path",
        "wg/gateways/corp",
    ]);
    assert_eq!(rotated.len(), 2, "{rotated:?}");

    let web_fp: String = web_key.chars().take(8).collect();
    let expected_gateway = |evs: &[serde_json::Map<String, Value>]| {
        [
            (
                "peer_admitted",
                has(
                    evs,
                    "peer_admitted",
                    &[
                        ("identity", "shop/web"),
                        ("public_key_fingerprint", &web_fp),
                    ],
                ),
            ),
            (
                "peer_refused",
                has(
                    evs,
                    "peer_refused",
                    &[("identity", "shop/zz-dup"), ("reason", "duplicate_key")],
                ),
            ),
            (
                "handshake_established",
                has(
                    evs,
                    "handshake_established",
                    &[("public_key_fingerprint", &web_fp)],
                ),
            ),
            ("policy_denials", has(evs, "policy_denials", &[])),
            (
                "key_rotated (the Pod's record)",
                has(
                    evs,
                    "key_rotated",
                    &[
                        ("identity", "shop/web"),
                        ("previous_key_fingerprint", &web_fp),
                    ],
                ),
            ),
            (
                "key_rotated (the gateway's key)",
                evs.iter()
                    .any(|e| e["event"] == "key_rotated" && e.get("identity").is_none()),
            ),
        ]
    };
    let expected_sidecar = |evs: &[serde_json::Map<String, Value>]| {
        [
            (
                "failover",
                has(
                    evs,
                    "failover",
                    &[
                        ("previous_endpoint", "192.168.83.1:51999"),
                        ("endpoint", "192.168.83.1:51820"),
                        ("reason", "no_handshake"),
                    ],
                ),
            ),
            (
                "handshake_established",
                has(
                    evs,
                    "handshake_established",
                    &[
                        ("public_key_fingerprint", &web_fp),
                        ("endpoint", "192.168.83.1:51820"),
                    ],
                ),
            ),
            (
                "key_rotated",
                has(evs, "key_rotated", &[("previous_key_fingerprint", &web_fp)]),
            ),
        ]
    };
    let missing = || -> Vec<String> {
        let (g, s) = (events(&log(&gwlog)), events(&log(&sclog)));
        let g = expected_gateway(&g)
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| format!("gateway: {n}"));
        let s = expected_sidecar(&s)
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| format!("sidecar: {n}"));
        g.chain(s).collect()
    };
    // Policy denials are summed over 10 s intervals.
    let all_there = wait_for(Duration::from_secs(15), || missing().is_empty());
    assert!(
        all_there,
        "events missing: {:?}\ngateway: {}\nsidecar: {}",
        missing(),
        log(&gwlog),
        log(&sclog)
    );
    // The Pod's packets leave from another address: the gateway sees its endpoint roam.
    pod.ip(&["addr", "add", "192.168.83.3/24", "dev", &pod_if])
        .unwrap();
    pod.ip(&[
        "route",
        "replace",
        "192.168.83.0/24",
        "dev",
        &pod_if,
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        "192.168.83.3",
    ])
    .unwrap();
    let roamed = |e: &serde_json::Map<String, Value>| {
        let starts = |f: &str, p: &str| {
            e.get(f)
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with(p))
        };
        e["event"] == "endpoint_roamed"
            && starts("previous_endpoint", "192.168.83.2:")
            && starts("endpoint", "192.168.83.3:")
    };
    assert!(
        wait_for(Duration::from_secs(5), || events(&log(&gwlog))
            .iter()
            .any(roamed)),
        "no endpoint_roamed: {}",
        log(&gwlog)
    );
    // The Pod's record goes: its peer is removed (its rotated key is kept for the checks).
    let peer_after = key_fields(&bao, "wg/peers/shop/web");
    bao.cli(
        &[
            "kv",
            "metadata",
            "delete",
            "-mount=secret",
            "wg/peers/shop/web",
        ],
        None,
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || has(
            &events(&log(&gwlog)),
            "peer_removed",
            &[("identity", "shop/web"), ("reason", "record_gone")]
        )),
        "no peer_removed: {}",
        log(&gwlog)
    );

    // The schema, on every event of both logs.
    let mut public_keys = vec![web_key.clone()];
    let mut secrets = vec!["devroot".to_owned()];
    for (path, fields) in [
        ("wg/keys/shop/web", key_fields(&bao, "wg/keys/shop/web")),
        ("wg/gateways/corp", key_fields(&bao, "wg/gateways/corp")),
        ("wg/gateways/corp (before)", gw_old),
        ("wg/peers/shop/web (rotated)", peer_after),
        (
            "wg/gateway-keys/corp",
            key_fields(&bao, "wg/gateway-keys/corp"),
        ),
    ] {
        for (name, v) in fields {
            if name.contains("public") {
                public_keys.push(v);
            } else {
                assert!(!v.is_empty(), "{path} {name}");
                secrets.push(v);
            }
        }
    }
    // The old private keys: the KV history (version 1) of the rotated records.
    for path in ["wg/keys/shop/web", "wg/gateway-keys/corp"] {
        let out = bao
            .cli(
                &[
                    "kv",
                    "get",
                    "-mount=secret",
                    "-version=1",
                    "-format=json",
                    path,
                ],
                None,
            )
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        for (name, v) in v["data"]["data"].as_object().unwrap() {
            let Some(v) = v.as_str() else { continue };
            if name.contains("public") {
                public_keys.push(v.to_owned());
            } else if name.ends_with("_key") {
                secrets.push(v.to_owned());
            }
        }
    }
    assert!(
        secrets.len() >= 3,
        "the private keys of the Pod and the gateway, before and after: {}",
        secrets.len()
    );
    let mut kinds = BTreeSet::new();
    let mut bad = Vec::new();
    for (what, p) in [("gateway", &gwlog), ("sidecar", &sclog)] {
        for e in events(&log(p)) {
            assert_eq!(e["source"], what, "{e:?}");
            assert_eq!(e["gateway"], "corp", "{e:?}");
            kinds.insert(format!("{what} {}", e["event"].as_str().unwrap_or("")));
            bad.extend(
                violations(&e, &public_keys, &secrets)
                    .into_iter()
                    .map(|v| format!("{what}: {v} in {e:?}")),
            );
        }
    }
    assert!(bad.is_empty(), "schema violations:\n{}", bad.join("\n"));
    eprintln!("events seen, all in the schema: {kinds:?}");
    drop(bao);
}

/// A kubeconfig for the lab apiserver's admin token.
fn kubeconfig(kube: &lab::Kube, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: admintoken\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: admin\ncurrent-context: lab\n",
        kube.url,
        kube.ca_file.display()
    );
    lab::write_secret_file(&path, &text);
    path
}

#[test]
fn a_refused_pod_gets_a_kubernetes_event_that_kubectl_describe_shows() {
    use wg_sidecar::{
        events::{PodEvents, POD_REFUSED_REASON},
        pod_index::{PeerChange, Refusal},
        registration::PodIdentity,
    };
    let kube = lab::Kube::start().unwrap();
    kube.request(
        "POST",
        "/api/v1/namespaces",
        Some(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})),
    )
    .unwrap();
    let pod: Value = serde_json::from_str(
        &kube
            .request(
                "POST",
                "/api/v1/namespaces/shop/pods",
                Some(&serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0"},
                    "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]}
                })),
            )
            .unwrap(),
    )
    .unwrap();
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let dir = scratch();
    let config = kubeconfig(&kube, dir.path());
    let (_, public_key) = lab::keypair();
    let refused = PeerChange::Refused {
        pod: PodIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
            name: "web-0".into(),
            uid: uid.clone(),
        },
        public_key: Some(public_key.clone()),
        refusal: Refusal::NamespaceNotSelected {
            namespace: "shop".into(),
            selector: "vpn=allowed".into(),
        },
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(&config).unwrap();
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        let events = PodEvents::new(kube::Client::try_from(cfg).unwrap(), "corp");
        // The same refusal twice (a gateway restart, a new reason and back): one Event, a series.
        events.publish(&refused).await.unwrap();
        events.publish(&refused).await.unwrap();
    });

    let list: Value = serde_json::from_str(
        &kube
            .request("GET", "/apis/events.k8s.io/v1/namespaces/shop/events", None)
            .unwrap(),
    )
    .unwrap();
    let items: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["regarding"]["uid"] == uid.as_str())
        .collect();
    assert_eq!(items.len(), 1, "one Event on the Pod: {list}");
    let e = items[0];
    assert_eq!(e["type"], "Warning", "{e}");
    assert_eq!(e["reason"], POD_REFUSED_REASON, "{e}");
    assert_eq!(e["regarding"]["kind"], "Pod", "{e}");
    assert_eq!(e["series"]["count"], 2, "the repeat is counted: {e}");
    let note = e["note"].as_str().unwrap();
    assert!(
        note.starts_with("gateway corp refused the Pod (namespace_not_selected): "),
        "{note}"
    );
    assert!(
        !e.to_string().contains(&public_key),
        "no key in the Event: {e}"
    );

    // What an operator runs.
    let out = std::process::Command::new(lab::find_binary("kubectl").unwrap())
        .arg("--kubeconfig")
        .arg(&config)
        .args(["describe", "pod", "-n", "shop", "web-0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = text.split("Events:").nth(1).unwrap_or("");
    assert!(
        events.contains("Warning")
            && events.contains(POD_REFUSED_REASON)
            && events.contains("namespace_not_selected"),
        "kubectl describe pod shows no refusal:\n{text}"
    );
}
