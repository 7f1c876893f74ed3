//! The Kubernetes edge of the gateway's kubernetes mode: the Pod watch that feeds
//! [`crate::pod_index`], and the one lookup the orphan sweep makes before it deletes.
//!
//! Owns: the client (`kube::Client::try_default()`: in-cluster service account, or
//! `KUBECONFIG`), the watch of `Api::<Pod>::all` with the label selector
//! `wg-injector.io/tunnel=<profile>` (every replica watches the same Pods: each keeps the whole
//! peer table), its backoff on errors (`WatchStreamExt::default_backoff`: the watcher re-lists
//! when it must, which the index sees as `Init` … `InitDone`), and the mapping of a Pod object to
//! a [`WatchedPod`]: identity (namespace, `spec.serviceAccountName`, name, UID), the running
//! `wg-sidecar` container's ID (`status.initContainerStatuses` for a native sidecar, else
//! `status.containerStatuses`), whether the Pod is finished (`status.phase`), its labels
//! (what the NetworkPolicies of [`crate::policy_watch`] select on) and whether it carries the
//! injector's [`STATUS_ANNOTATION`].
//! The watch asks for full objects, not metadata only: the service account (`spec`) and the
//! phase and container statuses (`status`) are not in a Pod's metadata.
//! With a namespace selector in the access rules ([`crate::access`]) it also watches the
//! Namespaces, metadata only (`metadata_watcher`: their labels are all the index needs).
//! Must never: write to the Kubernetes API, or decide anything (the index does).

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Namespace, Pod, PodStatus};
use kube::{
    core::PartialObjectMeta,
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};

use crate::{
    error::{Result, SidecarError},
    pod_index::{NamespaceEvent, PodEvent, WatchedNamespace, WatchedPod, STARTING_SIDECAR},
    registration::PodIdentity,
};

/// The label the injector puts on every injected Pod: `wg-injector.io/tunnel=<profile>`.
pub const TUNNEL_LABEL: &str = "wg-injector.io/tunnel";

/// The annotation the injector writes on every Pod it injects (what and which version). A Pod
/// with the tunnel label and without it was not injected: the gateway refuses it.
pub const STATUS_ANNOTATION: &str = "wg-injector.io/status";

/// The name of the injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "wg-sidecar";

/// The label selector of one profile's Pods.
#[must_use]
pub fn selector(profile: &str) -> String {
    format!("{TUNNEL_LABEL}={profile}")
}

/// A Kubernetes client from the environment (in-cluster, or `KUBECONFIG`).
pub async fn client() -> Result<Client> {
    // The crate graph carries two rustls providers (vaultrs' and kube's): pick ring, as the
    // workspace does, before kube builds its TLS config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.map_err(|e| {
        SidecarError::InvalidConfig(format!(
            "--pod-source kubernetes needs the Kubernetes API (in-cluster service account or \
             KUBECONFIG), and none is usable: {e}; use --pod-source vault for a gateway outside \
             the cluster"
        ))
    })
}

/// What the watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchUpdate {
    /// An event for the index.
    Event(PodEvent),
    /// A watch error (the watcher retries with backoff).
    Error(String),
}

fn running_sidecar(statuses: Option<&Vec<ContainerStatus>>) -> Option<String> {
    statuses?
        .iter()
        .find(|c| c.name == SIDECAR_CONTAINER)
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .and_then(|c| c.container_id.clone())
        .filter(|id| !id.is_empty())
}

/// [`STARTING_SIDECAR`] when a classic-mode `wg-sidecar` (a regular container) should be starting
/// but the kubelet reports no running instance: the Pod is initialized and not finished, and the
/// container is not seen running. The kubelet reports a container only after its `postStart`
/// hook returns, and the injected hook waits for `/ready`, which needs the gateway to have read
/// the Pod's record: reading it only once a running instance is reported would never happen.
fn starting_sidecar(status: &PodStatus, containers: &[Container]) -> Option<String> {
    let initialized = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Initialized" && c.status == "True");
    let classic = containers.iter().any(|c| c.name == SIDECAR_CONTAINER);
    (initialized && classic).then(|| STARTING_SIDECAR.to_owned())
}

/// Maps a Pod object; `None` when it lacks a namespace, name or UID, or a name is not valid.
#[must_use]
pub fn watched_pod(pod: &Pod) -> Option<WatchedPod> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let identity = PodIdentity::new(
        m.namespace.as_deref()?,
        service_account,
        m.name.as_deref()?,
        m.uid.as_deref()?,
    )
    .ok()?;
    let status = pod.status.as_ref();
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let sidecar = status.and_then(|s| {
        running_sidecar(s.init_container_statuses.as_ref())
            .or_else(|| running_sidecar(s.container_statuses.as_ref()))
            .or_else(|| starting_sidecar(s, &spec?.containers))
    });
    let injected = m
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .is_some_and(|v| !v.is_empty());
    Some(WatchedPod {
        identity,
        sidecar,
        finished,
        labels: m.labels.clone().unwrap_or_default(),
        injected,
    })
}

fn map_event(event: watcher::Event<Pod>) -> Option<PodEvent> {
    let mapped = |p: &Pod| {
        let w = watched_pod(p);
        if w.is_none() {
            tracing::warn!(
                namespace = p.metadata.namespace.as_deref().unwrap_or(""),
                pod = p.metadata.name.as_deref().unwrap_or(""),
                "Pod without a usable namespace, name or UID ignored"
            );
        }
        w
    };
    Some(match event {
        watcher::Event::Apply(p) => PodEvent::Apply(mapped(&p)?),
        watcher::Event::Delete(p) => PodEvent::Delete(mapped(&p)?),
        watcher::Event::Init => PodEvent::Init,
        watcher::Event::InitApply(p) => PodEvent::InitApply(mapped(&p)?),
        watcher::Event::InitDone => PodEvent::InitDone,
    })
}

/// An error with its causes (`kube` puts the useful part, e.g. a TLS or DNS failure, in them).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cause = c.source();
    }
    s
}

/// Watches every namespace's Pods of `profile`, forever (errors are yielded and retried).
pub fn watch(client: Client, profile: &str) -> impl Stream<Item = WatchUpdate> + Send + 'static {
    let api: Api<Pod> = Api::all(client);
    watcher(api, watcher::Config::default().labels(&selector(profile)))
        .default_backoff()
        .filter_map(|r| async move {
            match r {
                Ok(ev) => map_event(ev).map(WatchUpdate::Event),
                Err(e) => Some(WatchUpdate::Error(chain(&e))),
            }
        })
}

/// What the Namespace watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceWatchUpdate {
    /// An event for the index.
    Event(NamespaceEvent),
    /// A watch error (the watcher retries with backoff).
    Error(String),
}

fn namespace_of(n: &PartialObjectMeta<Namespace>) -> Option<WatchedNamespace> {
    Some(WatchedNamespace {
        name: n.metadata.name.clone()?,
        labels: n.metadata.labels.clone().unwrap_or_default(),
    })
}

/// Watches every Namespace's metadata (its labels), forever (errors are yielded and retried).
pub fn watch_namespaces(
    client: Client,
) -> impl Stream<Item = NamespaceWatchUpdate> + Send + 'static {
    // `Api<PartialObjectMeta<_>>` asks for metadata only.
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(|r| async move {
            let ev = match r {
                Ok(ev) => ev,
                Err(e) => return Some(NamespaceWatchUpdate::Error(chain(&e))),
            };
            Some(NamespaceWatchUpdate::Event(match ev {
                watcher::Event::Apply(n) => NamespaceEvent::Apply(namespace_of(&n)?),
                watcher::Event::Delete(n) => NamespaceEvent::Delete(namespace_of(&n)?),
                watcher::Event::Init => NamespaceEvent::Init,
                watcher::Event::InitApply(n) => NamespaceEvent::InitApply(namespace_of(&n)?),
                watcher::Event::InitDone => NamespaceEvent::InitDone,
            }))
        })
}

/// The UID of the Pod `namespace/name` now, `None` when there is none: the sweep's last check
/// that a record's or claim's Pod is really gone before it deletes.
pub async fn pod_uid(
    client: &Client,
    namespace: &str,
    name: &str,
) -> std::result::Result<Option<String>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(api.get_opt(name).await?.and_then(|p| p.metadata.uid))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(status: &serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-1", "uid": "0b5c7f3e-1111",
                         "labels": {TUNNEL_LABEL: "corp"},
                         "annotations": {STATUS_ANNOTATION: "{\"version\":\"0.1.0\"}"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn sidecar(state: &str) -> serde_json::Value {
        serde_json::json!([{"name": "wg-sidecar", "containerID": "containerd://abc", "image": "x",
                            "imageID": "", "ready": false, "restartCount": 0,
                            "state": {state: {}}}])
    }

    #[test]
    fn a_native_or_classic_sidecar_counts_only_while_running() {
        let native = watched_pod(&pod(&serde_json::json!({
            "phase": "Pending", "initContainerStatuses": sidecar("running")})))
        .unwrap();
        assert_eq!(native.sidecar.as_deref(), Some("containerd://abc"));
        assert_eq!(native.identity.service_account, "web");
        assert_eq!(native.identity.uid, "0b5c7f3e-1111");
        assert_eq!(native.labels[TUNNEL_LABEL], "corp");
        assert!(!native.finished);
        assert!(native.injected, "the injector's status annotation");
        let classic = watched_pod(&pod(&serde_json::json!({
            "phase": "Running", "containerStatuses": sidecar("running")})))
        .unwrap();
        assert_eq!(classic.sidecar.as_deref(), Some("containerd://abc"));
        let waiting = watched_pod(&pod(&serde_json::json!({
            "phase": "Running", "containerStatuses": sidecar("waiting")})))
        .unwrap();
        assert_eq!(waiting.sidecar, None);
        let done = watched_pod(&pod(&serde_json::json!({
            "phase": "Succeeded", "containerStatuses": sidecar("terminated")})))
        .unwrap();
        assert!(done.finished && done.sidecar.is_none());
    }

    #[test]
    fn an_initialized_classic_pod_whose_sidecar_is_not_reported_yet_is_starting() {
        let mut p = pod(&serde_json::json!({
            "phase": "Pending", "containerStatuses": sidecar("waiting"),
            "conditions": [{"type": "Initialized", "status": "True"}]}));
        p.spec.as_mut().unwrap().containers.insert(
            0,
            serde_json::from_value(serde_json::json!({"name": "wg-sidecar"})).unwrap(),
        );
        assert_eq!(
            watched_pod(&p).unwrap().sidecar.as_deref(),
            Some(STARTING_SIDECAR)
        );
        // Not initialized yet (wg-init runs): nothing to read.
        p.status.as_mut().unwrap().conditions = None;
        assert_eq!(watched_pod(&p).unwrap().sidecar, None);
        // A native sidecar (an init container) is reported running before the app starts.
        p.spec.as_mut().unwrap().containers.remove(0);
        p.status.as_mut().unwrap().conditions =
            serde_json::from_value(serde_json::json!([{"type": "Initialized", "status": "True"}]))
                .unwrap();
        assert_eq!(watched_pod(&p).unwrap().sidecar, None);
    }

    #[test]
    fn a_pod_without_service_account_name_runs_as_default_and_one_without_uid_is_skipped() {
        let mut p = pod(&serde_json::json!({}));
        p.spec.as_mut().unwrap().service_account_name = None;
        assert_eq!(watched_pod(&p).unwrap().identity.service_account, "default");
        // A hand-set tunnel label without the injector's status: not injected.
        p.metadata.annotations = None;
        assert!(!watched_pod(&p).unwrap().injected);
        p.metadata.uid = None;
        assert!(watched_pod(&p).is_none());
        assert_eq!(selector("corp"), "wg-injector.io/tunnel=corp");
    }
}
