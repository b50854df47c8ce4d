"""The doorbell: a new analysis is picked up at once, not after the job loops' poll."""

from __future__ import annotations

import asyncio
import threading

from tests.gateway.conftest import files, meta, png, wait_status


def test_a_new_analysis_is_claimed_without_waiting_for_the_poll(gateway):
    # an hour between polls: only the doorbell can start these analyses within the deadline
    client, _, keys = gateway(poll_interval_s="3600", workers="2")
    with client:
        ids = []
        for k in range(3):  # 3 cases on 2 slots: the third waits for a freed slot's ring
            r = client.post(
                "/v1/analyses",
                files=files(png(seed=k), metadata=meta(accession_id=f"ACC-{k}")),
                headers=keys["lis"],
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        for aid in ids:
            assert wait_status(client.get, aid, keys["lis"], timeout=120)["status"] == "succeeded"


def test_ring_from_another_thread_wakes_a_waiter_and_clear_forgets_old_rings():
    from services.gateway.doorbell import Doorbell

    async def scenario() -> list[str]:
        bell, stop, seen = Doorbell(), asyncio.Event(), []
        bell.ring()  # before bind: a no-op, never an error
        bell.bind()
        bell.ring()
        await asyncio.sleep(0)  # the ring lands through call_soon_threadsafe
        bell.clear()  # looking for work now: the earlier ring must not end the next wait
        waiter = asyncio.create_task(bell.wait(stop, timeout_s=3600))
        await asyncio.sleep(0.05)
        seen.append("waiting" if not waiter.done() else "woke early")
        threading.Thread(target=bell.ring).start()
        await asyncio.wait_for(waiter, timeout=60)
        seen.append("woke")
        stopped = asyncio.create_task(bell.wait(stop, timeout_s=3600))
        stop.set()
        await asyncio.wait_for(stopped, timeout=60)
        seen.append("stopped")
        return seen

    assert asyncio.run(scenario()) == ["waiting", "woke", "stopped"]
