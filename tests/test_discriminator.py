"""The MEAL V2 discriminator: layer order and shapes, the final-ReLU switch, the BCE floor."""

import math

import pytest
import torch
from torch import nn

from fastmeal.losses import discriminator_loss
from fastmeal.models.discriminator import BCE_FLOOR_WITH_FINAL_RELU, Discriminator


def test_layer_order_and_shapes():
    d = Discriminator(1000)
    kinds = [type(m) for m in d.net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    linears = [m for m in d.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 125), (125, 15), (15, 2)]
    assert all(m.bias is not None for m in linears)
    assert d(torch.randn(6, 1000)).shape == (6, 2)


def test_default_init_matches_pytorch_linear():
    # Same RNG stream as three bare nn.Linear layers built in the same order: default init, nothing custom.
    torch.manual_seed(0)
    d = Discriminator(10)
    torch.manual_seed(0)
    bare = [nn.Linear(10, 125), nn.Linear(125, 15), nn.Linear(15, 2)]
    linears = [m for m in d.net if isinstance(m, nn.Linear)]
    for a, b in zip(linears, bare, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0)


def test_final_relu_switch():
    torch.manual_seed(0)
    with_relu, without = Discriminator(10), Discriminator(10, final_relu=False)
    assert isinstance(with_relu.net[-1], nn.ReLU) and isinstance(without.net[-1], nn.Linear)
    without.load_state_dict(with_relu.state_dict())  # same parameters, same keys
    x = torch.randn(256, 10)
    raw = without(x)
    assert (raw < 0).any()  # otherwise the comparison below proves nothing
    torch.testing.assert_close(with_relu(x), raw.clamp_min(0), rtol=0, atol=0)


def test_floor_value():
    assert BCE_FLOOR_WITH_FINAL_RELU == pytest.approx(0.5 * math.log(2.0))
    assert BCE_FLOOR_WITH_FINAL_RELU == pytest.approx(0.34657359, abs=1e-8)


def _perfect_discriminator(num_classes: int, gain: float, final_relu: bool) -> Discriminator:
    """A D that scores (a, 0) on rows with x[0] = +1 and (0, a) on rows with x[0] = -1, with a = gain."""
    d = Discriminator(num_classes, final_relu=final_relu)
    with torch.no_grad():
        for m in d.net:
            if isinstance(m, nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        l1, l2, l3 = (m for m in d.net if isinstance(m, nn.Linear))
        l1.weight[0, 0], l1.weight[1, 0] = 1.0, -1.0  # h1 = (relu(x0), relu(-x0), 0, ...)
        l2.weight[0, 0], l2.weight[1, 1] = 1.0, 1.0
        l3.weight[0, 0], l3.weight[1, 1] = gain, gain
    return d


def test_floor_approached_by_a_perfect_discriminator():
    c, b = 10, 8
    student = torch.zeros(b, c)
    student[:, 0] = 1.0
    teacher = torch.zeros(b, c)
    teacher[:, 0] = -1.0
    losses = [discriminator_loss(_perfect_discriminator(c, a, True), student, teacher).item() for a in (1, 5, 30)]
    # Exactly (2 ln 2 + 2 softplus(-a)) / 4: strictly above the floor, decreasing to it.
    for a, loss in zip((1, 5, 30), losses, strict=True):
        assert loss == pytest.approx((math.log(2) + math.log1p(math.exp(-a))) / 2, rel=1e-6)
    assert losses[0] > losses[1] > losses[2] >= BCE_FLOOR_WITH_FINAL_RELU
    assert losses[2] - BCE_FLOOR_WITH_FINAL_RELU < 1e-6
    # Shift the last layer so the "off" score is -30 and the "on" score +30: with the final ReLU the
    # off score is clamped to 0 and the floor holds; without it the loss falls to ~0.
    for final_relu in (True, False):
        d = _perfect_discriminator(c, 60.0, final_relu)
        with torch.no_grad():
            d.net[4].bias.fill_(-30.0)
        loss = discriminator_loss(d, student, teacher).item()
        if final_relu:
            assert BCE_FLOOR_WITH_FINAL_RELU <= loss < BCE_FLOOR_WITH_FINAL_RELU + 1e-6
        else:
            assert loss < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_floor_never_undercut_on_random_inputs(seed):
    torch.manual_seed(seed)
    c = 50
    d = Discriminator(c)
    # Scale up the last layer so the scores span a wide range (large and zero outputs).
    with torch.no_grad():
        d.net[4].weight.mul_(50.0)
    for scale in (0.1, 1.0, 10.0, 100.0):
        loss = discriminator_loss(d, scale * torch.randn(64, c), scale * torch.randn(64, c))
        assert loss.item() > BCE_FLOOR_WITH_FINAL_RELU
