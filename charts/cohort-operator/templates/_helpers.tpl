{{/* Chart name, truncated to a DNS label. */}}
{{- define "cohort-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release full name: release name, plus the chart name unless the release already holds it. */}}
{{- define "cohort-operator.fullname" -}}
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

{{- define "cohort-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cohort-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cohort-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cohort-operator.labels" -}}
helm.sh/chart: {{ include "cohort-operator.chart" . }}
{{ include "cohort-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: cohort-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cohort-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cohort-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cohort-operator.leaseName" -}}
{{- default (include "cohort-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "cohort-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "cohort-operator.snapshotClaim" -}}
{{- default (printf "%s-snapshots" (include "cohort-operator.fullname" .)) .Values.snapshots.filesystem.existingClaim }}
{{- end }}

{{/*
What the operator does inside a namespace it handles: the same rules whether granted
cluster-wide (watchNamespaces empty) or per namespace.
*/}}
{{- define "cohort-operator.namespacedRules" -}}
# Watches CohortImports; patches them only to add and remove its finalizer and, for a
# CohortTrigger's call, the run-requested annotation (never the spec: RBAC cannot tell
# fields apart, so that rule lives in the controller).
- apiGroups: [cohorts.dev]
  resources: [cohortimports]
  verbs: [get, list, watch, patch]
- apiGroups: [cohorts.dev]
  resources: [cohortimports/status]
  verbs: [get, patch]
# CohortTriggers: watched by every replica; their status records the webhook path and the
# deliveries accepted (update: a guarded write, so two replicas never accept one twice).
- apiGroups: [cohorts.dev]
  resources: [cohorttriggers]
  verbs: [get, list, watch]
- apiGroups: [cohorts.dev]
  resources: [cohorttriggers/status]
  verbs: [get, update, patch]
# BrazeDestinations: watched to resolve imports' destinationRef; their status records Ready.
- apiGroups: [cohorts.dev]
  resources: [brazedestinations]
  verbs: [get, list, watch]
- apiGroups: [cohorts.dev]
  resources: [brazedestinations/status]
  verbs: [get, patch]
# Data import keys, partner key overrides and source credentials named by CohortImports.
{{- if .Values.watchNamespaces }}
# In the listed namespaces only: also list/watch (by metadata), to notice a created Secret.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
{{- else }}
# Cluster-wide: by name only, never list or watch (the operator runs --watch-secrets=false).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- if eq .Values.snapshots.store "cluster" }}
# ConfigMap sources are read; snapshots are ConfigMaps owned by their CohortImport, written
# in chunks (create, update), and a superseded generation's chunks are removed by label
# (deletecollection). RBAC cannot scope create by name or label, so these verbs cover every
# ConfigMap the role reaches: set watchNamespaces, or snapshots.store=filesystem, to narrow it.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, update, delete, deletecollection]
{{- else }}
# ConfigMap sources (snapshots are on the volume).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
{{- end }}
# Run events on CohortImports.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
