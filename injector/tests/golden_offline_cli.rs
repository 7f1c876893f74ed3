//! The offline CLI as a user runs it: the real `wg-injector` binary on the manifests in
//! `testdata/offline/`, checking what it writes to stdout and stderr and its exit code.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize as _;
use serde_yaml_ng::Value;

fn offline(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/offline")
        .join(file)
}

fn wg_injector(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wg-injector"))
        .args(args)
        .env_remove("WG_INJECTOR_CONFIG")
        .env_remove("WG_INJECTOR_FILENAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn names(containers: &Value) -> Vec<String> {
    containers
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn template<'a>(doc: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(doc, |v, k| &v[*k])
}

#[test]
fn inject_writes_every_opted_in_pod_template_and_keeps_everything_else() {
    let file = offline("workloads.yaml");
    let config = offline("config.yaml");
    let out = wg_injector(
        &[
            "inject",
            "-f",
            file.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    let input = docs(&std::fs::read_to_string(&file).unwrap());
    let output = docs(&ok_stdout(&out));
    assert_eq!(input.len(), output.len());

    let by_kind = |kind: &str| {
        let i = input
            .iter()
            .position(|d| d["kind"].as_str() == Some(kind))
            .unwrap();
        (&input[i], &output[i])
    };
    for kind in ["Namespace", "Service"] {
        let (before, after) = by_kind(kind);
        assert_eq!(
            before, after,
            "{kind} is not a workload and stays as it was"
        );
    }
    let (before, after) = by_kind("DaemonSet");
    assert_eq!(
        before, after,
        "a template with inject: \"false\" is left alone"
    );

    for (kind, path) in [
        ("Deployment", &["spec", "template"][..]),
        ("StatefulSet", &["spec", "template"][..]),
        ("ReplicaSet", &["spec", "template"][..]),
        ("CronJob", &["spec", "jobTemplate", "spec", "template"][..]),
    ] {
        let (before, after) = by_kind(kind);
        let t = template(after, path);
        assert_eq!(names(&t["spec"]["initContainers"]), ["wg-init"], "{kind}");
        assert_eq!(
            names(&t["spec"]["containers"])[0],
            "wg-sidecar",
            "{kind}: classic mode (config says no native sidecars)"
        );
        assert_eq!(
            t["spec"]["containers"][0]["image"].as_str(),
            Some("localhost/wg-sidecar:offline"),
            "{kind}: the --config file is used"
        );
        assert_eq!(
            before["metadata"], after["metadata"],
            "{kind}: object metadata kept"
        );
        let mut before_rest = before.clone();
        let mut after_rest = after.clone();
        *template_mut(&mut before_rest, path) = Value::Null;
        *template_mut(&mut after_rest, path) = Value::Null;
        assert_eq!(
            before_rest, after_rest,
            "{kind}: only the Pod template changes"
        );
    }
    let (_, deployment) = by_kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let args = &deployment["spec"]["template"]["spec"]["initContainers"][0]["args"];
    assert_eq!(
        args[1].as_str(),
        Some("--routes=10.20.0.0/16"),
        "the template's annotations are honoured"
    );

    let (_, job) = by_kind("Job");
    assert_eq!(
        names(&job["spec"]["template"]["spec"]["initContainers"]),
        ["wg-init", "wg-sidecar"],
        "sidecar-mode: native puts wg-sidecar right after wg-init"
    );
}

fn template_mut<'a>(doc: &'a mut Value, path: &[&str]) -> &'a mut Value {
    path.iter().fold(doc, |v, k| v.get_mut(*k).unwrap())
}

#[test]
fn uninject_of_the_injected_manifests_gives_back_the_input_and_injecting_twice_equals_once() {
    let file = offline("workloads.yaml");
    let injected = ok_stdout(&wg_injector(
        &["inject", "-f", file.to_str().unwrap()],
        None,
    ));
    let twice = ok_stdout(&wg_injector(&["inject", "-f", "-"], Some(&injected)));
    assert_eq!(
        twice, injected,
        "injecting injected manifests changes nothing"
    );
    let removed = ok_stdout(&wg_injector(&["uninject", "-f", "-"], Some(&injected)));
    // Compared as JSON values: keys inside a rewritten Pod template come back in the Kubernetes
    // field order, which is the only difference YAML mappings would see.
    let as_json = |text: &str| -> Vec<serde_json::Value> {
        docs(text)
            .iter()
            .map(|d| serde_json::to_value(d).unwrap())
            .collect()
    };
    assert_eq!(
        as_json(&removed),
        as_json(&std::fs::read_to_string(&file).unwrap())
    );
}

#[test]
fn a_json_list_comes_back_as_json_with_unrelated_fields_in_their_order() {
    let file = offline("list.json");
    let text = ok_stdout(&wg_injector(
        &["inject", "-f", file.to_str().unwrap()],
        None,
    ));
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pod = &list["items"][0];
    assert_eq!(
        pod["status"]["phase"], "Pending",
        "fields outside metadata/spec are kept"
    );
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "wg-init");
    assert_eq!(
        pod["metadata"]["labels"]["wg-injector.io/tunnel"],
        "default"
    );
    let zeta = text.find("\"zeta\"").unwrap();
    let alpha = text.find("\"alpha\"").unwrap();
    assert!(zeta < alpha, "the ConfigMap's keys keep their order");
}

#[test]
fn a_denied_template_exits_non_zero_with_the_message_on_stderr_and_nothing_on_stdout() {
    let file = offline("denied.yaml");
    let out = wg_injector(&["inject", "-f", file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no partial output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Deployment/broken")
            && stderr.contains("annotation wg-injector.io/mtu=\"99999\" is invalid"),
        "{stderr}"
    );
}

#[test]
fn a_deployment_template_with_one_secret_for_every_replica_is_denied_naming_the_deployment() {
    let file = offline("shared-key.yaml");
    let out = wg_injector(&["inject", "-f", file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no partial output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Deployment/web: wg-injector.io/key-source \"secret:web-wg\" would give every Pod of Deployment web one WireGuard key"),
        "{stderr}"
    );
}

#[test]
fn static_identities_of_a_stateful_sets_pods_and_a_bare_pod_are_injected() {
    let file = offline("static-identities.yaml");
    let output = docs(&ok_stdout(&wg_injector(
        &["inject", "-f", file.to_str().unwrap()],
        None,
    )));
    let sidecar = |spec: &Value| {
        let all = spec["initContainers"]
            .as_sequence()
            .into_iter()
            .chain(spec["containers"].as_sequence())
            .flatten();
        all.into_iter()
            .find(|c| c["name"].as_str() == Some("wg-sidecar"))
            .cloned()
            .unwrap()
    };
    let args = |spec: &Value| -> Vec<String> {
        sidecar(spec)["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let db = args(&output[0]["spec"]["template"]["spec"]);
    assert!(
        db.contains(&"--vault-key-path=wg/keys/$(WG_POD_NAMESPACE)/$(WG_POD_NAME)".to_owned()),
        "{db:?}"
    );
    let debug = &output[1]["spec"];
    assert!(
        args(debug).contains(&"--key-source=file".to_owned()),
        "{debug:?}"
    );
    assert!(
        debug["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"].as_str() == Some("debug-wg")),
        "{debug:?}"
    );
}

#[test]
fn the_example_deployment_is_injected_with_a_key_born_in_each_pod() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deployment.yaml");
    let output = docs(&ok_stdout(&wg_injector(
        &["inject", "-f", file.to_str().unwrap()],
        None,
    )));
    let deployment = &output[0];
    assert!(deployment["spec"]["replicas"].as_u64() >= Some(2));
    let text = serde_yaml_ng::to_string(deployment).unwrap();
    assert!(text.contains("--key-source=vault"), "{text}");
    assert!(!text.contains("--vault-key-path"), "{text}");
}

#[test]
fn a_missing_input_file_fails_naming_the_file() {
    let out = wg_injector(&["inject", "-f", "/nonexistent/manifests.yaml"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/manifests.yaml"), "{stderr}");
}
