{{/* Resource name prefix: <release>-alto (kept short: worker names add -worker-<stage>). */}}
{{- define "alto.name" -}}
{{- printf "%s-alto" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "alto.labels" -}}
app.kubernetes.io/name: alto
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "alto.selector" -}}
app.kubernetes.io/name: alto
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A stage name as a DNS label part (stage names may hold '_' and capitals). */}}
{{- define "alto.slug" -}}
{{- . | lower | replace "_" "-" | trimAll "-" -}}
{{- end -}}

{{/* The pipeline spec's text: pipeline.inline, or files/<pipeline.file>. */}}
{{- define "alto.pipelineText" -}}
{{- if .Values.pipeline.inline -}}
{{- .Values.pipeline.inline -}}
{{- else -}}
{{- $text := .Files.Get (printf "files/%s" .Values.pipeline.file) -}}
{{- if not $text -}}
{{- fail (printf "pipeline.file %q is not in the chart's files/ directory (or use --set-file pipeline.inline=PATH)" .Values.pipeline.file) -}}
{{- end -}}
{{- $text -}}
{{- end -}}
{{- end -}}

{{/* The parsed spec as JSON (include returns strings): {name, stages: [...]}. */}}
{{- define "alto.spec" -}}
{{- $spec := include "alto.pipelineText" . | fromYaml -}}
{{- if or (hasKey $spec "Error") (not $spec.name) (not $spec.stages) -}}
{{- fail (printf "the pipeline spec must be YAML with `name` and `stages` (%s)" ($spec.Error | default "missing keys")) -}}
{{- end -}}
{{- $names := list -}}
{{- range $spec.stages -}}{{- $names = append $names .name -}}{{- end -}}
{{- range $stage, $_ := .Values.workers.stages -}}
{{- if not (has $stage $names) -}}
{{- fail (printf "workers.stages.%s: the pipeline %q has no such stage (it has %s)" $stage $spec.name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- $spec | toJson -}}
{{- end -}}

{{/* workers.defaults overridden by workers.stages.<stage>; called with (dict "root" $ "stage" NAME). */}}
{{- define "alto.workerValues" -}}
{{- $d := deepCopy .root.Values.workers.defaults -}}
{{- $o := deepCopy (get .root.Values.workers.stages .stage | default dict) -}}
{{- $w := mergeOverwrite (deepCopy $d) $o -}}
{{- /* volumes add up: a stage's own (a model PVC) must not drop the defaults' (a Redis CA);
a stage's entry of the same name (volumes) or mountPath (mounts) replaces the default's,
so repeating one (as replacing lists once required) is no duplicate Kubernetes refuses */}}
{{- range $k, $by := dict "extraVolumes" "name" "extraVolumeMounts" "mountPath" }}
{{- $seen := dict }}
{{- $order := list }}
{{- range $v := concat (get $d $k | default list) (get $o $k | default list) }}
{{- $id := toString (get $v $by) }}
{{- if not (hasKey $seen $id) }}{{ $order = append $order $id }}{{ end }}
{{- $_ := set $seen $id $v }}
{{- end }}
{{- $merged := list }}
{{- range $id := $order }}{{ $merged = append $merged (get $seen $id) }}{{ end }}
{{- $_ := set $w $k $merged }}
{{- end }}
{{- $a := mergeOverwrite (deepCopy .root.Values.autoscaling) ($w.autoscaling | default dict) -}}
{{- $_ := set $w "autoscaling" $a -}}
{{- $w | toJson -}}
{{- end -}}

{{/* The streams a stage's consumer group reads (orchestrator/routing.py stage_streams). */}}
{{- /* The Redis keys of a stage's streams, as workers.redis_transport.stream_key names them:
the transport's prefix "alto:", "stream:", then the stream's name (orchestrator.routing). */}}
{{- define "alto.stageStreams" -}}
{{- $base := printf "alto:stream:alto:%s:%s" .pipeline .stage.name -}}
{{- $streams := list -}}
{{- if .stage.aggregate_by -}}
{{- range $i := until (int (.stage.partitions | default 4)) -}}
{{- $streams = append $streams (printf "%s:p%d" $base $i) -}}
{{- end -}}
{{- else -}}
{{- $streams = list $base -}}
{{- end -}}
{{- $streams | toJson -}}
{{- end -}}

{{- define "alto.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .vllm -}}{{- $tag = .root.Values.image.vllmTag | default (printf "%s-vllm" $tag) -}}{{- end -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{- define "alto.redisSecret" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "alto.name" .)) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "alto.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}redis-password{{- else -}}{{ .Values.redis.external.existingSecretKey }}{{- end -}}
{{- end -}}

{{/* host:port of Redis as seen from any namespace (KEDA's operator runs in its own). */}}
{{- define "alto.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis.%s.svc:6379" (include "alto.name" .) .Release.Namespace -}}
{{- else -}}
{{- $host := (urlParse .Values.redis.external.url).host -}}
{{- if contains ":" $host -}}{{ $host }}{{- else -}}{{ printf "%s:6379" $host }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "alto.redisDb" -}}
{{- if .Values.redis.enabled -}}0{{- else -}}{{ (urlParse .Values.redis.external.url).path | trimPrefix "/" | default "0" }}{{- end -}}
{{- end -}}

{{/* ALTO_REDIS_URL with the password from the Secret (Kubernetes expands $(VAR)). */}}
{{- define "alto.redisEnv" -}}
{{- if .Values.redis.enabled -}}
- name: REDIS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "alto.redisSecret" . }}, key: redis-password}}
- name: ALTO_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "alto.name" .) | quote }}
{{- else -}}
{{- $u := urlParse .Values.redis.external.url -}}
{{- $query := "" -}}
{{- if $u.query }}{{ $query = printf "?%s" $u.query }}{{ end -}}
{{- if $u.userinfo }}{{- /* an ACL user: KEDA's scaler reads it here (usernameFromEnv) */}}
- name: REDIS_USERNAME
  value: {{ $u.userinfo | quote }}
{{- end }}
{{- if .Values.redis.external.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .Values.redis.external.existingSecret }}, key: {{ .Values.redis.external.existingSecretKey }}}}
- name: ALTO_REDIS_URL
  value: {{ printf "%s://%s:$(REDIS_PASSWORD)@%s%s%s" $u.scheme $u.userinfo $u.host $u.path $query | quote }}
{{- else }}
- name: ALTO_REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* An env value from values.yaml, quoted: strings as they are, anything else as JSON.
`toString` would write a number of 1e6 or more (a float64 to Helm) as 2e+06, which no
integer setting reads. */}}
{{- define "alto.envValue" -}}
{{- if kindIs "string" . -}}{{ . | quote }}{{- else -}}{{ . | toJson | quote }}{{- end -}}
{{- end -}}

{{/* Environment every alto container gets. */}}
{{- define "alto.commonEnv" -}}
{{ include "alto.redisEnv" . }}
- {name: ALTO_LOG_FORMAT, value: {{ .Values.logFormat | quote }}}
- {name: ALTO_LOG_LEVEL, value: {{ .Values.logLevel | quote }}}
- {name: ALTO_CLAIM_IDLE_MS, value: {{ .Values.workers.claimIdleMs | int | quote }}}
- {name: ALTO_LEASE_TTL_MS, value: {{ .Values.workers.leaseTtlMs | int | quote }}}
{{- if .Values.policy }}
- {name: ALTO_POLICY, value: {{ .Values.policy | quote }}}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- end -}}

{{- define "alto.podAnnotations" -}}
checksum/pipeline: {{ include "alto.pipelineText" .root | sha256sum }}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Volumes of every alto pod: the spec, and writable scratch under a read-only root. */}}
{{- define "alto.volumes" -}}
- name: pipeline
  configMap: {name: {{ include "alto.name" . }}-pipeline}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{- define "alto.volumeMounts" -}}
- {name: pipeline, mountPath: /etc/alto, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /home/alto}  # model cache, ~/.cache, ~/.triton: all writable
{{- end -}}
