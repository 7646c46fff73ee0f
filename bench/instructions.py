"""CPU instructions per consumed event, counted by valgrind's callgrind: a cost that does not
depend on what else the machine is doing.

    python -m bench.instructions [--n 3000] [--baseline DIR]

Runs the `gdc`, `gdc-hooked`, `gdc-typed`, `gdc-metrics`, `gdc-traced` and `gdc-pipeline`
consumers of `bench.consumers` (and, with `--baseline`, the `gdc` consumer of another checkout,
e.g. `git worktree add DIR REV`) under callgrind over N and 2N events, and reports
(I(2N) - I(N)) / N for each, which cancels start-up, and their ratios.
Wall-clock throughput (`bench.run`) on a shared 2-core machine moves by 10% or more between
runs; this moves by about 1.5% (run with PYTHONHASHSEED=0 for the least).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import anyio
import nats

from bench.consumers import FILTERS
from bench.run import ROOT, Bench, make_events
from gdc_worker import NATSServer

_COLLECTED = re.compile(r"Collected : (\d+)")


async def instructions(bench: Bench, root: Path, impl: str, n: int, out_dir: Path) -> int:
    """Instructions one consumer process executes to start and consume `n` events."""
    events = make_events(n)
    stream, prefix = await bench.fresh_stream()
    await bench.fill(stream, prefix, events)
    await bench.durable(stream, prefix, "measured", FILTERS.get(impl, ">"))
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir / 'callgrind.out'}"]
    args += [sys.executable, "-m", "bench.consumers", impl, "--url", bench.url]
    args += ["--stream", stream, "--subject-prefix", prefix, "--durable", "measured"]
    args += ["--n", str(n)]
    result = await anyio.run_process(args, cwd=root, check=False)
    await bench.drop(stream)
    found = _COLLECTED.search(result.stderr.decode())
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{impl} in {root} failed:\n{result.stderr.decode()[-2000:]}")
    return int(found.group(1))


#: The consumers counted against `gdc`, and what their ratio to it says.
_VARIANTS = {
    "hooked": "no-op hooks/no hooks",
    "typed": "typed/untyped handler",
    "metrics": "Metrics/no hooks",
    "traced": "Tracing/no hooks",
    "pipeline": "ctx.publish pipeline/no-op",
}


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    cases = {name: (ROOT, name) for name in args.cases}
    if args.baseline is not None:
        cases["gdc baseline"] = (args.baseline, "gdc")
    per_event: dict[str, float] = {}
    with NATSServer() as server, tempfile.TemporaryDirectory() as tmp:
        nc = await nats.connect(server.url)
        bench = Bench(server.url, nc, nc.jetstream())
        for name, (root, impl) in cases.items():
            print(f"measuring {name}", file=sys.stderr)
            once = await instructions(bench, root, impl, args.n, Path(tmp))
            twice = await instructions(bench, root, impl, 2 * args.n, Path(tmp))
            per_event[name] = (twice - once) / args.n
        await nc.drain()
    return per_event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3_000, help="events of the shorter run")
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier version")
    parser.add_argument(
        "--cases",
        type=lambda text: ["gdc", *(c for c in text.split(",") if c and c != "gdc")],
        default=["gdc", *(f"gdc-{c}" for c in _VARIANTS)],
        metavar="gdc-X,...",
        help="the consumers to count besides gdc (default: all)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    per_event = anyio.run(main_async, args)
    ratios = {
        f"gdc {label}": per_event[f"gdc-{case}"] / per_event["gdc"]
        for case, label in _VARIANTS.items()
        if f"gdc-{case}" in per_event
    }
    if "gdc baseline" in per_event:
        ratios["gdc/baseline (target <= 1.03)"] = per_event["gdc"] / per_event["gdc baseline"]
    for name, value in per_event.items():
        print(f"  {name:<32} {value:>10,.0f} instructions/event")
    for name, value in ratios.items():
        print(f"  {name:<32} {value:>10.3f}")
    print(json.dumps({"instructions_per_event": per_event, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
