"""Make the ONNX fixtures of tests/test_onnx*.py with PyTorch (needs torch; the tests do not).

    .venv/bin/pip install torch==2.13.0     # a local CPU build; never a cnnserve dependency
    .venv/bin/python tests/data/make_onnx_fixtures.py

Writes into tests/data/:

- ``lenet.onnx``: a LeNet (conv 6 5x5 - relu - max pool - conv 16 5x5 - relu - max pool -
  flatten - fc 120 - relu - fc 84 - relu - fc 10) trained in torch on scikit-learn's digits
  enlarged to 28 x 28 (bilinear), inputs normalised with mean 0.5, std 0.25; opset 13, a
  dynamic batch. ``lenet_expected.npz``: ``inputs`` (4 normalised test digits), ``scores``
  (torch's logits), and a dense check: ``image01`` (a 1 x 40 x 48 canvas of [0, 1] pixels)
  with ``dense`` (10, 4, 6), torch's logits on every 28 x 28 crop at stride 4 of the
  normalised canvas (the crop loop).
- ``bn_avg.onnx``: conv (pad 1) - batchnorm - relu - batchnorm - avg pool - dropout - conv -
  relu - flatten - fc - batchnorm1d - relu - dropout - fc - log-softmax, on 3 x 12 x 12, with
  random running statistics and affine parameters; opset 17, without constant folding (so
  that the first batchnorm stays a BatchNormalization node rather than being folded into the
  conv). The exporter leaves the dropouts out of an eval-mode graph: tests/test_onnx.py puts
  Dropout and Identity nodes in with the onnx helper API. ``bn_avg_expected.npz``:
  ``inputs``, ``scores`` (torch's log-probabilities).
- ``fc357.onnx``: conv 2 -> 3 3x3 on 2 x 7 x 9, so the first fc reads a 3 x 5 x 7 volume
  (flattened with ``x.view(x.size(0), -1)``: a Reshape fed by shape arithmetic), then fc 6 -
  relu - fc 5; opset 11. ``fc357_expected.npz``: ``inputs``, ``scores``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

OUT = Path(__file__).resolve().parent
MEAN, STD = 0.5, 0.25


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BnAvg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.bn3 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.drop(F.avg_pool2d(self.bn2(x), 2))
        x = torch.flatten(F.relu(self.conv2(x)), 1)
        x = self.drop(F.relu(self.bn3(self.fc1(x))))
        return F.log_softmax(self.fc2(x), dim=1)


class Fc357(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(3 * 5 * 7, 6)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as [0, 1] pixels enlarged to 28 x 28, and their labels."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), digits.target


def export(model: nn.Module, shape: tuple, name: str, opset: int, **options) -> None:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, *shape),),
        str(OUT / name),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        opset_version=opset,
        dynamo=False,
        **options,
    )


def lenet() -> None:
    torch.manual_seed(0)
    x01, y = digits_28()
    x = torch.tensor((x01 - MEAN) / STD)
    target = torch.tensor(y)
    train, test = slice(0, 1500), slice(1500, None)
    net = LeNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(4):
        order = torch.randperm(1500)
        for k in range(0, 1500, 50):
            batch = order[k : k + 50]
            optimizer.zero_grad()
            F.cross_entropy(net(x[train][batch]), target[train][batch]).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[test]).argmax(1) == target[test]).float().mean().item()
        print(f"lenet: test accuracy {accuracy:.3f}")
        inputs = x[test][:4]
        scores = net(inputs)
        canvas = np.zeros((1, 40, 48), dtype=np.float32)
        canvas[:, 2:30, 3:31] = x01[1500]  # a test digit, and part of another
        canvas[:, 12:40, 24:48] = np.maximum(canvas[:, 12:40, 24:48], x01[1501][:, :, :24])
        normalised = torch.tensor((canvas - MEAN) / STD)
        crops = [
            normalised[:, 4 * i : 4 * i + 28, 4 * j : 4 * j + 28]
            for i in range(4)
            for j in range(6)
        ]
        dense = net(torch.stack(crops)).T.reshape(10, 4, 6)
    export(net, (1, 28, 28), "lenet.onnx", 13)
    np.savez(
        OUT / "lenet_expected.npz",
        inputs=inputs.numpy(),
        scores=scores.numpy(),
        image01=canvas,
        dense=dense.numpy(),
    )


def bn_avg() -> None:
    torch.manual_seed(1)
    net = BnAvg()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    net.eval()
    inputs = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        scores = net(inputs)
    export(net, (3, 12, 12), "bn_avg.onnx", 17, do_constant_folding=False)
    np.savez(OUT / "bn_avg_expected.npz", inputs=inputs.numpy(), scores=scores.numpy())


def fc357() -> None:
    torch.manual_seed(2)
    net = Fc357().eval()
    inputs = torch.randn(4, 2, 7, 9)
    with torch.no_grad():
        scores = net(inputs)
    export(net, (2, 7, 9), "fc357.onnx", 11)
    np.savez(OUT / "fc357_expected.npz", inputs=inputs.numpy(), scores=scores.numpy())


if __name__ == "__main__":
    lenet()
    bn_avg()
    fc357()
    for path in sorted(OUT.glob("*.onnx")):
        print(f"{path.name}: {path.stat().st_size:,} bytes")
