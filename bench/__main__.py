"""``python -m bench [webhook|verify|tracing|core|callers|memory|sync]``: run the benchmarks and print one table.

Figures and ratios are measured in this one run on this machine; they are
never pass/fail tests. Every server is started here and stopped at the end;
all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from bench import profiles
from bench.common import Figure

BENCHMARKS = ("webhook", "verify", "tracing", "core", "callers", "memory", "sync")
DEFAULT = ("webhook", "verify", "tracing", "core", "callers", "sync")  # memory takes minutes: `make bench-memory`


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "which", nargs="*", metavar="{webhook,verify,tracing,core,callers,memory,sync}", help="default: all but memory"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per phase (default 8 / 6)")
    parser.add_argument(
        "--rounds", type=int, default=6, help="interleaved rounds of the verify and tracing servers (>= 5)"
    )
    parser.add_argument("--pairs", type=int, default=4, help="interleaved pairs of each webhook and sync comparison")
    parser.add_argument("--calls", type=int, default=1_000_000, help="VerifyToken calls (memory)")
    parser.add_argument("--distinct", type=int, default=100_000, help="distinct tokens among them (memory)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--concurrency", type=int, default=32, help="in flight per load process")
    parser.add_argument("--users", type=int, default=1000, help="seeded users (webhook)")
    parser.add_argument("--deliveries", type=int, default=20_000, help="pre-signed deliveries (webhook)")
    parser.add_argument("--tokens", type=int, default=2000, help="distinct tokens (core)")
    parser.add_argument("--sync-users", type=int, default=10_000, help="users in the fake Clerk (sync)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample the processes under test with py-spy into DIR (pip install py-spy)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(BENCHMARKS)})")
    return args


def cpu_text(figure: Figure) -> str:
    return " ".join(f"{name} {share * 100:.0f}%" for name, share in figure.cpu.items())


def cpu_per_call(figure: Figure) -> str:
    """CPU milliseconds each process of the benchmark spent per completed call."""
    if not figure.rps:
        return ""
    return " ".join(f"{name} {share * 1000 / figure.rps:.2f}" for name, share in figure.cpu.items() if name != "other")


def table(figures: list[Figure]) -> str:
    header = ("benchmark", "rps", "p50 ms", "p99 ms", "n", "errors", "cpu (% of one core)", "cpu ms/call", "outcomes")
    rows = [header]
    for f in figures:
        outcomes = ",".join(f"{k}={v}" for k, v in sorted(f.outcomes.items()))
        rows.append((f.name, f"{f.rps:,.0f}", f"{f.p50_ms:.2f}", f"{f.p99_ms:.2f}", str(f.count), str(f.errors),
                     cpu_text(f), cpu_per_call(f), outcomes))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(w) if 0 < i < 6 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> list[str]:
    which = args.which or list(DEFAULT)
    figures: list[Figure] = []
    notes: list[str] = []
    extra_ratios: list[str] = []
    sections: list[str] = []
    setup = []
    if "webhook" in which:
        from bench import webhook

        found, lines, more = await webhook.run(
            duration_s=args.duration or 8.0,
            warmup_s=args.warmup,
            concurrency=args.concurrency,
            users=args.users,
            deliveries=args.deliveries,
            pairs=args.pairs,
            profile=args.profile,
        )
        figures += found
        extra_ratios += lines
        notes += more
        setup.append(
            f"webhook: {args.users} seeded users, {args.concurrency} concurrent senders in 1 process, "
            f"{args.duration or 8.0:g} s windows after {args.warmup:g} s warm-up, "
            f"{args.pairs} interleaved pairs (sidecar, raw, raw, sidecar, ...), the median window shown"
        )
    if "verify" in which:
        from bench import verify

        found, lines, more = await verify.run(
            duration_s=args.duration or 6.0, warmup_s=args.warmup, rounds=args.rounds, profile=args.profile
        )
        figures += found
        notes += more
        extra_ratios += lines
        setup.append(
            f"verify: h2load, one repeated token, {args.rounds} rounds, the servers' order reversed every other "
            "round, the median round shown"
        )
    if "tracing" in which:
        from bench import tracing

        found, lines, more = await tracing.run(
            duration_s=args.duration or 6.0, warmup_s=args.warmup, rounds=args.rounds, profile=args.profile
        )
        figures += found
        notes += more
        extra_ratios += lines
        sections += ["", *await tracing.interceptor_cost()]
        setup.append(f"tracing: as verify, 1 worker each, off and on (see bench/tracing.py); {args.rounds} rounds")
    if "core" in which:
        from bench import core

        sections += ["", *await core.run(tokens=args.tokens)]
    if "callers" in which:
        from bench import callers

        sections += ["", *await callers.run()]
    if "memory" in which:
        from bench import memory

        sections += ["", *await memory.run(calls=args.calls, distinct=args.distinct)]
    lines = [*setup]
    if figures:
        lines += ["", table(figures), "", "ratios (median of the interleaved pairs, min-max, n):", *extra_ratios]
    lines += sections
    if "sync" in which:
        from bench import sync

        lines += ["", *await sync.run(users=args.sync_users, pairs=args.pairs)]
    notes += [f"{f.name}: {f.note}" for f in figures if f.note]
    if args.profile is not None:
        if profiles.py_spy() is None:
            notes.append("--profile: py-spy not found (pip install py-spy, or set PY_SPY)")
        else:
            lines += ["", f"profiles (py-spy, {args.profile}):"]
            for path in sorted(args.profile.glob("*.txt")):
                lines += profiles.summary(path)
    if notes:
        lines += ["", "notes:", *(f"  {note}" for note in notes)]
    return lines


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench", *sys.argv[1:]])
    print(f"$ {command}   ({os.cpu_count()} cores)", flush=True)
    began = time.monotonic()
    output = asyncio.run(main(arguments))
    print("\n".join(output))
    print(f"\n{time.monotonic() - began:.0f} s in all; figures are this run's, on this machine, not a test.")
    sys.exit(0)
