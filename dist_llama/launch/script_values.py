"""What may go into the rendered batch script, and how: every value either validated or quoted.

Two kinds of line take values. Shell lines get `shlex.quote`, once, at render time (the template
never adds quotes of its own around a placeholder). `#SBATCH` lines are read by sbatch's own option
parser, not by a shell, so shell quoting does not apply there: names, times and partitions are held
to a strict character set instead, and paths are written in the one syntax sbatch understands
(double quotes, backslash escapes, and `%%` for a literal `%` in an output file pattern). Nothing
anywhere may contain a newline or another control character: in the script, a newline ends the
line it was meant to stay in, and the rest of the value runs as a command.
"""

from __future__ import annotations

import re
from typing import Optional

from dist_llama.config import ConfigError

# Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds (sbatch --time).
TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                  r"|UNLIMITED|INFINITE)")
NAME = re.compile(r"[A-Za-z0-9._+-]+")
"""Job names, accounts, QOS: what Slurm sites use, and nothing sbatch or a shell would interpret."""
NAME_LIST = re.compile(r"[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*")
"""Partitions: one or a comma-separated list."""
HOSTLIST = re.compile(r"[A-Za-z0-9._\[\],-]+")
"""Node names and hostlist expressions (n[1-4],gpu07)."""
CONSTRAINT = re.compile(r"[A-Za-z0-9._,&|\[\]*:()!+-]+")
"""Node features with Slurm's operators (intel&gpu, [rack1|rack2], gpu*2); no spaces."""
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_line(key: str, value: str) -> str:
    """A value that must stay on its line: no newline, no other control character."""
    if CONTROL.search(value):
        raise ConfigError(key, f"contains a newline or control character: {value!r}")
    return value


def check(key: str, value: str, pattern: re.Pattern, what: str) -> str:
    check_line(key, value)
    if not pattern.fullmatch(value):
        raise ConfigError(key, f"{value!r} is not {what}")
    return value


def sbatch_path(key: str, path: str, pattern: bool = False) -> str:
    """A path as one #SBATCH argument: sbatch splits on whitespace outside double quotes and takes
    a backslash as an escape; in a file *pattern* (--output) `%` starts a replacement, `%%` is one `%`."""
    check_line(key, path)
    escaped = path.replace("\\", "\\\\").replace('"', '\\"')
    if pattern:
        escaped = escaped.replace("%", "%%")
    return f'"{escaped}"'


def validate_cluster(cluster, names: Optional[dict[str, str]] = None) -> None:
    """Everything from a cluster preset (and the flags that override it) that reaches the script.
    names: field -> what to call it in the error (the flag that set it); default `cluster.FIELD`."""
    names = names or {}

    def name(field: str) -> str:
        return names.get(field, f"cluster.{field}")

    check(name("time"), str(cluster.time), TIME, "a Slurm time limit (minutes, [D-]HH:MM[:SS], D-HH, UNLIMITED)")
    for field, pattern, what in (("partition", NAME_LIST, "a partition name (or a comma-separated list)"),
                                 ("account", NAME, "an account name ([A-Za-z0-9._+-])"),
                                 ("qos", NAME, "a QOS name ([A-Za-z0-9._+-])"),
                                 ("constraint", CONSTRAINT, "a node feature expression without spaces")):
        value = getattr(cluster, field)
        if value is not None:
            check(name(field), str(value), pattern, what)
    for node in cluster.exclude:
        check(name("exclude"), str(node), HOSTLIST, "a node name or hostlist expression")
    for option in cluster.sbatch:
        check_line(name("sbatch"), str(option))
        if not str(option).startswith("-"):
            raise ConfigError(name("sbatch"), f"{option!r} is not an sbatch option (they start with -)")
    for line in cluster.setup:  # shell code by design (module load, export): one line per entry
        check_line(name("setup"), str(line))
    if cluster.python is not None:
        check_line(name("python"), cluster.python)
    for field, low in (("gpus_per_node", 1), ("signal_lead_s", 0), ("max_restarts", 0), ("max_requeues", 0),
                       ("max_resubmits", 0), ("max_failures", 0), ("port_base", 1)):
        if getattr(cluster, field) < low:
            raise ConfigError(name(field), f"must be >= {low}, got {getattr(cluster, field)}")
    if cluster.cpus_per_task is not None and cluster.cpus_per_task < 1:
        raise ConfigError(name("cpus_per_task"), f"must be >= 1, got {cluster.cpus_per_task}")


def default_job_name(run_dir_name: str) -> str:
    """dist-llama-<run directory name>, with anything outside NAME replaced: a run directory may be
    called anything, a job name may not."""
    return "dist-llama-" + (re.sub(r"[^A-Za-z0-9._+-]", "_", run_dir_name) or "run")
