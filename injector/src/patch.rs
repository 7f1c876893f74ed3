//! The JSON Patch between a Pod and its injected twin, computed by diffing the two documents.
//!
//! This module owns one refinement over `json_patch::diff`: when an array of the result is the
//! original with elements inserted (our containers placed first), it emits `add` operations at
//! the insertion points instead of replacing every shifted element field by field. That keeps
//! the patch small and the diff linear in the Pod's size. Every other change is a positional
//! diff like `json_patch::diff`. It never builds operations from knowledge of the injection:
//! the golden tests apply every patch and compare with the injected Pod.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// The RFC 6902 patch that turns `left` into `right`.
#[must_use]
pub fn diff(left: &Value, right: &Value) -> Patch {
    let mut ops = Vec::new();
    walk(left, right, &mut PointerBuf::new(), &mut ops);
    Patch(ops)
}

fn walk(left: &Value, right: &Value, pointer: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            for (key, rv) in r {
                pointer.push_back(key);
                match l.get(key) {
                    Some(lv) => walk(lv, rv, pointer, ops),
                    None => ops.push(PatchOperation::Add(AddOperation {
                        path: pointer.clone(),
                        value: rv.clone(),
                    })),
                }
                pointer.pop_back();
            }
            for key in l.keys().filter(|k| !r.contains_key(*k)) {
                pointer.push_back(key);
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: pointer.clone(),
                }));
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
                    ops.push(PatchOperation::Add(AddOperation {
                        path: pointer.clone(),
                        value: rv.clone(),
                    }));
                    pointer.pop_back();
                }
            }
        }
        (Value::Array(l), Value::Array(r)) => {
            for (index, (lv, rv)) in l.iter().zip(r).enumerate() {
                pointer.push_back(index);
                walk(lv, rv, pointer, ops);
                pointer.pop_back();
            }
            // Removing at index r.len() repeatedly drops the surplus tail.
            for _ in r.len()..l.len() {
                pointer.push_back(r.len());
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: pointer.clone(),
                }));
                pointer.pop_back();
            }
            for (index, rv) in r.iter().enumerate().skip(l.len()) {
                pointer.push_back(index);
                ops.push(PatchOperation::Add(AddOperation {
                    path: pointer.clone(),
                    value: rv.clone(),
                }));
                pointer.pop_back();
            }
        }
        _ if left == right => {}
        _ => ops.push(PatchOperation::Replace(ReplaceOperation {
            path: pointer.clone(),
            value: right.clone(),
        })),
    }
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
        let patch = diff(left, right);
        let mut doc = left.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
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

    #[test]
    fn other_changes_round_trip_including_escaped_keys_and_shrinking_arrays() {
        round_trip(
            &json!({"a/b": 1, "m~n": [1, 2, 3], "x": {"y": 1}}),
            &json!({"a/b": 2, "m~n": [3], "z": null}),
        );
        round_trip(&json!([1, 2]), &json!([2, 1, 3]));
        round_trip(&json!({"a": 1}), &json!([1]));
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]})).0.is_empty());
    }
}
