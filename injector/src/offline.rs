//! The offline CLI (`wg-injector inject|uninject -f FILE|-`), like `istioctl kube-inject`.
//!
//! This module owns reading multi-document YAML or JSON, finding the Pod templates (Pod,
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob and
//! `List` items) and writing the documents back with every unrelated field kept. The injection
//! itself is [`crate::admission::evaluate`], the same as the webhook's.
//!
//! Opt-in: like `istioctl kube-inject`, a template without `wg-injector.io/inject` is injected
//! (the CLI forces `inject_by_default`); `"false"` opts out. A denial prints its message to
//! stderr and exits 1 without writing anything to stdout.
//!
//! Owner: a template carries no ownerReferences, so the workload whose template it is stands in
//! for the Pods' controller in the shared-key rule ([`crate::identity`]): a `Deployment`,
//! `ReplicaSet`, `ReplicationController`, `Job`, `CronJob`, `DaemonSet` or `StatefulSet`
//! template is denied a fixed static key just as the webhook denies its Pods (whose controller
//! is the ReplicaSet or Job the Deployment or CronJob makes). A `Pod` document is judged by its
//! own controller ownerReference, like the webhook does. A template has no name, so `{pod}` in a
//! Secret name is denied here (only the webhook sees a StatefulSet Pod's name).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

use crate::admission::{self, Verdict};
use crate::config::Config;
use crate::error::Error;
use crate::identity::Owner;
use crate::inject;

/// Arguments of `wg-injector inject` and `uninject`.
#[derive(Debug, clap::Args)]
pub struct FileArgs {
    /// Manifests to read (YAML or JSON, several documents allowed); `-` reads stdin.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|-",
        env = "WG_INJECTOR_FILENAME"
    )]
    pub filename: String,
    /// Injector configuration (YAML, same format as the webhook's); built-in defaults when absent.
    #[arg(long, value_name = "PATH", env = "WG_INJECTOR_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Which way [`transform`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Add the sidecar.
    Inject,
    /// Remove exactly what inject added.
    Uninject,
}

/// Why [`transform`] produced no output.
#[derive(Debug)]
pub enum Failure {
    /// The input could not be parsed.
    Input(Error),
    /// A Pod template was denied; the message names the object.
    Denied(String),
}

/// Run `inject` (or `uninject` when `remove`), returning the process exit code.
pub fn run(args: &FileArgs, remove: bool) -> anyhow::Result<i32> {
    let mut config = match &args.config {
        Some(path) => Config::from_yaml_file(path)?,
        None => Config::default(),
    };
    config.inject_by_default = true;
    let mut text = String::new();
    if args.filename == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::ReadManifests {
                source_name: "-".into(),
                message: e.to_string(),
            })?;
    } else {
        text = std::fs::read_to_string(&args.filename).map_err(|e| Error::ReadManifests {
            source_name: args.filename.clone(),
            message: e.to_string(),
        })?;
    }
    let direction = if remove {
        Direction::Uninject
    } else {
        Direction::Inject
    };
    match transform(&text, &args.filename, &config, direction) {
        Ok(out) => {
            std::io::stdout().lock().write_all(out.as_bytes())?;
            Ok(0)
        }
        Err(Failure::Denied(message)) => {
            eprintln!("error: {message}");
            Ok(1)
        }
        Err(Failure::Input(e)) => Err(e.into()),
    }
}

/// Inject into (or uninject from) every Pod template of `text`, returning the new text: JSON
/// when the input is JSON, YAML documents separated by `---` otherwise.
pub fn transform(
    text: &str,
    source_name: &str,
    config: &Config,
    direction: Direction,
) -> Result<String, Failure> {
    let input_error = |message: String| {
        Failure::Input(Error::ReadManifests {
            source_name: source_name.to_owned(),
            message,
        })
    };
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| input_error(e.to_string()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    for (index, doc) in docs.iter_mut().enumerate() {
        visit(doc, config, direction).map_err(|message| match message {
            VisitError::Denied(m) => Failure::Denied(format!("document {}: {m}", index + 1)),
            VisitError::Input(m) => input_error(format!("document {}: {m}", index + 1)),
        })?;
    }
    let json = text.trim_start().starts_with(['{', '[']);
    let mut out = String::new();
    if json {
        for doc in &docs {
            out.push_str(
                &serde_json::to_string_pretty(doc).map_err(|e| input_error(e.to_string()))?,
            );
            out.push('\n');
        }
    } else {
        for (i, doc) in docs.iter().enumerate() {
            if i > 0 {
                out.push_str("---\n");
            }
            out.push_str(&serde_yaml_ng::to_string(doc).map_err(|e| input_error(e.to_string()))?);
        }
    }
    Ok(out)
}

enum VisitError {
    Denied(String),
    Input(String),
}

fn object_name(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{kind}/{name}")
}

fn visit(doc: &mut Value, config: &Config, direction: Direction) -> Result<(), VisitError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = object_name(doc);
    // The workload stands in for the controller of its template's Pods (module docs).
    let workload = (kind != "Pod").then(|| Owner {
        kind: kind.clone(),
        name: doc
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned(),
    });
    let template = match kind.as_str() {
        "Pod" => Some(&mut *doc),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => doc.get_mut("spec").and_then(|s| s.get_mut("template")),
        "CronJob" => doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template")),
        k if k == "List" || k.ends_with("List") => {
            if let Some(Value::Sequence(items)) = doc.get_mut("items") {
                for item in items {
                    visit(item, config, direction)?;
                }
            }
            None
        }
        _ => None,
    };
    let Some(template) = template else {
        return Ok(());
    };
    let Value::Mapping(map) = template else {
        return Err(VisitError::Input(format!(
            "{name}: the Pod template is not a mapping"
        )));
    };
    let mut pod_value = serde_yaml_ng::Mapping::new();
    for key in ["metadata", "spec"] {
        if let Some(v) = map.get(key) {
            pod_value.insert(Value::from(key), v.clone());
        }
    }
    let pod: Pod = serde_yaml_ng::from_value(Value::Mapping(pod_value))
        .map_err(|e| VisitError::Input(format!("{name}: not a valid Pod template: {e}")))?;
    let new_pod = match direction {
        Direction::Uninject => inject::uninject(&pod),
        Direction::Inject => {
            let owner = workload.or_else(|| Owner::controller_of(&pod));
            match admission::evaluate_owned_by(&pod, owner.as_ref(), config) {
                Verdict::Inject(outcome) => outcome.pod,
                Verdict::Skip(_) => return Ok(()),
                Verdict::Deny(denial) => {
                    return Err(VisitError::Denied(format!("{name}: {}", denial.message)))
                }
            }
        }
    };
    if new_pod == pod {
        return Ok(());
    }
    let to_yaml = |v: Result<Value, serde_yaml_ng::Error>| {
        v.map_err(|e| VisitError::Input(format!("{name}: {e}")))
    };
    let metadata = to_yaml(serde_yaml_ng::to_value(&new_pod.metadata))?;
    if metadata
        .as_mapping()
        .is_some_and(serde_yaml_ng::Mapping::is_empty)
    {
        // uninject of a template that had no metadata: do not leave `metadata: {}` behind.
        map.remove("metadata");
    } else {
        map.insert(Value::from("metadata"), metadata);
    }
    map.insert(
        Value::from("spec"),
        to_yaml(serde_yaml_ng::to_value(&new_pod.spec))?,
    );
    Ok(())
}
