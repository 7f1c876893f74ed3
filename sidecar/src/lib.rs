//! Sidecar
