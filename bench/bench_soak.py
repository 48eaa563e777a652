"""Soak test: a whole phantom session (12 runs, about an hour of scanning) replayed at 20x.

For each run of session 1 of the calibrated subject, the phantom scanner writes the volumes (Siemens
MOSAIC, partial writes) into a fresh export folder at ``--speed`` times real time while the live
session (watcher, front end, journal, publisher, decoder) processes them and a subscriber receives
every message. Measured per run and over the session:

- end-to-end latency, file complete -> message published, for volume messages and for decode
  messages (median, p95);
- decode backlog: reconstructions skipped because decoding fell behind (0 means no backlog);
- resident memory after each run (flat memory: the growth from the second run to the last);
- messages lost at the subscriber (gaps in sequence numbers).

Needs a subject bundle (``rtdecoder demo`` writes one to ``rtdecoder-demo/bundle``). Prints a
table and writes ``bench/results/soak.json``::

    python bench/bench_soak.py --bundle rtdecoder-demo/bundle [--speed 20] [--runs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--bundle", type=Path, default=Path("rtdecoder-demo/bundle"))
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=None, help="default: a whole session")
    parser.add_argument("--session", type=int, default=1, help="phantom session to replay (0 is calibration)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)

    import torch

    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.config import load_config
    from rtdecoder.phantom.decoding import phantom_live_decoder
    from rtdecoder.phantom.world import PhantomWorld
    from rtdecoder.session.demo import scan_and_decode
    from rtdecoder.session.runner import LiveSession, RunPlan

    torch.set_num_threads(1)
    config = load_config(args.config, overrides={
        "publish": {"result_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"},
        "session": {"heartbeat_s": 0.2},
    })
    bundle = SubjectBundle.load(args.bundle)
    world = PhantomWorld(config, progress=False)
    subject = config.phantom.n_subjects - 1
    decoder = phantom_live_decoder(bundle, config)
    n_runs = args.runs or config.experiment.runs_per_session
    work = Path(tempfile.mkdtemp(prefix="rtdecoder-soak-"))
    session_dir = work / "session"
    rows, all_volume_ms, all_decode_ms, lost = [], [], [], 0
    started = time.monotonic()
    try:
        for run in range(n_runs):
            simulated = world.simulate_run(subject, args.session, run)
            label = f"run-{run + 1:02d}"
            watch = work / label
            watch.mkdir()
            plan = RunPlan(label, watch, simulated.volumes.shape[3], simulated.tr_s, simulated.trials)
            session = LiveSession(config, bundle, session_dir, decoder)
            summary, received = scan_and_decode(session, plan, simulated, args.speed, series_number=run + 1)
            seqs = [m.seq for m in received]
            gaps = len(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
            lost += gaps
            volume_ms = [1000 * (m.t["published"] - m.t["file_complete"]) for m in received
                         if m.topic == "volume" and m.t.get("file_complete")]
            decode_ms = [1000 * (m.t["published"] - m.t["file_complete"]) for m in received
                         if m.topic == "decode" and m.t.get("file_complete")]
            all_volume_ms += volume_ms
            all_decode_ms += decode_ms
            rows.append({
                "run": label,
                "volumes": summary.n_volumes,
                "missing": summary.n_missing,
                "decoded": summary.n_decoded,
                "skipped_reconstructions": summary.n_skipped_reconstructions,
                "volume_ms_median": float(np.median(volume_ms)),
                "volume_ms_p95": float(np.percentile(volume_ms, 95)),
                "decode_ms_median": float(np.median(decode_ms)) if decode_ms else None,
                "decode_ms_p95": float(np.percentile(decode_ms, 95)) if decode_ms else None,
                "lost_at_subscriber": gaps,
                "rss_mb": round(rss_mb(), 1),
            })
            shutil.rmtree(watch)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        "benchmark": "soak",
        "config": args.config,
        "speed": args.speed,
        "runs": rows,
        "session_seconds": round(time.monotonic() - started, 1),
        "scanned_seconds": round(sum(r["volumes"] + r["missing"] for r in rows) * config.scanner.tr_s, 1),
        "volume_ms_median": float(np.median(all_volume_ms)),
        "volume_ms_p95": float(np.percentile(all_volume_ms, 95)),
        "decode_ms_median": float(np.median(all_decode_ms)) if all_decode_ms else None,
        "decode_ms_p95": float(np.percentile(all_decode_ms, 95)) if all_decode_ms else None,
        "skipped_reconstructions": sum(r["skipped_reconstructions"] for r in rows),
        "lost_at_subscriber": lost,
        "rss_growth_mb_run2_to_last": round(rows[-1]["rss_mb"] - rows[min(1, len(rows) - 1)]["rss_mb"], 1),
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    header = f"{'run':8s} {'vols':>5s} {'dec':>4s} {'skip':>5s} {'vol ms p50/p95':>16s} {'decode ms p50/p95':>20s}"
    print(f"\n{header} {'RSS MB':>8s}")
    for r in rows:
        decode = f"{r['decode_ms_median'] or 0:.0f}/{r['decode_ms_p95'] or 0:.0f}"
        print(f"{r['run']:8s} {r['volumes']:5d} {r['decoded']:4d} {r['skipped_reconstructions']:5d} "
              f"{r['volume_ms_median']:7.1f}/{r['volume_ms_p95']:<8.1f} {decode:>20s} {r['rss_mb']:8.1f}")
    print(f"\nsession: {payload['scanned_seconds']:.0f} s of scanning replayed in {payload['session_seconds']:.0f} s; "
          f"file complete -> published: volumes {payload['volume_ms_median']:.1f}/{payload['volume_ms_p95']:.1f} ms, "
          f"decodes {payload['decode_ms_median'] or 0:.0f}/{payload['decode_ms_p95'] or 0:.0f} ms (median/p95); "
          f"skipped reconstructions {payload['skipped_reconstructions']}; lost {lost}; "
          f"RSS growth {payload['rss_growth_mb_run2_to_last']} MB")
    return payload


if __name__ == "__main__":
    main()
