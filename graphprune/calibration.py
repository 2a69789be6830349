"""Calibration data and per-channel activation statistics over it (ONNX Runtime, streamed, bounded memory).

A calibration spec is one of:

- an ``.npz`` file: one array per model input, keyed by the input's name (layouts below);
- an ``.npy`` file: the array of a single-input model;
- a folder: every ``.npz``/``.npy`` in it, in name order, read one file at a time;
- a named dataset of the registry (``DATASETS``), e.g. ``photos``.

How an array is fed depends on its rank against the model input's declared rank r:

- rank r (r >= 1): samples along axis 0, re-chunked to ``batch_size`` samples across file boundaries;
- rank r + 1: a stack of whole feeds: item i is fed as it is, so its batch is whatever it holds (a recurrent
  ``state`` [2, batch, 128] with batch on axis 1 is given as [N, 2, 1, 128]); a scalar input (r = 0) given
  as [N] is one value per item;
- a scalar input (r = 0) given as a scalar, or as [1]: fed unchanged with every batch (``sr`` = 16000).

The other arrays of a file must hold as many samples or items along axis 0 as each other. A file with a
stacked array is fed one item per batch (items are never concatenated: their batch axis is unknown), and
its arrays of rank r give each item their sample i as a batch of one. Files whose samples differ in shape
(text of another length) or in their unchanged scalars never share a batch. Where the model's rank of an
input is unknown, its array is samples along axis 0. A folder is never loaded whole (``.npy`` files are
memory-mapped, ``.npz`` members read one by one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.errors import GraphpruneError
from graphprune.runtime import make_session, run_session

Feeds = dict[str, np.ndarray]
EXTENSIONS = (".npz", ".npy")


# ---------- named datasets ----------------------------------------------------------------------


def _photos(part: str, natural: bool = False) -> Callable[..., Iterator[Feeds]]:
    """ImageNet-normalised photo crops (models/photos.py); parts split by photo, not by crop.

    ``calib``: the photos at even positions of the sorted photo list (all their views), ``eval``: the odd
    ones, ``all``: every crop. Views of one photo never fall on both sides of the split. The crops take the
    model input's layout and size where its shape says them: NCHW or NHWC (the axis of extent 3 is the
    colour axis), height and width when static (224 x 224 otherwise).

    ``natural``: the natural (GCompris) photos split the same way; their ``calib`` part comes after the
    ``photos-calib`` crops, their ``eval`` part stands alone.
    """
    dataset = f"natural-{part}" if natural else "photos"

    def batches(input_names: Sequence[str], batch_size: int,
                shapes: Mapping[str, Sequence] | None = None) -> Iterator[Feeds]:
        try:
            from graphprune.models.photos import VIEWS, imagenet_batch
        except ImportError as exc:  # scikit-image is a dev dependency
            raise GraphpruneError(f"the '{dataset}' calibration set needs scikit-image ({exc}).") from exc
        if len(input_names) != 1:
            raise GraphpruneError(f"the '{dataset}' calibration set feeds a single image input; the model has "
                                  f"{len(input_names)} inputs ({', '.join(input_names)}).")
        name = input_names[0]
        channels_last, size = image_layout(name, (shapes or {}).get(name), dataset)
        if not natural:
            images = imagenet_batch(size, VIEWS)[photo_rows(part, len(VIEWS))]
        elif part == "calib":
            images = np.concatenate([imagenet_batch(size, VIEWS)[photo_rows("calib", len(VIEWS))],
                                     _natural_part("calib", size, dataset)])
        else:
            images = _natural_part(part, size, dataset)
        if channels_last:
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        for start in range(0, len(images), batch_size):
            yield {name: images[start : start + batch_size]}

    return batches


def _natural_part(part: str, size: tuple[int, int], dataset: str) -> np.ndarray:
    """The natural photos' crops of one part: even photos for calib, odd ones for eval."""
    from graphprune.models.photos import NATURAL_VIEWS, natural_batch

    images = natural_batch(size, NATURAL_VIEWS)
    if not len(images):
        raise GraphpruneError(f"the '{dataset}' set needs the GCompris photos, which are not in the cache: "
                              "run `python tools/fetch_models.py` (needs the Debian archive once).")
    return images[_split_rows(len(images) // len(NATURAL_VIEWS), len(NATURAL_VIEWS), part)]


def _imagenet_samples(input_names: Sequence[str], batch_size: int,
                      shapes: Mapping[str, Sequence] | None = None) -> Iterator[Feeds]:
    """foolbox's 20 labelled ImageNet photos (models.real.imagenet_samples), center crops, ImageNet-normalised,
    in the model input's layout and size as for the photo sets.

    Evaluation data: the ``mobilenet_v2_imagenet`` evaluator scores these 20 images, so a model calibrated
    on them and scored there is scored on its own calibration data. Named here so that other tools can
    feed them (e.g. to check a model's outputs); calibrate on ``photos-calib``.
    """
    if len(input_names) != 1:
        raise GraphpruneError(f"the 'imagenet-samples' set feeds a single image input; the model has "
                              f"{len(input_names)} inputs ({', '.join(input_names)}).")
    name = input_names[0]
    channels_last, size = image_layout(name, (shapes or {}).get(name), "imagenet-samples")
    from graphprune.models.real import imagenet_samples_batch

    try:
        images, _labels = imagenet_samples_batch(size)
    except ImportError as exc:  # scikit-image is a dev dependency
        raise GraphpruneError(f"the 'imagenet-samples' set needs scikit-image ({exc}).") from exc
    if channels_last:
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    for start in range(0, len(images), batch_size):
        yield {name: images[start : start + batch_size]}


def image_layout(name: str, shape: Sequence | None, dataset: str = "photos") -> tuple[bool, tuple[int, int]]:
    """(channels last?, (height, width)) of an image input from its declared shape (None: unknown)."""
    if shape is None:
        return False, (224, 224)
    dims = list(shape)
    if len(dims) != 4:
        raise GraphpruneError(f"the '{dataset}' calibration set feeds images of rank 4; input '{name}' has rank "
                              f"{len(dims)}: give --calib an .npz of its own data instead.")
    channels_last = dims[1] != 3 and dims[3] == 3
    spatial = dims[1:3] if channels_last else dims[2:4]
    size = tuple(int(d) if isinstance(d, int) and d > 0 else 224 for d in spatial)
    return channels_last, (size[0], size[1])


def photo_rows(part: str, views: int) -> np.ndarray:
    """Row indices of models.photos.imagenet_batch belonging to one part of the photo split."""
    from graphprune.models.photos import load_photos

    return _split_rows(len(load_photos()), views, part)


def _split_rows(photos: int, views: int, part: str) -> np.ndarray:
    """Row indices of one part of a batch of ``photos`` x ``views`` crops (the views of a photo adjacent):
    ``calib`` the even photos, ``eval`` the odd ones, ``all`` every row."""
    photo = np.repeat(np.arange(photos), views)
    if part == "all":
        return np.arange(len(photo))
    return np.flatnonzero(photo % 2 == (0 if part == "calib" else 1))


DATASETS: dict[str, Callable[[Sequence[str], int], Iterator[Feeds]]] = {
    "photos": _photos("all"),
    "photos-calib": _photos("calib"),
    "photos-eval": _photos("eval"),
    "natural-calib": _photos("calib", natural=True),  # photos-calib + the even natural photos
    "natural-eval": _photos("eval", natural=True),  # the odd natural photos: held out from natural-calib
    "imagenet-samples": _imagenet_samples,  # evaluation only: see _imagenet_samples
}


# ---------- files and folders ----------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """A re-iterable stream of feed dicts; files are opened and checked when iterated."""

    spec: str
    input_names: tuple[str, ...]
    batch_size: int
    ranks: Mapping[str, int] | None = None
    dtypes: Mapping[str, np.dtype] | None = None
    max_batches: int | None = None
    shapes: Mapping[str, tuple] | None = None  # declared input shapes (ints, or None where symbolic)

    def __iter__(self) -> Iterator[Feeds]:
        source = DATASETS[self.spec](self.input_names, self.batch_size, self.shapes) if self.spec in DATASETS \
            else _rechunk(self._file_samples(), self.batch_size)
        for count, feeds in enumerate(source):
            if self.max_batches is not None and count >= self.max_batches:
                return
            yield {name: self._cast(name, array) for name, array in feeds.items()}

    def files(self) -> list[Path]:
        path = Path(self.spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in EXTENSIONS and p.is_file())
            if not found:
                raise GraphpruneError(f"--calib {path}: the folder holds no .npz or .npy files.")
            return found
        return [path]

    def _file_samples(self) -> Iterator[tuple[Path, _FileFeeds]]:
        for path in self.files():
            yield path, self._read(path)

    def _read(self, path: Path) -> _FileFeeds:
        try:
            data = np.load(path, mmap_mode="r" if path.suffix == ".npy" else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise GraphpruneError(f"--calib {path}: cannot be read as a NumPy file ({exc}).") from exc
        if path.suffix == ".npy":
            if len(self.input_names) != 1:
                raise GraphpruneError(f"--calib {path}: a .npy file only fits a single-input model; this one "
                                      f"has inputs {', '.join(self.input_names)}: use an .npz keyed by input "
                                      "name.")
            feeds = {self.input_names[0]: data}
        else:
            missing = [name for name in self.input_names if name not in data.files]
            if missing:
                have = ", ".join(data.files) or "none"
                raise GraphpruneError(f"--calib {path}: no array for input(s) {', '.join(missing)} (the file "
                                      f"has {have}); key the arrays by input name.")
            feeds = {name: data[name] for name in self.input_names}
        kinds = {name: _layout(path, name, array, (self.ranks or {}).get(name)) for name, array in feeds.items()}
        for name, kind in kinds.items():
            if kind == FIXED and feeds[name].ndim:
                feeds[name] = np.asarray(feeds[name]).reshape(())
        counts = {name: array.shape[0] for name, array in feeds.items() if kinds[name] != FIXED}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise GraphpruneError(f"--calib {path}: the inputs hold different sample counts along axis 0 "
                                  f"({listed}).")
        return _FileFeeds(feeds, kinds, next(iter(counts.values()), 1))

    def _cast(self, name: str, array: np.ndarray) -> np.ndarray:
        dtype = (self.dtypes or {}).get(name)
        array = np.asarray(array)
        # order="C", not ascontiguousarray: that one turns a scalar input's 0-d array into shape [1]
        return np.asarray(array if dtype is None else array.astype(dtype, copy=False), order="C")


SAMPLES, ITEMS, FIXED = "samples", "items", "fixed"  # how a file's array is fed (module docstring)


def _layout(path: Path, name: str, array: np.ndarray, rank: int | None) -> str:
    """SAMPLES, ITEMS or FIXED for one array of a calibration file, from its rank against the input's."""
    shape = list(array.shape)
    if rank is None:
        if array.ndim == 0:
            raise GraphpruneError(f"--calib {path}: input '{name}' is a scalar; put samples on axis 0.")
        return SAMPLES
    if rank == 0:
        if array.ndim == 0 or shape == [1]:
            return FIXED
        if array.ndim == 1:
            return ITEMS
        raise GraphpruneError(f"--calib {path}: input '{name}' has rank {array.ndim} (shape {shape}) but the "
                              "model expects a scalar: give one value (shape [] or [1]) fed with every batch, "
                              "or one value per sample (shape [N]).")
    if array.ndim == rank:
        return SAMPLES
    if array.ndim == rank + 1:
        return ITEMS
    raise GraphpruneError(f"--calib {path}: input '{name}' has rank {array.ndim} (shape {shape}) but the model "
                          f"expects rank {rank}, samples on axis 0 (or rank {rank + 1}, a stack of whole "
                          "feeds along axis 0).")


@dataclass
class _FileFeeds:
    """The arrays of one calibration file, how each is fed, and how many samples or items they hold."""

    feeds: Feeds
    kinds: dict[str, str]
    count: int

    @property
    def stacked(self) -> bool:
        """Fed one item per batch: some array is a stack of whole feeds, or every one is a fixed scalar."""
        return ITEMS in self.kinds.values() or SAMPLES not in self.kinds.values()

    def item(self, i: int) -> Feeds:
        return _scalars_last({name: array if self.kinds[name] == FIXED else np.asarray(array[i])
                              if self.kinds[name] == ITEMS else np.asarray(array[i : i + 1])
                              for name, array in self.feeds.items()})

    def fixed(self) -> Feeds:
        return {name: array for name, array in self.feeds.items() if self.kinds[name] == FIXED}

    def sliced(self, start: int, stop: int) -> Feeds:
        return {name: np.asarray(array[start:stop]) for name, array in self.feeds.items()
                if self.kinds[name] == SAMPLES}


def _rechunk(files: Iterator[tuple[Path, _FileFeeds]], batch_size: int) -> Iterator[Feeds]:
    """Batches of exactly batch_size samples (the last may be smaller), across file boundaries. Files whose
    samples differ in shape (text of another length), or whose fixed scalars differ, never share a batch: the
    one pending is cut short. Files with stacked arrays give one batch per item."""
    pending: list[Feeds] = []
    fixed: Feeds = {}
    held = 0

    def flush() -> Feeds:
        return _scalars_last({**_join(pending), **fixed})

    for _path, data in files:
        if data.stacked:
            if held:
                yield flush()
                pending, held = [], 0
            for i in range(data.count):
                yield data.item(i)
            continue
        shapes = {name: a.shape[1:] for name, a in data.feeds.items() if data.kinds[name] == SAMPLES}
        if held and (any(pending[0][name].shape[1:] != shape for name, shape in shapes.items())
                     or not _same(fixed, data.fixed())):
            yield flush()
            pending, held = [], 0
        fixed = data.fixed()
        start = 0
        while start < data.count:
            take = min(batch_size - held, data.count - start)
            pending.append(data.sliced(start, start + take))
            held += take
            start += take
            if held == batch_size:
                yield flush()
                pending, held = [], 0
    if held:
        yield flush()


def _scalars_last(feeds: Feeds) -> Feeds:
    """The arrays with a leading axis first: consumers (_split) read the batch size off the first one."""
    return dict(sorted(feeds.items(), key=lambda kv: np.ndim(kv[1]) == 0))


def _same(a: Feeds, b: Feeds) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _join(parts: list[Feeds]) -> Feeds:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def load_calibration(spec: str | os.PathLike, input_names: Sequence[str], batch_size: int = 8, *,
                     ranks: Mapping[str, int] | None = None, dtypes: Mapping[str, np.dtype] | None = None,
                     max_batches: int | None = None, shapes: Mapping[str, tuple] | None = None
                     ) -> CalibrationSet:
    """A re-iterable stream of feed dicts for ``input_names``; checks the spec exists now, contents later."""
    if batch_size < 1:
        raise GraphpruneError(f"--calib batch size must be 1 or more: got {batch_size}.")
    text = os.fspath(spec)
    if text not in DATASETS:
        path = Path(text)
        if not path.exists():
            raise GraphpruneError(f"--calib {text}: no such file or folder, and not a named dataset "
                                  f"({', '.join(DATASETS)}).")
        if path.is_file() and path.suffix not in EXTENSIONS:
            raise GraphpruneError(f"--calib {text}: not an .npz or .npy file.")
    calib = CalibrationSet(text, tuple(input_names), batch_size, ranks, dtypes, max_batches, shapes)
    if text not in DATASETS:
        calib.files()  # an empty folder fails now
    return calib


def input_shapes(model: ir.Model) -> dict[str, tuple]:
    """Declared shapes of a model's (non-initializer) inputs: ints, None where symbolic or unknown."""
    return {value.name: tuple(d if isinstance(d, int) else None for d in value.shape)
            for value in model.graph.inputs if value.const_value is None and value.shape is not None}


def model_inputs(model: ir.Model) -> tuple[list[str], dict[str, int], dict[str, np.dtype]]:
    """Names, ranks and dtypes of a model's (non-initializer) inputs, for load_calibration."""
    names, ranks, dtypes = [], {}, {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        names.append(value.name)
        if value.shape is not None:
            ranks[value.name] = len(value.shape)
        if value.dtype is not None:
            dtypes[value.name] = np.dtype(value.dtype.numpy())
    return names, ranks, dtypes


# ---------- activation statistics ----------------------------------------------------------------


@dataclass
class ChannelStats:
    """Per channel along one axis, accumulated over every other axis and every batch (float64)."""

    count: int
    total: np.ndarray
    sq_norm: np.ndarray  # sum of squares
    max_abs: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        """Population variance; sums are float64, so cancellation only matters for |mean| >> std."""
        mean = self.mean
        return np.maximum(self.sq_norm / max(self.count, 1) - mean * mean, 0.0)

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sq_norm)

    def add(self, array: np.ndarray, axis: int) -> None:
        rows = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1).reshape(-1, array.shape[axis])
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.sq_norm += np.einsum("ij,ij->j", rows, rows)
        if rows.shape[0]:
            self.max_abs = np.maximum(self.max_abs, np.abs(rows).max(0))

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(0, np.zeros(channels), np.zeros(channels), np.zeros(channels))


StatsKey = tuple[str, int]


def collect_stats(model: ir.Model, requests: Sequence[StatsKey], batches, *,
                  progress: Callable[[int], None] | None = None) -> dict[StatsKey, ChannelStats]:
    """Channel statistics of the requested (value name, axis) pairs over every calibration batch.

    A copy of the model gets the requested values as extra graph outputs and runs on ONNX Runtime
    (CPU), batch by batch; only the running sums are kept. ``progress`` is called with the number of
    batches done.
    """
    requests = list(dict.fromkeys(requests))
    if not requests:
        return {}
    stats: dict[StatsKey, ChannelStats] = {}
    for arrays in _run_with_outputs(model, [name for name, _ in requests], batches, progress):
        for name, axis in requests:
            array = arrays[name]
            if (name, axis) not in stats:
                stats[(name, axis)] = ChannelStats.empty(array.shape[axis])
            elif stats[(name, axis)].total.shape[0] != array.shape[axis]:
                raise GraphpruneError(f"'{name}' changes its axis-{axis} extent between calibration "
                                      "batches; statistics need a fixed channel count.")
            stats[(name, axis)].add(array, axis)
    return stats


# ---------- Gram matrices (least-squares reconstruction) -------------------------------------------


@dataclass(frozen=True)
class Patches:
    """How a consumer sees its input as rows of features: the channel ``axis`` alone (Gemm, MatMul), or
    for a Conv (channels on axis 1, spatial axes after it) every kernel window, im2col-style, with the
    columns ordered (channel, tap) as in ``W.reshape(out, -1)``."""

    axis: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: every begin, then every end
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    def rows(self, array: np.ndarray, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """float64 rows [n, features] in chunks of at most ``chunk`` rows (convs: one sample at a time)."""
        array = np.asarray(array)
        if not self.kernel:
            flat = np.moveaxis(array, self.axis, -1).reshape(-1, array.shape[self.axis])
            for start in range(0, flat.shape[0], chunk):
                yield flat[start : start + chunk].astype(np.float64)
            return
        pointwise = all(k == 1 for k in self.kernel) and not any(self.pads) and self.auto_pad == "NOTSET"
        for sample in array:
            if pointwise:  # 1x1: the (strided) pixels, channels last
                pixels = sample[(slice(None),) + tuple(slice(None, None, st) for st in self.strides)]
                yield np.moveaxis(pixels, 0, -1).reshape(-1, sample.shape[0]).astype(np.float64)
            else:
                yield self._im2col(sample.astype(np.float64))

    def _im2col(self, x: np.ndarray) -> np.ndarray:
        """x: [C, *spatial] -> [positions, C * taps]."""
        k = self.kernel
        r = len(k)
        d = self.dilations or (1,) * r
        s = self.strides or (1,) * r
        spans = [(k[i] - 1) * d[i] + 1 for i in range(r)]
        begins, ends = self._pads(x.shape[1:], spans, s)
        x = np.pad(x, [(0, 0)] + list(zip(begins, ends)))
        windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(1, r + 1)))
        windows = windows[(slice(None),) + tuple(slice(None, None, st) for st in s)
                          + tuple(slice(None, None, di) for di in d)]
        c, positions = x.shape[0], int(np.prod(windows.shape[1 : r + 1]))
        return windows.reshape(c, positions, -1).transpose(1, 0, 2).reshape(positions, -1)

    def _pads(self, spatial, spans, strides) -> tuple[list[int], list[int]]:
        r = len(spans)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = [max(0, (-(-n // st) - 1) * st + sp - n) for n, sp, st in zip(spatial, spans, strides)]
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            return (small, big) if self.auto_pad == "SAME_UPPER" else (big, small)
        if self.auto_pad == "VALID" or not self.pads:
            return [0] * r, [0] * r
        return list(self.pads[:r]), list(self.pads[r:])


@dataclass
class Gram:
    """XᵀX, Xᵀ1 and the row count of the rows a consumer reads, accumulated in float64."""

    count: int
    total: np.ndarray
    gram: np.ndarray

    def add(self, rows: np.ndarray) -> None:
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.gram += rows.T @ rows

    @classmethod
    def empty(cls, features: int) -> Gram:
        return cls(0, np.zeros(features), np.zeros((features, features)))


GramKey = tuple[str, Patches]


def collect_gram(model: ir.Model, requests: Sequence[GramKey], batches, *,
                 progress: Callable[[int], None] | None = None) -> dict[GramKey, Gram]:
    """Gram matrices of the requested (value name, patches) over every calibration batch.

    Same mechanism as collect_stats; memory is the Gram matrices (features² float64 each) plus one batch,
    so the caller bounds the features and splits large request lists over several calls.
    """
    requests = list(dict.fromkeys(requests))
    if not requests:
        return {}
    grams: dict[GramKey, Gram] = {}
    for arrays in _run_with_outputs(model, [name for name, _ in requests], batches, progress):
        for name, patches in requests:
            for rows in patches.rows(arrays[name]):
                gram = grams.setdefault((name, patches), Gram.empty(rows.shape[1]))
                if gram.total.shape[0] != rows.shape[1]:
                    raise GraphpruneError(f"'{name}' changes its channel count between calibration batches; "
                                          "reconstruction needs a fixed one.")
                gram.add(rows)
    return grams


def _run_with_outputs(model: ir.Model, names: Sequence[str], batches,
                      progress: Callable[[int], None] | None, *, truncate: bool = False
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Run a copy of the model with ``names`` as extra outputs over every batch; yield those arrays
    (graph inputs come from the feeds). ``truncate``: run only the nodes ``names`` need (ONNX Runtime
    runs every node of a graph whatever outputs are asked for), for callers that read nothing else."""
    proto = ir.to_proto(model)
    inputs = {v.name for v in model.graph.inputs}
    declared = {o.name for o in proto.graph.output}
    values = _values_by_name(model)
    for name in dict.fromkeys(names):
        if name in inputs or name in declared:
            continue
        value = values.get(name)
        if value is None:
            raise GraphpruneError(f"no value named '{name}' in the model to collect statistics on.")
        elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        declared.add(name)
    if truncate:
        _truncate(proto, set(names))
    session = make_session(proto, optimization="basic", label="the model with statistics outputs")
    fixed = _fixed_batch(session)
    done = 0
    for feeds in batches:
        for chunk in _split(feeds, fixed):
            outputs = run_session(session, chunk, "the model on calibration data")
            yield {name: chunk[name] if name in chunk else outputs[name] for name in names}
        done += 1
        if progress is not None:
            progress(done)
    if not done:
        raise GraphpruneError("the calibration data holds no samples.")


def _truncate(proto: onnx.ModelProto, names: set[str]) -> None:
    """Keep only the outputs in ``names`` and the nodes they depend on (in place). Left whole when a node
    holds a subgraph, whose reads of outer values its inputs do not list."""
    graph = proto.graph
    kept_outputs = [o for o in graph.output if o.name in names]
    if not kept_outputs:  # every name is a graph input (taken from the feeds): a session needs an output
        return
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    needed, keep = set(names), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {}
    for node in model.graph:
        for value in node.outputs:
            if value.name:
                found[value.name] = value
    return found


def _fixed_batch(session) -> int | None:
    """The model's fixed batch size: the static leading extent shared by every input that has one, or None.
    One symbolic leading extent means the batch is free (silero's state is [2, batch, 128]: its static 2
    is not a batch size)."""
    return shared_static_extent([i.shape[0] for i in session.get_inputs() if i.shape])


def declared_fixed_batch(model: ir.Model) -> int | None:
    """The static leading extent all of a model's declared inputs share, or None (as _fixed_batch, from
    the graph instead of a session)."""
    return shared_static_extent([shape[0] for shape in input_shapes(model).values() if shape])


def shared_static_extent(leading: Sequence) -> int | None:
    """The one leading extent every input has, when it is static; None when they differ or it is symbolic.

    Some exporters (paddle2onnx) write a dynamic batch as the extent -1: no positive extent is symbolic too.
    """
    static = len(set(leading)) == 1 and isinstance(leading[0], int) and leading[0] > 0
    return leading[0] if static else None


def _split(feeds: Feeds, fixed: int | None) -> Iterator[Feeds]:
    """Runs of the model's fixed batch size (a trailing partial run is dropped), or the batch whole (also
    when the feeds do not share one leading extent: they are then whole feeds, not samples)."""
    sizes = {array.shape[0] for array in feeds.values() if array.ndim}
    if fixed is None or len(sizes) != 1 or fixed in sizes:
        yield feeds
        return
    n = sizes.pop()
    for start in range(0, n - fixed + 1, fixed):
        yield {name: array[start : start + fixed] if array.ndim else array for name, array in feeds.items()}
