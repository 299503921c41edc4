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

options:
  --address URL          job API address (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS,
                         else http://127.0.0.1:8265)
  --env KEY=VALUE        an environment variable for the job's processes (repeatable)
  --submission-id ID     the job's id (default: Ray makes one); `ray job logs ID`, `ray job stop ID`
  --no-wait              return once submitted instead of streaming the logs
  --dry-run              print the `ray job submit` command instead of running it
  -h, --help             this message

example:
  scripts/submit.sh train --data /home/ray/data --arch resnet50 --weights imagenet --workers 4 \
    --storage-path s3://your-bucket/qdeep/ray_results --out /home/ray/head/results/resnet50
EOF
}

die() { echo "submit.sh: $*" >&2; echo "run scripts/submit.sh --help for usage" >&2; exit 2; }

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
no_wait=0
dry_run=0
submission_id=""
envs=("PYTHONUNBUFFERED=1")  # logs reach `ray job logs` line by line

while (($#)); do
  case "$1" in
    --address) (($# >= 2)) || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --env) (($# >= 2)) || die "--env needs KEY=VALUE"; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --submission-id) (($# >= 2)) || die "--submission-id needs a value"; submission_id="$2"; shift 2 ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    --no-wait) no_wait=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (options of qdeep go after COMMAND)" ;;
    *) break ;;
  esac
done
(($#)) || die "no qdeep command given"
for kv in "${envs[@]}"; do
  [[ "$kv" == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$kv'"
done

# Kept out of the upload: Ray refuses a working dir over 512 MiB, and none of these is code. Patterns are
# .gitignore-style: a leading / anchors at the repository root, so /data spares the package qdeep/data.
# (Ray also skips what .gitignore lists.)
runtime_env="$(python3 - "${envs[@]}" <<'EOF'
import json, sys
env = dict(kv.split("=", 1) for kv in sys.argv[1:])
excludes = ["/.git", "/.venv", "/demo", "/data", "/build", "mlruns", "mlartifacts", "mlflow.db",
            "ray_results", "*.egg-info", "__pycache__", ".pytest_cache"]
print(json.dumps({"excludes": excludes, "env_vars": env}, separators=(",", ":")))
EOF
)"

cmd=(ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env")
[[ -n "$submission_id" ]] && cmd+=(--submission-id "$submission_id")
((no_wait)) && cmd+=(--no-wait)
cmd+=(-- qdeep "$@")

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # --working-dir . is the repository root

if ((dry_run)); then
  # One line a shell reads back as the same words: plain words bare, the rest in single quotes.
  out=""
  for word in "${cmd[@]}"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
  exit 0
fi
exec "${cmd[@]}"
