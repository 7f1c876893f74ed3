//! `wg-e2e`: fixtures for end-to-end tests against real components (kube-apiserver + etcd,
//! OpenBao, the real `wg-injector` binary, network namespaces, podman).
//!
//! Fixtures start real processes and tear them down by PID on drop. They never skip: a missing
//! component is an error naming `scripts/lab-install.sh`.

pub mod charts;
pub mod control_plane;
pub mod injector;
pub mod lab;
pub mod node;
pub mod openbao;
pub mod podman;
pub mod process;
pub mod second_webhook;
