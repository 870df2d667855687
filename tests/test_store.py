import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from composer.recipe import RecipeError, parse
from composer.sharing import store
from composer.sharing.store import ID_PATTERN, Store, StoreError

RECIPE = json.dumps(
    {
        "prompt": "a red circle",
        "method": "superpose",
        "experts": [{"model": "toy-warm"}, {"model": "toy-cool", "prompt": "a circle"}],
        "superpose": {"mode": "and"},
        "sampler": {"steps": 3, "seed": 7, "num_images": 2},
    }
)


def png(seed: int, side: int = 16) -> bytes:
    image = Image.frombytes(
        "RGB", (side, side), bytes((seed * 7 + k) % 256 for k in range(3 * side**2))
    )
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shares(tmp_path) -> Store:
    return Store(tmp_path / "data")


def test_an_entry_reads_back_exactly_what_was_written(shares):
    images = (png(1), png(2))
    share_id = shares.save(RECIPE, images)
    entry = shares.open(share_id)
    assert ID_PATTERN.fullmatch(share_id)
    assert entry.id == share_id and entry.pngs == images
    assert entry.recipe == parse(RECIPE) and not entry.listed
    assert Store(shares.root).open(share_id) == entry  # a new process sees the same entry


def test_ids_are_random_not_derived_from_what_is_saved(shares):
    ids = {shares.save(RECIPE, [png(1)]) for _ in range(20)}
    assert len(ids) == 20


def test_an_unknown_id_is_a_clear_error(shares):
    with pytest.raises(StoreError, match="no shared generation has the id 'AAAAAAAAAAAA'"):
        shares.open("AAAAAAAAAAAA")


@pytest.mark.parametrize("bad", ["../x", "../../../etc/pass", "abc/defghijk", "", "x" * 13, None])
def test_a_path_like_or_malformed_id_is_refused_before_it_reaches_a_path(shares, bad):
    with pytest.raises(StoreError, match=r"share id: .* is not accepted; expected 12 characters"):
        shares.open(bad)


def test_a_10_mb_recipe_is_refused_and_nothing_is_written(shares):
    huge = json.dumps({"prompt": "x" * 10_000_000, "experts": [{"model": "toy-warm"}]})
    with pytest.raises(StoreError, match=r"the recipe has 100000\d\d bytes; at most 262144"):
        shares.save(huge, [png(1)])
    assert list(shares.shares.iterdir()) == [] and list(shares.staging.iterdir()) == []


def test_images_outside_the_limits_are_refused(shares, monkeypatch):
    with pytest.raises(StoreError, match="17 images; 1 to 16 are accepted"):
        shares.save(RECIPE, [png(k) for k in range(17)])
    with pytest.raises(StoreError, match="0 images"):
        shares.save(RECIPE, [])
    with pytest.raises(StoreError, match="image 2 is not a PNG file"):
        shares.save(RECIPE, [png(1), b"GIF89a..."])
    monkeypatch.setattr(store, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(StoreError, match=r"image 1 has \d+ bytes; at most 100 per image"):
        shares.save(RECIPE, [png(1)])


def test_a_recipe_the_parser_refuses_is_not_stored(shares):
    with pytest.raises(RecipeError, match=r"sampler\.steps: 0 is not accepted"):
        shares.save(
            json.dumps({"prompt": "a", "experts": [{"model": "m"}], "sampler": {"steps": 0}}),
            [png(1)],
        )


def test_a_truncated_image_is_reported_as_damage(shares):
    images = (png(1), png(2, side=32))
    share_id = shares.save(RECIPE, images)
    second = shares.shares / share_id / "00001.png"
    second.write_bytes(images[1][: len(images[1]) // 2])
    with pytest.raises(
        StoreError,
        match=rf"share id '{share_id}': the stored entry is damaged \(image 2 is "
        rf"{len(images[1]) // 2} bytes, expected {len(images[1])} bytes",
    ):
        shares.open(share_id)
    second.unlink()
    with pytest.raises(StoreError, match=r"damaged \(image 2 is missing"):
        shares.open(share_id)


def test_a_truncated_recipe_in_the_index_is_reported_as_damage(shares):
    share_id = shares.save(RECIPE, [png(1)])
    with sqlite3.connect(shares.index) as db:
        db.execute("UPDATE shares SET recipe = substr(recipe, 1, 40) WHERE id = ?", (share_id,))
    with pytest.raises(StoreError, match=rf"share id '{share_id}': the stored recipe is damaged"):
        shares.open(share_id)


def test_a_crash_between_images_and_index_leaves_no_entry_that_opens(tmp_path):
    """The process dies (no cleanup runs) after the images are in place, before the index row."""
    root = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(store.__file__).parents[1])!r})
        from composer.sharing.store import Store
        shares = Store({str(root)!r})
        shares._index = lambda *args: os._exit(3)
        shares.save({RECIPE!r}, [{png(1)!r}, {png(2)!r}])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()
    shares = Store(root)
    orphans = [p.name for p in shares.shares.iterdir()]
    assert len(orphans) == 1 and len(list((shares.shares / orphans[0]).iterdir())) == 2
    with pytest.raises(StoreError, match="no shared generation has the id"):
        shares.open(orphans[0])
    assert shares.latest() == []
    assert shares.open(shares.save(RECIPE, [png(3)], listed=True)).pngs == (png(3),)


def test_a_failed_index_write_removes_the_images_it_published(shares, monkeypatch):
    def fail(*args):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(shares, "_index", fail)
    with pytest.raises(sqlite3.OperationalError):
        shares.save(RECIPE, [png(1)])
    assert list(shares.shares.iterdir()) == [] and list(shares.staging.iterdir()) == []


def test_concurrent_saves_from_threads_lose_nothing(shares):
    saved: dict[str, bytes] = {}
    lock = threading.Lock()
    errors = []

    def worker(k: int):
        try:
            for j in range(5):
                image = png(10 * k + j)
                share_id = Store(shares.root).save(RECIPE, [image], listed=True)
                with lock:
                    saved[share_id] = image
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(saved) == 40
    assert sorted(shares.latest(limit=100)) == sorted(saved)
    for share_id, image in saved.items():
        assert shares.open(share_id).pngs == (image,)


def test_latest_lists_only_listed_entries_newest_first(shares):
    first = shares.save(RECIPE, [png(1)], listed=True)
    shares.save(RECIPE, [png(2)])
    last = shares.save(RECIPE, [png(3)], listed=True)
    assert shares.latest() == [last, first]
    assert shares.latest(limit=1) == [last]


def test_data_dir_is_the_variable_then_a_spaces_disk_then_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPOSER_DATA", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(store, "SPACE_DATA", tmp_path / "space-disk")
    assert store.data_dir() == store.LOCAL_DATA
    monkeypatch.setenv("SPACE_ID", "owner/name")
    assert store.data_dir() == store.LOCAL_DATA  # a Space without persistent storage
    (tmp_path / "space-disk").mkdir()
    assert store.data_dir() == tmp_path / "space-disk"
    monkeypatch.setenv("COMPOSER_DATA", str(tmp_path / "mine"))
    assert store.data_dir() == tmp_path / "mine"
    assert Store().root == tmp_path / "mine"


def test_a_taken_id_draws_another_and_never_overwrites_an_entry(shares, monkeypatch):
    drawn = iter(["A" * 12, "A" * 12, "B" * 12] + ["A" * 12] * 5)
    monkeypatch.setattr(store.secrets, "token_urlsafe", lambda n: next(drawn))
    assert shares.save(RECIPE, [png(1)]) == "A" * 12
    assert shares.save(RECIPE, [png(2)]) == "B" * 12
    with pytest.raises(StoreError, match="could not draw a free id"):
        shares.save(RECIPE, [png(3)])
    assert shares.open("A" * 12).pngs == (png(1),) and shares.open("B" * 12).pngs == (png(2),)
    assert list(shares.staging.iterdir()) == []


def test_the_local_data_folder_is_the_one_gitignore_names():
    """``.composer-data`` sits at the repository root, where ``.gitignore``'s ``/.composer-data/``
    keeps shared images out of commits (it used to land inside ``composer/``)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert root / ".composer-data" == store.LOCAL_DATA
    assert "/.composer-data/" in (root / ".gitignore").read_text().split()
