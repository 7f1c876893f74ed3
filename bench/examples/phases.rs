//! Where the injector's time goes for one `AdmissionReview`, phase by phase, in one thread
//! (no HTTP, no TLS): the whole `review::answer`, the floor's decode, and the core's steps.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use wg_injector::config::Config;

fn time<T>(label: &str, iterations: u32, mut f: impl FnMut() -> T) {
    for _ in 0..iterations / 10 {
        black_box(f());
    }
    let started = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    let per = started.elapsed() / iterations;
    println!("{label:<44} {:>9.1} µs", per.as_secs_f64() * 1e6);
}

fn main() {
    let config = Config::default();
    for kib in [2, 10, 64] {
        let payload = wg_bench::payload::payload(kib);
        let n = if kib == 64 { 500 } else { 3000 };
        println!("-- {} (review {} bytes)", payload.label, payload.body.len());
        time("review::answer (whole)", n, || {
            wg_injector::review::answer(&payload.body, &config).unwrap()
        });
        let review: serde_json::Value = serde_json::from_slice(&payload.body).unwrap();
        let object = serde_json::to_string(&review["request"]["object"]).unwrap();
        time("decode Pod from JSON", n, || {
            serde_json::from_str::<Pod>(&object).unwrap()
        });
        let pod: Pod = serde_json::from_str(&object).unwrap();
        time("admission::evaluate (annotations + inject)", n, || {
            wg_injector::admission::evaluate(&pod, &config)
        });
        let wg_injector::admission::Verdict::Inject(outcome) =
            wg_injector::admission::evaluate(&pod, &config)
        else {
            panic!("not injected")
        };
        time("to_value(pod) ×2", n, || {
            (
                serde_json::to_value(&pod).unwrap(),
                serde_json::to_value(&outcome.pod).unwrap(),
            )
        });
        time("admission::decide (whole core)", n, || {
            wg_injector::admission::decide(&pod, "shop", &config)
        });
    }
}
