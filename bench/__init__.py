"""Benchmarks of bit-pipeline: ``python -m bench`` (``make bench``), ``--help`` for the options.

bit_core's BiT-M-R50x1 against timm's ``resnetv2_50x1_bit`` (the same network) in one process,
the variants of each section taking turns round by round, so a change in the machine's load
hits them alike and the ratios stay meaningful on a shared machine:

- ``train``    training images/s through ``bit_core.train.Trainer``, fp32 / bf16 / compiled, each
               configuration judged by its loss curve against fp32; the training targets;
- ``infer``    inference images/s per batch size, eager / folded / bf16 / compiled, ONNX Runtime
               and OpenVINO (bf16, int8) on bit_core's export; the inference targets;
- ``flops``    the model's FLOPs and the GEMM peak of this machine, so that every row above gets
               its achieved GFLOP/s and fraction of that peak; the copy bandwidth and GroupNorm's
               activations, for the memory floor of a training step;
- ``data``     data-loading images/s against training images/s, CIFAR-10- and ImageNet-sized;
- ``precision`` the default experiment fine-tuned in fp32, in bf16 and in fp32 channels_last
               (the control: rounding alone) by the stages' own commands: the loss curves'
               alignment (MRE) and the test top-1 of each;
- ``overhead`` the pipeline's own cost: a no-op ``dvc repro``, and the Prefect flow's stage task
               against the same ``dvc repro`` calls in a plain loop.

Results: ``bench/results/results.json`` and ``RESULTS.md`` (``--out`` to change).
"""

# Set before torch (and its libgomp) loads; settings in the environment win. The variants of a
# section take turns batch by batch, so torch's idle OpenMP workers must neither spin on through
# the next variant's batch (with OMP_WAIT_POLICY=ACTIVE, OpenVINO int8 at batch 32 lost a third
# of its speed to them) nor sleep between torch's own ops (with PASSIVE, compiled torch at batch
# 1 ran at 40% of its speed): they spin GOMP_SPINCOUNT rounds, a short while against one batch,
# then sleep.
THREAD_ENV = {"GOMP_SPINCOUNT": "20000"}

# `infer` runs last: the sections that start processes (data's loader workers, precision's and
# overhead's stages) crashed the bench (SIGSEGV) once its back-ends (ONNX Runtime, OpenVINO,
# inductor) had run in the process.
SECTIONS = ("train", "data", "flops", "precision", "overhead", "infer")
