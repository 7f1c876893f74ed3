//! Benchmark of the injection core as the webhook runs it: `admission::decide` (annotation
//! parsing, injection and the JSON diff) on Pods of about 2 KiB, 10 KiB and 64 KiB of JSON, and
//! the whole `review::answer` (bytes in, bytes out) without and with the patch memo, beside
//! what the load benchmark's floor server does with the same body.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use wg_injector::admission::{decide, Decision};
use wg_injector::config::Config;

/// A Pod opting in with a few annotations, grown with app containers until its JSON is at
/// least `target` bytes.
fn pod_of_size(target: usize) -> (Pod, usize) {
    let annotations: BTreeMap<String, String> = [
        ("wg-injector.io/inject", "true"),
        ("wg-injector.io/routes", "10.20.0.0/16,fd00:20::/64"),
        ("wg-injector.io/mtu", "1380"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some("bench".to_owned()),
            namespace: Some("shop".to_owned()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec::default()),
        ..Pod::default()
    };
    let mut i = 0;
    loop {
        let size = serde_json::to_vec(&pod).unwrap().len();
        if size >= target && i > 0 {
            return (pod, size);
        }
        let env = (0..8)
            .map(|j| EnvVar {
                name: format!("SETTING_{i}_{j}"),
                value: Some(format!("value-{i}-{j}")),
                ..EnvVar::default()
            })
            .collect();
        pod.spec.as_mut().unwrap().containers.push(Container {
            name: format!("app-{i}"),
            image: Some(format!("shop/app-{i}:1.0")),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                container_port: 8000 + i,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        });
        i += 1;
    }
}

fn bench_decide(c: &mut Criterion) {
    let config = Config::default();
    let mut group = c.benchmark_group("decide");
    for target in [2 * 1024, 10 * 1024, 64 * 1024] {
        let (pod, size) = pod_of_size(target);
        assert!(
            matches!(decide(&pod, "shop", &config), Decision::Patch { ref patch, .. } if !patch.0.is_empty())
        );
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{}KiB", target / 1024)),
            &pod,
            |b, pod| {
                b.iter(|| decide(black_box(pod), "shop", &config));
            },
        );
    }
    group.finish();
}

/// The `AdmissionReview` body the apiserver would send for `pod`.
fn review_body(pod: &Pod) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        }
    }))
    .unwrap()
}

/// What the floor server of `wg-bench` does with a body: decode the review with its Pod, answer
/// `allowed: true`. The difference to `answer` is the injector's own work per request.
fn floor_answer(body: &[u8]) -> Vec<u8> {
    #[derive(serde::Deserialize)]
    struct ReviewIn {
        request: Option<RequestIn>,
    }
    #[derive(serde::Deserialize)]
    struct RequestIn {
        uid: String,
        object: Option<Pod>,
    }
    let review: ReviewIn = serde_json::from_slice(body).unwrap();
    let request = review.request.unwrap();
    black_box(&request.object);
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": request.uid, "allowed": true}
    }))
    .unwrap()
}

fn bench_answer(c: &mut Criterion) {
    let config = Config::default();
    let mut group = c.benchmark_group("answer");
    for target in [2 * 1024, 10 * 1024, 64 * 1024] {
        let (pod, _) = pod_of_size(target);
        let body = review_body(&pod);
        let answer = wg_injector::review::answer(&body, &config).unwrap();
        assert_eq!(answer.outcome, wg_injector::review::Outcome::Injected);
        group.throughput(Throughput::Bytes(body.len() as u64));
        let size = format!("{}KiB", target / 1024);
        group.bench_with_input(BenchmarkId::new("injector", &size), &body, |b, body| {
            b.iter(|| wg_injector::review::answer(black_box(body), &config));
        });
        // The webhook's path: after the first review every sibling is a memo hit.
        let shared = std::sync::Arc::new(config.clone());
        let memo = wg_injector::memo::PatchMemo::default();
        group.bench_with_input(
            BenchmarkId::new("injector-memo-hit", &size),
            &body,
            |b, body| {
                b.iter(|| wg_injector::review::answer_with(black_box(body), &shared, &memo));
            },
        );
        // The miss path: Pods that differ in their routes, more than the memo remembers.
        let distinct: Vec<Vec<u8>> = (0..4096)
            .map(|i| {
                let mut pod = pod.clone();
                pod.metadata.annotations.as_mut().unwrap().insert(
                    "wg-injector.io/routes".to_owned(),
                    format!("10.{}.{}.0/24", 64 + i / 256, i % 256),
                );
                review_body(&pod)
            })
            .collect();
        let mut next = 0;
        group.bench_function(BenchmarkId::new("injector-memo-miss", &size), |b| {
            b.iter(|| {
                next = (next + 1) % distinct.len();
                wg_injector::review::answer_with(black_box(&distinct[next]), &shared, &memo)
            });
        });
        group.bench_function(BenchmarkId::new("injector-distinct", &size), |b| {
            b.iter(|| {
                next = (next + 1) % distinct.len();
                wg_injector::review::answer(black_box(&distinct[next]), &config)
            });
        });
        group.bench_with_input(BenchmarkId::new("floor", &size), &body, |b, body| {
            b.iter(|| floor_answer(black_box(body)));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_answer);
criterion_main!(benches);
