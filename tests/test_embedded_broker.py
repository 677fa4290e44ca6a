"""The embedded broker (data_dir/broker): a client killed mid-write leaves no half message, and a message
that cannot be decoded is set aside with a log line while the consumer goes on."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import write_config
from kombu import Exchange, Queue

from pacsworker.config import load_settings
from pacsworker.tasks.app import configure

QUEUE = "model.broker-test"
PUBLISH_HUGE = """
import signal, sys
if sys.argv[3] == "killed":  # at the file size limit (Python ignores the signal, and the write fails, by default)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
from pacsworker.config import load_settings
from pacsworker.tasks.app import configure
app = configure(load_settings(sys.argv[1]))
with app.connection_for_write() as connection:
    print("publishing", flush=True)
    connection.Producer(connection.default_channel).publish(
        {"blob": "x" * (8 << 20)}, exchange="", routing_key=sys.argv[2], serializer="json")
"""


def test_a_publisher_killed_mid_message_leaves_nothing_and_a_damaged_message_is_set_aside(tmp_path, caplog):
    config = write_config(tmp_path / "pacsworker.yaml", storage={"data_dir": str(tmp_path / "data")})
    app = configure(load_settings(config))
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)(channel)
        queue.declare()
        folder = Path(channel.data_folder_in)

        # a publisher killed while it writes an 8 MB message (by the kernel, at its 1 MB file size limit): the
        # queue never shows a part of it
        def file_size_limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

        def publish(how: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", PUBLISH_HUGE, str(config), QUEUE, how], timeout=120,
                                  preexec_fn=file_size_limit, capture_output=True, text=True)

        # a write that fails (as on a full disk): the publisher is told, and nothing is left behind
        failed = publish("refused")
        assert failed.returncode == 1 and "File too large" in failed.stderr and "cannot add message" in failed.stderr
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == []

        publisher = publish("killed")
        assert publisher.returncode == -signal.SIGXFSZ, publisher.stderr
        assert publisher.stdout == "publishing\n"
        [partial] = [p for p in folder.iterdir() if p.name.endswith(".partial")]
        assert partial.stat().st_size == 1 << 20
        assert not [p for p in folder.iterdir() if p.name.endswith(".msg")]
        assert queue.get() is None

        # a message written by a client that rewrote files in place and was cut short
        (folder / f"0_0.{QUEUE}.msg").write_bytes(b'{"body": "eyJh')
        connection.Producer(channel).publish({"job": "after"}, exchange=QUEUE, routing_key=QUEUE)
        with caplog.at_level(logging.WARNING, logger="pacsworker.broker"):
            message = queue.get()
        assert message is not None and message.payload == {"job": "after"}
        assert (folder / "undecodable" / f"0_0.{QUEUE}.msg").read_bytes() == b'{"body": "eyJh'
        assert f"0_0.{QUEUE}.msg (14 bytes) cannot be decoded" in caplog.text
        assert queue.get() is None
        assert not [name for name in os.listdir(folder) if name.endswith(".msg")]
