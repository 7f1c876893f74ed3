//! The wg-gateway chart's alerts and dashboard name metrics a running gateway exports.
//!
//! Renders `charts/wg-gateway` with `helm template` (PrometheusRule and Grafana dashboard on,
//! rotation on), takes every `PromQL` expression of the rules and every target (and templating
//! query) of the dashboard, extracts the metric names in them with a small tokenizer, starts a
//! real `wg-sidecar gateway` (vault mode, OpenBao dev server) with one connected sidecar in
//! network namespaces (`wgobs*`), scrapes its `/metrics` and asserts every name is exported.
//! Metrics of other exporters (kube-state-metrics) must be listed in [`EXTERNAL`].
//!
//! Run as root: `cargo test -p wg-sidecar --test gateway_observability` (needs the lab tools:
//! `bash scripts/lab-install.sh`).
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_lines
)]

mod lab;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::Command,
    time::Duration,
};

use lab::{
    find_binary, metric, require_root, scratch, spawn_sidecar, veth, wait_for, Netns, OpenBao,
};
use serde_json::Value;

/// Metrics the chart's expressions read from other exporters, by name.
const EXTERNAL: &[&str] = &[
    // kube-state-metrics: the rotation CronJob's failed Jobs (WgGatewayKeyRotationFailing).
    "kube_job_status_failed",
];

/// `PromQL` functions, aggregations and keywords: identifiers that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
];

/// Metric names in a `PromQL` expression: identifiers outside strings, label matchers, label
/// lists and ranges that are not `PromQL` words nor function calls.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`: a label list.
    let mut label_list_next = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' && c != b'`' { 2 } else { 1 };
                }
                i += 1;
            }
            // Label matchers and ranges / subqueries: nothing in them is a metric name.
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                while i < b.len() && b[i] != close {
                    if b[i] == b'"' {
                        i += 1;
                        while i < b.len() && b[i] != b'"' {
                            i += if b[i] == b'\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            b'(' if label_list_next => {
                label_list_next = false;
                while i < b.len() && b[i] != b')' {
                    i += 1;
                }
                i += 1;
            }
            b'0'..=b'9' | b'.' => {
                // A number or a duration (1e-9, 0.25, 10m, 0x1f).
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
                if i < b.len()
                    && (b[i] == b'-' || b[i] == b'+')
                    && b[i - 1].eq_ignore_ascii_case(&b'e')
                {
                    i += 1;
                }
            }
            b'$' => {
                // A Grafana variable outside a string (e.g. `$__rate_interval` is in a range).
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let call = j < b.len() && b[j] == b'(';
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list_next = true;
                } else if !call && !PROMQL_WORDS.contains(&lower.as_str()) {
                    names.insert(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The chart rendered with the rules and the dashboard on.
fn render_chart(chart: &Path) -> Vec<Value> {
    let out = Command::new(find_binary("helm").unwrap())
        .args(["template", "vpn-gateway"])
        .arg(chart)
        .args([
            "--namespace",
            "wg-system",
            "--set",
            "server.publicEndpoint=203.0.113.1:51820",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "rotation.enabled=true",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|d| {
            use serde::Deserialize as _;
            let v = Value::deserialize(d).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// Every expression of the rendered rules and dashboard, named by where it comes from.
fn expressions(objects: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "PrometheusRule")
        .collect();
    assert_eq!(rules.len(), 1, "one PrometheusRule rendered");
    for g in rules[0]["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let cms: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"] == "vpn-gateway-wg-gateway-dashboard"
        })
        .collect();
    assert_eq!(cms.len(), 1, "the dashboard ConfigMap is rendered");
    let dash: Value =
        serde_json::from_str(cms[0]["data"]["wg-gateway.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        dash["templating"]["list"][0]["type"], "datasource",
        "the datasource is a variable"
    );
    for p in dash["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            out.push((
                format!(
                    "panel {:?} target {}",
                    p["title"].as_str().unwrap(),
                    t["refId"]
                ),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        // Grafana's label_values(SELECTOR, LABEL): the selector is PromQL.
        let q = v["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map_or(q, |(sel, _label)| sel);
        out.push((format!("variable {}", v["name"]), inner.to_owned()));
    }
    out
}

/// Names a scrape exports: every sample's name, and every declared family with the names of
/// its samples (`_total` of a counter, `_bucket`/`_sum`/`_count` of a histogram), so a family
/// with no series yet (no refusal so far) counts as exported.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// What the chart's expressions name that `exported` lacks, by name → where.
fn missing(
    exprs: &[(String, String)],
    exported: &BTreeSet<String>,
) -> BTreeMap<String, Vec<String>> {
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (whence, e) in exprs {
        for n in metric_names(e) {
            let known = if n.starts_with("kube_") {
                EXTERNAL.contains(&n.as_str())
            } else {
                exported.contains(&n)
            };
            if !known {
                missing.entry(n).or_default().push(whence.clone());
            }
        }
    }
    missing
}

#[test]
fn the_tokenizer_finds_metric_names_only() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{job=~\"x|y\",le!=\"1\"}[5m]))) > 1e-9"
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("time() - max by (pod) (b{n=\"{x}\"} > 0) > 9 * 86400 and on (pod) c offset 10m"),
        ["b", "c"]
    );
    assert_eq!(
        names("count(time() - d > 180 <= 600) / ignoring (x) group_left (y) sum without (z) (e) or vector(0)"),
        ["d", "e"]
    );
    assert_eq!(names("rate(f[$__rate_interval])"), ["f"]);
}

#[test]
fn every_chart_expression_names_a_metric_the_running_gateway_exports() {
    require_root();
    let chart = lab::workspace_root().join("charts/wg-gateway");
    let objects = render_chart(&chart);
    let exprs = expressions(&objects);
    let named: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    assert!(
        named.contains("wg_gateway_peer_last_handshake_timestamp_seconds")
            && named.contains("wg_gateway_active_peers")
            && named.contains("wg_gateway_reconcile_duration_seconds_bucket"),
        "the tokenizer found the expected names: {named:?}"
    );
    for e in EXTERNAL {
        assert!(named.contains(*e), "{e} is listed as external but not used");
    }

    // A gateway with one connected sidecar: pod (OpenBao, sidecar) ──veth── gw.
    let pod = Netns::new("wgobsp").unwrap();
    let gw = Netns::new("wgobsg").unwrap();
    veth(&pod, "192.168.79.2/24", &gw, "192.168.79.1/24").unwrap();
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
    let keys = |args: &[&str]| -> Value {
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
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap()
    };
    keys(&[
        "provision-gateway",
        "corp",
        "--endpoints",
        "192.168.79.1:51820",
        "--allowed-ips",
        "10.21.0.0/24",
        "--pool",
        "10.98.0.0/16",
    ]);
    let web = keys(&[
        "provision",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--pool",
        "10.98.0.0/16",
    ]);
    let web_key = web["public_key"].as_str().unwrap().to_owned();

    let gwlog = dir.path().join("gateway.log");
    let mut args: Vec<String> = [
        "--log-format",
        "text",
        "gateway",
        "--interface",
        &lab::unique("wgobs"),
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
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(vault("http://192.168.79.2:8200"));
    let _gateway = spawn_sidecar(&gw, &args, &gwlog).unwrap();
    let log = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(15), || gw
            .http_get("http://127.0.0.1:9901/ready")
            .is_ok_and(|r| r.0 == 200)),
        "gateway never ready: {}",
        log(&gwlog)
    );

    let init = pod
        .command(lab::sidecar_bin())
        .args(["init", "--routes", "10.21.0.0/24"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let sclog = dir.path().join("sidecar.log");
    let mut args: Vec<String> = [
        "--log-format",
        "text",
        "run",
        "--interface",
        &lab::unique("wgobs"),
        "--gateway",
        "corp",
        "--routes",
        "10.21.0.0/24",
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

    let scrape = || gw.http_get("http://127.0.0.1:9901/metrics").unwrap().1;
    let handshake =
        format!("wg_gateway_peer_last_handshake_timestamp_seconds{{public_key=\"{web_key}\"}}");
    assert!(
        wait_for(Duration::from_secs(20), || metric(
            &scrape(),
            "wg_gateway_active_peers"
        ) == Some(1.0)),
        "no connected peer.\nmetrics: {}\ngateway: {}\nsidecar: {}",
        scrape(),
        log(&gwlog),
        log(&sclog)
    );
    // The handshake is sampled every second and the key checked every --poll-interval (1 s).
    wait_for(Duration::from_secs(5), || {
        let m = scrape();
        metric(&m, &handshake).is_some()
            && metric(&m, "wg_gateway_key_activation_timestamp_seconds").is_some_and(|t| t > 0.0)
    });
    let text = scrape();
    let exported = exported(&text);
    let missing = missing(&exprs, &exported);
    assert!(
        missing.is_empty(),
        "the chart names metrics the gateway does not export (name → where):\n{missing:#?}\n\
         exported: {exported:#?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t = metric(&text, &handshake).unwrap();
    assert!(
        (now - 60.0..=now + 5.0).contains(&t),
        "handshake at {t}, now {now}"
    );
    let key_at = metric(&text, "wg_gateway_key_activation_timestamp_seconds").unwrap();
    assert!(
        (now - 120.0..=now + 5.0).contains(&key_at),
        "key at {key_at}, now {now}"
    );
    assert_eq!(metric(&text, "wg_gateway_key_version"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "wg_gateway_key_pending_activation_timestamp_seconds"),
        Some(0.0),
        "{text}"
    );

    // Issue 18, item 12: the per-peer byte counters are read at scrape time, not as of the last
    // 1 s tick. The gateway answers pings to an address of its own in the advertised network.
    gw.ip(&["addr", "add", "10.21.0.1/32", "dev", "lo"])
        .unwrap();
    let rx = format!("wg_gateway_peer_receive_bytes_total{{public_key=\"{web_key}\"}}");
    let tx = format!("wg_gateway_peer_transmit_bytes_total{{public_key=\"{web_key}\"}}");
    // 10 echo requests of 1200 payload bytes: 1228-byte IP packets each way.
    let least = 10.0 * 1228.0;
    for round in 0..3 {
        let m = scrape();
        let (rx0, tx0) = (
            metric(&m, &rx).unwrap_or(0.0),
            metric(&m, &tx).unwrap_or(0.0),
        );
        let started = std::time::Instant::now();
        pod.run(
            "ping",
            &["-c10", "-i0.01", "-s1200", "-W2", "-q", "10.21.0.1"],
        )
        .unwrap();
        let m = scrape();
        let took = started.elapsed();
        let (rx1, tx1) = (
            metric(&m, &rx).unwrap_or(0.0),
            metric(&m, &tx).unwrap_or(0.0),
        );
        assert!(
            rx1 - rx0 >= least && tx1 - tx0 >= least,
            "round {round}: {least} bytes each way went through the tunnel and the gateway's \
             /metrics was scraped right after ({took:?} for both): rx +{} tx +{}",
            rx1 - rx0,
            tx1 - tx0
        );
    }
    assert_eq!(
        metric(&scrape(), "wg_gateway_metrics_refresh_failures_total"),
        Some(0.0)
    );

    // Issue 18, item 11: a healthy gateway and sidecar (no kernel WireGuard here, a peer that
    // connected after the gateway started) log no ERROR, and text logs written to a file carry
    // no colour codes.
    for (what, text) in [("gateway", log(&gwlog)), ("sidecar", log(&sclog))] {
        assert!(
            !text.contains("ERROR"),
            "the healthy {what} logged an ERROR:\n{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in the {what}'s log file:\n{text}"
        );
    }

    eprintln!(
        "{} expressions, {} metric names, all exported (external: {EXTERNAL:?})",
        exprs.len(),
        named.len()
    );
    drop(bao);
}
