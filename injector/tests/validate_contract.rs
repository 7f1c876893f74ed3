//! `POST /validate`, driven without sockets (`tower::ServiceExt::oneshot`): the tunnel-label
//! rule on Pod CREATE and UPDATE as an `AdmissionReview` answer, what is not ours, and the same
//! bad-input handling as `/mutate` (415, 413, 400) with the same metrics.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use wg_injector::admission::{evaluate, Verdict};
use wg_injector::config::Config;
use wg_injector::webhook::{router, AppState, MAX_BODY_BYTES};

fn plain_pod(labels: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "elsewhere", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    })
}

/// The Pod the injector makes of an opted-in one (gateway `default`), as JSON.
fn injected_pod() -> Value {
    let input = serde_json::from_value(json!({
        "metadata": {"name": "web", "annotations": {"wg-injector.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    }))
    .unwrap();
    let Verdict::Inject(outcome) = evaluate(&input, &Config::default()) else {
        panic!("not injected")
    };
    serde_json::to_value(outcome.pod).unwrap()
}

fn review(operation: &str, object: &Value, old_object: Option<&Value>) -> Value {
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7a1c",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "elsewhere",
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": object,
            "dryRun": false
        }
    });
    if let Some(old) = old_object {
        review["request"]["oldObject"] = old.clone();
    }
    review
}

fn post(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap()
}

async fn send(state: &AppState, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

async fn validate(state: &AppState, review: &Value) -> Value {
    let (status, body) = send(
        state,
        post(
            "/validate",
            "application/json",
            serde_json::to_vec(review).unwrap(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn state() -> AppState {
    AppState::new(Config::default(), None)
}

fn denial_message(answer: &Value) -> &str {
    let response = &answer["response"];
    assert_eq!(response["allowed"], false, "{answer}");
    assert_eq!(response["status"]["code"], 403, "{answer}");
    assert_eq!(response["status"]["reason"], "Forbidden", "{answer}");
    response["status"]["message"].as_str().unwrap()
}

#[tokio::test]
async fn a_pod_created_with_the_tunnel_label_it_was_not_injected_for_is_denied() {
    let state = state();
    let answer = validate(
        &state,
        &review(
            "CREATE",
            &plain_pod(&json!({"wg-injector.io/tunnel": "default"})),
            None,
        ),
    )
    .await;
    assert_eq!(answer["response"]["uid"], "7a1c");
    assert!(
        answer["response"]["patch"].is_null(),
        "validation never patches"
    );
    let message = denial_message(&answer);
    assert!(
        message.contains("label wg-injector.io/tunnel=\"default\"")
            && message.contains("set only by wg-injector")
            && message.contains("wg-injector.io/inject: \"true\""),
        "{message}"
    );
    let metrics = String::from_utf8(
        send(
            &state,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        )
        .await
        .1,
    )
    .unwrap();
    assert!(
        metrics.contains("wg_injector_denials_total{reason=\"reserved_label\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_injected_pod_and_an_unlabelled_pod_are_allowed() {
    let state = state();
    for pod in [injected_pod(), plain_pod(&json!({"app": "web"}))] {
        let answer = validate(&state, &review("CREATE", &pod, None)).await;
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(answer["response"]["patch"].is_null());
    }
    let metrics = String::from_utf8(
        send(
            &state,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        )
        .await
        .1,
    )
    .unwrap();
    assert!(
        metrics.contains("wg_injector_admission_reviews_total{outcome=\"allowed\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_update_that_adds_changes_or_removes_the_label_is_denied_and_one_that_keeps_it_is_allowed(
) {
    let state = state();
    let injected = injected_pod();
    let mut changed = injected.clone();
    changed["metadata"]["labels"]["wg-injector.io/tunnel"] = json!("corp");
    let mut removed = injected.clone();
    removed["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("wg-injector.io/tunnel");
    let mut relabelled = injected.clone();
    relabelled["metadata"]["labels"]["tier"] = json!("front");
    let bare = plain_pod(&json!({"app": "web"}));
    let added = plain_pod(&json!({"app": "web", "wg-injector.io/tunnel": "default"}));

    for (old, new, says) in [
        (&injected, &changed, "from \"default\" to \"corp\""),
        (&injected, &removed, "cannot be removed"),
        (&bare, &added, "cannot be added"),
    ] {
        let answer = validate(&state, &review("UPDATE", new, Some(old))).await;
        let message = denial_message(&answer);
        assert!(message.contains(says), "{message}");
        assert!(message.contains("only wg-injector sets it"), "{message}");
    }
    let answer = validate(&state, &review("UPDATE", &relabelled, Some(&injected))).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

#[tokio::test]
async fn what_is_not_a_pod_create_or_update_is_ignored_and_a_missing_object_is_a_400_denial() {
    let state = state();
    let labelled = plain_pod(&json!({"wg-injector.io/tunnel": "default"}));
    for operation in ["DELETE", "CONNECT"] {
        let answer = validate(&state, &review(operation, &labelled, None)).await;
        assert_eq!(answer["response"]["allowed"], true, "{operation}");
    }
    let mut status_update = review("UPDATE", &labelled, Some(&plain_pod(&json!({}))));
    status_update["request"]["subResource"] = json!("status");
    let answer = validate(&state, &status_update).await;
    assert_eq!(answer["response"]["allowed"], true);

    let mut no_old = review("UPDATE", &labelled, None);
    no_old["request"]
        .as_object_mut()
        .unwrap()
        .remove("oldObject");
    let answer = validate(&state, &no_old).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("oldObject"),
        "{answer}"
    );
}

#[tokio::test]
async fn bad_bodies_are_refused_like_on_mutate() {
    for path in ["/mutate", "/validate"] {
        let state = state();
        let (status, _) = send(&state, post(path, "text/plain", "{}")).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{path}");
        let (status, _) = send(&state, post(path, "application/json", "not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        let (status, _) = send(
            &state,
            post(path, "application/json", vec![b' '; MAX_BODY_BYTES + 1]),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let metrics = String::from_utf8(
            send(
                &state,
                Request::get("/metrics").body(Body::empty()).unwrap(),
            )
            .await
            .1,
        )
        .unwrap();
        assert!(
            metrics.contains("wg_injector_admission_reviews_total{outcome=\"invalid\"} 3"),
            "{path}: {metrics}"
        );
    }
}
