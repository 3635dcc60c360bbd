"""``tinyserve-eval``: lm-eval's own CLI with the ``tinyserve`` model registered and the project's tasks
on the task path, plus ``tinyserve-eval compare`` (a dense-vs-sparse budget sweep).

    tinyserve-eval --model_args pretrained=PATH,token_budget=1024 --tasks tinyserve_passkey_8k
    tinyserve-eval run|ls|validate ...            # lm-eval's subcommands, same arguments
    accelerate launch -m tinyserve_patch.eval --model_args pretrained=PATH --tasks ...   # data-parallel
    tinyserve-eval compare --model_args pretrained=PATH --tasks T1,T2 --budgets dense,512,1024,2048

Differences from ``lm_eval``: ``--model`` defaults to ``tinyserve``; the folder
``tinyserve_patch/eval/tasks`` is always searched for tasks (a user ``--include_path`` is added to it).
"""

from __future__ import annotations

import sys
from typing import Sequence

SUBCOMMANDS = ("run", "ls", "validate")


def _with_tasks_dir(include_path):
    from . import TASKS_DIR

    paths = [str(TASKS_DIR)]
    if include_path:
        paths += [p for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path]) if p]
    return paths


def run_lm_eval(argv: Sequence[str]) -> None:
    """Hand ``argv`` (lm-eval's CLI arguments) to lm-eval's own CLI, tinyserve registered."""
    import lm_eval._cli.harness as harness
    from lm_eval.utils import setup_logging

    import tinyserve_patch.eval  # noqa: F401  (registers --model tinyserve)

    setup_logging()
    cli = harness.HarnessCLI()
    argv = list(argv)
    choices = cli._subparsers.choices
    # lm-eval's own legacy rule: arguments without a subcommand mean ``run``
    if len(argv) > 1 and argv[0] not in choices:
        argv.insert(0, "run")
    elif argv == ["run"]:
        choices["run"].print_help()
        return
    args = cli._parser.parse_args(argv)
    if getattr(args, "command", None) in SUBCOMMANDS:
        args.include_path = _with_tasks_dir(getattr(args, "include_path", None))
    if getattr(args, "command", None) == "run" and not getattr(args, "model", None):
        args.model = "tinyserve"
    cli.execute(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``tinyserve-eval`` (also ``python -m tinyserve_patch.eval``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print()
    run_lm_eval(argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
