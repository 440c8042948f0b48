"""`python -m pipelines <command>`: run a flow now, serve the deployments, or deploy them to a server.

    python -m pipelines retrain   [--workspace .] [--lock-timeout S]
    python -m pipelines reproduce [--workspace .] [--lock-timeout S] [--target STAGE]
    python -m pipelines serve     [--workspace .]
    python -m pipelines deploy    --pool NAME [--workspace .]

Run it from the project root (the folder holding pipelines/). This only parses arguments and calls
the flows or deployments; the exit status is 1 when the flow run failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cnnops.errors import CnnopsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in (("retrain", "retrain if the data changed"), ("reproduce", "run the DVC pipeline")):
        run = commands.add_parser(name, help=help_)
        run.add_argument("--workspace", type=Path, default=Path("."), help="DVC project folder (default: .)")
        run.add_argument(
            "--lock-timeout", type=float, default=None, help="seconds to wait for a busy workspace"
        )
        if name == "reproduce":
            run.add_argument("--target", help="run only this stage and the stages it depends on")
    serve = commands.add_parser(
        "serve", help="serve retrain (on its schedule) and reproduce from this process"
    )
    serve.add_argument("--workspace", type=Path, default=Path("."))
    deploy = commands.add_parser("deploy", help="register the deployments for a process work pool")
    deploy.add_argument("--workspace", type=Path, default=Path("."))
    deploy.add_argument("--pool", required=True, help="process work pool name (`prefect work-pool create`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from pipelines.deploy import serve

            serve(args.workspace)
            return 0
        if args.command == "deploy":
            from pipelines.deploy import deploy

            for deployment_id in deploy(args.workspace, args.pool):
                print(f"deployment {deployment_id} registered for work pool {args.pool!r}")
            return 0
        from pipelines import flows

        options = {"workspace": str(args.workspace), "lock_timeout": args.lock_timeout}
        if args.command == "reproduce":
            state = flows.reproduce(target=args.target, **options, return_state=True)
        else:
            state = flows.retrain(**options, return_state=True)
    except CnnopsError as exc:
        print(f"pipelines {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if not state.is_completed():
        print(f"pipelines {args.command}: {state.name}: {state.message}", file=sys.stderr)
        return 1
    print(state.result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
