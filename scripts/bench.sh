#!/usr/bin/env bash
# `make bench`: every benchmark of the project in one go, then the "## Webhook under load"
# section of docs/benchmarks.md rewritten from the printed figures (other sections are kept).
#
#  1. wg-bench run: `wg-injector serve` vs the floor server on the same TLS + HTTP stack,
#     2/10/64 KiB Pods, HTTP/1.1 and HTTP/2 at 100/s, 1 000/s and max, plus a new TLS
#     connection per request (about 3-4 minutes; loopback only). Both servers are built the
#     way the wg-injector image is (scripts/build-images.sh: static glibc, opt-level "s", one
#     codegen unit), so the figures are those of the binary that ships; the first such build
#     takes 10-20 minutes on 2 cores, later ones are incremental.
#  2. the core criterion bench (cargo bench -p wg-injector --bench inject), when it exists.
#  3. the sidecar/gateway bench programs (sidecar/benches/*.rs, sidecar/examples/*bench*.rs),
#     when they exist (some need root for network namespaces).
#  4. gateway scale (tests/benches/gateway_scale.rs, root): the release `wg-sidecar gateway
#     --pod-source kubernetes` against a real kube-apiserver + etcd and OpenBao with 10 000 Pods
#     (initial sync, change latency at 100 Pod starts/s, Vault reads per start, RSS per peer;
#     about 10 minutes). WG_GATEWAY_SCALE_ARGS passes flags, e.g. "--pods 1000" for a quick run.
#     Its table lands under "Other benchmarks"; the "## Gateway scale" section is kept as written.
# This is a measuring tool, not a test: a missing bench is reported and skipped; a failing one
# is reported, the others still run, and the script exits 1 at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=()

# The image build's flags (scripts/build-images.sh): same target dir, so the two share a cache.
triple=x86_64-unknown-linux-gnu
static_dir="$target_dir/static"
shipped="$static_dir/$triple/release"
static_build() {
  CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target "$triple" --target-dir "$static_dir" "$@"
}
echo "== building wg-injector as the image ships it, and the floor (wg-bench) the same way"
# The injector with the image's package set (feature unification as in the image), then wg-bench.
static_build -p wg-injector -p wg-sidecar || exit 1
static_build -p wg-bench || exit 1

echo "== webhook under load (wg-bench run)"
if ! "$shipped/wg-bench" run --injector "$shipped/wg-injector" \
    --build "built like the wg-injector image (static glibc, opt-level \"s\", one codegen unit; scripts/build-images.sh), both of them" \
    --command "make bench" --markdown "$out/load.md" ${WG_BENCH_ARGS:-} | tee "$out/load.txt"; then
  failed+=("wg-bench run")
fi

write_section() {
  "$shipped/wg-bench" write-section --file docs/benchmarks.md \
    --title "Webhook under load" --body "$1" && echo "== wrote docs/benchmarks.md"
}
# Write the load figures now, so a later bench that fails or hangs does not lose them.
[[ -s "$out/load.md" ]] && write_section "$out/load.md"

# Criterion summary lines: the bench name, then its "time:" (and "thrpt:") line.
# Change-versus-last-run lines (with %) are left out.
criterion_summary() {
  awk '/^Benchmarking/ {next} /^[^ \t]/ {name=$0} /^[ \t]+(time|thrpt):/ && !/%/ {sub(/^[ \t]+/, ""); print name "  " $0}' "$1"
}
# What a bench program printed, without cargo's progress lines.
printed_lines() {
  grep -vE '^ *(Blocking|Compiling|Finished|Running|Downloaded|Downloading|Updating|warning:)' "$1" | tail -n 20
}

others="$out/others.md"
: >"$others"
echo "== core criterion bench (cargo bench -p wg-injector --bench inject)"
if [[ -f injector/benches/inject.rs ]]; then
  if cargo bench -p wg-injector --bench inject 2>&1 | tee "$out/inject.txt"; then
    { echo "Core injection (\`cargo bench -p wg-injector --bench inject\`, criterion):"; echo
      echo '```'; criterion_summary "$out/inject.txt"; echo '```'; echo; } >>"$others"
  else
    failed+=("cargo bench -p wg-injector --bench inject")
  fi
else
  echo "skip: injector/benches/inject.rs does not exist yet"
  echo "Core injection bench: not run (injector/benches/inject.rs does not exist yet)." >>"$others"; echo >>"$others"
fi

echo "== sidecar/gateway benches"
found=0
for bench in sidecar/benches/*.rs; do
  [[ -e $bench ]] || continue
  found=1
  name=$(basename "$bench" .rs)
  echo "-- cargo bench -p wg-sidecar --bench $name"
  if cargo bench -p wg-sidecar --bench "$name" 2>&1 | tee "$out/sidecar-$name.txt"; then
    { echo "\`cargo bench -p wg-sidecar --bench $name\`:"; echo; echo '```'
      if grep -qE '^[ \t]+time:' "$out/sidecar-$name.txt"; then
        criterion_summary "$out/sidecar-$name.txt" | tail -n 20
      else
        printed_lines "$out/sidecar-$name.txt"
      fi; echo '```'; echo; } >>"$others"
  else
    failed+=("cargo bench -p wg-sidecar --bench $name")
  fi
done
for example in sidecar/examples/*bench*.rs; do
  [[ -e $example ]] || continue
  found=1
  name=$(basename "$example" .rs)
  echo "-- cargo run --release -p wg-sidecar --example $name"
  if cargo run --release -p wg-sidecar --example "$name" 2>&1 | tee "$out/sidecar-$name.txt"; then
    { echo "\`cargo run --release -p wg-sidecar --example $name\` (last lines):"; echo; echo '```'
      printed_lines "$out/sidecar-$name.txt"; echo '```'; echo; } >>"$others"
  else
    failed+=("cargo run --release -p wg-sidecar --example $name")
  fi
done
if [[ $found == 0 ]]; then
  echo "skip: no sidecar/benches/*.rs or sidecar/examples/*bench*.rs yet"
  echo "Sidecar/gateway benches: none found (sidecar/benches/*.rs, sidecar/examples/*bench*.rs)." >>"$others"
fi

echo "== gateway scale (cargo bench -p wg-e2e --bench gateway_scale)"
if [[ $(id -u) != 0 ]]; then
  echo "skip: the gateway scale bench needs root (network namespace, TUN device)"
  echo "Gateway scale: not run (needs root)." >>"$others"; echo >>"$others"
elif ! cargo build --release -p wg-sidecar; then
  failed+=("cargo build --release -p wg-sidecar (for the gateway scale bench)")
elif cargo bench -p wg-e2e --bench gateway_scale -- --markdown "$out/gateway-scale.md" \
    ${WG_GATEWAY_SCALE_ARGS:-} 2>&1 | tee "$out/gateway-scale.txt" && [[ -s "$out/gateway-scale.md" ]]; then
  { echo "Gateway scale (\`cargo bench -p wg-e2e --bench gateway_scale -- ${WG_GATEWAY_SCALE_ARGS:-}\`," \
      "release \`wg-sidecar\`; see \"Gateway scale\" above for what it measures):"; echo
    cat "$out/gateway-scale.md"; echo; } >>"$others"
else
  failed+=("cargo bench -p wg-e2e --bench gateway_scale")
fi

if [[ -s "$out/load.md" ]]; then
  { cat "$out/load.md"; echo; echo "### Other benchmarks run by \`make bench\`"; echo; cat "$others"; } >"$out/section.md"
  write_section "$out/section.md"
fi

if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
