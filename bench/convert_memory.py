"""Peak memory of qwen2-convert against model depth, and its throughput against a plain copy.

Writes two synthetic HF checkpoints (random bf16 bytes, real Qwen2 tensor names and shapes) that
differ only in their layer count, converts each with the real CLI in a subprocess (hf-to-orbax, then
orbax-to-hf), and prints for each: checkpoint bytes, peak RSS of the converter's whole process
tree, wall time, and the throughput of a plain file copy of the same bytes measured in the same
run. Then the ratio (growth of peak RSS) / (growth of checkpoint bytes): 0 means memory is flat in
depth. Example (~0.4 GB and ~2.6 GB, as the issue measures):

    PYTHONPATH=. .venv/bin/python bench/convert_memory.py --layers 9 81
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hf_config(args, layers: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def write_synthetic(directory: str, args, layers: int) -> int:
    """An HF checkpoint of random bf16 values; returns its tensor bytes."""
    import ml_dtypes

    from convert.orbax_to_hf import shard_plan
    from qwen2_jax.config import Qwen2Config
    from qwen2_jax.hf_keys import hf_table
    from qwen2_jax.safetensors_io import SafetensorsWriter

    os.makedirs(directory, exist_ok=True)
    cfg = hf_config(args, layers)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    table = hf_table(Qwen2Config.from_hf(cfg))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 22, np.float32) * 0.02).astype(bf16)  # reused: generation is not the point
    shards = shard_plan(table, bf16, args.shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, entries in zip(names, shards):
        with SafetensorsWriter(
            os.path.join(directory, name), [(e.hf_key, bf16, e.hf_shape) for e in entries], metadata={"format": "pt"}
        ) as w:
            for e in entries:
                n = int(np.prod(e.hf_shape))
                value = np.resize(pool[rng.integers(0, 1 << 20) :], n).reshape(e.hf_shape)
                w.write(e.hf_key, value)
                weight_map[e.hf_key] = name
                total += value.nbytes
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS of the process tree in bytes, wall seconds): the larger of a 10 ms poll of the summed
    tree RSS and the kernel's own high-water mark for the child (which a poll can miss)."""
    import psutil

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = psutil.Process(popen.pid)
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc))
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(popen.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    popen.returncode = os.waitstatus_to_exitcode(status)
    err = popen.stderr.read().decode()
    if popen.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({popen.returncode}): {err.strip()[-2000:]}")
    return max(peak[0], usage.ru_maxrss * 1024), wall


def copy_seconds(src: str, dst: str) -> float:
    os.makedirs(dst, exist_ok=True)
    start = time.perf_counter()
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    os.sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs=2, default=(4, 24), metavar=("SMALL", "LARGE"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-bytes", type=int, default=1 << 30)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--directions", default="hf-to-orbax,orbax-to-hf")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="convert-mem-", dir=args.workdir)
    py = sys.executable
    results = {}
    try:
        for layers in args.layers:
            hf, ob, back = (os.path.join(work, f"{k}-{layers}") for k in ("hf", "orbax", "back"))
            nbytes = write_synthetic(hf, args, layers)
            copy_s = copy_seconds(hf, os.path.join(work, f"copy-{layers}"))
            shutil.rmtree(os.path.join(work, f"copy-{layers}"))
            row = {"bytes": nbytes, "copy_s": copy_s}
            for direction in args.directions.split(","):
                src, dst = (hf, ob) if direction == "hf-to-orbax" else (ob, back)
                peak, wall = run_measured([py, "-m", "convert", direction, src, dst, "--quiet", "--overwrite"])
                os.sync()
                row[direction] = (peak, wall)
                print(
                    f"layers={layers:3d} {nbytes / 1e9:6.3f} GB {direction:11s} peak RSS {peak / 1e6:8.1f} MB  "
                    f"{wall:6.1f} s = {nbytes / wall / 1e6:7.1f} MB/s   plain copy {nbytes / copy_s / 1e6:7.1f} MB/s "
                    f"(conversion/copy throughput {copy_s / wall:.2f})",
                    flush=True,
                )
            results[layers] = row
            for d in (back,):
                shutil.rmtree(d, ignore_errors=True)
        small, large = (results[n] for n in args.layers)
        for direction in args.directions.split(","):
            growth = (large[direction][0] - small[direction][0]) / (large["bytes"] - small["bytes"])
            print(f"{direction}: (growth of peak RSS) / (growth of checkpoint bytes) = {growth:.4f}  (bar <= 0.15)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
