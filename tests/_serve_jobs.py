"""Job entrypoints for the multi-node Serve tests (run by `ray job submit` on a test cluster):
``deploy`` puts a production app named ``sd2`` at ``/`` on a given port, as
``serve deploy clusters/serve-config.yaml`` would; ``smoke`` runs the pipeline's closing smoke
check and prints its result as JSON on a line starting with ``RESULT``."""

from __future__ import annotations

import argparse
import json
import socket
import sys

RESULT = "sd2-smoke-result: "


def _config(args, **extra):
    from sd2_ray.serve.config import ServeConfig

    return ServeConfig(
        target=args.target,
        drafter=args.drafter,
        num_cpus_per_replica=0.5,
        max_batch_size=2,
        model_name=args.model_name,
        **extra,
    )


def deploy(args) -> None:
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.app import build_app

    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(_config(args)), name="sd2", route_prefix="/")


def smoke(args) -> None:
    import ray

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.smoke import serve_smoke

    ensure_ray()
    node = ray.get_runtime_context().get_node_id()
    result = serve_smoke(_config(args), args.prompts, timeout_s=args.timeout)
    print(
        RESULT + json.dumps({**result, "driver_node": node, "driver_host": socket.gethostname()}, default=str),
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["deploy", "smoke"])
    p.add_argument("--target", required=True)
    p.add_argument("--drafter", required=True)
    p.add_argument("--model-name", default="target")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prompts")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    {"deploy": deploy, "smoke": smoke}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
