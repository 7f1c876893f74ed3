//! Connection events: one structured log line per fact, for a SIEM (schema: `docs/events.md`).
//!
//! Owns: the typed [`Event`] (the fields every event has — [`Source`], `gateway`, the
//! [`Subject`] — once, and the [`Fact`] with its own fields, one variant per fact), [`emit`], and
//! the pure detection of facts the data plane only shows as state: a handshake established or
//! lost and an endpoint roamed ([`Session`]), policy denials per interval ([`Denials`]), and the
//! gateway's and the sidecar's bookkeeping of who a peer is ([`GatewayEvents`],
//! [`SidecarEvents`]), and the Kubernetes Event on a refused Pod ([`pod_notice`], published by
//! [`PodEvents`] in kubernetes mode). The call sites in `gateway.rs` and `run.rs` are one line
//! each.
//!
//! Only a refusal becomes a Kubernetes Event: it is what an operator looks for with `kubectl
//! describe pod` when a Pod stays unready, it is rare, and the gateway (which decides it) already
//! has a client. An Event per admission or handshake would be thousands of API writes per
//! gateway start; the sidecar has no client and its workload's service account should not get
//! the right to write Events.
//!
//! Why a log line and not an exporter of its own: the sidecar and the gateway already write JSON
//! lines to stderr, which every cluster ships to its log store; an event is such a line with the
//! target `wg_event` and a field `event` naming the fact, so a pipeline selects them with one
//! match (`target == "wg_event"`) and `WG_SIDECAR_LOG=info,wg_event=off` silences them. The
//! fields are recorded as plain tracing fields (numbers as numbers, absent when unknown, never
//! `none`), and [`emit`] writes exactly what `serde_json::to_value(&event)` gives: a unit test
//! holds the two together, so the `Serialize` form is the schema.
//!
//! The human log lines (`peer admitted`, `peer refused`, …) stay beside the events: they carry
//! what an operator reads (the Pod's UID, the full key, the detail), their wording is matched by
//! benches and docs, and the events' field names are the contract instead.
//!
//! A public key appears only as [`fingerprint`]: its first 8 base64 characters. Public keys are
//! not secret (the metrics label peers with them), but a short stable handle is what a SIEM joins
//! on and what `wg show | grep` finds; a hash would lose the second. The gateway's events carry
//! the Pod's key fingerprint, and so do the sidecar's, so the two sides of one tunnel join on it.
//! Must never: carry a private key, a preshared key, a token or any other secret, in any field
//! (an Event's note included); take anything but a public key in [`fingerprint`]; do IO other
//! than the log line and, for a refusal, the Event; make the gateway's loop wait for the API.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use jiff::Timestamp;
use serde::Serialize;

use crate::{
    cli::{KeySourceConfig, RunConfig},
    health::HANDSHAKE_FRESH,
    keys::PeerRecord,
    nat::DropCounters,
    pod_index::PeerChange,
    registration::PodIdentity,
    tunnel::PeerStats,
};

/// The tracing target of every event line.
pub const TARGET: &str = "wg_event";

/// Policy denials are summed over this long and emitted once per interval when not zero: short
/// enough for an alert on a burst, at most six lines a minute, none when nothing is denied.
pub const DENIAL_INTERVAL: Duration = Duration::from_secs(10);

/// Characters of the base64 public key kept in `public_key_fingerprint`.
pub const FINGERPRINT_LEN: usize = 8;

/// The handle of a public key in events: its first [`FINGERPRINT_LEN`] base64 characters.
#[must_use]
pub fn fingerprint(public_key: &str) -> String {
    public_key.chars().take(FINGERPRINT_LEN).collect()
}

/// Which program emitted the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `wg-sidecar gateway`.
    Gateway,
    /// `wg-sidecar run` in a Pod.
    Sidecar,
}

impl Source {
    /// The value of the `source` field.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Sidecar => "sidecar",
        }
    }
}

/// Whom an event is about: a Pod (as far as the emitter knows it) and its public key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Subject {
    /// The Pod's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Pod's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The Pod's service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// [`fingerprint`] of the Pod's public key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_fingerprint: Option<String>,
    /// Vault pod source: the record's path below `--vault-peers-path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Subject {
    /// A Pod and, when known, its public key.
    #[must_use]
    pub fn of_pod(pod: &PodIdentity, public_key: Option<&str>) -> Self {
        Self {
            namespace: Some(pod.namespace.clone()),
            pod: Some(pod.name.clone()),
            service_account: Some(pod.service_account.clone()),
            public_key_fingerprint: public_key.map(fingerprint),
            identity: None,
        }
    }

    /// A peer known only by its key.
    #[must_use]
    pub fn of_key(public_key: &str) -> Self {
        Self {
            public_key_fingerprint: Some(fingerprint(public_key)),
            ..Self::default()
        }
    }

    /// A vault-mode record: its Pod when the record names one, its path, the key in use.
    fn of_record(identity: &str, rec: &PeerRecord, public_key: &str) -> Self {
        let mut s = rec.pod.as_ref().map_or_else(
            || Self::of_key(public_key),
            |p| Self::of_pod(p, Some(public_key)),
        );
        s.identity = Some(identity.to_owned());
        s
    }
}

/// One fact, with its own fields (the common ones are in [`Event`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Fact {
    /// The gateway admitted the Pod's key as a peer.
    PeerAdmitted,
    /// The gateway refused the Pod (gateway), or the sidecar read the gateway's verdict.
    PeerRefused {
        /// Stable code (`wg_gateway_peers_refused_total{reason}`).
        reason: String,
        /// What to do about it, in words.
        detail: String,
    },
    /// The Pod's peer left the gateway.
    PeerRemoved {
        /// `deleted`, `finished` (kubernetes), `record_gone` (vault).
        reason: String,
    },
    /// A handshake completed after none, or after the last one had expired.
    HandshakeEstablished {
        /// The far end's UDP endpoint as WireGuard sees it.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Seconds since that handshake when it was seen (the tick is 1 s).
        age_seconds: u64,
    },
    /// The last handshake became older than WireGuard's reject-after time (180 s): the session
    /// is gone.
    HandshakeLost {
        /// The last endpoint seen.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Seconds since the last handshake (absent: the peer was re-created and has none).
        #[serde(skip_serializing_if = "Option::is_none")]
        age_seconds: Option<u64>,
    },
    /// An established peer's endpoint changed (NAT rebinding, a Pod's new node address, another
    /// gateway replica behind the load balancer).
    EndpointRoamed {
        /// Where it was.
        previous_endpoint: String,
        /// Where it is.
        endpoint: String,
    },
    /// A key was replaced in place: the subject's fingerprint is the new key's.
    KeyRotated {
        /// [`fingerprint`] of the key that left.
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_key_fingerprint: Option<String>,
        /// KV version of the record that carries the new key, when the emitter knows it.
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// Tunnel packets the gateway's forward filter dropped over the last interval (only
    /// emitted when not zero).
    PolicyDenials {
        /// The interval's length.
        interval_seconds: u64,
        /// Refused by a peer's egress NetworkPolicy or by `defaultDeny`.
        policy: u64,
        /// For a destination the gateway does not advertise.
        outside_networks: u64,
    },
    /// The sidecar switched to the next gateway endpoint.
    Failover {
        /// The endpoint it leaves (as configured, `host:port`).
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_endpoint: Option<String>,
        /// The endpoint it dials now.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// `no_handshake` (none within `--failover-after`), `handshake_stale` (the last one is
        /// older than 120 s + `--failover-after`) or `session_silent` (nothing received while
        /// sending, for `--failover-after`) ([`failover_reason`]).
        reason: String,
    },
}

impl Fact {
    /// The value of the `event` field.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PeerAdmitted => "peer_admitted",
            Self::PeerRefused { .. } => "peer_refused",
            Self::PeerRemoved { .. } => "peer_removed",
            Self::HandshakeEstablished { .. } => "handshake_established",
            Self::HandshakeLost { .. } => "handshake_lost",
            Self::EndpointRoamed { .. } => "endpoint_roamed",
            Self::KeyRotated { .. } => "key_rotated",
            Self::PolicyDenials { .. } => "policy_denials",
            Self::Failover { .. } => "failover",
        }
    }
}

/// One connection event: who emitted it, for which gateway, about whom, and the fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The emitting program.
    pub source: Source,
    /// The gateway's name (the gateway's own, or the sidecar's `--gateway` profile).
    pub gateway: String,
    /// Whom it is about (empty for gateway-wide facts: policy denials, the gateway's key).
    #[serde(flatten)]
    pub subject: Subject,
    /// What happened.
    #[serde(flatten)]
    pub fact: Fact,
}

/// Logs `e` at INFO with target [`TARGET`]: its fields as tracing fields, the message its kind.
pub fn emit(e: &Event) {
    let s = &e.subject;
    macro_rules! line {
        ($($field:tt)*) => {
            tracing::info!(
                target: TARGET,
                event = e.fact.kind(),
                source = e.source.as_str(),
                gateway = e.gateway.as_str(),
                namespace = s.namespace.as_deref(),
                pod = s.pod.as_deref(),
                service_account = s.service_account.as_deref(),
                public_key_fingerprint = s.public_key_fingerprint.as_deref(),
                identity = s.identity.as_deref(),
                $($field)*
            )
        };
    }
    match &e.fact {
        Fact::PeerAdmitted => line!("peer_admitted"),
        Fact::PeerRefused { reason, detail } => line!(
            reason = reason.as_str(),
            detail = detail.as_str(),
            "peer_refused"
        ),
        Fact::PeerRemoved { reason } => line!(reason = reason.as_str(), "peer_removed"),
        Fact::HandshakeEstablished {
            endpoint,
            age_seconds,
        } => line!(
            endpoint = endpoint.as_deref(),
            age_seconds,
            "handshake_established"
        ),
        Fact::HandshakeLost {
            endpoint,
            age_seconds,
        } => line!(
            endpoint = endpoint.as_deref(),
            age_seconds = *age_seconds,
            "handshake_lost"
        ),
        Fact::EndpointRoamed {
            previous_endpoint,
            endpoint,
        } => line!(
            previous_endpoint = previous_endpoint.as_str(),
            endpoint = endpoint.as_str(),
            "endpoint_roamed"
        ),
        Fact::KeyRotated {
            previous_key_fingerprint,
            version,
        } => line!(
            previous_key_fingerprint = previous_key_fingerprint.as_deref(),
            version = *version,
            "key_rotated"
        ),
        Fact::PolicyDenials {
            interval_seconds,
            policy,
            outside_networks,
        } => line!(interval_seconds, policy, outside_networks, "policy_denials"),
        Fact::Failover {
            previous_endpoint,
            endpoint,
            reason,
        } => line!(
            previous_endpoint = previous_endpoint.as_deref(),
            endpoint = endpoint.as_deref(),
            reason = reason.as_str(),
            "failover"
        ),
    }
}

/// Emits every event of `events`.
pub fn emit_all(events: impl IntoIterator<Item = Event>) {
    for e in events {
        emit(&e);
    }
}

/// What a statistics sample changed in a peer's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Fresh handshake after none or an expired one.
    Established {
        /// Age of that handshake.
        age: Duration,
        /// Endpoint now.
        endpoint: Option<SocketAddr>,
    },
    /// The last handshake expired (or vanished: `None`).
    Lost {
        /// Age of the last handshake.
        age: Option<Duration>,
        /// Endpoint last seen.
        endpoint: Option<SocketAddr>,
    },
    /// The endpoint moved while the session lived.
    Roamed {
        /// Where it was.
        from: SocketAddr,
        /// Where it is.
        to: SocketAddr,
    },
}

/// A peer's session as the events follow it: established while its last handshake is younger
/// than [`HANDSHAKE_FRESH`] (WireGuard's reject-after time), and where it was last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    established: bool,
    endpoint: Option<SocketAddr>,
}

impl Session {
    /// Takes one sample (`last_handshake`, `endpoint` at `now`) and says what changed. An
    /// endpoint that appears with the first handshake is not a roam (it is in the established
    /// change); a handshake dated after `now` (clock step) counts as age 0.
    pub fn observe(
        &mut self,
        last_handshake: Option<SystemTime>,
        endpoint: Option<SocketAddr>,
        now: SystemTime,
    ) -> Option<Change> {
        let age = last_handshake.map(|t| now.duration_since(t).unwrap_or_default());
        let fresh = age.is_some_and(|a| a < HANDSHAKE_FRESH);
        let change = match (self.established, fresh) {
            (false, true) => Some(Change::Established {
                age: age.unwrap_or_default(),
                endpoint,
            }),
            (true, false) => Some(Change::Lost {
                age,
                endpoint: endpoint.or(self.endpoint),
            }),
            (true, true) => match (self.endpoint, endpoint) {
                (Some(from), Some(to)) if from != to => Some(Change::Roamed { from, to }),
                _ => None,
            },
            (false, false) => None,
        };
        self.established = fresh;
        self.endpoint = endpoint.or(self.endpoint);
        change
    }
}

impl Change {
    /// The fact this change is.
    #[must_use]
    pub fn fact(self) -> Fact {
        match self {
            Self::Established { age, endpoint } => Fact::HandshakeEstablished {
                endpoint: endpoint.map(|e| e.to_string()),
                age_seconds: age.as_secs(),
            },
            Self::Lost { age, endpoint } => Fact::HandshakeLost {
                endpoint: endpoint.map(|e| e.to_string()),
                age_seconds: age.map(|a| a.as_secs()),
            },
            Self::Roamed { from, to } => Fact::EndpointRoamed {
                previous_endpoint: from.to_string(),
                endpoint: to.to_string(),
            },
        }
    }
}

/// Policy denials summed per [`DENIAL_INTERVAL`] from the table's cumulative drop counters.
#[derive(Debug, Clone, Default)]
pub struct Denials {
    last: DropCounters,
    policy: u64,
    outside_networks: u64,
    since: Option<Instant>,
}

impl Denials {
    /// Takes the counters read at `now`; at the end of an interval with denials, its fact. A
    /// counter below the last read means the table was installed again and counts from zero.
    pub fn observe(&mut self, counters: DropCounters, now: Instant) -> Option<Fact> {
        let delta = |new: u64, old: u64| new.checked_sub(old).unwrap_or(new);
        self.policy += delta(counters.policy, self.last.policy);
        self.outside_networks += delta(counters.outside_networks, self.last.outside_networks);
        self.last = counters;
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed < DENIAL_INTERVAL {
            return None;
        }
        self.since = Some(now);
        let (policy, outside_networks) = (
            std::mem::take(&mut self.policy),
            std::mem::take(&mut self.outside_networks),
        );
        (policy > 0 || outside_networks > 0).then_some(Fact::PolicyDenials {
            interval_seconds: elapsed.as_secs(),
            policy,
            outside_networks,
        })
    }
}

/// The `reason` of a sidecar's failover: `stale` is [`crate::rotation::should_fail_over`]'s
/// answer (else [`crate::rotation::session_silent`] decided), `had_handshake` whether the
/// endpoint it leaves ever completed one.
#[must_use]
pub fn failover_reason(stale: bool, had_handshake: bool) -> &'static str {
    match (stale, had_handshake) {
        (true, false) => "no_handshake",
        (true, true) => "handshake_stale",
        (false, _) => "session_silent",
    }
}

/// The stable reason code of a vault-mode conflict ([`crate::gateway::desired_peers`]).
fn conflict_reason(why: &str) -> &'static str {
    if why.starts_with("public key") {
        "duplicate_key"
    } else {
        "address_conflict"
    }
}

/// The gateway's side: who each peer is, its session, the denials.
#[derive(Debug, Default)]
pub struct GatewayEvents {
    gateway: String,
    /// Public key → whom it belongs to.
    subjects: HashMap<String, Subject>,
    /// Public key → session.
    sessions: HashMap<String, Session>,
    /// Vault mode: identity → key admitted.
    records: BTreeMap<String, String>,
    /// Vault mode: identity → conflict reported.
    conflicts: BTreeMap<String, String>,
    denials: Denials,
    /// The gateway's own public key.
    key: String,
}

impl GatewayEvents {
    /// The bookkeeping of gateway `gateway`, whose key is `public_key`.
    #[must_use]
    pub fn new(gateway: &str, public_key: &str) -> Self {
        Self {
            gateway: gateway.to_owned(),
            key: public_key.to_owned(),
            ..Self::default()
        }
    }

    fn event(&self, subject: Subject, fact: Fact) -> Event {
        Event {
            source: Source::Gateway,
            gateway: self.gateway.clone(),
            subject,
            fact,
        }
    }

    fn subject(&self, public_key: &str) -> Subject {
        self.subjects
            .get(public_key)
            .cloned()
            .unwrap_or_else(|| Subject::of_key(public_key))
    }

    /// Kubernetes mode: the event of one change of the pod index.
    pub fn on_change(&mut self, c: &PeerChange) -> Event {
        match c {
            PeerChange::Admitted { pod, public_key } => {
                let s = Subject::of_pod(pod, Some(public_key));
                self.subjects.insert(public_key.clone(), s.clone());
                self.event(s, Fact::PeerAdmitted)
            }
            PeerChange::Refused {
                pod,
                public_key,
                refusal,
            } => self.event(
                Subject::of_pod(pod, public_key.as_deref()),
                Fact::PeerRefused {
                    reason: refusal.reason().to_owned(),
                    detail: refusal.to_string(),
                },
            ),
            PeerChange::Rotated {
                pod,
                old,
                public_key,
            } => {
                self.subjects.remove(old);
                self.sessions.remove(old);
                let s = Subject::of_pod(pod, Some(public_key));
                self.subjects.insert(public_key.clone(), s.clone());
                self.event(
                    s,
                    Fact::KeyRotated {
                        previous_key_fingerprint: Some(fingerprint(old)),
                        version: None,
                    },
                )
            }
            PeerChange::Removed {
                pod,
                public_key,
                reason,
            } => {
                self.subjects.remove(public_key);
                self.sessions.remove(public_key);
                self.event(
                    Subject::of_pod(pod, Some(public_key)),
                    Fact::PeerRemoved {
                        reason: (*reason).to_owned(),
                    },
                )
            }
        }
    }

    /// Vault mode: the events of one reconcile's records and the conflicts left out of the
    /// table at `now` (`conflicts`: identity, why, as [`crate::gateway::desired_peers`] gives
    /// them). A conflict is reported once until it changes or goes.
    pub fn on_records(
        &mut self,
        records: &[(String, PeerRecord)],
        conflicts: &[(String, String)],
        now: Timestamp,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        let refused: BTreeMap<&str, &str> = conflicts
            .iter()
            .map(|(id, why)| (id.as_str(), why.as_str()))
            .collect();
        let mut seen = BTreeMap::new();
        for (id, rec) in records {
            let key = rec.effective_public_key(now);
            let s = Subject::of_record(id, rec, key);
            if let Some(why) = refused.get(id.as_str()) {
                if self.conflicts.get(id).map(String::as_str) != Some(*why) {
                    self.conflicts.insert(id.clone(), (*why).to_owned());
                    out.push(self.event(
                        s,
                        Fact::PeerRefused {
                            reason: conflict_reason(why).to_owned(),
                            detail: (*why).to_owned(),
                        },
                    ));
                }
                continue;
            }
            self.conflicts.remove(id);
            seen.insert(id.clone(), key.to_owned());
            match self.records.get(id) {
                Some(old) if old == key => {}
                Some(old) => {
                    let previous = fingerprint(old);
                    self.subjects.remove(old);
                    self.sessions.remove(old);
                    self.subjects.insert(key.to_owned(), s.clone());
                    out.push(self.event(
                        s,
                        Fact::KeyRotated {
                            previous_key_fingerprint: Some(previous),
                            version: Some(rec.version),
                        },
                    ));
                }
                None => {
                    self.subjects.insert(key.to_owned(), s.clone());
                    out.push(self.event(s, Fact::PeerAdmitted));
                }
            }
        }
        let gone: Vec<(String, String)> = self
            .records
            .iter()
            .filter(|(id, _)| !seen.contains_key(*id))
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect();
        for (id, key) in gone {
            let mut s = self.subject(&key);
            s.identity = Some(id);
            self.subjects.remove(&key);
            self.sessions.remove(&key);
            out.push(self.event(
                s,
                Fact::PeerRemoved {
                    reason: "record_gone".into(),
                },
            ));
        }
        self.conflicts
            .retain(|id, _| refused.contains_key(id.as_str()));
        self.records = seen;
        out
    }

    /// The events of one statistics sample at `now`: handshakes established and lost, roams.
    pub fn on_stats(&mut self, stats: &[PeerStats], now: SystemTime) -> Vec<Event> {
        let mut out = Vec::new();
        for p in stats {
            let change = self
                .sessions
                .entry(p.public_key.clone())
                .or_default()
                .observe(p.last_handshake, p.endpoint, now);
            if let Some(c) = change {
                out.push(self.event(self.subject(&p.public_key), c.fact()));
            }
        }
        if self.sessions.len() > stats.len() {
            let live: std::collections::HashSet<&str> =
                stats.iter().map(|p| p.public_key.as_str()).collect();
            self.sessions.retain(|k, _| live.contains(k.as_str()));
        }
        out
    }

    /// The policy-denial event of the drop counters read at `now`, at the end of an interval.
    pub fn on_drops(&mut self, counters: DropCounters, now: Instant) -> Option<Event> {
        let fact = self.denials.observe(counters, now)?;
        Some(self.event(Subject::default(), fact))
    }

    /// The gateway's own key was rotated in place to `public_key` (private record `version`).
    pub fn key_rotated(&mut self, public_key: &str, version: u64) -> Event {
        let previous = std::mem::replace(&mut self.key, public_key.to_owned());
        self.event(
            Subject::of_key(public_key),
            Fact::KeyRotated {
                previous_key_fingerprint: (!previous.is_empty()).then(|| fingerprint(&previous)),
                version: Some(version),
            },
        )
    }
}

/// The sidecar's side: the Pod it runs in, its key, the session with the gateway.
#[derive(Debug, Clone)]
pub struct SidecarEvents {
    gateway: String,
    subject: Subject,
    /// The gateway's key the session is with.
    peer_key: String,
    session: Session,
}

impl SidecarEvents {
    /// The bookkeeping of a sidecar run with `cfg` and the Pod's public key `public_key`.
    #[must_use]
    pub fn new(cfg: &RunConfig, public_key: Option<&str>) -> Self {
        let subject = match &cfg.key_source {
            KeySourceConfig::Vault {
                registration: Some((pod, _)),
                ..
            } => Subject::of_pod(pod, public_key),
            _ => Subject {
                public_key_fingerprint: public_key.map(fingerprint),
                ..Subject::default()
            },
        };
        Self {
            gateway: cfg.gateway.clone(),
            subject,
            peer_key: String::new(),
            session: Session::default(),
        }
    }

    fn event(&self, fact: Fact) -> Event {
        Event {
            source: Source::Sidecar,
            gateway: self.gateway.clone(),
            subject: self.subject.clone(),
            fact,
        }
    }

    /// The event of one statistics sample of the gateway peer (`gateway_key`) at `now`. A new
    /// gateway key (its rotation) is a new session, not a lost one: its first handshake is
    /// `handshake_established`, as the gateway, which drops a rotated key's session, sees it.
    pub fn on_stats(
        &mut self,
        stats: &[PeerStats],
        gateway_key: &str,
        now: SystemTime,
    ) -> Option<Event> {
        if self.peer_key != gateway_key {
            gateway_key.clone_into(&mut self.peer_key);
            self.session = Session::default();
        }
        let p = stats.iter().find(|p| p.public_key == gateway_key);
        let change = self.session.observe(
            p.and_then(|p| p.last_handshake),
            p.and_then(|p| p.endpoint),
            now,
        )?;
        Some(self.event(change.fact()))
    }

    /// The Pod's key was rotated in place to `public_key` (record version `version`).
    pub fn key_rotated(&mut self, public_key: &str, version: u64) -> Event {
        let previous = self
            .subject
            .public_key_fingerprint
            .replace(fingerprint(public_key));
        self.event(Fact::KeyRotated {
            previous_key_fingerprint: previous,
            version: Some(version),
        })
    }

    /// The gateway's verdict on this Pod says it is refused.
    #[must_use]
    pub fn refused(&self, reason: &str, detail: &str) -> Event {
        self.event(Fact::PeerRefused {
            reason: reason.to_owned(),
            detail: detail.to_owned(),
        })
    }

    /// The sidecar switches from `previous` to `endpoint` for `reason`.
    #[must_use]
    pub fn failover(
        &self,
        previous: Option<&String>,
        endpoint: Option<&String>,
        reason: &str,
    ) -> Event {
        self.event(Fact::Failover {
            previous_endpoint: previous.cloned(),
            endpoint: endpoint.cloned(),
            reason: reason.to_owned(),
        })
    }
}

/// `reason` of the Kubernetes Event on a refused Pod (`kubectl describe pod`, column Reason).
pub const POD_REFUSED_REASON: &str = "WireGuardPeerRefused";

/// The longest `note` the Events API takes.
const NOTE_MAX: usize = 1024;

/// The Kubernetes Event an operator looks for with `kubectl describe pod`, for the changes that
/// have one — a refusal — with the Pod it is about. Pure: [`PodEvents`] publishes it.
#[must_use]
pub fn pod_notice(
    c: &PeerChange,
    gateway: &str,
) -> Option<(
    k8s_openapi::api::core::v1::ObjectReference,
    kube::runtime::events::Event,
)> {
    let PeerChange::Refused { pod, refusal, .. } = c else {
        return None;
    };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: Some(pod.uid.clone()),
        ..Default::default()
    };
    let mut note = format!(
        "gateway {gateway} refused the Pod ({}): {refusal}",
        refusal.reason()
    );
    if note.len() > NOTE_MAX {
        let mut end = NOTE_MAX;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: POD_REFUSED_REASON.into(),
        note: Some(note),
        action: "Admit".into(),
        secondary: None,
    };
    Some((reference, event))
}

/// Writes [`pod_notice`]s as Events on the Pods (`events.k8s.io/v1`, reporting controller
/// `wg-gateway`, instance the gateway Pod's host name; repeats within minutes become a series).
/// Kubernetes mode only; the gateway needs `create` and `patch` on `events.k8s.io` `events`.
#[derive(Clone)]
pub struct PodEvents {
    recorder: kube::runtime::events::Recorder,
    gateway: String,
}

impl PodEvents {
    /// Events of gateway `gateway` through `client`.
    #[must_use]
    pub fn new(client: kube::Client, gateway: &str) -> Self {
        Self {
            recorder: kube::runtime::events::Recorder::new(client, "wg-gateway".into()),
            gateway: gateway.to_owned(),
        }
    }

    /// Publishes the Event of `c`, if it has one.
    ///
    /// # Errors
    ///
    /// The API refused or did not answer.
    pub async fn publish(&self, c: &PeerChange) -> std::result::Result<(), kube::Error> {
        match pod_notice(c, &self.gateway) {
            Some((reference, event)) => self.recorder.publish(&event, &reference).await,
            None => Ok(()),
        }
    }

    /// Publishes the Event of `c` in the background (the loop does not wait for the API); a
    /// failure is logged.
    pub fn tell(&self, c: &PeerChange) {
        if !matches!(c, PeerChange::Refused { .. }) {
            return;
        }
        let (me, c) = (self.clone(), c.clone());
        tokio::spawn(async move {
            if let Err(e) = me.publish(&c).await {
                tracing::warn!(error = %e, "cannot write the Kubernetes Event on the refused Pod (the gateway needs create and patch on events.k8s.io events)");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;

    const KEY: &str = "AAAAbbbbCCCCddddEEEEffffGGGGhhhhIIIIjjjjKKk=";
    const OTHER: &str = "ZZZZyyyyXXXXwwwwVVVVuuuuTTTTssssRRRRqqqqPPp=";

    fn pod() -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
            name: "web-0".into(),
            uid: "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
        }
    }

    /// One event of each fact, as the emitters build them.
    fn one_of_each() -> Vec<Event> {
        let mut g = GatewayEvents::new("corp", KEY);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let a: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:40001".parse().unwrap();
        let stats = |hs: Option<SystemTime>, ep: SocketAddr| PeerStats {
            public_key: KEY.into(),
            endpoint: Some(ep),
            rx_bytes: 0,
            tx_bytes: 0,
            last_handshake: hs,
        };
        let mut out = vec![g.on_change(&PeerChange::Admitted {
            pod: pod(),
            public_key: KEY.into(),
        })];
        out.push(g.on_change(&PeerChange::Refused {
            pod: pod(),
            public_key: None,
            refusal: crate::pod_index::Refusal::NotInjected,
        }));
        out.extend(g.on_stats(&[stats(Some(t0), a)], t0 + Duration::from_secs(1)));
        out.extend(g.on_stats(&[stats(Some(t0), b)], t0 + Duration::from_secs(2)));
        out.extend(g.on_stats(&[stats(Some(t0), b)], t0 + Duration::from_secs(200)));
        let start = Instant::now();
        g.on_drops(DropCounters::default(), start);
        out.extend(g.on_drops(
            DropCounters {
                outside_networks: 3,
                policy: 2,
            },
            start + DENIAL_INTERVAL,
        ));
        out.push(g.key_rotated(OTHER, 2));
        out.push(g.on_change(&PeerChange::Removed {
            pod: pod(),
            public_key: KEY.into(),
            reason: "deleted",
        }));
        let s = SidecarEvents {
            gateway: "corp".into(),
            subject: Subject::of_pod(&pod(), Some(KEY)),
            peer_key: String::new(),
            session: Session::default(),
        };
        out.push(s.failover(
            Some(&"vpn-a.example.com:51820".to_owned()),
            Some(&"vpn-b.example.com:51820".to_owned()),
            "no_handshake",
        ));
        out
    }

    #[test]
    fn only_a_refusal_is_a_kubernetes_event_on_the_pod_and_its_note_says_why() {
        let refused = PeerChange::Refused {
            pod: pod(),
            public_key: Some(KEY.into()),
            refusal: crate::pod_index::Refusal::ServiceAccountNotAllowed {
                namespace: "shop".into(),
                service_account: "web".into(),
            },
        };
        let (r, e) = pod_notice(&refused, "corp").unwrap();
        assert_eq!(
            (
                r.kind.as_deref(),
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.uid.as_deref()
            ),
            (
                Some("Pod"),
                Some("shop"),
                Some("web-0"),
                Some(pod().uid.as_str())
            )
        );
        assert_eq!(e.type_, kube::runtime::events::EventType::Warning);
        assert_eq!(e.reason, POD_REFUSED_REASON);
        let note = e.note.unwrap();
        assert!(
            note.starts_with("gateway corp refused the Pod (service_account_not_allowed): "),
            "{note}"
        );
        assert!(!note.contains(KEY), "{note}");
        let admitted = PeerChange::Admitted {
            pod: pod(),
            public_key: KEY.into(),
        };
        assert!(pod_notice(&admitted, "corp").is_none());
    }

    #[test]
    fn a_failover_names_why() {
        assert_eq!(failover_reason(true, false), "no_handshake");
        assert_eq!(failover_reason(true, true), "handshake_stale");
        assert_eq!(failover_reason(false, true), "session_silent");
    }

    #[test]
    fn a_fingerprint_is_the_first_8_characters_of_the_public_key() {
        assert_eq!(fingerprint(KEY), "AAAAbbbb");
        assert_eq!(
            Subject::of_key(KEY).public_key_fingerprint.unwrap(),
            "AAAAbbbb"
        );
    }

    #[test]
    fn a_session_is_established_roams_and_is_lost_after_the_reject_after_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let mut s = Session::default();
        assert_eq!(s.observe(None, None, at(0)), None, "no handshake yet");
        assert_eq!(
            s.observe(Some(at(0)), Some(a), at(1)),
            Some(Change::Established {
                age: Duration::from_secs(1),
                endpoint: Some(a)
            })
        );
        assert_eq!(s.observe(Some(at(120)), Some(a), at(121)), None, "rekey");
        assert_eq!(
            s.observe(Some(at(120)), Some(b), at(122)),
            Some(Change::Roamed { from: a, to: b })
        );
        assert_eq!(s.observe(Some(at(120)), Some(b), at(299)), None, "179 s");
        assert_eq!(
            s.observe(Some(at(120)), Some(b), at(300)),
            Some(Change::Lost {
                age: Some(Duration::from_secs(180)),
                endpoint: Some(b)
            })
        );
        assert_eq!(s.observe(Some(at(120)), Some(b), at(400)), None, "once");
        assert_eq!(
            s.observe(Some(at(401)), Some(a), at(401)),
            Some(Change::Established {
                age: Duration::ZERO,
                endpoint: Some(a)
            }),
            "back, from another endpoint: established, not roamed"
        );
        assert_eq!(
            s.observe(None, None, at(402)),
            Some(Change::Lost {
                age: None,
                endpoint: Some(a)
            }),
            "the peer was re-created"
        );
        assert_eq!(
            s.observe(Some(at(500)), None, at(499)),
            Some(Change::Established {
                age: Duration::ZERO,
                endpoint: None
            }),
            "a handshake ahead of the clock counts as age 0"
        );
    }

    #[test]
    fn denials_are_summed_per_interval_and_only_a_nonzero_interval_is_an_event() {
        let mut d = Denials::default();
        let t = Instant::now();
        let c = |outside_networks, policy| DropCounters {
            outside_networks,
            policy,
        };
        assert_eq!(d.observe(c(0, 0), t), None);
        assert_eq!(
            d.observe(c(0, 0), t + DENIAL_INTERVAL),
            None,
            "nothing denied"
        );
        assert_eq!(d.observe(c(4, 1), t + DENIAL_INTERVAL * 3 / 2), None);
        assert_eq!(
            d.observe(c(5, 3), t + DENIAL_INTERVAL * 2),
            Some(Fact::PolicyDenials {
                interval_seconds: DENIAL_INTERVAL.as_secs(),
                policy: 3,
                outside_networks: 5
            })
        );
        // The table was installed again: its counters start from zero.
        assert_eq!(d.observe(c(2, 0), t + DENIAL_INTERVAL * 5 / 2), None);
        assert_eq!(
            d.observe(c(2, 0), t + DENIAL_INTERVAL * 3),
            Some(Fact::PolicyDenials {
                interval_seconds: DENIAL_INTERVAL.as_secs(),
                policy: 0,
                outside_networks: 2
            })
        );
    }

    #[test]
    fn vault_mode_records_are_admitted_rotated_refused_once_and_removed() {
        let rec = |key: &str, addr: &str| PeerRecord {
            public_key: key.into(),
            addresses: vec![addr.parse().unwrap()],
            next_public_key: None,
            activate_at: None,
            rotates_at: None,
            preshared_key: None,
            pod: None,
            version: 1,
        };
        let now = Timestamp::now();
        let mut g = GatewayEvents::new("corp", OTHER);
        let kinds = |ev: &[Event]| {
            ev.iter()
                .map(|e| (e.fact.kind(), e.subject.identity.clone().unwrap()))
                .collect::<Vec<_>>()
        };
        let records = vec![
            ("shop/web".to_owned(), rec(KEY, "10.98.0.2/32")),
            ("shop/zz".to_owned(), rec(KEY, "10.98.0.3/32")),
        ];
        let desired = crate::gateway::desired_peers(&records, now);
        let ev = g.on_records(&records, &desired.conflicts, now);
        assert_eq!(
            kinds(&ev),
            [
                ("peer_admitted", "shop/web".to_owned()),
                ("peer_refused", "shop/zz".to_owned())
            ]
        );
        assert!(
            matches!(&ev[1].fact, Fact::PeerRefused { reason, .. } if reason == "duplicate_key"),
            "{ev:?}"
        );
        assert!(
            g.on_records(&records, &desired.conflicts, now).is_empty(),
            "nothing new"
        );
        // The address conflict reads as its own reason.
        let clash = vec![
            ("shop/web".to_owned(), rec(KEY, "10.98.0.2/32")),
            ("shop/zz".to_owned(), rec(OTHER, "10.98.0.2/32")),
        ];
        let desired = crate::gateway::desired_peers(&clash, now);
        let ev = g.on_records(&clash, &desired.conflicts, now);
        assert!(
            matches!(&ev[..], [Event { fact: Fact::PeerRefused { reason, .. }, .. }] if reason == "address_conflict"),
            "{ev:?}"
        );
        let rotated = vec![("shop/web".to_owned(), rec(OTHER, "10.98.0.2/32"))];
        let ev = g.on_records(&rotated, &[], now);
        assert_eq!(kinds(&ev), [("key_rotated", "shop/web".to_owned())]);
        assert_eq!(
            ev[0].subject.public_key_fingerprint.as_deref(),
            Some("ZZZZyyyy")
        );
        let ev = g.on_records(&[], &[], now);
        assert_eq!(kinds(&ev), [("peer_removed", "shop/web".to_owned())]);
    }

    #[test]
    fn the_sidecar_follows_the_gateway_peer_and_its_own_key() {
        let mut s = SidecarEvents {
            gateway: "corp".into(),
            subject: Subject::of_pod(&pod(), Some(KEY)),
            peer_key: String::new(),
            session: Session::default(),
        };
        let now = SystemTime::now();
        let stats = [PeerStats {
            public_key: OTHER.into(),
            endpoint: Some("192.0.2.9:51820".parse().unwrap()),
            rx_bytes: 1,
            tx_bytes: 1,
            last_handshake: Some(now),
        }];
        assert_eq!(s.on_stats(&stats, KEY, now), None, "not the gateway's key");
        let e = s.on_stats(&stats, OTHER, now).unwrap();
        assert_eq!(e.fact.kind(), "handshake_established");
        // The gateway's key rotated: its new peer has no handshake yet. Not a lost session.
        let mut rotated = stats.clone();
        rotated[0].public_key = KEY.into();
        rotated[0].last_handshake = None;
        assert_eq!(s.on_stats(&rotated, KEY, now), None);
        rotated[0].last_handshake = Some(now);
        let e = s.on_stats(&rotated, KEY, now).unwrap();
        assert_eq!(e.fact.kind(), "handshake_established");
        // The same key re-created (failover to another endpoint): the session is gone.
        rotated[0].last_handshake = None;
        let e = s.on_stats(&rotated, KEY, now).unwrap();
        assert_eq!(e.fact.kind(), "handshake_lost");
        assert_eq!(
            e.subject.public_key_fingerprint.as_deref(),
            Some("AAAAbbbb")
        );
        let r = s.key_rotated(OTHER, 3);
        assert_eq!(
            r.fact,
            Fact::KeyRotated {
                previous_key_fingerprint: Some("AAAAbbbb".into()),
                version: Some(3)
            }
        );
        assert_eq!(
            s.refused("namespace_not_selected", "x")
                .subject
                .public_key_fingerprint,
            Some("ZZZZyyyy".into())
        );
    }

    /// A writer into a shared buffer (the tracing subscriber's output in these tests).
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `f` logs, as the binary's JSON format writes them.
    fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buf = Buffer::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn every_fact_is_logged_exactly_as_it_serializes_under_the_wg_event_target() {
        let events = one_of_each();
        let mut kinds: Vec<&str> = events.iter().map(|e| e.fact.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 9, "every fact is covered: {kinds:?}");
        let lines = logged(|| {
            for e in &events {
                emit(e);
            }
        });
        assert_eq!(lines.len(), events.len());
        for (e, line) in events.iter().zip(&lines) {
            assert_eq!(line["target"], TARGET);
            assert_eq!(line["level"], "INFO");
            let mut fields = line["fields"].as_object().unwrap().clone();
            assert_eq!(
                fields.remove("message").unwrap(),
                e.fact.kind(),
                "the message is the kind"
            );
            let expected = serde_json::to_value(e).unwrap();
            assert_eq!(
                serde_json::Value::Object(fields),
                expected,
                "{} logs what it serializes",
                e.fact.kind()
            );
        }
    }

    #[test]
    fn docs_events_md_names_every_fact_and_every_field() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md"),
        )
        .unwrap();
        let mut all = one_of_each();
        let mut s = SidecarEvents {
            gateway: "corp".into(),
            subject: Subject::of_pod(&pod(), Some(KEY)),
            peer_key: String::new(),
            session: Session::default(),
        };
        all.push(s.key_rotated(OTHER, 2));
        all.push(s.refused("namespace_not_selected", "x"));
        for e in all {
            let kind = e.fact.kind();
            let section = doc
                .split("\n### ")
                .find(|s| s.starts_with(&format!("`{kind}`")))
                .unwrap_or_else(|| panic!("docs/events.md has no section ### `{kind}`"));
            let v = serde_json::to_value(&e).unwrap();
            for field in v.as_object().unwrap().keys() {
                let common = doc.split("\n### ").next().unwrap();
                assert!(
                    section.contains(&format!("`{field}`"))
                        || common.contains(&format!("| `{field}`")),
                    "docs/events.md does not describe field `{field}` of `{kind}`"
                );
            }
        }
    }
}
