#!/usr/bin/env bash
# The product as it runs in a cluster, on a real single Kubernetes node on this machine (root,
# Debian 12; no registry, no cloud):
#
#   sudo bash scripts/demo.sh
#
# It installs the lab (scripts/lab-install.sh: kubelet, containerd, kube-proxy, scheduler,
# apiserver, OpenBao, helm; cached, a warm machine skips it), builds the binaries and the images
# (scripts/build-images.sh, FROM scratch), then runs the real-node scenario
# (tests/tests/node.rs), which narrates each step:
#
#   - a node comes up in a network + mount namespace of its own (Node Ready time printed), with
#     OpenBao on the node's address and a "private network" 10.20.0.0/24 holding an HTTP service;
#   - docs/install.md "First run, step by step" is run block by block: Vault's Kubernetes auth,
#     roles and keys, `helm install vpn-gateway ./charts/wg-gateway`, `helm install wg-injector`;
#   - a Deployment in a labelled namespace is injected, its Pod Ready (kubectl get pods printed);
#   - the app container's request reaches the private service through the tunnel (the service
#     answers with the address it saw: a gateway Pod's);
#   - the kill switch: the sidecar SIGKILLed, the app's requests fail at once and no packet
#     leaves the Pod in the clear; the kubelet restarts the sidecar and traffic comes back;
#   - a gateway Pod deleted, a Job that completes, an injector rollout that refuses no Pod;
#   - everything torn down by PID, and checked: no mount, netns, cgroup or sysctl left.
#
# About 3-5 minutes warm. The data-path-only demo without Kubernetes is scripts/demo-hand-wired.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, a kubelet)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wg-injector/target}"
bash scripts/lab-install.sh
cargo build -q -p wg-injector -p wg-sidecar
bash scripts/build-images.sh
WG_E2E_USE_BUILT_IMAGES=1 exec cargo test -q -p wg-e2e --test node -- --nocapture
