# wg-injector: the few commands a contributor needs. `make test` is what CI runs.
SHELL := /bin/bash
.PHONY: demo lab test test-unit test-node lint bench fuzz

## Inject the sidecar into the bundled example Pod (needs nothing but cargo).
demo:
	cargo run -q -p wg-injector -- inject -f examples/pod.yaml

## Install the real components the tests use (idempotent; cached under .cache/lab).
lab:
	bash scripts/lab-install.sh

## The whole test suite: real kube-apiserver, OpenBao, network namespaces, helm (run as root).
test: lab
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast

## Tier 5 only: a real kubelet node, the charts installed as docs/install.md says (root).
test-node: lab
	cargo build -p wg-sidecar
	cargo test -p wg-e2e --test node_fixture --test node -- --nocapture

## Unit and golden tests only (no root, no lab).
test-unit:
	cargo test -p wg-injector -p wg-certs --lib --tests

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench:
	bash scripts/bench.sh

## Run each fuzz target (fuzz/, nightly toolchain) for FUZZ_SECONDS seconds; a crash fails.
FUZZ_SECONDS ?= 60
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)
