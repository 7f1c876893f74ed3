//! Pure decisions of the control loop: what to apply after a poll, and when to fail over.
//!
//! Owns: the rotation diff ("a new version seen → apply in place, a private key only at or after
//! its `not_before`"), the timing of a registered Pod's own key rotation ([`pod_key_step`]:
//! publish the next key at `rotates_at`, switch at `activate_at`, then fold) and the failover
//! rule ("no handshake for `--failover-after` → next endpoint").
//! Must never: do IO, sleep or read the clock — callers pass `now`.

use std::time::{Duration, SystemTime};

use jiff::{SignedDuration, Timestamp};

use crate::keys::PeerRecord;

/// The shortest `--key-rotation-interval`: a rotation costs every gateway replica a Vault read
/// and the Pod a pause of about a second.
pub const MIN_POD_KEY_ROTATION: Duration = Duration::from_secs(60);

/// Between publishing the next key and switching to it: every gateway replica reads the record
/// [`crate::pod_index::ROTATION_READ_DELAY`] after `rotates_at`, and has retries left before
/// the switch.
pub const POD_KEY_LEAD: Duration = Duration::from_secs(10);

/// The sidecar switches this long after `activate_at`: the gateway (which switches at
/// `activate_at`) has the new key by then, so the sidecar's first handshake with it succeeds
/// (one sent too early is dropped, and WireGuard retries only after 5 s).
pub const POD_KEY_SWITCH_MARGIN: Duration = Duration::from_millis(500);

/// What a registered Pod does about its own key at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodKeyStep {
    /// Nothing yet.
    Wait,
    /// Publish a next key that takes over at `activate_at`; the record after it rotates at
    /// `rotates_at`.
    Start {
        /// When the gateway switches to the next key.
        activate_at: Timestamp,
        /// When the Pod publishes the key after that.
        rotates_at: Timestamp,
    },
    /// `activate_at` has passed: publish the next key as the key (for a gateway that reads the
    /// record only now).
    Fold,
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// When a Pod registered at `now` first rotates: after `interval`, jittered by `unit` (0..1,
/// ±10 %) so Pods started together do not rotate together.
#[must_use]
pub fn first_pod_key_rotation(now: Timestamp, interval: Duration, unit: f64) -> Timestamp {
    plus(now, interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0)))
}

/// The step for the Pod's published record `published` at `now` (`interval`: the rotation
/// interval).
#[must_use]
pub fn pod_key_step(published: &PeerRecord, interval: Duration, now: Timestamp) -> PodKeyStep {
    match (&published.next_public_key, published.activate_at) {
        (Some(_), Some(t)) if now >= t => PodKeyStep::Fold,
        (Some(_), Some(_)) => PodKeyStep::Wait,
        _ => match published.rotates_at {
            Some(t) if now >= t => {
                let activate_at = plus(now, POD_KEY_LEAD);
                PodKeyStep::Start {
                    activate_at,
                    rotates_at: plus(activate_at, interval),
                }
            }
            _ => PodKeyStep::Wait,
        },
    }
}

/// The next instant [`pod_key_step`] has something to do for `published`.
#[must_use]
pub fn pod_key_due(published: &PeerRecord) -> Option<Timestamp> {
    match (&published.next_public_key, published.activate_at) {
        (Some(_), Some(t)) => Some(t),
        _ => published.rotates_at,
    }
}

/// The versions currently applied to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Private record version in use.
    pub key_version: u64,
    /// Gateway record version in use.
    pub gateway_version: u64,
}

/// What a poll result asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Apply the new private key (and preshared key) now.
    pub apply_key: bool,
    /// A new private key exists but its `not_before` is in the future.
    pub key_waiting: bool,
    /// Re-apply the peer set (new gateway record, or a new preshared key).
    pub apply_peers: bool,
}

/// Decides what to apply given the polled versions.
#[must_use]
pub fn plan(
    applied: Applied,
    key_version: u64,
    key_not_before: Option<SystemTime>,
    gateway_version: u64,
    now: SystemTime,
) -> Plan {
    let new_key = key_version != applied.key_version;
    let due = key_not_before.is_none_or(|nb| now >= nb);
    Plan {
        apply_key: new_key && due,
        key_waiting: new_key && !due,
        apply_peers: gateway_version != applied.gateway_version || (new_key && due),
    }
}

/// Whether to move to the next endpoint.
///
/// `since_switch` is the time since the current endpoint was applied. Without any handshake on
/// this endpoint, fail over after `failover_after`. With one, the session is considered lost only
/// when the handshake is older than WireGuard's rekey time (120 s) plus `failover_after`.
#[must_use]
pub fn should_fail_over(
    last_handshake: Option<SystemTime>,
    since_switch: Duration,
    failover_after: Duration,
    now: SystemTime,
) -> bool {
    if since_switch < failover_after {
        return false;
    }
    match last_handshake.and_then(|t| now.duration_since(t).ok()) {
        None => last_handshake.is_none(),
        Some(age) => age >= Duration::from_secs(120) + failover_after,
    }
}

/// Whether an established session went silent: something was sent since the last byte came
/// back, and nothing has come back for `failover_after` (on this endpoint). `wg-sidecar gateway`
/// sends every peer a keepalive each `--peer-keepalive` seconds, so silence means it is gone —
/// found in seconds, where the handshake age alone takes minutes.
#[must_use]
pub fn session_silent(
    had_handshake: bool,
    sent_since_rx: bool,
    since_rx: Duration,
    since_switch: Duration,
    failover_after: Duration,
) -> bool {
    had_handshake && sent_since_rx && since_rx >= failover_after && since_switch >= failover_after
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, SystemTime};

    use super::{
        first_pod_key_rotation, plan, pod_key_due, pod_key_step, session_silent, should_fail_over,
        Applied, PodKeyStep, POD_KEY_LEAD,
    };

    fn published(rotates_at: &str) -> crate::keys::PeerRecord {
        crate::keys::PeerRecord {
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            addresses: vec!["10.99.0.2/32".parse().unwrap()],
            next_public_key: None,
            activate_at: None,
            rotates_at: Some(rotates_at.parse().unwrap()),
            preshared_key: None,
            pod: None,
            version: 1,
        }
    }

    #[test]
    fn a_pod_key_is_published_at_rotates_at_switched_lead_later_then_folded() {
        let day = Duration::from_secs(86_400);
        let mut r = published("2030-01-01T00:00:00Z");
        assert_eq!(pod_key_due(&r), r.rotates_at);
        let before: jiff::Timestamp = "2029-12-31T23:59:59Z".parse().unwrap();
        assert_eq!(pod_key_step(&r, day, before), PodKeyStep::Wait);
        let at: jiff::Timestamp = "2030-01-01T00:00:00.7Z".parse().unwrap();
        let PodKeyStep::Start {
            activate_at,
            rotates_at,
        } = pod_key_step(&r, day, at)
        else {
            panic!("due at rotates_at");
        };
        assert_eq!(
            activate_at,
            at + jiff::SignedDuration::try_from(POD_KEY_LEAD).unwrap()
        );
        assert_eq!(
            rotates_at,
            activate_at + jiff::SignedDuration::from_hours(24)
        );
        // Published: the next key waits for activate_at, then is folded.
        r.next_public_key = Some("BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=".into());
        r.activate_at = Some(activate_at);
        r.rotates_at = Some(rotates_at);
        assert_eq!(pod_key_due(&r), Some(activate_at));
        assert_eq!(pod_key_step(&r, day, at), PodKeyStep::Wait);
        assert_eq!(pod_key_step(&r, day, activate_at), PodKeyStep::Fold);
        r.public_key = r.next_public_key.take().unwrap();
        r.activate_at = None;
        assert_eq!(pod_key_due(&r), Some(rotates_at));
        assert_eq!(pod_key_step(&r, day, activate_at), PodKeyStep::Wait);
    }

    #[test]
    fn a_record_without_rotates_at_never_rotates_and_the_first_rotation_is_jittered() {
        let mut r = published("2030-01-01T00:00:00Z");
        r.rotates_at = None;
        let late: jiff::Timestamp = "2040-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            pod_key_step(&r, Duration::from_secs(60), late),
            PodKeyStep::Wait
        );
        assert_eq!(pod_key_due(&r), None);
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let h = jiff::SignedDuration::from_secs;
        let hour = Duration::from_secs(3600);
        assert_eq!(first_pod_key_rotation(now, hour, 0.0), now + h(3240));
        assert_eq!(first_pod_key_rotation(now, hour, 0.5), now + h(3600));
        assert_eq!(first_pod_key_rotation(now, hour, 1.0), now + h(3960));
    }

    #[test]
    fn a_session_is_silent_only_when_sent_traffic_got_nothing_back_for_the_deadline() {
        let f = Duration::from_secs(3);
        let long = Duration::from_secs(10);
        assert!(session_silent(true, true, f, long, f));
        assert!(
            !session_silent(true, false, long, long, f),
            "idle is not dead"
        );
        assert!(!session_silent(true, true, Duration::from_secs(2), long, f));
        assert!(
            !session_silent(false, true, long, long, f),
            "no session yet: handshake rule"
        );
        assert!(
            !session_silent(true, true, long, Duration::from_secs(2), f),
            "just switched"
        );
    }

    const A: Applied = Applied {
        key_version: 1,
        gateway_version: 4,
    };

    #[test]
    fn nothing_new_means_nothing_to_apply() {
        let p = plan(A, 1, None, 4, SystemTime::now());
        assert!(!p.apply_key && !p.apply_peers && !p.key_waiting);
    }

    #[test]
    fn a_new_key_version_is_applied_with_the_peers() {
        let p = plan(A, 2, None, 4, SystemTime::now());
        assert!(p.apply_key && p.apply_peers);
    }

    #[test]
    fn a_new_key_waits_for_its_not_before() {
        let now = SystemTime::now();
        let p = plan(A, 2, Some(now + Duration::from_secs(60)), 4, now);
        assert!(!p.apply_key && p.key_waiting && !p.apply_peers);
        let p = plan(A, 2, Some(now), 4, now);
        assert!(p.apply_key);
    }

    #[test]
    fn a_new_gateway_record_only_updates_peers() {
        let p = plan(A, 1, None, 5, SystemTime::now());
        assert!(!p.apply_key && p.apply_peers);
    }

    #[test]
    fn without_any_handshake_failover_happens_after_the_deadline() {
        let now = SystemTime::now();
        let f = Duration::from_secs(15);
        assert!(!should_fail_over(None, Duration::from_secs(14), f, now));
        assert!(should_fail_over(None, Duration::from_secs(15), f, now));
    }

    #[test]
    fn a_recent_handshake_prevents_failover() {
        let now = SystemTime::now();
        let f = Duration::from_secs(15);
        let hs = Some(now - Duration::from_secs(100));
        assert!(!should_fail_over(hs, Duration::from_secs(500), f, now));
        let old = Some(now - Duration::from_secs(136));
        assert!(should_fail_over(old, Duration::from_secs(500), f, now));
        // An old handshake from before the switch does not count against the new endpoint early.
        assert!(!should_fail_over(old, Duration::from_secs(10), f, now));
    }
}
