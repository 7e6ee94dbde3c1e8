{{/* Names and labels. */}}
{{- define "selfimprove.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selfimprove.fullname" -}}
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

{{- define "selfimprove.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfimprove.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "selfimprove.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "selfimprove.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfimprove
{{- end }}

{{- define "selfimprove.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selfimprove.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. Call with (dict "image" … "root" $). */}}
{{- define "selfimprove.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list (fromJsonArray to use it); empty means every
namespace. The namespaced RBAC scope defaults to the release namespace.
*/}}
{{- define "selfimprove.watchNamespaces" -}}
{{- $ns := .Values.watchNamespaces | default list }}
{{- if and (eq .Values.rbac.scope "namespaced") (empty $ns) }}
{{- $ns = list .Release.Namespace }}
{{- end }}
{{- $ns | uniq | toJson }}
{{- end }}

{{/* "true" when the operator watches every namespace (kopf then peers through a ClusterKopfPeering). */}}
{{- define "selfimprove.clusterwide" -}}
{{- if empty (include "selfimprove.watchNamespaces" . | fromJsonArray) }}true{{ end }}
{{- end }}

{{- define "selfimprove.peering" -}}
{{- .Values.operator.standby.peeringName }}
{{- end }}
