{{/* Names, labels and the pieces every workload shares. */}}

{{- define "marrowscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marrowscope.fullname" -}}
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

{{/* Labels on every object. Call with (dict "root" $ "component" "npm1"). */}}
{{- define "marrowscope.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "marrowscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: marrowscope
{{- end }}

{{- define "marrowscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marrowscope.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "marrowscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "marrowscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference; GPU workloads get the CUDA variant tag. (dict "root" $ "gpu" 1) */}}
{{- define "marrowscope.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- if gt (int .gpu) 0 }}{{ $tag = printf "%s%s" $tag $img.cudaTagSuffix }}{{ end }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{- define "marrowscope.mlflowTrackingUri" -}}
{{- if .Values.mlflow.server.enabled }}
{{- printf "http://%s-mlflow:%d" (include "marrowscope.fullname" .) (int .Values.mlflow.server.port) }}
{{- else }}
{{- required "set mlflow.trackingUri or enable mlflow.server" .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/* Resources with the GPU limit merged in. (dict "resources" ... "gpu" N) */}}
{{- define "marrowscope.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpu) 0 }}
{{- $limits := merge (dict "nvidia.com/gpu" (int .gpu)) (default dict $res.limits) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod-level scheduling and security shared by every workload. (dict "root" $ "spec" $svc "component" "npm1") */}}
{{- define "marrowscope.podCommon" -}}
serviceAccountName: {{ include "marrowscope.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "marrowscope.selectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
{{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- with .spec.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The writable scratch volume every read-only-root container mounts at /tmp. */}}
{{- define "marrowscope.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- end }}

{{- define "marrowscope.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* Env entries: a name -> value map rendered as a list (sorted, values quoted). */}}
{{- define "marrowscope.envMap" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end }}

{{/* The job store and image store every process that creates or runs analyses shares
(gateway API and worker, HL7 listener). The gateway's data_dir defaults to a path under
the image's read-only /app: point it at the /tmp emptyDir (only SQLite and the slide cache
would use it; the job store is PostgreSQL, the images are on their volume, and the gateway
pods set MS_GATEWAY_SLIDE_CACHE_DIR to the slide cache volume: the HL7 listener needs none,
as it takes slides only from local slide roots, which it reads in place). */}}
{{- define "marrowscope.storeEnv" -}}
- name: MS_GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.gateway.database.secretName }}, key: {{ .Values.gateway.database.secretKey }}}
- {name: MS_GATEWAY_IMAGE_ROOT, value: {{ .Values.gateway.imageStore.mountPath | quote }}}
- {name: MS_GATEWAY_DATA_DIR, value: /tmp/marrowscope}
- {name: HOME, value: /tmp}
{{- end }}

{{/* A store's claim: its existingClaim, else the one the chart creates, <fullname>-<suffix>.
(dict "root" $ "store" .Values.gateway.imageStore "suffix" "images") */}}
{{- define "marrowscope.claimName" -}}
{{- .store.existingClaim | default (printf "%s-%s" (include "marrowscope.fullname" .root) .suffix) }}
{{- end }}

{{/* The stores of every gateway process that touches slides (API, worker, storage sweep):
the job store and image store, and the slide cache volume. An upload lands on an API pod and
is cut by whichever worker claims its analysis, and the sweep expires it: all read one
volume, never a pod's own /tmp (too small for a slide, and gone with the pod). */}}
{{- define "marrowscope.gatewayStoreEnv" -}}
{{ include "marrowscope.storeEnv" . }}
- {name: MS_GATEWAY_SLIDE_CACHE_DIR, value: {{ .Values.gateway.slideCache.mountPath | quote }}}
{{- end }}

{{/* Mounts and volumes of the gateway's stores (the /tmp emptyDir is separate). Call with $. */}}
{{- define "marrowscope.gatewayStoreMounts" -}}
- {name: images, mountPath: {{ .Values.gateway.imageStore.mountPath }}}
- {name: slide-cache, mountPath: {{ .Values.gateway.slideCache.mountPath }}}
{{- end }}

{{- define "marrowscope.gatewayStoreVolumes" -}}
- name: images
  persistentVolumeClaim:
    claimName: {{ include "marrowscope.claimName" (dict "root" . "store" .Values.gateway.imageStore "suffix" "images") }}
- name: slide-cache
  persistentVolumeClaim:
    claimName: {{ include "marrowscope.claimName" (dict "root" . "store" .Values.gateway.slideCache "suffix" "slide-cache") }}
{{- end }}

{{/* The storage sweep CronJob's name: 52 characters at most, leaving room for the
-<minute> suffix of the Jobs it creates (and that the sweep alert matches). */}}
{{- define "marrowscope.sweepName" -}}
{{- printf "%s-gateway-sweep" (include "marrowscope.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
