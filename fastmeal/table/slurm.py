"""``fastmeal table slurm``: one sbatch script per stage, chained with ``--dependency=afterok``, and ``submit.sh``.

Each script runs the stage's command exactly as ``plan`` prints it, with torchrun's standalone rendezvous
replaced by c10d over the job's nodes (as ``examples/slurm_meal_v2.sbatch``). Before the time limit
(``--signal=B:USR1@120``) or on preemption (SIGTERM) the script asks the job step to stop with SIGTERM
(a training run checkpoints; a bank build keeps its finished chunks) and requeues the job, which then
continues (``--resume auto``, bank build resume). ``afterok`` holds the next stages until the stage ends
successfully, requeues included.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

from fastmeal.checkpoint import atomic_write_bytes
from fastmeal.table.plan import Plan, Stage

_TEMPLATE = """#!/bin/bash
# fastmeal table, stage {name} ({kind}): written by `fastmeal table slurm`; its command is the one `fastmeal
# table plan` prints. Submit every stage in order with submit.sh (afterok dependencies).
#SBATCH --job-name=fm-{name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1          # one launcher per node; torchrun starts the ranks of its node
{gpus_line}#SBATCH --cpus-per-task={cpus}
#SBATCH --signal=B:USR1@120          # USR1 to this script 120 s before the time limit
#SBATCH --requeue
#SBATCH --open-mode=append           # one log across requeues
#SBATCH --output={log}

set -uo pipefail  # no -e: `wait` returns non-zero when a signal interrupts it
cd {cwd}
GPUS_PER_NODE={gpus_per_node}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${{MASTER_PORT:-29500}}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}}

# Time limit near or preemption: SIGTERM to the job step (torchrun forwards it; the ranks checkpoint and
# exit 0), then requeue: the next start continues where this one stopped.
STOPPING=0
stop_stage() {{
  echo "$(date '+%F %T') $1: stopping {name} with a checkpoint, then requeueing"
  STOPPING=1
  scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap 'stop_stage USR1' USR1
trap 'stop_stage TERM' TERM

srun --ntasks-per-node=1 {command}{redirect} &
STEP_PID=$!
while true; do
  wait "$STEP_PID"
  rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done
if [ "$STOPPING" = 1 ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
{on_success}exit "$rc"
"""


def stage_layout(stage: Stage, gpus_per_node: int) -> tuple[int, int]:
    """``(nodes, GPUs per node)`` of a stage."""
    if stage.gpus <= 0 or gpus_per_node <= 0:
        return 1, 0
    nodes = math.ceil(stage.gpus / gpus_per_node)
    return nodes, stage.gpus // nodes


def script_text(plan: Plan, stage: Stage, log_dir: Path) -> str:
    nodes, per_node = stage_layout(stage, plan.spec.gpus_per_node)
    # The plan's command: standalone on one node, c10d over the job's nodes (its $VARS are set above).
    command = stage.command()
    redirect = on_success = ""
    if stage.result:
        redirect = f" > {shlex.quote(stage.result + '.partial')}"
        on_success = (f'if [ "$rc" = 0 ]; then mv {shlex.quote(stage.result + ".partial")} '
                      f"{shlex.quote(stage.result)}; fi\n")
    return _TEMPLATE.format(
        name=stage.name, kind=stage.kind, nodes=nodes,
        gpus_line=f"#SBATCH --gpus-per-node={per_node}\n" if per_node else "",
        cpus=12 * per_node if per_node else 8, log=shlex.quote(str(log_dir / f"{stage.name}-%j.out")),
        cwd=shlex.quote(os.getcwd()), gpus_per_node=per_node, command=command, redirect=redirect,
        on_success=on_success)


def write_slurm(plan: Plan, directory: str | os.PathLike) -> list[str]:
    """Write ``STAGE.sbatch`` for every stage and ``submit.sh``; returns lines saying what was written."""
    directory = Path(directory)
    log_dir = Path(os.path.abspath(plan.spec.out)) / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    submit = ["#!/bin/bash", "# Submits the table's stages in dependency order and prints each job id.",
              "set -euo pipefail", 'cd "$(dirname "$0")"', f"mkdir -p {shlex.quote(str(log_dir))}"]
    if any(s.result for s in plan.stages):
        submit.append(f"mkdir -p {shlex.quote(str(Path(os.path.abspath(plan.spec.out)) / 'eval'))}")
    variables = {}
    for i, stage in enumerate(plan.stages):  # listed after their dependencies
        path = directory / f"{stage.name}.sbatch"
        atomic_write_bytes(path, script_text(plan, stage, log_dir).encode())
        path.chmod(0o755)
        variables[stage.name] = f"JOB_{i}"
        after = ":".join(f"${variables[d]}" for d in stage.deps)
        dependency = f"--dependency=afterok:{after} " if after else ""
        submit += [f"{variables[stage.name]}=$(sbatch --parsable {dependency}{shlex.quote(path.name)})",
                   f'echo "{stage.name} ${variables[stage.name]}"']
    path = directory / "submit.sh"
    atomic_write_bytes(path, ("\n".join(submit) + "\n").encode())
    path.chmod(0o755)
    return [f"wrote {len(plan.stages)} sbatch scripts and {path} (run it to submit the table in order)"]
