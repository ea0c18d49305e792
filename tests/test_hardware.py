"""vlmlab.hardware: bfloat16 is recognised as native or not from the CPU's features, asking for it
where it is not warns (in one line from the CLI), and dtype "auto" picks by the same rule."""

from __future__ import annotations

import warnings

import pytest
import torch

import vlmlab.hardware as hw
from vlmlab.api import parse_dtype
from vlmlab.train.trainer import TrainConfig, Trainer


@pytest.fixture
def cpu_features(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bfloat16; returns a setter."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        hw.fast_bfloat16.cache_clear()

    yield set_native
    hw.fast_bfloat16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpu(cpu_features, native):
    cpu_features(native)
    assert hw.fast_bfloat16("cpu") is native
    assert parse_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("float32") == torch.float32 and parse_dtype("bfloat16") == torch.bfloat16


def test_amx_alone_counts_as_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    hw.fast_bfloat16.cache_clear()
    try:
        assert hw.fast_bfloat16("cpu")
    finally:
        hw.fast_bfloat16.cache_clear()


def test_bfloat16_on_a_cpu_without_it_warns_and_float32_never_does(cpu_features):
    cpu_features(False)
    with pytest.warns(hw.SlowPrecisionWarning, match=r"smollm2 runs in bfloat16.*no native bfloat16.*float32"):
        assert hw.warn_if_slow_bfloat16(torch.bfloat16, "cpu", what="smollm2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hw.warn_if_slow_bfloat16(torch.float32, "cpu")
        cpu_features(True)
        assert not hw.warn_if_slow_bfloat16(torch.bfloat16, "cpu")


def test_bf16_training_warns_where_bf16_is_slow(cpu_features, tmp_path):
    cpu_features(False)
    model = torch.nn.Linear(2, 2)
    with pytest.warns(hw.SlowPrecisionWarning, match=r"training \(precision bf16\)"):
        Trainer(model, lambda m, b: (m(b).sum(), {}), lambda *a: torch.ones(1, 2),
                TrainConfig(steps=1, batch_size=1, precision="bf16"), tmp_path)


def test_cli_prints_the_warning_as_one_line(cpu_features, monkeypatch):
    from vlmlab.cli import main as cli

    cpu_features(False)
    monkeypatch.setattr(cli.warnings, "formatwarning", cli.warnings.formatwarning)  # restored after the test
    assert cli.main(["generate", "--model", "no/such/model", "--prompt", "x"]) == 1  # installs the CLI's format
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hw.warn_if_slow_bfloat16("bfloat16", "cpu", what="scenes-smol")
    line = cli.warnings.formatwarning(caught[0].message, caught[0].category, "f.py", 1)
    assert line.startswith("vlmlab: warning: scenes-smol runs in bfloat16") and line.count("\n") == 1
