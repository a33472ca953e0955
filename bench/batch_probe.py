"""Probe for narrowing the durability gap: how many job-sized messages per
second one nats-server with `sync_interval: always` stores (a) published one
by one, each awaiting its acknowledgement (what the ingress does, with
`--concurrency` requests in flight), and (b) in JetStream atomic batches of
`--batch` messages, one acknowledgement (and one commit) per batch — which
keeps the guarantee (nothing is acknowledged before it is on disk) while
paying the sync once per batch.

    python bench/batch_probe.py NATS_URL [--seconds 5] [--concurrency 64] [--batch 32]
"""

import asyncio
import json
import sys
import time
import uuid

import nats

PAYLOAD = b'{"model":"bench","messages":[{"role":"user","content":"' + b"x" * 200 + b'"}]}'


def arg(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


async def main():
    url = sys.argv[1]
    seconds, concurrency, batch = arg("--seconds", 5), arg("--concurrency", 64), arg("--batch", 32)
    nc = await nats.connect(url)
    js = nc.jetstream()
    config = {"name": "PROBE", "subjects": ["probe.>"], "storage": "file", "num_replicas": 1,
              "allow_atomic": True, "duplicate_window": 120_000_000_000}
    reply = await nc.request("$JS.API.STREAM.CREATE.PROBE", json.dumps(config).encode(), timeout=5)
    created = json.loads(reply.data)
    if "error" in created:
        raise SystemExit(f"cannot create the probe stream: {created['error']}")

    async def one_by_one(lane, until, counts):
        i = 0
        while time.monotonic() < until:
            await js.publish(f"probe.single.{lane}", PAYLOAD, headers={"Nats-Msg-Id": f"s-{lane}-{i}"})
            counts[0] += 1
            i += 1

    async def batches(lane, until, counts):
        while time.monotonic() < until:
            bid = uuid.uuid4().hex
            for seq in range(1, batch):
                await nc.publish(f"probe.batch.{lane}", PAYLOAD, headers={
                    "Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(seq), "Nats-Msg-Id": f"{bid}-{seq}"})
            ack = await nc.request(f"probe.batch.{lane}", PAYLOAD, timeout=10, headers={
                "Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(batch), "Nats-Batch-Commit": "1",
                "Nats-Msg-Id": f"{bid}-{batch}"})
            answer = json.loads(ack.data)
            if "error" in answer:
                raise SystemExit(f"batch refused: {answer['error']}")
            counts[0] += batch

    for name, run, lanes in (("one_by_one", one_by_one, concurrency), ("atomic_batches", batches, max(1, concurrency // batch))):
        counts = [0]
        until = time.monotonic() + seconds
        await asyncio.gather(*(run(lane, until, counts) for lane in range(lanes)))
        print(f"probe {name} concurrency={lanes} batch={batch if run is batches else 1} stored_per_s={counts[0] / seconds:.0f}")
    await nc.close()


asyncio.run(main())
