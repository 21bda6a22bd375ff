{{- define "alto.name" -}}{{ .Release.Name }}-alto{{- end -}}
{{- define "alto.redisUrl" -}}
{{- if .Values.redis.external.url -}}{{ .Values.redis.external.url }}{{- else -}}redis://{{ include "alto.name" . }}-redis:6379/0{{- end -}}
{{- end -}}
{{- define "alto.labels" -}}
app.kubernetes.io/name: alto
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
