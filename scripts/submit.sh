#!/usr/bin/env bash
# Runs any qdeep command, unchanged, as a Ray job on a cluster:
#   scripts/submit.sh [options] COMMAND [qdeep arguments...]
# becomes `ray job submit --address ... --working-dir . --runtime-env-json ... -- qdeep COMMAND ...`, run from
# the repository root, so the job runs this checkout's code on top of the cluster image's dependencies.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/submit.sh [options] COMMAND [qdeep arguments...]

Submits `qdeep COMMAND ...` to a Ray cluster as a job (the driver runs on the head node) and, unless
--no-wait, streams its logs until it ends. First forward the cluster's job API to this machine:
  ray dashboard cluster.yaml        # keep it running; serves http://127.0.0.1:8265

qdeep chooses GPU or CPU workers by the GPUs the cluster has when the command starts, and a cluster
whose GPU nodes have min_workers: 0 has none until something asks. --gpus N asks first: a short job
requests N GPUs from the autoscaler and waits until they are up, then the qdeep job is submitted.

options:
  --address URL          job API address (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS,
                         else http://127.0.0.1:8265)
  --gpus N               bring the cluster to at least N GPUs before submitting (default 0: don't ask)
  --gpus-timeout S       give up if those GPUs are not up after S seconds (default 1200)
  --env KEY=VALUE        an environment variable for the job's processes (repeatable)
  --submission-id ID     the job's id (default: Ray makes one); `ray job logs ID`, `ray job stop ID`
  --no-wait              return once submitted instead of streaming the logs
  --dry-run              print the `ray job submit` command(s) instead of running them
  -h, --help             this message

example:
  scripts/submit.sh --gpus 4 train --data s3://your-bucket/qdeep/packs/planet --arch resnet50 --weights imagenet \
    --workers 4 --out s3://your-bucket/qdeep/results/resnet50
EOF
}

die() { echo "submit.sh: $*" >&2; echo "run scripts/submit.sh --help for usage" >&2; exit 2; }

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
gpus=0
gpus_timeout=1200
no_wait=0
dry_run=0
submission_id=""
envs=("PYTHONUNBUFFERED=1")  # logs reach `ray job logs` line by line

while (($#)); do
  case "$1" in
    --address) (($# >= 2)) || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --gpus) (($# >= 2)) || die "--gpus needs a number"; gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#*=}"; shift ;;
    --gpus-timeout) (($# >= 2)) || die "--gpus-timeout needs seconds"; gpus_timeout="$2"; shift 2 ;;
    --gpus-timeout=*) gpus_timeout="${1#*=}"; shift ;;
    --env) (($# >= 2)) || die "--env needs KEY=VALUE"; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --submission-id) (($# >= 2)) || die "--submission-id needs a value"; submission_id="$2"; shift 2 ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    --no-wait) no_wait=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (qdeep's own options go after COMMAND)" ;;
    *) break ;;
  esac
done
(($#)) || die "no qdeep command given"
[[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus wants a whole number, got '$gpus'"
[[ "$gpus_timeout" =~ ^[0-9]+$ ]] || die "--gpus-timeout wants whole seconds, got '$gpus_timeout'"
for kv in "${envs[@]}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done

# Kept out of the upload: Ray refuses a working dir over 512 MiB, and none of these is code. Patterns are
# .gitignore-style: a leading / anchors at the repository root, so /data spares the package qdeep/data.
# (Ray also skips what .gitignore lists.)
runtime_env="$(python3 - "${envs[@]}" <<'PY'
import json, sys
env = dict(kv.split("=", 1) for kv in sys.argv[1:])
excludes = ["/.git", "/.venv", "/demo", "/data", "/build", "mlruns", "mlartifacts", "mlflow.db",
            "ray_results", "*.egg-info", "__pycache__", ".pytest_cache"]
print(json.dumps({"excludes": excludes, "env_vars": env}, separators=(",", ":")))
PY
)"

# Runs on the head: asks the autoscaler for N one-GPU bundles, waits for them, then withdraws the request,
# so the nodes go away idle_timeout_minutes after the qdeep job stops using them.
read -r -d '' scale_up <<'PY' || true
import sys, time
import ray
from ray.autoscaler.sdk import request_resources
n, timeout = int(sys.argv[1]), float(sys.argv[2])
ray.init()
request_resources(bundles=[{"GPU": 1}] * n)
start = time.monotonic()
try:
    while (have := ray.cluster_resources().get("GPU", 0)) < n:
        if time.monotonic() - start > timeout:
            sys.exit(f"only {have:g} of {n} GPUs up after {timeout:g} s: see `ray status` on the head, "
                     "the GPU node types' max_workers, the account's quotas and spot capacity")
        print(f"waiting for GPUs: {have:g} of {n} up", flush=True)
        time.sleep(15)
finally:
    request_resources(num_cpus=0)
print(f"{n} GPUs up", flush=True)
PY
pre=()
if ((gpus > 0)); then
  pre=(ray job submit --address "$address" -- python -c "$scale_up" "$gpus" "$gpus_timeout")
fi

cmd=(ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env")
if [[ -n "$submission_id" ]]; then cmd+=(--submission-id "$submission_id"); fi
if ((no_wait)); then cmd+=(--no-wait); fi
cmd+=(-- qdeep "$@")

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # --working-dir . is the repository root

# One line that a shell reads back as the same words: plain words bare, the rest in single quotes.
quoted() {
  local out="" word
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

if ((dry_run)); then
  if ((${#pre[@]})); then quoted "${pre[@]}"; fi
  quoted "${cmd[@]}"
  exit 0
fi
if ((${#pre[@]})); then "${pre[@]}"; fi
exec "${cmd[@]}"
