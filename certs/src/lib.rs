//! Certs
