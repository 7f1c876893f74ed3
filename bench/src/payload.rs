//! `AdmissionReview` bodies carrying Pods of a chosen size, annotated for injection so the
//! injector does its real work (decode, annotations, inject, diff, encode).
//!
//! Owns the shape of the benchmark Pods. Never contains key material or anything secret.

use axum::body::Bytes;
use serde_json::{json, Value};

/// Annotation that opts a Pod in (the user contract, see `docs/annotations.md`).
const INJECT: &str = "wg-injector.io/inject";

/// One prepared request body.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Short name for tables (`2 KiB`, `10 KiB`, `64 KiB`).
    pub label: String,
    /// Size of the serialized Pod alone, in bytes.
    pub pod_bytes: usize,
    /// The whole `AdmissionReview` request body.
    pub body: Bytes,
    /// When not empty, the bodies sent in turn instead of `body` (see [`distinct`]).
    pub variants: Vec<Bytes>,
}

impl Payload {
    /// The bodies a load run sends in turn.
    #[must_use]
    pub fn bodies(&self) -> &[Bytes] {
        if self.variants.is_empty() {
            std::slice::from_ref(&self.body)
        } else {
            &self.variants
        }
    }
}

/// Distinct Pods sent in turn by [`distinct`]: far more than the injector's patch memo holds
/// (256), so nearly every review computes its patch.
pub const DISTINCT_PODS: usize = 4096;

/// Like [`payload`], but [`DISTINCT_PODS`] Pods that differ in their
/// `wg-injector.io/routes` annotation (one /24 each), so no two reviews in a row share a patch:
/// the injector's path for a Pod unlike any it saw recently.
#[must_use]
pub fn distinct(kib: usize) -> Payload {
    let mut pod = pod_of_size(kib * 1024);
    let pod_bytes = serde_json::to_vec(&pod).map_or(0, |v| v.len());
    let variants = (0..DISTINCT_PODS)
        .map(|i| {
            pod["metadata"]["annotations"]["wg-injector.io/routes"] =
                json!(format!("10.{}.{}.0/24", 64 + i / 256, i % 256));
            Bytes::from(serde_json::to_vec(&review(&pod)).unwrap_or_default())
        })
        .collect::<Vec<_>>();
    Payload {
        label: format!("{kib} KiB, distinct"),
        pod_bytes,
        body: variants.first().cloned().unwrap_or_default(),
        variants,
    }
}

fn container(name: &str, env_count: usize) -> Value {
    let env: Vec<Value> = (0..env_count)
        .map(|i| json!({"name": format!("SETTING_{i:04}"), "value": format!("value-of-setting-{i:04}-for-{name}")}))
        .collect();
    json!({
        "name": name,
        "image": format!("registry.example/shop/{name}:1.2.3"),
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/data"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File"
    })
}

fn pod(container_count: usize, env_count: usize) -> Value {
    let containers: Vec<Value> = ["app", "worker", "exporter"]
        .iter()
        .take(container_count)
        .map(|name| container(name, env_count))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9f8b6c5-",
            "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5"},
            "annotations": {INJECT: "true", "example.com/owner": "team-shop"}
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": containers,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30
        }
    })
}

/// A Pod whose JSON is at least `target` bytes (and within a few hundred bytes of it).
#[must_use]
pub fn pod_of_size(target: usize) -> Value {
    // Larger Pods spread their settings over three containers, as real Pods with helpers do.
    let containers = if target < 4096 { 1 } else { 3 };
    let pod = |env_count| pod(containers, env_count);
    let mut low = 0;
    let mut high = 1;
    while serde_json::to_vec(&pod(high)).map_or(0, |v| v.len()) < target {
        low = high;
        high *= 2;
    }
    // Smallest env count reaching the target.
    while high - low > 1 {
        let mid = usize::midpoint(low, high);
        if serde_json::to_vec(&pod(mid)).map_or(0, |v| v.len()) < target {
            low = mid;
        } else {
            high = mid;
        }
    }
    pod(high)
}

/// An `AdmissionReview` v1 for a Pod CREATE in namespace `shop` carrying `pod`.
#[must_use]
pub fn review(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "a1b2", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// The benchmark payload for a Pod of about `kib` KiB.
#[must_use]
pub fn payload(kib: usize) -> Payload {
    let pod = pod_of_size(kib * 1024);
    let pod_bytes = serde_json::to_vec(&pod).map_or(0, |v| v.len());
    let body = serde_json::to_vec(&review(&pod)).unwrap_or_default();
    Payload {
        label: format!("{kib} KiB"),
        pod_bytes,
        body: body.into(),
        variants: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pods_are_at_least_the_requested_size_and_not_much_larger() {
        for kib in [2, 10, 64] {
            let p = payload(kib);
            assert!(p.pod_bytes >= kib * 1024, "{kib} KiB: {}", p.pod_bytes);
            assert!(p.pod_bytes < kib * 1024 + 512, "{kib} KiB: {}", p.pod_bytes);
        }
    }

    #[test]
    fn the_review_decodes_as_a_pod_create_that_the_injector_patches() {
        let p = payload(10);
        let answer =
            wg_injector::review::answer(&p.body, &wg_injector::config::Config::default()).unwrap();
        assert_eq!(answer.outcome, wg_injector::review::Outcome::Injected);
        let text = String::from_utf8(answer.body).unwrap();
        assert!(text.contains("\"patchType\":\"JSONPatch\""), "{text}");
    }

    #[test]
    fn distinct_pods_are_each_patched_differently() {
        let p = distinct(2);
        assert_eq!(p.bodies().len(), DISTINCT_PODS);
        let config = wg_injector::config::Config::default();
        let patches: std::collections::HashSet<String> = p
            .bodies()
            .iter()
            .take(300)
            .map(|body| {
                let answer = wg_injector::review::answer(body, &config).unwrap();
                assert_eq!(answer.outcome, wg_injector::review::Outcome::Injected);
                String::from_utf8(answer.body).unwrap()
            })
            .collect();
        assert_eq!(patches.len(), 300);
    }
}
