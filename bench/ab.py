"""A/B a service setting: two servers side by side (baseline, variant), wrk runs interleaved.

    .venv/bin/python bench/ab.py --model tiny-yolov3 --variant MALLOC_MMAP_THRESHOLD_=131072
    .venv/bin/python bench/ab.py --model blazeface --variant EDGELOADER_WORKERS=3 -c 4

Both servers serve the same package; only the one being measured gets traffic. Prints and
returns throughput, latency, CPU per request and RSS of each, and the variant/baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Server, wrk
from run import MODELS, PKGS, SMALL, _merge, ensure_setup


def ab(model: str, baseline: dict[str, str], variant: dict[str, str], connections: list[int], seconds: float,
       rounds: int, image: Path = SMALL) -> dict[str, Any]:
    _, prefix = MODELS[model]
    pkg = PKGS / f"{prefix}1"
    out: dict[str, Any] = {"model": model, "baseline_env": baseline, "variant_env": variant, "by_concurrency": {}}
    with Server(f"ab-{model}-a", model=pkg, env=baseline) as a, Server(f"ab-{model}-b", model=pkg, env=variant) as b:
        for s in (a, b):
            wrk(s.url + "/detect", image, max(connections), 1.0)
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {(c, k): [] for c in connections for k in "ab"}
        for r in range(rounds):
            order = [(c, k) for c in connections for k in "ab"]
            for c, k in order if r % 2 == 0 else order[::-1]:
                s = a if k == "a" else b
                runs[(c, k)].append(wrk(s.url + "/detect", image, c, seconds, s.pid))
        out["rss_kb"] = {"baseline": a.rss_kb(), "variant": b.rss_kb()}
    for c in connections:
        base, var = _merge(runs[(c, "a")]), _merge(runs[(c, "b")])
        out["by_concurrency"][str(c)] = {
            "baseline": base, "variant": var,
            "rps_ratio": round(var["rps"] / base["rps"], 3),
            "p50_ratio": round(var["p50_ms"] / base["p50_ms"], 3),
            "p99_ratio": round(var["p99_ms"] / base["p99_ms"], 3),
            "cpu_ratio": round(var["cpu_ms_per_req"] / base["cpu_ms_per_req"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-yolov3", choices=list(MODELS))
    parser.add_argument("--variant", action="append", required=True, metavar="KEY=VALUE")
    parser.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-c", "--connections", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, default=SMALL)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ensure_setup()
    env = lambda pairs: dict(p.split("=", 1) for p in pairs)  # noqa: E731
    res = ab(args.model, env(args.baseline), env(args.variant), [int(c) for c in args.connections.split(",")],
             args.seconds, args.rounds, args.image)
    print(f"{args.model}: variant {res['variant_env']} vs baseline {res['baseline_env'] or 'defaults'}")
    print(f"  {'c':>2} | {'base req/s':>10} {'p50':>6} {'p99':>6} {'CPU ms':>6} | {'var req/s':>10} {'p50':>6} "
          f"{'p99':>6} {'CPU ms':>6} | req/s x  p99 x  CPU x")
    for c, row in res["by_concurrency"].items():
        b, v = row["baseline"], row["variant"]
        print(f"  {c:>2} | {b['rps']:>10.1f} {b['p50_ms']:>6.1f} {b['p99_ms']:>6.1f} {b['cpu_ms_per_req']:>6.2f} | "
              f"{v['rps']:>10.1f} {v['p50_ms']:>6.1f} {v['p99_ms']:>6.1f} {v['cpu_ms_per_req']:>6.2f} | "
              f"{row['rps_ratio']:>7.2f} {row['p99_ratio']:>6.2f} {row['cpu_ratio']:>6.2f}")
    print(f"  RSS after the runs: baseline {res['rss_kb']['baseline'] / 1024:.0f} MB, "
          f"variant {res['rss_kb']['variant'] / 1024:.0f} MB")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
