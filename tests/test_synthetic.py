"""The embedded world must be learnable: content predicts taste, as in real data."""
import numpy as np

from streaming.config import WorldConfig
from streaming.producer import Sink
from streaming.synthetic import World, run_world


def test_frames_and_captions_carry_the_latent_content():
    world = World.create(WorldConfig(initial_items=200, new_items=0))
    pixels = np.stack([world.frames(i)[0].astype(float).ravel() for i in range(200)])
    x = np.c_[pixels - pixels.mean(0), np.ones(200)]
    # a linear read-out of the pixels recovers the latent factors on held-out items
    coef, *_ = np.linalg.lstsq(x[:150], world.content[:150], rcond=None)
    pred = x[150:] @ coef
    r2 = 1 - ((pred - world.content[150:]) ** 2).sum() / ((world.content[150:] - world.content[150:].mean(0)) ** 2).sum()
    assert r2 > 0.8
    # the caption's words follow the sign of the dominant factor
    k = int(np.argmax(np.abs(world.content[0])))
    words = set(world.caption(0).split())
    expected = world.pos_words[k] if world.content[0, k] > 0 else world.neg_words[k]
    assert words & set(expected)


def test_events_follow_taste_and_cold_items_stay_out_of_the_stream(tmp_path):
    cfg = WorldConfig(n_users=50, initial_items=40, new_items=20, events_per_user=20, events_per_new_item=5, cold_holdout_fraction=0.5, malformed_fraction=0.05)
    world = World.create(cfg)
    events, raw, announced = [], [], []
    for _ in run_world(world, tmp_path, Sink(events.append, lambda k, v: raw.append(v), announced.append), realtime=False):
        pass
    assert len(announced) == 60 and world.cold_items
    assert not {e.item_id for e in events} & world.cold_items
    assert raw  # broken payloads exist, for the dead-letter path
    pos = [world.score(np.array([e.user_id]), np.array([e.item_id]))[0, 0] for e in events if e.positive]
    neg = [world.score(np.array([e.user_id]), np.array([e.item_id]))[0, 0] for e in events if e.event == "skip"]
    assert np.mean(pos) > np.mean(neg) + 0.5
    truth = world.eval_truth(0)
    assert truth and all(set(v) <= world.cold_items for v in truth.values())
