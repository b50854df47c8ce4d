"""The Ray Serve peer serves the same npm1 network: its answer equals the in-process
prediction of the same weights (skips when Ray is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import fixtures, measure
from tests.conftest import free_port


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_peer_answers_like_the_in_process_model(tmp_path):
    pytest.importorskip("ray.serve")
    from marrowscope.inference import load_predictor

    sizes = fixtures.TINY
    model_dir = fixtures.build_model_dirs(tmp_path / "models", sizes)["npm1"]
    image = fixtures.synth_images(1, sizes.image)[0]
    predictor = load_predictor(str(model_dir))
    x = predictor.prepare(image)[None]
    expected = float(predictor.predict(x)[0])
    peer = measure.PeerProcess(
        model_dir,
        free_port(),
        threads=1,
        max_batch_size=4,
        max_queue_delay_ms=2.0,
        log_path=tmp_path / "ray.log",
    )
    try:
        peer.start()
        got = measure.ray_worker(peer.url, x.tobytes())()()
        import httpx

        bad = httpx.post(peer.url, content=b"\x00" * 7, timeout=60)
    finally:
        peer.stop()
    assert np.isclose(got, expected, atol=1e-5), (got, expected)
    assert bad.status_code == 400 and "bytes" in bad.json()["error"]
