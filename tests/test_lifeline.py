"""Nothing outlives its starter: the service's export worker, the integration job's ranks,
the broker behind ``eclm broker run`` and a child started from a thread all end within 2 s
of a SIGKILL of the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from cloudproc import Cloud, wait

from broker.launcher import free_port
from device_profiles import load_profile
from edge_runtime.agent import AgentConfig, EdgeAgent

GONE_WITHIN = 2.0


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def spawned(pid: int) -> list[psutil.Process]:
    """The multiprocessing children of ``pid``, less its resource tracker."""
    return [p for p in descendants(pid) if "multiprocessing.spawn" in " ".join(p.cmdline())]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def assert_gone_after_kill(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    assert children, "nothing was started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=GONE_WITHIN)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def python(tmp_path, code: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE)


@pytest.mark.slow
def test_a_sigkilled_service_leaves_no_export_worker(tmp_path, modular, mosquitto):
    # An empty store: the device's sub-model must be exported, which takes seconds.
    model = {"model_dir": modular["model_dir"], "store": tmp_path / "empty-store"}
    cloud = Cloud(tmp_path / "cloud", model, mosquitto.url)
    cloud.start()
    workers = wait(lambda: descendants(cloud.proc.pid), 30, "the warm export worker")
    wait(lambda: psutil.Process(workers[0].pid).cpu_percent(0.5) < 5, 60, "the worker to idle")
    idle = cpu_seconds(workers)
    config = AgentConfig(
        "dev-export",
        load_profile("rpi4"),
        mosquitto_address(mosquitto),
        tmp_path / "dev",
        backend="litert",
        trust_key=cloud.public,
    )
    device = EdgeAgent(config).start()
    try:
        wait(lambda: cpu_seconds(workers) > idle + 0.5, 60, "the export to run")
        assert_gone_after_kill(cloud.proc, descendants(cloud.proc.pid))
    finally:
        device.stop()
        cloud.stop()


def mosquitto_address(mosquitto):
    from eclm_wire.mqtt import BrokerAddress

    return BrokerAddress.parse(mosquitto.url)


@pytest.mark.slow
def test_a_sigkilled_integration_job_leaves_no_rank(tmp_path, modular):
    code = """
        import sys
        from pathlib import Path

        from cloud_trainer.model.data import load_digits_split
        from cloud_trainer.federation.distributed import run_integration
        from cloud_trainer.model.checkpoint import load_model

        if __name__ == "__main__":
            split = load_digits_split(seed=0)
            net = load_model(Path(sys.argv[1]))
            data = (split.x_train, split.y_train)
            run_integration(net, {}, data, epochs=10**7, world_size=2)
        """
    starter = python(tmp_path, code, str(modular["model_dir"]))
    ranks = wait(lambda: len(spawned(starter.pid)) == 2 and spawned(starter.pid), 60, "two ranks")
    # Each rank is past importing torch and watching its parent once it trains.
    wait(lambda: all(cpu_seconds([r]) > 4.0 for r in ranks), 180, "both ranks to train")
    assert_gone_after_kill(starter, descendants(starter.pid))


def test_a_sigkilled_broker_launcher_leaves_no_broker(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "eclm", "broker", "run", "--kind", "mosquitto"]
    launcher = subprocess.Popen([*cmd, "--port", str(port), "--data-dir", str(tmp_path)])
    broker = wait(lambda: descendants(launcher.pid), 30, "mosquitto to start")
    wait(lambda: _listening(port), 30, "mosquitto to listen")
    assert_gone_after_kill(launcher, broker)


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_a_child_started_from_a_thread_outlives_the_thread_not_the_process(tmp_path):
    code = """
        import sys, threading, time
        from eclm_common.lifeline import popen

        CHILD = "from eclm_common.lifeline import watch_from_env; watch_from_env(); " \\
            "import time; time.sleep(120)"

        def start():
            print(popen([sys.executable, "-c", CHILD]).pid, flush=True)

        thread = threading.Thread(target=start)
        thread.start()
        thread.join()  # the thread that started the child is gone; the process is not
        time.sleep(120)
        """
    starter = python(tmp_path, code)
    child = psutil.Process(int(starter.stdout.readline()))
    time.sleep(1.0)  # a parent-death signal tied to the thread would have fired by now

    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    assert_gone_after_kill(starter, [child])


@pytest.mark.slow
def test_an_export_worker_that_dies_is_replaced_and_its_job_retried(tmp_path, modular):
    from cloud_trainer.export.pool import Exporter

    before = {p.pid for p in descendants(os.getpid())}
    exporter = Exporter(modular["model_dir"], modular["store"])
    try:
        new = wait(
            lambda: [p for p in descendants(os.getpid()) if p.pid not in before],
            30,
            "the warm export worker",
        )
        worker = next(p for p in new if "multiprocessing.spawn" in " ".join(p.cmdline()))
        worker.kill()
        worker.wait(10)

        target = exporter.plan("rpi4", None)

        assert target.profile == "rpi4" and target.artifacts
    finally:
        exporter.close()
