"""Terminal rendering of an evaluation report (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .evaluation import Report


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"[bold]{report.model}[/] on {report.dataset} {report.split} ({report.count:,} images): "
        f"accuracy [bold]{report.accuracy:.2%}[/], loss {report.loss:.4f}, "
        f"calibration error (ECE) {report.ece:.4f}"
    )
    scores = Table(title="per class", title_justify="left")
    for column in ("class", "precision", "recall", "F1", "support"):
        scores.add_column(column, justify="right")
    for s in report.per_class:
        scores.add_row(s["class"], f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", str(s["support"]))
    console.print(scores)
    confusion = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("")
    for name in report.class_names:
        confusion.add_column(name[:5], justify="right")
    for i, row in enumerate(report.confusion):
        cells = [f"[bold green]{v}[/]" if i == j else (f"[red]{v}[/]" if v else "[dim]0[/]") for j, v in enumerate(row)]
        confusion.add_row(report.class_names[i][:5], *cells)
    console.print(confusion)
    if report.mistakes:
        worst = ", ".join(
            f"#{m['index']} {report.class_names[m['true']]}->{report.class_names[m['predicted']]} "
            f"({m['confidence']:.0%})"
            for m in report.mistakes[:5]
        )
        console.print(f"most confident mistakes: {worst}")
    if report.selective:
        reject = Table(title="what --reject-below buys (calibrated confidence)", title_justify="left")
        for column in ("reject below", "answers kept", "accuracy on them"):
            reject.add_column(column, justify="right")
        for row in report.selective:
            reject.add_row(f"{row['threshold']:.0%}", f"{row['kept']:.2%}", f"{row['accuracy']:.2%}")
        console.print(reject)
    for kind, path in report.files.items():
        console.print(f"wrote {kind}: {path}")
