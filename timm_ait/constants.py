"""Normalisation constants shared by the model families' pretrained cfgs."""

# CIFAR-10 per-channel statistics of the training set (the authors' code uses the often copied
# std (0.2023, 0.1994, 0.2010), which is not the dataset's)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
