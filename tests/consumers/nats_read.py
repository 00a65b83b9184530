#!/usr/bin/env python3
"""Prints every message of a JetStream stream, in stream order, one JSON object per line:
{"seq", "subject", "headers", "data"}. An independent consumer for the tests (nats-py), not the
relay's client. Usage: nats_read.py NATS_URL STREAM"""
import asyncio
import json
import sys

import nats


async def main(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0:
        await nc.close()
        return
    sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
    out = sys.stdout
    while True:
        msg = await sub.next_msg(timeout=30)
        seq = msg.metadata.sequence.stream
        out.write(json.dumps({
            "seq": seq,
            "subject": msg.subject,
            "headers": dict(msg.headers or {}),
            "data": msg.data.decode("utf-8", "replace"),
        }) + "\n")
        if seq >= last:
            break
    await sub.unsubscribe()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
