"""Benchmark streamed inputs: a graft from the tests' Hub server over loopback (--stream: HTTP range reads, each
file checked against its sha256) against the same graft from local files, and a sampled σ against a full scan.

1. graft: bench_graft's Llama-shaped triple served by tests/hubserver.py (a Hub-compatible server in this process,
   files in memory, large files behind a CDN redirect as on the Hub) on 127.0.0.1. `shadowmerge graft --stream` over
   the Hub ids against `shadowmerge graft` over the folders: wall time (best of --rounds), peak RSS, and the input
   bytes the server sent against the inputs' size (targets: >= 80 % of the local graft's throughput, the same peak
   RSS, bytes = input size +- 1 %). Floors: `dd` of the input files (local; warm page cache), and one plain HTTP GET
   of each input file from the server into /dev/null (loopback; the server's own speed).
2. σ: `similarity --sample N` (Hub ids, read by range) against a full scan of the Base/Instruct pair (`similarity
   --out`, of the local folders and of the Hub ids with --stream): wall time, bytes read, and the sampled figure's
   interval against the full figure.

    python benchmarks/bench_stream.py [--size 0.5B] [--rounds 2] [--sample 32] [--work DIR] [--markdown out.md]

Run by hand (minutes); never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from bench_graft import SHADOWMERGE, best, build_triple, machine, timed  # noqa: E402


def dd_floor(files: list[Path]) -> float:
    """Seconds to read the files with dd (bs=16M, to /dev/null), best of two (the page cache warm)."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def http_floor(hub, repos: list[str], env: dict) -> float:
    """Seconds to GET every weight file of the repos once, whole, from the server (curl, to /dev/null)."""
    t0 = time.perf_counter()
    for repo in repos:
        sha = hub.repos[repo].refs["main"]
        for name in sorted(hub.repos[repo].commits[sha]):
            if name.endswith(".safetensors"):
                subprocess.run(["curl", "-sfL", "-o", "/dev/null", f"{hub.url}/{repo}/resolve/{sha}/{name}"],
                               check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sample", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/shadowmerge-bench-stream"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    from hubserver import FakeHub

    folders = build_triple(args.work / args.size, args.size)
    files = [p for f in folders for p in sorted(f.glob("*.safetensors"))]
    size = sum(p.stat().st_size for p in files)
    out = args.work / "out"
    rows = []
    with FakeHub() as hub:
        for role, f in zip(("instruct", "base", "tuned"), folders):
            hub.add(f"org/{role}", {p.name: p.read_bytes() for p in f.iterdir() if p.is_file() and p.name != "done"})
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()},
               "HF_ENDPOINT": hub.url, "HF_HOME": str(args.work / "hf"), "NO_PROXY": "127.0.0.1,127.0.0.2",
               "no_proxy": "127.0.0.1,127.0.0.2"}

        def clear():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(args.work / "hf", ignore_errors=True)

        local = [*SHADOWMERGE, "graft", "--instruct", folders[0], "--base", folders[1], "--tuned", folders[2],
                 "--out", out, "-q"]
        wall_l, rss_l = best([str(c) for c in local], before=clear, rounds=args.rounds)
        streamed = [*SHADOWMERGE, "graft", "--instruct", "org/instruct", "--base", "org/base", "--tuned", "org/tuned",
                    "--out", out, "--stream", "-q"]
        results = []
        for _ in range(args.rounds):
            clear()
            hub.log.clear()
            wall, rss = timed([str(c) for c in streamed], env=env)
            results.append((wall, rss, hub.sent()))
        wall_s, rss_s, sent = min(results)
        floor_d = dd_floor(files)
        hub.log.clear()
        floor_h = http_floor(hub, ["org/instruct", "org/base", "org/tuned"], env)
        rows.append(("graft, local folders", wall_l, size / wall_l / 1e6, rss_l, "-"))
        rows.append(("graft --stream, Hub server on loopback", wall_s, size / wall_s / 1e6, rss_s,
                     f"{sent:,} ({(sent - size) / size:+.3%})"))
        floors = (f"Floors: dd of the {len(files)} input files {floor_d:.1f} s ({size / floor_d / 1e6:.0f} MB/s, warm "
                  f"page cache); one HTTP GET of each from the server {floor_h:.1f} s ({size / floor_h / 1e6:.0f} MB/s).")
        # σ: a sample by range from the Hub server against the full scan of the local folders
        clear()
        said: list[str] = []
        t_full, _ = timed([str(c) for c in [*SHADOWMERGE, "similarity", "--base", folders[1], "--instruct", folders[0],
                                             "--out", args.work / "sim", "--force", "-q"]], stdout=said)
        full = json.loads((args.work / "sim" / "report.json").read_text())["pairs"][0]["official_sigma"]["value"]
        said = []
        hub.log.clear()
        t_sample, _ = timed([str(c) for c in [*SHADOWMERGE, "similarity", "--base", "org/base", "--instruct",
                                               "org/instruct", "--sample", args.sample, "-q"]], stdout=said, env=env)
        line = said[0].splitlines()[0]
        sampled_bytes = hub.sent()
        hub.log.clear()
        t_stream_full, _ = timed([str(c) for c in [*SHADOWMERGE, "similarity", "--base", "org/base", "--instruct",
                                                    "org/instruct", "--stream", "--out", args.work / "sim2",
                                                    "--force", "-q"]], env=env)
        full_bytes = hub.sent()
    lines = [f"### Streamed inputs ({args.size})", "", machine(), "",
             "| run | wall s | MB/s of input | peak RSS GB | bytes sent by the server (vs input size) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.2f} | {r[4]} |" for r in rows]
    lines += ["", f"Input: {size:,} bytes. {floors} Streamed throughput = "
              f"{rows[0][1] / rows[1][1]:.0%} of the local graft's (target >= 80 %).", "",
              "| σ | wall s | figure |", "|---|---|---|",
              f"| full scan, local folders | {t_full:.1f} | {full:.5f} |",
              f"| full scan, Hub ids --stream ({full_bytes:,} bytes read) | {t_stream_full:.1f} | {full:.5f} |",
              f"| --sample {args.sample}, Hub ids by range ({sampled_bytes:,} bytes read) | {t_sample:.1f} | "
              f"{line.split('official σ (mean per tensor, model.layers.N.*) ')[1].split('; weighted')[0]} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
