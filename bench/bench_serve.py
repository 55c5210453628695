"""Load test of `serve` on loopback: N concurrent streaming clients against the demo model, N = 1 (one request at
a time), 8 and 32. Every request must come back as a well-formed stream (a role chunk, text chunks, a finish
reason, the usage chunk, `data: [DONE]`) — one that does not fails the run. Bounded in count (--requests per
level) and time (--max_seconds per level).

    python bench/bench_serve.py [--model_dir=DIR] [--requests=512] [--levels=1,8,32] [--rounds=5]

Without --model_dir it trains the demo model first (`train_low_mem.py demo`, a few minutes on 2 cores). Reports
tokens/s (completion tokens, [EOS] excluded, over the wall time of the level), the speed-up over one client at a
time, p50/p99 of the time to the first text and of the whole request, and the CPU each request cost the server,
its model process and the clients (all on the same cores: what the clients take, the server does not get). The
levels run in turn, `--rounds` times (1, 8, 32, 1, 8, 32, ...): a level's tokens/s is the median of its rounds, so
a moment when the machine was busy costs one round, not the whole comparison.
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from commands.demo import demo_rows  # noqa: E402
from commands.serve import model_id  # noqa: E402
from tests.cli_helpers import free_port  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="a saved demo model (default: train one with `demo`)")
    parser.add_argument("--requests", type=int, default=512, help="requests per level (each client runs its share)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    parser.add_argument("--max_batch", type=int, default=32, help="serve --max_batch")
    parser.add_argument("--max_tokens", type=int, default=24, help="max_tokens of each request (the demo: 24)")
    parser.add_argument("--max_seconds", type=float, default=300, help="time limit of one level")
    parser.add_argument("--rounds", type=int, default=5, help="times each level runs, in turn with the others")
    parser.add_argument("--smoke", action="store_true", help="tiny counts (levels 1,2,4): that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.levels, args.max_seconds, args.rounds = 8, "1,2,4", 120, 1
    args.levels = [int(level) for level in args.levels.split(",")]
    return args


def train_demo(work: Path) -> str:
    command = [sys.executable, str(REPO / "train_low_mem.py"), "demo", f"--output_dir={work / 'demo'}",
               f"--log_dir={work / 'logs'}"]
    print(f"training a demo model: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return str(work / "demo" / "final")


def start_server(model_dir: str, port: int, max_batch: int, queue_size: int) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "train_low_mem.py"), "serve", f"--model_dir={model_dir}", f"--port={port}",
               f"--max_batch={max_batch}", f"--queue_size={queue_size}", "--max_new_tokens=4096"]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = server.stdout.readline()
        if line.startswith("serving on"):
            return server
        if not line and server.poll() is not None:
            break
    server.kill()
    raise SystemExit("the server did not start")


class Malformed(Exception):
    pass


async def one_request(session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request, checked line by line: its token count and timings."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_text, finish, usage, role, done, text = None, None, None, False, False, ""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise Malformed(f"status {response.status}: {await response.read()}")
        async for raw in response.content:  # one line at a time
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            if done or not line.startswith("data: "):
                raise Malformed(f"unexpected line {line!r}")
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                role = role or choice["delta"].get("role") == "assistant"
                if choice["delta"].get("content"):
                    first_text = first_text or time.perf_counter()
                    text += choice["delta"]["content"]
                finish = choice["finish_reason"] or finish
    if not (done and role and finish in ("stop", "length") and usage):
        raise Malformed(f"incomplete stream: done={done} role={role} finish={finish} usage={usage}")
    ended = time.perf_counter()
    return dict(tokens=usage["completion_tokens"], first=(first_text or ended) - started, total=ended - started)


async def level(url: str, model: str, clients: int, prompts: list[str], max_tokens: int, limit: float) -> dict:
    import aiohttp

    queue = list(prompts)
    results, failures = [], []

    async def client_loop(session):
        while queue:
            prompt = queue.pop()
            try:
                results.append(await one_request(session, url, model, prompt, max_tokens))
            except (Malformed, aiohttp.ClientError) as error:
                failures.append(str(error))
    started = time.perf_counter()
    # aiohttp, not httpx: the clients share the server's two cores, and aiohttp's C parser spends a third of
    # httpx's CPU on each request (0.3 ms, not 0.9, measured at 8 clients: docs/BENCHMARKS.md)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=limit)) as session:
        await asyncio.wait_for(asyncio.gather(*(client_loop(session) for _ in range(clients))), limit)
    seconds = time.perf_counter() - started
    return dict(results=results, failures=failures, seconds=seconds)


def cpu_seconds(server: subprocess.Popen) -> tuple[float, float, float]:
    """CPU time so far of the HTTP server, of its model process (and the rest of its children), of these clients."""
    import psutil

    process = psutil.Process(server.pid)
    children = sum(sum(child.cpu_times()[:2]) for child in process.children(recursive=True))
    return sum(process.cpu_times()[:2]), children, time.process_time()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    args = parse_args()
    prompts = demo_rows(args.requests, seed=5)[0]
    lines = ["| clients | requests | complete | tokens | tokens/s | vs 1 client | TTFT p50 ms | TTFT p99 ms | "
             "request p50 ms | request p99 ms | CPU ms per request: server, model, clients | tokens/s of each round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lost = 0
    runs = {clients: [] for clients in args.levels}  # each round's outcome, by level
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        model_dir = args.model_dir or train_demo(Path(tmp))
        port = free_port()
        # Queue room for every client: a benchmark measures batching, not refusals.
        server = start_server(model_dir, port, args.max_batch, max(args.levels))
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            # Warm-up: every batch size the levels reach has been seen (buffers allocated, code paths run once).
            for clients in args.levels:
                asyncio.run(level(url, model_id(model_dir), clients, prompts[:2 * clients], args.max_tokens,
                                  args.max_seconds))
            for round_ in range(args.rounds):
                for clients in args.levels:
                    print(f"round {round_ + 1}: {clients} concurrent clients, {len(prompts)} requests",
                          file=sys.stderr, flush=True)
                    before = cpu_seconds(server)
                    outcome = asyncio.run(level(url, model_id(model_dir), clients, prompts, args.max_tokens,
                                                args.max_seconds))
                    outcome["cpu"] = [after - start for after, start in zip(cpu_seconds(server), before)]
                    lost += len(prompts) - len(outcome["results"])
                    for failure in outcome["failures"][:3]:
                        print(f"failed: {failure}", file=sys.stderr)
                    runs[clients].append(outcome)
        finally:
            server.terminate()
            server.wait(60)
    rates = {clients: statistics.median(sum(r["tokens"] for r in outcome["results"]) / outcome["seconds"]
                                        for outcome in outcomes) for clients, outcomes in runs.items()}
    for clients, outcomes in runs.items():
        results = [result for outcome in outcomes for result in outcome["results"]]
        first = [r["first"] * 1000 for r in results] or [0.0]
        total = [r["total"] * 1000 for r in results] or [0.0]
        each = ", ".join(f"{sum(r['tokens'] for r in o['results']) / o['seconds']:,.0f}" for o in outcomes)
        cpu = ", ".join(f"{sum(o['cpu'][part] for o in outcomes) * 1000 / max(1, len(results)):.2f}"
                        for part in range(3))
        lines.append(f"| {clients} | {len(prompts) * len(outcomes)} | {len(results)} | "
                     f"{sum(r['tokens'] for r in results)} | {rates[clients]:,.0f} | "
                     f"{rates[clients] / rates[args.levels[0]]:.2f}x | {statistics.median(first):.0f} | "
                     f"{percentile(first, 0.99):.0f} | {statistics.median(total):.0f} | "
                     f"{percentile(total, 0.99):.0f} | {cpu} | {each} |")
    heading = "SMOKE RUN (tiny counts: not figures)\n" if args.smoke else ""
    print(f"{heading}serve on loopback, model {model_id(model_dir)}, max_batch {args.max_batch}, max_tokens "
          f"{args.max_tokens}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("\n".join(lines))
    for clients in args.levels[1:]:
        print(f"speed-up at {clients} clients: {rates[clients] / rates[args.levels[0]]:.2f}x the one-at-a-time "
              "throughput")
    if lost:
        raise SystemExit(f"{lost} requests did not complete with a well-formed stream")


if __name__ == "__main__":
    main()
