{{/*
Names, labels and the two argument lists where the chart meets the binary:
wg-gateway.gatewayArgs (`wg-sidecar gateway`) and wg-gateway.rotateArgs (`wg-sidecar keys
rotate`). Keep them in step with the sidecar's clap definition (docs/sidecar-cli.md); every flag
is also read from WG_SIDECAR_<FLAG>.
*/}}

{{- define "wg-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wg-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wg-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wg-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wg-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "wg-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "wg-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wg-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wg-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The gateway profile name (wg/gateways/<name> in Vault). */}}
{{- define "wg-gateway.gatewayName" -}}
{{- default .Release.Name .Values.server.name }}
{{- end }}

{{/* The wg-injector.io/tunnel label value of the gateway's Pods. */}}
{{- define "wg-gateway.profile" -}}
{{- default (include "wg-gateway.gatewayName" .) .Values.server.profile }}
{{- end }}

{{- define "wg-gateway.vaultGatewayPath" -}}
{{- default (printf "wg/gateways/%s" (include "wg-gateway.gatewayName" .)) .Values.vault.gatewayPath }}
{{- end }}

{{- define "wg-gateway.publicEndpoint" -}}
{{- required "server.publicEndpoint is required: the host:port clients dial, e.g. --set server.publicEndpoint=203.0.113.1:51820" .Values.server.publicEndpoint }}
{{- end }}

{{- define "wg-gateway.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{- define "wg-gateway.hpaApiVersion" -}}
{{- if semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version -}}
autoscaling/v2
{{- else -}}
autoscaling/v2beta2
{{- end }}
{{- end }}

{{- define "wg-gateway.cronJobApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}
batch/v1
{{- else -}}
batch/v1beta1
{{- end }}
{{- end }}

{{/*
Vault's address, refused when it is plaintext and vault.allowPlaintext does not say so: over
http:// the login token, the gateway's private key and the preshared keys cross the network
in the clear. Every use of the address goes through here, so no object renders without it.
*/}}
{{- define "wg-gateway.vaultAddress" -}}
{{- $address := .Values.vault.address }}
{{- if and (hasPrefix "http://" (lower $address)) (not .Values.vault.allowPlaintext) }}
{{- fail (printf "vault.address is %s: plaintext, so Vault's tokens and the gateway's keys would cross the network in the clear. Use an https:// address with Vault's CA in a ConfigMap (key ca.crt) given as --set vault.caConfigMap=vault-ca, or accept plaintext explicitly with --set vault.allowPlaintext=true" $address) }}
{{- end }}
{{- $address }}
{{- end }}

{{/*
True when the Pod spec sets net.ipv6.conf.all.forwarding=1: the gateway forwards IPv6
(server.ipv6, or an IPv6 network in server.privateNetworks) and forwarding is not `none`. Linux
forwards IPv6 only by that sysctl, which a Pod's read-only /proc/sys keeps the gateway from writing.
*/}}
{{- define "wg-gateway.ipv6ForwardingSysctl" -}}
{{- $v6 := .Values.server.ipv6 }}
{{- range (.Values.server.privateNetworks | default list) }}
{{- if contains ":" . }}{{ $v6 = true }}{{ end }}
{{- end }}
{{- if and $v6 (ne .Values.forwarding "none") }}true{{ end }}
{{- end }}

{{/* True when the gateway talks to Vault in plaintext (allowed by vault.allowPlaintext). */}}
{{- define "wg-gateway.vaultPlaintext" -}}
{{- if hasPrefix "http://" (lower .Values.vault.address) }}true{{ end }}
{{- end }}

{{/* Where the vault-ca volume puts vault.caConfigMap's ca.crt (wg-gateway.vaultMounts). */}}
{{- define "wg-gateway.vaultCaDir" -}}
/etc/wg-gateway/vault-ca
{{- end }}

{{/* `--vault-ca-file` when vault.caConfigMap is set (a leading newline, for the lists below). */}}
{{- define "wg-gateway.vaultCaArg" -}}
{{- if .Values.vault.caConfigMap }}
- --vault-ca-file={{ include "wg-gateway.vaultCaDir" . }}/ca.crt
{{- end }}
{{- end }}

{{/*
access.namespaceSelector (a Kubernetes LabelSelector) in kubectl's syntax, what
--allow-namespace-selector parses: matchLabels k: v → k=v; In → k in (a,b); NotIn → k notin (a,b);
Exists → k; DoesNotExist → !k. Empty: every namespace.
*/}}
{{- define "wg-gateway.namespaceSelector" -}}
{{- $sel := .Values.access.namespaceSelector | default dict }}
{{- $parts := list }}
{{- range $k, $v := ($sel.matchLabels | default dict) }}
{{- $parts = append $parts (printf "%s=%s" $k (toString $v)) }}
{{- end }}
{{- range ($sel.matchExpressions | default list) }}
{{- if and (has .operator (list "In" "NotIn")) (empty .values) }}
{{- fail (printf "access.namespaceSelector.matchExpressions: key %s with operator %s needs values" .key .operator) }}
{{- end }}
{{- if eq .operator "In" }}
{{- $parts = append $parts (printf "%s in (%s)" .key (join "," .values)) }}
{{- else if eq .operator "NotIn" }}
{{- $parts = append $parts (printf "%s notin (%s)" .key (join "," .values)) }}
{{- else if eq .operator "Exists" }}
{{- $parts = append $parts .key }}
{{- else if eq .operator "DoesNotExist" }}
{{- $parts = append $parts (printf "!%s" .key) }}
{{- end }}
{{- end }}
{{- join "," $parts }}
{{- end }}

{{/* `wg-sidecar gateway` arguments. ONE place. */}}
{{- define "wg-gateway.gatewayArgs" -}}
- gateway
- --listen-port={{ .Values.server.listenPort }}
- --vault-addr={{ include "wg-gateway.vaultAddress" . }}
{{- include "wg-gateway.vaultCaArg" . }}
- --vault-role={{ .Values.vault.role }}
- --vault-gateway-path={{ include "wg-gateway.vaultGatewayPath" . }}
- {{ printf "--endpoints=%s" (include "wg-gateway.publicEndpoint" .) | quote }}
- --shutdown-delay={{ .Values.server.shutdownDelaySeconds }}
- --health-addr=[::]:{{ .Values.healthPort }}
- --pod-source={{ .Values.podSource }}
- --poll-interval={{ .Values.pollIntervalSeconds }}
- --vault-peers-path={{ .Values.vault.peersPath }}
{{- if eq .Values.podSource "kubernetes" }}
- --profile={{ include "wg-gateway.profile" . }}
- --vault-addresses-path={{ .Values.vault.addressesPath }}
- --orphan-sweep-interval={{ .Values.orphanSweepIntervalSeconds }}
- --vault-verdicts-path={{ .Values.vault.verdictsPath }}
{{- with (include "wg-gateway.namespaceSelector" .) }}
- {{ printf "--allow-namespace-selector=%s" . | quote }}
{{- end }}
{{- with .Values.access.serviceAccounts }}
- {{ printf "--allow-service-accounts=%s" (join "," .) | quote }}
{{- end }}
{{- else if or (include "wg-gateway.namespaceSelector" .) .Values.access.serviceAccounts }}
{{- fail "access.namespaceSelector and access.serviceAccounts need podSource kubernetes: the vault pod source cannot see namespaces or Pods" }}
{{- end }}
{{- with .Values.server.privateNetworks }}
- {{ printf "--private-networks=%s" (join "," .) | quote }}
{{- end }}
{{- if .Values.policy.defaultDeny }}
- --default-deny=true
{{- end }}
{{- end }}

{{/* `wg-sidecar keys rotate` arguments. ONE place. */}}
{{- define "wg-gateway.rotateArgs" -}}
- keys
- rotate
- --vault-addr={{ include "wg-gateway.vaultAddress" . }}
{{- include "wg-gateway.vaultCaArg" . }}
- --vault-role={{ .Values.rotation.vaultRole }}
- --vault-gateway-path={{ include "wg-gateway.vaultGatewayPath" . }}
{{- end }}

{{/* Settings shared by the gateway and the rotation job, as WG_SIDECAR_* env (no secrets). */}}
{{- define "wg-gateway.commonEnv" -}}
- name: WG_SIDECAR_VAULT_AUTH_MOUNT
  value: {{ .Values.vault.authMount | quote }}
- name: WG_SIDECAR_VAULT_KV_MOUNT
  value: {{ .Values.vault.kvMount | quote }}
- name: WG_SIDECAR_VAULT_TOKEN_FILE
  value: /var/run/secrets/wg-injector/token
- name: WG_SIDECAR_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}

{{/* Projected service-account token (audience vault, short-lived) + Vault's CA (vault.caConfigMap). */}}
{{- define "wg-gateway.vaultVolumes" -}}
- name: vault-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.vault.tokenAudience }}
          expirationSeconds: {{ .Values.vault.tokenExpirationSeconds }}
{{- if .Values.vault.caConfigMap }}
- name: vault-ca
  configMap:
    name: {{ .Values.vault.caConfigMap }}
    # ca.crt only: a ConfigMap without it holds the Pod back with an event naming the key.
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{- define "wg-gateway.vaultMounts" -}}
- name: vault-token
  mountPath: /var/run/secrets/wg-injector
  readOnly: true
{{- if .Values.vault.caConfigMap }}
- name: vault-ca
  mountPath: {{ include "wg-gateway.vaultCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}
