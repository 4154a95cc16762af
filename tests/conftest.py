"""Shared setup for the pass tests.

One intra-op thread: on a 2-core machine that other processes also use, PyTorch's OpenMP pool with 2
threads makes the tiny convolutions of these tests ~50x slower (a conv that takes 0.5 ms takes 50 ms).
"""
import torch

torch.set_num_threads(1)
