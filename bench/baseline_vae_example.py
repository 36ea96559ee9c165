"""The baseline: a VAE trained the way the canonical PyTorch VAE example (pytorch/examples, vae/main.py)
trains one, written here from its description.

- a map-style dataset that turns each uint8 28x28 image into a PIL image and then a float tensor
  through `torchvision.transforms.ToTensor`, as `torchvision.datasets.MNIST` does per sample;
- a `DataLoader` with shuffling, and on CUDA `num_workers=1` and `pin_memory` (on the CPU the example
  passes neither, so the default `num_workers=0` loads in the training process);
- the 784-400-20 MLP with a sigmoid output, the loss as binary cross-entropy (summed) plus the
  analytic KL, in eager PyTorch, Adam with lr 1e-3;
- `loss.item()` after every step (a host synchronisation per step).

Its loss is the negative ELBO of a Bernoulli decoder: BCE(sigmoid(logits), x) summed over pixels
equals -log p(x|z) of `fastvae.log_likelihood(x, logits, dist="bernoulli")`, so the two systems'
test losses are in the same units (nats per sample).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PILImages(Dataset):
    """uint8 images (N, 28, 28) served one at a time as (1, 28, 28) float tensors in [0, 1], via PIL."""

    def __init__(self, images: Tensor) -> None:
        self.images = images.reshape(len(images), 28, 28).numpy()
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(np.asarray(self.images[index]), mode="L")
        return self.to_tensor(image), 0  # (image, label), as the example's data sets yield


class ExampleVAE(nn.Module):
    """784-400-20 MLP VAE; `forward` returns (reconstruction probabilities, mu, logvar)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: Tensor) -> Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """BCE + KLD, summed over the batch and the dimensions (nats per batch)."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def loader(images: Tensor, batch_size: int, *, device: torch.device, shuffle: bool) -> DataLoader:
    return DataLoader(
        PILImages(images),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=1 if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )


def train_epoch(model: ExampleVAE, data: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """One epoch as the example runs it; returns the mean training loss in nats per sample."""
    model.train()
    train_loss = 0.0
    for data_batch, _ in data:
        data_batch = data_batch.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data_batch)
        loss = loss_function(recon_batch, data_batch, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
    return train_loss / len(data.dataset)


@torch.no_grad()
def test_loss(model: ExampleVAE, data: DataLoader, device: torch.device) -> float:
    """The example's test loss: BCE + KLD with one draw of z per sample, nats per sample."""
    model.eval()
    total = 0.0
    for data_batch, _ in data:
        data_batch = data_batch.to(device)
        recon_batch, mu, logvar = model(data_batch)
        total += loss_function(recon_batch, data_batch, mu, logvar).item()
    return total / len(data.dataset)
