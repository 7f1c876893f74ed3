#!/usr/bin/env bash
# One-command demo of wg-injector's data path, as root, no Kubernetes needed:
#
#   sudo bash scripts/demo-hand-wired.sh   (the real-node demo is scripts/demo.sh)
#
# It installs the lab components (scripts/lab-install.sh, cached), builds the two binaries, then
# stands up a local lab in network namespaces it creates (and deletes on exit):
#
#   [pod netns] ──veth 192.168.251.0/24── [gw netns] ──veth 10.251.1.0/24── [private netns]
#    OpenBao (dev, 127.0.0.1:8200)         wireguard-go + wg                 HTTP 10.251.1.2:8080
#    wg-init, wg-sidecar (injected args)   tunnel 10.251.0.1/24
#    curl (the "app")
#
# The "pod" is an example manifest run through `wg-injector inject`: its wg-init and wg-sidecar
# containers are started as processes inside the pod namespace with exactly the argument lists
# the injector wrote (the kubelet's $(VAR) expansion done here; the projected-token path pointed
# at the token file this script writes). OpenBao's JWT auth method is mounted at `kubernetes`
# and checks the token's signature with a key this script made, standing in for the kubelet's
# projected service-account token (the sidecar logs in exactly as it would in a cluster).
#
# Everything runs only inside the namespaces above; keys and tokens live in a 0700 tmpfs
# folder under /dev/shm and never appear in argv. Cleanup (trap EXIT) kills the processes this
# script started, by PID, and deletes the namespaces.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sudo bash scripts/demo.sh (network namespaces, /dev/net/tun)"

ns_pod=wgdemo-pod ns_gw=wgdemo-gw ns_priv=wgdemo-private
routes=10.251.0.0/16
gw_tun=10.251.0.1/24 pod_tun=10.251.0.2/32
priv_server=10.251.1.2 priv_port=8080
work=""
pids=()

cleanup() {
  local rc=$?
  step "cleaning up"
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && info "stopped pid $pid"
  done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "$ns_pod" "$ns_gw" "$ns_priv"; do
    ip netns delete "$ns" 2>/dev/null && info "deleted netns $ns"
  done
  [ -n "$work" ] && rm -rf "$work" && info "removed $work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in "$ns_pod" "$ns_gw" "$ns_priv"; do
  if ip netns list | grep -qw "$ns"; then
    die "netns $ns exists (a previous demo still running?); delete it with: ip netns delete $ns"
  fi
done

step "installing lab components (idempotent, cached under .cache/lab)"
bash scripts/lab-install.sh
export PATH="$root/.cache/lab/bin:$PATH"
for tool in bao wireguard-go wg jq curl python3 openssl unshare; do
  command -v "$tool" >/dev/null || die "missing $tool after lab-install"
done

step "building wg-injector and wg-sidecar (cargo build)"
cargo build -q -p wg-injector -p wg-sidecar
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
injector="$target_dir/debug/wg-injector"
sidecar="$target_dir/debug/wg-sidecar"
info "$injector"; info "$sidecar"

work=$(mktemp -d /dev/shm/wg-demo.XXXXXX)
chmod 0700 "$work"
mkdir -p "$work/www" "$work/token"
info "scratch folder (tmpfs, 0700): $work"

step "network namespaces: $ns_pod, $ns_gw, $ns_priv"
for ns in "$ns_pod" "$ns_gw" "$ns_priv"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip link add wgd-pod netns "$ns_pod" type veth peer name wgd-gw0 netns "$ns_gw"
ip link add wgd-gw1 netns "$ns_gw" type veth peer name wgd-priv netns "$ns_priv"
ip -n "$ns_pod" addr add 192.168.251.2/24 dev wgd-pod
ip -n "$ns_gw" addr add 192.168.251.1/24 dev wgd-gw0
ip -n "$ns_gw" addr add 10.251.1.1/24 dev wgd-gw1
ip -n "$ns_priv" addr add "$priv_server/24" dev wgd-priv
for pair in "$ns_pod wgd-pod" "$ns_gw wgd-gw0" "$ns_gw wgd-gw1" "$ns_priv wgd-priv"; do
  set -- $pair; ip -n "$1" link set "$2" up
done
ip -n "$ns_pod" route add default via 192.168.251.1
ip -n "$ns_priv" route add default via 10.251.1.1
ip netns exec "$ns_gw" sysctl -q -w net.ipv4.ip_forward=1
info "pod default route → gw (the \"node network\"); the private network sits behind the gateway"

step "private service: HTTP on $priv_server:$priv_port in $ns_priv"
echo "hello from the private network, reached through the WireGuard tunnel" > "$work/www/index.html"
ip netns exec "$ns_priv" python3 -m http.server --bind "$priv_server" --directory "$work/www" "$priv_port" \
  >"$work/http.log" 2>&1 &
pids+=($!)

step "OpenBao dev server in $ns_pod on 127.0.0.1:8200 (the pod's Vault)"
export HOME="$work" BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN=devroot
ip netns exec "$ns_pod" bao server -dev -dev-root-token-id=devroot -dev-listen-address=127.0.0.1:8200 \
  >"$work/bao.log" 2>&1 &
pids+=($!)
bao_() { ip netns exec "$ns_pod" bao "$@"; }
for _ in $(seq 1 100); do bao_ status >/dev/null 2>&1 && break; sleep 0.1; done
bao_ status >/dev/null || { cat "$work/bao.log"; die "OpenBao did not start"; }
info "ready (root token only for this demo's setup steps)"

step "keys: gateway and pod WireGuard key pairs (0600 files in $work, never in argv)"
umask 077
wg genkey > "$work/gw.key"; wg pubkey < "$work/gw.key" > "$work/gw.pub"
wg genkey > "$work/pod.key"; wg pubkey < "$work/pod.key" > "$work/pod.pub"
info "gateway public key: $(cat "$work/gw.pub")"
info "pod public key:     $(cat "$work/pod.pub")"
jq -n --rawfile k "$work/pod.key" --arg a "$pod_tun" '{private_key: ($k|rtrimstr("\n")), address: $a}' |
  bao_ kv put -mount=secret wg/keys/demo/web - >/dev/null
jq -n --rawfile p "$work/gw.pub" '{public_key: ($p|rtrimstr("\n")), endpoints: "192.168.251.1:51820", allowed_ips: "10.251.0.0/16"}' |
  bao_ kv put -mount=secret wg/gateways/corp - >/dev/null
info "wrote secret/wg/keys/demo/web (pod private key) and secret/wg/gateways/corp (public record)"

step "Vault login for the pod: JWT auth at auth/kubernetes, role wg-demo-web (least privilege)"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
bao_ auth enable -path=kubernetes jwt >/dev/null
jq -n --rawfile pem "$work/sa.pub" '{jwt_validation_pubkeys: [$pem], bound_issuer: "https://kubernetes.default.svc"}' |
  bao_ write auth/kubernetes/config - >/dev/null
printf '%s\n' 'path "secret/data/wg/keys/demo/web" { capabilities = ["read"] }' \
  'path "secret/data/wg/gateways/corp" { capabilities = ["read"] }' | bao_ policy write wg-demo-web - >/dev/null
jq -n '{role_type: "jwt", bound_audiences: ["vault"], user_claim: "sub",
        bound_subject: "system:serviceaccount:demo:web", token_policies: ["wg-demo-web"], token_ttl: "10m"}' |
  bao_ write auth/kubernetes/role/wg-demo-web - >/dev/null
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
claims=$(jq -cn --argjson now "$now" '{iss: "https://kubernetes.default.svc", aud: ["vault"],
  sub: "system:serviceaccount:demo:web", iat: $now, nbf: $now, exp: ($now + 600),
  "kubernetes.io": {namespace: "demo", serviceaccount: {name: "web"}, pod: {name: "web"}}}' | b64url)
sig=$(printf '%s.%s' "$header" "$claims" | openssl dgst -sha256 -sign "$work/sa.key" -binary | b64url)
printf '%s.%s.%s' "$header" "$claims" "$sig" > "$work/token/token"
chmod 0400 "$work/token/token"
info "projected-style token (audience vault, 10 min) at $work/token/token"

step "gateway: wireguard-go + wg in $ns_gw, listening on 192.168.251.1:51820"
mkdir -p /var/run/wireguard
ip netns exec "$ns_gw" wireguard-go -f wgdemo-gw >"$work/wggo.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do [ -S /var/run/wireguard/wgdemo-gw.sock ] && break; sleep 0.1; done
ip netns exec "$ns_gw" wg set wgdemo-gw private-key "$work/gw.key" listen-port 51820 \
  peer "$(cat "$work/pod.pub")" allowed-ips "$pod_tun"
ip -n "$ns_gw" addr add "$gw_tun" dev wgdemo-gw
ip -n "$ns_gw" link set wgdemo-gw up

step "the pod: an example manifest, injected by wg-injector (offline, like istioctl kube-inject)"
cat > "$work/pod.json" <<'JSON'
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "web", "namespace": "demo",
   "annotations": {"wg-injector.io/inject": "true", "wg-injector.io/gateway": "corp"}},
 "spec": {"serviceAccountName": "web",
   "containers": [{"name": "app", "image": "curlimages/curl", "command": ["sleep", "infinity"]}]}}
JSON
cat > "$work/injector.yaml" <<YAML
images: {sidecar: localhost/wg-sidecar:0.1.0}
defaultGateway: corp
gateways:
  corp: {routes: ["$routes"]}
vault: {address: "http://127.0.0.1:8200", allowPlaintext: true}   # a dev OpenBao on loopback
YAML
"$injector" inject -f "$work/pod.json" --config "$work/injector.yaml" > "$work/injected.json"
info "injected containers:"
jq -r '(.spec.initContainers // [])[], .spec.containers[] | "      \(.name): \((.args // .command) | join(" "))"' "$work/injected.json"

# The kubelet expands $(WG_POD_NAMESPACE) and $(WG_POD_SERVICE_ACCOUNT) from the downward API.
container_args() {
  jq -r --arg n "$1" '[(.spec.initContainers // [])[], .spec.containers[]] | .[] | select(.name == $n) | .args[]' \
    "$work/injected.json" |
    sed -e 's/\$(WG_POD_NAMESPACE)/demo/g' -e 's/\$(WG_POD_SERVICE_ACCOUNT)/web/g' \
        -e "s#^--vault-token-file=/var/run/secrets/wg-injector/token\$#--vault-token-file=$work/token/token#"
}

step "wg-init: kill switch first (unreachable routes for $routes)"
mapfile -t init_args < <(container_args wg-init)
ip netns exec "$ns_pod" "$sidecar" "${init_args[@]}" --log-format text
ip -n "$ns_pod" route show "$routes" | sed 's/^/    /'
info "before the tunnel, the app cannot leak to the private network:"
ip netns exec "$ns_pod" curl -sS -m 3 "http://$priv_server:$priv_port/" 2>&1 | sed 's/^/      /' || true

step "wg-sidecar run: keys from OpenBao, tunnel up, health on :9901"
mapfile -t run_args < <(container_args wg-sidecar)
# /var/run/wireguard is an in-memory emptyDir in the Pod: a private tmpfs here.
ip netns exec "$ns_pod" unshare --mount --propagation private sh -c \
  'mount -t tmpfs -o size=1m,mode=0700 wg-runtime /var/run/wireguard && exec "$@"' wg-sidecar \
  "$sidecar" "${run_args[@]}" --log-format text >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")
ready=""
for _ in $(seq 1 150); do
  code=$(ip netns exec "$ns_pod" curl -s -o /dev/null -w '%{http_code}' -m 1 http://127.0.0.1:9901/ready || true)
  [ "$code" = 200 ] && { ready=1; break; }
  kill -0 "$sidecar_pid" 2>/dev/null || break
  sleep 0.2
done
[ -n "$ready" ] || { cat "$work/sidecar.log"; die "the sidecar never became ready"; }
info "GET /ready → 200: $(ip netns exec "$ns_pod" curl -s -m 2 http://127.0.0.1:9901/ready)"
info "metrics (GET /metrics, excerpt):"
ip netns exec "$ns_pod" curl -s -m 2 http://127.0.0.1:9901/metrics |
  grep -E '^wg_sidecar_(ready|mode|key_version|peer_(receive|transmit)_bytes_total|peer_last_handshake_age_seconds)' |
  sed 's/^/      /'

step "the app's request through the tunnel: curl http://$priv_server:$priv_port/ from $ns_pod"
ip netns exec "$ns_pod" curl -sS -m 5 "http://$priv_server:$priv_port/" | sed 's/^/      /'
info "gateway view (wg show):"
ip netns exec "$ns_gw" wg show wgdemo-gw | sed 's/^/      /'

step "stopping the sidecar (SIGTERM): the kill switch stays, nothing leaks"
kill -TERM "$sidecar_pid"
wait "$sidecar_pid" || true
info "sidecar exited; routes for $routes now:"
ip -n "$ns_pod" route show "$routes" | sed 's/^/      /'
if ip netns exec "$ns_pod" curl -sS -m 3 "http://$priv_server:$priv_port/" >/dev/null 2>"$work/curl.err"; then
  die "the private service was reachable without the tunnel: the kill switch failed"
fi
info "curl now fails at once: $(cat "$work/curl.err")"

step "demo finished"
