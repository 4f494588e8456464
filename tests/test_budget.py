"""Memory budget (sea_edge.runtime.budget, sea_edge.runtime.measure): device profiles, the analytic peak model, the
report and its schema, and one measurement of the real default export against the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sea_edge.runtime import budget as bd
from sea_edge.runtime.measure import MEASURE_KEYS, SETTINGS, measure_peak

from sea_edge.errors import SeaEdgeError

REQUIRED_DEVICES = ("rpi4-4gb", "rpi5-8gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "android-midrange-8gb",
                    "iphone-15-6gb", "apple-m1-8gb", "x86-minipc-16gb")
ROOT = Path(__file__).resolve().parents[1]


# -- a folder with the default export's manifest (sparse files of the listed sizes): fast, no export needed ----------

def _manifest(n_layers=30) -> dict:
    kinds = ("key", "value", "sea_state", "sea_rows1", "sea_rows2")
    names = [f"present.{i}.{k}" for i in range(n_layers) for k in kinds]
    return {
        "format": "sea-edge-model/1",
        "source_model": {"name": "smollm2-135m", "causal": True, "n_layers": n_layers, "n_heads": 9, "n_kv_heads": 3,
                         "head_dim": 64, "max_positions": 8192, "hidden_size": 576, "intermediate_size": 1536,
                         "vocab_size": 49152, "n_features": 266, "compressed_width": 256, "decoder_channels": 4,
                         "decoder_ratio": 4, "tie_word_embeddings": True},
        "sea_config": {"k": 64, "compressed_width": 256, "n_features": 266, "head_cap_factor": 2.0,
                       "performer_chunk": 128, "budget_length": None, "decoder_channels": 4, "decoder_ratio": 4},
        "quantization": {"scheme": "none"},
        "graphs": {"prefill": {"file": "model.onnx", "inputs": ["input_ids", "attention_mask", "position_ids"],
                               "outputs": ["logits", *names]},
                   "decode": {"file": "decode.onnx", "inputs": [], "outputs": []}, "n_layers": n_layers},
        "files": {"model.onnx": {"bytes": 18084822, "sha256": "0"}, "model.onnx.data": {"bytes": 552191232,
                                                                                           "sha256": "0"},
                  "decode.onnx": {"bytes": 17807881, "sha256": "0"}, "tokenizer.json": {"bytes": 2, "sha256": "0"}},
    }


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("budget") / "smollm2-sea"
    folder.mkdir()
    man = _manifest()
    for name, entry in man["files"].items():
        with open(folder / name, "wb") as f:
            f.truncate(entry["bytes"])  # sparse: the budget reads sizes, never contents
    (folder / "sea_edge.json").write_text(json.dumps(man))
    return folder


def _write(tmp_path: Path, devices: dict, name="devices.json", fmt="sea-edge-devices/1") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"format": fmt, "devices": devices}))
    return p


def _device(**over) -> dict:
    src = "test figure"
    d = {"description": "a test box", "total_ram_gib": {"value": 32, "source": src},
         "reserved_gib": {"value": 2, "source": src}, "memory_bandwidth_gbs": {"value": 80, "source": src},
         "cpu": {"arch": "x86_64", "isa": ["avx2", "avx512", "avx512_vnni"], "cores": 16, "source": src},
         "gpu": None}
    d.update(over)
    return d


# -- profiles -------------------------------------------------------------------------------------------------------

def test_builtin_profiles_load_and_validate():
    profiles = bd.load_profiles()
    assert set(REQUIRED_DEVICES) <= set(profiles)
    for p in profiles.values():
        assert 0 < p.limit_bytes < p.total_ram_bytes
        assert {"total_ram", "reserved", "memory_bandwidth", "cpu"} <= set(p.sources)
        assert all(isinstance(s, str) and s for s in p.sources.values())
        assert p.quant_preset in bd.QUANT_PRESETS
    assert profiles["rpi5-8gb"].quant_preset == "arm64"
    assert profiles["x86-minipc-16gb"].quant_preset == "avx2"
    assert profiles["jetson-orin-nano-8gb"].gpu["shared_memory"] is True
    phone = bd.get_device("iphone")  # alias of iphone-15-6gb
    assert phone.name == "iphone-15-6gb" and phone.limit_bytes == phone.per_app_limit_bytes == 3 * bd.GiB
    assert bd.get_device("android-midrange-8gb").limit_bytes == 4 * bd.GiB  # per-app limit below RAM - reserve


def test_profiles_file_ships_in_the_wheel():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "profiles.json" in data["tool"]["setuptools"]["package-data"]["sea_edge.runtime"]
    assert bd.PROFILES_FILE.is_file() and bd.PROFILES_FILE.parent.name == "runtime"


@pytest.mark.parametrize("suffix", ["json", "toml"])
def test_user_profiles_extend_and_override(tmp_path, suffix):
    if suffix == "json":
        path = _write(tmp_path, {"x86-server": _device(), "rpi5-8gb": _device(description="overridden")})
    else:
        path = tmp_path / "devices.toml"
        path.write_text('format = "sea-edge-devices/1"\n[devices.x86-server]\ndescription = "a test box"\n'
                        'total_ram_gib = {value = 32, source = "t"}\nreserved_gib = {value = 2, source = "t"}\n'
                        'memory_bandwidth_gbs = {value = 80, source = "t"}\n'
                        'cpu = {arch = "x86_64", isa = ["avx2", "avx512_vnni"], cores = 16, source = "t"}\n')
    profiles = bd.load_profiles(path)
    assert set(REQUIRED_DEVICES) <= set(profiles)
    server = profiles["x86-server"]
    assert server.quant_preset == "avx512_vnni" and server.limit_bytes == 30 * bd.GiB
    if suffix == "json":
        assert profiles["rpi5-8gb"].description == "overridden"


@pytest.mark.parametrize("case, entry, field", [
    ("missing-ram", {k: v for k, v in _device().items() if k != "total_ram_gib"}, "total_ram_gib"),
    ("no-source", _device(reserved_gib={"value": 1}), "reserved_gib.source"),
    ("text-value", _device(memory_bandwidth_gbs={"value": "fast", "source": "s"}), "memory_bandwidth_gbs.value"),
    ("bad-arch", _device(cpu={"arch": "riscv", "isa": [], "cores": 4, "source": "s"}), "cpu.arch"),
    ("bad-isa", _device(cpu={"arch": "x86_64", "isa": ["avx2", "mmx9"], "cores": 4, "source": "s"}), "cpu.isa"),
    ("reserve-too-big", _device(reserved_gib={"value": 64, "source": "s"}), "reserved_gib"),
    ("app-limit", _device(per_app_limit_gib={"value": 99, "source": "s"}), "per_app_limit_gib"),
])
def test_malformed_profile_names_the_field(tmp_path, case, entry, field):
    path = _write(tmp_path, {"box": entry})
    with pytest.raises(SeaEdgeError, match=field.replace(".", r"\.")) as err:
        bd.load_profiles(path)
    assert "box" in str(err.value) and "\n" not in str(err.value)


def test_malformed_profile_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SeaEdgeError, match="not valid JSON"):
        bd.load_profiles(bad)
    with pytest.raises(SeaEdgeError, match="'format'"):
        bd.load_profiles(_write(tmp_path, {"box": _device()}, fmt="other/1"))
    with pytest.raises(SeaEdgeError, match="does not exist"):
        bd.load_profiles(tmp_path / "missing.json")


def test_unknown_device_lists_known():
    with pytest.raises(SeaEdgeError, match="unknown device 'toaster'") as err:
        bd.get_device("toaster")
    assert all(name in str(err.value) for name in REQUIRED_DEVICES)


# -- the analytic model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S", [1, 63, 111, 256, 1000, 1024, 4096, 8191, 8192])
def test_mask_budget_matches_the_config(S):
    from sea_edge.config import SEAConfig, budget

    dims = bd.model_dims(_manifest())
    cfg = SEAConfig(k=64, compressed_width=256, n_features=266, causal=True)
    assert bd.mask_budget(dims, S) == tuple(int(x) for x in budget(cfg, 9, S))


def test_estimate_components_and_growth():
    dims = bd.model_dims(_manifest())
    prev = 0
    for T in (1, 63, 111, 1024, 8192):
        for kind in ("sea", "dense"):
            e = bd.estimate_peak(dims, T, attention=kind)
            assert set(e["components"]) == set(bd.COMPONENTS)
            assert e["total_bytes"] == sum(e["components"].values())
        sea = bd.estimate_peak(dims, T)
        assert sea["total_bytes"] > prev
        prev = sea["total_bytes"]
    e = bd.estimate_peak(dims, 8192, B=2, logits="last")
    assert e["components"]["logits"] == 2 * 49152 * 4  # (B, 1, V) fp32
    assert e["components"]["kv_cache"] == 30 * 2 * 2 * 3 * 8192 * 64 * 4
    # every position's logits, the graph cut before the lm_head: the peak is the larger of the body's (the layers,
    # as with the last position's logits, less those) and the head's (the (B, T, V) logits on top of the weights,
    # the state, the cut and the body's residue, nothing of the layers)
    for T in (1024, 8192):
        e, last = bd.estimate_peak(dims, T), bd.estimate_peak(dims, T, logits="last")
        lc = last["components"]
        body = last["total_bytes"] - 49152 * 4
        state = lc["kv_cache"] + lc["sea_state"]
        head = (lc["weights"] + lc["runtime"] + state + T * 49152 * 4 + T * 576 * 4
                + int(bd.CALIBRATION["head_residue"] * state))
        assert e["total_bytes"] == max(body, head)
        assert e["peak_phase"] == ("lm_head" if head >= body else "attention")
        if e["peak_phase"] == "lm_head":
            assert e["components"]["logits"] == T * 49152 * 4 and e["components"]["sea_mask"] == 0
    dense = bd.estimate_peak(dims, 8192, attention="dense")
    assert dense["peak_phase"] == "attention"  # quadratic scores win at long context
    assert dense["components"]["sea_state"] == dense["components"]["sea_mask"] == 0


def test_report_schema_two_devices(fake_folder):
    for device in ("rpi5-8gb", "iphone"):
        rep = bd.budget_report(fake_folder, device, context=1024)
        bd.validate_report(rep)
        assert json.loads(json.dumps(rep)) == rep  # JSON-able
        assert rep["device"]["name"] in ("rpi5-8gb", "iphone-15-6gb")
        assert rep["headroom_bytes"] == rep["limit_bytes"] - rep["sea"]["total_bytes"]
    broken = {k: v for k, v in rep.items() if k != "verdict"}
    with pytest.raises(SeaEdgeError, match="verdict"):
        bd.validate_report(broken)
    with pytest.raises(SeaEdgeError, match="sea.components"):
        bd.validate_report({**rep, "sea": {**rep["sea"], "components": {"weights": -1}}})


def test_max_context_and_ratio(fake_folder):
    rep = bd.budget_report(fake_folder, "rpi4-4gb", context=2048)
    mc, dims, limit = rep["max_context"], bd.model_dims(fake_folder), rep["limit_bytes"]
    assert 0 < mc["sea"] < mc["max_positions"] and 0 < mc["dense"] < mc["max_positions"]
    assert mc["ratio"] == pytest.approx(mc["sea"] / mc["dense"])
    for kind in ("sea", "dense"):  # the largest context that fits: one more token does not
        assert bd.estimate_peak(dims, mc[kind], attention=kind)["total_bytes"] <= limit
        assert bd.estimate_peak(dims, mc[kind] + 1, attention=kind)["total_bytes"] > limit
    assert rep["logits"] == "all"  # this graph has no num_logits_to_keep input: generate falls back to all logits
    for kind in ("sea", "dense"):  # memory alone: the same search, past the model's positions where memory allows
        assert mc[f"{kind}_memory"] == mc[kind]  # under the cap here
    big = bd.budget_report(fake_folder, "jetson-agx-orin-64gb", context=8192)
    mb = big["max_context"]
    assert mb["sea"] == mb["dense"] == 8192  # capped by the model's positions
    assert mb["sea_memory"] > mb["dense_memory"] > 8192 and mb["ratio_memory"] == pytest.approx(
        mb["sea_memory"] / mb["dense_memory"])
    assert bd.estimate_peak(dims, mb["sea_memory"])["total_bytes"] <= big["limit_bytes"]
    assert bd.estimate_peak(dims, mb["sea_memory"] + 1)["total_bytes"] > big["limit_bytes"]
    assert big["verdict"] == "fits"


@pytest.fixture(scope="module")
def keep_last_folder(tmp_path_factory) -> Path:
    """The fake folder as the exporter now writes it: the optional num_logits_to_keep input, no final mask sort."""
    folder = tmp_path_factory.mktemp("budget-last") / "smollm2-sea"
    folder.mkdir()
    man = _manifest()
    man["graphs"]["prefill"]["optional_inputs"] = {"num_logits_to_keep": "int64 [1]"}
    man["graphs"]["prefill"]["unused_topk_retained"] = False  # as sea-edge exports write it
    for name, entry in man["files"].items():
        with open(folder / name, "wb") as f:
            f.truncate(entry["bytes"])
    (folder / "sea_edge.json").write_text(json.dumps(man))
    return folder


def test_generate_mode_keeps_last_logits(keep_last_folder):
    """generate: the prefill returns the last position's logits, (B, 1, V), for SEA and dense alike; score: all of
    them. Without the (B, T, V) logits SEA's peak grows by the KV cache and its bounded mask state only, and on an
    8 GB board memory alone would hold >= 4x the dense context (the issue's aim; the model's 8192 positions cap
    both)."""
    dims = bd.model_dims(keep_last_folder)
    assert dims.logits_to_keep
    gen = bd.budget_report(keep_last_folder, "rpi5-8gb", context=4096)
    score = bd.budget_report(keep_last_folder, "rpi5-8gb", context=4096, mode="score")
    bd.validate_report(gen)
    bd.validate_report(score)
    assert gen["mode"] == "generate" and gen["logits"] == "last" and score["logits"] == "all"
    assert gen["sea"]["components"]["logits"] == 49152 * 4 and score["sea"]["components"]["logits"] == 4096 * 49152 * 4
    assert gen["dense"]["components"]["logits"] <= 49152 * 4
    assert gen["sea"]["total_bytes"] < score["sea"]["total_bytes"]
    mc = gen["max_context"]
    assert mc["ratio_memory"] >= 4.0, mc
    assert mc["sea_memory"] > score["max_context"]["sea_memory"]
    with pytest.raises(SeaEdgeError, match="unknown mode 'chat'"):
        bd.budget_report(keep_last_folder, "rpi5-8gb", mode="chat")
    with pytest.raises(SeaEdgeError, match="logits must be"):
        bd.estimate_peak(dims, 16, logits="first")


def test_context_beyond_max_positions(fake_folder):
    with pytest.raises(SeaEdgeError, match="beyond the model's 8192 positions") as err:
        bd.budget_report(fake_folder, "rpi5-8gb", context=8193)
    assert "\n" not in str(err.value)
    with pytest.raises(SeaEdgeError, match="beyond"):
        measure_peak(fake_folder, 9000)
    with pytest.raises(SeaEdgeError, match="unknown device"):
        bd.budget_report(fake_folder, "toaster")


def test_table_plot_and_device_list(fake_folder, tmp_path):
    from rich.console import Console

    rep = bd.budget_report(fake_folder, "rpi5-8gb", context=4096)
    console = Console(record=True, width=160)
    console.print(bd.render_table(rep))
    console.print(bd.list_devices_table())
    text = console.export_text()
    for word in ("logits", "sea_mask", "device limit", "headroom", "verdict", "max context", "rpi4-4gb", "iphone"):
        assert word in text
    out = bd.plot_budget(rep, tmp_path / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runtime_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
            "import sea_edge.runtime.budget, sea_edge.runtime.measure\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr


def test_measure_refuses_off_linux(fake_folder, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(SeaEdgeError, match="needs Linux"):
        measure_peak(fake_folder, 16)


# -- the real export: analytic vs measured ----------------------------------------------------------------------------

def test_analytic_matches_measured_peak(exported_default, monkeypatch):
    """One prefill of T=1024 in a fresh process (the one measurement of this file): the analytic peak is within 10%
    of the measured VmHWM, the result carries the documented keys, and the report embeds it."""
    folder = exported_default.out
    m = measure_peak(folder, 1024)
    assert set(MEASURE_KEYS) <= set(m)
    assert m["settings"]["execution_order"] == SETTINGS["execution_order"] and m["settings"]["arena"] is True
    assert m["settings"]["mem_reuse"] is False and m["T"] == 1024 and m["graph"] == "prefill"
    assert m["settings"]["head_split"] is True  # run as SeaSession runs it on the CPU
    assert m["peak_rss_bytes"] >= m["rss_after_load"] > m["rss_baseline"] > 0
    est = bd.estimate_peak(bd.model_dims(folder), 1024)["total_bytes"]
    err = (est - m["peak_rss_bytes"]) / m["peak_rss_bytes"]
    assert abs(err) <= 0.10, f"analytic {est / 2**20:.0f} MiB vs measured {m['peak_rss_bytes'] / 2**20:.0f} MiB"
    import sea_edge.runtime.measure as measure_mod

    monkeypatch.setattr(measure_mod, "measure_peak", lambda *a, **k: m)  # the report's measure=True path, no rerun
    rep = bd.budget_report(folder, "rpi5-8gb", context=1024, measure=True, mode="score")
    bd.validate_report(rep)
    assert rep["measured"]["error_pct"] == pytest.approx(100 * err, abs=0.01)
    for device in ("rpi5-8gb", "jetson-orin-nano-8gb"):  # the exported default on two 8 GB boards, generate mode
        r = bd.budget_report(folder, device, context=1024)
        bd.validate_report(json.loads(json.dumps(r)))
        assert r["logits"] == "last" and r["verdict"] == "fits" and r["max_context"]["ratio_memory"] >= 4
    # a generation's prefill (the last position's logits): a second fresh process, same bound
    last = measure_peak(folder, 1024, keep_last=True)
    assert last["logits"] == "last" and m["logits"] == "all"
    est = bd.estimate_peak(bd.model_dims(folder), 1024, logits="last")["total_bytes"]
    assert abs(est - last["peak_rss_bytes"]) <= 0.10 * last["peak_rss_bytes"], (est, last["peak_rss_bytes"])
    assert last["peak_rss_bytes"] < m["peak_rss_bytes"]


def test_weights_resident_counts_packed_copy_and_tied_transpose():
    """fp32: the file plus the tied lm_head's fp32 transpose; a block-quantized folder adds onnxruntime's packed copy
    of the quantized weights (quantization.bytes_after); the mask's final-sort term only for older graphs."""
    man = _manifest()
    tied = 49152 * 576 * 4
    fp32 = bd.estimate_peak(bd.model_dims(man), 1024)["components"]
    assert fp32["weights"] == 552191232 + tied
    q = {**man, "quantization": {"scheme": "int8", "bytes_after": 111275760},
         "files": {**man["files"], "model.onnx.data": {"bytes": 226943232, "sha256": "0"}}}
    int8 = bd.estimate_peak(bd.model_dims(q), 1024)["components"]
    assert int8["weights"] == 226943232 + 111275760 + tied
    assert int8["logits"] == fp32["logits"] and int8["attention"] == fp32["attention"]  # activations stay fp32
    old = {**man, "graphs": {**man["graphs"], "prefill": {**man["graphs"]["prefill"], "unused_topk_retained": True}}}
    new = {**man, "graphs": {**man["graphs"], "prefill": {**man["graphs"]["prefill"], "unused_topk_retained": False}}}
    d_old, d_new = bd.model_dims(old), bd.model_dims(new)
    _, c, span = bd.mask_budget(d_new, 1024)
    diff = (bd.estimate_peak(d_old, 1024)["components"]["sea_mask"]
            - bd.estimate_peak(d_new, 1024)["components"]["sea_mask"])
    assert diff == 30 * 9 * 1024 * c * span * 8
