#!/usr/bin/env bash
# The bit-finetune flow through a real Prefect server, worker and deployment, on 127.0.0.1 only,
# as a worker host runs it: the flow run clones the repository, works in its own workspace,
# shares data and models through a DVC remote and logs to an MLflow server.
#
# usage: scripts/prefect_e2e.sh CHECKOUT WORKDIR [OVERRIDE ...]
#   CHECKOUT  the git repository the pull steps clone (file://CHECKOUT); the run's DVC experiment
#             is pushed back to it (refs/exps/...). Its files are not changed.
#   WORKDIR   scratch space: PREFECT_HOME (the server's SQLite database), the MLflow server's
#             store and artifacts, the DVC remote and host cache, the workspaces, logs, pids
#   OVERRIDE  section.key=value, passed to the flow's `overrides` parameter (e.g. train.batch=8)
#
# Steps, each bounded in time:
#   1. prefect server start --host 127.0.0.1 --port <free port> --analytics-off, in the
#      background, with PREFECT_HOME under WORKDIR; wait for /api/health; export PREFECT_API_URL;
#      and, unless MLFLOW_TRACKING_URI is given, mlflow server --host 127.0.0.1 with proxied
#      artifacts (--artifacts-destination WORKDIR/mlflow/artifacts)
#   2. for every work pool in CHECKOUT/prefect.yaml: create it (process type) when missing, and
#      a tag concurrency limit of 1 on <pool>-training (the fine-tune task's tag); create the
#      zombie-run automation (scripts/crash-zombie-runs.yaml)
#   3. prefect variable set bit_git_url file://CHECKOUT; prefect --no-prompt deploy --all
#   4. prefect worker start --pool <the deployment's pool> --limit 1, in the background, as a
#      worker host (one flow run at a time):
#      BIT_DVC_REMOTE=WORKDIR/dvc-remote, BIT_DVC_CACHE=WORKDIR/dvc-cache, and TMPDIR
#      WORKDIR/workspaces (where the process worker makes each run's workspace)
#   5. prefect deployment run bit-finetune/$DEPLOYMENT --params {"overrides": [...]} --watch
#   6. check: the run is Completed and published the bit-evaluation artifact; the MLflow server
#      has its run with metrics; its DVC experiment is in CHECKOUT; its workspace is gone;
#      record each deployment's schedule parameters, and the nightly runs the server's scheduler
#      has created from them, in result.json
# On exit, whatever happened, the worker and the servers are stopped with every process they
# started (their process groups and descendants: SIGTERM, then SIGKILL after 10 s).
#
# Environment:
#   DEPLOYMENT      deployment of prefect.yaml to run (default cpu)
#   RUN_TIMEOUT     seconds the flow run may take (default 1800)
#   SERVER_TIMEOUT  seconds to wait for a server to answer (default 180)
#   PREFECT_BIN     directory holding prefect, mlflow and python (default: this repo's
#                   .venv/bin, else the directory of `prefect` on PATH)
#   MLFLOW_TRACKING_URI  an MLflow server (http://...) for the worker (default: one started here)
# Prints "e2e: ok ..." lines and exits 0 on success; non-zero with the logs' tails otherwise.
# Writes WORKDIR/pids ("server <pid>", "mlflow <pid>", "worker <pid>"),
# WORKDIR/{server,mlflow,worker,run}.log and WORKDIR/result.json (flow run id, state, MLflow
# run id, DVC experiment, workspaces left).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
CHECKOUT=$(cd "$1" && pwd)
mkdir -p "$2"
WORK=$(cd "$2" && pwd)
shift 2
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPLOYMENT=${DEPLOYMENT:-cpu}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
SERVER_TIMEOUT=${SERVER_TIMEOUT:-180}
CLI_TIMEOUT=180
if [[ -z ${PREFECT_BIN:-} ]]; then
    if [[ -x $SCRIPTS/../.venv/bin/prefect ]]; then
        PREFECT_BIN=$(cd "$SCRIPTS/../.venv/bin" && pwd)
    else
        PREFECT_BIN=$(dirname "$(command -v prefect)")
    fi
fi
PREFECT=$PREFECT_BIN/prefect
PY=$PREFECT_BIN/python

# Telemetry off; an isolated Prefect home and profile; no settings from the caller's profile.
eval "$("$PY" -m tasks.environment)"
export PREFECT_HOME=$WORK/prefect-home
unset PREFECT_API_URL PREFECT_API_KEY PREFECT_PROFILE PREFECT_PROFILES_PATH \
    PREFECT_API_DATABASE_CONNECTION_URL BIT_PIPELINE_REPO
export PATH=$PREFECT_BIN:$PATH NO_COLOR=1 COLUMNS=200 TERM=dumb
export PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_WORKER_PREFETCH_SECONDS=5
mkdir -p "$PREFECT_HOME"
: >"$WORK/pids"

# fds 3 and 4: the script's own stdout and stderr, whatever a command's redirection says when a
# trap fires; not passed on to the processes it starts.
exec 3>&1 4>&2
log() { printf 'e2e: %s\n' "$*" >&3; }
fail() {
    printf 'e2e: FAILED: %s\n' "$*" >&4
    for name in server mlflow worker run; do
        [[ -s $WORK/$name.log ]] && { printf -- '--- %s.log (tail)\n' "$name" >&4; tail -n 40 "$WORK/$name.log" >&4; }
    done
    exit 1
}

# --- stopping what this script started -------------------------------------------------------
LEADERS=()  # pids of the background processes started with setsid (each leads its own group)
HELPER=""   # the pid of the bounded command running now (in the background: signals reach traps)
OWN_PGID=$(ps -o pgid= -p $$ | tr -d ' ')

descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

signal_all() {  # signal_all SIG PID...: each process group among them (ours excepted) once
    local sig=$1 pid pgid seen=" "
    shift
    for pid in "$@"; do
        pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || true
        if [[ -z $pgid ]]; then
            continue  # gone
        elif [[ $pgid == "$OWN_PGID" ]]; then
            kill "-$sig" "$pid" 2>/dev/null || true
        elif [[ $seen != *" $pgid "* ]]; then
            seen+="$pgid "
            kill "-$sig" -- "-$pgid" 2>/dev/null || true
        fi
    done
    return 0
}

stop_tree() {  # stop_tree PID: SIGTERM it and its descendants' groups; SIGKILL after 10 s
    local pids=("$1") pid alive deadline
    kill -0 "$1" 2>/dev/null || return 0
    while read -r pid; do pids+=("$pid"); done < <(descendants "$1")
    signal_all TERM "${pids[@]}"
    deadline=$((SECONDS + 10))  # a prefect worker ignores SIGTERM/SIGINT when idle: KILL it
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
                alive=1
            fi
        done
        ((alive)) || break
        sleep 0.5
    done
    signal_all KILL "${pids[@]}"
    wait "$1" 2>/dev/null || true
}

cleanup() {
    local status=$? i started=$SECONDS order=()
    trap - EXIT INT TERM
    exec 2>/dev/null  # bash's own "Killed" job notices
    [[ -n $HELPER ]] && order+=("$HELPER")
    for ((i = ${#LEADERS[@]} - 1; i >= 0; i--)); do order+=("${LEADERS[i]}"); done
    if ((${#order[@]})); then
        log "stopping ${order[*]} (a pending command, the worker, the servers) and their children"
        for i in "${order[@]}"; do stop_tree "$i"; done  # the servers last: the worker reports to them
        log "stopped in $((SECONDS - started)) s"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() {  # start_bg NAME COMMAND...: in its own session and process group, logging to NAME.log
    local name=$1
    shift
    setsid "$@" >"$WORK/$name.log" 2>&1 </dev/null 3>&- 4>&- &
    LEADERS+=($!)
    echo "$name $!" >>"$WORK/pids"
}

bounded() {  # bounded SECONDS COMMAND...: a time limit, and signals handled while it runs
    local limit=$1 pid status=0
    shift
    timeout "$limit" "$@" 3>&- 4>&- &
    pid=$!
    HELPER=$pid
    wait "$pid" || status=$?
    HELPER=""
    return "$status"
}

cli() { bounded "$CLI_TIMEOUT" "$PREFECT" "$@"; }

# --- 1. the servers ---------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_health() {  # wait_health NAME URL PID
    local deadline=$((SECONDS + SERVER_TIMEOUT))
    until curl -fsS --max-time 2 "$2" >/dev/null 2>&1; do
        kill -0 "$3" 2>/dev/null || fail "the $1 server exited"
        ((SECONDS < deadline)) || fail "the $1 server did not answer within ${SERVER_TIMEOUT}s"
        sleep 1
    done
}
PORT=$(free_port)
start_bg server "$PREFECT" server start --host 127.0.0.1 --port "$PORT" --analytics-off
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
wait_health Prefect "$PREFECT_API_URL/health" "${LEADERS[-1]}"
log "server up at $PREFECT_API_URL (PREFECT_HOME=$PREFECT_HOME)"
if [[ -z ${MLFLOW_TRACKING_URI:-} ]]; then
    MLFLOW_PORT=$(free_port)
    mkdir -p "$WORK/mlflow"
    start_bg mlflow env -C "$WORK/mlflow" "$PREFECT_BIN/mlflow" server --host 127.0.0.1 \
        --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$WORK/mlflow/mlflow.db" \
        --artifacts-destination "$WORK/mlflow/artifacts"
    export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
    wait_health MLflow "$MLFLOW_TRACKING_URI/health" "${LEADERS[-1]}"
    log "MLflow server up at $MLFLOW_TRACKING_URI (artifacts proxied to $WORK/mlflow/artifacts)"
fi

# --- 2. pools, limits, automation -------------------------------------------------------------
read -r -a POOLS <<<"$("$PY" - "$CHECKOUT/prefect.yaml" <<'EOF'
import sys, yaml
deployments = yaml.safe_load(open(sys.argv[1]))["deployments"]
print(" ".join(dict.fromkeys(d["work_pool"]["name"] for d in deployments)))
EOF
)"
POOL=$("$PY" - "$CHECKOUT/prefect.yaml" "$DEPLOYMENT" <<'EOF'
import sys, yaml
deployments = yaml.safe_load(open(sys.argv[1]))["deployments"]
print(next(d["work_pool"]["name"] for d in deployments if d["name"] == sys.argv[2]))
EOF
) || fail "no deployment named $DEPLOYMENT in $CHECKOUT/prefect.yaml"
for pool in "${POOLS[@]}"; do
    cli work-pool inspect "$pool" >/dev/null 2>&1 || cli work-pool create "$pool" --type process >/dev/null
    cli concurrency-limit create "$pool-training" 1 >/dev/null
done
log "work pools ${POOLS[*]}: process type; tags ${POOLS[*]/%/-training}: 1 task"
if ! cli automation inspect bit-crash-zombie-runs >/dev/null 2>&1; then
    cli automation create --from-file "$SCRIPTS/crash-zombie-runs.yaml" >/dev/null
fi

# --- 3. deployments ---------------------------------------------------------------------------
cli variable set bit_git_url "file://$CHECKOUT" --overwrite >/dev/null
bounded "$CLI_TIMEOUT" env -C "$CHECKOUT" "$PREFECT" --no-prompt deploy --all >"$WORK/deploy.log" 2>&1 \
    || { tail -n 40 "$WORK/deploy.log" >&2; fail "prefect deploy --all"; }
log "deployed prefect.yaml from $CHECKOUT; runs clone file://$CHECKOUT"

# --- 4. the worker: a host with its DVC cache, the shared DVC remote and its workspaces --------
mkdir -p "$WORK/dvc-remote" "$WORK/dvc-cache" "$WORK/workspaces"
start_bg worker env BIT_DVC_REMOTE="$WORK/dvc-remote" BIT_DVC_CACHE="$WORK/dvc-cache" \
    TMPDIR="$WORK/workspaces" "$PREFECT" worker start --pool "$POOL" --limit 1 --name "e2e-$POOL-$$"
log "worker polling $POOL (DVC remote $WORK/dvc-remote, workspaces in $WORK/workspaces)"

# --- 5. a run ---------------------------------------------------------------------------------
PARAMS=$("$PY" -c 'import json, sys; print(json.dumps({"overrides": sys.argv[1:]}))' "$@")
log "running bit-finetune/$DEPLOYMENT with $PARAMS"
RUN_STATUS=0
bounded $((RUN_TIMEOUT + 60)) "$PREFECT" deployment run "bit-finetune/$DEPLOYMENT" \
    --params "$PARAMS" --watch --watch-timeout "$RUN_TIMEOUT" >"$WORK/run.log" 2>&1 \
    || RUN_STATUS=$?
FLOW_RUN=$(grep -oE 'UUID: [0-9a-f-]{36}' "$WORK/run.log" | head -n 1 | cut -d' ' -f2 || true)
[[ -n $FLOW_RUN ]] || fail "no flow run was created"
((RUN_STATUS == 0)) || fail "flow run $FLOW_RUN did not complete (exit $RUN_STATUS)"

# --- 6. checks --------------------------------------------------------------------------------
cat >"$WORK/check.py" <<'EOF'
import asyncio, json, os, subprocess, sys, time
from pathlib import Path
from uuid import UUID

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                            FlowRunFilter, FlowRunFilterState,
                                            FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType

flow_run_id, checkout, work, out = UUID(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), \
    Path(sys.argv[4])


def experiments() -> list[str]:
    """The DVC experiments pushed to the checkout (refs/exps/<baseline>/<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
                          cwd=checkout, capture_output=True, text=True, check=True).stdout
    return [ref.rsplit("/", 1)[1] for ref in refs.split() if not ref.startswith("refs/exps/exec/")]


def workspaces_left(seconds: float = 60) -> list[str]:
    """Clones of the project still in the worker's temporary folder (the worker removes a run's
    workspace when the run ends)."""
    deadline = time.monotonic() + seconds
    while (left := sorted(str(p.parent) for p in (work / "workspaces").rglob("dvc.yaml"))) and \
            time.monotonic() < deadline:
        time.sleep(1)
    return left


async def main() -> None:
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        deployments = [d for d in await client.read_deployments()
                       if d.entrypoint.endswith(":bit_finetune")]
        scheduled = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    keys = sorted(a.key for a in artifacts if a.key)
    names = experiments()
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("bit-pipeline")
    runs = mlflow.search_runs([experiment.experiment_id], f"tags.`dvc.experiment` = '{names[-1]}'") \
        if names and experiment else []
    result = {"flow_run_id": str(flow_run_id), "state": run.state.name if run.state else None,
              "artifacts": keys, "experiments": names,
              "mlflow_run_id": runs[0].info.run_id if runs else None,
              "metrics": runs[0].data.metrics if runs else {},
              "workspaces_left": workspaces_left(),
              "nightly_schedules": {d.name: [s.parameters for s in d.schedules or []]
                                    for d in deployments},
              "scheduled_nightly_runs": {d.name: sum(
                  1 for r in scheduled if r.deployment_id == d.id and r.parameters.get("nightly"))
                  for d in deployments}}
    out.write_text(json.dumps(result, indent=2))
    problems = [p for p, bad in (
        (f"state {result['state']}", result["state"] != "Completed"),
        ("no bit-evaluation artifact", "bit-evaluation" not in keys),
        (f"no DVC experiment pushed to {checkout}", len(names) != 1),
        ("no MLflow run with test metrics on the server",
         not any(k.startswith("test_") for k in result["metrics"])),
        (f"workspaces left: {result['workspaces_left']}", result["workspaces_left"])) if bad]
    if problems:
        sys.exit("; ".join(problems))
    print(f"e2e: ok flow run {flow_run_id} Completed; artifact bit-evaluation; "
          f"MLflow run {result['mlflow_run_id']}; DVC experiment {names[0]} in {checkout}; "
          "workspace removed")


asyncio.run(main())
EOF
bounded "$CLI_TIMEOUT" "$PY" "$WORK/check.py" "$FLOW_RUN" "$CHECKOUT" "$WORK" "$WORK/result.json" \
    || fail "checks (see $WORK/result.json)"
