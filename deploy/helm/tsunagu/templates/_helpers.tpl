{{/*
Shared helpers. A service template calls "tsunagu.component" with a dict:
  root  – the chart's top-level context (.)
  name  – the service name, as in `tsunagu serve <name>` and the Dockerfile target
  uses  – infrastructure it reaches: any of "kafka" "redis" "postgres" "mqtt"
  calls – services it calls over HTTP (ws-gateway calls the others)
*/}}

{{- define "tsunagu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tsunagu.fullname" -}}
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

{{- define "tsunagu.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; argument: the root context. */}}
{{- define "tsunagu.labels" -}}
helm.sh/chart: {{ include "tsunagu.chart" . }}
app.kubernetes.io/name: {{ include "tsunagu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tsunagu
{{- end }}

{{/* Name of a component's objects; argument: dict root, name. */}}
{{- define "tsunagu.componentName" -}}
{{- printf "%s-%s" (include "tsunagu.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component; argument: dict root, name. */}}
{{- define "tsunagu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tsunagu.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* All labels of a component; argument: dict root, name. */}}
{{- define "tsunagu.componentLabels" -}}
{{ include "tsunagu.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Container image of a service; argument: dict root, name. */}}
{{- define "tsunagu.image" -}}
{{- $img := .root.Values.image }}
{{- $svc := index .root.Values.services .name }}
{{- $own := $svc.image | default dict }}
{{- $tag := $own.tag | default $img.tag | default .root.Chart.AppVersion }}
{{- if $own.repository }}
{{- printf "%s:%s" $own.repository $tag }}
{{- else if $img.registry }}
{{- printf "%s/%s/%s:%s" $img.registry $img.repository .name $tag }}
{{- else }}
{{- printf "%s/%s:%s" $img.repository .name $tag }}
{{- end }}
{{- end }}

{{/* Infrastructure addresses: the in-chart servers when devInfra.enabled, else the values. */}}
{{- define "tsunagu.devInfraName" -}}
{{- printf "%s-dev-%s" (include "tsunagu.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tsunagu.devInfraHost" -}}
{{- printf "%s.%s.svc" (include "tsunagu.devInfraName" .) .root.Release.Namespace }}
{{- end }}

{{- define "tsunagu.kafkaBootstrap" -}}
{{- if .Values.devInfra.enabled }}
{{- printf "%s:9092" (include "tsunagu.devInfraHost" (dict "root" . "name" "kafka")) }}
{{- else }}
{{- required "kafka.bootstrap is required" .Values.kafka.bootstrap }}
{{- end }}
{{- end }}

{{- define "tsunagu.kafkaReplication" -}}
{{- if .Values.devInfra.enabled }}1{{ else }}{{ .Values.kafka.replication }}{{ end }}
{{- end }}

{{/* TSUNAGU_REDIS_URL from redis.mode: standalone (redis.url), cluster (redis-cluster:// over
redis.cluster.nodes) or sentinel (redis-sentinel:// over redis.sentinel.addresses, #masterName); rediss
with redis.tls.enabled. With redis.password.existingSecret the password is `$(REDIS_PASSWORD)`, which
Kubernetes replaces in the container's env (tsunagu.redisEnv) with the Secret's value. */}}
{{- define "tsunagu.redisUrl" -}}
{{- $redis := .Values.redis }}
{{- if .Values.devInfra.enabled }}
{{- printf "redis://%s:6379/0" (include "tsunagu.devInfraHost" (dict "root" . "name" "redis")) }}
{{- else }}
{{- $mode := $redis.mode | default "standalone" }}
{{- $tls := and $redis.tls $redis.tls.enabled }}
{{- $auth := "" }}
{{- if include "tsunagu.redisPassword" . }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" ($redis.username | default "") }}
{{- end }}
{{- if eq $mode "standalone" }}
{{- $url := urlParse (required "redis.url is required" $redis.url) }}
{{- if or (not (hasPrefix "redis" $url.scheme)) (not $url.host) }}
{{- fail (printf "redis.url %q is not a redis:// or rediss:// URL" $redis.url) }}
{{- end }}
{{- if and $auth $url.userinfo }}
{{- fail "redis.url holds credentials and redis.password.existingSecret is set: keep the password in the Secret only" }}
{{- end }}
{{- $scheme := ternary "rediss" $url.scheme (or $tls (eq $url.scheme "rediss")) }}
{{- $userinfo := ternary (printf "%s@" $url.userinfo) $auth (not (empty $url.userinfo)) }}
{{- printf "%s://%s%s%s" $scheme $userinfo $url.host $url.path }}
{{- else if eq $mode "cluster" }}
{{- $nodes := $redis.cluster.nodes | default list }}
{{- if not $nodes }}{{ fail "redis.mode cluster: list some of the cluster's nodes (host:port) in redis.cluster.nodes" }}{{ end }}
{{- printf "%s://%s%s" (ternary "rediss-cluster" "redis-cluster" $tls) $auth (join "," $nodes) }}
{{- else if eq $mode "sentinel" }}
{{- $sentinels := $redis.sentinel.addresses | default list }}
{{- if not $sentinels }}{{ fail "redis.mode sentinel: list the sentinels (host:26379) in redis.sentinel.addresses" }}{{ end }}
{{- $primary := required "redis.mode sentinel: name the monitored primary in redis.sentinel.masterName" $redis.sentinel.masterName }}
{{- printf "%s://%s%s/%d#%s" (ternary "rediss-sentinel" "redis-sentinel" $tls) $auth (join "," $sentinels) (int $redis.sentinel.db) $primary }}
{{- else }}
{{- fail (printf "redis.mode must be standalone, cluster or sentinel, not %q" $mode) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret reference of the Redis password, or nothing. */}}
{{- define "tsunagu.redisPassword" -}}
{{- $secret := (.Values.redis.password | default dict).existingSecret | default dict }}
{{- if and $secret.name (not .Values.devInfra.enabled) }}
name: {{ $secret.name }}
key: {{ $secret.key | default "password" }}
{{- end }}
{{- end }}

{{/* The CA Redis's certificates are checked against, when it is a Secret of its own (redis.tls.caSecret). */}}
{{- define "tsunagu.redisCaSecret" -}}
{{- $tls := .Values.redis.tls | default dict }}
{{- $ca := $tls.caSecret | default dict }}
{{- if and $tls.enabled $ca.name (not .Values.devInfra.enabled) }}
{{- if .Values.tls.enabled }}
{{- fail "redis.tls.caSecret and tls.enabled: with tls.enabled every service checks every server against its own Secret's ca.crt; put Redis's CA in that bundle and leave redis.tls.caSecret.name empty" }}
{{- end }}
{{- $ca.name }}
{{- end }}
{{- end }}

{{/* Egress ports to Redis: networkPolicy.egress.redis.ports and those of the sentinels or cluster nodes named. */}}
{{- define "tsunagu.redisEgressPorts" -}}
{{- $redis := .Values.redis }}
{{- $ports := list }}
{{- range .Values.networkPolicy.egress.redis.ports }}{{ $ports = append $ports (int .) }}{{ end }}
{{- $named := list }}
{{- if eq ($redis.mode | default "standalone") "cluster" }}{{ $named = $redis.cluster.nodes | default list }}{{ end }}
{{- if eq ($redis.mode | default "standalone") "sentinel" }}{{ $named = $redis.sentinel.addresses | default list }}{{ end }}
{{- range $named }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" .) }}
{{- $ports = append $ports (int ($port | default (ternary "26379" "6379" (eq $redis.mode "sentinel")))) }}
{{- end }}
{{- toJson (uniq $ports) }}
{{- end }}

{{- define "tsunagu.mqttUrl" -}}
{{- if .Values.devInfra.enabled }}
{{- printf "mqtt://%s:1883" (include "tsunagu.devInfraHost" (dict "root" . "name" "mosquitto")) }}
{{- else }}
{{- required "mqtt.url is required" .Values.mqtt.url }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart itself creates (PostgreSQL DSN, API key). */}}
{{- define "tsunagu.secretName" -}}
{{- printf "%s-secrets" (include "tsunagu.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The PostgreSQL DSN the chart stores, or "" when an existing Secret is used. */}}
{{- define "tsunagu.postgresDsn" -}}
{{- if .Values.devInfra.enabled }}
{{- $p := .Values.devInfra.postgres }}
{{- printf "postgresql://%s:%s@%s:5432/%s" $p.user $p.password (include "tsunagu.devInfraHost" (dict "root" . "name" "postgres")) $p.database }}
{{- else if not .Values.postgres.existingSecret.name }}
{{- required "postgres.dsn or postgres.existingSecret.name is required" .Values.postgres.dsn }}
{{- end }}
{{- end }}

{{/* secretKeyRef of the PostgreSQL DSN; argument: the root context. */}}
{{- define "tsunagu.postgresSecretRef" -}}
{{- if and .Values.postgres.existingSecret.name (not .Values.devInfra.enabled) }}
name: {{ .Values.postgres.existingSecret.name }}
key: {{ .Values.postgres.existingSecret.key }}
{{- else }}
name: {{ include "tsunagu.secretName" . }}
key: postgres-dsn
{{- end }}
{{- end }}

{{/* secretKeyRef of the gateway API key, or nothing when none is configured. */}}
{{- define "tsunagu.apiKeySecretRef" -}}
{{- if .Values.apiKey.existingSecret.name }}
name: {{ .Values.apiKey.existingSecret.name }}
key: {{ .Values.apiKey.existingSecret.key }}
{{- else if .Values.apiKey.value }}
name: {{ include "tsunagu.secretName" . }}
key: api-key
{{- end }}
{{- end }}

{{/* The services ws-gateway calls over HTTP: JWKS, collab, RPC backends, the web app's probes. */}}
{{- define "tsunagu.gatewayCalls" -}}
auth collab stream-ingest mqtt-bridge sim-engine
{{- end }}

{{/* The services whose HTTP API is internal: they require the internal token (or an mTLS peer). */}}
{{- define "tsunagu.internalApis" -}}
presence collab stream-ingest mqtt-bridge sim-engine audit-log
{{- end }}

{{/* secrets.* the enabled services use, as YAML: values key -> key in the chart's Secret. */}}
{{- define "tsunagu.platformSecretsUsed" -}}
internalToken: internal-token
{{- if (index .Values.services "audit-log").enabled }}
auditSigningKey: audit-signing-key
{{- end }}
{{- if .Values.services.auth.enabled }}
authKeyEncryptionSecret: auth-key-encryption-secret
{{- end }}
{{- end }}

{{/* secretKeyRef of one of secrets.*; argument: dict root, name (its values key), key (in the chart's Secret). */}}
{{- define "tsunagu.platformSecretRef" -}}
{{- $item := index .root.Values.secrets .name }}
{{- if $item.existingSecret.name }}
name: {{ $item.existingSecret.name }}
key: {{ $item.existingSecret.key }}
{{- else }}
name: {{ include "tsunagu.secretName" .root }}
key: {{ .key }}
{{- end }}
{{- end }}

{{/* One egress rule; argument: dict rule ({ports, to}), protocols (list). */}}
{{- define "tsunagu.npEgressRule" -}}
- ports:
{{- range $protocol := .protocols }}
{{- range $port := $.rule.ports }}
    - protocol: {{ $protocol }}
      port: {{ $port }}
{{- end }}
{{- end }}
{{- with .rule.to }}
  to:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{/* The MLLP port of a service that listens for HL7 v2 (stream-ingest with mllp.enabled), else nothing. */}}
{{- define "tsunagu.mllp" -}}
{{- if and .mllp .mllp.enabled }}{{ int .mllp.port }}{{ end -}}
{{- end }}

{{/* How the services reach one another: https when the chart turns TLS on. Argument: dict root, name. */}}
{{- define "tsunagu.serviceUrl" -}}
{{- $svc := index .root.Values.services .name -}}
{{- printf "%s://%s:%v" (ternary "https" "http" .root.Values.tls.enabled) (include "tsunagu.componentName" .) $svc.port -}}
{{- end }}

{{/* The Secret holding a service's certificate (tls.crt, tls.key, ca.crt). Argument: dict root, name. */}}
{{- define "tsunagu.tlsSecretName" -}}
{{- index (.root.Values.tls.secretNames | default dict) .name | default (printf "%s-tls" (include "tsunagu.componentName" .)) -}}
{{- end }}

{{/*
A service's ServiceAccount, ConfigMap, Deployment, Service, NetworkPolicy and ServiceMonitor.
Argument: dict root, name, uses, calls (see the top of this file).
*/}}
{{- define "tsunagu.component" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $uses := .uses | default list }}
{{- $calls := .calls | default list }}
{{- $values := $root.Values }}
{{- $svc := index $values.services $name }}
{{- if not $svc }}
{{- fail (printf "services.%s is missing from the values" $name) }}
{{- end }}
{{- if $svc.enabled }}
{{- $ctx := dict "root" $root "name" $name }}
{{- $fullname := include "tsunagu.componentName" $ctx }}
{{- $port := int $svc.port }}
{{- $preStop := int ($svc.preStopSleepSeconds | default 0) }}
{{- $grace := 20 }}
{{- if hasKey $svc "shutdownGraceSeconds" }}
{{- $grace = int $svc.shutdownGraceSeconds }}
{{- end }}
{{- $termination := int ($svc.terminationGracePeriodSeconds | default 30) }}
{{- if lt $termination (add $preStop $grace) }}
{{- fail (printf "services.%s.terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + shutdownGraceSeconds (%d)" $name $termination (add $preStop $grace)) }}
{{- end }}
{{- $autoscaling := $svc.autoscaling | default dict }}
{{- $metricsPort := int $values.config.metricsPort }}
{{- $internal := has $name (splitList " " (include "tsunagu.internalApis" $root)) }}
{{- if include "tsunagu.mllp" $svc }}
{{- if not (or $svc.mllp.senders $svc.mllp.from) }}
{{- fail (printf "services.%s.mllp.senders must list the addresses/CIDRs of the HL7 senders (or mllp.from their NetworkPolicyPeers); [\"0.0.0.0/0\"] admits anyone" $name) }}
{{- end }}
{{- if and (not $svc.mllp.senders) (not $values.networkPolicy.enabled) }}
{{- fail (printf "services.%s.mllp.from needs networkPolicy.enabled (it is a NetworkPolicy rule); or list the senders' CIDRs in mllp.senders" $name) }}
{{- end }}
{{- end }}
{{- $apiKeyRef := include "tsunagu.apiKeySecretRef" $root }}
{{- $configMap := include "tsunagu.configMap" (dict "root" $root "name" $name "uses" $uses "svc" $svc "grace" $grace "internal" $internal) }}
{{- if $values.serviceAccount.create }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "tsunagu.componentLabels" $ctx | nindent 4 }}
  {{- with $values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: {{ $values.serviceAccount.automountServiceAccountToken }}
{{- end }}
---
{{ $configMap }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "tsunagu.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not $autoscaling.enabled }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "tsunagu.selectorLabels" $ctx | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "tsunagu.componentLabels" $ctx | nindent 8 }}
        {{- with (merge (dict) ($svc.podLabels | default dict) $values.podLabels) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Roll the pods when their configuration changes.
        checksum/config: {{ $configMap | sha256sum }}
        {{- with (merge (dict) ($svc.podAnnotations | default dict) $values.podAnnotations) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ if $values.serviceAccount.create }}{{ $fullname }}{{ else }}default{{ end }}
      automountServiceAccountToken: {{ $values.serviceAccount.automountServiceAccountToken }}
      # No *_SERVICE_HOST/*_PORT variables: they would collide with TSUNAGU_* settings.
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $termination }}
      {{- with $values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ $name }}
          image: {{ include "tsunagu.image" $ctx | quote }}
          imagePullPolicy: {{ $values.image.pullPolicy }}
          command:
            - tsunagu
            - serve
            - {{ $name }}
          args:
            - --port
            - {{ $port | quote }}
            - --host
            - "0.0.0.0"
            {{- range $svc.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          ports:
            - name: http
              containerPort: {{ $port }}
              protocol: TCP
            {{- with (include "tsunagu.mllp" $svc) }}
            - name: mllp
              containerPort: {{ . }}
              protocol: TCP
            {{- end }}
            {{- if $metricsPort }}
            - name: metrics
              containerPort: {{ $metricsPort }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $fullname }}
            {{- with $svc.envFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            - name: TSUNAGU_NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- if has "postgres" $uses }}
            - name: TSUNAGU_POSTGRES_DSN
              valueFrom:
                secretKeyRef:
                  {{- include "tsunagu.postgresSecretRef" $root | nindent 18 }}
            {{- end }}
            {{- if and (has "redis" $uses) (include "tsunagu.redisPassword" $root) }}
            # Redis's password, put into the URL by Kubernetes ($(REDIS_PASSWORD)); URL-reserved
            # characters in it must be percent-encoded in the Secret.
            - name: REDIS_PASSWORD
              valueFrom:
                secretKeyRef:
                  {{- include "tsunagu.redisPassword" $root | nindent 18 }}
            - name: TSUNAGU_REDIS_URL
              value: {{ include "tsunagu.redisUrl" $root | quote }}
            {{- end }}
            {{- if eq $name "ws-gateway" }}
            {{- $workers := toString ($svc.workers | default "") }}
            {{- if and (ne $values.config.broker "redis") $workers (ne $workers "1") }}
            {{- fail (printf "services.ws-gateway.workers (%s) needs config.broker=redis: the workers meet through the broker" $workers) }}
            {{- end }}
            # Gateway processes sharing the port (SO_REUSEPORT, docs/deploy.md): unless set, one per
            # CPU of the container's limit (rounded up; the node's CPUs without a limit).
            - name: TSUNAGU_GATEWAY_WORKERS
            {{- if $workers }}
              value: {{ $workers | quote }}
            {{- else if ne $values.config.broker "redis" }}
              value: "1"
            {{- else }}
              valueFrom:
                resourceFieldRef:
                  containerName: {{ $name }}
                  resource: limits.cpu
                  divisor: "1"
            {{- end }}
            {{- end }}
            {{- if and (eq $name "ws-gateway") $apiKeyRef }}
            - name: TSUNAGU_GATEWAY_API_KEY
              valueFrom:
                secretKeyRef:
                  {{- $apiKeyRef | nindent 18 }}
            {{- end }}
            {{- if or $internal (eq $name "ws-gateway") }}
            # the internal APIs' credential: required by the internal services, sent by the gateway
            - name: TSUNAGU_INTERNAL_TOKEN
              valueFrom:
                secretKeyRef:
                  {{- include "tsunagu.platformSecretRef" (dict "root" $root "name" "internalToken" "key" "internal-token") | nindent 18 }}
            {{- end }}
            {{- if eq $name "audit-log" }}
            - name: TSUNAGU_AUDIT_SIGNING_KEY
              valueFrom:
                secretKeyRef:
                  {{- include "tsunagu.platformSecretRef" (dict "root" $root "name" "auditSigningKey" "key" "audit-signing-key") | nindent 18 }}
            {{- end }}
            {{- if eq $name "auth" }}
            - name: TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET
              valueFrom:
                secretKeyRef:
                  {{- include "tsunagu.platformSecretRef" (dict "root" $root "name" "authKeyEncryptionSecret" "key" "auth-key-encryption-secret") | nindent 18 }}
            {{- with $values.webrtc.turn }}
            {{- if .uris }}
            {{- if not .existingSecret.name }}
            {{- fail "webrtc.turn.uris is set: name the Secret holding the TURN shared secret in webrtc.turn.existingSecret.name" }}
            {{- end }}
            - name: TSUNAGU_AUTH_TURN_URIS
              value: {{ toJson .uris | quote }}
            - name: TSUNAGU_AUTH_STUN_URIS
              value: {{ toJson (.stunUris | default list) | quote }}
            - name: TSUNAGU_AUTH_TURN_CREDENTIAL_TTL
              value: {{ .credentialTtl | quote }}
            - name: TSUNAGU_AUTH_TURN_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ .existingSecret.name }}
                  key: {{ .existingSecret.key }}
            {{- end }}
            {{- end }}
            {{- end }}
            {{- with $svc.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
              scheme: {{ ternary "HTTPS" "HTTP" $values.tls.enabled }}
            {{- toYaml $values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
              scheme: {{ ternary "HTTPS" "HTTP" $values.tls.enabled }}
            {{- toYaml $values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
              scheme: {{ ternary "HTTPS" "HTTP" $values.tls.enabled }}
            {{- toYaml $values.probes.readiness | nindent 12 }}
          {{- if gt $preStop 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", "{{ $preStop }}"]
          {{- end }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- toYaml $values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $values.tls.enabled }}
            - name: tls
              mountPath: /etc/tsunagu/tls
              readOnly: true
            {{- end }}
            {{- if and (has "redis" $uses) (include "tsunagu.redisCaSecret" $root) }}
            - name: redis-ca
              mountPath: /etc/tsunagu/redis-ca
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $values.tmpVolume.sizeLimit }}
        {{- if $values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ include "tsunagu.tlsSecretName" $ctx }}
            defaultMode: 0440
        {{- end }}
        {{- with (and (has "redis" $uses) (include "tsunagu.redisCaSecret" $root)) }}
        - name: redis-ca
          secret:
            secretName: {{ . }}
            items:
              - key: {{ $values.redis.tls.caSecret.key | default "ca.crt" }}
                path: ca.crt
            defaultMode: 0440
        {{- end }}
      {{- with ($svc.nodeSelector | default $values.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with ($svc.tolerations | default $values.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with ($svc.affinity | default $values.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- range . }}
        {{- $constraint := deepCopy . }}
        {{- if not $constraint.labelSelector }}
        {{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "tsunagu.selectorLabels" $ctx | fromYaml)) }}
        {{- end }}
        - {{ toYaml $constraint | nindent 10 | trim }}
        {{- end }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "tsunagu.componentLabels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "tsunagu.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $port }}
      targetPort: http
      protocol: TCP
    {{- with (include "tsunagu.mllp" $svc) }}
    - name: mllp
      port: {{ . }}
      targetPort: mllp
      protocol: TCP
    {{- end }}
    {{- if $metricsPort }}
    - name: metrics
      port: {{ $metricsPort }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
{{- if $values.networkPolicy.enabled }}
{{- $np := $values.networkPolicy }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "tsunagu.componentLabels" $ctx | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "tsunagu.selectorLabels" $ctx | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  ingress:
    {{- if eq $name "ws-gateway" }}
    # Clients (through the ingress controller or a load balancer).
    - ports:
        - protocol: TCP
          port: {{ $port }}
      {{- with $np.gatewayFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- else }}
    {{- $callers := list }}
    {{- if and (index $values.services "ws-gateway").enabled (has $name (splitList " " (include "tsunagu.gatewayCalls" $root))) }}
    {{- $callers = append $callers (dict "podSelector" (dict "matchLabels" (include "tsunagu.selectorLabels" (dict "root" $root "name" "ws-gateway") | fromYaml))) }}
    {{- end }}
    {{- $callers = concat $callers (index ($np.apiFrom | default dict) $name | default list) }}
    {{- if $callers }}
    # The API: the gateway's calls, and the callers of networkPolicy.apiFrom.
    - ports:
        - protocol: TCP
          port: {{ $port }}
      from:
        {{- toYaml $callers | nindent 8 }}
    {{- end }}
    {{- end }}
    {{- with (include "tsunagu.mllp" $svc) }}
    # HL7 v2 senders (MLLP).
    - ports:
        - protocol: TCP
          port: {{ . }}
      from:
        {{- range $svc.mllp.senders }}
        - ipBlock:
            cidr: {{ . | quote }}
        {{- end }}
        {{- with $svc.mllp.from }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
    {{- if $metricsPort }}
    # Prometheus, on the metrics port only.
    - ports:
        - protocol: TCP
          port: {{ $metricsPort }}
      {{- with $np.metricsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
  egress:
    {{- include "tsunagu.npEgressRule" (dict "rule" $np.egress.dns "protocols" (list "UDP" "TCP")) | nindent 4 }}
    {{- range $infra := (list "kafka" "redis" "postgres" "mqtt") }}
    {{- if has $infra $uses }}
    {{- $rule := index $np.egress $infra }}
    {{- if eq $infra "redis" }}
    {{- /* Sentinel: the sentinels' ports too (26379), then the primary's. Cluster: each node's client
    port; the cluster bus (port + 10000) is between the nodes only. */}}
    {{- $rule = dict "ports" (include "tsunagu.redisEgressPorts" $root | fromJsonArray) "to" $rule.to }}
    {{- end }}
    {{- include "tsunagu.npEgressRule" (dict "rule" $rule "protocols" (list "TCP")) | nindent 4 }}
    {{- end }}
    {{- end }}
    {{- if $values.config.otlpEndpoint }}
    {{- include "tsunagu.npEgressRule" (dict "rule" $np.egress.otlp "protocols" (list "TCP")) | nindent 4 }}
    {{- end }}
    {{- range $callee := $calls }}
    {{- $calleeValues := index $values.services $callee }}
    {{- if and $calleeValues $calleeValues.enabled }}
    - ports:
        - protocol: TCP
          port: {{ $calleeValues.port }}
      to:
        - podSelector:
            matchLabels:
              {{- include "tsunagu.selectorLabels" (dict "root" $root "name" $callee) | nindent 14 }}
    {{- end }}
    {{- end }}
{{- end }}
{{- if $values.monitoring.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "tsunagu.componentLabels" $ctx | nindent 4 }}
    {{- include "tsunagu.monitoringLabels" $root | nindent 4 }}
spec:
  selector:
    matchLabels:
      {{- include "tsunagu.selectorLabels" $ctx | nindent 6 }}
  endpoints:
    - port: {{ ternary "metrics" "http" (gt $metricsPort 0) }}
      path: /metrics
      {{- if $values.tls.enabled }}
      scheme: https
      tlsConfig:
        # the service's own Secret: Prometheus trusts its CA (and could present a client certificate)
        ca:
          secret:
            name: {{ include "tsunagu.tlsSecretName" $ctx }}
            key: ca.crt
        serverName: {{ $fullname }}
      {{- end }}
      interval: {{ $values.monitoring.interval }}
      scrapeTimeout: {{ $values.monitoring.scrapeTimeout }}
      relabelings:
        # The job is tsunagu-<service> whatever the release is called, as under `tsunagu stack`:
        # the alert rules and dashboards (deploy/observability) select on these names.
        - targetLabel: job
          replacement: {{ printf "tsunagu-%s" $name }}
{{- end }}
{{- end }}
{{- end }}

{{/* A service's ConfigMap; argument: dict root, name, uses, svc (its values), grace. */}}
{{- define "tsunagu.configMap" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $uses := .uses }}
{{- $svc := .svc }}
{{- $grace := .grace }}
{{- $internal := .internal }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "tsunagu.componentName" . }}
  labels:
    {{- include "tsunagu.componentLabels" (dict "root" $root "name" $name) | nindent 4 }}
{{- $data := dict
  "TSUNAGU_BUS" $root.Values.config.bus
  "TSUNAGU_BROKER" $root.Values.config.broker
  "TSUNAGU_KAFKA_BOOTSTRAP" (include "tsunagu.kafkaBootstrap" $root)
  "TSUNAGU_KAFKA_PARTITIONS" $root.Values.kafka.partitions
  "TSUNAGU_KAFKA_REPLICATION" (include "tsunagu.kafkaReplication" $root)
  "TSUNAGU_LOG_FORMAT" $root.Values.config.logFormat
  "TSUNAGU_LOG_LEVEL" $root.Values.config.logLevel
  "TSUNAGU_SHUTDOWN_GRACE" $grace
  "TSUNAGU_ENV" $root.Values.config.environment
}}
{{- if $root.Values.config.metricsPort }}
{{- $_ := set $data "TSUNAGU_METRICS_PORT" $root.Values.config.metricsPort }}
{{- end }}
{{- with $root.Values.config.trustedProxies }}
{{- $_ := set $data "TSUNAGU_TRUSTED_PROXIES" (toJson .) }}
{{- end }}
{{- with $root.Values.config.otlpEndpoint }}
{{- $_ := set $data "TSUNAGU_OTLP_ENDPOINT" . }}
{{- end }}
{{- if has "redis" $uses }}
{{- /* With a password from a Secret the URL is in the container's env instead (tsunagu.redisEnv). */}}
{{- if not (include "tsunagu.redisPassword" $root) }}
{{- $_ := set $data "TSUNAGU_REDIS_URL" (include "tsunagu.redisUrl" $root) }}
{{- end }}
{{- if include "tsunagu.redisCaSecret" $root }}
{{- $_ := set $data "TSUNAGU_TLS_CA_FILE" "/etc/tsunagu/redis-ca/ca.crt" }}
{{- end }}
{{- if and $root.Values.redis.tls $root.Values.redis.tls.enabled (eq (toString $root.Values.redis.tls.checkHostname) "false") }}
{{- $_ := set $data "TSUNAGU_TLS_CHECK_HOSTNAME" "false" }}
{{- end }}
{{- end }}
{{- if has "mqtt" $uses }}
{{- $_ := set $data "TSUNAGU_MQTT_URL" (include "tsunagu.mqttUrl" $root) }}
{{- end }}
{{- if has "postgres" $uses }}
{{- $_ := set $data "TSUNAGU_DATABASE" $root.Values.config.database }}
{{- end }}
{{- /* The gateway trusts the keys auth publishes, and auth's audience, when auth is deployed. */}}
{{- if and (eq $name "ws-gateway") $root.Values.services.auth.enabled }}
{{- $authUrl := include "tsunagu.serviceUrl" (dict "root" $root "name" "auth") }}
{{- $_ := set $data "TSUNAGU_GATEWAY_TOKEN_JWKS_URL" (printf "%s/.well-known/jwks.json" $authUrl) }}
{{- $_ := set $data "TSUNAGU_GATEWAY_TOKEN_AUDIENCE" (index ($root.Values.services.auth.config | default dict) "TSUNAGU_AUTH_AUDIENCE" | default "tsunagu") }}
{{- end }}
{{- /* The demo web app asks the gateway which services answer; the gateway probes them in the cluster. */}}
{{- if eq $name "ws-gateway" }}
{{- $probed := dict }}
{{- range $other := list "auth" "collab" "stream-ingest" "mqtt-bridge" "sim-engine" }}
{{- $otherSvc := index $root.Values.services $other }}
{{- if $otherSvc.enabled }}
{{- $_ := set $probed $other (include "tsunagu.serviceUrl" (dict "root" $root "name" $other)) }}
{{- end }}
{{- end }}
{{- $_ := set $data "TSUNAGU_GATEWAY_WEB_SERVICE_URLS" (toJson $probed) }}
{{- if $root.Values.services.collab.enabled }}
{{- $_ := set $data "TSUNAGU_GATEWAY_COLLAB_URL" (include "tsunagu.serviceUrl" (dict "root" $root "name" "collab")) }}
{{- end }}
{{- end }}
{{- /* TLS: the mounted Secret is the service's identity towards everything, and what it serves with. */}}
{{- if $root.Values.tls.enabled }}
{{- $dir := "/etc/tsunagu/tls" }}
{{- $_ := set $data "TSUNAGU_TLS_CA_FILE" (printf "%s/ca.crt" $dir) }}
{{- $_ := set $data "TSUNAGU_TLS_CERT_FILE" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $data "TSUNAGU_TLS_KEY_FILE" (printf "%s/tls.key" $dir) }}
{{- $_ := set $data "TSUNAGU_SERVER_TLS_CERT_FILE" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $data "TSUNAGU_SERVER_TLS_KEY_FILE" (printf "%s/tls.key" $dir) }}
{{- $_ := set $data "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE" (printf "%s/ca.crt" $dir) }}
{{- $_ := set $data "TSUNAGU_SERVER_TLS_CLIENT_AUTH" $root.Values.tls.clientAuth }}
{{- $_ := set $data "TSUNAGU_KAFKA_SECURITY_PROTOCOL" $root.Values.tls.kafkaSecurityProtocol }}
{{- if $internal }}
{{- /* mTLS: the gateway's certificate (its SPIFFE URI) is let in without the token. */}}
{{- $gateway := include "tsunagu.componentName" (dict "root" $root "name" "ws-gateway") }}
{{- $peers := $root.Values.tls.internalPeers | default (list (printf "spiffe://cluster.local/ns/%s/sa/%s" $root.Release.Namespace $gateway)) }}
{{- $_ := set $data "TSUNAGU_INTERNAL_PEERS" (toJson $peers) }}
{{- end }}
{{- end }}
{{- with (include "tsunagu.mllp" $svc) }}
{{- $_ := set $data "TSUNAGU_INGEST_MLLP_PORT" . }}
{{- $_ := set $data "TSUNAGU_INGEST_MLLP_HOST" "0.0.0.0" }}
{{- /* Only NetworkPolicyPeers given: the NetworkPolicy decides who reaches the port. */}}
{{- $_ := set $data "TSUNAGU_INGEST_MLLP_SENDERS" (toJson ($svc.mllp.senders | default (list "0.0.0.0/0" "::/0"))) }}
{{- end }}
{{- /* The service's own settings come last and win. */}}
{{- range $key, $value := ($svc.config | default dict) }}
{{- $_ := set $data $key $value }}
{{- end }}
data:
  {{- range $key, $value := $data }}
  {{ $key }}: {{ $value | toString | quote }}
  {{- end }}
{{- end }}

{{/* Labels that let kube-prometheus-stack find the monitoring objects. */}}
{{- define "tsunagu.monitoringLabels" -}}
{{- with .Values.monitoring.release }}
release: {{ . }}
{{- end }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}
