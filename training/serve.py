"""Serve the promoted models: the five model services, the gateway and the HL7 order
listener, until Ctrl-C.

    make serve                                   # after `make demo`: its models and settings
    python -m training.serve --workdir DIR --port 8080   # DIR of `make real`: the real set
    python -m training.serve --tracking-uri http://mlflow:5000 --workdir DIR   # another registry

It starts the stack the way `make demo` does (`services.stack.LocalStack`, one process per
service, models resolved from the registry alias), with the settings the demo wrote to
`WORKDIR/stack.json` when there are any, prints the gateway's URL, the OpenAPI page, every
service's gRPC and metrics address, the HL7 listener's MLLP address (orders' images in
`WORKDIR/hl7-inputs/<accession>/`; slide orders from the demo's slide store), a LIS API key
(the demo's, kept next to the gateway's database, or a new one) and the review app's URL
with a reviewer login, then waits.
Ctrl-C (SIGINT) or SIGTERM stops every process cleanly: SIGTERM to each (gateway first,
so nothing new is accepted), SIGKILL after the grace period.
A process that dies on its own ends the command with exit code 1 and its last log lines.

Before starting anything it checks that every served model kind has a version under the
alias, and stops with exit code 2 and the command to run when one has none.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from marrowscope.paths import PROJECT_ROOT

EXIT_USAGE = 2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=PROJECT_ROOT / ".demo",
        help="the demo's work directory: its MLflow store, stack.json and the service logs",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: the one in WORKDIR/stack.json, else "
        "sqlite:///WORKDIR/mlflow.db)",
    )
    p.add_argument("--alias", default="champion", help="registry alias the services follow")
    p.add_argument("--port", type=int, default=8080, help="the gateway's HTTP port")
    p.add_argument(
        "--hl7-port",
        type=int,
        default=2575,
        help="the HL7 listener's MLLP port (0: any free port)",
    )
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds to wait for each process"
    )
    return p


def say(message: str) -> None:
    print(f"[serve] {message}", flush=True)


def stack_settings(workdir: Path, tracking_uri: str | None) -> tuple[str, dict[str, str]]:
    """(tracking URI, stack environment) from the demo's `stack.json`, the flag winning."""
    from training.demo import STACK_SETTINGS

    path = workdir / STACK_SETTINGS
    saved = json.loads(path.read_text()) if path.is_file() else {}
    uri = tracking_uri or saved.get("tracking_uri") or f"sqlite:///{workdir / 'mlflow.db'}"
    env = {str(k): str(v) for k, v in saved.get("env", {}).items()}
    env.setdefault("MS_GATEWAY_DATA_DIR", str(workdir / "gateway"))
    return uri, env


HL7_INPUTS = "hl7-inputs"
"""The listener's input store in the work directory: `<accession>/` folders of images."""


def hl7_settings(workdir: Path, env: dict[str, str], port: int) -> dict[str, str]:
    """The listener's `MS_HL7_*`: its port, the work directory's input store and the first
    slide store of the stack's `MS_GATEWAY_SLIDE_ROOTS` (the demo's)."""
    inputs = workdir / HL7_INPUTS
    inputs.mkdir(parents=True, exist_ok=True)
    out = {"MS_HL7_INPUT_ROOT": str(inputs)}
    if port:
        out["MS_HL7_PORT"] = str(port)
    slide_stores = json.loads(env.get("MS_GATEWAY_SLIDE_ROOTS") or "{}")
    if slide_stores:
        out["MS_HL7_SLIDE_STORE"] = next(iter(slide_stores))
    return out


def missing_models(tracking_uri: str, alias: str) -> list[str]:
    """Served model kinds without a version under `alias` (empty: all there)."""
    from mlflow.exceptions import MlflowException

    from marrowscope.registry import get_client
    from marrowscope.stages import PIPELINE_MODELS

    client = get_client(tracking_uri)
    missing = []
    for stage in PIPELINE_MODELS:  # explain serves npm1's model: checked with npm1
        try:
            client.get_model_version_by_alias(stage.registered_name, alias)
        except MlflowException:
            missing.append(stage.value)
    return missing


def main(args: argparse.Namespace) -> int:
    import httpx

    from services.stack import LocalStack, StackError
    from training.demo import (
        DEMO_KEY_NAME,
        DEMO_REVIEWER,
        ensure_key,
        ensure_reviewer,
        gateway_accepts,
        review_login_line,
    )

    workdir = args.workdir.resolve()
    tracking_uri, env = stack_settings(workdir, args.tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        say(
            f"no model registry at {tracking_uri}: run `make demo` (or `make real` for the "
            "real-data set) first, or pass --tracking-uri"
        )
        return EXIT_USAGE
    missing = missing_models(tracking_uri, args.alias)
    if missing:
        say(
            f"no '{args.alias}' version of {', '.join(missing)} in {tracking_uri}: "
            "run `make demo` or `make real` (or train and promote them) first"
        )
        return EXIT_USAGE

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        say(f"{signal.Signals(signum).name}: stopping every process")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = LocalStack(
        workdir=workdir / "stack",
        tracking_uri=tracking_uri,
        alias=args.alias,
        env=env,
        gateway_port=args.port,
        hl7_env=hl7_settings(workdir, env, args.hl7_port),
    )
    say(f"starting the model services, the gateway and the HL7 listener (logs in {stack.workdir})")
    try:
        stack.start(timeout_s=args.start_timeout)
    except StackError as exc:
        stack.stop()
        say(f"could not start: {exc}")
        return 1
    try:
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            key = ensure_key(
                stack.gateway_env(),
                Path(env["MS_GATEWAY_DATA_DIR"]) / f"{DEMO_KEY_NAME}.key",
                lambda k: gateway_accepts(http, k),
            )
        password = ensure_reviewer(
            stack.gateway_env(),
            Path(env["MS_GATEWAY_DATA_DIR"]) / f"{DEMO_REVIEWER}.password",
        )
        for line in [*ready_lines(stack, key), review_login_line(stack.gateway_url, password)]:
            print(line, flush=True)
        say("ready; Ctrl-C stops every process")
        while not stop.wait(1.0):
            dead = [p for p in stack.procs.values() if p.popen.poll() is not None]
            if dead:
                for proc in dead:
                    say(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
                return 1
        return 0
    finally:
        stack.stop()
        say("every process stopped")


def ready_lines(stack: object, key: str) -> list[str]:
    """What a person needs to use the running stack: URLs, addresses, the LIS key."""
    from services.stack import LocalStack

    assert isinstance(stack, LocalStack)
    lines = [
        f"gateway     {stack.gateway_url}   (OpenAPI: {stack.gateway_url}/docs)",
        f"LIS API key {key}   (header X-API-Key; scopes submit,read)",
    ]
    for name, proc in stack.procs.items():
        if proc.service:
            lines.append(
                f"{name:<11} grpc 127.0.0.1:{proc.ports['grpc']}   "
                f"metrics http://127.0.0.1:{proc.ports['metrics']}/metrics"
            )
    hl7 = stack.procs.get("hl7")
    if hl7 is not None:
        inputs = (stack.hl7_env or {}).get("MS_HL7_INPUT_ROOT", "")
        lines.append(
            f"hl7 (MLLP)  127.0.0.1:{hl7.ports['mllp']}   OML^O33 / ORM^O01 orders "
            f"(docs/HL7.md); their images in {inputs}/<accession>/"
        )
    lines.append(f"pids        {' '.join(str(p.popen.pid) for p in stack.procs.values())}")
    return lines


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
