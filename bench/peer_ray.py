"""The npm1 network served by Ray Serve, the peer our OIP runtime is compared with.

    python -m bench.peer_ray --model-dir DIR --port P --max-batch-size 8 --max-queue-delay-ms 5

Starts a local Ray instance, deploys one replica that loads the same safetensors weights
with `marrowscope.models.load_model` and runs `Npm1Predictor.predict` (the function our
service runs), batched by `@serve.batch(max_batch_size, batch_wait_timeout_s)` with the
values of our `MAX_BATCH_SIZE` / `MAX_QUEUE_DELAY_MS`; the forward pass runs in a worker
thread (as in our runtime) so the next batch can form meanwhile. Ingress: Ray Serve HTTP,
`POST /npm1` with the raw bytes of one uint8[1, H, W, 3] image (H, W = the model's input
size) as the body; answers `{"p_npm1": float}`. Prints `READY <port>` when it answers, then
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any

from marrowscope.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    return p


def build_app(model_dir: str, threads: int, max_batch_size: int, max_queue_delay_ms: float):
    import numpy as np
    from ray import serve

    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class Npm1Peer:
        def __init__(self) -> None:
            import torch

            from marrowscope.inference import Npm1Predictor
            from marrowscope.models import load_model

            torch.set_num_threads(threads)
            self.predictor = Npm1Predictor(load_model(model_dir))
            self.shape = (1, *self.predictor.input_size, 3)

        @serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_ms / 1000.0
        )
        async def infer(self, images: list[np.ndarray]) -> list[float]:
            batch = np.concatenate(images, axis=0)
            probs = await asyncio.to_thread(self.predictor.predict, batch)
            return [float(v) for v in probs]

        async def __call__(self, request) -> Any:  # a dict, or a JSONResponse for bad input
            body = await request.body()
            expected = int(np.prod(self.shape))
            if len(body) != expected:
                from starlette.responses import JSONResponse

                return JSONResponse(
                    {"error": f"body must be {expected} bytes (uint8{list(self.shape)})"},
                    status_code=400,
                )
            image = np.frombuffer(body, np.uint8).reshape(self.shape)
            return {"p_npm1": await self.infer(image)}

    return Npm1Peer.bind()  # type: ignore[attr-defined]  # added by @serve.deployment


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray
    from ray import serve

    env = {"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": str(args.threads)}
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 2**20,
        runtime_env={"env_vars": env},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(
        build_app(args.model_dir, args.threads, args.max_batch_size, args.max_queue_delay_ms),
        route_prefix="/npm1",
        blocking=False,
    )
    print(f"READY {args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
