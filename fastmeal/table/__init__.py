"""``fastmeal table``: the paper's table (or the CPU demo's) as one planned, timed, resumable job.

* :mod:`fastmeal.table.plan`: which banks serve which presets, which train online and why, every stage's
  exact command, estimates (measured rates or labelled defaults), disk, and the schedule on M×N GPUs;
* :mod:`fastmeal.table.rates`: default rates, ``--calibrate`` and rates files;
* :mod:`fastmeal.table.runner`: ``run``, each stage an ordinary ``fastmeal`` command in a subprocess, with
  an atomic state file so that a killed table continues where it stopped;
* :mod:`fastmeal.table.slurm`: one sbatch script per stage, chained by ``afterok`` dependencies;
* :mod:`fastmeal.table.report`: the table beside the paper's numbers (Markdown, HTML, one figure).
"""

from fastmeal.table.plan import TableError, TableSpec, build_plan, format_plan

__all__ = ["TableError", "TableSpec", "build_plan", "format_plan"]
