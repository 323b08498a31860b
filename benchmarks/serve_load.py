"""`tempo serve` under load: N concurrent clients, one input per request, and the batch sizes it achieves.

Starts ``tempo serve`` (a model of random weights, saved to a temporary folder) in its own process,
then runs ``--clients`` threads that each post single-input JSON requests back to back for
``--seconds``, and prints requests/s, latency percentiles and the batch-size distribution from the
server's ``/metrics``.

Usage::

    python benchmarks/serve_load.py                                        # resnet50 3x32x32, 32 clients
    python benchmarks/serve_load.py --model small_cnn --size 16 --clients 4 --seconds 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from tempo.training.models import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=32, help="image side (3 channels)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as d:
        model_file = Path(d) / "model.pt"
        torch.save(build_model(args.model, num_classes=10, channels=3, image_size=args.size).state_dict(), model_file)
        url = f"127.0.0.1:{_free_port()}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tempo.cli", "serve", "--model", args.model, "--model-file", str(model_file),
             "--input-shape", f"3,{args.size},{args.size}", "--num-classes", "10", "--listen", url,
             "--workers", str(args.workers), "--max-batch", str(args.max_batch), "--max-wait-ms",
             str(args.max_wait_ms)], env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        try:
            client = httpx.Client(base_url=f"http://{url}", timeout=600)
            while True:
                if server.poll() is not None:
                    sys.exit("the server stopped before it answered")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            body = json.dumps({"inputs": torch.rand(1, 3, args.size, args.size).tolist()})
            client.post("/predict", content=body, headers={"content-type": "application/json"})  # anchors
            before = client.get("/metrics").json()
            stop, answered = time.monotonic() + args.seconds, []

            def load() -> None:
                with httpx.Client(base_url=f"http://{url}", timeout=600) as c:
                    while time.monotonic() < stop:
                        r = c.post("/predict", content=body, headers={"content-type": "application/json"})
                        answered.append(r.status_code)

            threads = [threading.Thread(target=load) for _ in range(args.clients)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            after = client.get("/metrics").json()
        finally:
            server.terminate()
            server.wait(timeout=120)
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    sizes = {k: v for k, v in sorted(sizes.items()) if v}
    forwards = sum(sizes.values())
    print(f"{args.model} 3x{args.size}x{args.size}, {args.clients} clients for {elapsed:.1f} s, {args.workers} "
          f"worker process(es), max batch {args.max_batch}, max wait {args.max_wait_ms} ms")
    print(f"requests answered: {answered.count(200)} of {len(answered)} ({answered.count(200) / elapsed:.1f}/s); "
          f"latency (server side, all requests so far) p50 {after['latency_ms'].get('p50')} ms, "
          f"p99 {after['latency_ms'].get('p99')} ms")
    print(f"forwards: {forwards}, mean batch {sum(k * v for k, v in sizes.items()) / max(forwards, 1):.1f}; "
          f"batch sizes (size: forwards) {sizes}")


if __name__ == "__main__":
    main()
