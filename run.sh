#!/usr/bin/env bash
# Launch training: bash run.sh CONFIG [MAX_STEPS] [more train.py flags]
#   bash run.sh tiny                 # sets up venv/ and the sample data if missing, then trains
#   bash run.sh production 5000 --resume latest
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_ADDRESS=10.0.0.2 bash run.sh production   # on each machine, its rank
set -euo pipefail
# Not cd'ing there: paths given as flags stay relative to where the command runs, as with train.py.
REPO=$(cd "$(dirname "$0")" && pwd)

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  cat <<'USAGE'
usage: bash run.sh CONFIG [MAX_STEPS] [more train.py flags]

Sets up venv/ (bash setup.sh) and, for the tiny config, the sample data when missing, then trains CONFIG
(test, production, tiny or a JSON path) with one process per visible GPU (scripts/launch.py: torchrun; one process on a
CPU-only machine). MAX_STEPS is --max-steps. Every other flag goes to train.py: python train.py --help lists them.

  bash run.sh tiny                              # the CPU smoke run
  bash run.sh production --resume auto          # the same command on every boot of a preemptible machine
  NUM_MACHINES=2 MACHINE_RANK=0 MAIN_ADDRESS=10.0.0.2 bash run.sh production   # on each machine, its rank

Environment: CUDA_VISIBLE_DEVICES picks the GPUs; GPUS_PER_MACHINE overrides their count; NUM_MACHINES,
MACHINE_RANK, MAIN_ADDRESS, MAIN_PORT (29500) for several machines; TORCH_ELASTIC_SHUTDOWN_TIMEOUT (300) is
how long the launcher waits, after passing on a SIGTERM, for the final checkpoint.
USAGE
  exit 0
fi

CONFIG=${1:-test}
shift || true
ARGS=(--config "$CONFIG")
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  ARGS+=(--max-steps "$1")
  shift
fi

[ -x "$REPO/venv/bin/python" ] || bash "$REPO/setup.sh"
if [ "$CONFIG" = "tiny" ] && ! ls "$REPO"/data/sample/tokenized_*.npz >/dev/null 2>&1; then
  "$REPO/venv/bin/python" "$REPO/scripts/prepare_data.py" --sample
fi

# One process per visible GPU (CUDA_VISIBLE_DEVICES picks them), on every machine; one process on a
# CPU-only machine. Multi-node: run this on each machine with the same NUM_MACHINES, MAIN_ADDRESS (the
# machine-rank-0 host) and MAIN_PORT, and MACHINE_RANK 0..NUM_MACHINES-1.
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_ADDRESS=${MAIN_ADDRESS:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
if [ -n "${WORLD_SIZE:-}" ]; then
  # Already started by a launcher (torchrun, SLURM srun): each process just runs train.py.
  exec "$REPO/venv/bin/python" "$REPO/train.py" "${ARGS[@]}" "$@"
fi
GPUS=${GPUS_PER_MACHINE:-$("$REPO/venv/bin/python" -c "import torch; print(torch.cuda.device_count())")}
if [ "$GPUS" -eq 0 ] && [ "$NUM_MACHINES" -gt 1 ]; then
  echo "error: NUM_MACHINES=$NUM_MACHINES but this machine has no visible GPU; multi-node training needs GPUs" >&2
  exit 2
fi
if [ $((GPUS * NUM_MACHINES)) -gt 1 ]; then
  # On a signal (SIGTERM: preemption; SIGINT: Ctrl+C; SIGHUP: a closed ssh session) the launcher passes it on
  # and waits this long before SIGKILL (torch's default: 30 s): train.py needs the time to finish its step and
  # save a checkpoint. scripts/launch.py is torchrun's agent, ending with the workers' exit code.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
  exec "$REPO/venv/bin/python" "$REPO/scripts/launch.py" --nnodes "$NUM_MACHINES" --node_rank "$MACHINE_RANK" \
    --nproc_per_node "$GPUS" --master_addr "$MAIN_ADDRESS" --master_port "$MAIN_PORT" \
    "$REPO/train.py" "${ARGS[@]}" "$@"
fi
exec "$REPO/venv/bin/python" "$REPO/train.py" "${ARGS[@]}" "$@"
