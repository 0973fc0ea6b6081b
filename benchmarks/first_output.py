"""Load-to-first-output of a deployed package in a fresh process: import, `load_deployed`, the
first call and a second one on a random input of the recorded shape (2 intra-op threads).

    .venv/bin/python benchmarks/first_output.py b0.pt2      # or e1.onnx

Run it once per measurement: each run is a new process, as production starts one.
"""

import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

import lowformer  # noqa: E402

torch.set_num_threads(2)
t1 = time.perf_counter()
deployed = lowformer.load_deployed(sys.argv[1])
t2 = time.perf_counter()
x = torch.randn(deployed.input_shape)
out = deployed(x)
t3 = time.perf_counter()
deployed(x)
t4 = time.perf_counter()
print(
    f"{sys.argv[1]}: import {t1 - t0:.2f} s, load {t2 - t1:.2f} s, first call {t3 - t2:.3f} s, "
    f"load-to-first-output {t3 - t1:.2f} s, second call {t4 - t3:.3f} s, output {tuple(out.shape)}"
)
