{{/* The release's name for everything the chart creates. */}}
{{- define "fedmesh-hub.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the hub pod. */}}
{{- define "fedmesh-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "fedmesh-hub.labels" -}}
{{ include "fedmesh-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The rendezvous's name. */}}
{{- define "fedmesh-hub.rendezvous" -}}
{{- printf "%s-rendezvous" (include "fedmesh-hub.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select rendezvous pods (not the hub's: its Service must not pick them). */}}
{{- define "fedmesh-hub.rendezvousSelectorLabels" -}}
app.kubernetes.io/name: fedmesh-rendezvous
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every rendezvous object. */}}
{{- define "fedmesh-hub.rendezvousLabels" -}}
{{ include "fedmesh-hub.rendezvousSelectorLabels" . }}
app.kubernetes.io/component: rendezvous
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
