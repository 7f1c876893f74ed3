//! Driving the chart tools of the lab: the Helm 3 CLI (`helm lint`, `helm template`), the Helm 4
//! engine (the `helm_python` SDK in the lab's Python venv) and `kubernetes-validate`, plus
//! splitting rendered YAML into objects.
//!
//! This module only runs those tools on the charts under `charts/`; it never installs anything
//! and never talks to a cluster. A missing tool is an error naming `scripts/lab-install.sh`.

use crate::lab;
use anyhow::{bail, Context as _};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Kinds that come from CRDs (Prometheus Operator, cert-manager): no JSON schema ships for
/// them, so they are checked for shape instead, with the only apiVersion the charts may use.
pub const CRD_KINDS: &[(&str, &str)] = &[
    ("ServiceMonitor", "monitoring.coreos.com/v1"),
    ("PrometheusRule", "monitoring.coreos.com/v1"),
    ("Certificate", "cert-manager.io/v1"),
    ("Issuer", "cert-manager.io/v1"),
];

/// The folder of a chart of this repository (`charts/<name>`).
#[must_use]
pub fn chart_dir(name: &str) -> PathBuf {
    lab::workspace_root().join("charts").join(name)
}

/// The Helm 3 CLI of the lab.
pub fn helm3() -> anyhow::Result<PathBuf> {
    lab::find_binary("helm")
}

/// The `kubernetes-validate` CLI of the lab.
pub fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    lab::find_binary("kubernetes-validate")
}

/// The Python interpreter that has the Helm 4 engine (`helm_python`): `$WG_LAB_PYTHON`, else
/// the `python` beside the real `kubernetes-validate` script (both live in the lab's venv).
pub fn lab_python() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("WG_LAB_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let validate = std::fs::canonicalize(kubernetes_validate()?)
        .context("failed to resolve the kubernetes-validate script")?;
    let python = validate.with_file_name("python");
    if !python.is_file() {
        bail!(
            "no python beside {}: the lab venv is incomplete; run `bash scripts/lab-install.sh` \
             or set WG_LAB_PYTHON",
            validate.display()
        );
    }
    Ok(python)
}

/// Run a command to completion, capturing its output; an error if it cannot start.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    command
        .output()
        .with_context(|| format!("failed to run {command:?}"))
}

/// `stdout` of a command that must succeed; otherwise an error carrying its stderr.
pub fn run_ok(command: &mut Command) -> anyhow::Result<String> {
    let output = run(command)?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).context("tool printed non-UTF-8 output")
}

/// One `helm template` call of the Helm 3 CLI.
#[derive(Debug, Clone)]
pub struct Template<'a> {
    /// Chart folder name under `charts/`.
    pub chart: &'a str,
    /// Release name.
    pub release: &'a str,
    /// Release namespace.
    pub namespace: &'a str,
    /// `--kube-version` (e.g. `1.29.0`).
    pub kube_version: &'a str,
    /// A values file (`-f`), if any.
    pub values_file: Option<&'a Path>,
    /// `--set` expressions.
    pub sets: &'a [&'a str],
}

impl Template<'_> {
    /// The command line (not yet run).
    pub fn command(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(helm3()?);
        command
            .arg("template")
            .arg(self.release)
            .arg(chart_dir(self.chart))
            .args(["--namespace", self.namespace])
            .args(["--kube-version", self.kube_version]);
        if let Some(file) = self.values_file {
            command.arg("--values").arg(file);
        }
        for set in self.sets {
            command.args(["--set", set]);
        }
        Ok(command)
    }

    /// Render, returning the raw multi-document YAML.
    pub fn render_text(&self) -> anyhow::Result<String> {
        run_ok(&mut self.command()?)
    }

    /// Render, returning the objects.
    pub fn render(&self) -> anyhow::Result<Vec<Value>> {
        split_documents(&self.render_text()?)
    }
}

/// Parse multi-document YAML into JSON values, dropping empty documents.
pub fn split_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).context("rendered output is not valid YAML")?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

/// `kind` of an object ("" when missing).
#[must_use]
pub fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

/// `apiVersion` of an object ("" when missing).
#[must_use]
pub fn api_version(object: &Value) -> &str {
    object["apiVersion"].as_str().unwrap_or_default()
}

/// `metadata.name` of an object ("" when missing).
#[must_use]
pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// The objects of one kind.
#[must_use]
pub fn of_kind<'a>(objects: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == wanted).collect()
}

/// The Helm 4 engine's answer for one render.
#[derive(Debug)]
pub enum Helm4Render {
    /// Rendered manifests by template path (NOTES.txt excluded).
    Rendered(Vec<(String, String)>),
    /// The engine refused (schema or template error): the message.
    Refused(String),
}

const HELM4_RENDER: &str = r#"
import json, sys
import helm_python as helm
chart_dir, values_json, release, namespace = sys.argv[1:5]
try:
    with helm.Chart.load(chart_dir) as chart:
        out = chart.render(values=json.loads(values_json), name=release, namespace=namespace,
                           is_install=True)
    print(json.dumps({"rendered": out}))
except helm.HelmError as e:
    print(json.dumps({"refused": str(e)}))
"#;

/// Render a chart with the Helm 4 engine (offline; its default Kubernetes version).
pub fn helm4_render(
    chart: &str,
    values: &Value,
    release: &str,
    namespace: &str,
) -> anyhow::Result<Helm4Render> {
    let answer = helm4_answer(chart, values, release, namespace)?;
    if let Some(message) = answer["refused"].as_str() {
        return Ok(Helm4Render::Refused(message.to_owned()));
    }
    let Some(rendered) = answer["rendered"].as_object() else {
        bail!("helm4 render answered neither rendered nor refused: {answer}");
    };
    let mut manifests: Vec<(String, String)> = rendered
        .iter()
        .filter(|(path, _)| !path.ends_with("NOTES.txt"))
        .map(|(path, text)| (path.clone(), text.as_str().unwrap_or_default().to_owned()))
        .collect();
    manifests.sort();
    Ok(Helm4Render::Rendered(manifests))
}

/// The `NOTES.txt` the Helm 4 engine renders for an install (what `helm install` prints; the
/// Helm 3 CLI's `helm template` never renders it). An error when the engine refuses the values.
pub fn helm4_notes(
    chart: &str,
    values: &Value,
    release: &str,
    namespace: &str,
) -> anyhow::Result<String> {
    let answer = helm4_answer(chart, values, release, namespace)?;
    if let Some(message) = answer["refused"].as_str() {
        bail!("the Helm 4 engine refused {chart} with {values}: {message}");
    }
    answer["rendered"]
        .as_object()
        .into_iter()
        .flatten()
        .find(|(path, _)| path.ends_with("/NOTES.txt"))
        .and_then(|(_, text)| text.as_str())
        .map(str::to_owned)
        .with_context(|| format!("the Helm 4 engine rendered no NOTES.txt for {chart}"))
}

/// The Helm 4 engine's JSON answer for one install render: `rendered` or `refused`.
fn helm4_answer(
    chart: &str,
    values: &Value,
    release: &str,
    namespace: &str,
) -> anyhow::Result<Value> {
    let stdout = run_ok(
        Command::new(lab_python()?)
            .args(["-c", HELM4_RENDER])
            .arg(chart_dir(chart))
            .arg(values.to_string())
            .args([release, namespace]),
    )?;
    serde_json::from_str(&stdout).context("helm4 render printed no JSON")
}

const HELM4_KUBE_VERSION: &str = r#"
import os, sys, tempfile
import helm_python as helm
with tempfile.TemporaryDirectory() as d:
    os.makedirs(os.path.join(d, "probe", "templates"))
    open(os.path.join(d, "probe", "Chart.yaml"), "w").write("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    open(os.path.join(d, "probe", "templates", "v.yaml"), "w").write("{{ .Capabilities.KubeVersion.Version }}")
    with helm.Chart.load(os.path.join(d, "probe")) as chart:
        print(chart.render(name="probe")["probe/templates/v.yaml"])
"#;

/// The Kubernetes version the Helm 4 engine renders for when offline (e.g. `v1.36.0`).
pub fn helm4_default_kube_version() -> anyhow::Result<String> {
    let stdout = run_ok(Command::new(lab_python()?).args(["-c", HELM4_KUBE_VERSION]))?;
    Ok(stdout.trim().to_owned())
}

const HELM4_LINT: &str = r"
import json, sys
import helm_python as helm
print(json.dumps(helm.lint(sys.argv[1], json.loads(sys.argv[2]), strict=True, kube_version=sys.argv[3])))
";

/// `helm lint --strict` with the Helm 4 engine: the report (`messages`, `errors`).
pub fn helm4_lint(chart: &str, values: &Value, kube_version: &str) -> anyhow::Result<Value> {
    let stdout = run_ok(
        Command::new(lab_python()?)
            .args(["-c", HELM4_LINT])
            .arg(chart_dir(chart))
            .arg(values.to_string())
            .arg(kube_version),
    )?;
    serde_json::from_str(&stdout).context("helm4 lint printed no JSON")
}

/// The one object of kind `wanted` in `objects` (panics naming the count otherwise).
#[must_use]
pub fn only<'a>(objects: &'a [Value], wanted: &str) -> &'a Value {
    let found = of_kind(objects, wanted);
    assert_eq!(found.len(), 1, "expected one {wanted}, got {}", found.len());
    found[0]
}

/// The chart's injector container as a command line: its args and env, the ConfigMap volumes
/// materialised under `root`, `--listen` moved to `127.0.0.1:port`.
pub fn chart_command(
    objects: &[Value],
    root: &Path,
    port: u16,
    kubeconfig: &Path,
) -> anyhow::Result<Command> {
    let deployment = only(objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().context("no containers")?;
    let [container] = containers.as_slice() else {
        bail!("the chart's Deployment should have one container");
    };
    // ConfigMap volumes: write their keys where the container would see them.
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .with_context(|| format!("volumeMount {} has no volume", mount["name"]))?;
        let Some(config_map) = volume["configMap"]["name"].as_str() else {
            continue; // emptyDir /tmp: the binary does not need it here
        };
        let rendered = of_kind(objects, "ConfigMap")
            .into_iter()
            .find(|c| name(c) == config_map)
            .with_context(|| format!("volume names ConfigMap {config_map}, not rendered"))?;
        let dir = root.join(mount["name"].as_str().unwrap_or("volume"));
        std::fs::create_dir_all(&dir)?;
        for (key, text) in rendered["data"].as_object().into_iter().flatten() {
            std::fs::write(dir.join(key), text.as_str().unwrap_or_default())?;
        }
        let path = mount["mountPath"].as_str().context("mount without path")?;
        mounts.push((path.to_owned(), dir));
    }
    let https_port = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "https")
        .and_then(|p| p["containerPort"].as_u64())
        .context("no https container port")?;

    let mut command = Command::new(lab::cargo_binary("wg-injector")?);
    let mut saw_listen = false;
    for arg in container["args"].as_array().context("no args")? {
        let arg = arg.as_str().context("non-string arg")?;
        if let Some(listen) = arg.strip_prefix("--listen=") {
            assert_eq!(
                listen,
                format!("0.0.0.0:{https_port}"),
                "--listen and the https containerPort disagree"
            );
            saw_listen = true;
            command.arg(format!("--listen=127.0.0.1:{port}"));
            continue;
        }
        let mut mapped = arg.to_owned();
        for (path, dir) in &mounts {
            if let Some((flag, rest)) = arg.split_once('=') {
                if let Some(tail) = rest.strip_prefix(path.as_str()) {
                    let local = format!("{}{tail}", dir.display());
                    assert!(
                        Path::new(&local).is_file(),
                        "{arg}: not in the mounted volume"
                    );
                    mapped = format!("{flag}={local}");
                }
            }
        }
        command.arg(mapped);
    }
    assert!(saw_listen, "the chart passes no --listen");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for env in container["env"].as_array().into_iter().flatten() {
        let key = env["name"].as_str().context("env without name")?;
        if let Some(value) = env["value"].as_str() {
            command.env(key, value);
        } else if env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" {
            let namespace = deployment["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default();
            command.env(key, namespace);
        } else {
            bail!(
                "env {key}: a source this test cannot resolve: {}",
                env["valueFrom"]
            );
        }
    }
    command
        .env("KUBECONFIG", kubeconfig)
        .env("WG_INJECTOR_CERT_EXTRA_NAMES", "127.0.0.1");
    Ok(command)
}
