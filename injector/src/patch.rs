//! The JSON Patch between a Pod and its injected twin, computed by diffing the two documents.
//!
//! This module owns one refinement over `json_patch::diff`: when an array of the result is the
//! original with elements inserted (our containers placed first), it emits `add` operations at
//! the insertion points instead of replacing every shifted element field by field. That keeps
//! the patch small and the diff linear in the Pod's size. Every other change is a positional
//! diff like `json_patch::diff`. It never builds operations from knowledge of the injection:
//! the golden tests apply every patch and compare with the injected Pod.
//!
//! [`diff_pods`] gives the same patch as [`diff`] over the two serialised Pods without
//! serialising them: when the typed Pods are equal outside the label, annotation, container and
//! volume fields (compared with `PartialEq`, which allocates nothing), only those [`Parts`] are
//! diffed ([`diff_parts`]), element by element, and only elements that differ are serialised.
//! Any other difference falls back to the whole-document diff. [`Parts`] borrow their
//! elements, so the webhook diffs a Pod against a view of its injected twin without cloning it
//! (see `admission::decide`).
//!
//! Values in the [`Patch`] are serialised once, straight from the typed elements to JSON text
//! ([`RawValue`]), never through a `serde_json::Value` tree: building and dropping those trees
//! was most of the webhook's own cost per request.

use std::borrow::Cow;
use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, Pod, PodDNSConfig, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::value::{to_raw_value, RawValue};
use serde_json::Value;

/// An RFC 6902 JSON Patch whose values are already serialised: the webhook writes it out as it
/// is, with no intermediate `serde_json::Value` of the injected containers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Patch(pub Vec<Operation>);

impl Patch {
    /// The same patch as `json_patch` operations, to apply it to a document.
    ///
    /// # Errors
    /// Never in practice: the operations are valid JSON by construction.
    pub fn to_json_patch(&self) -> Result<json_patch::Patch, serde_json::Error> {
        serde_json::from_slice(&serde_json::to_vec(self)?)
    }

    /// The patch as an admission response carries it: a JSON string of the base64 of its JSON,
    /// written as raw JSON because base64 never needs escaping (spares a scan of every
    /// character).
    ///
    /// # Errors
    /// Never in practice: the operations are valid JSON by construction.
    pub fn to_base64_json(&self) -> Result<Box<RawValue>, serde_json::Error> {
        use base64::Engine as _;
        let json = serde_json::to_vec(self)?;
        let engine = &base64::engine::general_purpose::STANDARD;
        let mut quoted = String::with_capacity(json.len().div_ceil(3) * 4 + 2);
        quoted.push('"');
        engine.encode_string(json, &mut quoted);
        quoted.push('"');
        RawValue::from_string(quoted)
    }
}

/// One operation of a [`Patch`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Operation {
    /// Insert `value` at `path`.
    Add {
        /// Where.
        path: PointerBuf,
        /// The JSON to insert.
        value: Box<RawValue>,
    },
    /// Remove what is at `path`.
    Remove {
        /// Where.
        path: PointerBuf,
    },
    /// Replace what is at `path` with `value`.
    Replace {
        /// Where.
        path: PointerBuf,
        /// The new JSON.
        value: Box<RawValue>,
    },
}

/// Operations are equal when their kinds and paths are and their values are the same JSON
/// (the same text, or texts that parse to equal values: key order may differ).
impl PartialEq for Operation {
    fn eq(&self, other: &Self) -> bool {
        fn same(a: &RawValue, b: &RawValue) -> bool {
            a.get() == b.get()
                || matches!(
                    (serde_json::from_str::<Value>(a.get()), serde_json::from_str::<Value>(b.get())),
                    (Ok(x), Ok(y)) if x == y
                )
        }
        match (self, other) {
            (Operation::Add { path: a, value: x }, Operation::Add { path: b, value: y })
            | (
                Operation::Replace { path: a, value: x },
                Operation::Replace { path: b, value: y },
            ) => a == b && same(x, y),
            (Operation::Remove { path: a }, Operation::Remove { path: b }) => a == b,
            _ => false,
        }
    }
}

/// The patch that turns `before` into `after`: equal to
/// `diff(&to_value(before)?, &to_value(after)?)`, computed without serialising what is equal.
///
/// # Errors
/// When a Pod (or a changed part of it) cannot be serialised.
pub fn diff_pods(before: &Pod, after: &Pod) -> Result<Patch, serde_json::Error> {
    let patch = scoped_diff(before, after)?;
    // Debug builds (every test) check the shortcut against the whole-document diff.
    #[cfg(debug_assertions)]
    {
        let whole = diff(
            &serde_json::to_value(before)?,
            &serde_json::to_value(after)?,
        )?;
        debug_assert_eq!(
            patch, whole,
            "scoped diff differs from the whole-document diff"
        );
    }
    Ok(patch)
}

fn scoped_diff(before: &Pod, after: &Pod) -> Result<Patch, serde_json::Error> {
    let (Some(left), Some(right)) = (Parts::of(before), Parts::of(after)) else {
        return whole_diff(before, after);
    };
    if before.status != after.status
        || !metadata_equal_outside_scope(&before.metadata, &after.metadata)
        || !spec_equal_outside_scope(left.spec, right.spec)
    {
        return whole_diff(before, after);
    }
    diff_parts(&left, &right)
}

fn whole_diff(before: &Pod, after: &Pod) -> Result<Patch, serde_json::Error> {
    diff(
        &serde_json::to_value(before)?,
        &serde_json::to_value(after)?,
    )
}

/// The fields of a Pod that injection changes, borrowed from a Pod (or, for the lists and maps
/// a view changes, built beside it), so a patch can be computed between a Pod and a view of
/// its injected twin without cloning the Pod.
#[derive(Debug, Clone)]
pub struct Parts<'a> {
    /// The spec everything else is compared against (the fields outside the scope).
    pub spec: &'a PodSpec,
    /// `metadata.annotations`.
    pub annotations: Option<Cow<'a, BTreeMap<String, String>>>,
    /// `metadata.labels`.
    pub labels: Option<Cow<'a, BTreeMap<String, String>>>,
    /// `spec.containers`.
    pub containers: Vec<&'a Container>,
    /// `spec.dnsConfig`.
    pub dns_config: Option<Cow<'a, PodDNSConfig>>,
    /// `spec.dnsPolicy`.
    pub dns_policy: Option<Cow<'a, str>>,
    /// `spec.initContainers`.
    pub init_containers: Option<Vec<&'a Container>>,
    /// `spec.volumes`.
    pub volumes: Option<Vec<&'a Volume>>,
}

impl<'a> Parts<'a> {
    /// The parts of `pod` as they are; `None` when it has no spec.
    #[must_use]
    pub fn of(pod: &'a Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        Some(Self {
            spec,
            annotations: pod.metadata.annotations.as_ref().map(Cow::Borrowed),
            labels: pod.metadata.labels.as_ref().map(Cow::Borrowed),
            containers: spec.containers.iter().collect(),
            dns_config: spec.dns_config.as_ref().map(Cow::Borrowed),
            dns_policy: spec.dns_policy.as_deref().map(Cow::Borrowed),
            init_containers: spec.init_containers.as_ref().map(|l| l.iter().collect()),
            volumes: spec.volumes.as_ref().map(|l| l.iter().collect()),
        })
    }
}

/// The patch between two Pods that are equal outside their [`Parts`], given those parts: the
/// same operations, in the same order, as the whole-document diff of the two Pods.
///
/// # Errors
/// When a changed element cannot be serialised.
pub fn diff_parts(left: &Parts<'_>, right: &Parts<'_>) -> Result<Patch, serde_json::Error> {
    // The order of the operations is the one `walk` gives on the documents: keys in sorted
    // order (`metadata` < `spec`; `annotations` < `labels`; `containers` < `dnsConfig` <
    // `dnsPolicy` < `initContainers` < `volumes`), removals of a level after its walk.
    let mut ops = Vec::new();
    let mut pointer = PointerBuf::new();
    pointer.push_back("metadata");
    let fields = [
        (
            "annotations",
            left.annotations.as_deref(),
            right.annotations.as_deref(),
        ),
        ("labels", left.labels.as_deref(), right.labels.as_deref()),
    ];
    for (name, l, r) in fields {
        pointer.push_back(name);
        match (l, r) {
            (Some(l), Some(r)) => string_map(l, r, &mut pointer, &mut ops)?,
            (None, Some(r)) => add(&pointer, to_raw_value(r)?, &mut ops),
            _ => {}
        }
        pointer.pop_back();
    }
    removals(
        &fields.map(|(n, l, r)| (n, l.is_some(), r.is_some())),
        &mut pointer,
        &mut ops,
    );
    pointer.pop_back();

    pointer.push_back("spec");
    pointer.push_back("containers");
    list(&left.containers, &right.containers, &mut pointer, &mut ops)?;
    pointer.pop_back();
    let (lc, rc) = (left.dns_config.as_deref(), right.dns_config.as_deref());
    pointer.push_back("dnsConfig");
    match (lc, rc) {
        (None, Some(r)) => add(&pointer, to_raw_value(r)?, &mut ops),
        // Never a change of the Pod's own dnsConfig (the injector leaves one alone): the walk
        // would go into it; as one value it is the same document.
        (Some(l), Some(r)) if l != r => replace(&pointer, to_raw_value(r)?, &mut ops),
        _ => {}
    }
    pointer.pop_back();
    let (lp, rp) = (left.dns_policy.as_deref(), right.dns_policy.as_deref());
    pointer.push_back("dnsPolicy");
    match (lp, rp) {
        (None, Some(r)) => add(&pointer, to_raw_value(r)?, &mut ops),
        (Some(l), Some(r)) if l != r => replace(&pointer, to_raw_value(r)?, &mut ops),
        _ => {}
    }
    pointer.pop_back();
    let (li, ri) = (&left.init_containers, &right.init_containers);
    let (lv, rv) = (&left.volumes, &right.volumes);
    pointer.push_back("initContainers");
    optional_list(li.as_deref(), ri.as_deref(), &mut pointer, &mut ops)?;
    pointer.pop_back();
    pointer.push_back("volumes");
    optional_list(lv.as_deref(), rv.as_deref(), &mut pointer, &mut ops)?;
    pointer.pop_back();
    removals(
        &[
            ("dnsConfig", lc.is_some(), rc.is_some()),
            ("dnsPolicy", lp.is_some(), rp.is_some()),
            ("initContainers", li.is_some(), ri.is_some()),
            ("volumes", lv.is_some(), rv.is_some()),
        ],
        &mut pointer,
        &mut ops,
    );
    Ok(Patch(ops))
}

fn add(pointer: &PointerBuf, value: Box<RawValue>, ops: &mut Vec<Operation>) {
    ops.push(Operation::Add {
        path: pointer.clone(),
        value,
    });
}

fn remove(pointer: &PointerBuf, ops: &mut Vec<Operation>) {
    ops.push(Operation::Remove {
        path: pointer.clone(),
    });
}

fn replace(pointer: &PointerBuf, value: Box<RawValue>, ops: &mut Vec<Operation>) {
    ops.push(Operation::Replace {
        path: pointer.clone(),
        value,
    });
}

/// `remove` for the surplus tail when a list shrank from `before` to `after` elements:
/// removing at index `after` repeatedly, as `walk` emits it.
fn remove_tail(before: usize, after: usize, pointer: &mut PointerBuf, ops: &mut Vec<Operation>) {
    for _ in after..before {
        pointer.push_back(after);
        remove(pointer, ops);
        pointer.pop_back();
    }
}

/// `remove` for every field present before and absent after, as `walk` emits them.
fn removals(fields: &[(&str, bool, bool)], pointer: &mut PointerBuf, ops: &mut Vec<Operation>) {
    for (name, _, _) in fields.iter().filter(|(_, l, r)| *l && !*r) {
        pointer.push_back(*name);
        remove(pointer, ops);
        pointer.pop_back();
    }
}

/// `walk` over two objects of strings, on the typed maps (same key order: both are sorted).
fn string_map(
    l: &BTreeMap<String, String>,
    r: &BTreeMap<String, String>,
    pointer: &mut PointerBuf,
    ops: &mut Vec<Operation>,
) -> Result<(), serde_json::Error> {
    for (key, rv) in r {
        pointer.push_back(key);
        match l.get(key) {
            Some(lv) if lv == rv => {}
            Some(_) => replace(pointer, to_raw_value(rv)?, ops),
            None => add(pointer, to_raw_value(rv)?, ops),
        }
        pointer.pop_back();
    }
    for key in l.keys().filter(|k| !r.contains_key(*k)) {
        pointer.push_back(key);
        remove(pointer, ops);
        pointer.pop_back();
    }
    Ok(())
}

/// List elements with a `name` that is always serialised: elements whose names differ can
/// never be the same JSON, so they need not be serialised to be told apart.
trait Named {
    fn name(&self) -> &str;
}

impl Named for Container {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for Volume {
    fn name(&self) -> &str {
        &self.name
    }
}

fn optional_list<T: Named + Serialize + PartialEq>(
    l: Option<&[&T]>,
    r: Option<&[&T]>,
    pointer: &mut PointerBuf,
    ops: &mut Vec<Operation>,
) -> Result<(), serde_json::Error> {
    match (l, r) {
        (Some(l), Some(r)) => list(l, r, pointer, ops)?,
        (None, Some(r)) => add(pointer, to_raw_value(r)?, ops),
        _ => {}
    }
    Ok(())
}

/// `walk` over two arrays, on the typed elements: only elements that differ are serialised.
fn list<T: Named + Serialize + PartialEq>(
    l: &[&T],
    r: &[&T],
    pointer: &mut PointerBuf,
    ops: &mut Vec<Operation>,
) -> Result<(), serde_json::Error> {
    if r.len() > l.len() {
        // The test of `is_insertion`, element equality decided on the types first (no
        // allocation) and on the serialised JSON only when the types differ (a field the
        // serialisation drops, such as sub-second precision); each element serialised once.
        // Two elements of one type are the same JSON exactly when their texts are equal: the
        // serialisation of a type is deterministic (struct fields in order, maps sorted).
        let mut next = 0;
        let mut left_text: Option<Box<RawValue>> = None;
        let mut inserted = Vec::new();
        for (index, rv) in r.iter().enumerate() {
            if let Some(lv) = l.get(next) {
                if lv == rv {
                    next += 1;
                    left_text = None;
                    continue;
                }
                let right = to_raw_value(rv)?;
                if lv.name() != rv.name() {
                    inserted.push((index, right));
                    continue;
                }
                let left = match left_text {
                    Some(ref text) => text,
                    None => left_text.insert(to_raw_value(lv)?),
                };
                if left.get() == right.get() {
                    next += 1;
                    left_text = None;
                    continue;
                }
                inserted.push((index, right));
            } else {
                inserted.push((index, to_raw_value(rv)?));
            }
        }
        if next == l.len() {
            for (index, value) in inserted {
                pointer.push_back(index);
                add(pointer, value, ops);
                pointer.pop_back();
            }
            return Ok(());
        }
    }
    for (index, (lv, rv)) in l.iter().zip(r).enumerate() {
        if lv != rv {
            pointer.push_back(index);
            walk(
                &serde_json::to_value(lv)?,
                &serde_json::to_value(rv)?,
                pointer,
                ops,
            )?;
            pointer.pop_back();
        }
    }
    remove_tail(l.len(), r.len(), pointer, ops);
    for (index, rv) in r.iter().enumerate().skip(l.len()) {
        pointer.push_back(index);
        add(pointer, to_raw_value(rv)?, ops);
        pointer.pop_back();
    }
    Ok(())
}

/// Typed equality of everything in the metadata but `labels` and `annotations`. The
/// destructuring lists every field, so a field added by a new API version fails to compile
/// here instead of being missed.
fn metadata_equal_outside_scope(l: &ObjectMeta, r: &ObjectMeta) -> bool {
    let ObjectMeta {
        annotations: _,
        labels: _,
        creation_timestamp,
        deletion_grace_period_seconds,
        deletion_timestamp,
        finalizers,
        generate_name,
        generation,
        managed_fields,
        name,
        namespace,
        owner_references,
        resource_version,
        self_link,
        uid,
    } = l;
    *creation_timestamp == r.creation_timestamp
        && *deletion_grace_period_seconds == r.deletion_grace_period_seconds
        && *deletion_timestamp == r.deletion_timestamp
        && *finalizers == r.finalizers
        && *generate_name == r.generate_name
        && *generation == r.generation
        && *managed_fields == r.managed_fields
        && *name == r.name
        && *namespace == r.namespace
        && *owner_references == r.owner_references
        && *resource_version == r.resource_version
        && *self_link == r.self_link
        && *uid == r.uid
}

/// Typed equality of everything in the spec but `containers`, `initContainers` and `volumes`
/// (every field listed, as in [`metadata_equal_outside_scope`]).
fn spec_equal_outside_scope(l: &PodSpec, r: &PodSpec) -> bool {
    let PodSpec {
        containers: _,
        init_containers: _,
        volumes: _,
        active_deadline_seconds,
        affinity,
        automount_service_account_token,
        dns_config,
        dns_policy,
        enable_service_links,
        ephemeral_containers,
        host_aliases,
        host_ipc,
        host_network,
        host_pid,
        host_users,
        hostname,
        image_pull_secrets,
        node_name,
        node_selector,
        os,
        overhead,
        preemption_policy,
        priority,
        priority_class_name,
        readiness_gates,
        resource_claims,
        resources,
        restart_policy,
        runtime_class_name,
        scheduler_name,
        scheduling_gates,
        security_context,
        service_account,
        service_account_name,
        set_hostname_as_fqdn,
        share_process_namespace,
        subdomain,
        termination_grace_period_seconds,
        tolerations,
        topology_spread_constraints,
    } = l;
    *active_deadline_seconds == r.active_deadline_seconds
        && *affinity == r.affinity
        && *automount_service_account_token == r.automount_service_account_token
        && *dns_config == r.dns_config
        && *dns_policy == r.dns_policy
        && *enable_service_links == r.enable_service_links
        && *ephemeral_containers == r.ephemeral_containers
        && *host_aliases == r.host_aliases
        && *host_ipc == r.host_ipc
        && *host_network == r.host_network
        && *host_pid == r.host_pid
        && *host_users == r.host_users
        && *hostname == r.hostname
        && *image_pull_secrets == r.image_pull_secrets
        && *node_name == r.node_name
        && *node_selector == r.node_selector
        && *os == r.os
        && *overhead == r.overhead
        && *preemption_policy == r.preemption_policy
        && *priority == r.priority
        && *priority_class_name == r.priority_class_name
        && *readiness_gates == r.readiness_gates
        && *resource_claims == r.resource_claims
        && *resources == r.resources
        && *restart_policy == r.restart_policy
        && *runtime_class_name == r.runtime_class_name
        && *scheduler_name == r.scheduler_name
        && *scheduling_gates == r.scheduling_gates
        && *security_context == r.security_context
        && *service_account == r.service_account
        && *service_account_name == r.service_account_name
        && *set_hostname_as_fqdn == r.set_hostname_as_fqdn
        && *share_process_namespace == r.share_process_namespace
        && *subdomain == r.subdomain
        && *termination_grace_period_seconds == r.termination_grace_period_seconds
        && *tolerations == r.tolerations
        && *topology_spread_constraints == r.topology_spread_constraints
}

/// The RFC 6902 patch that turns `left` into `right`.
///
/// # Errors
/// Never in practice: a `Value` always serialises.
pub fn diff(left: &Value, right: &Value) -> Result<Patch, serde_json::Error> {
    let mut ops = Vec::new();
    walk(left, right, &mut PointerBuf::new(), &mut ops)?;
    Ok(Patch(ops))
}

fn walk(
    left: &Value,
    right: &Value,
    pointer: &mut PointerBuf,
    ops: &mut Vec<Operation>,
) -> Result<(), serde_json::Error> {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            for (key, rv) in r {
                pointer.push_back(key);
                match l.get(key) {
                    Some(lv) => walk(lv, rv, pointer, ops)?,
                    None => add(pointer, to_raw_value(rv)?, ops),
                }
                pointer.pop_back();
            }
            for key in l.keys().filter(|k| !r.contains_key(*k)) {
                pointer.push_back(key);
                remove(pointer, ops);
                pointer.pop_back();
            }
        }
        (Value::Array(l), Value::Array(r)) if is_insertion(l, r) => {
            let mut next = 0;
            for (index, rv) in r.iter().enumerate() {
                if l.get(next) == Some(rv) {
                    next += 1;
                } else {
                    pointer.push_back(index);
                    add(pointer, to_raw_value(rv)?, ops);
                    pointer.pop_back();
                }
            }
        }
        (Value::Array(l), Value::Array(r)) => {
            for (index, (lv, rv)) in l.iter().zip(r).enumerate() {
                pointer.push_back(index);
                walk(lv, rv, pointer, ops)?;
                pointer.pop_back();
            }
            remove_tail(l.len(), r.len(), pointer, ops);
            for (index, rv) in r.iter().enumerate().skip(l.len()) {
                pointer.push_back(index);
                add(pointer, to_raw_value(rv)?, ops);
                pointer.pop_back();
            }
        }
        _ if left == right => {}
        _ => replace(pointer, to_raw_value(right)?, ops),
    }
    Ok(())
}

/// Whether `right` is `left` with elements inserted (`left` a subsequence of `right`, longer).
fn is_insertion(left: &[Value], right: &[Value]) -> bool {
    if right.len() <= left.len() {
        return false;
    }
    let mut next = 0;
    for rv in right {
        if left.get(next) == Some(rv) {
            next += 1;
        }
    }
    next == left.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn round_trip(left: &Value, right: &Value) -> Patch {
        let patch = diff(left, right).unwrap();
        let mut doc = left.clone();
        json_patch::patch(&mut doc, &patch.to_json_patch().unwrap()).unwrap();
        assert_eq!(&doc, right, "{patch:?}");
        patch
    }

    #[test]
    fn elements_inserted_first_become_single_add_operations() {
        let left = json!({"c": [{"name": "a"}, {"name": "b"}]});
        let right = json!({"c": [{"name": "s"}, {"name": "a"}, {"name": "t"}, {"name": "b"}]});
        let patch = round_trip(&left, &right);
        assert_eq!(patch.0.len(), 2);
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!([{"op": "add", "path": "/c/0", "value": {"name": "s"}}, {"op": "add", "path": "/c/2", "value": {"name": "t"}}])
        );
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn whole(before: &Pod, after: &Pod) -> Patch {
        diff(
            &serde_json::to_value(before).unwrap(),
            &serde_json::to_value(after).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_pod_diff_equals_the_whole_document_diff_inside_and_outside_its_scope() {
        let before = pod("metadata: {name: web, labels: {a: '1', b/c: '2'}}\nspec:\n  containers: [{name: app, image: x}, {name: db}]\n  volumes: [{name: v, emptyDir: {}}]\n");
        let cases = [
            // Insertions, a changed and a removed label, annotations added from nothing.
            "metadata: {name: web, labels: {a: '9', t: '1'}, annotations: {s: x}}\nspec:\n  initContainers: [{name: i}]\n  containers: [{name: s}, {name: app, image: x}, {name: db}]\n  volumes: [{name: v, emptyDir: {}}, {name: w}]\n",
            // Changed elements, a shorter list and removed optional lists.
            "metadata: {name: web}\nspec:\n  containers: [{name: app, image: y}]\n",
            // A change outside the scope: the whole-document path.
            "metadata: {name: other, labels: {a: '1'}}\nspec:\n  hostNetwork: true\n  containers: [{name: app, image: x}]\n",
        ];
        for after in cases.map(pod) {
            let patch = scoped_diff(&before, &after).unwrap();
            assert_eq!(patch, whole(&before, &after));
            let mut doc = serde_json::to_value(&before).unwrap();
            json_patch::patch(&mut doc, &patch.to_json_patch().unwrap()).unwrap();
            assert_eq!(doc, serde_json::to_value(&after).unwrap());
        }
        assert!(diff_pods(&before, &before).unwrap().0.is_empty());
    }

    #[test]
    fn elements_that_differ_only_where_serialisation_cannot_see_still_count_as_the_same() {
        use k8s_openapi::api::core::v1::{
            EphemeralVolumeSource, PersistentVolumeClaimTemplate, Volume,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        // `Time` serialises whole seconds: these two volumes are typed-unequal, JSON-equal.
        let volume = |nanos| Volume {
            name: "data".to_owned(),
            ephemeral: Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: Some(ObjectMeta {
                        creation_timestamp: Some(Time(
                            k8s_openapi::jiff::Timestamp::new(1_700_000_000, nanos).unwrap(),
                        )),
                        ..ObjectMeta::default()
                    }),
                    ..PersistentVolumeClaimTemplate::default()
                }),
            }),
            ..Volume::default()
        };
        let with = |volumes| Pod {
            spec: Some(PodSpec {
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let before = with(vec![volume(1)]);
        let inserted = Volume {
            name: "wg".to_owned(),
            ..Volume::default()
        };
        for after in [
            with(vec![inserted.clone(), volume(2)]),
            with(vec![volume(2), inserted]),
        ] {
            let patch = scoped_diff(&before, &after).unwrap();
            assert_eq!(patch, whole(&before, &after));
            assert_eq!(patch.0.len(), 1, "{patch:?}");
        }
    }

    #[test]
    fn other_changes_round_trip_including_escaped_keys_and_shrinking_arrays() {
        round_trip(
            &json!({"a/b": 1, "m~n": [1, 2, 3], "x": {"y": 1}}),
            &json!({"a/b": 2, "m~n": [3], "z": null}),
        );
        round_trip(&json!([1, 2]), &json!([2, 1, 3]));
        round_trip(&json!({"a": 1}), &json!([1]));
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]}))
            .unwrap()
            .0
            .is_empty());
    }
}
