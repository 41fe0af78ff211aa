"""Worker memory per frame: what pre-processing adds, and batches closed by decoded bytes.

Pre-processing memory is measured by behaviour, as the peak RSS a batch of large frames adds.

Measured in a fresh child process: reset the kernel's peak-RSS mark (``/proc/self/clear_refs``),
run the worker's pre-processing (:meth:`dfm_stream.inference.Engine.to_tensor`) on frames that are
already decoded, and read the new peak (``VmHWM``). The frames themselves are not counted; what is
counted is every copy pre-processing makes of them.
"""

import json
import subprocess
import sys

import numpy as np
import torch
from worker_helpers import SIZE, frame_ids, push_frames, run_worker, scores

from dfm_stream.batcher import Batcher
from dfm_stream.images import preprocess, preprocess_tensor

SIDE = 2896
N = 2

MEASURE = f"""
import json
import numpy as np
from dfm_stream.inference import Engine

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

engine = Engine("cpu", "fp32")
rng = np.random.default_rng(0)
frames = [rng.integers(0, 256, ({SIDE}, {SIDE}, 3), dtype=np.uint8) for _ in range({N})]
engine.to_tensor([f[:300, :300] for f in frames], (64, 64))  # warm-up: thread pools, kernels
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
batch = engine.to_tensor(frames, (64, 64))
print(json.dumps({{"extra_bytes": (kib("VmHWM:") - before) * 1024, "shape": list(batch.shape)}}))
"""


def test_preprocessing_large_frames_adds_at_most_one_float_channel_of_one_frame():
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], check=False, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [N, 3, 64, 64]
    pixels = SIDE * SIDE
    # at most two float32 channels of one frame (8 B/px; a fresh install measured 7.9) plus slack;
    # a float32 copy of the batch, what this bound rules out, is 12 B/px x N
    assert result["extra_bytes"] < 9 * pixels, (
        f"pre-processing added {result['extra_bytes'] / pixels:.1f} B/px"
    )


def test_preprocessing_keeps_the_scores_of_the_float_rule():
    """Resizing channel by channel gives the reference rule's values (to float32 rounding)."""
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (2, 300, 410, 3), dtype=np.uint8)
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2)
    images = torch.nn.functional.interpolate(
        rgb.float() / 255.0, size=(64, 64), mode="bilinear", align_corners=False, antialias=True
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (images - mean) / std
    torch.testing.assert_close(preprocess_tensor(rgb, (64, 64)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(preprocess(list(bgr), (64, 64)), expected, rtol=1e-5, atol=1e-5)


def test_a_batch_takes_no_frame_that_would_bring_its_decoded_bytes_over_the_cap():
    batcher = Batcher(batch_size=8, max_wait_ms=1000, max_bytes=100)
    for i, nbytes in enumerate([40, 40, 40, 150, 10, 10]):
        batcher.add("m", i, now=0.0, nbytes=nbytes)
    assert [b.items for b in batcher.ready(now=0.0)] == [[0, 1], [2], [3]]  # [4, 5] may still grow
    assert [b.items for b in batcher.ready(now=0.0, flush=True)] == [[4, 5]]
    counted = Batcher(batch_size=3, max_wait_ms=1000)  # without a byte cap: by count only
    for i in range(4):
        counted.add("m", i, now=0.0, nbytes=10**9)
    assert [b.items for b in counted.ready(now=0.0)] == [[0, 1, 2]]


def test_a_worker_scores_large_frames_in_batches_that_fit_the_byte_cap(redis_client, redis_url, artifact):
    push_frames(redis_client, "c1", artifact.good[:6])
    frame_bytes = SIZE * SIZE * 3
    stats = run_worker(
        redis_url,
        artifact.path,
        cameras=["c1"],
        batch_size=6,
        max_wait_ms=2000,
        max_batch_bytes=2 * frame_bytes,
    )
    assert sorted(s.frame_id for s in scores(redis_client, "c1")) == frame_ids(redis_client, "c1")
    assert stats.scored == 6 and stats.batches == 3
