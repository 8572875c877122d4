"""The content regression new items are served by: it learns a linear map from the descriptors
that carry it, shrinks away a modality that carries nothing, and round-trips through its file."""
from __future__ import annotations

import numpy as np

from trainer.regression import ContentRegression


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _world(signal_in: str, n: int = 900, seed: int = 0):
    """Text descriptors (unit, non-negative like the hashed bag of words) and frame descriptors
    (centred colour layouts); the target vectors are a linear map of one of them plus noise."""
    rng = np.random.default_rng(seed)
    text = _unit(rng.random((n, 512)) ** 8)
    frames = rng.normal(size=(n, 192)) * 0.1
    source = text if signal_in == "text" else frames
    target = _unit(source @ rng.normal(size=(source.shape[1], 16)) + 0.05 * rng.normal(size=(n, 16)))
    return frames.astype(np.float32), text.astype(np.float32), target.astype(np.float32)


def test_it_predicts_held_out_items_and_shrinks_the_modality_that_carries_nothing():
    frames, text, target = _world("text")
    fit = ContentRegression.fit(frames[:700], text[:700], target[:700])
    held = (fit.predict(frames[700:], text[700:]) * target[700:]).sum(1)
    assert held.mean() > 0.9, held.mean()
    assert fit.frame_weight < 1.0  # noise frames: the leave-one-out error wants them down-weighted

    frames, text, target = _world("frames", seed=1)
    fit = ContentRegression.fit(frames[:700], text[:700], target[:700])
    held = (fit.predict(frames[700:], text[700:]) * target[700:]).sum(1)
    assert fit.frame_weight > 0 and held.mean() > 0.8, (fit.frame_weight, held.mean())


def test_predictions_are_unit_and_survive_the_file(tmp_path):
    frames, text, target = _world("text", n=300)
    fit = ContentRegression.fit(frames, text, target)
    out = fit.predict(frames[:20], text[:20])
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    fit.save(tmp_path / "r.npz")
    again = ContentRegression.load(tmp_path / "r.npz")
    assert np.array_equal(again.predict(frames[:20], text[:20]), out) and again.fitted_on == 300
