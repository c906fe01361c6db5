#!/usr/bin/env bash
# MEAL V2 on one DGX (8 GPUs), without a scheduler: torchrun --standalone, a graceful stop on SIGTERM,
# a restart of all ranks when one dies (--max-restarts), and resume where it stopped when started again.
#
#   DATA=/data/imagenet examples/dgx_single_node.sh                        # r50_224, all GPUs of the node
#   PRESET=r18_224 NPROC=4 examples/dgx_single_node.sh --set data.workers=12   # extra overrides
#   kill -TERM <pid of this script>      # or `docker stop -t 120 <container>`: stop with a checkpoint
#
# Running the same command again continues from the checkpoint (--resume auto). See examples/README.md.
set -uo pipefail  # no -e: `wait` returns non-zero when a signal interrupts it

PRESET=${PRESET:-r50_224}
DATA=${DATA:-/datasets/imagenet}
RUN_DIR=${RUN_DIR:-runs/$PRESET}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
# A rank that dies (out of memory, GPU error, killed) makes the others stop (exit 3); torchrun then starts
# every rank again, up to this many times, and they resume from the last checkpoint.
MAX_RESTARTS=${MAX_RESTARTS:-3}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}  # recent torchrun; older: 30 s
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
  -m fastmeal train --preset "$PRESET" --set data.root="$DATA" --set runtime.run_dir="$RUN_DIR" \
  --resume auto "$@" &
TORCHRUN_PID=$!

# torchrun forwards SIGTERM to every rank: each finishes its step, they agree, rank 0 checkpoints.
trap 'echo "SIGTERM: the ranks finish their step and checkpoint"; kill -TERM "$TORCHRUN_PID"' TERM

while true; do
  wait "$TORCHRUN_PID"
  rc=$?
  kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done

if [ -f "$RUN_DIR/preempted.json" ]; then
  # torchrun itself exits 1 after a forwarded signal; the ranks exited 0 with a checkpoint.
  echo "stopped with a checkpoint: $(cat "$RUN_DIR/preempted.json"); run the same command to resume"
  exit 0
fi
exit "$rc"
