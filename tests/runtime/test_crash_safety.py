"""A dispatcher that dies mid-delivery loses nothing: its unacked messages are redelivered,
also when it dies between batches of acks with several deliveries in flight."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from infra.runtime.config import PROJECT_ROOT as ROOT
from infra.runtime.launcher import settings_env
from tests.runtime.conftest import Rig, child_env, event
from tests.runtime.test_supervisor import wait_for

RUNNER = textwrap.dedent("""
    import sys
    from infra.runtime.config import DeliverySpec
    from infra.runtime.dispatcher import Dispatcher
    from shared.settings import load_settings

    queue, url, dead_letter = sys.argv[1:4]
    parallelism = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    d = Dispatcher(load_settings(), name="codes", queue_name=queue, url=url, dead_letter=dead_letter,
                   delivery=DeliverySpec(retry=0, timeout_s=30, dead_letter_sink="dead-letter"),
                   parallelism=parallelism)
    d.drain(timeout_s=120)
""")


def test_killed_dispatcher_leaves_the_message_for_redelivery(rig: Rig) -> None:
    proc_fn = rig.supervisor.process("scripted")
    proc_fn.ensure_running()
    e = event("test.codes", {"sleep_s": [3, 0]})
    rig.publish(e)
    env = {**child_env(), **settings_env(rig.settings)}
    url = rig.config.subscriber_url(rig.config.triggers["codes"])
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, rig.queue("codes"), url,
                               f"{rig.settings.broker_name}.dead-letter"], cwd=ROOT, env=env)
    try:
        wait_for(lambda: len(rig.calls(event_id=e["id"])) == 1, what="first delivery started")
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
    finally:
        if runner.poll() is None:
            runner.kill()
    # RabbitMQ returns the unacked message to the queue once the dead consumer's connection closes.
    wait_for(lambda: rig.ready(rig.queue("codes")) == 1, what="message back in the queue")
    counts = rig.dispatcher("codes").drain()
    assert counts["delivered"] == 1
    time.sleep(0.1)
    assert [c["attempt"] for c in rig.calls(event_id=e["id"])] == [1, 2]
    assert rig.ready(rig.queue("codes")) == 0


def test_killed_mid_batch_loses_nothing_and_redelivers_at_most_its_prefetch(rig: Rig) -> None:
    proc_fn = rig.supervisor.process("scripted")
    proc_fn.ensure_running()
    events = [event("test.codes", {"sleep_s": [0.3, 0], "n": i}) for i in range(24)]
    rig.publish(*events)
    ids = {e["id"] for e in events}
    env = {**child_env(), **settings_env(rig.settings)}
    url = rig.config.subscriber_url(rig.config.triggers["codes"])
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, rig.queue("codes"), url,
                               f"{rig.settings.broker_name}.dead-letter", "4"], cwd=ROOT, env=env)

    def started() -> int:
        return len({c["headers"]["ce-id"] for c in rig.calls() if c["headers"]["ce-id"] in ids})

    try:
        wait_for(lambda: started() >= 10, what="a few batches delivered")
        runner.send_signal(signal.SIGKILL)  # four deliveries in flight, acks of earlier ones batched
        runner.wait(10)
    finally:
        if runner.poll() is None:
            runner.kill()
    first_run = started()
    assert first_run < len(events)
    counts = rig.dispatcher("codes").drain()
    assert rig.ready(rig.queue("codes")) == 0
    calls = [c for c in rig.calls() if c["headers"]["ce-id"] in ids]
    per_event = {i: sum(c["headers"]["ce-id"] == i for c in calls) for i in ids}
    assert all(n >= 1 for n in per_event.values())  # nothing lost
    redelivered = [i for i, n in per_event.items() if n > 1]
    # Only what the dead dispatcher held unacked comes again: at most its prefetch (2 x 4).
    assert 1 <= len(redelivered) <= 8
    assert counts["delivered"] == len(events) - first_run + len(redelivered)
