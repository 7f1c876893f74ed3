//! The NetworkPolicy side of the gateway's kubernetes mode: the watch of every namespace's
//! NetworkPolicies, the store it feeds, and the step from the store and the admitted peers' Pods
//! to each peer's egress.
//!
//! Owns: the watch of `Api::<NetworkPolicy>::all` (full objects; the same backoff as the Pod
//! watch in [`crate::pod_watch`], a re-list seen as `Init` … `InitDone`); the [`PolicyStore`],
//! plain data fed by [`PolicyEvent`]s and tested without a cluster; [`peer_egress`], which runs
//! [`crate::policy::compile`] for every admitted peer (once per distinct namespace and label set);
//! and which dropped rules are still to be reported ([`PolicyStore::unreported`]: once per policy
//! version).
//! Must never: write to the Kubernetes API, or make a peer's egress wider than `compile` says.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};

use crate::{
    pod_index::AdmittedPod,
    policy::{self, Egress, Unsupported},
};

/// A NetworkPolicy event (the shape of `kube::runtime::watcher::Event`).
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyEvent {
    /// A policy was added or changed.
    Apply(NetworkPolicy),
    /// A policy was deleted.
    Delete(NetworkPolicy),
    /// A re-list starts: the policies listed until [`PolicyEvent::InitDone`] replace the store's.
    Init,
    /// A policy of the re-list.
    InitApply(NetworkPolicy),
    /// The re-list is complete.
    InitDone,
}

/// What the watch yields.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyWatchUpdate {
    /// An event for the store (boxed: a policy object is large).
    Event(Box<PolicyEvent>),
    /// A watch error (the watcher retries with backoff).
    Error(String),
}

/// `namespace/name` of a policy (how [`Unsupported::policy`] names it).
fn key_of(p: &NetworkPolicy) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// Only what [`policy::compile`] reads is kept (no managed fields, no annotations: a
/// `last-applied-configuration` doubles a policy's size).
fn slim(mut p: NetworkPolicy) -> NetworkPolicy {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p
}

/// The cluster's NetworkPolicies by namespace (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PolicyStore {
    /// Namespace → its policies, by name.
    by_namespace: BTreeMap<String, Vec<NetworkPolicy>>,
    listing: Option<Vec<NetworkPolicy>>,
    synced: bool,
    changed: bool,
    /// `namespace/name` → the resource version whose dropped rules were reported.
    reported: HashMap<String, String>,
}

impl PolicyStore {
    /// An empty store that has not listed yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one event.
    pub fn apply(&mut self, event: PolicyEvent) {
        match event {
            PolicyEvent::Apply(p) => self.upsert(slim(p)),
            PolicyEvent::Delete(p) => {
                let (ns, name) = key_of(&p);
                if let Some(list) = self.by_namespace.get_mut(&ns) {
                    list.retain(|q| q.metadata.name.as_deref() != Some(name.as_str()));
                    if list.is_empty() {
                        self.by_namespace.remove(&ns);
                    }
                }
                self.reported.remove(&format!("{ns}/{name}"));
                self.changed = true;
            }
            PolicyEvent::Init => self.listing = Some(Vec::new()),
            PolicyEvent::InitApply(p) => match &mut self.listing {
                Some(l) => l.push(slim(p)),
                None => self.upsert(slim(p)),
            },
            PolicyEvent::InitDone => {
                self.by_namespace.clear();
                for p in self.listing.take().unwrap_or_default() {
                    self.upsert(p);
                }
                let live: BTreeSet<String> = self.names().collect();
                self.reported.retain(|k, _| live.contains(k));
                self.synced = true;
                self.changed = true;
            }
        }
    }

    fn upsert(&mut self, p: NetworkPolicy) {
        let (ns, name) = key_of(&p);
        let list = self.by_namespace.entry(ns).or_default();
        match list.binary_search_by(|q| q.metadata.name.as_deref().unwrap_or("").cmp(&name)) {
            Ok(i) => list[i] = p,
            Err(i) => list.insert(i, p),
        }
        self.changed = true;
    }

    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.by_namespace.iter().flat_map(|(ns, list)| {
            list.iter()
                .map(move |p| format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or("")))
        })
    }

    /// True once the first complete list has been seen: before it, no peer may be admitted
    /// (it would run without its policy).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// True when something changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Policies in the store.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_namespace.values().map(Vec::len).sum()
    }

    /// True when the store holds no policy.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }

    /// The policies of `namespace`.
    #[must_use]
    pub fn of_namespace(&self, namespace: &str) -> &[NetworkPolicy] {
        self.by_namespace.get(namespace).map_or(&[], Vec::as_slice)
    }

    /// The resource version of policy `namespace/name`.
    #[must_use]
    pub fn version(&self, policy: &str) -> Option<&str> {
        let (ns, name) = policy.split_once('/')?;
        self.of_namespace(ns)
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.metadata.resource_version.as_deref())
    }

    /// Of `unsupported`, the entries of policy versions not reported before, grouped by policy
    /// (`(policy, resource version, what was dropped)`); they count as reported from now on.
    pub fn unreported(
        &mut self,
        unsupported: &[Unsupported],
    ) -> Vec<(String, String, Vec<String>)> {
        let mut by_policy: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for u in unsupported {
            by_policy
                .entry(u.policy.as_str())
                .or_default()
                .push(u.what.clone());
        }
        let mut out = Vec::new();
        for (policy, what) in by_policy {
            let version = self.version(policy).unwrap_or("").to_owned();
            if self.reported.get(policy) == Some(&version) {
                continue;
            }
            self.reported.insert(policy.to_owned(), version.clone());
            out.push((policy.to_owned(), version, what));
        }
        out
    }
}

/// The egress of the admitted peers ([`peer_egress`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEgress {
    /// Public key → egress, for the peers some egress policy selects (the others are
    /// [`Egress::Unrestricted`]: the gateway's default).
    pub egress: BTreeMap<String, Egress>,
    /// What the policies selecting admitted peers had dropped, distinct and sorted.
    pub unsupported: Vec<Unsupported>,
}

/// Each admitted peer's egress under the store's policies (compiled once per distinct
/// namespace and label set: a Deployment's replicas share theirs).
#[must_use]
pub fn peer_egress<'a>(
    store: &PolicyStore,
    pods: impl IntoIterator<Item = AdmittedPod<'a>>,
) -> PeerEgress {
    let mut compiled: HashMap<(&str, &BTreeMap<String, String>), Option<Egress>> = HashMap::new();
    let mut unsupported = BTreeSet::new();
    let mut egress = BTreeMap::new();
    for p in pods {
        let ns = p.pod.namespace.as_str();
        let e = compiled.entry((ns, p.labels)).or_insert_with(|| {
            let c = policy::compile(store.of_namespace(ns), ns, p.labels);
            unsupported.extend(c.unsupported);
            match c.egress {
                Egress::Unrestricted => None,
                allowed @ Egress::Allowed(_) => Some(allowed),
            }
        });
        if let Some(e) = e {
            egress.insert(p.public_key.to_owned(), e.clone());
        }
    }
    PeerEgress {
        egress,
        unsupported: unsupported.into_iter().collect(),
    }
}

fn map_event(event: watcher::Event<NetworkPolicy>) -> PolicyEvent {
    match event {
        watcher::Event::Apply(p) => PolicyEvent::Apply(p),
        watcher::Event::Delete(p) => PolicyEvent::Delete(p),
        watcher::Event::Init => PolicyEvent::Init,
        watcher::Event::InitApply(p) => PolicyEvent::InitApply(p),
        watcher::Event::InitDone => PolicyEvent::InitDone,
    }
}

/// Watches every namespace's NetworkPolicies, forever (errors are yielded and retried).
pub fn watch(client: Client) -> impl Stream<Item = PolicyWatchUpdate> + Send + 'static {
    let api: Api<NetworkPolicy> = Api::all(client);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => PolicyWatchUpdate::Event(Box::new(map_event(ev))),
            Err(e) => PolicyWatchUpdate::Error(crate::pod_watch::chain(&e)),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        policy::{Allow, Block, Ports, Protocol},
        registration::PodIdentity,
    };

    fn policy(ns: &str, name: &str, version: &str, body: &str) -> NetworkPolicy {
        serde_yaml_ng::from_str(&format!(
            "metadata: {{name: {name}, namespace: {ns}, resourceVersion: '{version}'}}\nspec:\n{body}"
        ))
        .unwrap()
    }

    fn to_port(ns: &str, name: &str, version: &str, app: &str, port: u16) -> NetworkPolicy {
        policy(
            ns,
            name,
            version,
            &format!(
                "  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.20.0.2/32}}}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n"
            ),
        )
    }

    fn allow(port: u16) -> Egress {
        Egress::Allowed(vec![Allow {
            to: Some(vec![Block {
                cidr: "10.20.0.2/32".parse().unwrap(),
                except: vec![],
            }]),
            ports: Some(vec![Ports {
                protocol: Protocol::Tcp,
                first: port,
                last: port,
            }]),
        }])
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), app.to_owned())])
    }

    fn egress(
        store: &PolicyStore,
        peers: &[(&str, &str, &BTreeMap<String, String>)],
    ) -> PeerEgress {
        let ids: Vec<PodIdentity> = peers
            .iter()
            .enumerate()
            .map(|(i, (_, ns, _))| {
                PodIdentity::new(ns, "web", "p", &format!("6f1d6a0e-0000-4000-8000-{i:012}"))
                    .unwrap()
            })
            .collect();
        peer_egress(
            store,
            peers
                .iter()
                .zip(&ids)
                .map(|((key, _, labels), pod)| AdmittedPod {
                    public_key: key,
                    pod,
                    labels,
                }),
        )
    }

    fn listed(policies: Vec<NetworkPolicy>) -> PolicyStore {
        let mut s = PolicyStore::new();
        s.apply(PolicyEvent::Init);
        for p in policies {
            s.apply(PolicyEvent::InitApply(p));
        }
        assert!(!s.synced(), "not before InitDone");
        s.apply(PolicyEvent::InitDone);
        s
    }

    #[test]
    fn a_selected_peer_gets_its_policy_and_others_and_other_namespaces_stay_unrestricted() {
        let web = labels("web");
        let db = labels("db");
        let mut s = listed(vec![to_port("shop", "web-out", "1", "web", 8080)]);
        assert!(s.synced() && s.take_changed() && !s.take_changed());
        let e = egress(
            &s,
            &[
                ("A", "shop", &web),
                ("B", "shop", &db),
                ("C", "other", &web),
            ],
        );
        assert_eq!(e.egress, BTreeMap::from([("A".to_owned(), allow(8080))]));
        assert!(e.unsupported.is_empty());

        // Changed live, then deleted.
        s.apply(PolicyEvent::Apply(to_port(
            "shop", "web-out", "2", "web", 9090,
        )));
        assert!(s.take_changed());
        let e = egress(&s, &[("A", "shop", &web)]);
        assert_eq!(e.egress["A"], allow(9090));
        s.apply(PolicyEvent::Delete(to_port(
            "shop", "web-out", "2", "web", 9090,
        )));
        assert!(s.take_changed() && s.is_empty());
        assert!(egress(&s, &[("A", "shop", &web)]).egress.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_store_and_an_egress_policy_without_rules_denies_all() {
        let web = labels("web");
        let mut s = listed(vec![to_port("shop", "a", "1", "web", 80)]);
        s.apply(PolicyEvent::Init);
        s.apply(PolicyEvent::InitApply(policy(
            "shop",
            "deny",
            "7",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        )));
        // Until InitDone the old list applies.
        assert_eq!(egress(&s, &[("A", "shop", &web)]).egress["A"], allow(80));
        s.apply(PolicyEvent::InitDone);
        assert_eq!(s.len(), 1);
        assert_eq!(
            egress(&s, &[("A", "shop", &web)]).egress["A"],
            Egress::Allowed(vec![])
        );
    }

    #[test]
    fn dropped_rules_are_reported_once_per_policy_version() {
        let web = labels("web");
        let named = |version: &str| {
            policy(
                "shop",
                "named",
                version,
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}]\n",
            )
        };
        let mut s = listed(vec![named("1")]);
        let e = egress(&s, &[("A", "shop", &web), ("B", "shop", &labels("db"))]);
        assert_eq!(e.unsupported.len(), 1, "{e:?}");
        assert_eq!(
            e.egress["A"],
            Egress::Allowed(vec![]),
            "dropped, never widened"
        );
        let first = s.unreported(&e.unsupported);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].0.as_str(), first[0].1.as_str()),
            ("shop/named", "1")
        );
        assert!(first[0].2[0].contains("named port"), "{first:?}");
        assert!(s.unreported(&e.unsupported).is_empty(), "once");
        s.apply(PolicyEvent::Apply(named("2")));
        let e = egress(&s, &[("A", "shop", &web)]);
        assert_eq!(s.unreported(&e.unsupported).len(), 1, "a new version again");
    }
}
