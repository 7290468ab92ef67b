"""bench/adapter_norms.py (issue 25): a run's largest ||B A|| and its devices' active counts after
the warm-up, read from the files a run writes (a PEFT adapter folder and report.json)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def _norms(*args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "adapter_norms.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _run_folder(tmp_path, active_per_step, devices=None):
    torch.manual_seed(0)
    tensors, sizes = {}, {}
    for layer in range(3):
        a, b = torch.randn(4, 16), torch.randn(8, 4) * (layer + 1)
        name = f"model.layers.{layer}.mlp.gate_proj"
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = a, b
        sizes[name] = float((b.double() @ a.double()).norm())
    (tmp_path / "adapter").mkdir()
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    devices = devices or {"device-0": {"active_per_step": active_per_step}}
    report = {"config": {"kill_revive": {"warmup": 2}}, "kill_revive": devices}
    (tmp_path / "report.json").write_text(json.dumps(report))
    return sizes


def test_names_the_largest_products_and_the_active_counts_after_the_warm_up(tmp_path):
    sizes = _run_folder(tmp_path, [[0, 1, 2], [0, 1, 2], [0, 1], [0], [1, 2]])  # entries from step 2's decision on count
    done = _norms(tmp_path, "--top", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = sorted(sizes, key=sizes.get, reverse=True)[:2]
    assert f"3 modules, largest ||B A||: {first} {sizes[first]:.2f}, {second} {sizes[second]:.2f}" in done.stdout
    assert "device-0: 1-3 adapters active a step after the warm-up" in done.stdout


def test_names_which_devices_kept_the_largest_modules_active(tmp_path):
    names = [f"model.layers.{layer}.mlp.gate_proj" for layer in range(3)]
    # the step before the warm-up's end does not count; after it, device-0 holds layer 2 on 3 of 4 steps, device-1 never
    devices = {"device-0": {"modules": names, "active_per_step": [[0, 1, 2], [2], [2], [0], [1, 2]]},
               "device-1": {"modules": names, "active_per_step": [[2], [0], [0], [1], [1]]}}
    sizes = _run_folder(tmp_path, None, devices)
    largest = max(sizes, key=sizes.get)
    assert largest == names[2]
    done = _norms(tmp_path, "--top", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{largest} active after the warm-up: device-0 75%, device-1 0%" in done.stdout
    # after the warm-up device-0 holds layer 2 on most steps, device-1 none on most (layer 0 and 1 on 2 of 4 each)
    assert "modules active on most steps after the warm-up: 1, by number of devices holding them: 1: 1" in done.stdout


def test_refuses_a_folder_without_an_adapter_or_with_a_truncated_one(tmp_path):
    done = _norms(tmp_path)
    assert done.returncode != 0 and "no adapter/adapter_model.safetensors" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    done = _norms(tmp_path)
    assert done.returncode != 0 and "not a readable safetensors file" in done.stderr and "Traceback" not in done.stderr


def test_refuses_a_run_without_a_readable_report(tmp_path):
    _run_folder(tmp_path, [[0]])
    (tmp_path / "report.json").write_text("{")
    done = _norms(tmp_path)
    assert done.returncode != 0 and "no readable report.json" in done.stderr and "Traceback" not in done.stderr
