#!/usr/bin/env python3
"""An independent AMQP 0-9-1 client for the tests (pika from PyPI), not the relay's client.

Usage:
  rabbit_read.py ping URL
      exits 0 when a connection and a channel open, 1 otherwise (the message on stderr).
  rabbit_read.py declare URL QUEUE EXCHANGE BINDING_KEY
      declares a durable topic exchange, a durable queue, and binds the queue with BINDING_KEY.
  rabbit_read.py read URL QUEUE
      prints every message of QUEUE, in queue order, one JSON object per line:
      {"routing_key", "exchange", "message_id", "type", "content_type", "delivery_mode",
       "timestamp", "headers", "body"}. Header values are converted to strings (bytes decoded
      as UTF-8, other values with str(), nested tables and arrays as JSON). The messages are
      fetched with basic.get and never acknowledged: closing the channel requeues them, so the
      queue is unchanged and a later read sees the same messages (marked redelivered).
"""
import json
import sys

import pika


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


def to_jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {k: to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def header_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(to_jsonable(v))
    if v is None:
        return ""
    return str(v)


def ping(url: str) -> int:
    try:
        conn = connect(url)
        conn.channel()
        conn.close()
        return 0
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


def declare(url: str, queue: str, exchange: str, binding_key: str) -> int:
    conn = connect(url)
    ch = conn.channel()
    ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    ch.queue_declare(queue=queue, durable=True)
    ch.queue_bind(queue=queue, exchange=exchange, routing_key=binding_key)
    conn.close()
    return 0


def read(url: str, queue: str) -> int:
    conn = connect(url)
    ch = conn.channel()
    out = sys.stdout
    while True:
        method, props, body = ch.basic_get(queue=queue, auto_ack=False)
        if method is None:
            break
        ts = props.timestamp
        out.write(json.dumps({
            "routing_key": method.routing_key,
            "exchange": method.exchange,
            "message_id": props.message_id,
            "type": props.type,
            "content_type": props.content_type,
            "delivery_mode": props.delivery_mode,
            "timestamp": int(ts) if ts is not None else None,
            "headers": {k: header_str(v) for k, v in (props.headers or {}).items()},
            "body": body.decode("utf-8", "replace"),
        }) + "\n")
    out.flush()
    # Unacknowledged: closing requeues every message, in its original order.
    conn.close()
    return 0


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "ping":
        return ping(argv[1])
    if len(argv) == 5 and argv[0] == "declare":
        return declare(*argv[1:])
    if len(argv) == 3 and argv[0] == "read":
        return read(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
