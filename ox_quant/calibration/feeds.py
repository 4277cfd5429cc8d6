"""Calibration feeds: ``.npz`` files, a folder of them, or token windows of a text.

A feed maps every graph input of the model to an array. Sources (:func:`calibration_feeds`):

* an ``.npz`` file: one feed, keys = input names (the format ``verify --inputs`` reads);
* a directory: one feed per ``*.npz`` file in it, in name order;
* a UTF-8 text file (any other file) with a tokenizer (``encode(text) -> token ids``): the
  text's tokens cut into consecutive windows of ``seq_len``; each window is one feed
  ``input_ids[1, seq_len]``, with ``attention_mask`` all ones and ``position_ids``
  ``0 .. seq_len-1`` when the model has those inputs.

``samples`` caps the feeds used (the first ones). Every feed is checked against the model's
inputs before any is run (names, rank, fixed dimensions, dtype kind, finite values, token ids
inside the embedding table) and a problem is one ``OxQuantError`` line naming the file.
A source is re-iterable (the sequential driver reads it once per level); ``.npz`` files are
read again on each pass, one feed in memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ox_quant.errors import OxQuantError, one_line

DEFAULT_SAMPLES = 32
"""Feeds used when ``--calibration-samples`` is not given (text windows; for ``.npz`` folders: all files up to this)."""
DEFAULT_SEQ_LEN = 256
"""Tokens per text window when ``--calibration-seq-len`` is not given."""

TokenEncoder = Callable[[str], Sequence[int]]
"""Text -> token ids (e.g. ``lambda t: tokenizer.encode(t).ids`` for a ``tokenizers.Tokenizer``)."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: numpy dtype and dims (int, symbolic name or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The main graph's inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.dtype is None:
            continue
        dims = tuple(value.shape) if value.shape is not None else ()
        shape = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in dims)
        specs.append(InputSpec(str(value.name), np.dtype(value.dtype.numpy()), shape))
    return specs


def check_feed(feed: dict[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """``feed`` checked against the inputs and cast to their dtypes (``where`` names it in errors)."""
    names = [s.name for s in specs]
    for key in feed:
        if key not in names:
            raise OxQuantError(f"{where}: array {key!r} is no input of the model (inputs: {', '.join(names)})")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in feed:
            raise OxQuantError(f"{where}: no array for model input {spec.name!r} (has: {', '.join(feed) or 'none'})")
        array = np.asarray(feed[spec.name])
        if array.ndim != len(spec.shape):
            raise OxQuantError(f"{where}: input {spec.name!r} has rank {array.ndim}, the model expects "
                               f"{len(spec.shape)} {list(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise OxQuantError(f"{where}: input {spec.name!r} has size {got} on axis {axis}, the model "
                                   f"expects {want} (shape {list(spec.shape)})")
        kind, want_kind = array.dtype.kind, spec.dtype.kind
        compatible = kind == want_kind or (kind in "iu" and want_kind in "iu")
        if not compatible:
            raise OxQuantError(f"{where}: input {spec.name!r} is {array.dtype}, the model expects {spec.dtype}")
        if kind == "f" and not np.isfinite(array).all():
            raise OxQuantError(f"{where}: input {spec.name!r} contains NaN or Inf")
        if kind in "iu" and array.size:
            info = np.iinfo(spec.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise OxQuantError(f"{where}: input {spec.name!r} has values outside {spec.dtype}")
        out[spec.name] = array.astype(spec.dtype, copy=False)
    return out


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (one-line errors for a missing or unreadable file)."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise OxQuantError(f"calibration file {path} is a single .npy array, not an .npz of named inputs")
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise OxQuantError(f"calibration file not found: {path}") from None
    except OxQuantError:
        raise
    except Exception as exc:
        raise OxQuantError(f"cannot read calibration file {path}: {type(exc).__name__}: {exc}") from exc


class FeedSource:
    """Re-iterable calibration feeds: ``len()`` feeds, each a checked ``{input: array}``;
    ``description`` says where they come from (for reports)."""

    def __init__(self, description: str, count: int, make: Callable[[], Iterator[dict[str, np.ndarray]]],
                 seq_len: int | None = None) -> None:
        self.description = description
        self._count = count
        self._make = make
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._make()


def npz_feeds(paths: Sequence[Path], specs: Sequence[InputSpec], description: str) -> FeedSource:
    """One feed per file, every file checked now (then read again, one at a time, per pass)."""
    for path in paths:
        check_feed(read_npz(path), specs, str(path))

    def make() -> Iterator[dict[str, np.ndarray]]:
        for path in paths:
            yield check_feed(read_npz(path), specs, str(path))

    return FeedSource(description, len(paths), make)


def _embedding_rows(model: ir.Model, input_name: str) -> int | None:
    """Rows of an initializer table that ``input_name`` directly indexes (Gather), if any."""
    for node in model.graph:
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].name == input_name and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None:
            rows = node.inputs[0].const_value.shape[0]
            return rows if isinstance(rows, int) else None
    return None


def text_feeds(path: Path, model: ir.Model, specs: Sequence[InputSpec], encode: TokenEncoder,
               samples: int, seq_len: int) -> FeedSource:
    """Consecutive ``seq_len``-token windows of the text file ``path`` (module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OxQuantError(f"calibration file {path} is neither .npz nor UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise OxQuantError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise OxQuantError(f"calibration text {path} is empty")
    by_name = {s.name: s for s in specs}
    ints = [s for s in specs if s.dtype.kind in "iu"]
    token = by_name.get("input_ids") or (ints[0] if len(ints) == 1 else None)
    if token is None or len(token.shape) != 2:
        raise OxQuantError("calibration text needs a model with one token input input_ids[batch, sequence]; "
                           f"this one has inputs {', '.join(by_name) or 'none'}: give .npz feeds instead")
    fillable = {token.name, "attention_mask", "position_ids"}
    other = [s.name for s in specs if s.name not in fillable]
    if other:
        raise OxQuantError(f"calibration text fills input_ids, attention_mask and position_ids; the model also needs "
                           f"{', '.join(other)}: give .npz feeds instead")
    fixed = token.shape[1]
    if isinstance(fixed, int) and fixed != seq_len:
        raise OxQuantError(f"the model's {token.name} has a fixed length of {fixed} tokens: use --calibration-seq-len {fixed}")
    ids = np.asarray(list(encode(text)), dtype=np.int64)
    windows = len(ids) // seq_len
    if windows < 1:
        raise OxQuantError(f"calibration text {path} has {len(ids)} tokens, fewer than one window of "
                           f"--calibration-seq-len {seq_len}")
    rows = _embedding_rows(model, token.name)
    if rows is not None and ids.size and int(ids.max()) >= rows:
        raise OxQuantError(f"the tokenizer gives token id {int(ids.max())} but the model's embedding table has "
                           f"{rows} rows: is it the model's tokenizer?")
    count = min(windows, samples)

    def make() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            window = ids[i * seq_len:(i + 1) * seq_len][None, :]
            feed = {token.name: window}
            if "attention_mask" in by_name:
                feed["attention_mask"] = np.ones_like(window)
            if "position_ids" in by_name:
                feed["position_ids"] = np.arange(seq_len, dtype=np.int64)[None, :]
            yield check_feed(feed, specs, f"{path} window {i}")

    next(iter(make()))  # the first window is checked now
    return FeedSource(f"{path.name}: {count} windows of {seq_len} tokens ({len(ids)} tokens)", count, make, seq_len)


def calibration_feeds(
    path: str | os.PathLike,
    model: ir.Model,
    *,
    samples: int | None = None,
    seq_len: int | None = None,
    encode: TokenEncoder | None = None,
) -> FeedSource:
    """The feeds of ``path`` for ``model`` (module docstring); ``encode`` is needed for text."""
    path = Path(path)
    if samples is not None and samples < 1:
        raise OxQuantError(f"--calibration-samples must be at least 1, got {samples}")
    if seq_len is not None and seq_len < 1:
        raise OxQuantError(f"--calibration-seq-len must be at least 1, got {seq_len}")
    specs = model_inputs(model)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise OxQuantError(f"calibration directory {path} has no .npz files")
        files = files[: samples or len(files)]
        return npz_feeds(files, specs, f"{path.name}/: {len(files)} .npz feeds")
    if not path.exists():
        raise OxQuantError(f"calibration data not found: {path}")
    if path.suffix == ".npz":
        if seq_len is not None:
            raise OxQuantError("--calibration-seq-len applies to text calibration, not .npz feeds")
        return npz_feeds([path], specs, f"{path.name}: 1 .npz feed")
    if encode is None:
        raise OxQuantError(f"calibration file {path} is text (not .npz): give --tokenizer FILE|MODEL to tokenize it")
    return text_feeds(path, model, specs, encode, samples or DEFAULT_SAMPLES, seq_len or DEFAULT_SEQ_LEN)


def tokenizer_file(path: str | os.PathLike) -> TokenEncoder:
    """The encoder of a Hugging Face ``tokenizer.json`` (needs the ``tokenizers`` package); no
    special tokens are added (windows are cut from running text)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OxQuantError("--tokenizer FILE needs the tokenizers package: pip install tokenizers") from None
    path = Path(path)
    if not path.is_file():
        raise OxQuantError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise OxQuantError(f"cannot read tokenizer {path}: {one_line(str(exc))}") from exc

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    return encode
