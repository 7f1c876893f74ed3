//! The webhook's memo of fresh injections: the patch for a Pod that carries nothing of an
//! earlier injection is a function of the injector's configuration, the Pod's parsed
//! annotations ([`InjectionSpec`], as `crate::identity::resolve` returns it: a `{pod}` in a
//! Secret name is already the Pod's name) and a few facts about the Pod's shape ([`Shape`]);
//! Pods of one Deployment, Job or StatefulSet share all three (but for a StatefulSet whose
//! Secret name holds `{pod}`, whose Pods each get their own entry), so the patch the diff gave
//! for one of them is kept and sent again for the next.
//!
//! A patch is kept only when its key is seen a second time within the last
//! [`DOORKEEPER_FACTOR`] × capacity distinct keys: a stream of Pods that are each unlike the
//! others (a batch of one-off Pods) then costs one hash per Pod instead of churning the memo.
//!
//! Owns only the bounded map and its invalidation (a new configuration empties it). It never
//! decides anything: [`crate::admission::decide_with`] computes every entry with the same diff
//! as [`crate::admission::decide`], runs every per-Pod check before looking an entry up, and in
//! debug builds (every test) recomputes each hit and asserts it equals the entry.
//!
//! Why the key is enough: a fresh Pod that passed the conflict checks has no injected container
//! or volume name, no tunnel label and no status annotation, so the diff between it and its
//! injected view adds the label and the annotation (or the whole maps), inserts the containers
//! at fixed positions and appends the volumes after the Pod's own; the Pod's own elements only
//! ever compare equal to themselves. The positions and whole-map/whole-list choices are what
//! [`Shape`] records. The Pod's owner only decides whether a static key is allowed, a per-Pod
//! check that runs before the lookup; it never changes the patch. The warnings depend on the
//! configuration and the annotations, and on one fact of the Pod's spec that [`Shape`] records
//! too: whether it runs once (a Job's Pod in classic mode is warned that the sidecar never exits
//! by itself; a Deployment's is not).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Pod;
use serde_json::value::RawValue;

use crate::annotations::InjectionSpec;
use crate::config::Config;
use crate::inject;
use crate::patch::Patch;

/// Entries kept by default: a cluster has about one entry per Pod template that opts in and is
/// scaled or rolled out at the same time; each entry holds one patch (a few KiB).
pub const DEFAULT_CAPACITY: usize = 256;

/// How many recently seen keys (as a multiple of the capacity) are remembered by hash to tell a
/// second sighting from a first.
pub const DOORKEEPER_FACTOR: usize = 4;

/// What the diff of a fresh Pod depends on besides the injection: whether each map or list the
/// injection adds to exists, and how long the lists are; and what its warnings depend on
/// besides the injection: whether the Pod runs once ([`inject::runs_once`]); and the one value
/// the injection takes from the Pod, the classic-mode drain bound ([`inject::drain_seconds`]);
/// and its resolver settings ([`DnsShape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    annotations: bool,
    labels: bool,
    containers: usize,
    init_containers: Option<usize>,
    volumes: Option<usize>,
    runs_once: bool,
    drain_seconds: i64,
    dns: DnsShape,
}

/// What the resolver part of the patch depends on: the Pod's own `dnsPolicy` (replaced, or
/// added, and recorded in the status annotation) and whether it chose its own resolver (then it
/// is left alone, with a warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DnsShape {
    /// Its own resolver (`dnsPolicy: None` or a `dnsConfig`).
    Own,
    /// No `dnsPolicy`.
    NoPolicy,
    /// One of the policies Kubernetes knows, as written.
    Policy(&'static str),
}

impl DnsShape {
    /// `None` for a policy Kubernetes does not know (such a Pod is not remembered).
    fn of(pod: &Pod) -> Option<Self> {
        if inject::has_own_resolver(pod) {
            return Some(Self::Own);
        }
        match pod.spec.as_ref()?.dns_policy.as_deref() {
            None => Some(Self::NoPolicy),
            Some(p) => ["ClusterFirst", "ClusterFirstWithHostNet", "Default"]
                .into_iter()
                .find(|known| *known == p)
                .map(Self::Policy),
        }
    }
}

impl Shape {
    /// The shape of `pod`; `None` when it has no spec (such a Pod is never injected).
    #[must_use]
    pub fn of(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        Some(Self {
            annotations: pod.metadata.annotations.is_some(),
            labels: pod.metadata.labels.is_some(),
            containers: spec.containers.len(),
            init_containers: spec.init_containers.as_ref().map(Vec::len),
            volumes: spec.volumes.as_ref().map(Vec::len),
            runs_once: inject::runs_once(pod),
            drain_seconds: inject::drain_seconds(pod),
            dns: DnsShape::of(pod)?,
        })
    }
}

/// What a fresh injection is remembered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The Pod's parsed annotations, with its identity resolved.
    pub spec: InjectionSpec,
    /// The Pod's shape.
    pub shape: Shape,
}

/// A fresh injection's answer, ready to send.
#[derive(Debug)]
pub struct FreshPatch {
    /// The operations (checked against the object as sent by the webhook).
    pub patch: Patch,
    /// The patch as the response carries it ([`Patch::to_base64_json`]).
    pub encoded: Box<RawValue>,
    /// Admission warnings.
    pub warnings: Vec<String>,
}

/// Whether a fresh injection was found in the memo (the `result` label of
/// `wg_injector_patch_memo_lookups_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Found: the patch was sent again.
    Hit,
    /// Computed with the diff, then remembered.
    Miss,
}

impl Lookup {
    /// The metrics label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
        }
    }
}

/// A bounded map from [`Key`] to the [`FreshPatch`] computed for it, valid for one
/// configuration.
#[derive(Debug)]
pub struct PatchMemo {
    capacity: usize,
    hasher: RandomState,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The configuration the entries were computed with; held so its address is not reused.
    config: Option<Arc<Config>>,
    entries: HashMap<Key, Arc<FreshPatch>>,
    /// Hashes of keys seen once (emptied when it reaches `DOORKEEPER_FACTOR` × capacity).
    seen: HashSet<u64>,
}

impl Default for PatchMemo {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl PatchMemo {
    /// A memo of at most `capacity` entries (0 keeps nothing).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            hasher: RandomState::new(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The entry for `key` under `config`, if one was stored under that same configuration.
    #[must_use]
    pub fn get(&self, config: &Arc<Config>, key: &Key) -> Option<Arc<FreshPatch>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match &inner.config {
            Some(current) if Arc::ptr_eq(current, config) => inner.entries.get(key).cloned(),
            _ => None,
        }
    }

    /// Offer `value` for `key` under `config`: kept when `key` was offered before (see the
    /// module docs), and then returns `true`. A different configuration than the stored
    /// entries' empties the memo first; a full memo drops one entry.
    pub fn insert(&self, config: &Arc<Config>, key: Key, value: Arc<FreshPatch>) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let hash = self.hasher.hash_one(&key);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner
            .config
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, config))
        {
            inner.entries.clear();
            inner.seen.clear();
            inner.config = Some(Arc::clone(config));
        }
        if !inner.seen.remove(&hash) {
            if inner.seen.len() >= self.capacity.saturating_mul(DOORKEEPER_FACTOR) {
                inner.seen.clear();
            }
            inner.seen.insert(hash);
            return false;
        }
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(&key) {
            // An arbitrary entry (the hash map's iteration order is randomly seeded).
            if let Some(evicted) = inner.entries.keys().next().cloned() {
                inner.entries.remove(&evicted);
            }
        }
        inner.entries.insert(key, value);
        true
    }

    /// Entries held now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    /// Whether the memo holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::annotations::KeySource;

    fn key(mtu: u16) -> Key {
        Key {
            spec: InjectionSpec {
                gateway: None,
                routes: None,
                dns: None,
                endpoints: None,
                mtu: Some(crate::annotations::Mtu::Fixed(mtu)),
                keepalive: None,
                key_source: KeySource::Vault,
                vault_role: None,
                vault_path: None,
                kill_switch: None,
                sidecar_mode: None,
                resources: crate::annotations::ResourceOverrides::default(),
            },
            shape: Shape {
                annotations: true,
                labels: false,
                containers: 1,
                init_containers: None,
                volumes: Some(1),
                runs_once: false,
                drain_seconds: 30,
                dns: DnsShape::Policy("ClusterFirst"),
            },
        }
    }

    fn entry() -> Arc<FreshPatch> {
        Arc::new(FreshPatch {
            patch: Patch::default(),
            encoded: RawValue::from_string("\"W10=\"".to_owned()).unwrap(),
            warnings: Vec::new(),
        })
    }

    #[test]
    fn an_entry_is_found_only_under_the_configuration_it_was_stored_with() {
        let memo = PatchMemo::new(4);
        let config = Arc::new(Config::default());
        assert!(
            !memo.insert(&config, key(1380), entry()),
            "a first sighting is not kept"
        );
        assert!(memo.get(&config, &key(1380)).is_none());
        assert!(
            memo.insert(&config, key(1380), entry()),
            "a second sighting is kept"
        );
        assert!(memo.get(&config, &key(1380)).is_some());
        assert!(memo.get(&config, &key(1400)).is_none());
        // An equal but newly loaded configuration is another configuration.
        let reloaded = Arc::new(Config::default());
        assert!(memo.get(&reloaded, &key(1380)).is_none());
        memo.insert(&reloaded, key(1400), entry());
        assert!(memo.is_empty(), "a new configuration empties the memo");
        assert!(
            !memo.insert(&reloaded, key(1380), entry()),
            "and forgets what it saw"
        );
        memo.insert(&reloaded, key(1400), entry());
        assert_eq!(memo.len(), 1);
        assert!(memo.get(&config, &key(1400)).is_none());
    }

    #[test]
    fn a_full_memo_stays_at_its_capacity() {
        let memo = PatchMemo::new(3);
        let config = Arc::new(Config::default());
        for mtu in 1300..1310 {
            memo.insert(&config, key(mtu), entry());
            memo.insert(&config, key(mtu), entry());
        }
        assert_eq!(memo.len(), 3);
        assert!(
            memo.get(&config, &key(1309)).is_some(),
            "the newest entry is kept"
        );
    }

    #[test]
    fn keys_seen_once_each_never_fill_the_memo() {
        let memo = PatchMemo::new(2);
        let config = Arc::new(Config::default());
        // A cycle longer than the doorkeeper remembers: every offer is a first sighting.
        for _ in 0..3 {
            for mtu in 1280..1300 {
                assert!(!memo.insert(&config, key(mtu), entry()));
            }
        }
        assert!(memo.is_empty());
    }

    #[test]
    fn a_memo_of_capacity_zero_keeps_nothing() {
        let memo = PatchMemo::new(0);
        let config = Arc::new(Config::default());
        memo.insert(&config, key(1380), entry());
        memo.insert(&config, key(1380), entry());
        assert!(memo.is_empty());
    }
}
