//! `AdmissionReview` decoding and answering: bytes in, bytes out, plus an [`Outcome`] for metrics.
//!
//! Owns the wire format of admission (any `admission.k8s.io` version is echoed back as sent),
//! which requests are ours (Pods, CREATE, no subresource) and how a [`Decision`] becomes a
//! response (base64 `JSONPatch`, warnings, `allowed: false` with a 403 status and the message).
//! [`answer_validation`] (`POST /validate`) reads the same envelope and answers Pod CREATE and
//! UPDATE with the [`crate::tunnel_label`] checks: allowed or denied, never a patch.
//! Never does IO, never logs, never looks at HTTP: [`crate::webhook`] does that. The object is
//! captured as raw JSON and parsed once, as a `Pod`, only when it is one. [`answer_with`] (the
//! webhook's) takes fresh injections from a [`PatchMemo`] and sends a remembered patch without
//! copying it; its answers are the same as [`answer`]'s.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::admission::{decide, decide_with, Answered, Decision};
use crate::config::Config;
use crate::memo::{FreshPatch, Lookup, PatchMemo};
use crate::patch::{Operation, Patch};
use crate::tunnel_label;
use crate::Error;

/// What happened to one admission request (the `outcome` metrics label and its details).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The Pod was patched with a non-empty patch.
    Injected,
    /// The Pod already had the sidecar: allowed with no patch.
    AlreadyInjected,
    /// The Pod was left untouched for this reason.
    Skipped(&'static str),
    /// The Pod was refused for this reason (a short label).
    Denied(&'static str),
    /// Not ours (not a Pod, not CREATE, or a subresource): allowed with no patch.
    Ignored,
    /// `/validate`: a Pod CREATE or UPDATE that passed the tunnel-label checks.
    Allowed,
}

impl Outcome {
    /// The `outcome` label of `wg_injector_admission_reviews_total`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::AlreadyInjected => "already_injected",
            Outcome::Skipped(_) => "skipped",
            Outcome::Denied(_) => "denied",
            Outcome::Ignored => "ignored",
            Outcome::Allowed => "allowed",
        }
    }
}

/// An answered review: the JSON body to send and what happened.
#[derive(Debug)]
pub struct Answer {
    /// The serialized `AdmissionReview` response.
    pub body: Vec<u8>,
    /// What happened.
    pub outcome: Outcome,
    /// Whether a fresh injection came from the memo ([`answer_with`] only).
    pub memo: Option<Lookup>,
}

const DEFAULT_API_VERSION: &str = "admission.k8s.io/v1";
const DEFAULT_KIND: &str = "AdmissionReview";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    request: Option<RequestIn<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<'a> {
    uid: String,
    #[serde(default)]
    kind: GroupVersionKind,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    old_object: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
struct StatusOut {
    code: u16,
    status: &'static str,
    reason: &'static str,
    message: String,
}

/// The patch a response carries: encoded for this request, or shared with the memo (sent as it
/// is, with its warnings, without a copy).
enum PatchOut {
    Encoded(Box<RawValue>),
    Remembered(Arc<FreshPatch>),
}

/// What the response carries, before encoding.
struct Verdict {
    allowed: bool,
    status: Option<StatusOut>,
    patch: Option<PatchOut>,
    warnings: Vec<String>,
    outcome: Outcome,
    memo: Option<Lookup>,
}

impl Verdict {
    fn allow(outcome: Outcome) -> Self {
        Self {
            allowed: true,
            status: None,
            patch: None,
            warnings: Vec::new(),
            outcome,
            memo: None,
        }
    }

    fn deny(reason: &'static str, code: u16, message: String) -> Self {
        Self {
            allowed: false,
            status: Some(StatusOut {
                code,
                status: "Failure",
                reason: match code {
                    403 => "Forbidden",
                    400 => "BadRequest",
                    _ => "InternalError",
                },
                message,
            }),
            patch: None,
            warnings: Vec::new(),
            outcome: Outcome::Denied(reason),
            memo: None,
        }
    }
}

/// Answer one `AdmissionReview` (JSON bytes). Dry-run requests are answered exactly like others.
///
/// Errors are for bodies that are not an `AdmissionReview` with a `request` (HTTP 400); a
/// request that is well-formed but refused is an `Ok` answer with `allowed: false`.
pub fn answer(body: &[u8], config: &Config) -> Result<Answer, Error> {
    answer_inner(body, config, None)
}

/// [`answer`] as the webhook answers: fresh injections come from (and go to) `memo`
/// ([`crate::admission::decide_with`]); the answer is the same.
pub fn answer_with(body: &[u8], config: &Arc<Config>, memo: &PatchMemo) -> Result<Answer, Error> {
    answer_inner(body, config, Some((config, memo)))
}

fn answer_inner(
    body: &[u8],
    config: &Config,
    memo: Option<(&Arc<Config>, &PatchMemo)>,
) -> Result<Answer, Error> {
    respond(body, |request| judge(request, config, memo))
}

/// Answer one `AdmissionReview` for `POST /validate`: Pod CREATE is checked with
/// [`tunnel_label::check_create`], Pod UPDATE with [`tunnel_label::check_update`] (old object
/// against new); anything else is [`Outcome::Ignored`]. Errors as for [`answer`].
pub fn answer_validation(body: &[u8]) -> Result<Answer, Error> {
    respond(body, validate)
}

/// Decode the envelope, let `judge` decide, encode the response.
fn respond(body: &[u8], judge: impl FnOnce(&RequestIn<'_>) -> Verdict) -> Result<Answer, Error> {
    let review: ReviewIn<'_> =
        serde_json::from_slice(body).map_err(|e| Error::DecodeReview(e.to_string()))?;
    let request = review
        .request
        .ok_or_else(|| Error::DecodeReview("the AdmissionReview has no request".to_owned()))?;
    let verdict = judge(&request);
    let (patch, warnings): (Option<&RawValue>, &[String]) = match &verdict.patch {
        Some(PatchOut::Encoded(patch)) => (Some(patch), &verdict.warnings),
        Some(PatchOut::Remembered(fresh)) => (Some(&fresh.encoded), &fresh.warnings),
        None => (None, &verdict.warnings),
    };
    // Room for the patch and the envelope, so the buffer is not regrown while writing.
    let mut body = Vec::with_capacity(512 + patch.map_or(0, |p| p.get().len()));
    let out = ReviewOut {
        api_version: review.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION),
        kind: review.kind.as_deref().unwrap_or(DEFAULT_KIND),
        response: ResponseOut {
            uid: &request.uid,
            allowed: verdict.allowed,
            status: verdict.status,
            patch_type: patch.map(|_| "JSONPatch"),
            patch,
            warnings,
        },
    };
    serde_json::to_writer(&mut body, &out).map_err(Error::EncodeReview)?;
    Ok(Answer {
        body,
        outcome: verdict.outcome,
        memo: verdict.memo,
    })
}

/// Whether `request` is about a Pod itself (not a subresource) and its operation is one of
/// `operations`.
fn is_pod_request(request: &RequestIn<'_>, operations: &[&str]) -> bool {
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let is_subresource = request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty());
    is_pod && !is_subresource && operations.contains(&request.operation.as_str())
}

/// Parse `object` (the request's `what`: `object` or `oldObject`) as a `T`; `Err` is the
/// message of the 400 denial for a missing or undecodable one.
fn decode<T: serde::de::DeserializeOwned>(
    object: Option<&RawValue>,
    operation: &str,
    what: &str,
) -> Result<T, String> {
    let object = object
        .ok_or_else(|| format!("the admission request for a Pod {operation} carries no {what}"))?;
    serde_json::from_str(object.get())
        .map_err(|e| format!("wg-injector could not decode the Pod ({what}): {e}"))
}

/// `/validate`: the tunnel-label checks, on the objects as the apiserver is about to store them
/// (validating webhooks run after every mutation).
fn validate(request: &RequestIn<'_>) -> Verdict {
    if !is_pod_request(request, &["CREATE", "UPDATE"]) {
        return Verdict::allow(Outcome::Ignored);
    }
    let operation = request.operation.as_str();
    let checked = if operation == "CREATE" {
        decode::<Pod>(request.object, operation, "object")
            .map(|pod| tunnel_label::check_create(&pod))
    } else {
        // Only the labels matter on UPDATE: read the metadata, not the whole Pods.
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            metadata: ObjectMeta,
        }
        decode::<Head>(request.old_object, operation, "oldObject").and_then(|old| {
            decode::<Head>(request.object, operation, "object")
                .map(|new| tunnel_label::check_update(&old.metadata, &new.metadata))
        })
    };
    match checked {
        Ok(Ok(())) => Verdict::allow(Outcome::Allowed),
        Ok(Err(denial)) => Verdict::deny(denial.reason, 403, denial.message),
        Err(message) => Verdict::deny("undecodable_pod", 400, message),
    }
}

fn judge(
    request: &RequestIn<'_>,
    config: &Config,
    memo: Option<(&Arc<Config>, &PatchMemo)>,
) -> Verdict {
    if !is_pod_request(request, &["CREATE"]) {
        return Verdict::allow(Outcome::Ignored);
    }
    let Some(object) = request.object else {
        return Verdict::deny(
            "undecodable_pod",
            400,
            "the admission request for a Pod CREATE carries no object".to_owned(),
        );
    };
    let pod: Pod = match serde_json::from_str(object.get()) {
        Ok(pod) => pod,
        Err(e) => {
            return Verdict::deny(
                "undecodable_pod",
                400,
                format!("wg-injector could not decode the Pod: {e}"),
            )
        }
    };
    // The patch is computed against our typed reading of the object; that reading invents an
    // empty `metadata` when the object has none, and a patch under `/metadata/…` would then not
    // apply to what was sent. The apiserver always sends `metadata`, so such an object is refused.
    // The second look at the object runs only for empty metadata, which is rare.
    if pod.metadata == ObjectMeta::default() && !has_top_level_metadata(object) {
        return Verdict::deny(
            "undecodable_pod",
            400,
            "the Pod in the admission request has no metadata".to_owned(),
        );
    }
    let namespace = request
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or_default();
    if namespace.is_empty() {
        return Verdict::deny(
            "no_namespace",
            400,
            "the admission request names no namespace for the Pod".to_owned(),
        );
    }
    let decision = match memo {
        Some((config, memo)) => match decide_with(&pod, namespace, config, memo) {
            Answered::Fresh(fresh, lookup) => {
                return Verdict {
                    memo: Some(lookup),
                    ..fresh_verdict(object, &pod, &fresh)
                }
            }
            Answered::Decided(decision) => decision,
        },
        None => decide(&pod, namespace, config),
    };
    match decision {
        Decision::Patch { patch, warnings } if patch.0.is_empty() => Verdict {
            warnings,
            ..Verdict::allow(Outcome::AlreadyInjected)
        },
        Decision::Patch { patch, warnings } => match applies_to_sent(object, &pod, &patch)
            .and_then(|()| patch.to_base64_json().map_err(|e| e.to_string()))
        {
            Ok(encoded) => Verdict {
                patch: Some(PatchOut::Encoded(encoded)),
                warnings,
                ..Verdict::allow(Outcome::Injected)
            },
            Err(e) => cannot_patch(&e),
        },
        Decision::Skip(reason) => Verdict::allow(Outcome::Skipped(reason.as_str())),
        Decision::Deny(denial) => Verdict::deny(denial.reason, 403, denial.message),
    }
}

/// The verdict for a fresh injection: its patch, once checked against the object as sent.
fn fresh_verdict(object: &RawValue, pod: &Pod, fresh: &Arc<FreshPatch>) -> Verdict {
    match applies_to_sent(object, pod, &fresh.patch) {
        Ok(()) => Verdict {
            patch: Some(PatchOut::Remembered(Arc::clone(fresh))),
            ..Verdict::allow(Outcome::Injected)
        },
        Err(e) => cannot_patch(&e),
    }
}

fn cannot_patch(error: &str) -> Verdict {
    Verdict::deny(
        "undecodable_pod",
        400,
        format!("wg-injector could not build a patch for the Pod as sent: {error}"),
    )
}

/// Whether the sent object has a `metadata` member at its top level (not just the text
/// somewhere inside it).
fn has_top_level_metadata(object: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        metadata: Option<&'a RawValue>,
    }
    serde_json::from_str::<Head<'_>>(object.get()).is_ok_and(|head| head.metadata.is_some())
}

/// Check that `patch` applies to the object exactly as it was sent.
///
/// The patch is computed between two typed readings of the Pod, which keeps fields newer than
/// our API types untouched; but a typed reading also fills in required fields the object lacks
/// (an apiserver never sends such an object, a fuzzer does). Applying the patch to the sent
/// JSON catches that mismatch, so a patch that the apiserver could not apply is never returned.
///
/// A fresh injection's patch only inserts whole elements and map entries whose parents the typed
/// reading can only have taken from the sent object (see [`only_inserts_into_sent_parents`]);
/// such a patch needs no second parse, which keeps the hot path to one pass over the body.
fn applies_to_sent(object: &RawValue, pod: &Pod, patch: &Patch) -> Result<(), String> {
    if only_inserts_into_sent_parents(pod, patch) {
        return Ok(());
    }
    let mut sent: serde_json::Value =
        serde_json::from_str(object.get()).map_err(|e| e.to_string())?;
    let ops = patch.to_json_patch().map_err(|e| e.to_string())?;
    json_patch::patch(&mut sent, &ops.0)
        .map_err(|e| format!("the patch does not apply to the object as sent ({e})"))
}

/// Whether every operation is an `add` of a whole label, annotation, container, init
/// container or volume (or of the whole map/list), at a parent that exists in the sent object.
///
/// Parents: `metadata` is checked before; a typed `labels`/`annotations`/`initContainers`/
/// `volumes` that is present came from the sent object (absent or `null` reads as `None`, and
/// adding the whole member then works on the sent JSON too); `containers` is a required list a
/// typed reading invents when missing, so it must be non-empty to prove it was sent.
fn only_inserts_into_sent_parents(pod: &Pod, patch: &Patch) -> bool {
    let spec = pod.spec.as_ref();
    let has_containers = spec.is_some_and(|s| !s.containers.is_empty());
    patch.0.iter().all(|op| {
        let Operation::Add { path, .. } = op else {
            return false;
        };
        // At most three segments matter; a longer path is never one of these inserts.
        let mut segments = [""; 4];
        let mut count = 0;
        for segment in path.as_str().split('/').skip(1) {
            if count == segments.len() {
                return false;
            }
            segments[count] = segment;
            count += 1;
        }
        match &segments[..count] {
            ["metadata", "labels" | "annotations"] => true,
            ["metadata", "labels", _] => pod.metadata.labels.is_some(),
            ["metadata", "annotations", _] => pod.metadata.annotations.is_some(),
            ["spec", "initContainers" | "volumes"] => spec.is_some(),
            ["spec", "containers", _] => has_containers,
            ["spec", "initContainers", _] => spec.is_some_and(|s| s.init_containers.is_some()),
            ["spec", "volumes", _] => spec.is_some_and(|s| s.volumes.is_some()),
            _ => false,
        }
    })
}
