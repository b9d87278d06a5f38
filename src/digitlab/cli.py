"""The `digitlab` command: a thin typer layer over the library. Every command calls a library function.

Errors: a DigitlabError prints one line (`digitlab: error: ...`) and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import DigitlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build, train, explain and serve neural networks that read handwritten digits (MNIST).",
)
data_app = typer.Typer(no_args_is_help=True, help="Find, download and verify datasets in MNIST's format.")
app.add_typer(data_app, name="data")

DataOpt = typer.Option(None, "--data", help="Dir with the four IDX files (else $DIGITLAB_DATA, then the user cache).")
DatasetOpt = typer.Option("mnist", "--dataset", help="mnist or fashion-mnist.")
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit."""
    typer.echo(f"digitlab: error: {message}", err=True)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------------------
# data / explore / tour
# ----------------------------------------------------------------------------------------------------------


@data_app.command("verify")
def data_verify(
    directory: Optional[Path] = typer.Argument(None, help="Data dir (default: wherever digitlab finds the data)."),
    dataset: str = DatasetOpt,
) -> None:
    """Check the MD5 of the four decompressed files."""
    from . import data

    spec = data.get_spec(dataset)
    if directory is None:
        directory = Path(data.locate(None, spec, download=False)["train_images"]).parent
    for path, md5 in data.verify(directory, spec).items():
        typer.echo(f"ok  {md5}  {path}")
    typer.echo(f"{spec.title} in {directory}: all four files verified")


@data_app.command("download")
def data_download(directory: Optional[Path] = typer.Argument(None), dataset: str = DatasetOpt) -> None:
    """Download the four files (verified by MD5) into DIR, by default the user cache."""
    from . import data

    spec = data.get_spec(dataset)
    target = directory or data.cache_dir(spec.name)
    data.download_dataset(spec, target)
    typer.echo(f"{spec.title} ready in {target}")


@data_app.command("where")
def data_where(data_dir: Optional[Path] = DataOpt, dataset: str = DatasetOpt) -> None:
    """Print where digitlab looks for the data, in order, and where it finds it."""
    from . import data

    spec = data.get_spec(dataset)
    for directory in data.candidate_dirs(data_dir, spec):
        found = "found" if data.find_files(directory) else "-"
        typer.echo(f"{found:6} {directory}")


@app.command()
def explore(
    data_dir: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    grid: Optional[Path] = typer.Option(None, "--grid", help="Write a labelled grid of sample digits (PNG)."),
    index: int = typer.Option(0, "--index", help="Which training image to draw in the terminal."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """A tour of the dataset: sizes, what an item is, class counts, pixel statistics, a digit."""
    from .explore import explore as run_explore

    run_explore(data_dir, dataset, grid=grid, index=index, seed=seed)


@app.command()
def tour(
    data_dir: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(300, "--steps", help="Training steps in the short training part."),
) -> None:
    """The classic tutorial, run for real and explained step by step."""
    from .explore import tour as run_tour

    run_tour(data_dir, device=device, seed=seed, steps=steps)


def main() -> None:
    try:
        app()
    except DigitlabError as exc:
        typer.echo(f"digitlab: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("digitlab: interrupted", err=True)
        sys.exit(130)
