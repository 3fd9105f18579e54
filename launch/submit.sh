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
#   RAY_AUTH_TOKEN      the cluster's token (Ray token authentication, docs/cluster.md), or
#   RAY_AUTH_TOKEN_PATH a file holding it, readable by its owner only (default ~/.ray/auth_token)
#   RAY_AUTH_MODE       token (default); `disabled` only for a cluster started without authentication
#   ICEPOP_JOB_ENV      extra variables for every process of the job, as a JSON object, e.g.
#                       '{"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "HF_TOKEN": "..."}'
#   ICEPOP_WORKING_DIR  what to ship as the working directory (default: this repository); set it to an
#                       empty string to run the icepop installed on the nodes instead
#   PYTHON              the interpreter on the nodes (default python)
# The job's logs stream here; the exit status is the job's. `ray job stop ID` cancels it.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,21p' "$0"
    exit 2
fi
recipe=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
job_env=${ICEPOP_JOB_ENV:-"{}"}
working_dir=${ICEPOP_WORKING_DIR-$repo}

# Token authentication: the `ray` CLI sends the token with every request to the job API. Ray reads it
# from RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH, else from ~/.ray/auth_token; a token
# file that others may read is refused here, before anything is sent.
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ ! -s "$token_file" ]]; then
        echo "launch/submit.sh: no Ray token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the cluster's" \
            "token file ($token_file is missing or empty); see docs/cluster.md" >&2
        exit 2
    fi
    if [[ -n "$(find -L "$token_file" -prune \( -perm -040 -o -perm -004 \))" ]]; then
        echo "launch/submit.sh: other users can read $token_file: chmod 600 $token_file" >&2
        exit 2
    fi
fi

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
