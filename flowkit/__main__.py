"""Command line: ``python -m flowkit demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowkit", description="flowkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, run, optimize and deploy the demo image pipeline")
    demo.add_argument("--requests", type=int, default=200, help="requests per latency measurement")
    serve = sub.add_parser("serve", help="deploy a flow and serve it over HTTP until interrupted")
    serve.add_argument("target", help="MODULE:FLOW, a flow (or a function returning one) in an importable module or .py file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--cluster", default=None, help="a dask scheduler address (default: the embedded cluster)")
    serve.add_argument("--token-env", default="FLOWKIT_TOKEN",
                       help="environment variable holding the bearer token (never pass a token on the command line)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve on a non-loopback address without a token (logged)")
    serve.add_argument("--no-optimize", action="store_true")
    serve.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for the cluster and its workers (default 60)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.requests)
    elif args.command == "serve":
        from .errors import FlowError

        try:
            return _serve(args)
        except FlowError as e:   # a wrong address, a flow that cannot travel: said in one line
            raise SystemExit(f"flowkit serve: {e}") from None
    return 0


def load_flow(target: str):
    """``module:attr`` or ``path/to/file.py:attr`` -> a Flow (calling attr if it is a function)."""
    import importlib
    import importlib.util
    import inspect
    import os

    from .flow import Flow

    module_name, _, attr = target.partition(":")
    if not attr:
        raise SystemExit(f"flowkit serve: give MODULE:FLOW, not {target!r}")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise SystemExit(f"flowkit serve: no file {module_name!r} (from {os.getcwd()})")
        spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.partition(".")[0] and e.name != module_name:
                raise   # the module is there; something it imports is not
            raise SystemExit(f"flowkit serve: no module {module_name!r} importable from {os.getcwd()}; "
                             "run from the folder that holds it, or give a path to its .py file") from None
    flows = sorted(k for k, v in vars(module).items() if isinstance(v, Flow))
    if not hasattr(module, attr):
        raise SystemExit(f"flowkit serve: {module_name} has no {attr!r}; "
                         + (f"its flows: {', '.join(flows)}" if flows else "it defines no Flow at its top level"))
    flow = getattr(module, attr)
    if not isinstance(flow, Flow) and callable(flow):
        required = [p.name for p in inspect.signature(flow).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if required:
            raise SystemExit(f"flowkit serve: {target} takes arguments ({', '.join(required)}); give a Flow, "
                             "or a function of no arguments that returns one")
        flow = flow()
    if not isinstance(flow, Flow):
        raise SystemExit(f"flowkit serve: {target} is of type {type(flow).__name__}, not a flowkit Flow"
                         + (f"; its flows: {', '.join(flows)}" if flows else ""))
    return flow


def _serve(args) -> int:
    """Refuse what cannot be served before deploying anything, then deploy and serve until a signal."""
    import os
    import signal
    import threading

    from .runtime.deployment import deploy
    from .runtime.http import bind, require_authentication

    flow = load_flow(args.target)
    token = os.environ.get(args.token_env) or None
    require_authentication(args.host, token, args.allow_unauthenticated,
                           hint=f"set ${args.token_env} to a bearer token, or pass --allow-unauthenticated")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with bind(args.host, args.port, hint="pass --port 0 for a free port") as sock, \
            deploy(flow, cluster=args.cluster, optimize=not args.no_optimize, timeout=args.timeout) as dep:
        server = dep.serve(args.host, token=token, allow_unauthenticated=args.allow_unauthenticated, sock=sock)
        print(f"serving {flow.name!r} at {server.url}/v1/flows/{flow.name}/predict", flush=True)
        stop.wait()
        print("stopping: finishing requests in flight", flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
