#!/usr/bin/env bash
# Submit an icepop recipe to a running Ray cluster with `ray job submit`: the job's driver starts on
# the head node and joins that cluster (cluster.address=auto); icepop then sizes its placement groups
# from the nodes it finds and refuses, in one message, a cluster too small for the config. This
# checkout travels as the job's working directory, so every node runs the code you have here.
#
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit.sh rlvr cluster=gpu model=qwen3-1.7b data=gsm8k \
#       trainer.zero_stage=3 trainer.ranks=8 rollout.engines=8
#
# Arguments: the recipe (sft, rm, rlvr, rlhf, eval, pipeline), then any Hydra overrides.
# Environment:
#   RAY_ADDRESS         the head's job API (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE       must match the cluster's (Ray 2.60 needs every process and CLI call to agree);
#                       default disabled, as in icepop's image and its own processes
#   ICEPOP_JOB_ENV      extra variables for every process of the job, as a JSON object, e.g.
#                       '{"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "HF_TOKEN": "..."}'
#   ICEPOP_WORKING_DIR  what to ship as the working directory (default: this repository); set it to an
#                       empty string to run the icepop installed on the nodes instead
#   PYTHON              the interpreter on the nodes (default python)
# The job's logs stream here; the exit status is the job's. `ray job stop ID` cancels it.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,20p' "$0"
    exit 2
fi
recipe=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
job_env=${ICEPOP_JOB_ENV:-"{}"}
working_dir=${ICEPOP_WORKING_DIR-$repo}

# The runtime environment: the extra variables, and (with a working directory) what not to upload.
runtime_env="{\"env_vars\": $job_env"
if [[ -n "$working_dir" ]]; then
    runtime_env+=', "excludes": [".git", ".venv", "runs", "build", "outputs", "wandb", "*.egg-info"]'
fi
runtime_env+="}"

args=(job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env")
if [[ -n "$working_dir" ]]; then
    args+=(--working-dir "$working_dir")
fi
exec ray "${args[@]}" -- "${PYTHON:-python}" -m icepop.train "+recipe=$recipe" cluster.address=auto "$@"
