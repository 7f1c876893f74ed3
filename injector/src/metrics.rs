//! Prometheus metrics of the webhook (served at `/metrics` in the `OpenMetrics` text format).
//!
//! Owns the metric names and labels (an API for dashboards and alerts: change them only with a
//! migration note). Recording is lock-free atomics; labels are `&'static str`, so the hot path
//! never allocates for metrics. Never records anything from request content except the
//! fixed labels of [`crate::review::Outcome`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::memo::Lookup;
use crate::review::Outcome;

type Label = [(&'static str, &'static str); 1];

/// Buckets of the admission duration histogram, in seconds (100 µs … 1 s).
pub const DURATION_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The webhook's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reviews: Family<Label, Counter>,
    injections: Counter,
    skips: Family<Label, Counter>,
    denials: Family<Label, Counter>,
    duration: Histogram,
    memo_lookups: Family<Label, Counter>,
    certificate_expiry: Gauge,
    /// Bodies answered on `/mutate` and `/validate` (reviews and invalid bodies), for
    /// [`Metrics::answered`].
    answered: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric under the `wg_injector` prefix.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wg_injector");
        let reviews = Family::<Label, Counter>::default();
        let injections = Counter::default();
        let skips = Family::<Label, Counter>::default();
        let denials = Family::<Label, Counter>::default();
        let duration = Histogram::new(DURATION_BUCKETS);
        let certificate_expiry = Gauge::default();
        let memo_lookups = Family::<Label, Counter>::default();
        registry.register(
            "admission_reviews",
            "AdmissionReview requests answered, by outcome (injected, already_injected, skipped, denied, ignored, invalid; allowed: passed /validate)",
            reviews.clone(),
        );
        registry.register(
            "injections",
            "Pods that received a non-empty patch",
            injections.clone(),
        );
        registry.register("skips", "Pods left untouched, by reason", skips.clone());
        registry.register("denials", "Pods refused, by reason", denials.clone());
        registry.register(
            "admission_duration_seconds",
            "Time to decode, decide and encode one AdmissionReview",
            duration.clone(),
        );
        registry.register(
            "patch_memo_lookups",
            "Fresh injections looked up in the patch memo, by result (hit: the patch of an earlier Pod with the same annotations and shape was sent again; miss: computed and remembered)",
            memo_lookups.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate, Unix seconds",
            certificate_expiry.clone(),
        );
        Self {
            registry,
            reviews,
            injections,
            skips,
            denials,
            duration,
            memo_lookups,
            certificate_expiry,
            answered: AtomicU64::new(0),
        }
    }

    /// Bodies answered on `/mutate` and `/validate` so far (every review and every invalid
    /// body): tells the server when it has gone quiet.
    #[must_use]
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Record one answered review.
    pub fn record(&self, outcome: &Outcome, elapsed: Duration) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.reviews
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
        match outcome {
            Outcome::Injected => {
                self.injections.inc();
            }
            Outcome::AlreadyInjected => {
                self.skips
                    .get_or_create(&[("reason", "already_injected")])
                    .inc();
            }
            Outcome::Skipped(reason) => {
                self.skips.get_or_create(&[("reason", reason)]).inc();
            }
            Outcome::Denied(reason) => {
                self.denials.get_or_create(&[("reason", reason)]).inc();
            }
            Outcome::Ignored | Outcome::Allowed => {}
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Record one lookup in the patch memo.
    pub fn record_memo(&self, lookup: Lookup) {
        self.memo_lookups
            .get_or_create(&[("result", lookup.label())])
            .inc();
    }

    /// Record a body that was not a usable `AdmissionReview` (HTTP 4xx).
    pub fn record_invalid(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.reviews.get_or_create(&[("outcome", "invalid")]).inc();
    }

    /// Set the serving certificate's expiry (Unix seconds).
    pub fn set_certificate_expiry(&self, unix_seconds: i64) {
        self.certificate_expiry.set(unix_seconds);
    }

    /// The `OpenMetrics` text exposition of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_metric_name_is_exposed() {
        let metrics = Metrics::new();
        metrics.record(&Outcome::Injected, Duration::from_micros(300));
        metrics.record(
            &Outcome::Skipped("not_requested"),
            Duration::from_micros(50),
        );
        metrics.record(
            &Outcome::Denied("bad_annotation"),
            Duration::from_micros(50),
        );
        metrics.record_memo(Lookup::Miss);
        metrics.record_memo(Lookup::Hit);
        metrics.record_memo(Lookup::Hit);
        metrics.set_certificate_expiry(1_900_000_000);
        let text = metrics.encode();
        for needle in [
            "wg_injector_admission_reviews_total{outcome=\"injected\"} 1",
            "wg_injector_injections_total 1",
            "wg_injector_skips_total{reason=\"not_requested\"} 1",
            "wg_injector_denials_total{reason=\"bad_annotation\"} 1",
            "wg_injector_admission_duration_seconds_bucket{le=\"0.0005\"} 3",
            "wg_injector_admission_duration_seconds_bucket{le=\"0.0001\"} 2",
            "wg_injector_certificate_expiry_timestamp_seconds 1900000000",
            "wg_injector_patch_memo_lookups_total{result=\"hit\"} 2",
            "wg_injector_patch_memo_lookups_total{result=\"miss\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
