"""The host's QGA client (providers/qga.py) on the wire, over a real socket pair.

The peer is a few lines that answer like qemu-guest-agent's channel does (what a dead
former client left unread, then the 0xFF delimiter, then JSON objects with no separator
between them), split into arbitrary chunks: it is not a mock of the agent's behaviour
(that runs in the VM tier, tests/vm/test_vm_qga.py), only of the bytes on the channel.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiesce.providers.qga import AgentError, AgentTimeout, GuestAgent


def _peer(sock: socket.socket, replies: list[bytes], chunks: list[int]) -> threading.Thread:
    """Read requests; after the first (the sync), send ``replies`` cut at ``chunks``."""

    def run() -> None:
        data = b""
        while b"guest-sync-delimited" not in data:
            data += sock.recv(4096)
        ident = json.loads(data[data.index(b"{") :])["arguments"]["id"]
        stream = b"".join(r.replace(b"ID", str(ident).encode()) for r in replies)
        pos = 0
        for n in [*chunks, len(stream)]:
            if pos >= len(stream):
                break
            sock.sendall(stream[pos : pos + max(1, n)])
            pos += max(1, n)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _agent(sock: socket.socket, timeout: float = 2) -> GuestAgent:
    a = GuestAgent("(socketpair)", timeout=timeout)
    a.sock = sock
    return a


@settings(max_examples=40, deadline=None)
@given(
    stale=st.lists(
        st.sampled_from([b'{"return": {}}', b'{"return": 2}', b"\xff", b"garbage{", b"\n"]),
        max_size=5,
    ),
    chunks=st.lists(st.integers(1, 40), max_size=30),
)
def test_sync_drops_stale_bytes_and_calls_read_split_objects(stale, chunks):
    """Whatever a former client left on the channel, and however the answers are cut,
    the sync finds its own id and the next call reads its own answer."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        replies = [*stale, b'\xff{"return": ID}', b'{"return": 2}']
        t = _peer(theirs, replies, chunks)
        a = _agent(ours)
        a.sync()
        a._send({"execute": "guest-fsfreeze-freeze"})
        assert a._read_object(10**9, "x") == {"return": 2}
        t.join(5)


def test_an_error_answer_is_an_agent_error_with_its_description():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        desc = b'"fsfreeze hook has failed with status 11"'
        err = b'{"error": {"class": "GenericError", "desc": ' + desc + b"}}"
        _peer(theirs, [b'\xff{"return": ID}', err], [])
        a = _agent(ours)
        a.sync()
        with pytest.raises(AgentError, match="status 11"):
            a.call("guest-fsfreeze-freeze")


def test_a_silent_agent_is_a_timeout_not_a_hang():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        a = _agent(ours, timeout=0.3)
        with pytest.raises(AgentTimeout, match="did not answer guest-sync-delimited"):
            a.sync()


def test_a_missing_socket_is_a_clear_error(tmp_path):
    with pytest.raises(AgentError, match="cannot connect to the guest agent"):
        GuestAgent(str(tmp_path / "nope.sock"), timeout=1).connect()
