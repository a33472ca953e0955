"""The cases of bench/isolation.sh, against a running stack (stdlib only).

Each case prints one line with what the clients got and the peak RSS
(VmHWM, MB) of the ingress and the worker so far; the last line is the
ingress's peak RSS over every case.
"""

import argparse
import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request


def peak_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def post(url, key, body, timeout=120):
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method="POST")
    req.add_header("authorization", f"Bearer {key}")
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url, key, timeout=120):
    req = urllib.request.Request(url)
    req.add_header("authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def metric(ops, name):
    with urllib.request.urlopen(f"{ops}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--ops", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ingress-pid", type=int, required=True)
    p.add_argument("--worker-pid", type=int, required=True)
    a = p.parse_args()
    chat = f"{a.gateway}/v1/chat/completions"
    rss = lambda: f"ingress_peak_mb={peak_mb(a.ingress_pid):.1f} worker_peak_mb={peak_mb(a.worker_pid):.1f}"

    # 1. A 20 MiB answer, synchronously and as a job.
    ask = {"model": "big-20", "messages": [{"role": "user", "content": "a long answer"}]}
    started = time.monotonic()
    status, body = post(chat, a.key, ask)
    sync_s = time.monotonic() - started
    _, submitted = post(f"{a.gateway}/v1/jobs", a.key, {"endpoint": "chat.completions", "body": ask})
    job_id = json.loads(submitted)["id"]
    deadline = time.monotonic() + 120
    job = {}
    while time.monotonic() < deadline:
        _, raw = get(f"{a.gateway}/v1/jobs/{job_id}", a.key)
        job = json.loads(raw)
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    content = job.get("result", {}).get("choices", [{}])[0].get("message", {}).get("content", "")
    print(f"large answer 20MiB sync_status={status} sync_bytes={len(body)} sync_s={sync_s:.2f} "
          f"job_status={job.get('status')} job_content_bytes={len(content)} {rss()}")

    # 2. A 200 MiB answer: refused past upstream.max_response_bytes.
    status, body = post(chat, a.key, {"model": "big-200", "messages": [{"role": "user", "content": "too long"}]})
    code = json.loads(body).get("error", {}).get("code") if body else None
    print(f"large answer 200MiB status={status} code={code} {rss()}")

    # 3. 64 concurrent 1 MiB embeddings bodies of [0,0,…] token arrays.
    row = [0] * 1000
    emb = {"model": "bench", "input": [row] * 524}
    raw = json.dumps(emb).encode()

    def one(_):
        return post(f"{a.gateway}/v1/embeddings", a.key, raw)[0]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(one, range(64)))
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"bodies 64x{len(raw) / 1048576:.2f}MiB statuses={counts} {rss()}")

    # 4. 200 streaming clients that never read.
    host, port = a.gateway.removeprefix("http://").split(":")
    stream = json.dumps({"model": "long-stream", "stream": True,
                         "messages": [{"role": "user", "content": "x"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {a.key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(stream)}\r\n\r\n").encode()
    before = metric(a.ops, "sluice_ingress_write_timeouts_total")
    cut_before = metric(a.ops, 'sluice_ingress_streams_interrupted_total{reason="slow_client"}')
    open_before = metric(a.ops, "sluice_ingress_streams_open")
    silent = []
    for _ in range(200):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(head + stream)
        silent.append(s)
    started = time.monotonic()
    status, _ = post(chat, a.key, {"model": "bench", "messages": [{"role": "user", "content": "meanwhile"}]})
    served_s = time.monotonic() - started
    # Each silent stream ends either by the write timeout (its connection
    # closed) or, first, by its full buffer (cut off; its last bytes may then
    # sit in the kernel's send buffer). Wait until none is open any more.
    deadline = time.monotonic() + 120
    still_open = 200.0
    while time.monotonic() < deadline:
        still_open = metric(a.ops, "sluice_ingress_streams_open") - open_before
        if still_open <= 0:
            break
        time.sleep(0.5)
    ended_s = time.monotonic() - started
    timeouts = metric(a.ops, "sluice_ingress_write_timeouts_total") - before
    cut = metric(a.ops, 'sluice_ingress_streams_interrupted_total{reason="slow_client"}') - cut_before
    for s in silent:
        s.close()
    print(f"streams 200 never read: still_open={max(still_open, 0):.0f} write_timeouts={timeouts:.0f} "
          f"cut_off_for_full_buffer={cut:.0f} ended_within_s={ended_s:.1f} "
          f"other_client_status={status} other_client_s={served_s:.2f} {rss()}")
    print(f"isolation ingress_peak_mb={peak_mb(a.ingress_pid):.1f} worker_peak_mb={peak_mb(a.worker_pid):.1f}")


if __name__ == "__main__":
    main()
