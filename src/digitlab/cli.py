"""The `digitlab` command: a thin typer layer over the library. Every command calls a library function.

Errors: a DigitlabError prints one line (`digitlab: error: ...`) and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer

from .errors import DigitlabError
from .extras import require

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
TtaOpt = typer.Option(
    False, "--tta", help="Test-time augmentation: average over the image and 4 one-pixel shifts (5x the work)."
)


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
    from . import datafiles

    spec = datafiles.get_spec(dataset)
    if directory is None:
        directory = Path(datafiles.locate(None, spec, download=False)["train_images"]).parent
    for path, md5 in datafiles.verify(directory, spec).items():
        typer.echo(f"ok  {md5}  {path}")
    typer.echo(f"{spec.title} in {directory}: all four files verified")


@data_app.command("download")
def data_download(directory: Optional[Path] = typer.Argument(None), dataset: str = DatasetOpt) -> None:
    """Download the four files (verified by MD5) into DIR, by default the user cache."""
    from . import datafiles

    spec = datafiles.get_spec(dataset)
    target = directory or datafiles.cache_dir(spec.name)
    datafiles.download_dataset(spec, target)
    typer.echo(f"{spec.title} ready in {target}")


@data_app.command("where")
def data_where(data_dir: Optional[Path] = DataOpt, dataset: str = DatasetOpt) -> None:
    """Print where digitlab looks for the data, in order, and where it finds it."""
    from . import datafiles

    spec = datafiles.get_spec(dataset)
    for directory in datafiles.candidate_dirs(data_dir, spec):
        found = "found" if datafiles.find_files(directory) else "-"
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
    steps: int = typer.Option(300, "--steps", min=1, help="Training steps in the short training part."),
) -> None:
    """The classic tutorial, run for real and explained step by step."""
    from .explore import tour as run_tour

    run_tour(data_dir, device=device, seed=seed, steps=steps)


# ----------------------------------------------------------------------------------------------------------
# train / evaluate
# ----------------------------------------------------------------------------------------------------------


# `train` options -> TrainConfig fields, where the names differ
_TRAIN_FIELDS = {"data_dir": "data"}


@app.command()
def train(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="mlp (the tutorial's network, the default) or cnn."),
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="A named recipe (see --list-recipes): quick, best, ... Default: the model's own (mlp or cnn).",
    ),
    list_recipes: bool = typer.Option(
        False, "--list-recipes", help="Name each recipe with what it measured, and exit."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: the recipe's (mlp 2, cnn 16)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (default 256)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the model's recipe)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd, adam or adamw (default adamw)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="none, onecycle or cosine (default onecycle)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random shifts/rotations/scales."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    val_size: int = typer.Option(5000, "--val-size", help="Training images held out for validation."),
    seed: int = typer.Option(0, "--seed", help="Seeds every random source."),
    device: str = DeviceOpt,
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    data_dir: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Run dir (default runs/<timestamp>-<model>)."),
    resume: Optional[Path] = typer.Option(
        None,
        "--resume",
        help="Continue the run in this dir (with its own "
        "settings: only --device, --data, --quiet, --tensorboard and, without a "
        "schedule, --epochs may be given).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (else an error)."),
    target_accuracy: Optional[float] = typer.Option(None, "--target-accuracy", help="Stop once val accuracy >= P."),
    tensorboard: Optional[Path] = typer.Option(
        None,
        "--tensorboard",
        help="Also write each epoch's metrics as TensorBoard scalars into this dir (the tensorboard extra).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a model; writes config, metrics, curves and checkpoints to a run dir."""
    if list_recipes:
        from .training import describe_recipes

        for line in describe_recipes():
            typer.echo(line)
        return
    from .threads import configure as configure_threads

    configure_threads("train")  # before torch is imported: libgomp reads its settings once, when loaded
    if resume is not None:  # options given with --resume must not contradict the run: say so before any work
        from .training import ConfigError, check_resume_options

        def typed(name: str) -> bool:  # given on the command line (or by environment), not a default
            return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("COMMANDLINE", "ENVIRONMENT")

        given = {
            _TRAIN_FIELDS.get(name, name): str(value) if isinstance(value, Path) else value
            for name, value in ctx.params.items()
            if value is not None and typed(name)
        }
        try:
            check_resume_options(resume, given)
        except ConfigError as exc:
            fail(str(exc), 2)
    if resume is None:
        from .datafiles import prefetch

        prefetch(data_dir, dataset)  # read the files in the background while torch imports (below)
    from .training import TrainConfig, TrainingInterrupted
    from .training import train as run_train

    config = TrainConfig(
        model=model,
        recipe=recipe,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=weight_decay,
        augment=augment,
        label_smoothing=label_smoothing,
        val_size=val_size,
        seed=seed,
        device=device,
        precision=precision,
        data=str(data_dir) if data_dir else None,
        dataset=dataset,
        out=str(out) if out else None,
        resume=str(resume) if resume else None,
        overwrite=overwrite,
        quiet=quiet,
        target_accuracy=target_accuracy,
        tensorboard=str(tensorboard) if tensorboard else None,
    )
    try:
        result = run_train(config)
    except TrainingInterrupted as exc:
        typer.echo(f"digitlab: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if quiet and result.rank == 0:
        typer.echo(f"test accuracy {result.test_accuracy:.4f}  {result.dir}")


@app.command()
def evaluate(
    checkpoint: List[Path] = typer.Option(
        ...,
        "--checkpoint",
        help="Run dir, or a .safetensors/.json checkpoint. "
        "Give it several times for an ensemble (probabilities averaged).",
    ),
    split: str = typer.Option("test", "--split", help="test, val or train."),
    data_dir: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Where confusion.png and mistakes.png go."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    no_plots: bool = typer.Option(False, "--no-plots"),
    tta: bool = TtaOpt,
) -> None:
    """Accuracy, calibration error (ECE), per-class precision/recall/F1, confusion matrix, worst mistakes,
    and what --reject-below would keep; writes confusion.png, mistakes.png and reliability.png."""
    import json

    from .threads import configure as configure_threads

    configure_threads("evaluate")  # before torch is imported: libgomp reads its settings once, when loaded

    from .evaluation import evaluate as run_evaluate
    from .report import print_report

    report = run_evaluate(checkpoint, data_dir, split=split, device=device, out_dir=out, plots=not no_plots, tta=tta)
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        print_report(report)


@app.command()
def export(
    checkpoint: List[Path] = typer.Option(
        ...,
        "--checkpoint",
        help="Run dir, or a .safetensors/.json checkpoint. Give it several times for one ensemble graph (ONNX only).",
    ),
    format: str = typer.Option("onnx", "--format", help="onnx (for onnxruntime) or torchscript."),
    out: Path = typer.Option(..., "--out", help="The file to write, e.g. model.onnx."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: onnxruntime dynamic quantisation."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18: onnxruntime >= 1.14)."),
    data_dir: Optional[Path] = DataOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file (never a read-only one)."),
) -> None:
    """Export a checkpoint (input: pixels in [0,1]), check it against PyTorch on the test set, write it."""
    import json

    from . import export as exp

    if format not in exp.FORMATS:
        fail(f"--format {format!r}: unknown (choose {' or '.join(exp.FORMATS)})", 2)
    if quantize is not None and quantize not in exp.QUANTIZATIONS:
        fail(f"--quantize {quantize!r}: unknown (choose {', '.join(exp.QUANTIZATIONS)})", 2)
    if quantize is not None and format != "onnx":
        fail("--quantize works with --format onnx only", 2)
    if format == "onnx":  # a missing extra fails before any work
        for module in ("onnx", "onnxscript", "onnxruntime"):
            require("onnx", module)
    exp.check_output(out, force)  # before the checkpoint, the data and the export (seconds of work)
    from .checkpoint import read_info
    from .datafiles import get_spec

    info = [read_info(c) for c in checkpoint][0]  # fails early, naming the file, before the data is read
    verify = exp.mnist_verify_set(data_dir, info.dataset)
    if verify is None:
        typer.echo(
            f"note: {get_spec(info.dataset).title} test set not found (pass --data DIR); checking on "
            "seeded random images instead, without accuracy",
            err=True,
        )
    report = exp.export(
        checkpoint if len(checkpoint) > 1 else checkpoint[0],
        out,
        format=format,
        quantize=quantize,
        verify_images=verify,
        opset=opset or exp.DEFAULT_OPSET,
        force=force,
    )
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        for line in report.lines():
            typer.echo(line)


@app.command()
def serve(
    checkpoint: List[Path] = typer.Option(
        ...,
        "--checkpoint",
        help="Run dir, or a .safetensors/.json checkpoint. Give it several times to serve an ensemble.",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    cors_origin: List[str] = typer.Option(
        [], "--cors-origin", help="Allow this origin (repeatable); CORS is off without it."
    ),
    device: str = DeviceOpt,
    max_body_bytes: int = typer.Option(5_000_000, "--max-body-bytes", min=1, help="Largest request body (413)."),
    log_level: str = typer.Option("info", "--log-level", help="critical, error, warning, info or debug."),
    reject_below: Optional[float] = typer.Option(
        None, "--reject-below", min=0.0, max=1.0, help="Mark answers below confidence P as not sure."
    ),
    allowed_host: List[str] = typer.Option(
        [],
        "--allowed-host",
        help="Accept requests for this Host name "
        "(repeatable; * for any). Default: this machine's names on a "
        "loopback bind (DNS rebinding), any otherwise.",
    ),
    max_image_pixels: int = typer.Option(
        16_000_000, "--max-image-pixels", min=1, help="Most pixels decoded per image (413); JPEGs decode reduced."
    ),
    max_decodes: int = typer.Option(2, "--max-decodes", min=1, help="Images decoded at once."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.01, help="Seconds for request headers."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", min=0.01, help="Seconds for a whole body (408)."),
    keep_alive_timeout: int = typer.Option(
        5, "--keep-alive-timeout", min=1, help="Seconds an idle connection stays open."
    ),
    max_connections: int = typer.Option(100, "--max-connections", min=1, help="Open connections (503 beyond)."),
    tta: bool = TtaOpt,
) -> None:
    """Serve a page to draw a digit and watch the network read it, and the HTTP API (docs at /docs)."""
    from .threads import configure as configure_threads

    configure_threads("serve")  # before torch is imported: libgomp reads its settings once, when loaded
    run_serve = require("serve", "digitlab.serving").serve

    if log_level not in ("critical", "error", "warning", "info", "debug"):
        fail(f"--log-level {log_level!r}: unknown (choose critical, error, warning, info or debug)", 2)
    run_serve(
        checkpoint,
        host=host,
        port=port,
        cors_origins=cors_origin,
        device=device,
        max_body_bytes=max_body_bytes,
        log_level=log_level,
        reject_below=reject_below,
        allowed_hosts=allowed_host or None,
        max_image_pixels=max_image_pixels,
        max_decodes=max_decodes,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        keep_alive_timeout=keep_alive_timeout,
        max_connections=max_connections,
        tta=tta,
    )


@app.command()
def predict(
    inputs: List[str] = typer.Argument(
        ...,
        help="Image files (PNG, JPEG, BMP, GIF, WebP, TIFF), folders (searched "
        "recursively), IDX files (every image), or - for stdin.",
        show_default=False,
        metavar="INPUTS...",
    ),
    checkpoint: List[Path] = typer.Option(
        [],
        "--checkpoint",
        help="Run dir, or a .safetensors/.json checkpoint. "
        "Give it several times for an ensemble (probabilities averaged).",
    ),
    model: List[Path] = typer.Option(
        [],
        "--model",
        help="Instead of --checkpoint: an exported .onnx file, "
        "run with onnxruntime (no torch needed); several make an ensemble.",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input and line."),
    reject_below: Optional[float] = typer.Option(
        None, "--reject-below", min=0.0, max=1.0, help="Report no digit (null) when the confidence is below P."
    ),
    save_preprocessed: Optional[Path] = typer.Option(
        None, "--save-preprocessed", help="Write the 28x28 image the model saw for each input into this folder (PNG)."
    ),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    explain: Optional[Path] = typer.Option(
        None,
        "--explain",
        help="Write why each digit was read into this folder: a saliency PNG per input (needs --checkpoint).",
    ),
    tta: bool = TtaOpt,
) -> None:
    """Read the digit in each image: photos, scans and drawings are preprocessed the way MNIST was made."""
    import json

    from .threads import configure as configure_threads

    configure_threads("predict")  # before torch is imported: libgomp reads its settings once, when loaded

    from .prediction import Predictor, expand_inputs, path_width, table_header, table_row

    if checkpoint and model:
        fail("--checkpoint and --model exclude each other: give one", 2)
    if not checkpoint and not model:
        fail("--checkpoint or --model is required (a run dir or checkpoint, or an exported .onnx file)", 2)
    predictor = Predictor.from_checkpoints(
        list(checkpoint or model), device=device, batch_size=batch_size, onnx=bool(model), tta=tta
    )
    items = expand_inputs(inputs)  # "-" reads sys.stdin.buffer
    width = path_width(items)
    if not as_json:
        typer.echo(table_header(width))
    if explain is not None:
        from .saliency import prepare_explain_dir, write_saliency_png

        if model:
            fail("--explain needs --checkpoint (a PyTorch model): an ONNX model has no gradients here", 2)
        prepare_explain_dir(explain)
    failures = 0
    for index, prediction in enumerate(
        predictor.iter_predict(items, reject_below=reject_below, save_dir=save_preprocessed)
    ):
        if prediction.error is not None:
            failures += 1
            typer.echo(f"digitlab: error: {prediction.error}", err=True)
        elif explain is not None:
            write_saliency_png(
                explain, index, prediction.path, prediction.preprocessed, predictor.saliency(prediction.preprocessed)
            )
        typer.echo(json.dumps(prediction.to_json()) if as_json else table_row(prediction, width))
    if failures:
        raise typer.Exit(1)


def main() -> None:
    """Run the command line; ends with SystemExit (its code), as any click program does."""
    try:
        app()
    except DigitlabError as exc:
        typer.echo(f"digitlab: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("digitlab: interrupted", err=True)
        sys.exit(130)


def entry_point() -> None:
    """The `digitlab` console script: `main`, then leave without Python's interpreter teardown.

    With torch loaded, tearing the interpreter down takes 0.5-1 s on a 2-core CPU (measured: `import torch`
    then a normal exit against `os._exit`), and every command's output is complete by then: files are
    written through temp files and renames and closed, streams are flushed here. Only when another
    non-daemon thread is still running does the normal exit (which waits for it) happen.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if isinstance(code, str):  # sys.exit("message") prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code if isinstance(code, int) else 0)
