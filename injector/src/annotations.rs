//! annotations: owned by the core helper.
