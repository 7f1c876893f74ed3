//! `/healthz`, `/ready` and `/metrics` on one port, and the pure readiness rule.
//!
//! Owns: the HTTP router over a shared [`HealthState`] and the rule "ready = interface up and a
//! handshake with the gateway younger than 180 s".
//! Must never: do WireGuard or Vault IO itself; it only reports what the control loop recorded.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{
    error::{Result, SidecarError},
    metrics::Metrics,
};

/// A handshake older than this means the session is gone (WireGuard's reject-after-time).
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// `/healthz` fails when the control loop has not ticked for this long.
pub const LOOP_STALL: Duration = Duration::from_secs(30);

/// Whether the sidecar is ready, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Serving traffic.
    Ready,
    /// Not serving, with a reason for the log and `/ready`'s body.
    NotReady(String),
}

/// The readiness rule: interface up and a handshake with the gateway younger than 180 s.
#[must_use]
pub fn readiness(
    interface_up: bool,
    last_handshake: Option<SystemTime>,
    now: SystemTime,
) -> Readiness {
    if !interface_up {
        return Readiness::NotReady("interface not up".into());
    }
    match last_handshake {
        None => Readiness::NotReady("no handshake with the gateway yet".into()),
        Some(t) => match now.duration_since(t) {
            Ok(age) if age >= HANDSHAKE_FRESH => Readiness::NotReady(format!(
                "last handshake with the gateway {}s ago",
                age.as_secs()
            )),
            _ => Readiness::Ready,
        },
    }
}

/// What the control loop shares with the HTTP handlers.
#[derive(Debug)]
pub struct HealthState {
    last_tick: Mutex<Instant>,
    readiness: Mutex<Readiness>,
    /// The metrics served on `/metrics`.
    pub metrics: Metrics,
}

impl HealthState {
    /// Fresh state: alive, not ready.
    #[must_use]
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            last_tick: Mutex::new(Instant::now()),
            readiness: Mutex::new(Readiness::NotReady("starting".into())),
            metrics,
        })
    }

    /// The control loop is alive.
    pub fn tick(&self) {
        *self
            .last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    /// Records readiness; returns true when it changed.
    pub fn set_readiness(&self, r: Readiness) -> bool {
        self.metrics.ready.set(i64::from(r == Readiness::Ready));
        let mut cur = self
            .readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *cur != r;
        *cur = r;
        changed
    }

    /// Current readiness.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        self.readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn alive(&self) -> bool {
        self.last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
            < LOOP_STALL
    }
}

async fn healthz(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    if s.alive() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "control loop stalled\n".to_owned(),
        )
    }
}

async fn ready(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    match s.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_owned()),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// The health router.
pub fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Binds `addr` now (so a bad port fails startup) and serves in a background task.
pub async fn serve(addr: SocketAddr, state: Arc<HealthState>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Health {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| SidecarError::Health {
            addr: addr.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, SystemTime};

    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::{readiness, router, HealthState, Readiness};
    use crate::metrics::Metrics;

    #[test]
    fn ready_needs_the_interface_and_a_handshake_younger_than_180_seconds() {
        let now = SystemTime::now();
        assert!(matches!(
            readiness(false, Some(now), now),
            Readiness::NotReady(_)
        ));
        assert!(matches!(readiness(true, None, now), Readiness::NotReady(_)));
        assert_eq!(
            readiness(true, Some(now - Duration::from_secs(179)), now),
            Readiness::Ready
        );
        assert!(matches!(
            readiness(true, Some(now - Duration::from_secs(180)), now),
            Readiness::NotReady(_)
        ));
    }

    #[tokio::test]
    async fn ready_endpoint_goes_from_503_to_200() {
        let s = HealthState::new(Metrics::new());
        let get = |p: &'static str| Request::get(p).body(Body::empty()).unwrap();
        let r = router(s.clone()).oneshot(get("/ready")).await.unwrap();
        assert_eq!(r.status(), 503);
        s.set_readiness(Readiness::Ready);
        let r = router(s.clone()).oneshot(get("/ready")).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = router(s.clone()).oneshot(get("/healthz")).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = router(s).oneshot(get("/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
    }
}
