//! The webhook's HTTP surface: `POST /mutate`, `POST /validate`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics`.
//!
//! Owns HTTP concerns only: content type (415), body size (413, refused from Content-Length
//! before reading and enforced while reading), undecodable reviews (400), status codes and
//! metrics recording, the same for both admission paths. The admission wire format lives in
//! [`crate::review`], the decisions in [`crate::admission`] (`/mutate`) and
//! [`crate::tunnel_label`] (`/validate`), sockets and TLS in [`crate::server`]. Never logs per
//! request at info.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use wg_certs::ReloadingResolver;

use crate::config::Config;
use crate::memo::PatchMemo;
use crate::metrics::Metrics;

/// Largest accepted `AdmissionReview` body (the API server caps objects well below this).
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The injector configuration handed to [`crate::admission::decide`]; replaced whole when
    /// version discovery changes `native_sidecars` (see [`AppState::set_native_sidecars`]).
    pub config: Arc<std::sync::RwLock<Arc<Config>>>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Fresh injections already computed under the current configuration.
    pub memo: Arc<PatchMemo>,
    /// The serving certificate; `/readyz` is ready only once one is loaded.
    pub certificate: Option<Arc<ReloadingResolver>>,
    /// Set on SIGTERM: `/readyz` answers 503 so the Pod leaves the Service while it still serves.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// State with fresh metrics.
    #[must_use]
    pub fn new(config: Config, certificate: Option<Arc<ReloadingResolver>>) -> Self {
        Self {
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
            metrics: Arc::new(Metrics::new()),
            memo: Arc::new(PatchMemo::default()),
            certificate,
            draining: Arc::default(),
        }
    }
}

impl AppState {
    /// The configuration one request is decided with.
    #[must_use]
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Record what version discovery found (`sidecar-mode: auto` resolves from it); requests
    /// already running keep the configuration they started with.
    pub fn set_native_sidecars(&self, native: bool) {
        let mut current = self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Config::clone(&current);
        next.native_sidecars = native;
        *current = Arc::new(next);
    }
}

/// The webhook's routes. Drive it with `tower::ServiceExt::oneshot` in tests, or serve it with
/// [`crate::server::serve`].
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // `mutate` and `validate` enforce MAX_BODY_BYTES themselves so they can check
        // Content-Type first.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut text = message.into();
    text.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn is_length_limit(error: axum::Error) -> bool {
    let inner = error.into_inner();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

async fn mutate(State(state): State<AppState>, request: Request) -> Response {
    review(&state, request, |body| {
        crate::review::answer_with(body, &state.config(), &state.memo)
    })
    .await
}

async fn validate(State(state): State<AppState>, request: Request) -> Response {
    review(&state, request, crate::review::answer_validation).await
}

/// One admission path: check the request, read the body within [`MAX_BODY_BYTES`], let
/// `answer` decide, record the metrics.
async fn review(
    state: &AppState,
    request: Request,
    answer: impl FnOnce(&[u8]) -> Result<crate::review::Answer, crate::Error>,
) -> Response {
    let started = Instant::now();
    let headers = request.headers();
    if !is_json(headers) {
        state.metrics.record_invalid();
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        );
    }
    // The rest of an oversized body is never read: HTTP/1.1 closes the connection after the
    // 413; HTTP/2 (h2) sends the complete 413 and then RST_STREAM NO_ERROR for the stream
    // (RFC 9113 §8.1), leaving the connection open. Draining instead would read unbounded input.
    let too_large = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("AdmissionReview bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
    };
    if declared_length(headers).is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        state.metrics.record_invalid();
        return too_large();
    }
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            state.metrics.record_invalid();
            if is_length_limit(e) {
                return too_large();
            }
            return plain(StatusCode::BAD_REQUEST, "failed to read the request body");
        }
    };
    match answer(&body) {
        Ok(answer) => {
            state.metrics.record(&answer.outcome, started.elapsed());
            if let Some(lookup) = answer.memo {
                state.metrics.record_memo(lookup);
            }
            tracing::debug!(
                outcome = answer.outcome.label(),
                "answered admission review"
            );
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                answer.body,
            )
                .into_response()
        }
        Err(e) => {
            state.metrics.record_invalid();
            plain(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

async fn healthz() -> Response {
    plain(StatusCode::OK, "ok")
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if state.certificate.is_some() {
        plain(StatusCode::OK, "ready")
    } else {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no serving certificate loaded",
        )
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(certificate) = &state.certificate {
        state
            .metrics
            .set_certificate_expiry(certificate.expiry_unix_seconds());
    }
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(state.metrics.encode()))
        .unwrap_or_else(|_| {
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to encode metrics",
            )
        })
}
