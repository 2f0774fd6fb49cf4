"""Loading from disk or the Hugging Face Hub with one-line failures: the error type, the
metadata keys of ttreg's weight files, and the context that turns any failure into one line
(``could not download <what> -- no network? pass a local path``), using the local Hub cache
when the Hub cannot be reached; and reading a named file safely (:func:`plain_file_name`: a
name from a file is a file beside it; :func:`read_bytes_at_most`: the size is checked before
reading). Shared by :mod:`ttreg.models`, :mod:`ttreg.builtin`, :mod:`ttreg.hub` and
:mod:`ttreg.spec`.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

#: metadata keys of a safetensors file written by :func:`ttreg.models.save_model`
META_SPEC, META_KWARGS = "ttreg.spec", "ttreg.kwargs"
#: the largest neuron JSON and attention-bias file ttreg reads (real ones are kilobytes to a
#: few megabytes); a larger file is refused before it is read
MAX_NEURON_FILE_BYTES = 64 << 20
MAX_BIAS_FILE_BYTES = 256 << 20


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says why in one line."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hub's endpoint be opened? (Assumed yes behind a proxy.)"""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
    except ImportError:
        return True
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def hub_offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode for this block when ``HF_HUB_OFFLINE`` is set now or
    the Hub is unreachable, so a load uses the local cache or fails at once instead of retrying
    for a minute."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    if not before and (_env_offline() or not _hub_reachable()):
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _network_types() -> tuple[type, ...]:
    import urllib.error
    types: list[type] = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    for mod, names in (("huggingface_hub.errors", ("LocalEntryNotFoundError", "HfHubHTTPError",
                                                   "OfflineModeIsEnabled")),
                       ("httpx2", ("HTTPError",)), ("httpx", ("HTTPError",)),
                       ("requests", ("RequestException",))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        types += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(types)


def is_network_error(err: BaseException) -> bool:
    """Is a network failure anywhere in the exception's cause/context chain?"""
    types, seen = _network_types(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, types):
            return True
        err = err.__cause__ or err.__context__
    return False


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of ``err``'s message (its type's name when empty), cut to ``limit`` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def loading_errors(what: str, network: bool = True) -> Iterator[None]:
    """Turn any failure inside into a one-line :class:`ModelLoadError` about ``what``
    (``network``: the block may download from the Hub)."""
    with hub_offline_if_unreachable() if network else contextlib.nullcontext():
        try:
            yield
        except ModelLoadError:
            raise
        except Exception as e:
            if is_network_error(e):
                msg = f"could not download {what} — no network? pass a local path ({first_line(e)})"
            else:
                msg = f"could not load {what}: {first_line(e)}"
            err = ModelLoadError(msg)
            err.original = e
            raise err from None


def plain_file_name(name: Any, what: str) -> str:
    """``name`` if it names a file in the same folder (no folder part, not ``.`` or ``..``);
    a one-line ``ValueError`` otherwise (``what`` says where the name comes from)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).name != name:
        raise ValueError(f"{what} must name a file beside it (a plain file name), got {name!r}")
    return name


def read_bytes_at_most(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused in one line (before reading) when it is over ``limit``
    bytes, as no ``what`` is that large."""
    p = Path(path)
    size = p.stat().st_size
    if size > limit:
        raise ValueError(f"{p} is {size} bytes; no {what} is over {limit} bytes, so it is not one")
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:   # it grew after the check
        raise ValueError(f"{p} is over {limit} bytes; no {what} is that large, so it is not one")
    return data


def bias_file_name(data: Mapping[str, Any], where: Any) -> str | None:
    """The attention-bias file a neuron file's dict names (``attention_bias.file``: a plain file
    name, the file beside it), or None when it names none; a one-line ``ValueError`` naming
    ``where`` (the file) otherwise. Checked before that file is read or downloaded."""
    ref = data.get("attention_bias")
    if not ref:
        return None
    if not isinstance(ref, Mapping):
        raise ValueError(f"{where}: 'attention_bias' must be an object naming a file beside it, "
                         f"got {type(ref).__name__}")
    try:
        return plain_file_name(ref.get("file"), "attention_bias.file")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
