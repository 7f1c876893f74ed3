//! The webhook's HTTP contract, driven without sockets (`tower::ServiceExt::oneshot`):
//! AdmissionReview echo rules, what is ours and what is not, bad inputs, health and metrics.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use wg_injector::config::Config;
use wg_injector::webhook::{router, AppState, MAX_BODY_BYTES};

fn state(with_certificate: bool) -> AppState {
    let certificate = with_certificate.then(|| {
        let ca = wg_certs::generate_ca("test", std::time::Duration::from_secs(3600)).unwrap();
        let leaf = wg_certs::issue_serving_cert(
            &ca,
            &["localhost".to_owned()],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        Arc::new(
            wg_certs::ReloadingResolver::from_certified_key(leaf.certified_key().unwrap()).unwrap(),
        )
    });
    AppState::new(Config::default(), certificate)
}

fn pod(annotations: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx"}]}
    })
}

fn review(api_version: &str, uid: &str, operation: &str, kind: &str, object: &Value) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": object,
            "dryRun": false
        }
    })
}

async fn send(state: AppState, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

fn post_json(body: impl Into<Body>) -> Request<Body> {
    Request::post("/mutate")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

async fn mutate(state: AppState, review: &Value) -> Value {
    let (status, body) = send(state, post_json(serde_json::to_vec(review).unwrap())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn injected_pod(pod: &Value, response: &Value) -> Value {
    let patch = response["response"]["patch"].as_str().expect("a patch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

fn container_names(pod: &Value) -> Vec<String> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| pod["spec"][list].as_array())
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_uid_and_api_version_are_echoed() {
    for api_version in ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] {
        let body = review(api_version, "abc-123", "CREATE", "Pod", &pod(&json!({})));
        let answer = mutate(state(true), &body).await;
        assert_eq!(answer["apiVersion"], api_version);
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "abc-123");
        assert_eq!(answer["response"]["allowed"], true);
    }
}

#[tokio::test]
async fn a_pod_without_the_opt_in_is_allowed_without_a_patch() {
    let body = review(
        "admission.k8s.io/v1",
        "u",
        "CREATE",
        "Pod",
        &pod(&json!({})),
    );
    let answer = mutate(state(true), &body).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert!(answer["response"].get("patchType").is_none());
}

#[tokio::test]
async fn an_annotated_pod_comes_back_with_a_patch_adding_the_sidecar() {
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    let body = review("admission.k8s.io/v1", "u1", "CREATE", "Pod", &input);
    let answer = mutate(state(true), &body).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patched = injected_pod(&input, &answer);
    let names = container_names(&patched);
    assert!(names.contains(&"wg-sidecar".to_owned()), "{names:?}");
    assert!(names.contains(&"wg-init".to_owned()), "{names:?}");
    assert!(names.contains(&"app".to_owned()), "{names:?}");
}

#[tokio::test]
async fn an_already_injected_pod_is_allowed_without_a_patch() {
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    let first = mutate(
        state(true),
        &review("admission.k8s.io/v1", "u1", "CREATE", "Pod", &input),
    )
    .await;
    let once = injected_pod(&input, &first);
    let second = mutate(
        state(true),
        &review("admission.k8s.io/v1", "u2", "CREATE", "Pod", &once),
    )
    .await;
    assert_eq!(second["response"]["allowed"], true);
    assert!(second["response"].get("patch").is_none(), "{second}");
}

#[tokio::test]
async fn a_bad_annotation_is_denied_with_a_message_naming_it() {
    let input = pod(&json!({"wg-injector.io/inject": "true", "wg-injector.io/mtu": "huge"}));
    let answer = mutate(
        state(true),
        &review("admission.k8s.io/v1", "u", "CREATE", "Pod", &input),
    )
    .await;
    let response = &answer["response"];
    assert_eq!(response["allowed"], false, "{answer}");
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("wg-injector.io/mtu"), "{message}");
    assert!(response.get("patch").is_none());
}

#[tokio::test]
async fn objects_that_are_not_pods_are_allowed_untouched() {
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d", "annotations": {"wg-injector.io/inject": "true"}},
        "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}});
    let mut body = review(
        "admission.k8s.io/v1",
        "d1",
        "CREATE",
        "Deployment",
        &deployment,
    );
    body["request"]["kind"]["group"] = json!("apps");
    let answer = mutate(state(true), &body).await;
    assert_eq!(answer["response"]["uid"], "d1");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
}

#[tokio::test]
async fn updates_and_other_operations_are_allowed_untouched() {
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    for operation in ["UPDATE", "DELETE", "CONNECT"] {
        let answer = mutate(
            state(true),
            &review("admission.k8s.io/v1", "o", operation, "Pod", &input),
        )
        .await;
        assert_eq!(answer["response"]["allowed"], true, "{operation}");
        assert!(answer["response"].get("patch").is_none(), "{operation}");
    }
}

#[tokio::test]
async fn a_dry_run_is_answered_exactly_like_a_real_request() {
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    let real = review("admission.k8s.io/v1", "same", "CREATE", "Pod", &input);
    let mut dry = real.clone();
    dry["request"]["dryRun"] = json!(true);
    assert_eq!(
        mutate(state(true), &real).await,
        mutate(state(true), &dry).await
    );
}

#[tokio::test]
async fn a_pod_object_that_does_not_decode_is_refused_with_a_message() {
    let broken = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
        "spec": {"containers": "not a list"}});
    let answer = mutate(
        state(true),
        &review("admission.k8s.io/v1", "b", "CREATE", "Pod", &broken),
    )
    .await;
    assert_eq!(answer["response"]["uid"], "b");
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
}

/// Regression (found by the `mutate_handler` fuzzer): a Pod object without `metadata` used to
/// get a patch adding `/metadata/annotations`, which does not apply to what was sent.
#[tokio::test]
async fn a_pod_object_without_metadata_is_refused_not_patched() {
    let headless = json!({"apiVersion": "v1", "kind": "Pod",
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx"}]}});
    let answer = mutate(
        state(true),
        &review("admission.k8s.io/v1", "m", "CREATE", "Pod", &headless),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
    assert!(answer["response"]["patch"].is_null());
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("no metadata"), "{message}");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_400_with_a_message() {
    let (status, body) = send(state(true), post_json("{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));
}

#[tokio::test]
async fn a_review_without_a_request_is_a_400_with_a_message() {
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    let (status, text) = send(state(true), post_json(body.to_string())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&text).contains("no request"),
        "{}",
        String::from_utf8_lossy(&text)
    );
}

#[tokio::test]
async fn a_content_type_other_than_json_is_a_415() {
    for content_type in [Some("text/plain"), Some("application/yaml"), None] {
        let mut request = Request::post("/mutate");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let (status, _) = send(state(true), request.body(Body::from("{}")).unwrap()).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
    }
    let with_charset = Request::post("/mutate")
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(
        send(state(true), with_charset).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_a_413_before_the_body_is_read() {
    // The body stream would fail if polled: the refusal must come from Content-Length alone.
    let never = futures_never();
    let request = Request::post("/mutate")
        .header("content-type", "application/json")
        .header("content-length", (MAX_BODY_BYTES + 1).to_string())
        .body(never)
        .unwrap();
    assert_eq!(
        send(state(true), request).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

fn futures_never() -> Body {
    Body::from_stream(futures_util::stream::once(async {
        Err::<axum::body::Bytes, _>(std::io::Error::other("the body must not be read"))
    }))
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_a_413() {
    let chunk = axum::body::Bytes::from(vec![b' '; 1024 * 1024]);
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> =
        (0..7).map(|_| Ok(chunk.clone())).collect();
    let request = Request::post("/mutate")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    assert_eq!(
        send(state(true), request).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[tokio::test]
async fn healthz_is_always_ok_and_readyz_waits_for_a_certificate() {
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    assert_eq!(send(state(false), get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(
        send(state(false), get("/readyz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(state(true), get("/readyz")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn after_sigterm_readyz_is_503_while_mutate_still_answers() {
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let shared = state(true);
    shared
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = send(shared.clone(), get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, b"shutting down\n");
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    let answer = mutate(
        shared,
        &review("admission.k8s.io/v1", "d1", "CREATE", "Pod", &input),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"]["patch"].is_string(), "{answer}");
}

#[tokio::test]
async fn metrics_count_reviews_by_outcome_and_expose_the_certificate_expiry() {
    let shared = state(true);
    let input = pod(&json!({"wg-injector.io/inject": "true"}));
    mutate(
        shared.clone(),
        &review("admission.k8s.io/v1", "m1", "CREATE", "Pod", &input),
    )
    .await;
    mutate(
        shared.clone(),
        &review(
            "admission.k8s.io/v1",
            "m2",
            "CREATE",
            "Pod",
            &pod(&json!({})),
        ),
    )
    .await;
    send(shared.clone(), post_json("nope")).await;
    let (status, body) = send(
        shared.clone(),
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    let expiry = shared.certificate.as_ref().unwrap().expiry_unix_seconds();
    for needle in [
        "wg_injector_admission_reviews_total{outcome=\"injected\"} 1".to_owned(),
        "wg_injector_admission_reviews_total{outcome=\"skipped\"} 1".to_owned(),
        "wg_injector_admission_reviews_total{outcome=\"invalid\"} 1".to_owned(),
        "wg_injector_injections_total 1".to_owned(),
        "wg_injector_skips_total{reason=\"not_requested\"} 1".to_owned(),
        "wg_injector_admission_duration_seconds_count 2".to_owned(),
        format!("wg_injector_certificate_expiry_timestamp_seconds {expiry}"),
    ] {
        assert!(text.contains(&needle), "missing {needle} in\n{text}");
    }
}

/// Pods of one template get their patch from the memo once it has seen two of them: the same
/// patch for siblings with other containers of the same shape, a fresh diff for another shape,
/// and the lookups counted.
#[tokio::test]
async fn siblings_of_one_template_are_patched_from_the_memo_with_the_same_result() {
    let shared = state(true);
    let annotations = json!({"wg-injector.io/inject": "true", "wg-injector.io/mtu": "1380"});
    let first = pod(&annotations);
    let mut sibling = first.clone();
    sibling["metadata"]["name"] = json!("web-2");
    sibling["spec"]["containers"][0]["image"] = json!("nginx:2");
    let mut other_shape = first.clone();
    other_shape["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let mut patched = Vec::new();
    let inputs = [
        ("s1", &first),
        ("s2", &sibling),
        ("s3", &first),
        ("s4", &other_shape),
    ];
    for (uid, input) in inputs {
        let answer = mutate(
            shared.clone(),
            &review("admission.k8s.io/v1", uid, "CREATE", "Pod", input),
        )
        .await;
        let injected = injected_pod(input, &answer);
        // What the memo-free path (the offline CLI's) gives for the same Pod.
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(input.clone()).unwrap();
        let wg_injector::admission::Verdict::Inject(expected) =
            wg_injector::admission::evaluate(&pod, &Config::default())
        else {
            panic!("{uid} must be injected");
        };
        assert_eq!(
            injected,
            serde_json::to_value(&expected.pod).unwrap(),
            "{uid}"
        );
        patched.push(answer["response"]["patch"].clone());
    }
    assert_eq!(patched[0], patched[1], "siblings get the same patch");
    assert_eq!(patched[0], patched[2], "and the memo sends it again");
    assert_ne!(patched[0], patched[3], "another shape gets its own patch");
    assert_eq!(shared.memo.len(), 1, "a shape seen once is not kept");
    let (_, body) = send(
        shared.clone(),
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let text = String::from_utf8(body).unwrap();
    for needle in [
        "wg_injector_patch_memo_lookups_total{result=\"hit\"} 1",
        "wg_injector_patch_memo_lookups_total{result=\"miss\"} 3",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

/// Regression (found by the `mutate_handler` fuzzer): every patch returned must apply to the
/// object exactly as it was sent, even when the object is malformed in ways a typed reading
/// papers over (a port without `containerPort`, no `metadata`); otherwise the answer is a 400.
#[tokio::test]
async fn every_returned_patch_applies_to_the_object_as_sent() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/regressions");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // Fuzzer inputs may hold invalid UTF-8 in ignored fields; read them leniently.
        let bytes = std::fs::read(&path).unwrap();
        let review: Value = serde_json::from_str(&String::from_utf8_lossy(&bytes)).unwrap();
        let answer = mutate(state(true), &review).await;
        let response = &answer["response"];
        if let Some(patch) = response["patch"].as_str() {
            let ops: json_patch::Patch = serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .unwrap(),
            )
            .unwrap();
            let mut sent = review["request"]["object"].clone();
            json_patch::patch(&mut sent, &ops.0)
                .unwrap_or_else(|e| panic!("{}: patch does not apply: {e}", path.display()));
        } else if response["allowed"] == false {
            assert_eq!(
                response["status"]["code"],
                400,
                "{}: {response}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "regression inputs missing in {}",
        dir.display()
    );
}

/// Regression (found by the `annotations` fuzzer): an unknown annotation key may itself hold
/// the key material; the denial must not echo it.
#[tokio::test]
async fn a_key_material_denial_does_not_echo_an_unknown_key() {
    let pem = "-----BEGIN PRIVATE KEY-----";
    let annotations = json!({
        "wg-injector.io/inject": "true",
        format!("wg-injector.io/x{pem}"): format!("{pem}\nMC4CAQAwBQYDK2VuBCIEIA\n-----END PRIVATE KEY-----"),
    });
    let answer = mutate(
        state(true),
        &review(
            "admission.k8s.io/v1",
            "k",
            "CREATE",
            "Pod",
            &pod(&annotations),
        ),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("key material"), "{message}");
    assert!(!message.contains("BEGIN"), "{message}");
}
