#!/usr/bin/env python3
"""An independent Kafka consumer (confluent-kafka / librdkafka) for the demo and black-box checks.

Reads the given topics from the beginning, prints one JSON line per message (topic, partition,
offset, key, headers, value) and exits when --expect messages arrived (then lingers briefly to
catch duplicates) or --timeout seconds passed. Exit code 0 only if exactly --expect arrived and
no message id appeared twice; with --allow-duplicates, if --expect distinct ids arrived (an
at-least-once relay may repeat messages that were in flight at a crash).
"""
import argparse
import json
import sys
import time

from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topics", required=True, help="comma-separated")
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--linger", type=float, default=2)
    ap.add_argument("--allow-duplicates", action="store_true")
    args = ap.parse_args()

    c = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": "outbox-demo-consumer",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    deadline = time.time() + args.timeout
    assignment = []
    for topic in args.topics.split(","):
        while True:
            md = c.list_topics(topic, timeout=5).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                break
            if time.time() > deadline:
                print(f"topic {topic} never appeared", file=sys.stderr)
                return 1
            time.sleep(0.5)
        assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions]
    c.assign(assignment)

    seen = []
    distinct = set()
    linger_until = None
    while time.time() < deadline and (linger_until is None or time.time() < linger_until):
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            print(f"consumer error: {m.error()}", file=sys.stderr)
            continue
        headers = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
        value = m.value()
        rec = {
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "key": m.key().decode() if m.key() else None,
            "headers": headers,
            "value": json.loads(value) if value else None,
        }
        print(json.dumps(rec), flush=True)
        seen.append(headers.get("id"))
        distinct.add(headers.get("id"))
        arrived = len(distinct) if args.allow_duplicates else len(seen)
        if arrived >= args.expect and linger_until is None:
            linger_until = time.time() + args.linger
    c.close()
    dups = len(seen) - len(distinct)
    print(f"consumed={len(seen)} distinct={len(distinct)} expected={args.expect} duplicate_ids={dups}", file=sys.stderr)
    if args.allow_duplicates:
        return 0 if len(distinct) == args.expect else 1
    return 0 if len(seen) == args.expect and dups == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
