#!/usr/bin/env python3
"""Does a consumer tailing a topic slow a producer's acks on this broker?

Tansu 0.6.0's memory storage lists every stored batch of a partition on each fetch, under the lock
its produce path needs; outbox-bench therefore gives each latency level a topic of its own
(bench/src/main.rs, `offer`). This measures the effect apart from the relay: it fills TOPIC with
FILL messages sent one at a time, then sends RATE msgs/s for SECS seconds (idempotent, acks=all,
linger.ms 5, as the relay) and prints send -> ack p50/p99, first with no consumer, then with one
tailing the topic from its end (fetch.wait.max.ms 100, as the bench's).

Usage: bench/tansu-fetch-tail.py HOST:PORT TOPIC FILL RATE SECS   (needs confluent-kafka)
Seen on the 2-core machine (Tansu memory storage, FILL 100000, RATE 225, SECS 15):
p99 6.4 ms with no consumer, 78 ms with one; on a fresh topic (FILL 0) 6.4 and 11.8 ms.
"""
import sys, time, threading, statistics
from confluent_kafka import Producer, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

bs = sys.argv[1]; topic = sys.argv[2]; fill = int(sys.argv[3]); rate = float(sys.argv[4]); secs = float(sys.argv[5])
adm = AdminClient({"bootstrap.servers": bs})
try:
    adm.create_topics([NewTopic(topic, 4, 1)])[topic].result()
except Exception as e:
    print("create:", e)
time.sleep(1)
if fill:
    p = Producer({"bootstrap.servers": bs, "linger.ms": 0, "batch.num.messages": 1, "enable.idempotence": True, "acks": "all"})
    t0 = time.time()
    for i in range(fill):
        while True:
            try:
                p.produce(topic, key=f"order-{i%10000}", value=b"x"*300); break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush()
    print(f"filled {fill} in {time.time()-t0:.1f}s", flush=True)

def measure(label):
    lat = []
    p = Producer({"bootstrap.servers": bs, "linger.ms": 5, "enable.idempotence": True, "acks": "all", "batch.size": 1000000})
    def cb(err, msg, sent):
        if err is None: lat.append((time.perf_counter()-sent)*1000)
    stop = threading.Event()
    def poller():
        while not stop.is_set(): p.poll(0.0005)
    th = threading.Thread(target=poller); th.start()
    p.produce(topic, value=b"warm"); p.flush(); time.sleep(0.5); lat.clear()
    t0 = time.perf_counter(); n = 0
    while True:
        el = time.perf_counter() - t0
        if el >= secs: break
        ahead = n / rate - el
        if ahead > 0: time.sleep(ahead); continue
        s = time.perf_counter()
        p.produce(topic, key=f"order-{n%10000}", value=b"y"*300, on_delivery=lambda e, m, s=s: cb(e, m, s))
        n += 1
    p.flush(); stop.set(); th.join()
    lat.sort()
    print(f"{label}: n={len(lat)} p50={lat[len(lat)//2]:.1f} p99={lat[int(len(lat)*0.99)]:.1f} max={lat[-1]:.1f} ms", flush=True)

measure("no consumer")
c = Consumer({"bootstrap.servers": bs, "group.id": "g"+str(time.time()), "fetch.wait.max.ms": 100, "enable.auto.commit": False})
lo_hi = [c.get_watermark_offsets(TopicPartition(topic, i)) for i in range(4)]
c.assign([TopicPartition(topic, i, hi) for i, (lo, hi) in enumerate(lo_hi)])
stopc = threading.Event(); got = [0]
def consume():
    while not stopc.is_set():
        m = c.poll(0.1)
        if m is not None and m.error() is None: got[0] += 1
thc = threading.Thread(target=consume); thc.start()
time.sleep(2)
measure("consumer tailing")
stopc.set(); thc.join(); c.close()
print("consumed", got[0])
