{{/* The release's name for everything the chart creates. */}}
{{- define "fedmesh-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the agent pod (also the per-peer Services' selector). */}}
{{- define "fedmesh-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. Not managed-by fedmesh: the agent never prunes them. */}}
{{- define "fedmesh-agent.labels" -}}
{{ include "fedmesh-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Whether the agent may write Istio objects, and relay Services. */}}
{{- define "fedmesh-agent.istio" -}}{{ ne .Values.mode "relay" }}{{- end -}}
{{- define "fedmesh-agent.relay" -}}{{ ne .Values.mode "istio" }}{{- end -}}
