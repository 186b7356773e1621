"""Command-line tools around the experiments: sweeps, results tables and figures.

    python -m scripts.sweep --config configs/vit_fashion_mnist.py --recipes paper --nm 2:4,1:8 ...
    python -m scripts.tables --root results/sweeps/NAME
    python -m scripts.figures --root results/sweeps/NAME
"""
