"""Command line: ``python -m dppo {train,plot,demo} ...`` (also installed as ``dppo``)."""

from __future__ import annotations

import sys

USAGE = """usage: dppo COMMAND [options]

commands:
  train   RL fine-tuning run (default: the bundled task on a tiny model, CPU); `dppo train --help`
  plot    PNG curves of a run directory: `dppo plot RUN_DIR`
  compare several methods on one task, seeds and budget → report dir: `dppo compare --help`
  demo    the loss library on synthetic tensors, printed as tables
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from dppo.demo import main as demo_main

        demo_main()
        return 0
    if cmd in ("train", "plot"):
        from dppo.run import cli

        return int(getattr(cli, f"{cmd}_main")(rest) or 0)
    if cmd == "compare":
        from dppo.report.compare import main as compare_main

        return int(compare_main(rest) or 0)
    print(f"dppo: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
