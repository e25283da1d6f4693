"""Convert LAION's CLIP-based NSFW detector for ViT-L/14 (a Keras / autokeras model) to safetensors for `NSFWHead`.

LAION publishes the detector (LAION-AI/CLIP-based-NSFW-Detector, MIT licence) only as a Keras SavedModel zipped:
https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_binary_nsfw.zip
This script reads it and writes `~/.cache/curation/clip-vit-l-14-nsfw-head.safetensors`, the default of
`curation quality --nsfw-head`, then checks that `NSFWHead` gives the Keras model's outputs on random unit vectors.

It needs `tensorflow` and `autokeras`, which are NOT dependencies of this project and are not installed by `make`:
run it once, in an environment with this package and `pip install tensorflow autokeras`, and copy the file to
the machines that score (or point --nsfw-head at it). It is not part of the tests.

    python examples/convert_nsfw_keras.py clip_autokeras_binary_nsfw.zip [--out FILE]

The Keras model's layers: input, MultiCategoryEncoding (a no-op on float inputs), Normalization (mean, variance,
count), Dense 64, ReLU, Dense 512, ReLU, Dense 256, ReLU, Dense 1, sigmoid. Keras stores a Dense kernel as
(in, out); torch's Linear weight is (out, in).
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("~/.cache/curation/clip-vit-l-14-nsfw-head.safetensors").expanduser()


def keras_state_dict(model) -> dict[str, np.ndarray]:  # noqa: ANN001 (a tf.keras Model)
    """NSFWHead's parameter names -> the Keras model's weights, found by layer type rather than position."""
    norm = [layer for layer in model.layers if type(layer).__name__ == "Normalization"]
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    if len(norm) != 1 or len(dense) != 4:
        raise SystemExit(f"expected 1 Normalization and 4 Dense layers, found {len(norm)} and {len(dense)}")
    mean, variance = (np.asarray(w.numpy(), np.float32).reshape(-1) for w in norm[0].weights[:2])
    state = {"norm.mean": mean, "norm.variance": variance}
    for i, layer in enumerate(dense, 1):
        kernel, bias = (np.asarray(w.numpy(), np.float32) for w in layer.weights)
        state[f"linear_{i}.weight"] = np.ascontiguousarray(kernel.T)
        state[f"linear_{i}.bias"] = bias
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zip", type=Path, help="clip_autokeras_binary_nsfw.zip from LAION-AI/CLIP-based-NSFW-Detector")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the safetensors file (default: {DEFAULT_OUT})")
    args = parser.parse_args()

    import autokeras as ak  # noqa: F401 (registers the custom layers the SavedModel names)
    import tensorflow as tf
    import torch
    from safetensors.numpy import save_file

    from curation.quality.heads import load_head

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.zip) as archive:
            archive.extractall(tmp)  # LAION's own archive, a SavedModel folder
        folder = next(p.parent for p in Path(tmp).rglob("saved_model.pb"))
        model = tf.keras.models.load_model(folder, custom_objects=ak.CUSTOM_OBJECTS, compile=False)
        state = keras_state_dict(model)
        rng = np.random.default_rng(8492)
        probe = rng.normal(size=(64, state["norm.mean"].shape[0])).astype(np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)  # CLIP image embeddings are L2-normalised
        expected = np.asarray(model.predict(probe, verbose=0), np.float32).reshape(-1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    head = load_head("nsfw", str(args.out), dim=probe.shape[1])
    with torch.no_grad():
        got = head(torch.from_numpy(probe)).numpy()
    diff = float(np.abs(got - expected).max())
    print(f"wrote {args.out}: NSFWHead vs the Keras model on 64 random unit vectors, max |difference| {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
