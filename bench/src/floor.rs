//! The floor server: the least a webhook on our stack can do. Same TLS (the injector's
//! [`wg_injector::server::tls_config`]), same HTTP plumbing ([`wg_injector::server::serve`]:
//! hyper-util auto HTTP/1.1 + HTTP/2, limits, timeouts), same checks before decoding
//! (Content-Type, body limit), and the same decode of the `AdmissionReview` with its object as a
//! typed `Pod`; then it answers `allowed: true` with no patch.
//!
//! Owns nothing the injector relies on. Never injects, never logs per request.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
struct RequestIn {
    uid: String,
    object: Option<Pod>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
}

fn is_json(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

async fn mutate(request: Request) -> Response {
    if !is_json(&request) {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    let limit = wg_injector::webhook::MAX_BODY_BYTES;
    let Ok(body) = axum::body::to_bytes(request.into_body(), limit).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Ok(review) = serde_json::from_slice::<ReviewIn>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(request) = review.request else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // The Pod is decoded like the injector decodes it, then dropped.
    std::hint::black_box(&request.object);
    let out = ReviewOut {
        api_version: review
            .api_version
            .as_deref()
            .unwrap_or("admission.k8s.io/v1"),
        kind: review.kind.as_deref().unwrap_or("AdmissionReview"),
        response: ResponseOut {
            uid: &request.uid,
            allowed: true,
        },
    };
    match serde_json::to_vec(&out) {
        Ok(json) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The floor's routes: `POST /mutate` and `GET /healthz`.
pub fn router() -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
}

/// A TLS configuration (the injector's [`wg_injector::server::tls_config`]) with a freshly
/// generated CA and serving certificate for `localhost` and `127.0.0.1`; returns the CA's PEM too.
pub fn self_signed_tls() -> Result<(Arc<rustls::ServerConfig>, String), Error> {
    let lifetime = Duration::from_secs(86_400);
    let ca = wg_certs::generate_ca("wg-bench floor CA", lifetime)?;
    let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let serving = wg_certs::issue_serving_cert(&ca, &names, lifetime)?;
    let resolver = Arc::new(wg_certs::ReloadingResolver::from_certified_key(
        serving.certified_key()?,
    )?);
    Ok((
        wg_injector::server::tls_config(resolver)?,
        ca.cert_pem().to_owned(),
    ))
}

/// Serve the floor on `listen` with [`self_signed_tls`], printing the caBundle (base64 PEM)
/// as the first stdout line like `wg-injector serve --self-signed` does. Runs until SIGTERM or
/// Ctrl-C.
pub async fn run(listen: std::net::SocketAddr) -> Result<(), Error> {
    use base64::Engine as _;
    use std::io::Write as _;
    let (tls, ca_pem) = self_signed_tls()?;
    let listener = wg_injector::server::bind(listen).await?;
    let mut stdout = std::io::stdout();
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // A closed stdout only means nobody reads the bundle; serving still makes sense.
    let _ = writeln!(stdout, "{bundle}").and_then(|()| stdout.flush());
    wg_injector::server::serve(
        listener,
        router(),
        tls,
        &wg_injector::server::Limits::default(),
        wg_injector::server::shutdown_signal(),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    async fn post(content_type: &str, body: Vec<u8>) -> (StatusCode, String) {
        let request = axum::http::Request::post("/mutate")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap();
        let response = router().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_floor_allows_the_review_with_no_patch_and_echoes_the_uid() {
        let payload = crate::payload::payload(2);
        let (status, body) = post("application/json", payload.body.to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","allowed":true}}"#
        );
    }

    #[tokio::test]
    async fn the_floor_refuses_what_the_injector_refuses_before_decoding() {
        assert_eq!(
            post("text/plain", b"{}".to_vec()).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            post("application/json", b"{\"request\":{\"uid\":1}}".to_vec())
                .await
                .0,
            StatusCode::BAD_REQUEST
        );
    }
}
