"""The PyTorch eager reference of a bundle: its source model's towers, called on numpy arrays.

``edgemm bench`` times a bundle's graphs against the model they were exported
from, on the same pixel batch and token feeds. The manifest's ``source`` says
what that model is:

* ``{"kind": "default", ...}``: the packaged default towers (``default_towers()``);
* ``{"kind": "huggingface", "path": FOLDER, ...}``: the local CLIP/SigLIP folder,
  loaded with :class:`~edgemm.export.models.clip.Checkpoint` if it still exists.

Quantized bundles keep their source's ``source`` (plus ``quantized_from``), so
their reference is the fp32 source model, which is the point of comparing them.
A tower replaced by a distilled student (``source.distilled_from``) has no
reference: its PyTorch module is not kept, and timing the teacher in its place
would credit distillation to the runtime. The other tower keeps its reference.

When no reference can be built (no source recorded, the folder is not on this
machine, torch missing, a different CUDA setup), :func:`torch_reference`
returns ``(None, reason)`` instead of raising: a benchmark still has numbers
to report without it, and the reason goes into its report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import EdgemmError, MissingDependencyError, require
from edgemm.runtime.manifest import Manifest

REFERENCE_KIND = "pytorch-eager"


class Reference:
    """A source model's two towers in PyTorch eager mode.

    Args:
        description: What was loaded, for reports (e.g. ``"CLIPModel from /ckpt"``).
        image_tower: pixels tensor (N, 3, H, W) → unit embedding (N, dim).
        text_tower: token tensors by name → unit embedding (N, dim); it picks the
            names it takes (SigLIP takes ``input_ids`` only).
        device: torch device the towers run on (``"cpu"``, ``"cuda"``).

    Attributes:
        unavailable: Task (``"image"``, ``"text"``) → why this reference does
            not stand for the bundle's graph of that tower (a distilled student).
    """

    kind = REFERENCE_KIND

    def __init__(self, description: str, image_tower: Callable[[Any], Any],
                 text_tower: Callable[[Mapping[str, Any]], Any], *, device: str = "cpu", half: bool = False):
        self.description = description
        self.device = device
        self.half = half  # the towers' weights and the pixels in fp16 (the eager baseline of an fp16 engine)
        self._image = image_tower
        self._text = text_tower
        self.unavailable: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Reference({self.description!r}, device={self.device!r})"

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a preprocessed float32 (N, 3, H, W) batch; returns float32 (N, dim).

        The copy to and from the device is included, as it is in an ONNX Runtime
        call on numpy arrays; reading the result back also waits for the GPU.
        """
        import torch

        with torch.inference_mode():
            out = self._image(torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).to(
                self.device, torch.float16 if self.half else torch.float32))
            return out.float().cpu().numpy()

    def embed_texts(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Embed token feeds (``input_ids``, ``attention_mask``: int64 (N, L)); returns float32 (N, dim)."""
        import torch

        with torch.inference_mode():
            tensors = {name: torch.from_numpy(np.asarray(v, np.int64)).to(self.device) for name, v in feeds.items()}
            return self._text(tensors).float().cpu().numpy()


def _default_reference(device: str, half: bool) -> Reference:
    import torch

    from edgemm.export.models.dual_encoder import default_towers

    image, text, _ = default_towers()
    dtype = torch.float16 if half else torch.float32
    image.to(device, dtype)
    text.tower.to(device, dtype)
    return Reference(
        "default towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) from the packaged weights",
        lambda pixels: image(pixels)[0],  # (embedding, class probabilities)
        lambda feeds: text.tower(feeds["input_ids"], feeds["attention_mask"]),
        device=device, half=half,
    )


def _huggingface_reference(folder: Path, device: str, half: bool) -> Reference:
    import torch

    from edgemm.export.models.clip import Checkpoint

    ckpt = Checkpoint(folder)
    dtype = torch.float16 if half else torch.float32
    ckpt.image_tower.to(device, dtype)
    ckpt.text_tower.to(device, dtype)
    names = ckpt.arch.text_inputs
    return Reference(
        f"{ckpt.arch.model_class} from {ckpt.folder}",
        ckpt.image_tower,
        lambda feeds: ckpt.text_tower(*(feeds[name] for name in names)),
        device=device, half=half,
    )


def torch_reference(manifest: Manifest, *, threads: int | None = None, device: str = "cpu",
                    half: bool = False) -> tuple[Reference | None, str | None]:
    """Build the PyTorch eager reference of a bundle from its manifest's ``source``.

    Args:
        manifest: The bundle's manifest.
        threads: ``torch.set_num_threads`` (and one inter-op thread), to match the
            threads the bundle runs with; ``None`` leaves torch's defaults.
        device: torch device, ``"cpu"`` or ``"cuda"``.
        half: fp16 weights and pixels (CUDA only): the eager baseline of an fp16 bundle or engine.

    Returns:
        ``(reference, None)``, or ``(None, reason)`` when none can be built here;
        the reason says why and what would make it available.
    """
    source = manifest.source or {}
    kind = source.get("kind")
    if kind not in ("default", "huggingface"):
        if kind is None:
            return None, ("the bundle's manifest records no source model (manifest.source has no 'kind'), "
                          "so there is no PyTorch model to compare with")
        return None, f"source kind {kind!r} has no PyTorch reference in this edgemm"
    if kind == "huggingface":
        folder = Path(str(source.get("path", "")))
        if not source.get("path") or not folder.is_dir():
            return None, (f"the source checkpoint folder '{source.get('path')}' recorded in the manifest is not on "
                          "this machine; copy it to that path to measure the PyTorch reference")
    try:
        torch = require("torch", "export", "The PyTorch reference")
    except MissingDependencyError as e:
        return None, str(e)
    if device.startswith("cuda") and not torch.cuda.is_available():
        return None, (f"the reference would run on {device}, but this torch ({torch.__version__}) sees no CUDA "
                      "device; timing it on the CPU would compare devices, not runtimes")
    if half and not device.startswith("cuda"):
        return None, "an fp16 PyTorch reference runs on CUDA only (its CPU kernels are not what a GPU would run)"
    if threads is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before torch's first parallel work; then it stays as it was
            pass
    try:
        reference = (_default_reference(device, half) if kind == "default"
                     else _huggingface_reference(folder, device, half))
    except (EdgemmError, ImportError, OSError) as e:
        # e.g. the packaged weights or transformers are missing, or the folder is incomplete.
        return None, f"building the PyTorch reference failed: {type(e).__name__}: {e}"
    for tower in manifest.distilled_towers:
        reference.unavailable[tower] = (
            f"the {tower} graph is a distilled student whose PyTorch module is not kept; timing its teacher instead "
            "would credit distillation to the runtime (the teacher-vs-student speed-up is in the manifest, "
            "verification.distillation.speed)")
    return reference, None
