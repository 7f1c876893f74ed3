#!/usr/bin/env bash
# Run every fuzz target of fuzz/ (cargo-fuzz, libFuzzer, nightly toolchain) for N seconds each.
#   bash scripts/fuzz.sh 60       # CI: each target 60 s; any crash fails the run
#   bash scripts/fuzz.sh seeds    # regenerate fuzz/seeds/ from the golden inputs (python3 + PyYAML)
# New interesting inputs go to fuzz/corpus/<target> (git-ignored); crashes to
# fuzz/artifacts/<target>/ — turn each into a regression test in injector/tests/ and fix it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
targets=(mutate_handler annotations offline_yaml)
arg=${1:-60}

if [ "$arg" = seeds ]; then
  python3 - "$root" <<'PY'
import json, pathlib, sys, yaml
root = pathlib.Path(sys.argv[1])
golden = sorted((root / "injector/tests/testdata/golden").glob("*.yaml"))
seeds = root / "fuzz/seeds"
for t in ("mutate_handler", "annotations", "offline_yaml"):
    d = seeds / t
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()

def review(obj, uid, operation="CREATE", kind="Pod", dry_run=False, api="admission.k8s.io/v1"):
    return {"apiVersion": api, "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop", "operation": operation, "userInfo": {"username": "fuzz"},
        "object": obj, "dryRun": dry_run}}

for i, path in enumerate(golden):
    pod = yaml.safe_load(path.read_text())
    name = path.stem
    (seeds / "mutate_handler" / f"{name}.json").write_text(json.dumps(review(pod, f"uid-{i}")))
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    lines = [f"{k.removeprefix('wg-injector.io/')}={v}" for k, v in annotations.items()]
    (seeds / "annotations" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (seeds / "offline_yaml" / f"{name}.yaml").write_text(path.read_text())
first = yaml.safe_load(golden[0].read_text())
extra = {
    "update.json": review(first, "u-upd", operation="UPDATE"),
    "dry-run.json": review(first, "u-dry", dry_run=True),
    "v1beta1.json": review(first, "u-beta", api="admission.k8s.io/v1beta1"),
    "not-a-pod.json": review({"kind": "Service", "metadata": {"name": "s"}}, "u-svc", kind="Service"),
    "no-object.json": review(None, "u-none"),
}
for name, body in extra.items():
    (seeds / "mutate_handler" / name).write_text(json.dumps(body))
for f in sorted((root / "injector/tests/testdata/offline").iterdir()):
    if f.name != "config.yaml":
        (seeds / "offline_yaml" / f.name).write_text(f.read_text())
print("seeds:", {t: len(list((seeds / t).iterdir())) for t in ("mutate_handler", "annotations", "offline_yaml")})
PY
  exit 0
fi

case "$arg" in
  ''|*[!0-9]*) echo "usage: $0 SECONDS|seeds" >&2; exit 2 ;;
esac
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: run scripts/lab-install.sh" >&2; exit 1; }
cd "$root/fuzz"
# cargo-fuzz needs unstable rustc flags: the nightly toolchain when the machine has one, else the
# stable one with RUSTC_BOOTSTRAP=1 (only the machine's own toolchains can be had here).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
# A fixed libFuzzer seed makes a CI run repeatable (FUZZ_SEED=0 picks a random one).
seed=${FUZZ_SEED:-1}
# Builds go beside the workspace's (CARGO_TARGET_DIR, which CI keeps outside the clone), so a
# warm machine does not rebuild the sanitized dependencies for every fresh checkout.
fuzz_target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/fuzz/target}/fuzz}"
# Release build with debug assertions and AddressSanitizer (cargo-fuzz defaults).
"${fuzz[@]}" build --target-dir "$fuzz_target_dir"
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "[fuzz] $t for ${arg}s" >&2
  if ! "${fuzz[@]}" run --target-dir "$fuzz_target_dir" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$arg" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -seed="$seed"; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "[fuzz] no crash in ${targets[*]}" >&2
