"""The classic PyTorch quickstart pipeline, as a competitor: torchvision MNIST + ToTensor + DataLoader(64, shuffle)
+ the same MLP + Adam(lr=1e-3). Prints `ACC <test accuracy>` after every epoch (the tutorial tests every epoch).

Usage: python tutorial_mlp.py ROOT [MAX_EPOCHS]   (ROOT holds MNIST/raw/ with the four decompressed files)
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import ToTensor


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x):
        return self.linear_relu_stack(self.flatten(x))


def main() -> None:
    root, max_epochs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    torch.manual_seed(0)
    training_data = datasets.MNIST(root=root, train=True, download=False, transform=ToTensor())
    test_data = datasets.MNIST(root=root, train=False, download=False, transform=ToTensor())
    train_loader = DataLoader(training_data, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_data, batch_size=64)
    model = NeuralNetwork()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(max_epochs):
        model.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        print(f"ACC {correct / len(test_data)}", flush=True)


if __name__ == "__main__":
    main()
