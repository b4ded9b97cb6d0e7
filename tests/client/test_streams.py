"""The client's RPC streams: a late reply gets one probe, notices are set aside."""

from __future__ import annotations

import asyncio


async def test_a_late_reply_makes_the_client_probe_the_stream_once(monkeypatch):
    """A pushed step's reply that is late gets one `Expect` written on the stream (a write to a dead
    server fails at once); a reply in time gets none."""
    import client.streams
    from client.streams import RequestStream

    monkeypatch.setattr(client.streams, "NUDGE_AFTER", 0.2)
    replies: asyncio.Queue = asyncio.Queue()

    async def from_server():
        while True:
            yield await replies.get()

    stream = RequestStream()
    stream.attach(from_server())
    probes = []
    replies.put_nowait("on time")
    assert await stream.receive(30, nudge=lambda: probes.append("probe")) == "on time"
    asyncio.get_running_loop().call_later(1.0, replies.put_nowait, "late")
    assert await stream.receive(30, nudge=lambda: probes.append("probe")) == "late"
    await asyncio.sleep(0.5)  # no probe is left pending after the reply
    assert probes == ["probe"]


async def test_notices_are_set_aside_and_the_end_of_a_stream_stays_its_end():
    """Replies the server sends unasked go to `notices`, never to the next `receive`; an error that ends
    the stream is raised by every later `receive`."""
    import pytest

    from client.streams import RequestStream

    async def from_server():
        yield "reply 1"
        yield "notice"
        yield "reply 2"
        raise ConnectionResetError("gone")

    stream = RequestStream(is_notice=lambda reply: reply == "notice")
    stream.attach(from_server())
    assert [await stream.receive(30), await stream.receive(30)] == ["reply 1", "reply 2"]
    assert stream.notices.get_nowait() == "notice"
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            await stream.receive(30)
    await stream.close()
