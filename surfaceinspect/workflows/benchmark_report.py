"""What ``surfaceinspect benchmark`` reports: seeds aggregated, ``report.md``'s tables, the terminal summary,
and how well ``--method auto``'s evidence ranked its candidates (rank agreement)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

AGGREGATED = ("image_auroc", "pixel_auroc", "aupro", "f1_calibrated")


def aggregate_seeds(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation, min and max over seeds of each dataset x method run more than once."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["dataset"], e["method"]), []).append(e)
    out = []
    for (dataset, method), runs in groups.items():
        if len(runs) < 2:
            continue
        stats: dict[str, Any] = {}
        for key in AGGREGATED:
            values = [r["accuracy"][key] for r in runs if r["accuracy"].get(key) is not None]
            if values:
                stats[key] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "min": float(np.min(values)),
                    "max": float(np.max(values)),
                }
        seconds = [r["training"]["train_seconds"] for r in runs if "training" in r]
        out.append(
            {
                "dataset": dataset,
                "method": method,
                "seeds": [r["seed"] for r in runs],
                "accuracy": stats,
                "train_seconds_mean": float(np.mean(seconds)) if seconds else None,
            }
        )
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def _fmt_stats(stats: dict[str, float] | None) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['min']:.3f} – {stats['max']:.3f})"


def report_markdown(report: dict[str, Any], roc_datasets: list[str] | None = None) -> str:
    """The tables of ``report.md``."""
    m = report["machine"]
    lines = [
        "# surfaceinspect benchmark",
        "",
        f"{report['created']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']} · "
        f"CUDA: {m['cuda'] or 'none'} · surfaceinspect {m['surfaceinspect']}"
        + (" · QUICK MODE" if report["quick"] else ""),
        "",
        "## Accuracy",
        "",
        "| dataset | method | profile | seed | image AUROC | image AP | F1 @ calibrated thr | best F1 | pixel AUROC "
        "| AUPRO@0.3 | FRR on test good | recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["entries"]:
        a = e["accuracy"]
        lines.append(
            f"| {e['dataset']} | {e['method']} | {e['profile']} | {_fmt(e.get('seed'))} | {_fmt(a['image_auroc'])} | "
            f"{_fmt(a['image_ap'])} | "
            f"{_fmt(a['f1_calibrated'])} | {_fmt(a['f1_best'])} | {_fmt(a['pixel_auroc'])} | {_fmt(a['aupro'])} | "
            f"{_fmt(a['false_reject_rate_test'])} | {_fmt(a['recall_test'])} |"
        )
    if report.get("aggregates"):
        lines += [
            "",
            "## Across seeds (mean ± std, min – max)",
            "",
            "| dataset | method | seeds | image AUROC | pixel AUROC | AUPRO@0.3 | F1 @ calibrated thr "
            "| train s (mean) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in report["aggregates"]:
            cells = [_fmt_stats(g["accuracy"].get(key)) for key in AGGREGATED]
            lines.append(
                f"| {g['dataset']} | {g['method']} | {', '.join(str(x) for x in g['seeds'])} | "
                + " | ".join(cells)
                + f" | {_fmt(g['train_seconds_mean'], 0)} |"
            )
    lines += [
        "",
        "## Per defect type (each type against the good test images)",
        "",
        "| dataset | method | seed | defect type | n | image AUROC | recall @ thr | pixel AUROC | AUPRO@0.3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["entries"]:
        for t, a in e["accuracy"]["per_defect_type"].items():
            lines.append(
                f"| {e['dataset']} | {e['method']} | {_fmt(e.get('seed'))} | {t} | {a['n']} | "
                f"{_fmt(a['image_auroc'])} | {_fmt(a['recall_test'])} | {_fmt(a.get('pixel_auroc'))} | "
                f"{_fmt(a.get('aupro'))} |"
            )
    lines += [
        "",
        "## Cost",
        "",
        "| dataset | method | seed | train s | train img/s (1st / later epochs) | peak RSS train MB | infer img/s b=1 "
        "| infer img/s batched (b) | latency p50 / p95 ms | end-to-end img/s | peak RSS infer MB | threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["entries"]:
        t = e.get("training", {})
        i = e["inference"]
        lines.append(
            f"| {e['dataset']} | {e['method']} | {_fmt(e.get('seed'))} | {_fmt(t.get('train_seconds'), 0)} | "
            f"{_fmt(t.get('train_images_per_s_first_epoch'), 2)} / "
            f"{_fmt(t.get('train_images_per_s_later_epochs'), 2)} | "
            f"{_fmt(t.get('peak_rss_train_mb'), 0)} | {_fmt(i['inference_images_per_s_batch1'], 2)} | "
            f"{_fmt(i['inference_images_per_s_batched'], 2)} ({i['batched_batch_size']}) | "
            f"{_fmt(i['latency_ms_p50'], 1)} / {_fmt(i['latency_ms_p95'], 1)} | "
            f"{_fmt(i['end_to_end_images_per_s'], 2)} | "
            f"{_fmt(i['peak_rss_inference_mb'], 0)} | {_fmt(t.get('threads'))} |"
        )
    lines += _operating_points_markdown(report)
    lines += _selection_markdown(report)
    if roc_datasets:
        lines += ["", "## ROC curves", ""] + [f"![ROC {d}](roc_{d}.png)" for d in roc_datasets]
    return "\n".join(lines) + "\n"


def rank_agreement(rows: list[dict[str, Any]], evidence: str = "auroc_evidence") -> dict[str, float | None]:
    """Spearman and Kendall correlation between the candidates' ``evidence`` figure (what auto ranked them
    by; the pooled synthetic AUROC in reports from before it was stored) and their real test AUROC."""
    from scipy.stats import kendalltau, spearmanr

    pairs = [(r.get(evidence, r.get("auroc_synthetic")), r.get("test_image_auroc")) for r in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(pairs) < 3:
        return {"spearman": None, "kendall": None, "n": len(pairs)}
    x, y = zip(*pairs, strict=True)
    rho, tau = spearmanr(x, y).statistic, kendalltau(x, y).statistic
    return {
        "spearman": None if np.isnan(rho) else round(float(rho), 3),
        "kendall": None if np.isnan(tau) else round(float(tau), 3),
        "n": len(pairs),
    }


def _operating_points_markdown(report: dict[str, Any]) -> list[str]:
    rows = [(e, p) for e in report["entries"] for p in e["accuracy"].get("operating_points", [])]
    if not rows:
        return []
    lines = [
        "",
        "## Operating points (thresholds from the held-out good images, measured on the test set)",
        "",
        "| dataset | method | seed | false-reject target | threshold | false rejects (test good) | recall (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {e['dataset']} | {e['method']} | {_fmt(e.get('seed'))} | {p['false_reject_target']:g} | "
        f"{_fmt(p['threshold'], 5)} | {_fmt(p['false_reject_test'])} | {_fmt(p['recall_test'])} |"
        for e, p in rows
    ]
    return lines


def _selection_markdown(report: dict[str, Any]) -> list[str]:
    """``--method auto`` entries: the candidate table with each probe's real test AUROC, and rank agreement."""
    entries = [e for e in report["entries"] if e.get("selection")]
    if not entries:
        return []
    lines = [
        "",
        "## Detector selection (--method auto)",
        "",
        "Each candidate after its probe steps: AUROC on the held-out evidence (what auto chooses by) and on the "
        "real test images (what it should predict). Rank agreement: Spearman / Kendall over the candidates.",
        "",
        "| dataset | seed | candidate | steps | train min | AUROC evidence | AUROC test (probe) | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for r in e["selection"]["candidates"]:
            lines.append(
                f"| {e['dataset']} | {_fmt(e.get('seed'))} | {r['name']} | {r['steps']}/{r['planned_steps']} | "
                f"{_fmt(r['train_s'] / 60, 1)} | {_fmt(r.get('auroc_evidence', r.get('auroc_synthetic')))} | "
                f"{_fmt(r.get('test_image_auroc'))} | {'✔' if r['chosen'] else ''} |"
            )
    lines += [
        "",
        "| dataset | seed | chosen | test AUROC (finished) | Spearman | Kendall | candidates |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        agreement = rank_agreement(e["selection"]["candidates"])
        lines.append(
            f"| {e['dataset']} | {_fmt(e.get('seed'))} | {e['selection']['chosen']} | "
            f"{_fmt(e['accuracy']['image_auroc'])} | {_fmt(agreement['spearman'])} | {_fmt(agreement['kendall'])} | "
            f"{agreement['n']} |"
        )
    lines += [""] + [f"- {e['dataset']} seed {_fmt(e.get('seed'))}: {e['selection']['reason']}" for e in entries]
    points = [(e, p) for e in entries for p in e["selection"].get("operating_points", [])]
    real = {
        (e["dataset"], e.get("seed"), f"{p['false_reject_target']:g}"): p
        for e in entries
        for p in e["accuracy"].get("operating_points", [])
    }
    if points:
        lines += [
            "",
            "Operating points of the chosen detector, from held-out good images and synthetic anomalies:",
            "",
            "| dataset | seed | false-reject target | threshold | FR held-out | catch synthetic | FR test "
            "| recall test |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e, p in points:
            r = real.get((e["dataset"], e.get("seed"), p["false_reject_target"]), {})
            lines.append(
                f"| {e['dataset']} | {_fmt(e.get('seed'))} | {p['false_reject_target']} | {_fmt(p['threshold'], 5)} | "
                f"{_fmt(p['false_reject_held_out'])} | {_fmt(p['catch_synthetic'])} | "
                f"{_fmt(r.get('false_reject_test'))} | {_fmt(r.get('recall_test'))} |"
            )
    return lines


def summary_table(report: dict[str, Any]) -> Table:
    """A compact rich table of the report for the terminal."""
    table = Table(title="benchmark" + (" (quick)" if report["quick"] else ""))
    for column in (
        "dataset",
        "method",
        "seed",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "F1@thr",
        "train s",
        "img/s b=1",
        "img/s batched",
    ):
        table.add_column(column, justify="right" if column[0] in "iptFA" else "left")
    for e in report["entries"]:
        a, i, t = e["accuracy"], e["inference"], e.get("training", {})
        table.add_row(
            Text(e["dataset"]),  # a folder name: shown as it is, never parsed as markup
            e["method"],
            _fmt(e.get("seed")),
            _fmt(a["image_auroc"]),
            _fmt(a["pixel_auroc"]),
            _fmt(a["aupro"]),
            _fmt(a["f1_calibrated"]),
            _fmt(t.get("train_seconds"), 0),
            _fmt(i["inference_images_per_s_batch1"], 2),
            _fmt(i["inference_images_per_s_batched"], 2),
        )
    for g in report.get("aggregates", []):
        acc = g["accuracy"]
        table.add_row(
            g["dataset"],
            g["method"],
            "mean",
            *(f"{acc[k]['mean']:.3f}±{acc[k]['std']:.3f}" if k in acc else "—" for k in AGGREGATED[:3]),
            f"{acc['f1_calibrated']['mean']:.3f}" if "f1_calibrated" in acc else "—",
            _fmt(g["train_seconds_mean"], 0),
            "",
            "",
        )
    return table
