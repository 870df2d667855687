import pytest
import torch
from safetensors.torch import save_file

from composer import registry
from composer.checkpoints.hashing import file_sha256
from composer.recipe import RecipeError


def test_local_folder_resolves_and_loads_with_its_architecture(tiny_sd1, tiny_sdxl):
    cache = registry.ModelCache()
    for path, arch in ((tiny_sd1, "sd1"), (tiny_sdxl, "sdxl")):
        source = registry.resolve_model(path)
        assert source.kind == "folder"
        with cache.lease(source) as lease:
            assert registry.architecture(lease.pipe) == arch


def test_unknown_model_names_what_is_accepted():
    with pytest.raises(RecipeError, match=r"unknown model 'no such thing'.*Hub id"):
        registry.resolve_model("no such thing")


@pytest.mark.parametrize("reference", ["../../etc/passwd", "/etc/passwd", "/etc"])
def test_path_tricks_are_refused(reference):
    with pytest.raises(RecipeError):
        registry.resolve_model(reference)


def test_hub_id_without_network_is_a_clear_error():
    source = registry.resolve_model("someone/some-model")
    assert source.kind == "hub"
    with pytest.raises(RecipeError, match="could not be loaded from the Hugging Face Hub"):
        registry.load_pipeline(source, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_files_are_refused_unless_allowed(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    monkeypatch.delenv("COMPOSER_ALLOW_PICKLE", raising=False)
    with pytest.raises(RecipeError, match=r"pickle file.*COMPOSER_ALLOW_PICKLE=1"):
        registry.resolve_model(str(path))
    with pytest.raises(RecipeError, match="pickle file"):
        registry.resolve_lora(str(path))
    monkeypatch.setenv("COMPOSER_ALLOW_PICKLE", "1")
    assert registry.resolve_model(str(path)).kind == "single_file"


def test_folder_with_only_pickle_weights_is_refused(tiny_sd1, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd1, folder)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
        torch.save({}, f.with_suffix(".bin"))
    with pytest.raises(RecipeError, match="safetensors"):
        registry.load_pipeline(
            registry.resolve_model(str(folder)), torch.device("cpu"), torch.float32
        )


def test_corrupt_safetensors_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RecipeError, match=r"not a readable \.safetensors file"):
        registry.resolve_model(str(path))


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"no model_index\.json"):
        registry.resolve_model(str(tmp_path))


def test_second_lease_reuses_the_loaded_pipeline(tiny_sd1):
    cache = registry.ModelCache()
    source = registry.resolve_model(tiny_sd1)
    with cache.lease(source) as first:
        pipe = first.pipe
    with cache.lease(source) as second:
        assert second.pipe is pipe
    assert cache.loads == 1


def test_least_recently_used_model_is_evicted_over_budget(tiny_sd1, tiny_sdxl):
    sd1, sdxl = registry.resolve_model(tiny_sd1), registry.resolve_model(tiny_sdxl)
    cache = registry.ModelCache(budget_bytes=1)
    with cache.lease(sd1):
        pass
    with cache.lease(sdxl):
        pass
    assert sdxl.location in cache and sd1.location not in cache
    roomy = registry.ModelCache(budget_bytes=2**30)
    for source in (sd1, sdxl, sd1):
        with roomy.lease(source):
            pass
    assert roomy.loads == 2


def test_lora_references_resolve_to_files(tiny_lora):
    folder = str(__import__("pathlib").Path(tiny_lora).parent)
    assert registry.resolve_lora(folder) == tiny_lora
    assert registry.resolve_lora(tiny_lora) == tiny_lora
    with pytest.raises(RecipeError, match="unknown LoRA"):
        registry.resolve_lora("nope")


def test_lora_hash_is_the_sha256_of_the_body_after_the_header(tiny_lora):
    import hashlib

    with open(tiny_lora, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[:8], "little")
    assert file_sha256(tiny_lora, body_only=True) == hashlib.sha256(data[8 + header :]).hexdigest()
    assert file_sha256(tiny_lora) == hashlib.sha256(data).hexdigest()
