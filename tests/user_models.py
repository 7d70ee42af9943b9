"""Modules as a user would write them, named in tests by `model.spec` ("user_models:...")."""

import torch
from torch import nn


class SmallResNet(nn.Module):
    """A user's residual net with BatchNorm, written without any modelforge code."""

    def __init__(self, num_classes, input_shape, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.fc(self.pool(x).flatten(1))


def small_resnet(num_classes, input_shape):
    return SmallResNet(num_classes, input_shape)


def wrong_signature(num_classes):
    return nn.Linear(1, num_classes)


def not_a_module(num_classes, input_shape):
    return "a string"


def ten_logits(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 10))
