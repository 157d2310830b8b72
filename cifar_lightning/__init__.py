"""Train a CIFAR-10 CNN, attack it with FGSM, defend it, quantize it: one Lightning project."""
