//! Benchmark of the injection core as the webhook runs it: `admission::decide` (annotation
//! parsing, injection and the JSON diff) on Pods of about 2 KiB, 10 KiB and 64 KiB of JSON.
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

criterion_group!(benches, bench_decide);
criterion_main!(benches);
