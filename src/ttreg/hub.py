"""Neuron sets on the Hugging Face Hub: a folder anyone can load, the way that ecosystem shares
small artifacts (``huggingface_hub``'s ``hf_hub_download`` and ``upload_folder``).

A neuron set's repository (or local folder) holds::

    register_neurons.json               the neuron file (format: docs/method.md)
    register_neurons.bias.safetensors   its attention bias, if it has one (named in the JSON)
    README.md                           a generated model card: model, images, measured ratios

``RegisterNeurons.from_pretrained("org/name")`` reads one (from the local Hub cache when offline),
``RegisterNeurons.push_to_hub("org/name")`` writes one, ``save_pretrained(folder)`` writes the
folder. A download or upload that fails is one line, as for models (:mod:`ttreg.models`).
This module moves files; :class:`ttreg.RegisterNeurons` reads and writes them (so it does not
import the class).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .loading import (MAX_NEURON_FILE_BYTES, bias_file_name, first_line, is_network_error, loading_errors,
                      read_bytes_at_most)
from .files import write_text
from .text import count

NEURONS_FILE = "register_neurons.json"
CARD_FILE = "README.md"


def save_pretrained(neurons, folder: str | os.PathLike,
                    repo_id: str | None = None) -> Path:
    """Write the neuron file, its bias (if any) and a model card into ``folder``; return it.
    ``repo_id``: the repository the card's example loads from."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    neurons.save(folder / NEURONS_FILE)
    write_text(folder / CARD_FILE, model_card(neurons, repo_id))
    return folder


def neuron_file(name: str | os.PathLike, *, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> Path:
    """The neuron file of a local folder written by :func:`save_pretrained`, or of the Hub
    repository ``name`` ("org/name" or "hf:org/name", a model repository) downloaded with its
    attention bias beside it (the local cache is used when offline)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p / NEURONS_FILE
    name = str(name)
    if name.startswith("hf:"):
        name = name[3:]
    from huggingface_hub import hf_hub_download
    with loading_errors(f"the neuron set hf:{name}"):
        path = Path(hf_hub_download(name, NEURONS_FILE, revision=revision, cache_dir=cache_dir,
                                    token=token, library_name="ttreg"))
        data = json.loads(read_bytes_at_most(path, MAX_NEURON_FILE_BYTES, "ttreg neuron file"))
        # the bias file it names: a plain name beside it, checked before anything is downloaded
        # (its size is checked before it is read, by AttentionBias.load)
        bias = bias_file_name(data, f"{NEURONS_FILE} of hf:{name}") if isinstance(data, dict) else None
        if bias is not None:   # lands in the same snapshot folder, beside the JSON that names it
            hf_hub_download(name, bias, revision=revision, cache_dir=cache_dir, token=token,
                            library_name="ttreg")
    return path


def push_to_hub(neurons, repo_id: str, *, token: str | bool | None = None,
                private: bool | None = None, revision: str | None = None,
                commit_message: str = "Upload register neurons with ttreg") -> str:
    """Upload the folder :func:`save_pretrained` writes to the model repository ``repo_id``
    (created if needed); return the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    try:
        with tempfile.TemporaryDirectory(prefix="ttreg-hub-") as tmp:
            save_pretrained(neurons, tmp, repo_id)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message)
    except Exception as e:
        if is_network_error(e):
            raise ValueError(f"could not upload the neuron set to hf:{repo_id} — no network or no "
                             f"write access? ({first_line(e)})") from None
        raise
    return str(getattr(info, "commit_url", info))


# --- the model card ---------------------------------------------------------------------------

def _base_model(spec: str | None) -> str | None:
    """A Hub model id for the card's ``base_model`` from a ttreg model spec, if it has one."""
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest.count("/") == 1 and not Path(rest).exists():
        return rest
    if kind == "timm" and rest and "@" not in rest and "/" not in rest:
        return f"timm/{rest}"
    return None


def _ratio_lines(stats: dict[str, Any], det) -> list[str]:
    for before_key, after_key, where in (("heldout_before", "heldout_after", "held-out images"),
                                         ("measured_before", "measured_after", "the images")):
        b, a = stats.get(before_key), stats.get(after_key)
        if isinstance(b, dict) and isinstance(a, dict) and "mean_norm_ratio" in b:
            lines = [f"| mean max/median patch norm at layer {det} | {b['mean_norm_ratio']:.2f} | "
                     f"{a['mean_norm_ratio']:.2f} |"]
            if "fraction_with_outliers" in b:
                lines.append(f"| images with outlier tokens | {b['fraction_with_outliers']:.0%} | "
                             f"{a['fraction_with_outliers']:.0%} |")
            return [f"Measured on {where} (plain model → with one test-time register):", "",
                    "| | before | after |", "|---|---|---|", *lines]
    return ["No before/after measurement is recorded in this neuron file "
            "(`ttreg calibrate` records one)."]


def _sizes_line(sizes) -> str:
    """Where the set was calibrated and measured, in pixels (ttreg warns at other sizes)."""
    if not sizes:
        return "not recorded"
    px = lambda rows: ", ".join(f"{h}x{w}" for h, w in rows) or "none"  # noqa: E731
    return (f"calibrated at {px(sizes.get('calibrated') or [])} px, measured at "
            f"{px(sizes.get('measured') or [])} px (ttreg warns when used at another size)")


def model_card(neurons, repo_id: str | None = None) -> str:
    """The README.md of a neuron-set repository: what model, which images, what was measured."""
    prov, hp, stats = neurons.provenance, neurons.hyperparameters, neurons.statistics
    spec = prov.get("model_spec")
    base = _base_model(spec)
    arch = (neurons.fingerprint or {}).get("architecture") or {}
    front = ["---", "library_name: ttreg", "tags:", "- test-time-registers", "- vision-transformer"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    model = spec or prov.get("model") or "the model in the fingerprint below"
    by_layer = "; ".join(f"layer {l}: {', '.join(map(str, ns))}" for l, ns in neurons.by_layer().items())
    det = hp.get("detection_layer", stats.get("measured_detection_layer", -1))
    body = [
        "# Register neurons" + (f" for {spec}" if spec else ""), "",
        "Test-time registers (Jiang et al., \"Vision Transformers Don't Need Trained Registers\", "
        "NeurIPS 2025) for this model, made with [ttreg](https://pypi.org/project/ttreg/).", "",
        # the architecture once: prov["model"] (the adapter's description) already gives it
        f"- **Model:** {model}" + (f" ({arch.get('class')}, {arch.get('num_layers')} blocks, "
                                   f"width {arch.get('embed_dim')})"
                                   if arch and (spec or not prov.get("model")) else ""),
        f"- **Images:** {prov.get('images', 'not recorded')}; {count(neurons.num_images, 'image')} "
        f"searched, {neurons.num_images_with_outliers} with outlier tokens",
        f"- **Register neurons ({len(neurons)}):** {by_layer or 'none'}",
        f"- **Found by:** {prov.get('method', 'not recorded')}"
        + (f" (threshold {hp.get('threshold')}, detection layer {det}, top layer "
           f"{hp.get('top_layer')}, top k {hp.get('top_k')})" if hp else ""),
        f"- **Input sizes:** {_sizes_line(neurons.sizes)}", "",
        *_ratio_lines(stats, det), "",
    ]
    if neurons.note:
        body += [f"Note: {neurons.note}", ""]
    bias = neurons.attention_bias
    if bias is not None:
        L, H, D = bias.key.shape
        body += ["## Attention-bias form", "",
                 f"`register_neurons.bias.safetensors`: per layer and head, the mean key and value of "
                 f"the test-time register ({L} layers x {H} heads x {D}), fitted on "
                 f"{count(bias.num_images, 'image')}; installed with `form=\"bias\"` it replaces the token.", ""]
    repo = repo_id or "ORG/NAME"
    body += ["## Use", "", "```python", "import ttreg",
             f"model, transform = ttreg.load_model({spec or 'SPEC'!r})",
             f"neurons = ttreg.RegisterNeurons.from_pretrained({repo!r})",
             "with ttreg.test_time_registers(model, neurons"
             + (', form="bias"' if bias is not None else "") + "):",
             "    feats = model.forward_features(x)   # or your model's usual call", "```", "",
             "The neuron file records the model's fingerprint; ttreg refuses it for another model."]
    return "\n".join(front + [""] + body) + "\n"


__all__ = ["NEURONS_FILE", "CARD_FILE", "model_card", "neuron_file", "push_to_hub", "save_pretrained"]
