//! Tier 5, the real node: the user's path end to end on a real kubelet.
//!
//! One node (`wg_e2e::node::Node`: etcd, kube-apiserver, controller manager, scheduler,
//! kube-proxy, containerd and a kubelet in namespaces of their own) runs the project's own images
//! (`scripts/build-images.sh`, `FROM scratch`). OpenBao runs on the node's address; a "private
//! network" (a network namespace joined to the node, `10.20.0.0/24`) holds an HTTP service that
//! answers with the address it saw. Then the test does what `docs/install.md` ("First run, step by
//! step") tells a user, by running that section's `bash` blocks in order, and checks what a user
//! would see: every Pod Ready, the app container's requests reaching the private service through
//! the tunnel (the service sees a gateway Pod's address), the kill switch under the kubelet, a
//! gateway Pod's loss, a Job that completes, and an injector rollout that refuses no Pod.
//!
//! One test function because every step needs the ones before it (a node costs ~15 s and
//! ~1 GiB); each step prints its name and timing. Run it alone with
//! `cargo build -p wg-sidecar && cargo test -p wg-e2e --test node -- --nocapture`
//! (as root; `WG_E2E_USE_BUILT_IMAGES=1` skips the image rebuild when iterating).
//! Prerequisites: `bash scripts/lab-install.sh`. A missing component fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use anyhow::{bail, Context as _};
use serde_json::Value;
use std::time::{Duration, Instant};
use wg_e2e::control_plane::random_token;
use wg_e2e::lab::{cargo_binary, workspace_root};
use wg_e2e::node::{Node, API_PORT, NODE_IP};
use wg_e2e::podman::{build_images, image_version};
use wg_e2e::process::ChildGuard;

/// The private network behind the gateway and its HTTP service.
const PRIVATE_PREFIX: &str = "10.20.0";
const PRIVATE_NETWORK: &str = "10.20.0.0/24";
const SERVICE_URL: &str = "http://10.20.0.2:8080/";
/// The gateway's `NodePort`: Pods dial the node's address (there is no load balancer here).
const GATEWAY_NODE_PORT: u16 = 31820;
const VAULT_PORT: u16 = 8200;

fn step(t0: Instant, what: &str) {
    eprintln!("\n=== [{:7.2}s] {what}", t0.elapsed().as_secs_f64());
}

/// The `bash` blocks of docs/install.md's "First run, step by step" section, in order.
fn first_run_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join("docs/install.md")).unwrap();
    let start = text
        .find("## First run, step by step")
        .expect("docs/install.md has a \"First run, step by step\" section");
    let section = &text[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = Vec::new();
    let mut rest = &section[..end];
    while let Some(open) = rest.find("```bash\n") {
        let body = &rest[open + 8..];
        let close = body.find("\n```").expect("a closed code block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 4..];
    }
    assert!(blocks.len() >= 5, "the First run section lost its steps");
    blocks
}

/// The private HTTP service: answers every GET with `client=<the address it saw>`.
const SERVICE_PY: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("client=%s\n" % self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stderr.write("seen %s\n" % self.client_address[0]); sys.stderr.flush()
class Stream(http.server.BaseHTTPRequestHandler):
    # A long-lived, rate-limited stream: 16 KiB every 250 ms for 15 s.
    def do_GET(self):
        import time
        chunk = b"x" * 16384
        self.send_response(200); self.send_header("Content-Length", str(len(chunk) * 60)); self.end_headers()
        for _ in range(60):
            self.wfile.write(chunk); self.wfile.flush(); time.sleep(0.25)
    def log_message(self, fmt, *args):
        sys.stderr.write("stream to %s\n" % self.client_address[0]); sys.stderr.flush()
import threading
threading.Thread(target=http.server.ThreadingHTTPServer(("10.20.0.2", 8081), Stream).serve_forever, daemon=True).start()
# A second address of the private network, for the NetworkPolicy step.
threading.Thread(target=http.server.ThreadingHTTPServer(("10.20.0.3", 8080), H).serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("10.20.0.2", 8080), H).serve_forever()
"#;
/// The stream's full length (60 chunks of 16 KiB).
const STREAM_BYTES: u64 = 60 * 16384;
/// The tunnel pool: a /29 holds five Pod addresses, fewer than the injected Pods this test
/// starts over its run, so it passes only if the addresses of gone Pods are released and reused.
const TUNNEL_POOL: &str = "10.203.0.0/29";

fn workload(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata:
      labels: {{app: web}}
      annotations: {{wg-injector.io/inject: "true"}}
    spec:
      serviceAccountName: web
      terminationGracePeriodSeconds: 5
      containers:
      - name: app
        image: {image}
        imagePullPolicy: Never
---
apiVersion: v1
kind: Pod
metadata: {{name: plain, namespace: shop, labels: {{app: plain}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
"#
    )
}

/// A Pod of another service account (not injected) holding a projected Vault-audience token.
fn other_pod(image: &str) -> String {
    format!(
        r"apiVersion: v1
kind: ServiceAccount
metadata: {{name: other, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: shop, labels: {{app: other}}}}
spec:
  serviceAccountName: other
  # Only the Vault-audience token below; and no wait for a 1.20 legacy token Secret.
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
    volumeMounts: [{{name: vault-token, mountPath: /var/run/secrets/vault, readOnly: true}}]
  volumes:
  - name: vault-token
    projected:
      sources:
      - serviceAccountToken: {{audience: vault, expirationSeconds: 600, path: token}}
"
    )
}

fn job(image: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: report, namespace: shop}}
spec:
  backoffLimit: 0
  activeDeadlineSeconds: 120
  template:
    metadata:
      annotations: {{wg-injector.io/inject: "true"}}
    spec:
      serviceAccountName: web
      restartPolicy: Never
      containers:
      - name: app
        image: {image}
        imagePullPolicy: Never
        command: ["/bin/busybox", "sh", "-c"]
        args:
        - |
          for i in $(busybox seq 60); do /http-get {SERVICE_URL} && break; busybox sleep 1; done
          /http-get --post http://127.0.0.1:9901/quitquitquit
"#
    )
}

fn pods(node: &Node, ns: &str, selector: &str) -> anyhow::Result<Vec<Value>> {
    let list = node.kubectl_json(&["-n", ns, "get", "pods", "-l", selector])?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn all_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|c| c["ready"] == true))
}

fn ready_pods(
    node: &Node,
    ns: &str,
    selector: &str,
    n: usize,
) -> anyhow::Result<Option<Vec<Value>>> {
    let pods: Vec<Value> = pods(node, ns, selector)?
        .into_iter()
        .filter(all_ready)
        .collect();
    Ok((pods.len() == n).then_some(pods))
}

fn describe(node: &Node, ns: &str) -> String {
    let pods = node
        .run("kubectl", &["-n", ns, "describe", "pods"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let events = node
        .run(
            "kubectl",
            &["-n", ns, "get", "events", "--sort-by=.lastTimestamp"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("--- describe pods -n {ns}\n{pods}\n--- events\n{events}")
}

fn logs(node: &Node, ns: &str, pod: &str, container: &str) -> String {
    node.run(
        "kubectl",
        &["-n", ns, "logs", pod, "-c", container, "--tail=40"],
    )
    .map(|o| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
    .unwrap_or_default()
}

/// The app container's request to the private service: `Ok(body)` or `Err(reason)`.
fn app_request(node: &Node, pod: &str) -> Result<String, String> {
    app_get(node, pod, SERVICE_URL)
}

fn pod_ip(pod: &Value) -> String {
    pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Packets from `ip` to the private network that crossed the node in the clear (the node's
/// forward hook sees every packet from a Pod's veth to the private network; tunnelled traffic is
/// UDP to the gateway instead).
fn clear_packets(node: &Node, ip: &str) -> anyhow::Result<u64> {
    let out = node.run_ok("nft", &["-j", "list", "chain", "ip", "wg_leak", "forward"])?;
    let json: Value = serde_json::from_str(&out)?;
    for item in json["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if rule.is_null() || !rule.to_string().contains(&format!("\"{ip}\"")) {
            continue;
        }
        for expr in rule["expr"].as_array().into_iter().flatten() {
            if let Some(packets) = expr["counter"]["packets"].as_u64() {
                return Ok(packets);
            }
        }
    }
    bail!("no counter for {ip} in table ip wg_leak:\n{out}")
}

fn count_clear_packets_from(node: &Node, ip: &str) -> anyhow::Result<()> {
    let _ = node.run("nft", &["add", "table", "ip", "wg_leak"]);
    let _ = node.run(
        "nft",
        &["add chain ip wg_leak forward { type filter hook forward priority -300; policy accept; }"],
    );
    node.run_ok(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "wg_leak",
            "forward",
            "ip",
            "saddr",
            ip,
            "ip",
            "daddr",
            PRIVATE_NETWORK,
            "counter",
        ],
    )?;
    Ok(())
}

/// The containerd id of `container` in Pod `pod` (from the Pod's status).
fn container_id(pod: &Value, container: &str) -> Option<String> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?["containerID"]
        .as_str()?
        .strip_prefix("containerd://")
        .map(str::to_owned)
}

fn restart_count(pod: &Value, container: &str) -> u64 {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|s| s.iter().find(|c| c["name"] == container))
        .and_then(|c| c["restartCount"].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_users_path_on_a_real_node() {
    let t0 = Instant::now();
    let root = workspace_root();
    let version = image_version();
    let sidecar_bin = cargo_binary("wg-sidecar").unwrap();
    step(t0, "images: scripts/build-images.sh (incremental)");
    build_images(&root).unwrap();
    let images = [
        format!("localhost/wg-injector:{version}"),
        format!("localhost/wg-sidecar:{version}"),
        format!("localhost/wg-e2e-app:{version}"),
    ];
    let app_image = &images[2];

    step(t0, "node: up from nothing");
    let mut node = Node::start(&images.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    eprintln!("node Ready after {:.2} s (from nothing: netns, containerd, images, control plane, kubelet)", node.ready_after.as_secs_f64());
    let private_ns = format!("wgp-{}", std::process::id());
    node.attach_network(&private_ns, PRIVATE_PREFIX).unwrap();
    let added = std::process::Command::new("ip")
        .args([
            "-n",
            &private_ns,
            "addr",
            "add",
            "10.20.0.3/32",
            "dev",
            "lo",
        ])
        .status()
        .unwrap();
    assert!(added.success(), "a second private address");
    let service_log = node.dir().join("logs/private-service.log");
    let mut service = {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &private_ns, "python3", "-c", SERVICE_PY]);
        ChildGuard::spawn("private-service", cmd, &node.dir().join("logs")).unwrap()
    };
    let vault_token = random_token("root");
    // OpenBao as docs/install.md expects it: over TLS at the node's address, with a certificate
    // for that address from a CA the user hands to the charts (ConfigMap vault-ca). The test's
    // own `bao` calls use the dev listener on the node's loopback.
    let tls_dir = node.dir().join("vault-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let ca = wg_certs::generate_ca("wg-e2e Vault CA", Duration::from_secs(86_400)).unwrap();
    let serving = wg_certs::issue_serving_cert(
        &ca,
        &[NODE_IP.to_string(), "127.0.0.1".to_owned()],
        Duration::from_secs(86_400),
    )
    .unwrap();
    let ca_file = tls_dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::write(tls_dir.join("vault.crt"), &serving.cert_pem).unwrap();
    std::fs::write(tls_dir.join("vault.key"), &serving.key_pem).unwrap();
    std::fs::write(
        tls_dir.join("listener.hcl"),
        format!(
            "listener \"tcp\" {{\n  address = \"{NODE_IP}:{VAULT_PORT}\"\n  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n}}\n",
            tls_dir.join("vault.crt").display(),
            tls_dir.join("vault.key").display()
        ),
    )
    .unwrap();
    let vault = node
        .spawn(
            "openbao",
            &wg_e2e::lab::find_binary("bao")
                .unwrap()
                .display()
                .to_string(),
            &[
                "server",
                "-dev",
                &format!("-dev-root-token-id={vault_token}"),
                &format!("-dev-listen-address=127.0.0.1:{VAULT_PORT}"),
                &format!("-config={}", tls_dir.join("listener.hcl").display()),
            ],
        )
        .unwrap();
    // What Pods and the docs' commands use.
    let vault_url = format!("https://{NODE_IP}:{VAULT_PORT}");
    let ca_path = ca_file.display().to_string();
    // What the test's own checks use (the dev listener, inside the node only).
    let vault_addr = format!("http://127.0.0.1:{VAULT_PORT}");
    Node::wait_for("OpenBao over TLS", Duration::from_secs(30), || {
        Ok(node
            .bash(
                "bao status >/dev/null",
                &[("BAO_ADDR", &vault_url), ("BAO_CACERT", &ca_path)],
            )?
            .status
            .success()
            .then_some(()))
    })
    .unwrap();

    step(t0, "docs/install.md, First run: every bash block in order");
    let sidecar_dir = sidecar_bin.parent().unwrap().display().to_string();
    let path = format!("{sidecar_dir}:{}", node.path_env());
    let gateway_endpoint = format!("{NODE_IP}:{GATEWAY_NODE_PORT}");
    let gateway_service =
        format!("--set service.type=NodePort --set service.nodePort={GATEWAY_NODE_PORT}");
    let kube_host = format!("https://{NODE_IP}:{API_PORT}");
    let env: Vec<(&str, &str)> = vec![
        ("VAULT_ADDR", &vault_url),
        ("BAO_ADDR", &vault_url),
        ("VAULT_CACERT", &ca_path),
        ("VAULT_TOKEN", &vault_token),
        ("BAO_TOKEN", &vault_token),
        ("VAULT_KUBERNETES_HOST", &kube_host),
        ("GATEWAY_ENDPOINT", &gateway_endpoint),
        ("GATEWAY_SERVICE", &gateway_service),
        ("PRIVATE_NETWORKS", PRIVATE_NETWORK),
        ("TUNNEL_POOL", TUNNEL_POOL),
        ("APP_NAMESPACE", "shop"),
        ("APP_SERVICE_ACCOUNT", "web"),
    ];
    let blocks = first_run_blocks();
    let mut script = String::new();
    for (i, block) in blocks.iter().enumerate() {
        script.push_str(block);
        script.push('\n');
        let t = Instant::now();
        // Each block runs with the ones before it (they export the variables).
        let mut cmd_env = env.clone();
        cmd_env.push(("PATH", &path));
        let out = node.bash(&script, &cmd_env).unwrap();
        assert!(
            out.status.success(),
            "docs/install.md First run, block {} failed:\n{block}\n--- stdout\n{}\n--- stderr\n{}\n{}\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            describe(&node, "vpn"),
            describe(&node, "wg-system"),
        );
        eprintln!("block {} ok in {:.1} s", i + 1, t.elapsed().as_secs_f64());
        // Blocks are idempotent, but re-running earlier installs would fail: keep only exports.
        script = script.lines().filter(|l| l.starts_with("export ")).fold(
            String::new(),
            |mut kept, l| {
                kept.push_str(l);
                kept.push('\n');
                kept
            },
        );
    }

    step(
        t0,
        "a Deployment in the labelled namespace: injected, every container Ready",
    );
    let t_apply = Instant::now();
    node.apply(&workload(app_image)).unwrap();
    let web = Node::wait_for("the web Pod Ready", Duration::from_secs(120), || {
        ready_pods(&node, "shop", "app=web", 1)
    })
    .unwrap_or_else(|e| {
        let sidecars = node
            .run(
                "kubectl",
                &[
                    "-n",
                    "shop",
                    "logs",
                    "-l",
                    "app=web",
                    "-c",
                    "wg-sidecar",
                    "--tail=20",
                ],
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!(
            "{e}\n{}\n--- wg-sidecar logs\n{sidecars}",
            describe(&node, "shop")
        )
    });
    let web = web.into_iter().next().unwrap();
    let web_name = name(&web);
    eprintln!(
        "Deployment Pod {web_name} Ready {:.2} s after apply",
        t_apply.elapsed().as_secs_f64()
    );
    eprintln!(
        "{}",
        node.kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_default()
    );
    let containers: Vec<&str> = web["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let inits: Vec<&str> = web["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(inits, ["wg-init"], "{web}");
    assert!(
        containers.contains(&"wg-sidecar") && containers.contains(&"app"),
        "{containers:?}"
    );
    // wg-init ran (and finished) before any container started.
    let init_done = web["status"]["initContainerStatuses"][0]["state"]["terminated"]["finishedAt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        web["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    for c in web["status"]["containerStatuses"].as_array().unwrap() {
        let started = c["state"]["running"]["startedAt"].as_str().unwrap();
        assert!(
            started >= init_done.as_str(),
            "{} started {started} before wg-init finished {init_done}",
            c["name"]
        );
    }
    // The sidecar's spec holds no key or token: only flags, paths and fieldRefs.
    let sidecar = web["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "wg-sidecar")
        .unwrap();
    let spec_text = format!("{} {}", sidecar["args"], sidecar["env"]).to_lowercase();
    for secret in [
        vault_token.to_lowercase(),
        "private_key".into(),
        "token=".into(),
        "secret_id".into(),
    ] {
        assert!(
            !spec_text.contains(&secret),
            "the sidecar's args/env carry {secret:?}: {spec_text}"
        );
    }
    // The key was born in the Pod: Vault holds only the Pod's public record (no private key)
    // under its own namespace, service account and UID. The private key (read here from the
    // interface itself, through the sidecar's UAPI socket on the node) appears nowhere a user
    // or a log collector sees: not in the sidecar's log, the Pod object or Vault.
    let web_uid = web["metadata"]["uid"].as_str().unwrap().to_owned();
    let record_path = format!("secret/wg/peers/vpn-gateway/shop/web/{web_uid}");
    let record: Value = serde_json::from_slice(
        &node
            .bash(
                "bao kv get -format=json \"$P\"",
                &[
                    ("BAO_ADDR", &vault_addr),
                    ("BAO_TOKEN", &vault_token),
                    ("P", &record_path),
                ],
            )
            .unwrap()
            .stdout,
    )
    .unwrap_or_else(|e| panic!("no public record at {record_path}: {e}"));
    let fields = &record["data"]["data"];
    assert_eq!(fields["pod"], web_name.as_str(), "{record}");
    assert_eq!(fields["uid"], web_uid.as_str(), "{record}");
    assert!(
        fields["private_key"].is_null(),
        "a private key in Vault: {record}"
    );
    let preshared_key = fields["preshared_key"].as_str().unwrap().to_owned();
    let web_address = fields["address"].as_str().unwrap().to_owned();
    let private_key = uapi_private_key(&node, &web_uid);
    assert_eq!(private_key.len(), 44, "not a base64 WireGuard key");
    let sidecar_log = logs(&node, "shop", &web_name, "wg-sidecar");
    assert!(
        sidecar_log.contains("registered with the gateway"),
        "no registration in the sidecar log: {sidecar_log}"
    );
    for (what, secret) in [
        ("private key", &private_key),
        ("preshared key", &preshared_key),
    ] {
        assert!(
            !sidecar_log.contains(secret.as_str()),
            "the sidecar logged its {what}"
        );
        assert!(
            !web.to_string().contains(secret.as_str()),
            "the Pod object carries the {what}"
        );
    }
    assert!(
        !record.to_string().contains(&private_key),
        "the private key is in Vault"
    );
    eprintln!("shop/web's public record at {record_path}: key born in the Pod, only its public half and the preshared key in Vault");

    step(
        t0,
        "the one wg-pod role: another service account's Pod gets 403 on shop/web's record",
    );
    node.apply(&other_pod(app_image)).unwrap();
    Node::wait_for("the other Pod Ready", Duration::from_secs(60), || {
        ready_pods(&node, "shop", "app=other", 1)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(&node, "shop")));
    let jwt = node
        .kubectl(&[
            "-n",
            "shop",
            "exec",
            "other",
            "-c",
            "app",
            "--",
            "/bin/busybox",
            "cat",
            "/var/run/secrets/vault/token",
        ])
        .unwrap();
    // `bao kv <args>` as shop/other, logged in to the one wg-pod role.
    let read_as_other = |args: &str| {
        node.bash(
            &format!("export BAO_TOKEN=$(printenv JWT | bao write -field=token auth/kubernetes/login role=wg-pod jwt=-)\n\
             bao kv {args}"),
            &[("BAO_ADDR", &vault_addr), ("JWT", jwt.trim())],
        )
        .unwrap()
    };
    let denied = read_as_other(&format!("get -format=json {record_path}"));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && stderr.contains("403"),
        "shop/other read shop/web's record: {stderr}"
    );
    let forged = read_as_other(&format!(
        "put {record_path} public_key=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= address=10.203.0.6/32"
    ));
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(
        !forged.status.success() && stderr.contains("403"),
        "shop/other wrote shop/web's record: {stderr}"
    );
    let web_address = web_address.split('/').next().unwrap().to_owned();
    let claim = read_as_other(&format!(
        "put secret/wg/addresses/vpn-gateway/{web_address} address={web_address}"
    ));
    let stderr = String::from_utf8_lossy(&claim.stderr);
    assert!(
        !claim.status.success() && (stderr.contains("403") || stderr.contains("check-and-set")),
        "shop/other overwrote shop/web's claim on {web_address}: {stderr}"
    );
    eprintln!("shop/other -> shop/web's record: read 403, write 403; an existing claim: refused");

    step(
        t0,
        "the app container's request reaches the private service through the tunnel",
    );
    let gateways = ready_pods(&node, "vpn", "app.kubernetes.io/name=wg-gateway", 2)
        .unwrap()
        .expect("two gateway Pods Ready");
    let gateway_ips: Vec<String> = gateways.iter().map(pod_ip).collect();
    let body = Node::wait_for(
        "a request through the tunnel",
        Duration::from_secs(30),
        || Ok(app_request(&node, &web_name).ok()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            logs(&node, "shop", &web_name, "wg-sidecar"),
            describe(&node, "vpn")
        )
    });
    let seen = body.strip_prefix("client=").unwrap_or_default().to_owned();
    assert!(
        gateway_ips.contains(&seen),
        "the service saw {seen}, not a gateway Pod ({gateway_ips:?}): not tunnelled"
    );
    assert_ne!(seen, pod_ip(&web));
    eprintln!(
        "app -> private service: seen as {seen} (gateway Pods {gateway_ips:?}, app Pod {})",
        pod_ip(&web)
    );

    step(
        t0,
        "kill switch: the sidecar SIGKILLed, requests fail at once and nothing leaves in the clear",
    );
    let plain = ready_pods(&node, "shop", "app=plain", 1)
        .unwrap()
        .expect("the plain Pod")
        .remove(0);
    count_clear_packets_from(&node, &pod_ip(&web)).unwrap();
    count_clear_packets_from(&node, &pod_ip(&plain)).unwrap();
    // The counter counts: a Pod without the tunnel reaches the service in the clear.
    let out = node
        .kubectl(&[
            "-n",
            "shop",
            "exec",
            "plain",
            "-c",
            "app",
            "--",
            "/http-get",
            SERVICE_URL,
        ])
        .unwrap();
    assert_eq!(out.trim(), format!("client={}", pod_ip(&plain)));
    assert!(
        clear_packets(&node, &pod_ip(&plain)).unwrap() > 0,
        "the leak counter saw nothing from the plain Pod"
    );
    let sidecar_id = container_id(&web, "wg-sidecar").unwrap();
    let sock = node.dir().join("run/containerd.sock").display().to_string();
    let restarts = restart_count(&web, "wg-sidecar");
    node.run_ok(
        "ctr",
        &[
            "--address",
            &sock,
            "-n",
            "k8s.io",
            "tasks",
            "kill",
            "-s",
            "SIGKILL",
            &sidecar_id,
        ],
    )
    .unwrap();
    let t_kill = Instant::now();
    // The sidecar's process is gone (its TUN device and tunnel routes with it) ...
    Node::wait_for("the sidecar task to stop", Duration::from_secs(10), || {
        let out = node.run_ok("ctr", &["--address", &sock, "-n", "k8s.io", "tasks", "ls"])?;
        Ok((!out
            .lines()
            .any(|l| l.starts_with(&sidecar_id) && l.contains("RUNNING")))
        .then_some(()))
    })
    .unwrap();
    // ... and the app's requests are refused at once, in one exec (well before the kubelet's
    // restart and a new handshake, 1.4 s or more here).
    let out = node
        .run(
            "kubectl",
            &[
                "-n",
                "shop",
                "exec",
                &web_name,
                "-c",
                "app",
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                &format!("for i in 1 2 3; do /http-get {SERVICE_URL}; echo \"rc=$?\"; done"),
            ],
        )
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{:.2} s after the kill:\n{}",
        t_kill.elapsed().as_secs_f64(),
        text.trim()
    );
    assert_eq!(
        text.matches("rc=2").count(),
        3,
        "a request was not refused with the sidecar killed:\n{text}"
    );
    assert_eq!(text.matches("No route to host").count(), 3, "{text}");
    assert_eq!(
        clear_packets(&node, &pod_ip(&web)).unwrap(),
        0,
        "packets from the app Pod reached the private network in the clear"
    );
    let body = Node::wait_for(
        "traffic back after the kubelet restarts the sidecar",
        Duration::from_secs(90),
        || Ok(app_request(&node, &web_name).ok()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(&node, "shop")));
    // The kubelet restarted the container (its status may trail the new process briefly).
    Node::wait_for(
        "the sidecar's restartCount to rise",
        Duration::from_secs(30),
        || {
            let pod = node.kubectl_json(&["-n", "shop", "get", "pod", &web_name])?;
            Ok((restart_count(&pod, "wg-sidecar") > restarts).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(&node, "shop")));
    assert!(
        body.starts_with("client=") && gateway_ips.contains(&body[7..].to_owned()),
        "{body}"
    );
    assert_eq!(
        clear_packets(&node, &pod_ip(&web)).unwrap(),
        0,
        "clear packets while the sidecar restarted"
    );
    eprintln!(
        "traffic back {:.2} s after the kill (kubelet restart + tunnel up)",
        t_kill.elapsed().as_secs_f64()
    );

    step(t0, "a gateway Pod deleted: the peers are served again");
    let serving = gateways.iter().find(|g| pod_ip(g) == body[7..]).unwrap();
    let t_del = Instant::now();
    node.kubectl(&["-n", "vpn", "delete", "pod", &name(serving), "--wait=false"])
        .unwrap();
    let body = Node::wait_for(
        "a request through another gateway Pod",
        Duration::from_secs(120),
        || {
            Ok(app_request(&node, &web_name)
                .ok()
                .filter(|b| b != &format!("client={}", pod_ip(serving))))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            logs(&node, "shop", &web_name, "wg-sidecar"),
            describe(&node, "vpn")
        )
    });
    eprintln!(
        "gateway Pod deleted -> served again (as {body}) after {:.2} s",
        t_del.elapsed().as_secs_f64()
    );
    Node::wait_for(
        "the gateway Deployment back at two Ready Pods",
        Duration::from_secs(120),
        || ready_pods(&node, "vpn", "app.kubernetes.io/name=wg-gateway", 2),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(&node, "vpn")));

    step(
        t0,
        "one identity per Pod: the Deployment scaled 1 -> 3 -> 1 -> 3",
    );
    scale_one_three_one_three(&node, &vault_addr, &vault_token);

    step(
        t0,
        "a NetworkPolicy of the Pods' own namespace decides what they reach through the tunnel",
    );
    network_policy_in_the_tunnel(&node);

    step(
        t0,
        "closed by default: the cluster network, the node, 169.254.169.254 and other peers are dropped at the gateway",
    );
    closed_by_default(&node, app_image, (&vault_addr, &vault_token));

    step(t0, "the tunnel label comes from the injector only");
    tunnel_label_only_from_the_injector(&node, app_image);

    step(
        t0,
        "two namespaces, one selected by the gateway's access.namespaceSelector",
    );
    access_by_namespace(&node, app_image, &ca_path);

    step(
        t0,
        "classic mode: the app's first request succeeds, and its requests during a 10 s graceful shutdown",
    );
    hold_and_drain(&node, app_image);

    step(
        t0,
        "a Job with an injected Pod completes (classic mode: the app stops the sidecar)",
    );
    let t_job = Instant::now();
    node.apply(&job(app_image)).unwrap();
    Node::wait_for("the Job to complete", Duration::from_secs(150), || {
        let j = node.kubectl_json(&["-n", "shop", "get", "job", "report"])?;
        if j["status"]["failed"].as_u64().unwrap_or(0) > 0 {
            bail!("the Job failed: {}", j["status"]);
        }
        Ok((j["status"]["succeeded"].as_u64() == Some(1)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(&node, "shop")));
    eprintln!(
        "Job complete {:.2} s after apply",
        t_job.elapsed().as_secs_f64()
    );

    step(
        t0,
        "wg-injector rolled while Pods are created in a loop: no Pod refused",
    );
    let refusals = rollout_under_load(&node).unwrap();
    assert!(
        refusals.is_empty(),
        "Pods refused during the rollout:\n{}",
        refusals.join("\n")
    );

    step(t0, "teardown: nothing left behind");
    service.stop();
    let seen_log = std::fs::read_to_string(&service_log).unwrap_or_default();
    assert!(
        !seen_log.contains(&format!("seen {}", pod_ip(&web))),
        "the service saw the app Pod's own address:\n{seen_log}"
    );
    drop(vault);
    let left = node.stop();
    assert!(left.0.is_empty(), "left behind: {:#?}", left.0);
    eprintln!("whole test {:.1} s", t0.elapsed().as_secs_f64());
}

/// An app that makes its first request through the tunnel the moment it starts (fails the Pod
/// otherwise), and on SIGTERM makes ten more a second apart before it exits with the number that
/// failed; the result is its termination message. A finalizer keeps the deleted Pod readable.
fn draining_app(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: drain
  namespace: shop
  labels: {{app: drain}}
  annotations: {{wg-injector.io/inject: "true"}}
  finalizers: [wg-injector.io/test-hold]
spec:
  serviceAccountName: web
  restartPolicy: Never
  terminationGracePeriodSeconds: 30
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/busybox", "sh", "-c"]
    args:
    - |
      /http-get {SERVICE_URL} >/dev/null || {{ echo "first request failed" > /dev/termination-log; exit 3; }}
      drain() {{
        ok=0; failed=0
        for i in $(busybox seq 10); do
          if /http-get {SERVICE_URL} >/dev/null; then ok=$((ok+1)); else failed=$((failed+1)); fi
          busybox sleep 1
        done
        echo "first=ok drain_ok=$ok drain_failed=$failed" > /dev/termination-log
        exit $failed
      }}
      trap drain TERM
      while true; do busybox sleep 1 & wait $!; done
"#
    )
}

/// Issue 18, item 1 on the real node (Kubernetes 1.20 here: classic mode; native sidecars need
/// 1.29): the postStart hook holds the app until the tunnel is up, so its very first request
/// succeeds; `kubectl delete` stops app and sidecar together, and the sidecar keeps the tunnel
/// while the app makes its ten shutdown requests.
fn hold_and_drain(node: &Node, image: &str) {
    node.apply(&draining_app(image)).unwrap();
    Node::wait_for("the drain Pod Ready", Duration::from_secs(120), || {
        let p = node.kubectl_json(&["-n", "shop", "get", "pod", "drain"])?;
        if let Some(t) = p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "app")
            .and_then(|c| c["state"]["terminated"].as_object())
        {
            bail!("the app stopped at start: {t:?}");
        }
        Ok(all_ready(&p).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            describe(node, "shop")
        )
    });
    let deleted = Instant::now();
    node.run_ok(
        "kubectl",
        &["-n", "shop", "delete", "pod", "drain", "--wait=false"],
    )
    .unwrap();
    let app = Node::wait_for("the app's shutdown to end", Duration::from_secs(60), || {
        let p = node.kubectl_json(&["-n", "shop", "get", "pod", "drain"])?;
        let statuses = p["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let done = |name: &str| {
            statuses
                .iter()
                .find(|c| c["name"] == name)
                .and_then(|c| c["state"]["terminated"].as_object().cloned())
        };
        Ok(done("app").zip(done("wg-sidecar")))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            describe(node, "shop")
        )
    });
    let took = deleted.elapsed();
    let (app, sidecar) = app;
    node.run_ok(
        "kubectl",
        &[
            "-n",
            "shop",
            "patch",
            "pod",
            "drain",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
    )
    .unwrap();
    let message = app["message"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert_eq!(
        (app["exitCode"].as_i64(), message.as_str()),
        (Some(0), "first=ok drain_ok=10 drain_failed=0"),
        "the app during its shutdown: {app:?}; the sidecar: {sidecar:?}"
    );
    assert_eq!(sidecar["exitCode"].as_i64(), Some(0), "{sidecar:?}");
    eprintln!(
        "first request ok; 10/10 shutdown requests ok; app and sidecar terminated {:.1} s after the delete (sidecar: {})",
        took.as_secs_f64(),
        sidecar["finishedAt"]
    );
}

/// `kubectl rollout restart` of the injector while Pods are created one after another until the
/// rollout is done; returns the refusals (and Pods created without the sidecar).
fn rollout_under_load(node: &Node) -> anyhow::Result<Vec<String>> {
    let before = node.kubectl_json(&["-n", "wg-system", "get", "deployment", "wg-injector"])?;
    let generation = before["metadata"]["generation"].as_i64().unwrap_or(0);
    node.kubectl(&[
        "-n",
        "wg-system",
        "rollout",
        "restart",
        "deployment/wg-injector",
    ])?;
    let t = Instant::now();
    let mut refusals = Vec::new();
    let mut created = 0;
    let mut done_at = None;
    while t.elapsed() < Duration::from_secs(180) {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: burst-{created}, namespace: shop, labels: {{burst: \"1\"}}, annotations: {{wg-injector.io/inject: \"true\"}}}}\nspec:\n  serviceAccountName: web\n  nodeName: not-a-node\n  containers: [{{name: app, image: localhost/none:0}}]\n"
        );
        match node.apply(&pod) {
            Ok(_) => {}
            Err(e) => refusals.push(format!("burst-{created}: {e:#}")),
        }
        created += 1;
        let d = node.kubectl_json(&["-n", "wg-system", "get", "deployment", "wg-injector"])?;
        let status = &d["status"];
        let rolled = d["metadata"]["generation"].as_i64().unwrap_or(0) > generation
            && status["observedGeneration"] == d["metadata"]["generation"]
            && status["updatedReplicas"] == d["spec"]["replicas"]
            && status["replicas"] == d["spec"]["replicas"]
            && status["availableReplicas"] == d["spec"]["replicas"];
        if rolled && done_at.is_none() {
            done_at = Some(t.elapsed());
        }
        // A few more after the rollout: the old Pods' last seconds included.
        if done_at.is_some_and(|d| t.elapsed() > d + Duration::from_secs(5)) {
            break;
        }
    }
    let done_at = done_at.context("the injector rollout did not finish in 180 s")?;
    // Every Pod that was admitted got the sidecar.
    let list = node.kubectl_json(&["-n", "shop", "get", "pods"])?;
    for p in list["items"].as_array().into_iter().flatten() {
        let n = name(p);
        if n.starts_with("burst-") && !p["spec"]["containers"].to_string().contains("wg-sidecar") {
            refusals.push(format!("{n}: admitted without the sidecar"));
        }
    }
    eprintln!(
        "rollout done after {:.1} s; {created} Pods created during it, {} refused",
        done_at.as_secs_f64(),
        refusals.len()
    );
    node.kubectl(&[
        "-n",
        "shop",
        "delete",
        "pods",
        "-l",
        "burst",
        "--wait=false",
    ])
    .ok();
    Ok(refusals)
}

/// The private key of Pod `uid`'s interface, read through the sidecar's UAPI socket (in the
/// Pod's in-memory runtime volume on the node) and printed as base64.
fn uapi_private_key(node: &Node, uid: &str) -> String {
    let sock = node
        .dir()
        .join(format!(
            "kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/wg-runtime/wg0.sock"
        ))
        .display()
        .to_string();
    let script = r#"python3 - "$SOCK" <<'PY'
import base64, os, socket, sys
# The full path is longer than a socket address may be (108 bytes): connect from its folder.
os.chdir(os.path.dirname(sys.argv[1]))
s = socket.socket(socket.AF_UNIX); s.connect(os.path.basename(sys.argv[1])); s.sendall(b"get=1\n\n")
data = b""
while not data.endswith(b"\n\n"):
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
for line in data.decode().splitlines():
    if line.startswith("private_key="):
        print(base64.b64encode(bytes.fromhex(line[len("private_key="):])).decode())
PY"#;
    let out = node.bash(script, &[("SOCK", &sock)]).unwrap();
    assert!(
        out.status.success(),
        "UAPI read of {sock} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `wg_gateway_peers` of every Ready gateway Pod (scraped from its health port on the node).
fn gateway_peers(node: &Node) -> anyhow::Result<Vec<u64>> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(gateway_metric(node, "wg_gateway_peers")?
        .into_iter()
        .map(|v| v as u64)
        .collect())
}

/// The names of Vault's entries below `path` (`bao kv list`; empty when the folder is gone).
fn vault_list(node: &Node, vault: (&str, &str), path: &str) -> Vec<String> {
    let out = node
        .bash(
            "bao kv list -format=json \"$P\" 2>/dev/null || echo '[]'",
            &[("BAO_ADDR", vault.0), ("BAO_TOKEN", vault.1), ("P", path)],
        )
        .unwrap();
    serde_json::from_slice::<Vec<String>>(&out.stdout).unwrap_or_default()
}

/// Scales `shop/web` to `n` and waits until exactly `n` Pods are Ready and no other is left.
fn scale_to(node: &Node, n: usize) -> Vec<Value> {
    node.kubectl(&[
        "-n",
        "shop",
        "scale",
        "deployment/web",
        &format!("--replicas={n}"),
    ])
    .unwrap();
    Node::wait_for(
        &format!("shop/web at {n} Ready replicas"),
        Duration::from_secs(180),
        || {
            let all = pods(node, "shop", "app=web")?;
            Ok((all.len() == n && all.iter().all(all_ready)).then_some(all))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(node, "shop")))
}

/// Every replica's app reads the rate-limited 15 s stream through the tunnel at the same time;
/// returns the bytes each received.
fn concurrent_streams(node: &Node, replicas: &[Value]) -> Vec<(String, u64)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = replicas
            .iter()
            .map(|p| {
                let pod = name(p);
                s.spawn(move || {
                    let out = node.run(
                        "kubectl",
                        &[
                            "-n",
                            "shop",
                            "exec",
                            &pod,
                            "-c",
                            "app",
                            "--",
                            "/bin/busybox",
                            "sh",
                            "-c",
                            // Debian's static busybox wget crashes here; http-get prints the
                            // body only when the whole stream arrived with no read stalling 5 s.
                            "/http-get http://10.20.0.2:8081/stream | /bin/busybox wc -c",
                        ],
                    );
                    let bytes = out
                        .ok()
                        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                        .unwrap_or(0);
                    (pod, bytes)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Issue 15's acceptance on the real node: every replica its own key and address, each keeps
/// its long-lived stream while the others run theirs, a gone Pod's peer leaves both gateway
/// replicas within 5 s, and its address and records are released for later Pods.
fn scale_one_three_one_three(node: &Node, vault_addr: &str, vault_token: &str) {
    let vault = (vault_addr, vault_token);
    let claims = || vault_list(node, vault, "secret/wg/addresses/vpn-gateway");
    let records = || vault_list(node, vault, "secret/wg/peers/vpn-gateway/shop/web");
    let check_round = |round: &str, replicas: &[Value]| {
        let uids: Vec<String> = replicas
            .iter()
            .map(|p| p["metadata"]["uid"].as_str().unwrap().to_owned())
            .collect();
        // Each replica's own record; no two share a key or an address.
        let mut keys = std::collections::BTreeSet::new();
        let mut addresses = std::collections::BTreeSet::new();
        for uid in &uids {
            let out = node
                .bash(
                    "bao kv get -format=json \"secret/wg/peers/vpn-gateway/shop/web/$U\"",
                    &[
                        ("BAO_ADDR", vault_addr),
                        ("BAO_TOKEN", vault_token),
                        ("U", uid),
                    ],
                )
                .unwrap();
            let rec: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{round}: no record for Pod {uid}: {e}"));
            keys.insert(
                rec["data"]["data"]["public_key"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            addresses.insert(rec["data"]["data"]["address"].as_str().unwrap().to_owned());
        }
        assert_eq!(keys.len(), uids.len(), "{round}: replicas share a key");
        assert_eq!(
            addresses.len(),
            uids.len(),
            "{round}: replicas share an address: {addresses:?}"
        );
        // Each gateway replica holds exactly the live Pods' peers (the other injected Pods of
        // the test are gone by now, the plain and other Pods are not injected).
        let want = u64::try_from(uids.len()).unwrap();
        Node::wait_for(
            &format!("{round}: both gateway replicas at {want} peers"),
            Duration::from_secs(10),
            || {
                Ok(gateway_peers(node)?
                    .iter()
                    .all(|n| *n == want)
                    .then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}", gateway_peers(node)));
        let streams = concurrent_streams(node, replicas);
        eprintln!("{round}: addresses {addresses:?}; stream bytes per replica {streams:?} of {STREAM_BYTES}");
        for (pod, got) in &streams {
            assert!(
                *got * 10 >= STREAM_BYTES * 9,
                "{round}: {pod} received {got} of {STREAM_BYTES} stream bytes (< 90 %)"
            );
        }
        addresses
    };
    let one = scale_to(node, 1);
    check_round("1 replica", &one);
    let three = scale_to(node, 3);
    let first_three = check_round("3 replicas", &three);
    // Scale down: the gone Pods' peers leave both gateway replicas within 5 s of the Pods'
    // deletion, and their claims and records are released.
    node.kubectl(&["-n", "shop", "scale", "deployment/web", "--replicas=1"])
        .unwrap();
    Node::wait_for("two web Pods gone", Duration::from_secs(60), || {
        Ok((pods(node, "shop", "app=web")?.len() == 1).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(node, "shop")));
    let gone = Instant::now();
    Node::wait_for(
        "both gateway replicas at 1 peer",
        Duration::from_secs(5),
        || Ok(gateway_peers(node)?.iter().all(|n| *n == 1).then_some(())),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e} (within 5 s of the Pods' deletion): {:?}",
            gateway_peers(node)
        )
    });
    eprintln!(
        "scaled to 1: the gone Pods' peers left both gateway replicas {:.2} s after the Pods were deleted",
        gone.elapsed().as_secs_f64()
    );
    Node::wait_for(
        "the gone Pods' claims and records released",
        Duration::from_secs(10),
        || Ok((claims().len() == 1 && records().len() == 1).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}: claims {:?}, records {:?}", claims(), records()));
    let one = pods(node, "shop", "app=web").unwrap();
    check_round("back to 1 replica", &one);
    let three = scale_to(node, 3);
    let second_three = check_round("3 replicas again", &three);
    eprintln!(
        "addresses: first three {first_three:?}, second three {second_three:?} (pool {TUNNEL_POOL}: five Pod addresses)"
    );
}

/// A gateway metric of each Ready gateway Pod (an error when one Pod lacks it).
fn gateway_metric(node: &Node, metric: &str) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for g in pods(node, "vpn", "app.kubernetes.io/name=wg-gateway")?
        .iter()
        .filter(|p| all_ready(p))
    {
        let text = node.run_ok(
            "curl",
            &[
                "-s",
                "--max-time",
                "2",
                &format!("http://{}:9901/metrics", pod_ip(g)),
            ],
        )?;
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{metric} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no {metric} in {}'s metrics", name(g)))?;
        out.push(v);
    }
    Ok(out)
}

/// `/http-get URL` in the app container of `pod`: `Ok(body)` or `Err(what it printed)`.
fn app_get(node: &Node, pod: &str, url: &str) -> Result<String, String> {
    let out = node
        .run(
            "kubectl",
            &[
                "-n",
                "shop",
                "exec",
                pod,
                "-c",
                "app",
                "--",
                "/http-get",
                url,
            ],
        )
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Issue 16 on the real node: a NetworkPolicy allowing one /32 and one port lets exactly that
/// through the tunnel (a second port and a second address are dropped at the gateway), applied
/// and removed live, each within 2 s on both gateway replicas.
fn network_policy_in_the_tunnel(node: &Node) {
    let web = pods(node, "shop", "app=web").unwrap();
    let pod = name(&web[0]);
    let other_address = "http://10.20.0.3:8080/";
    let other_port = "http://10.20.0.2:8081/stream";
    // Without a policy the Pods reach the whole private network (the gateway's network).
    let body = app_get(node, &pod, other_address)
        .unwrap_or_else(|e| panic!("10.20.0.3 unreachable before any policy: {e}"));
    assert!(body.starts_with("client="), "{body}");
    let replicas = f64::from(u32::try_from(web.len()).unwrap());
    let t = Instant::now();
    node.apply(
        r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.20.0.2/32}}]
    ports: [{protocol: TCP, port: 8080}]
",
    )
    .unwrap();
    Node::wait_for(
        "both gateway replicas enforcing the policy for every web Pod",
        Duration::from_secs(2),
        || {
            Ok(gateway_metric(node, "wg_gateway_policy_peers")?
                .iter()
                .all(|n| (*n - replicas).abs() < 0.5)
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e} (within 2 s): {:?}",
            gateway_metric(node, "wg_gateway_policy_peers")
        )
    });
    eprintln!(
        "policy applied on both gateway replicas {:.2} s after kubectl apply",
        t.elapsed().as_secs_f64()
    );
    let allowed = app_get(node, &pod, SERVICE_URL);
    assert!(
        allowed.as_ref().is_ok_and(|b| b.starts_with("client=")),
        "the allowed /32 and port: {allowed:?}"
    );
    for (what, url) in [
        ("a second port", other_port),
        ("a second address", other_address),
    ] {
        let refused = app_get(node, &pod, url);
        assert!(refused.is_err(), "{what} ({url}) went through: {refused:?}");
        eprintln!("{what} ({url}): {}", refused.unwrap_err());
    }
    let t = Instant::now();
    node.kubectl(&["-n", "shop", "delete", "networkpolicy", "web-egress"])
        .unwrap();
    Node::wait_for(
        "the policy removed on both gateway replicas",
        Duration::from_secs(2),
        || {
            Ok(gateway_metric(node, "wg_gateway_policy_peers")?
                .iter()
                .all(|n| n.abs() < 0.5)
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e} (within 2 s)"));
    eprintln!(
        "policy removed on both gateway replicas {:.2} s after kubectl delete",
        t.elapsed().as_secs_f64()
    );
    let back = app_get(node, &pod, other_address);
    assert!(
        back.is_ok(),
        "10.20.0.3 after the policy's removal: {back:?}"
    );
}

/// The sum over the Ready gateway Pods of `wg_gateway_dropped_packets_total{reason}`.
fn gateway_drops(node: &Node, reason: &str) -> anyhow::Result<f64> {
    Ok(gateway_metric(
        node,
        &format!("wg_gateway_dropped_packets_total{{reason=\"{reason}\"}}"),
    )?
    .iter()
    .sum())
}

/// A node address the gateway Pods can route to (on the node's loopback), for the closed-gateway
/// step: the node's own addresses on the Pod network are what kubelet probes come from, so a Pod
/// cannot route them into the tunnel without losing its probes.
const NODE_EXTRA_ADDRESS: &str = "10.99.99.1";

/// An injected Pod whose routes send the cluster network, a node address, the metadata address
/// and another peer's tunnel address into the tunnel, besides the private network.
fn probe_pod(image: &str, routes: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: probe
  namespace: shop
  labels: {{app: probe}}
  annotations: {{wg-injector.io/inject: "true", wg-injector.io/routes: "{routes}"}}
spec:
  serviceAccountName: web
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
"#
    )
}

/// Issue 16 on the real node: the gateway forwards only into the networks it advertises. A Pod
/// that routes the cluster network, the node, 169.254.169.254 and another peer into the tunnel
/// gets nothing there, and each refused request is counted by the gateway
/// (`wg_gateway_dropped_packets_total{reason="outside_networks"}`).
fn closed_by_default(node: &Node, image: &str, vault: (&str, &str)) {
    let injector = pods(node, "wg-system", "app.kubernetes.io/name=wg-injector").unwrap();
    let cluster_ip = pod_ip(&injector[0]);
    node.run_ok(
        "ip",
        &[
            "addr",
            "add",
            &format!("{NODE_EXTRA_ADDRESS}/32"),
            "dev",
            "lo",
        ],
    )
    .unwrap();
    // Another peer: a web Pod's tunnel address, from its record.
    let web = pods(node, "shop", "app=web").unwrap();
    let uid = web[0]["metadata"]["uid"].as_str().unwrap().to_owned();
    let record: Value = serde_json::from_slice(
        &node
            .bash(
                "bao kv get -format=json \"$P\"",
                &[
                    ("BAO_ADDR", vault.0),
                    ("BAO_TOKEN", vault.1),
                    ("P", &format!("secret/wg/peers/vpn-gateway/shop/web/{uid}")),
                ],
            )
            .unwrap()
            .stdout,
    )
    .unwrap();
    let peer = record["data"]["data"]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let targets = [
        (
            "the cluster network (the injector Pod)",
            cluster_ip.clone(),
            8443,
        ),
        ("the node", NODE_EXTRA_ADDRESS.to_owned(), 10250),
        ("the metadata address", "169.254.169.254".to_owned(), 80),
        (
            "another peer (a web Pod's tunnel address)",
            peer.clone(),
            9901,
        ),
    ];
    let routes = std::iter::once(PRIVATE_NETWORK.to_owned())
        .chain(targets.iter().map(|t| format!("{}/32", t.1)))
        .collect::<Vec<_>>()
        .join(",");
    node.apply(&probe_pod(image, &routes)).unwrap();
    Node::wait_for("the probe Pod Ready", Duration::from_secs(90), || {
        ready_pods(node, "shop", "app=probe", 1)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(node, "shop")));
    // The tunnel works for what the gateway advertises.
    let body = Node::wait_for(
        "the probe's request to the service",
        Duration::from_secs(20),
        || Ok(app_get(node, "probe", SERVICE_URL).ok()),
    )
    .unwrap();
    assert!(body.starts_with("client="), "{body}");
    for (what, ip, port) in &targets {
        let before = gateway_drops(node, "outside_networks").unwrap();
        let url = format!("http://{ip}:{port}/");
        let refused = app_get(node, "probe", &url);
        assert!(
            refused.is_err(),
            "{what} ({url}) answered through the tunnel: {refused:?}"
        );
        let counted = Node::wait_for(
            "the gateway to count the dropped packets",
            Duration::from_secs(5),
            || {
                let now = gateway_drops(node, "outside_networks")?;
                Ok((now > before).then_some(now - before))
            },
        )
        .unwrap_or_else(|e| panic!("{what} ({url}): {e}"));
        eprintln!(
            "{what} ({url}): refused ({}), {counted} packets dropped at the gateway (outside_networks)",
            refused.unwrap_err()
        );
    }
    node.kubectl(&["-n", "shop", "delete", "pod", "probe", "--wait=false"])
        .unwrap();
}

/// `kubectl ARGS` that must be refused: its error output.
fn refused(node: &Node, args: &[&str]) -> String {
    let out = node.run("kubectl", args).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "kubectl {args:?} was not refused:\n{text}"
    );
    text
}

/// Issue 16 on the real node: only the injector sets `wg-injector.io/tunnel`. A Pod that sets it
/// itself is refused at CREATE (in a labelled namespace by the mutating webhook, elsewhere by the
/// validating webhook a 1.20 cluster gets instead of the ValidatingAdmissionPolicy), and the label
/// cannot be added to, changed on or removed from a running Pod.
fn tunnel_label_only_from_the_injector(node: &Node, image: &str) {
    let forged = |ns: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: forger\n  namespace: {ns}\n  labels: {{wg-injector.io/tunnel: vpn-gateway}}\nspec:\n  containers:\n  - name: app\n    image: {image}\n    imagePullPolicy: Never\n"
        )
    };
    for ns in ["shop", "default"] {
        let text = format!(
            "{:#}",
            node.apply(&forged(ns))
                .expect_err("a Pod setting the tunnel label was admitted")
        );
        assert!(text.contains("wg-injector.io/tunnel"), "{ns}: {text}");
        eprintln!("a Pod in {ns} setting the tunnel label: {}", text.trim());
    }
    let web = pods(node, "shop", "app=web").unwrap();
    let web = name(&web[0]);
    for args in [
        vec![
            "-n",
            "shop",
            "label",
            "pod",
            "plain",
            "wg-injector.io/tunnel=vpn-gateway",
        ],
        vec![
            "-n",
            "shop",
            "label",
            "--overwrite",
            "pod",
            &web,
            "wg-injector.io/tunnel=other",
        ],
        vec!["-n", "shop", "label", "pod", &web, "wg-injector.io/tunnel-"],
    ] {
        let text = refused(node, &args);
        assert!(text.contains("wg-injector.io/tunnel"), "{args:?}: {text}");
        eprintln!("kubectl {}: {}", args.join(" "), text.trim());
    }
    // Other labels of an injected Pod stay the user's.
    node.kubectl(&["-n", "shop", "label", "pod", &web, "team=checkout"])
        .unwrap();
}

/// An injected Pod of namespace `ns` (service account `default`), with the namespace labelled
/// for injection and holding the Vault CA ConfigMap, as docs/install.md step 5 does.
fn namespace_with_a_pod(image: &str, ns: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels: {{wg-injector.io/injection: enabled, pod-security.kubernetes.io/enforce: privileged}}
---
apiVersion: v1
kind: Pod
metadata:
  name: stranger
  namespace: {ns}
  labels: {{app: stranger}}
  annotations: {{wg-injector.io/inject: "true"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
"#
    )
}

/// `/http-get URL` in the app container of Pod `ns/pod`: stdout and stderr together.
fn exec_get(node: &Node, ns: &str, pod: &str, url: &str) -> (bool, String) {
    let out = node
        .run(
            "kubectl",
            &["-n", ns, "exec", pod, "-c", "app", "--", "/http-get", url],
        )
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issue 16 on the real node: the gateway's `access.namespaceSelector` (docs/gateway.md, "Who
/// may use the gateway"). Of two namespaces only the selected one's Pods get a peer; the other's
/// Pod is not ready, says why on its sidecar's /ready, is counted at the gateway, and reaches
/// nothing; labelling its namespace admits it.
fn access_by_namespace(node: &Node, image: &str, ca_path: &str) {
    node.kubectl(&["label", "namespace", "shop", "vpn=allowed", "--overwrite"])
        .unwrap();
    let t = Instant::now();
    let out = node
        .bash(
            "helm upgrade vpn-gateway ./charts/wg-gateway -n vpn --reuse-values \
             --set access.namespaceSelector.matchLabels.vpn=allowed --wait --timeout 3m",
            &[("PATH", &node.path_env())],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "helm upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "gateway upgraded with access.namespaceSelector vpn=allowed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    node.apply(&namespace_with_a_pod(image, "elsewhere"))
        .unwrap();
    node.bash(
        "kubectl -n elsewhere create configmap vault-ca --from-file=ca.crt=\"$CA\" --dry-run=client -o yaml | kubectl apply -f -",
        &[("CA", ca_path), ("PATH", &node.path_env())],
    )
    .unwrap();
    // The selected namespace's Pods keep their tunnel.
    let web = pods(node, "shop", "app=web").unwrap();
    let body = Node::wait_for(
        "web through the upgraded gateway",
        Duration::from_secs(60),
        || Ok(app_request(node, &name(&web[0])).ok()),
    )
    .unwrap();
    assert!(body.starts_with("client="), "{body}");
    // The other namespace's Pod: never ready, and its sidecar says why. In classic mode (this
    // 1.20 node) its app container is held by the sidecar's postStart hook, so the reason is read
    // the way the hook reads it (`wg-sidecar wait`, in the sidecar container), which is also
    // what the kubelet's FailedPostStartHook event would show.
    let why = Node::wait_for(
        "the stranger's /ready to name the refusal",
        Duration::from_secs(90),
        || {
            let out = node.run(
                "kubectl",
                &[
                    "-n",
                    "elsewhere",
                    "exec",
                    "stranger",
                    "-c",
                    "wg-sidecar",
                    "--",
                    "/usr/local/bin/wg-sidecar",
                    "wait",
                    "--addr=127.0.0.1:9901",
                    "--timeout=1s",
                ],
            )?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(text.contains("refused by gateway").then_some(text))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe(node, "elsewhere")));
    assert!(
        why.contains("namespace elsewhere") && why.contains("vpn=allowed"),
        "{why}"
    );
    eprintln!("elsewhere/stranger /ready: {}", why.trim());
    let stranger = node
        .kubectl_json(&["-n", "elsewhere", "get", "pod", "stranger"])
        .unwrap();
    assert!(!all_ready(&stranger), "the refused Pod is Ready");
    let refused_at_gateway = gateway_metric(
        node,
        "wg_gateway_peers_refused_total{reason=\"namespace_not_selected\"}",
    )
    .unwrap();
    assert!(
        refused_at_gateway.iter().all(|n| *n >= 1.0),
        "{refused_at_gateway:?}"
    );
    // Held, its app has not started: it reaches nothing (nor could it: see the kill switch).
    let (ok, text) = exec_get(node, "elsewhere", "stranger", SERVICE_URL);
    assert!(!ok, "the refused Pod reached the service: {text}");
    eprintln!(
        "gateway replicas count the refusal {refused_at_gateway:?}; its request: {}",
        text.trim()
    );
    // Labelling the namespace admits it.
    let t = Instant::now();
    node.kubectl(&["label", "namespace", "elsewhere", "vpn=allowed"])
        .unwrap();
    let body = Node::wait_for(
        "the stranger admitted after the relabel",
        Duration::from_secs(60),
        || {
            let (ok, text) = exec_get(node, "elsewhere", "stranger", SERVICE_URL);
            Ok(ok.then_some(text))
        },
    )
    .unwrap();
    assert!(body.starts_with("client="), "{body}");
    eprintln!(
        "namespace relabelled -> the stranger reaches the service {:.2} s later",
        t.elapsed().as_secs_f64()
    );
    node.kubectl(&["delete", "namespace", "elsewhere", "--wait=false"])
        .unwrap();
}
