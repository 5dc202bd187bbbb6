"""Showing a comparison: a terminal table with deltas, and an HTML or PNG curve of hit_rate@k."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from embedlift.models.errors import InvalidInputError
from embedlift.training.evaluate import CURVE_KS, Comparison
from embedlift.training.metrics import metric_names


def comparison_table(comparison: Comparison, title: str = "") -> Table:
    """Metrics as rows, base and adapters as columns; an adapter's cell shows value, delta and its 95% CI."""
    table = Table(title=title or None, show_lines=False)
    table.add_column("metric")
    for r in comparison.results:
        table.add_column(escape(r.name), justify="right")  # "base [int8]" is not rich markup
    base = comparison.results[0]
    for m in comparison.names or metric_names(comparison.ks):
        cells = [f"{base.metrics[m]:.4f}"]
        for r in comparison.results[1:]:
            if m not in comparison.deltas[r.name]:  # triplet accuracy has no lexical or hybrid value
                cells.append("")
                continue
            d, lo, hi = comparison.deltas[r.name][m]
            colour = "green" if lo > 0 else "red" if hi < 0 else "default"
            cells.append(f"{r.metrics[m]:.4f} [{colour}]{d:+.4f} [{lo:+.3f}, {hi:+.3f}][/{colour}]")
        table.add_row(m, *cells)
    return table


def _figure(comparison: Comparison) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in comparison.results:
        ax.plot(CURVE_KS, r.curve, marker="o", label=r.name)
    ax.set_xlabel("k")
    ax.set_ylabel("hit rate @ k")
    ax.set_xticks(list(CURVE_KS))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"hit_rate@k, {len(comparison.query_ids)} queries, {comparison.n_docs} documents")
    fig.tight_layout()
    return fig, plt


def write_report(comparison: Comparison, path: str | os.PathLike[str]) -> Path:
    """Draw hit_rate@k for k = 1..10 of the base and every adapter, to ``.png`` or ``.html``."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".html", ".htm"):
        raise InvalidInputError(f"--report must end in .html or .png, got {out.name!r}")
    fig, plt = _figure(comparison)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".png":
            fig.savefig(out)
            return out
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    header = "".join(f"<th>{html.escape(r.name)}</th>" for r in comparison.results)
    rows = "".join(
        f"<tr><td>{m}</td>" + "".join(f"<td>{r.metrics[m]:.4f}</td>" for r in comparison.results) + "</tr>"
        for m in metric_names(comparison.ks)
    )
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>embedlift eval</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body><h1>embedlift eval</h1>"
        f"<img alt='hit_rate@k for k = 1..10' src='data:image/png;base64,{img}'>"
        f"<table><tr><th>metric</th>{header}</tr>{rows}</table></body></html>\n"
    )
    return out
