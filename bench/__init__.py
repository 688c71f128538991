"""Benchmark suite of bit-pipeline: ``python -m bench`` (or ``make bench``).

Measures BiT-M-R50x1 from :mod:`bit_core` against timm's ``resnetv2_50x1_bit`` in one process,
side by side (interleaved rounds, so a change in machine load hits every variant alike):

1. ``train``   -- training images/s (forward + backward + SGD step) per configuration;
2. ``infer``   -- inference images/s and latency, PyTorch eager / folded / bf16 / compiled,
                  timm and ONNX Runtime;
3. ``flops``   -- model FLOPs (``FlopCounterMode``), GEMM peak and achieved GFLOP/s;
4. ``scaling`` -- forward cost against batch size, resolution and model size;
5. ``data``    -- data-loading images/s (the Trainer's DataLoader, 0..n workers) against training
                  images/s, for CIFAR-10- and ImageNet-sized images;
6. ``overhead`` -- the pipeline's own cost: a no-op ``dvc repro``, and a Prefect flow against the
                  same subprocesses in a plain loop.

Results go to ``bench/results/results.json`` and ``RESULTS.md`` (``--out`` to change).
"""

SECTIONS = ("train", "infer", "flops", "scaling", "data", "overhead")
