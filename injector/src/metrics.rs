//! Prometheus metrics of the webhook. OWNED BY: webhook helper.
