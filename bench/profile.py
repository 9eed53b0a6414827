"""Profile the running service under load: py-spy samples ``edgeloader serve`` while wrk posts images.

    .venv/bin/python bench/profile.py --model blazeface --connections 4 --seconds 8

Writes bench/.cache/profiles/<model>-c<N>.speedscope.json (open at speedscope.app or in any
speedscope viewer) and <model>-c<N>.txt: per thread (event loop ``MainThread``, workers ``infer_*``),
the functions with the most samples, self and inclusive. py-spy runs non-blocking (it does not
pause the process), at 250 Hz, and ``--gil`` mode can show who holds the GIL.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, VENV_BIN, Server, wrk
from run import MODELS, PKGS, SMALL, ensure_setup

OUT = CACHE / "profiles"


def summarize(collapsed: Path, top: int = 18) -> str:
    """Top functions per thread from py-spy's collapsed ("raw") output."""
    self_by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl_by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].partition("): ")[2].strip() or frames[0]  # "thread (TID): NAME"
        thread = "infer_*" if thread.startswith("infer") else thread
        n = int(count)
        totals[thread] += n
        self_by[thread][frames[-1]] += n
        for f in set(frames[1:]):
            incl_by[thread][f] += n
    lines = []
    grand = sum(totals.values())
    for thread, total in totals.most_common():
        lines.append(f"== {thread}: {total} samples ({100 * total / grand:.0f}% of all)")
        lines.append("  self:")
        for f, n in self_by[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {f}")
        lines.append("  inclusive:")
        for f, n in incl_by[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="blazeface", choices=list(MODELS))
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--image", type=Path, default=SMALL)
    parser.add_argument("--gil", action="store_true", help="sample only threads holding the GIL")
    parser.add_argument("--tag", default="", help="suffix for the output names")
    args = parser.parse_args(argv)
    ensure_setup()
    OUT.mkdir(parents=True, exist_ok=True)
    _, prefix = MODELS[args.model]
    stem = OUT / f"{args.model}-c{args.connections}{args.tag}"
    with Server(f"profile-{args.model}", model=PKGS / f"{prefix}1") as server:
        wrk(server.url + "/detect", args.image, args.connections, 1.0)  # warm up
        common = ["--pid", str(server.pid), "--rate", "250", "--duration", str(args.seconds), "--nonblocking",
                  "--threads", *(["--gil"] if args.gil else [])]
        spy = [str(VENV_BIN / "py-spy"), "record", *common]
        result: dict[str, object] = {}

        def load() -> None:
            result.update(wrk(server.url + "/detect", args.image, args.connections, args.seconds + 1, server.pid))

        t = threading.Thread(target=load)
        t.start()
        raw = stem.with_suffix(".collapsed.txt")
        subprocess.run([*spy, "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
        t.join()
        with Server(f"profile-{args.model}-ss", model=PKGS / f"{prefix}1") as second:
            # A second, short run for the speedscope view (py-spy writes one format per run).
            wrk(second.url + "/detect", args.image, args.connections, 1.0)
            t2 = threading.Thread(target=lambda: wrk(second.url + "/detect", args.image, args.connections,
                                                     args.seconds + 1))
            t2.start()
            spy2 = [str(VENV_BIN / "py-spy"), "record", *common]
            spy2[spy2.index("--pid") + 1] = str(second.pid)
            subprocess.run([*spy2, "--format", "speedscope", "-o", str(stem.with_suffix(".speedscope.json"))],
                           check=True, capture_output=True)
            t2.join()
    report = (f"{args.model}, {args.connections} connections, {args.seconds} s: {result.get('rps')} req/s, "
              f"p50 {result.get('p50_ms')} ms, server CPU {result.get('server_cpu_pct')}%, "
              f"{result.get('cpu_ms_per_req')} CPU ms/request\n\n" + summarize(raw))
    stem.with_suffix(".txt").write_text(report + "\n")
    print(report)
    print(f"\nwrote {stem.with_suffix('.txt')}, {raw}, {stem.with_suffix('.speedscope.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
