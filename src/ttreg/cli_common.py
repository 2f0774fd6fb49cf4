"""What every ``ttreg`` command shares (the main command line and ``ttreg eval``): exit codes,
argument types that refuse bad values in one line, the parser that prints one-line errors, the
model specs the commands accept (the library's and the synthetic ones), reading ``--neurons``,
and running a command so that every user error is one line and an exit status.

:mod:`ttreg.cli`, :mod:`ttreg.demo` and :mod:`ttreg.eval.cli` import from here, never from each
other's modules upward.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_CLEARED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: synthetic models the command line accepts besides the specs of :mod:`ttreg.models`
SYNTHETIC = {
    "planted": "a tiny timm ViT with planted register neurons (64 px)",
    "planted-clip": "a tiny open_clip CLIP whose image tower is the planted ViT (64 px)",
    "builtin:dinov2_vits14+planted": "the built-in model with content-dependent planted register neurons (the demo's)",
}

#: ``--top-k``'s default wherever the command line chooses neurons (``calibrate``, ``eval``)
TOP_K_DEFAULT = "auto"

#: pip commands for optional packages, by the module name a failed import reports
PIP_NAMES = {"timm": "timm", "matplotlib": "matplotlib", "transformers": "transformers",
             "open_clip": "open_clip_torch", "onnx": "onnx", "skimage": "scikit-image",
             "safetensors": "safetensors", "tqdm": "tqdm", "PIL": "pillow"}


def model_help() -> str:
    from .models import SPEC_HELP
    return f"model spec: {SPEC_HELP}; or a synthetic model: {', '.join(SYNTHETIC)}"


class UserError(ValueError):
    """A problem with the command's inputs; printed as one line."""


# --- argument types: refused by the parser, in one line ----------------------------------------------

def int_at_least(lo: int | None) -> Callable[[str], int]:
    """An argparse type: a whole number (>= ``lo`` unless None)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v
    parse.__name__ = "whole number" + (f" >= {lo}" if lo is not None else "")
    return parse


def number_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval (bounds open or closed)."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return v
    parse.__name__ = f"number in {interval}"
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return number_in(0, math.inf, lo_open=True, hi_open=True)(text)


def threshold_arg(text: str) -> float | str:
    """An argparse type: ``auto`` or a finite norm > 0."""
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'auto', got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive token norm or 'auto', got {text}")
    return v


def int_or_auto(lo: int | None = None) -> Callable[[str], int | str]:
    """An argparse type: ``auto`` or a whole number (>= ``lo`` unless None)."""
    whole = int_at_least(lo)

    def parse(text: str) -> int | str:
        if text == "auto":
            return text
        try:
            return whole(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or give 'auto')") from None
    return parse


def memory_size(text: str) -> int:
    """An argparse type: a memory size in bytes, or with a unit (512MiB, 4GB, 1.5G)."""
    from .register_neurons import as_bytes
    try:
        return as_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 4GB, got {text!r}") from None


def sizes_arg(text: str) -> list[tuple[int, int]]:
    """An argparse type: input sizes, comma-separated (``224,518`` or ``224x448``)."""
    from .sizes import as_sizes
    try:
        return as_sizes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes such as 224,518 or 224x448, got {text!r}") from None


def device_arg(text: str) -> str:
    """An argparse type: a torch device that exists here (``cpu:0`` is ``cpu``)."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"device {text!r} is not available here (no CUDA GPU); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"device {text!r} is not available here ({n} CUDA "
                                             f"device{'s' if n > 1 else ''}: cuda:0..cuda:{n - 1})")
        return str(dev)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps is not None and mps.is_available()):
            raise argparse.ArgumentTypeError(f"device {text!r} is not available here (no Apple MPS); use --device cpu")
        return str(dev)
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; use --device cpu")
    return str(dev)


class BadArguments(SystemExit):
    """A command line the parser refused (already printed); exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (with where to find help), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise BadArguments(EXIT_USAGE)


# --- shared helpers ------------------------------------------------------------------------------

def resolve_model(spec: str, device: str = "cpu") -> tuple[Any, Callable, Callable | None]:
    """``(model in eval mode on device, transform, tokenizer or None)`` for a model spec:
    the specs of :func:`ttreg.load_model` and the synthetic :data:`SYNTHETIC` ones. The one
    resolver of ``ttreg calibrate``, ``inspect``, ``demo`` and ``eval``."""
    from .models import KINDS, SPEC_HELP
    kind, sep, _ = spec.partition(":")
    base, _, variant = spec.partition("+")
    if spec not in SYNTHETIC and not (kind in KINDS and sep) and not Path(spec).expanduser().exists():
        raise UserError(f"unknown model spec {spec!r}; use {SPEC_HELP}, or a synthetic model: "
                        f"{', '.join(SYNTHETIC)}")
    tokenizer = None
    if spec == "planted":
        from . import testing
        from .adapters import wrap
        from .data import default_transform
        model = testing.planted_vit()
        transform = default_transform(wrap(model))
    elif spec == "planted-clip":
        from .data import make_transform
        from .testing.clip import OPENAI_MEAN, OPENAI_STD, planted_clip
        model, tokenizer = planted_clip()
        transform = make_transform((64, 64), OPENAI_MEAN, OPENAI_STD)
    else:
        from .models import load_model, open_clip_tokenizer
        if variant and spec not in SYNTHETIC:
            raise UserError(f"unknown model variant '+{variant}' (only {', '.join(s for s in SYNTHETIC if '+' in s)})")
        model, transform = load_model(base)
        if variant:   # builtin:dinov2_vits14+planted, the demo's synthetic variant
            from .testing import plant_demo
            plant_demo(model)
        if kind == "open_clip":
            tokenizer = open_clip_tokenizer(base)
    return model.to(device).eval(), transform, tokenizer


def read_neurons(arg: str | None):
    """``--neurons``: None/``auto`` (search) -> None; a published name, a neuron JSON, a folder
    written by ``save_pretrained`` or ``hf:ORG/NAME`` (the Hub) -> the set, read and validated
    (done before the model loads; :func:`load_neurons` then checks it against the model)."""
    from .published import is_published
    from .register_neurons import RegisterNeurons
    if arg is None or arg == "auto":
        return None
    if arg.startswith("hf:") or (Path(arg).is_dir() and (Path(arg) / "register_neurons.json").is_file()):
        return RegisterNeurons.from_pretrained(arg)   # a Hub repository or a saved folder
    if is_published(arg):
        return RegisterNeurons.from_name(arg)
    if not Path(arg).is_file():
        raise UserError(f"no neuron file {arg!r} (give a JSON from 'ttreg calibrate', a published "
                        f"name such as dinov2_vitl14, hf:ORG/NAME, or 'auto')")
    return RegisterNeurons.load(arg)


def load_neurons(given, model):
    """A set from :func:`read_neurons` (or a ``--neurons`` value), checked against the model."""
    rn = read_neurons(given) if given is None or isinstance(given, str) else given
    if rn is not None:
        rn.check_model(model)
    return rn


def progress_ok() -> bool:
    return sys.stderr.isatty()


def run(parse: Callable[[], argparse.Namespace], prog: str) -> int:
    """Parse and run a command, turning every user error into one line and an exit status."""
    mark = None
    try:
        from .files import committed_count, created_folders
        mark, made = committed_count(), len(created_folders())
        import warnings
        args = parse()
        # the CLI prints the same facts itself
        for said in ("no outlier tokens", "outliers remain after calibration",
                     "no register neurons clear the outliers",
                     "calibration on .* the held-out numbers are in-sample"):  # the summary says so
            warnings.filterwarnings("ignore", message=said, category=UserWarning)
        status = int(args.func(args) or 0)
        say_created(created_folders()[made:], prog)
        return status
    except BadArguments:
        return EXIT_USAGE
    except KeyboardInterrupt:
        n = 0 if mark is None else committed_count() - mark
        done = "nothing was written" if n == 0 else f"{n} file{'s' if n > 1 else ''} had been written"
        print(f"{prog}: interrupted; {done}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: B036 -- SystemExit passes through below
        message = user_error_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def say_created(folders: list[Path], prog: str) -> None:
    """One line naming the folders a command created for its outputs (the deepest of each
    chain: ``a/b/c`` for ``a``, ``a/b`` and ``a/b/c``)."""
    made = set(folders)
    leaves = [str(d) for d in folders if not any(o.parent == d for o in made)]
    if leaves:
        what = f"the folder {leaves[0]}" if len(leaves) == 1 else f"the folders {', '.join(leaves)}"
        print(f"{prog}: created {what} for the outputs (missing folders are made, with their parents)")


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error a user can fix, or None for anything else."""
    from .files import OutputPathError
    if isinstance(e, (SystemExit, KeyboardInterrupt)):
        return None
    try:
        from .register_neurons import ModelMismatchError
    except ImportError:  # pragma: no cover
        ModelMismatchError = ()  # type: ignore[assignment]
    if ModelMismatchError and isinstance(e, ModelMismatchError):
        return _one_line(e.cli_message)
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in PIP_NAMES \
            and "pip install" not in str(e):
        top = e.name.split(".")[0]
        return f"{top} is not installed: pip install {PIP_NAMES[top]}"
    if isinstance(e, (UserError, ValueError, ImportError, OutputPathError, OSError)):
        return _one_line(e)
    if isinstance(e, TypeError) and "does not support" in str(e):
        return _one_line(e)
    return None


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())
