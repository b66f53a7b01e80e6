"""Label efficiency of the acquisition strategies: ``python -m bench.active_learning``.

A simulated annotator labels a pool of synthetic tasks in rounds of K, in the order each
strategy of :mod:`sam2unet.acquisition` asks for (scored by the same :func:`acquire` the workers
run). After each batch, the trainer's own :func:`trainer.round.run_round` fine-tunes the current
version on every label so far, evaluates candidate and current version on its held-out
labels and promotes by the paired-bootstrap rule; the current version's mIoU on a fixed test
set is recorded against the number of labels.

The pool mixes domains at unequal frequencies (:data:`POOL_MIX`: mostly easy high-contrast
objects, rare low-contrast, small, several and camouflaged ones), generated once from
:data:`POOL_SEED`; the test set has every domain equally (:data:`TEST_SEED`). Each seed starts
every strategy from the same first K random labels and the same first round. Writes
``<out>/active-learning.json``, ``.md`` (tables) and ``.png`` (curves); see
docs/active-learning.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.active_learning")

POOL_SEED = 2026
TEST_SEED = 2027
POOL_MIX: dict[str, float] = {
    "easy": 0.64,
    "low_contrast": 0.09,
    "small": 0.09,
    "several": 0.09,
    "camouflage": 0.09,
}
OUT = Path(__file__).resolve().parents[1] / "docs" / "active-learning"


@dataclass
class Options:
    strategies: list[str] = field(
        default_factory=lambda: ["random", "confidence", "tta", "diverse"]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    size: str = "test"
    image_size: int = 64
    pool: int = 120
    test: int = 50
    k: int = 6
    rounds: int = 6  # acquisition rounds after the first K random labels
    epochs: int = 5
    batch: int = 8
    lr: float = 3e-3
    threads: int = 1
    cost_images: int = 8
    cost_size: str = "tiny"
    cost_image_size: int = 352
    out: Path = OUT


def make_pool(n: int, size: int, seed: int = POOL_SEED) -> tuple[list, list[str]]:
    """``n`` (image, mask) samples drawn from :data:`POOL_MIX`, and each one's domain."""
    from sam2unet.synthetic import make_domain_sample, sample_rng

    names = list(POOL_MIX)
    p = np.array([POOL_MIX[d] for d in names])
    domains = [names[i] for i in np.random.default_rng(seed).choice(len(names), n, p=p / p.sum())]
    return [
        make_domain_sample(sample_rng(seed, i), size, d) for i, d in enumerate(domains)
    ], domains


def make_test(n: int, size: int, seed: int = TEST_SEED) -> list:
    """``n`` samples, the domains in turn (equal shares)."""
    from sam2unet.synthetic import make_domain_sample, sample_rng

    names = list(POOL_MIX)
    return [make_domain_sample(sample_rng(seed, i), size, names[i % len(names)]) for i in range(n)]


def settings_for(opts: Options, model_dir: Path):
    from contracts.settings import Settings

    return Settings(
        model_dir=model_dir,
        model_size=opts.size,
        image_size=opts.image_size,
        device="cpu",
        train_epochs=opts.epochs,
        train_batch_size=opts.batch,
        train_lr=opts.lr,
        train_min_samples=4,
    )


def test_miou(registry, version: str, test_set: list, cache: dict[str, float]) -> float:
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.validation import validate

    if version not in cache:
        loaded = registry.load(version)
        data = SegmentationDataset(
            ArraySource(test_set, labels=("object",)), loaded.config.image_size
        )
        cache[version] = validate(loaded.model, loaded.config, data, device="cpu")["miou"]
    return cache[version]


def run_strategy(
    strategy: str,
    seed: int,
    opts: Options,
    registry_dir: Path,
    pool: list,
    test_set: list,
    labelled: list[int],
    sides: dict[int, str],
) -> dict[str, Any]:
    """The rounds of one strategy from a registry whose first round is done."""
    from modelstore.registry import ModelRegistry
    from sam2unet.acquisition import acquire, select
    from sam2unet.predictor import Predictor
    from trainer.round import run_round

    settings = settings_for(opts, registry_dir)
    registry = ModelRegistry(registry_dir, None)
    rng = np.random.default_rng([seed, 7])
    labelled, sides = list(labelled), dict(sides)
    cache: dict[str, float] = {}
    curve = [(len(labelled), test_miou(registry, registry.current(), test_set, cache))]
    promoted, acquire_s, round_s = 0, 0.0, 0.0
    for _ in range(opts.rounds):
        loaded = registry.load(registry.current())
        predictor = Predictor(loaded.model, loaded.config, device="cpu", batch_size=16)
        rest = [i for i in range(len(pool)) if i not in set(labelled)]
        t0 = time.perf_counter()
        scored_ids = rest + labelled if strategy == "diverse" else rest
        acq = acquire(
            predictor,
            [pool[i][0] for i in scored_ids],
            strategy,
            keys=[f"{seed}:{i}:{registry.current()}" for i in scored_ids],
        )
        acquire_s += time.perf_counter() - t0
        u = [a.uncertainty for a in acq[: len(rest)]]
        feats = lab = None
        if strategy == "diverse":
            feats = np.stack([a.feature for a in acq[: len(rest)]])
            lab = np.stack([a.feature for a in acq[len(rest) :]])
        picks = select(strategy, u, opts.k, features=feats, labelled_features=lab, rng=rng)
        labelled += [rest[i] for i in picks]
        t0 = time.perf_counter()
        report = run_round(
            registry,
            settings,
            [(i + 1, *pool[i]) for i in labelled],
            ("object",),
            project=1,
            sides=sides,
        )
        round_s += time.perf_counter() - t0
        sides = report.sides
        promoted += report.status == "promoted"
        curve.append((len(labelled), test_miou(registry, registry.current(), test_set, cache)))
        log.info("seed %d %s: %d labels, test mIoU %.4f (%s)", seed, strategy, *curve[-1],
                 report.status)  # fmt: skip
    return {
        "strategy": strategy,
        "seed": seed,
        "labels": [c[0] for c in curve],
        "miou": [c[1] for c in curve],
        "promoted": promoted,
        "acquire_seconds": acquire_s,
        "round_seconds": round_s,
        "picked_domains": labelled,
    }


def run_seed(seed: int, opts: Options, pool: list, test_set: list, tmp: Path) -> list[dict]:
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from trainer.round import run_round

    base = tmp / f"seed{seed}-base"
    settings = settings_for(opts, base)
    registry = ModelRegistry(base, None)
    ensure_current_version(registry, settings)
    first = [int(i) for i in np.random.default_rng([seed, 1]).permutation(len(pool))[: opts.k]]
    report = run_round(
        registry, settings, [(i + 1, *pool[i]) for i in first], ("object",), project=1
    )
    log.info("seed %d: first round on %d random labels: %s", seed, len(first), report.status)
    out = []
    for strategy in opts.strategies:
        d = tmp / f"seed{seed}-{strategy}"
        shutil.copytree(base, d)
        out.append(run_strategy(strategy, seed, opts, d, pool, test_set, first, report.sides))
        shutil.rmtree(d, ignore_errors=True)
    return out


def summarise(runs: list[dict], strategies: Sequence[str]) -> dict[str, Any]:
    """Mean and spread per strategy; labels to reach random order's final mean mIoU; AUC."""
    table: dict[str, Any] = {}
    for s in strategies:
        rs = [r for r in runs if r["strategy"] == s]
        if not rs:
            continue
        m = np.array([r["miou"] for r in rs])
        labels = rs[0]["labels"]
        table[s] = {
            "labels": labels,
            "mean": m.mean(axis=0).tolist(),
            "std": m.std(axis=0, ddof=1).tolist() if len(rs) > 1 else [0.0] * len(labels),
            "seeds": len(rs),
            "auc": float(np.trapezoid(m.mean(axis=0), labels) / (labels[-1] - labels[0])),
            "auc_per_seed": [float(np.trapezoid(r, labels) / (labels[-1] - labels[0])) for r in m],
            "final": float(m.mean(axis=0)[-1]),
        }
    if "random" in table:
        target = table["random"]["final"]
        n_random = table["random"]["labels"][-1]
        for row in table.values():
            reach = [n for n, v in zip(row["labels"], row["mean"], strict=True) if v >= target]
            row["labels_to_random_final"] = reach[0] if reach else None
            row["share_of_random_labels"] = reach[0] / n_random if reach else None
    return table


def acquisition_costs(opts: Options) -> dict[str, float]:
    """Seconds per image of each strategy's :func:`acquire` (prediction included) with a
    random model of ``cost_size`` at ``cost_image_size`` on 480 x 640 images, one image
    per forward pass as a CPU worker runs."""
    from sam2unet.acquisition import STRATEGIES, acquire
    from sam2unet.config import ModelConfig
    from sam2unet.predictor import Predictor
    from sam2unet.random_weights import random_model
    from sam2unet.synthetic import generate

    loaded = random_model(ModelConfig(size=opts.cost_size, image_size=opts.cost_image_size))
    pred = Predictor(loaded.model, loaded.config, device="cpu", batch_size=1)
    images = [img for img, _ in generate(opts.cost_images, (480, 640), seed=3)]
    acquire(pred, images[:1], "tta")  # warm-up
    out = {}
    for s in STRATEGIES:
        t0 = time.perf_counter()
        acquire(pred, images, s)
        out[s] = (time.perf_counter() - t0) / len(images)
    return out


def plot(table: dict[str, Any], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s, row in table.items():
        x, m, sd = np.array(row["labels"]), np.array(row["mean"]), np.array(row["std"])
        ax.plot(x, m, marker="o", label=f"{s} (AUC {row['auc']:.3f})")
        ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    if "random" in table:
        ax.axhline(table["random"]["final"], color="#9e9e9e", ls="--", lw=1,
                   label="random order's final mIoU")  # fmt: skip
    ax.set_xlabel("labelled tasks")
    ax.set_ylabel("test-set mIoU (current version)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", facecolor="white")


def markdown(table: dict[str, Any], costs: dict[str, float], opts: Options, meta: dict) -> str:
    lines = [
        f"Command: `{meta['command']}`  ",
        f"{meta['seeds']} seed(s) per strategy, pool {opts.pool}, test set {opts.test}, "
        f"K = {opts.k}, {opts.rounds} acquisition rounds after {opts.k} random labels, model "
        f"`{opts.size}` at {opts.image_size} px, {opts.epochs} epochs per round; "
        f"{meta['minutes']:.1f} min wall time.",
        "",
        "| strategy | final mIoU (mean ± sd) | labels to reach random's final | share of random's "
        "labels | AUC (mean ± sd over seeds) | promotions |",
        "|---|---|---|---|---|---|",
    ]
    for s, row in table.items():
        reach = row.get("labels_to_random_final")
        share = row.get("share_of_random_labels")
        lines.append(
            f"| {s} | {row['final']:.4f} ± {row['std'][-1]:.4f} | "
            f"{reach if reach is not None else 'not reached'} | "
            f"{f'{share:.0%}' if share is not None else '-'} | "
            f"{row['auc']:.4f} ± {np.std(row['auc_per_seed'], ddof=1) if row['seeds'] > 1 else 0:.4f}"
            f" | {row.get('promotions', '-')} |"
        )
    lines += ["", "Mean test mIoU per number of labels:", ""]
    first = next(iter(table.values()))
    lines.append("| strategy | " + " | ".join(str(n) for n in first["labels"]) + " |")
    lines.append("|---|" + "---|" * len(first["labels"]))
    for s, row in table.items():
        lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in row["mean"]) + " |")
    if costs:
        lines += [
            "",
            f"Acquisition cost per image (`{opts.cost_size}` model at {opts.cost_image_size} px, "
            "480 x 640 images, one image per forward pass, CPU; prediction included):",
            "",
            "| strategy | seconds / image | vs confidence |",
            "|---|---|---|",
        ]
        for s, v in costs.items():
            lines.append(f"| {s} | {v:.3f} | {v / costs['confidence']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench.active_learning", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="the tiny model size at 352 px (slow)")
    p.add_argument("--quick", action="store_true", help="2 strategies, 1 seed, 2 rounds (smoke)")
    p.add_argument("--strategies", help=f"comma-separated (default {','.join(d.strategies)})")
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="seeds per strategy (3)")
    p.add_argument("--pool", type=int, default=d.pool)
    p.add_argument("--test", type=int, default=d.test)
    p.add_argument("--k", type=int, default=d.k, help=f"tasks labelled per round ({d.k})")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (1)")
    p.add_argument("--no-cost", action="store_true", help="skip the cost-per-image measurement")
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    opts = Options(
        seeds=list(range(a.seeds)),
        pool=a.pool,
        test=a.test,
        k=a.k,
        rounds=a.rounds,
        epochs=a.epochs,
        threads=a.threads,
        out=a.out,
        cost_images=0 if a.no_cost else d.cost_images,
    )
    if a.strategies:
        opts.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    if a.tiny:
        opts.size, opts.image_size, opts.batch = "tiny", 352, 4
    if a.quick:
        opts.strategies, opts.seeds, opts.rounds = opts.strategies[:2], [0], 2
        opts.pool, opts.test, opts.epochs, opts.cost_images = 40, 10, 1, 0
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    from sam2unet.acquisition import check_strategy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = parse_args(argv)
    for s in opts.strategies:
        check_strategy(s)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    t0 = time.time()
    pool, domains = make_pool(opts.pool, opts.image_size)
    test_set = make_test(opts.test, opts.image_size)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-al-") as tmp:
        for seed in opts.seeds:
            runs += run_seed(seed, opts, pool, test_set, Path(tmp))
    for r in runs:
        picked = r.pop("picked_domains")
        r["picked_domains"] = {d: sum(domains[i] == d for i in picked) for d in POOL_MIX}
    table = summarise(runs, opts.strategies)
    for s, row in table.items():
        row["promotions"] = sum(r["promoted"] for r in runs if r["strategy"] == s)
        row["picked_domains"] = {
            d: float(np.mean([r["picked_domains"][d] for r in runs if r["strategy"] == s]))
            for d in POOL_MIX
        }
    costs = acquisition_costs(opts) if opts.cost_images else {}
    meta = {
        "command": "python -m bench.active_learning "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": len(opts.seeds),
        "minutes": (time.time() - t0) / 60,
        "pool_domains": {d: domains.count(d) for d in POOL_MIX},
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    data = {"options": {**asdict(opts), "out": str(opts.out)}, "meta": meta, "table": table,
            "runs": runs, "costs": costs}  # fmt: skip
    (opts.out / "active-learning.json").write_text(json.dumps(data, indent=2))
    (opts.out / "active-learning.md").write_text(markdown(table, costs, opts, meta))
    plot(table, opts.out / "active-learning.png",
         f"{meta['seeds']} seeds, K={opts.k}, pool {opts.pool} ({opts.size} model)")  # fmt: skip
    print((opts.out / "active-learning.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
