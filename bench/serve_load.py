"""Load on `moon-rl serve`: N concurrent clients on localhost for a bounded time, batching on and off side by side.

    python bench/serve_load.py [--clients 16] [--seconds 5] [--endpoint search|embed] [--index DIR]
                               [--max-batch 16] [--max-wait-ms 5] [--threads 1] [--results]

Without `--index` it first embeds a small synthetic catalogue with the untrained tiny model of
`recipes/tiny-cpu.yaml` into a temporary folder (the service rebuilds the same model from the saved recipe). Then,
for each of batching on and off, it starts `moon-rl serve` in its own process on a free 127.0.0.1 port, runs
`--clients` clients (asyncio + httpx), each sending its next request as soon as the last one is answered, for
`--seconds`, and stops the server. Each client sends a different text query (`/search`, k=10) or three texts
(`/embed`).

Printed per side: requests, requests/s, p50 and p95 latency (ms), errors (any non-200 answer or failed request; must
be 0), and from the server's /health the model forwards and the mean records per forward. The exit code is 1 if
any request failed. `--results` writes the table into `bench/RESULTS.md` (its own section).

Only loopback addresses are ever contacted; every loop is bounded by `--seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md

import httpx  # noqa: E402
from results_md import machine_description, write_section  # noqa: E402

QUERIES = ["red striped cotton shirt", "blue denim jeans", "black leather boots", "green wool sweater",
           "white canvas sneakers", "yellow checked umbrella", "grey suede watch", "orange zigzag hat"]


def build_index(folder: Path, n_products: int) -> Path:
    """A small index built by the untrained tiny recipe model (the same as `moon-rl embed recipes/tiny-cpu.yaml`)."""
    from moon_rl.inference.pipeline import run_embed
    from moon_rl.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml",
                         [f"output_dir={folder}", f"data.synthetic.n_products={n_products}"])
    summary = run_embed(recipe, model_dir=None, catalogue=None, out=folder / "index", mode=None, skip_bad=False,
                        show_progress=False)
    return summary.out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`moon-rl serve` in a child process (its own interpreter: the clients' event loop does not share its GIL)."""

    def __init__(self, index: Path, *, batching: bool, max_batch: int, max_wait_ms: float, threads: int | None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, str(ROOT / "cli.py"), "serve", str(index), "--port", str(self.port),
                "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                "--batching" if batching else "--no-batching", *(["--threads", str(threads)] if threads else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("MOON_RL_API_KEY", None)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, read if it dies; closed in stop()
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"moon-rl serve exited ({self.process.returncode}):\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"moon-rl serve did not answer on {self.base} within {timeout:.0f}s")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/health", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


async def load(base: str, *, clients: int, seconds: float, endpoint: str) -> tuple[list[float], int]:
    """Latencies (s) of the successful requests and the error count, `clients` closed loops for `seconds`."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(number: int, http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal errors
        sent = 0
        while time.monotonic() < deadline:
            query = QUERIES[(number + sent) % len(QUERIES)]
            body = ({"text": query, "k": 10} if endpoint == "search" else
                    {"texts": [query, f"{query} {number}", f"another {query}"]})
            start = time.perf_counter()
            try:
                response = await http.post(f"/{endpoint}", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            sent += 1

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(i, http, deadline) for i in range(clients)))
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


def run_side(index: Path, args: argparse.Namespace, batching: bool) -> dict[str, Any]:
    server = Server(index, batching=batching, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    threads=args.threads or None)
    try:
        server.wait_ready()
        # Warm-up (first-call allocations, tokenizer caches) outside the measured window.
        asyncio.run(load(server.base, clients=2, seconds=1.0, endpoint=args.endpoint))
        before = server.health()["batching"]
        start = time.perf_counter()
        latencies, errors = asyncio.run(load(server.base, clients=args.clients, seconds=args.seconds,
                                             endpoint=args.endpoint))
        elapsed = time.perf_counter() - start
        after = server.health()["batching"]
    finally:
        server.stop()
    forwards = after["forwards"] - before["forwards"]
    records = after["records"] - before["records"]
    return {"batching": "on" if batching else "off", "requests": len(latencies) + errors,
            "rps": len(latencies) / elapsed, "p50_ms": 1000 * percentile(latencies, 50),
            "p95_ms": 1000 * percentile(latencies, 95), "errors": errors, "forwards": forwards,
            "per_forward": records / forwards if forwards else 0.0}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batching | requests | requests/s | p50 ms | p95 ms | errors | forwards | records/forward |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batching']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{r['errors']} | {r['forwards']} | {r['per_forward']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--endpoint", choices=("search", "embed"), default="search")
    parser.add_argument("--index", type=Path, help="a moon-rl embed folder (default: build a tiny one)")
    parser.add_argument("--n-products", type=int, default=48, help="catalogue size of the index built by default")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    # One torch thread by default: the clients need a core too, and on a shared 2-core machine two intra-op threads
    # stall at torch's barriers whenever another process takes a core (a single-query forward of the tiny model went
    # from 4 ms to 20-240 ms).
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: torch's default)")
    parser.add_argument("--results", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    if args.clients < 1 or not 0 < args.seconds <= 600:
        parser.error("--clients must be >= 1 and --seconds in (0, 600]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    with tempfile.TemporaryDirectory(prefix="moon-rl-serve-load-") as tmp:
        index = args.index or build_index(Path(tmp), args.n_products)
        rows = [run_side(index, args, batching) for batching in (True, False)]
    header = (f"`bench/serve_load.py`: {args.clients} clients, {args.seconds:g} s per side, POST /{args.endpoint}, "
              f"max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms:g}, server torch threads "
              f"{args.threads or 'default'}, {platform.machine()} {os.cpu_count()} CPUs")
    report = f"{header}\n\n{table(rows)}"
    print(report)
    if args.results:
        index_note = (f"the index {args.index}" if args.index else
                      f"the untrained tiny model of recipes/tiny-cpu.yaml on a {args.n_products}-product synthetic "
                      "catalogue")
        write_section(Path(__file__).parent / "RESULTS.md", "serve_load",
                      f"## Serving under load\n\n{report}\n\nServer: {index_note}, in its own process; the clients "
                      f"(one asyncio process) share the machine with it. Machine: {machine_description()}.")

    errors = sum(r["errors"] for r in rows)
    if errors:
        print(f"FAILED: {errors} requests failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
