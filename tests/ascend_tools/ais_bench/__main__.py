"""Stand-in for `python -m ais_bench` at the process boundary: same flags, output layout and
performance summary as the real tool; the ".om" file is an ONNX model (see ../atc), run with
ONNX Runtime."""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

parser = argparse.ArgumentParser()
for flag in ("--model", "--batchsize", "--loop", "--output", "--outfmt", "--device", "--input"):
    parser.add_argument(flag)
args = parser.parse_args()
session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
shape = session.get_inputs()[0].shape
batch = int(args.batchsize)
run_dir = Path(args.output) / time.strftime("%Y_%m_%d-%H_%M_%S")
run_dir.mkdir(parents=True)
times = []
if args.input:
    for path in sorted(Path(args.input).glob("*.npy")):
        start = time.perf_counter()
        out = session.run(None, {"image": np.load(path)})[0]
        times.append((time.perf_counter() - start) * 1000)
        np.save(run_dir / f"{path.stem}_0.npy", out)
else:
    zeros = np.zeros((batch, *shape[1:]), np.float32)
    for _ in range(int(args.loop)):
        start = time.perf_counter()
        out = session.run(None, {"image": zeros})[0]
        times.append((time.perf_counter() - start) * 1000)
    np.save(run_dir / "pure_infer_data_0.npy", out)
t = np.array(times)
stats = (f"min = {t.min():.4f}, max = {t.max():.4f}, mean = {t.mean():.4f}, "
         f"median = {np.median(t):.4f}, percentile(99%) = {np.percentile(t, 99):.4f}")
print("[INFO] -----------------Performance Summary------------------")
print(f"[INFO] H2D_latency (ms): {stats}")
print(f"[INFO] NPU_compute_time (ms): {stats}")
print(f"[INFO] D2H_latency (ms): {stats}")
print(f"[INFO] throughput 1000*batchsize.mean({batch})/NPU_compute_time.mean({t.mean():.4f}): "
      f"{1000 * batch / t.mean()}")
print("[INFO] ------------------------------------------------------")
