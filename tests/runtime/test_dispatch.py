"""The kernel dispatcher (secateur.runtime.dispatch): measured choices, the screen, the per-machine
cache on disk, forcing, and what results record. Candidates here are fake calls whose cost is
known (they sleep), so the right answer is known too."""

from __future__ import annotations

import json
import time

import pytest
import torch

import secateur
from secateur.errors import SecateurError
from secateur.runtime import dispatch, machine
from secateur.quant.rtn import RTNConfig
from secateur.testing import tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test measures into its own cache file, with nothing remembered in memory (the native
    kernels' build stays where it is)."""
    real = dispatch.cache_path
    monkeypatch.setattr(dispatch, "cache_path", lambda: tmp_path / "cache" / "kernels" / real().name)
    monkeypatch.delenv("SECATEUR_KERNELS", raising=False)
    monkeypatch.delenv("SECATEUR_KERNEL_MEASURE", raising=False)
    monkeypatch.setattr(dispatch, "_memory", {})
    monkeypatch.setattr(dispatch, "BUDGET_S", 0.01)
    monkeypatch.setattr(dispatch, "MAX_ROUNDS", 5)


class Fake:
    """A candidate costing ``per_row`` seconds a row (a sleep); counts its calls by row count."""

    def __init__(self, per_row: float):
        self.per_row, self.calls = per_row, {}

    def at(self, rows: int):
        def run():
            self.calls[rows] = self.calls.get(rows, 0) + 1
            time.sleep(self.per_row * rows)
        return run


def maker(fakes: dict[str, Fake]):
    return lambda rows: {name: fake.at(rows) for name, fake in fakes.items()}


def test_buckets():
    assert [dispatch.bucket(t) for t in (0, 1, 2, 3, 4, 5, 16, 17, 300, 512, 513, 10**6)] == \
        [1, 1, 2, 4, 4, 8, 16, 32, 512, 512, 512, 512]
    assert dispatch.bucket_label(512) == "512+" and dispatch.bucket_label(8) == "8"


def test_the_fastest_candidate_wins_and_a_pathological_one_never_runs_the_full_shape():
    fakes = {"fp32": Fake(2e-4), "int_mm": Fake(5e-5), "onednn": Fake(2e-2)}  # onednn: 100x fp32
    assert dispatch.choose("w8a8", 16, (8, 8), maker(fakes)) == "int_mm"
    assert fakes["onednn"].calls.get(16, 0) == 0 and fakes["onednn"].calls[1] >= 1  # screened on one row
    record = dispatch.recorded()["w8a8|8x8|m16"]
    assert record["kernel"] == "int_mm" and record["screened"] == ["onednn"] and record["rows"] == 16
    assert record["us"]["int_mm"] < record["us"]["fp32"]


def test_float32_wins_when_every_quantized_kernel_is_slower():
    fakes = {"fp32": Fake(1e-4), "int_mm": Fake(3e-4), "gemv": Fake(4e-4)}
    assert dispatch.choose("w8a8", 4, (8, 8), maker(fakes)) == "fp32"


def test_choices_are_cached_on_disk_per_machine_and_read_back_without_measuring(monkeypatch, tmp_path):
    fakes = {"fp32": Fake(1e-4), "int_mm": Fake(1e-5)}
    assert dispatch.choose("w8a8", 100, (8, 16), maker(fakes)) == "int_mm"
    path = dispatch.cache_path()
    assert path.parent == tmp_path / "cache" / "kernels" and machine.key() in path.name
    data = json.loads(path.read_text())
    assert data["machine"] == machine.describe()
    assert data["choices"]["w8a8|8x16|m128"]["kernel"] == "int_mm"
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file and a rename

    monkeypatch.setattr(dispatch, "_memory", {})  # a new process: only the file remembers

    def never(rows):
        raise AssertionError("measured again")
    assert dispatch.choose("w8a8", 128, (8, 16), never) == "int_mm"
    assert dispatch.choose("w8a8", 77, (8, 16), never) == "int_mm"  # same bucket


def test_the_cache_lives_under_the_secateur_cache_named_by_the_machine(monkeypatch, tmp_path):
    monkeypatch.undo()
    monkeypatch.setenv("SECATEUR_CACHE_DIR", str(tmp_path / "c"))
    assert dispatch.cache_path() == tmp_path / "c" / "kernels" / f"choices-{machine.key()}.json"
    threads = torch.get_num_threads()
    first = machine.key()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        assert machine.key() != first  # another thread count is another machine
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # so is another oneDNN ISA cap
    assert machine.key() != first


def test_a_corrupt_cache_file_is_ignored_and_replaced(monkeypatch):
    path = dispatch.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    fakes = {"fp32": Fake(1e-4), "int_mm": Fake(1e-5)}
    assert dispatch.choose("w8a8", 1, (4, 4), maker(fakes)) == "int_mm"
    assert json.loads(path.read_text())["choices"]["w8a8|4x4|m1"]["kernel"] == "int_mm"


def test_forcing_by_setting_and_by_block(monkeypatch):
    fakes = {"fp32": Fake(1e-4), "int_mm": Fake(1e-5), "onednn": Fake(1e-5)}
    monkeypatch.setenv("SECATEUR_KERNELS", "w8a8=fp32,w8a8@1=onednn")
    assert dispatch.choose("w8a8", 300, (8, 8), maker(fakes)) == "fp32"
    assert dispatch.choose("w8a8", 1, (8, 8), maker(fakes)) == "onednn"
    assert not fakes["int_mm"].calls  # nothing measured
    monkeypatch.delenv("SECATEUR_KERNELS")
    before = dispatch.generation()
    with dispatch.forced({"w8a8": "onednn"}):
        assert dispatch.generation() != before
        assert dispatch.choose("w8a8", 300, (8, 8), maker(fakes)) == "onednn"
        # a forced kernel that cannot take the caller's weight: the measured choice among those that can
        assert dispatch.choose("w8a8", 300, (8, 8), maker(fakes), available=("fp32", "int_mm")) == "int_mm"
    assert dispatch.generation() != before


@pytest.mark.parametrize("text,message", [
    ("w8a9=fp32", "unknown operation 'w8a9' (did you mean 'w8a8'?)"),
    ("w8a8=int_m", "unknown kernel 'int_m' for w8a8 (did you mean 'int_mm'?)"),
    ("w8a8", "must look like op=kernel"),
    ("w8a8@x=fp32", "the bucket after @"),
])
def test_bad_forcing_is_one_clear_line(text, message):
    with pytest.raises(SecateurError, match="SECATEUR_KERNELS") as info:
        dispatch.parse_forced(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_measuring_off_takes_the_first_available_in_order(monkeypatch):
    monkeypatch.setenv("SECATEUR_KERNEL_MEASURE", "0")
    fakes = {"fp32": Fake(1e-4), "int_mm": Fake(1e-5)}
    assert dispatch.choose("w8a8", 8, (8, 8), maker(fakes)) == "int_mm"  # OPS order: gemv, onednn, int_mm, fp32
    assert dispatch.choose("w8a8", 8, (8, 8), maker(fakes), available=("fp32",)) == "fp32"
    assert not dispatch.recorded()


def test_a_model_records_the_kernels_it_ran():
    model = tiny_model("llama").eval()
    secateur.compress_(model, RTNConfig(bits=8, strategy="channel", activations="int8"))
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with dispatch.forced("w8a8@1=fp32,w8a8@32=int_mm"), torch.inference_mode():
        model(ids)
        model(ids[:, :1])
        assert dispatch.summary(model) == {"w8a8": {"1": "fp32", "32": "int_mm"}}
    from secateur.evaluate.results import environment

    settings = environment(model)
    assert settings["kernels"] == {"w8a8": {"1": "fp32", "32": "int_mm"}}
    assert settings["machine"]["cpu"] == machine.cpu_model() and "flags" in settings["machine"]
