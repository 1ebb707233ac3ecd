"""The Inception weights file: found where documented, refused with a wrong sha256, a clear error
when missing, never a download; the network's layout loads a torchvision-keyed state_dict and its
TF1 resize is exact. ~10 s on 2 CPU cores (one 299x299 forward, one 95 MB file written)."""

import pytest
import torch

from fastgan.metrics import inception
from fastgan.metrics.inception import (WEIGHTS_NAME, WEIGHTS_SHA256, FIDInception, InceptionWeightsError,
                                       find_weights, load_inception, resize_like_tf1, sha256)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV, raising=False)
    monkeypatch.delenv(inception.TEST_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "cache"


def test_missing_weights_error_names_file_place_and_sha(no_weights_anywhere):
    with pytest.raises(InceptionWeightsError) as e:
        inception.feature_net(None, None, str(no_weights_anywhere))
    msg = str(e.value)
    assert WEIGHTS_NAME in msg and WEIGHTS_SHA256 in msg
    assert str(no_weights_anywhere / WEIGHTS_NAME) in msg          # where to put it
    assert "--inception-weights" in msg and inception.ENV in msg and "never downloads" in msg


def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(no_weights_anywhere, tmp_path, monkeypatch):
    default = no_weights_anywhere / WEIGHTS_NAME
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    assert find_weights(None, None, str(no_weights_anywhere)) == default
    with pytest.raises(InceptionWeightsError, match="nowhere.pth"):
        find_weights(str(tmp_path / "nowhere.pth"), None, str(no_weights_anywhere))
    monkeypatch.setenv(inception.ENV, str(default))
    assert find_weights(None, "/also/nowhere.pth", str(no_weights_anywhere)) == default   # env before config


def test_wrong_sha256_is_refused(tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    bad.write_bytes(torch.randn(1000).numpy().tobytes())
    with pytest.raises(InceptionWeightsError) as e:
        load_inception(bad)
    assert WEIGHTS_SHA256 in str(e.value) and sha256(bad) in str(e.value)


def test_state_dict_with_torchvision_keys_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    state = FIDInception().state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}   # as in old files
    assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    net = load_inception(path, expected_sha256=sha256(path))
    assert torch.equal(net.Mixed_6e.branch7x7dbl_5.conv.weight, state["Mixed_6e.branch7x7dbl_5.conv.weight"])
    feats, logits = net(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.allclose(logits, feats @ state["fc.weight"].T, atol=1e-4)    # logits without the bias
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(InceptionWeightsError, match="unexpected"):
        load_inception(path, expected_sha256=sha256(path))


def test_tf1_bilinear_resize():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # TF1, align_corners=False: source = out x in/out, no half-pixel shift, clamped at the edge
    y = resize_like_tf1(x, 4)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    assert torch.allclose(y[0, 0, 1, 1], torch.tensor(15.0))
    big = torch.rand(2, 3, 8, 8)
    assert torch.equal(resize_like_tf1(big, 8), big)                 # same size: identity
