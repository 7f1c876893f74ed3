{{/*
Names, labels and the two places where the chart meets the binary: the `serve` arguments
(wg-injector.serveArgs) and the config file (wg-injector.configFile). Keep those two in step
with injector/src/webhook.rs (ServeArgs) and injector/src/config.rs (Config).
*/}}

{{- define "wg-injector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wg-injector.fullname" -}}
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

{{- define "wg-injector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wg-injector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wg-injector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wg-injector.labels" -}}
helm.sh/chart: {{ include "wg-injector.chart" . }}
{{ include "wg-injector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* Label on the injector's own Pods: the webhook's objectSelector excludes them. */}}
{{- define "wg-injector.selfLabel" -}}
wg-injector.io/role: injector
{{- end }}

{{- define "wg-injector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wg-injector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wg-injector.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "wg-injector.webhookConfigName" -}}
{{- include "wg-injector.fullname" . }}
{{- end }}

{{/* The ValidatingWebhookConfiguration of the tunnel-label check (clusters without the VAP). */}}
{{- define "wg-injector.validatingWebhookConfigName" -}}
{{- printf "%s-tunnel-label" (include "wg-injector.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Where the tunnel-label check runs (ValidatingWebhookConfiguration or ValidatingAdmissionPolicy):
every namespace but kube-system and the release namespace, so neither the control plane nor the
injector's own Pods ever wait on it. Deliberately NOT webhook.excludeNamespaces or the
injection label: the label must be refused wherever a Pod could set it.
*/}}
{{- define "wg-injector.tunnelLabelNamespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- list "kube-system" .Release.Namespace | uniq | toYaml | nindent 6 }}
{{- end }}

{{/*
Only Pods that carry the tunnel label (on UPDATE the apiserver matches the old or the new
object, so adding and removing it are both seen). Deliberately without the injector's
wg-injector.io/role exclusion or webhook.extraObjectSelectorExpressions: a Pod could set those
labels itself to slip past the check.
*/}}
{{- define "wg-injector.tunnelLabelObjectSelector" -}}
matchExpressions:
  - key: wg-injector.io/tunnel
    operator: Exists
{{- end }}

{{- define "wg-injector.serviceName" -}}
{{- include "wg-injector.fullname" . }}
{{- end }}

{{/* The Secret holding the serving certificate, whatever the mode. */}}
{{- define "wg-injector.tlsSecretName" -}}
{{- $c := .Values.certificates }}
{{- if eq $c.mode "existingSecret" }}
{{- required "certificates.existingSecret.name is required when certificates.mode=existingSecret" $c.existingSecret.name }}
{{- else if eq $c.mode "selfManaged" }}
{{- default (printf "%s-tls" (include "wg-injector.fullname" .)) $c.selfManaged.secretName }}
{{- else }}
{{- printf "%s-tls" (include "wg-injector.fullname" .) }}
{{- end }}
{{- end }}

{{/* DNS names of the serving certificate. */}}
{{- define "wg-injector.dnsNames" -}}
{{- $svc := include "wg-injector.serviceName" . }}
- {{ $svc }}
- {{ $svc }}.{{ .Release.Namespace }}
- {{ $svc }}.{{ .Release.Namespace }}.svc
- {{ $svc }}.{{ .Release.Namespace }}.svc.cluster.local
{{- end }}

{{/*
The injector's excludedNamespaces: never inject system namespaces or our own, even when labelled
and sent (names cannot be selected before 1.21). The sidecar-present policy excludes them too.
*/}}
{{- define "wg-injector.skippedNamespaces" -}}
{{- list "kube-system" "kube-public" .Release.Namespace | uniq | toYaml }}
{{- end }}

{{/* Namespaces never sent to the webhook: the configured ones plus the release namespace. */}}
{{- define "wg-injector.excludedNamespaces" -}}
{{- $ns := concat .Values.webhook.excludeNamespaces (list .Release.Namespace) | uniq }}
{{- toYaml $ns }}
{{- end }}

{{- define "wg-injector.namespaceSelector" -}}
matchExpressions:
  - key: wg-injector.io/injection
    operator: In
    values:
      - {{ .Values.webhook.namespaceLabelValue | quote }}
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- include "wg-injector.excludedNamespaces" . | nindent 6 }}
{{- end }}

{{- define "wg-injector.objectSelector" -}}
matchExpressions:
  - key: wg-injector.io/role
    operator: NotIn
    values:
      - injector
  {{- with .Values.webhook.extraObjectSelectorExpressions }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* matchConditions (admissionregistration v1, beta and on by default from 1.28). */}}
{{- define "wg-injector.matchConditionsEnabled" -}}
{{- if and .Values.webhook.matchConditions (not .Values.webhook.injectByDefault) (semverCompare ">=1.28-0" .Capabilities.KubeVersion.Version) -}}
true
{{- end }}
{{- end }}

{{- define "wg-injector.vapEnabled" -}}
{{- if and .Values.validatingAdmissionPolicy.enabled (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) -}}
true
{{- end }}
{{- end }}

{{- define "wg-injector.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{/*
The `wg-injector serve` argument list. ONE place: align with ServeArgs (injector/src/cli.rs)
and ClusterArgs (injector/src/cluster.rs). Every flag also has a WG_INJECTOR_* env var in the binary; the chart
passes flags so `kubectl describe pod` shows the whole configuration.
*/}}
{{- define "wg-injector.serveArgs" -}}
- serve
- --listen=0.0.0.0:{{ .Values.webhook.port }}
- --config=/etc/wg-injector/config/config.yaml
- --log-format={{ .Values.logFormat }}
- --patch-memo-entries={{ int .Values.patchMemoEntries }}
{{- if eq .Values.certificates.mode "selfManaged" }}
- --cert-mode=self-managed
- --cert-secret={{ include "wg-injector.tlsSecretName" . }}
- --webhook-config={{ include "wg-injector.webhookConfigName" . }}
{{- if not (include "wg-injector.vapEnabled" .) }}
- --validating-webhook-config={{ include "wg-injector.validatingWebhookConfigName" . }}
{{- end }}
- --service={{ include "wg-injector.serviceName" . }}
{{- else }}
- --tls-cert=/etc/wg-injector/tls/tls.crt
- --tls-key=/etc/wg-injector/tls/tls.key
{{- end }}
{{- end }}

{{/* Environment of the injector container (no secrets): its namespace (--namespace). */}}
{{- define "wg-injector.env" -}}
- name: WG_INJECTOR_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/*
The sidecars' Vault address, refused when it is plaintext and config.vault.allowPlaintext does
not say so (the injector's config validation refuses it too): over http:// every sidecar's Vault
token and keys cross the network in the clear.
*/}}
{{- define "wg-injector.vaultAddress" -}}
{{- $vault := .Values.config.vault }}
{{- if and (hasPrefix "http://" (lower $vault.address)) (not $vault.allowPlaintext) }}
{{- fail (printf "config.vault.address is %s: plaintext, so every sidecar's Vault token and keys would cross the network in the clear. Use an https:// address with Vault's CA in a ConfigMap (key ca.crt, in each namespace of injected Pods) given as --set config.vault.caConfigMap=vault-ca, or accept plaintext explicitly with --set config.vault.allowPlaintext=true" $vault.address) }}
{{- end }}
{{- $vault.address }}
{{- end }}

{{/* True when the sidecars talk to Vault in plaintext (allowed by config.vault.allowPlaintext). */}}
{{- define "wg-injector.vaultPlaintext" -}}
{{- if hasPrefix "http://" (lower .Values.config.vault.address) }}true{{ end }}
{{- end }}

{{/*
The config file. ONE place: align with Config in injector/src/config.rs. `injectByDefault`
lives under `webhook` in values because the webhook's matchConditions depend on it too.
*/}}
{{- define "wg-injector.configFile" -}}
{{- $_ := include "wg-injector.vaultAddress" . }}
{{- $cfg := deepCopy .Values.config }}
{{- $_ := set $cfg "injectByDefault" .Values.webhook.injectByDefault }}
{{- $_ := set $cfg "excludedNamespaces" (include "wg-injector.skippedNamespaces" . | fromYamlArray) }}
{{- toYaml $cfg }}
{{- end }}
