#!/usr/bin/env bash
# Builds the container images FROM scratch with podman + runc, from statically linked release
# binaries. No base image is pulled and no registry is contacted.
#
#   bash scripts/build-images.sh            # localhost/wg-injector:<version>, localhost/wg-sidecar:<version>,
#                                           # and the test-only localhost/wg-e2e-http-get:<version>,
#                                           # localhost/wg-e2e-app:<version> and localhost/wg-e2e-pause:3.4
#                                           # (the real-node tier; pause needs scripts/lab-install.sh)
#
# Linking: only the x86_64-unknown-linux-gnu target exists here (no musl), so the binaries link
# glibc statically (RUSTFLAGS=-C target-feature=+crt-static, a static-pie). They go to a separate
# target dir (target/static) so other builds' caches are untouched. The script checks with
# `file` and `ldd` that every binary is static and that every image is at most 20 MiB.
# Caveat (docs/images.md): a static glibc cannot load NSS modules, so getaddrinfo only uses the
# built-in files/dns backends (/etc/hosts, /etc/resolv.conf as mounted by the kubelet).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[build-images] %s\n' "$*" >&2; }

target=x86_64-unknown-linux-gnu
static_dir="${CARGO_TARGET_DIR:-$root/target}/static"
out="$static_dir/$target/release"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { log "cannot read [workspace.package] version from Cargo.toml"; exit 1; }
# 20 MiB: the sidecar image carries the gateway's Kubernetes client (kube + k8s-openapi, for the
# Pod watch) since per-Pod identities; it was 15 MiB before.
max_bytes=$((20 * 1024 * 1024))
podman=(podman --runtime runc --cgroup-manager cgroupfs --events-backend file)

for tool in cargo rustc podman runc file ldd; do
  command -v "$tool" >/dev/null || { log "missing $tool: run 'bash scripts/lab-install.sh' (podman, runc) or install Rust"; exit 1; }
done

# Size: the workspace's release profile gives 16 MiB binaries; for the images we optimise for
# size (opt-level "s") in one codegen unit, which brings them under the 20 MiB budget. The
# data path's crypto (ring's assembly ChaCha20-Poly1305) is not affected by opt-level.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
log "cargo: static release build (opt-level s) of wg-injector and wg-sidecar into $static_dir"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
  --target "$target" --target-dir "$static_dir" -p wg-injector -p wg-sidecar

log "rustc: static test client tests/examples/http_get.rs (std only)"
mkdir -p "$out"
rustc --edition 2021 -C opt-level=s -C strip=symbols -C target-feature=+crt-static \
  --target "$target" tests/examples/http_get.rs -o "$out/http-get"

check_static() {
  local bin=$1 desc
  desc=$(file -b "$bin")
  case "$desc" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) log "$bin is not static: $desc"; exit 1 ;;
  esac
  # ldd prints "statically linked" / "not a dynamic executable" and exits non-zero for static files.
  if ldd "$bin" 2>&1 | grep -q '=>'; then
    log "$bin has dynamic dependencies:"; ldd "$bin" >&2; exit 1
  fi
  log "static: $(basename "$bin"): $desc"
}

# Each image gets a build context holding only what it copies (no repository upload).
build_image() {
  local name=$1 containerfile=$2; shift 2
  local ctx="$static_dir/context/$name" ref="localhost/$name:$version" size
  rm -rf "$ctx"; mkdir -p "$ctx"
  cp "$@" "$ctx/"
  log "podman: building $ref from $containerfile"
  "${podman[@]}" build --pull=never --quiet --file "$containerfile" --tag "$ref" "$ctx" >/dev/null
  size=$("${podman[@]}" image inspect --format '{{.Size}}' "$ref")
  log "image $ref: $size bytes ($(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') MiB)"
  if [ "$size" -gt "$max_bytes" ]; then
    log "$ref is larger than 20 MiB"; exit 1
  fi
}

for bin in wg-injector wg-sidecar http-get; do check_static "$out/$bin"; done

ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] || { log "missing $ca (Debian package ca-certificates)"; exit 1; }
build_image wg-injector images/wg-injector.Containerfile "$out/wg-injector"
build_image wg-sidecar images/wg-sidecar.Containerfile "$out/wg-sidecar" "$ca"
build_image wg-e2e-http-get images/http-get.Containerfile "$out/http-get"

# The real-node tier's test-only images: the sandbox image from Kubernetes' pause.c (compiled by
# scripts/lab-install.sh) and an app image with busybox + http-get.
pause="${WG_LAB_BIN:-$root/.cache/lab/bin}/pause"
[ -x "$pause" ] || { log "missing $pause: run 'bash scripts/lab-install.sh'"; exit 1; }
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { log "missing busybox (Debian package busybox-static): run 'bash scripts/lab-install.sh'"; exit 1; }
check_static "$pause"; check_static "$busybox"
build_image wg-e2e-app images/app.Containerfile "$busybox" "$out/http-get"
build_image wg-e2e-pause images/pause.Containerfile "$pause"
"${podman[@]}" tag "localhost/wg-e2e-pause:$version" localhost/wg-e2e-pause:3.4
log "done: localhost/wg-injector:$version localhost/wg-sidecar:$version localhost/wg-e2e-http-get:$version localhost/wg-e2e-app:$version localhost/wg-e2e-pause:3.4"
