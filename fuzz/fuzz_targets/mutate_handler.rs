//! Raw request bytes → `POST /mutate` through the webhook's router (no socket).
//!
//! Oracle beyond "no panic": the status is one the handler documents (200, 400, 413, 415);
//! a 200 carries an `AdmissionReview` whose `response.uid` echoes the request's; and a patch,
//! when present, is base64 JSON Patch that applies cleanly to the request's object.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tower::ServiceExt as _;
use wg_injector::config::Config;
use wg_injector::webhook::{router, AppState};

const CONFIG: &str = include_str!("../../injector/tests/testdata/golden-config.yaml");

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn app() -> Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        let config = Config::from_yaml_str(CONFIG).expect("the golden config parses");
        router(AppState::new(config, None))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let request = Request::post("/mutate")
        .header("content-type", "application/json")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let (status, body) = runtime().block_on(async {
        let response = app().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a buffered body")
            .to_bytes();
        (status, body)
    });
    assert!(
        [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        ]
        .contains(&status),
        "unexpected status {status}"
    );
    if status != StatusCode::OK {
        return;
    }
    let review: Value = serde_json::from_slice(&body).expect("a 200 answer is JSON");
    // serde_json does not check UTF-8 inside fields it skips (found by this fuzzer: a 200 for
    // a review with an invalid byte in `userInfo`); the API server only sends valid JSON, so
    // compare against the lossy reading of the input.
    let input: Value = serde_json::from_str(&String::from_utf8_lossy(data))
        .expect("a 200 answer means the input was JSON");
    let response = &review["response"];
    assert_eq!(
        response["uid"], input["request"]["uid"],
        "the answer echoes the request uid"
    );
    assert!(response["allowed"].is_boolean(), "allowed is a boolean");
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let json = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("the patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&json).expect("a JSON Patch");
        // The API server applies the patch to the object it sent, not to our typed re-encoding.
        let mut object = input["request"]["object"].clone();
        json_patch::patch(&mut object, &patch).expect("the patch applies to the sent object");
    }
});
