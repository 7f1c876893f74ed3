//! The admission decision for one Pod: inject (with a patch), skip (with a reason) or deny
//! (with a message a user can act on). Pure: no IO.
//! OWNED BY: core helper (stub signatures agreed with the webhook helper; keep them).

use crate::config::Config;
use k8s_openapi::api::core::v1::Pod;

/// What the injector decided for one Pod.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Patch the Pod (the patch may be empty when it is already injected).
    Patch {
        /// JSON Patch that turns the input Pod into the injected Pod.
        patch: json_patch::Patch,
        /// Admission warnings shown to the user (e.g. the Pod Security level).
        warnings: Vec<String>,
    },
    /// Leave the Pod untouched.
    Skip(SkipReason),
    /// Refuse the Pod.
    Deny(Denial),
}

/// Why a Pod was left untouched (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The Pod did not opt in.
    NotRequested,
}

impl SkipReason {
    /// The metrics label for this reason.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotRequested => "not_requested",
        }
    }
}

/// A refusal: `reason` is a short metrics label, `message` names the annotation, the bad value
/// and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Short, stable label for metrics (`bad_annotation`, `name_conflict`, …).
    pub reason: &'static str,
    /// The message returned to the user.
    pub message: String,
}

/// Decide what to do with `pod`, created in `namespace`.
#[must_use]
pub fn decide(_pod: &Pod, _namespace: &str, _config: &Config) -> Decision {
    Decision::Skip(SkipReason::NotRequested)
}
