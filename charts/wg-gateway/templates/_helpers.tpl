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

{{/* `wg-sidecar gateway` arguments. ONE place. */}}
{{- define "wg-gateway.gatewayArgs" -}}
- gateway
- --listen-port={{ .Values.server.listenPort }}
- --vault-addr={{ .Values.vault.address }}
- --vault-role={{ .Values.vault.role }}
- --vault-gateway-path={{ include "wg-gateway.vaultGatewayPath" . }}
- --health-addr=0.0.0.0:{{ .Values.healthPort }}
- --pod-source={{ .Values.podSource }}
- --poll-interval={{ .Values.pollIntervalSeconds }}
- --vault-peers-path={{ .Values.vault.peersPath }}
{{- if eq .Values.podSource "kubernetes" }}
- --profile={{ include "wg-gateway.profile" . }}
- --vault-addresses-path={{ .Values.vault.addressesPath }}
- --orphan-sweep-interval={{ .Values.orphanSweepIntervalSeconds }}
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
- --vault-addr={{ .Values.vault.address }}
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
{{- if .Values.vault.caConfigMap }}
- name: WG_SIDECAR_VAULT_CA_FILE
  value: /etc/wg-gateway/vault-ca/ca.crt
{{- end }}
- name: WG_SIDECAR_ENDPOINTS
  value: {{ include "wg-gateway.publicEndpoint" . | quote }}
- name: WG_SIDECAR_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}

{{/* Projected service-account token (audience vault, short-lived) + optional Vault CA. */}}
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
{{- end }}
{{- end }}

{{- define "wg-gateway.vaultMounts" -}}
- name: vault-token
  mountPath: /var/run/secrets/wg-injector
  readOnly: true
{{- if .Values.vault.caConfigMap }}
- name: vault-ca
  mountPath: /etc/wg-gateway/vault-ca
  readOnly: true
{{- end }}
{{- end }}
