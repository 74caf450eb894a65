"""Opens each given safetensors file with Python's safetensors, both through
`safe_open` and `load_file` (numpy backend), and prints one JSON object per file:
{"file": ..., "safe_open": null or the error, "load_file": null or the error}.
Usage: interop_layout.py FILE...
Exit 0 when every file was tried; 3 when safetensors/numpy are missing."""
import json
import sys

try:
    import numpy  # noqa: F401  (the numpy backend needs it)
    from safetensors import safe_open
    from safetensors.numpy import load_file
except ImportError as e:  # reported to the Rust test, which decides skip or fail
    print(f"missing python module: {e}")
    sys.exit(3)


def attempt(fn):
    try:
        fn()
        return None
    except Exception as e:  # any rejection counts; the message is for the report
        return f"{type(e).__name__}: {e}"


def via_safe_open(path):
    with safe_open(path, framework="numpy") as f:
        for k in f.keys():
            f.get_tensor(k)


for path in sys.argv[1:]:
    print(json.dumps({
        "file": path,
        "safe_open": attempt(lambda: via_safe_open(path)),
        "load_file": attempt(lambda: load_file(path)),
    }))
