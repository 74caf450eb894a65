"""Loads a relume-written safetensors file with Python's safetensors and compares it
with the expected values. Usage: interop_check.py FILE EXPECTED_JSON.
Exit 0 when identical; 3 when safetensors/numpy are missing; 1 on a mismatch."""
import json
import sys

try:
    import numpy as np
    from safetensors.numpy import load_file
except ImportError as e:  # reported to the Rust test, which decides skip or fail
    print(f"missing python module: {e}")
    sys.exit(3)

tensors = load_file(sys.argv[1])
expected = json.load(open(sys.argv[2]))
if sorted(tensors) != sorted(expected):
    print(f"keys differ: {sorted(tensors)} vs {sorted(expected)}")
    sys.exit(1)
for key, want in expected.items():
    got = tensors[key]
    arr = np.array(want["values"], dtype=want["numpy"]).reshape(want["shape"])
    if got.dtype != arr.dtype or got.shape != arr.shape or not np.array_equal(got, arr):
        print(f"{key}: got {got.dtype} {got.shape} {got!r}, want {arr.dtype} {arr.shape} {arr!r}")
        sys.exit(1)
print(f"ok: {len(expected)} tensors identical")
