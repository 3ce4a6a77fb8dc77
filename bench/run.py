"""Benchmark our taskiq_redis side by side with taskiq-redis 1.2.4 and plain redis-py.

Run from anywhere as ``.venv/bin/python bench/run.py`` (``--quick`` for a
smoke run). It starts its own redis-server on a free loopback port, makes
``.bench/venv-1.2.4`` if it is missing, then runs bench/ops.py once per side
per round, alternating the sides so machine noise hits them all alike, with
FLUSHALL before every run. The table shows each figure's best round: noise
only ever slows a run down, so the fastest round is the least disturbed one.
Every round's figures are kept in the JSON file as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from ops import CONCURRENCIES, OPERATIONS, interrupt_on_signals

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
STATE_DIR = ROOT / ".bench"
OLD_VENV = STATE_DIR / "venv-1.2.4"
OLD_VERSION = "1.2.4"
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
SIDES = {
    "ours": OURS_PYTHON,
    "1.2.4": OLD_VENV / "bin" / "python",
    "redis-py": OURS_PYTHON,
}
E2E_KINDS = ("stream", "list")


def installed_version(python: Path) -> str | None:
    """The taskiq-redis version that interpreter imports, if any."""
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('taskiq-redis'))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_old_venv() -> None:
    """Reuse .bench/venv-1.2.4 when it holds 1.2.4; otherwise (re)build it."""
    python = OLD_VENV / "bin" / "python"
    if installed_version(python) == OLD_VERSION:
        return
    print(f"creating {OLD_VENV} with taskiq-redis=={OLD_VERSION} ...", flush=True)
    shutil.rmtree(OLD_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(OLD_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"taskiq-redis=={OLD_VERSION}"], check=True)
    if installed_version(python) != OLD_VERSION:
        raise SystemExit(f"{OLD_VENV} does not import taskiq-redis {OLD_VERSION}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server without persistence; always stopped on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="redis-", dir=STATE_DIR))
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    log = (workdir / "redis.log").open("wb")
    # Own session: a Ctrl-C must not kill Redis under the sides still cleaning up.
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if proc.poll() is not None:
                raise SystemExit(f"redis-server exited, see {workdir / 'redis.log'}")
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def flushall(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def run_side(side: str, url: str, n: int, mode: str, only: str | None = None) -> dict[str, Any]:
    """One run of ops.py in the side's interpreter; its last stdout line is the JSON.

    On Ctrl-C the side gets SIGINT first, so it can stop its taskiq worker.
    """
    flushall(url)
    command = [str(SIDES[side]), str(BENCH_DIR / "ops.py"), "--side", side, "--url", url]
    command += ["--n", str(n), "--mode", mode, "--log-dir", str(STATE_DIR / "logs" / side)]
    command += ["--only", only] if only else []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if proc.returncode != 0 or not out.strip():
        tail = err.strip().splitlines()[-5:]
        print(f"  {side} {mode} failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
        return {"side": side, "results": {}, "error": err[-4000:]}
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def row_keys() -> list[tuple[str, str]]:
    """Table rows in a fixed order: (result key in ops.py output, concurrency shown)."""
    rows = [(f"{name}@{c}", str(c)) for name in OPERATIONS for c in CONCURRENCIES]
    return rows + [(f"e2e {kind} broker@worker", "1 worker") for kind in E2E_KINDS]


def figure(outcome: dict[str, Any]) -> float | None:
    value = outcome.get("ops_per_s", outcome.get("tasks_per_s"))
    return float(value) if value is not None else None


def best(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row and side: the best round, or why there is no figure."""
    table: dict[str, dict[str, Any]] = {}
    for key, _ in row_keys():
        for side in SIDES:
            mine = [run["results"] for run in runs if run["side"] == side]
            outcomes = [results[key] for results in mine if key in results]
            figures = [f for f in map(figure, outcomes) if f is not None]
            cell: dict[str, Any] = {"rounds": figures}
            if figures:
                cell["best"] = max(figures)
            elif outcomes:
                cell["why"] = outcomes[-1].get("na") or outcomes[-1].get("error")
                cell["kind"] = "n/a" if "na" in outcomes[-1] else "error"
            elif crashed := [r["error"] for r in runs if r["side"] == side and "error" in r]:
                cell["kind"], cell["why"] = "error", crashed[-1]
            else:
                cell["kind"], cell["why"] = "n/a", "not run on this side"
            table.setdefault(key, {})[side] = cell
    return table


def cell_text(cell: dict[str, Any]) -> str:
    return f"{cell['best']:.0f}" if "best" in cell else str(cell["kind"])


def ratio_text(top: dict[str, Any], bottom: dict[str, Any]) -> str:
    if "best" not in top or "best" not in bottom:
        return "n/a"
    return f"{top['best'] / bottom['best']:.2f}"


def paired_text(runs: list[dict[str, Any]], key: str, top: str, bottom: str) -> str:
    """Median over rounds of ``top``'s figure over ``bottom``'s in the same round.

    Steadier than a ratio of bests on a shared machine, where a best of one side may come from
    a quiet moment the other side never had.
    """
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        value = figure(run.get("results", {}).get(key, {}))
        if value is not None:
            by_round.setdefault(run["round"], {})[run["side"]] = value
    ratios = [r[top] / r[bottom] for r in by_round.values() if top in r and bottom in r]
    return f"{statistics.median(ratios):.2f}" if ratios else "n/a"


WIDTHS = (22, 9, 8, 8, 9, 11, 14, 8)


def print_line(values: tuple[str, ...]) -> None:
    """Two left-aligned text columns, then right-aligned figures."""
    cols = zip(values, WIDTHS, strict=True)
    print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(cols)))


def print_table(table: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    header = ("operation", "conc", "ours", "1.2.4", "redis-py", "ours/1.2.4", "ours/redis-py")
    print_line((*header, "paired"))
    for key, shown in row_keys():
        cells = table[key]
        print_line(
            (
                key.split("@")[0],
                shown,
                cell_text(cells["ours"]),
                cell_text(cells["1.2.4"]),
                cell_text(cells["redis-py"]),
                ratio_text(cells["ours"], cells["1.2.4"]),
                ratio_text(cells["ours"], cells["redis-py"]),
                paired_text(runs, key, "ours", "redis-py"),
            )
        )
    print("(ops/s, or tasks/s for e2e; best of the rounds; paired: the median over rounds of")
    print(" ours/redis-py within one round)")


def print_redis_cpu(runs: list[dict[str, Any]]) -> None:
    """Redis's own CPU per call, median over rounds, for the micro operations."""
    print("\nRedis server CPU per call (us, median over rounds; user + system, INFO cpu):")
    print_line(
        ("operation", "conc", "ours", "1.2.4", "redis-py", "ours/1.2.4", "ours/redis-py", "")
    )
    for key, shown in row_keys():
        medians: dict[str, float] = {}
        for side in SIDES:
            values = [
                float(run["results"][key]["redis_us_per_call"])
                for run in runs
                if run["side"] == side and "redis_us_per_call" in run["results"].get(key, {})
            ]
            if values:
                medians[side] = statistics.median(values)
        if not medians:
            continue
        cells = tuple(f"{medians[side]:.1f}" if side in medians else "n/a" for side in SIDES)
        ratios = tuple(
            f"{medians['ours'] / medians[bottom]:.2f}"
            if "ours" in medians and medians.get(bottom)
            else "n/a"
            for bottom in ("1.2.4", "redis-py")
        )
        print_line((key.split("@")[0], shown, *cells, *ratios, ""))


def print_rss(rss: dict[str, dict[str, Any]]) -> None:
    print("\nworker memory, stream broker, default options:")
    for side, outcome in rss.items():
        if "peak_rss_kib" not in outcome:
            print(f"  {side:6} {'n/a' if 'na' in outcome else 'error'}: {outcome}")
            continue
        print(
            f"  {side:6} {outcome['tasks']} tasks at {outcome['tasks_per_s']:.0f}/s:"
            f" RSS {outcome['start_rss_kib'] / 1024:.1f} MiB at start,"
            f" peak {outcome['peak_rss_kib'] / 1024:.1f} MiB;"
            f" XLEN after all acked = {outcome['xlen']}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="calls per operation (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--rss-tasks", type=int, default=100_000, help="0 skips the RSS run")
    parser.add_argument(
        "--rss-sides",
        default="ours",
        help="comma-separated; add 1.2.4 for its figures (100k tasks take it 3+ min)",
    )
    parser.add_argument("--json", type=Path, default=STATE_DIR / "results.json")
    parser.add_argument(
        "--quick", action="store_true", help="n=300, 1 round, 2000 RSS tasks on both"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds, args.rss_tasks, args.rss_sides = 300, 1, 2000, "ours,1.2.4"
    args.rss_sides = [side for side in args.rss_sides.split(",") if side]
    if not set(args.rss_sides) <= {"ours", "1.2.4"}:
        parser.error("--rss-sides takes ours and/or 1.2.4")
    return args


def main() -> None:
    interrupt_on_signals()  # run.py is sure to stop Redis and its side on either signal
    args = parse_args()
    STATE_DIR.mkdir(exist_ok=True)
    ensure_old_venv()
    began = time.monotonic()
    runs: list[dict[str, Any]] = []
    rss: dict[str, dict[str, Any]] = {}
    with redis_server() as url:
        for round_no in range(1, args.rounds + 1):
            # Sides take turns per operation, ours and redis-py next to each other and first in
            # turn, so each pair of the "paired" column compares neighbours in time.
            pair = ["ours", "redis-py"] if round_no % 2 else ["redis-py", "ours"]
            for name in OPERATIONS:
                print(f"round {round_no}/{args.rounds}: {name} ...", flush=True)
                for side in [*pair, "1.2.4"]:
                    run = run_side(side, url, args.n, "micro", only=name)
                    runs.append(run | {"round": round_no})
            for side in ("ours", "1.2.4"):
                print(f"round {round_no}/{args.rounds}: e2e, {side} ...", flush=True)
                run = run_side(side, url, args.n, "e2e")
                runs.append(run | {"round": round_no})
        for side in args.rss_sides if args.rss_tasks else ():
            print(f"RSS run: {side}, {args.rss_tasks} tasks ...", flush=True)
            rss[side] = run_side(side, url, args.rss_tasks, "rss").get("results", {}).get("rss", {})
    table = best(runs)
    print()
    print_table(table, runs)
    print_redis_cpu(runs)
    print_rss(rss)
    elapsed = time.monotonic() - began
    print(f"\n{args.rounds} round(s), n={args.n}, took {elapsed:.0f}s; figures in {args.json}")
    meta = {"n": args.n, "rounds": args.rounds, "rss_tasks": args.rss_tasks, "seconds": elapsed}
    meta["sides"] = {run["side"]: run.get("info") for run in runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    everything = {"meta": meta, "best": table, "rss": rss, "runs": runs}
    args.json.write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: Redis and the running side were stopped")
