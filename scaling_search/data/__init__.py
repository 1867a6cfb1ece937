"""Images for trials: sources (synthetic, CIFAR binary, image folders) and batches."""
