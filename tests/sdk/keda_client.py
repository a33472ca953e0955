"""A client of Sluice's external scaler that calls it the way KEDA does,
on gRPC's own C core (KEDA's client is grpc-go; both move a call that never
left the client to a new connection after the server's GOAWAY, without
failing it): GetMetrics every 20 ms with a 5 s deadline, and one
StreamIsActive stream, opened again whenever it ends (KEDA reopens it).

Usage: keda_client.py HOST:PORT POOL. Prints `keda ready` after the first
answered call, runs until its standard input closes, then prints one line of
figures and one `keda error:` line per failed call.

The messages are encoded by hand (three string fields and a map): the
scaler's protocol is KEDA's externalscaler.proto.
"""

import collections
import sys
import threading
import time

import grpc

SERVICE = "/externalscaler.ExternalScaler/"


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def scaled_object(pool):
    entry = field(1, "pool") + field(2, pool)
    return field(1, "sluice-worker") + field(2, "sluice") + field(3, entry)


def main():
    target, pool = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    raw = lambda b: b
    get_metrics = channel.unary_unary(SERVICE + "GetMetrics", request_serializer=raw, response_deserializer=raw)
    stream_is_active = channel.unary_stream(
        SERVICE + "StreamIsActive", request_serializer=raw, response_deserializer=raw
    )
    obj = scaled_object(pool)
    request = field(1, obj) + field(2, "")
    stop = threading.Event()
    figures = {"calls": 0, "errors": 0, "stream_opens": 0, "stream_messages": 0}
    errors, stream_ends = [], []
    ready = threading.Event()
    current = {"call": None}

    def poll():
        while not stop.is_set():
            try:
                get_metrics(request, timeout=5)
                figures["calls"] += 1
                if not ready.is_set():
                    ready.set()
                    print("keda ready", flush=True)
            except grpc.RpcError as e:
                figures["errors"] += 1
                errors.append(f"{e.code().name} {e.details()}")
            time.sleep(0.02)

    def watch():
        while not stop.is_set():
            call = stream_is_active(obj)
            current["call"] = call
            if stop.is_set():
                call.cancel()
            figures["stream_opens"] += 1
            try:
                for _ in call:
                    figures["stream_messages"] += 1
                stream_ends.append("OK")
            except grpc.RpcError as e:
                if not stop.is_set():
                    stream_ends.append(e.code().name)

    threads = [threading.Thread(target=poll), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    sys.stdin.read()
    stop.set()
    if current["call"] is not None:
        current["call"].cancel()
    for t in threads:
        t.join()
    print(
        "keda calls={calls} errors={errors} stream_opens={stream_opens} stream_messages={stream_messages}".format(
            **figures
        )
        + " stream_ends="
        + ",".join("{}:{}".format(code, n) for code, n in sorted(collections.Counter(stream_ends).items()))
    )
    for e in errors:
        print("keda error:", e)


if __name__ == "__main__":
    main()
