"""`python -m jtrain.run --config file.yaml [--key value ...]`: the main job.

The entry point is the only module (with tests/conftest.py) that touches the environment.
Bad input ends with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from jtrain.errors import ConfigError, JtrainError

EXIT_USAGE = 2
# Flags that join a multi-process job (jtrain.distributed); they are not part of the run config.
DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")
DISTRIBUTED_HELP = """
multi-process (one process per host; see docs/parallelism.md):
  --coordinator_address HOST:PORT  process 0's address (or `auto`: let JAX detect the cluster)
  --num_processes N                processes in the job
  --process_id I                   this process, 0 <= I < N
  (defaults: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; SLURM and Open MPI are detected)
"""


@dataclass
class CommandLine:
    config: str | None = None
    print_config: bool = False
    help: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, str] = field(default_factory=dict)


def parse_argv(argv: Sequence[str]) -> CommandLine:
    """`--key value`, `--key=value`, and bare `--flag` (true) after an optional `--config FILE`."""
    cmd, i, argv = CommandLine(), 0, list(argv)
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            cmd.help, i = True, i + 1
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += 2 if has_value else 1
        else:
            i += 1
        if key == "config":
            cmd.config = value
        elif key == "print_config":
            cmd.print_config = value.lower() in ("1", "true", "yes")
        elif key in DISTRIBUTED_FLAGS:
            cmd.distributed[key] = value
        else:
            cmd.overrides[key] = value
    return cmd


def configure_environment(compilation_cache_dir: str | None) -> None:
    """XLA flags and caches; must run before the first JAX computation."""
    import jax

    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from jtrain.config import help_text, load_config

        cmd = parse_argv(argv)
        if cmd.help:
            print(help_text() + DISTRIBUTED_HELP)
            return 0
        if cmd.config is None and not cmd.overrides:
            raise ConfigError("no configuration: pass --config FILE (see --help)")
        cfg = load_config(cmd.config, cmd.overrides)
        if cmd.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        from jtrain.distributed import maybe_initialize

        maybe_initialize(**cmd.distributed)  # before the first JAX computation
        configure_environment(cfg.training.compilation_cache_dir)
        from jtrain.pipeline import run_job

        run_job(cfg)
        return 0
    except JtrainError as err:
        print(f"jtrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
