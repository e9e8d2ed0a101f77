{{/* Names, labels and the RBAC rules shared by the chart's templates. */}}

{{- define "relaunch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects; 52 characters leaves room for the "-nodes" suffix. */}}
{{- define "relaunch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "relaunch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relaunch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "relaunch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "relaunch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "relaunch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "relaunch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.create is false but serviceAccount.name is empty: name the existing ServiceAccount the operator runs as" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "relaunch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
What the operator does inside a namespace it serves, and nothing more (no wildcards). Each verb
is one the operator's code (relaunch.controller) or kopf makes:
- TrainingJobs: kopf lists and watches them and patches them (its progress annotations, and
  removing the finalizer that older versions added); the operator reads each one (get) and
  writes its status subresource (merge patch).
- Pods: the workers, created one per rank, listed by label, watched to notice failures
  quickly, and deleted (force-deleted on a lost node) to stop a gang (for a recovery, or because
  spec.suspend is set); read (get) when a create
  meets "already exists", to tell our own object from a leftover of a deleted namesake.
- Pods' logs: with spec.progress, worker 0's log is followed (get pods/log, follow=true) to
  read the training step (the progress watchdog).
- Services: the headless rendezvous Service, created once ("already exists" is fine when it is
  ours); read and deleted when a namesake's Service is in the way.
- ConfigMaps: the rendered training config of each attempt (create), and the user's config
  when spec.config.configMapRef names one (listed and watched in that job's namespace, so an
  edit is seen at once; get while that watch starts); a namesake's leftover is deleted.
- Jobs: the planning and conversion Jobs, created, listed by label and watched; deleted when
  a try is abandoned (its pod killed, past its deadline, or its node lost), when spec.suspend
  interrupts a recovery, or when a namesake left one; finished ones are otherwise removed by the
  TTL controller.
- Events: posted on the TrainingJob for each step of a recovery; a repeat of the same Event
  increments its count (get, patch) instead of posting a copy.
- Kueue Workloads (only for jobs labelled kueue.x-k8s.io/queue-name): one per job, created and
  read (get); watched (list, watch) so that Kueue's admission and eviction wake the job at once;
  patched to deactivate it while spec.suspend is set; deleted to queue the job again after
  spec.replicas changed or after it finished and was edited to continue. Their status is patched
  as Kueue expects of a job integration: quota given back once an evicted job stopped, and
  Finished when the job ends.
*/}}
{{- define "relaunch.namespacedRules" -}}
- apiGroups: ["relaunch.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["relaunch.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
{{- end -}}

{{/*
Nodes are cluster-scoped, so even the namespaced mode needs this small ClusterRole: the
operator lists and watches them to notice a NotReady or deleted node within the job's grace period.
*/}}
{{- define "relaunch.nodeRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
{{- end -}}

{{/*
Priority classes are cluster-scoped: a queued job's Workload carries the value of its Kueue
WorkloadPriorityClass (label kueue.x-k8s.io/priority-class) or of its template's PriorityClass,
read (get) once, when the Workload is created.
*/}}
{{- define "relaunch.priorityClassRules" -}}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloadpriorityclasses"]
  verbs: ["get"]
- apiGroups: ["scheduling.k8s.io"]
  resources: ["priorityclasses"]
  verbs: ["get"]
{{- end -}}

{{/*
Node heartbeats: the kubelet renews a Lease per node in kube-node-lease; the operator lists and
watches them to see a silent node before its Ready condition changes. A Role in that one namespace,
never leases cluster-wide (other leases are controllers' leader elections).
*/}}
{{- define "relaunch.nodeLeaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["list", "watch"]
{{- end -}}

{{/*
Leader election (leaderElection.enabled): the replicas share one Lease in the release's
namespace; each reads it, the first creates it, the holder renews it (update).
*/}}
{{- define "relaunch.leaderRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end -}}

{{/* Rules that involve several values; the schema checks each value on its own. */}}
{{- define "relaunch.validate" -}}
{{- if and (eq .Values.watch.mode "namespaces") (empty .Values.watch.namespaces) -}}
{{- fail "watch.mode is \"namespaces\" but watch.namespaces is empty: list the namespaces whose TrainingJobs the operator serves (e.g. --set 'watch.namespaces={team-a,team-b}'), or use watch.mode=cluster" -}}
{{- end -}}
{{- if and (eq .Values.watch.mode "cluster") (not (empty .Values.watch.namespaces)) -}}
{{- fail (printf "watch.mode is \"cluster\" (every namespace) but watch.namespaces lists %s: set watch.mode=namespaces to serve only those, or empty watch.namespaces" (join ", " .Values.watch.namespaces)) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (empty .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false but serviceAccount.name is empty: name the existing ServiceAccount the operator runs as" -}}
{{- end -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) -}}
{{- fail (printf "replicas is %d but leaderElection.enabled is false: several replicas acting at once would fight over the same jobs; enable leader election or run one replica" (int .Values.replicas)) -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.service.enabled is false: the ServiceMonitor scrapes that Service; enable it" -}}
{{- end -}}
{{- end -}}
