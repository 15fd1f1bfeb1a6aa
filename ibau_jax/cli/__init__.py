"""Command line: ``ibau-jax defend | unlearn | evaluate | sweep | attack | demo | bench | report``.

    ibau-jax defend --defense ibau --set rounds=1 --checkpoint badnets_8_02_ckpt.pth \\
        --dataset cifar10 --data-dir DIR --attack badnets --target 8 --out result.json

``parser`` holds the flags, ``commands`` what each subcommand does with them. ``main`` turns
user errors (``errors.UserError``: bad data, checkpoint, attack, configuration or flag) into
one line on stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Sequence

from ..errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    from . import commands
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    try:
        commands.validate(args)
        return commands.COMMANDS[args.command](args)
    except UserError as e:
        print(f"ibau-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
