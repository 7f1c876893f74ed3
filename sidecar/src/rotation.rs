//! Pure decisions of the control loop: what to apply after a poll, and when to fail over.
//!
//! Owns: the rotation diff ("a new version seen → apply in place, a private key only at or after
//! its `not_before`") and the failover rule ("no handshake for `--failover-after` → next endpoint").
//! Must never: do IO, sleep or read the clock — callers pass `now`.

use std::time::{Duration, SystemTime};

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
    use std::time::{Duration, SystemTime};

    use super::{plan, session_silent, should_fail_over, Applied};

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
