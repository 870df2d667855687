"""Shared generations that outlive the process: a recipe and its PNGs under a short random id.

An embedded store that needs no server: an SQLite index (``shares.sqlite``) and one folder of
PNGs per entry (``shares/<id>/00000.png`` …) under the data directory (``data_dir``).

A save writes the PNGs into a private staging folder, renames it to ``shares/<id>`` (atomic on
one filesystem) and only then inserts the index row, in one transaction. An entry exists for a
link only once its row does, so a crash at any point leaves either a whole entry or none that
opens; the row holds every image's size and sha256, so a file cut short later is reported as
damage, not served. Ids come from ``secrets`` (72 random bits), never from user input, and are
checked against ``ID_PATTERN`` before they come near a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from composer.recipe import MAX_IMAGES, Recipe, RecipeError, parse
from composer.sharing.links import MAX_RECIPE_BYTES

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{12}")
"""``secrets.token_urlsafe(9)``: 12 base64url characters."""
MAX_IMAGE_BYTES = 16 * 2**20
"""Largest PNG kept (a 2048×2048 RGB PNG of pure noise is about 12 MiB)."""
MAX_ENTRY_BYTES = 64 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOCAL_DATA = Path(__file__).resolve().parents[2] / ".composer-data"  # the repository root
SPACE_DATA = Path("/data")
"""Where a Hugging Face Space mounts its persistent storage, when it has some."""


_SWEPT: set[Path] = set()


class StoreError(RecipeError):
    """A share that cannot be saved or opened. A ``RecipeError``, so that everything that shows
    a user their mistakes (page, API, CLI) shows these messages too."""


def data_dir() -> Path:
    """``COMPOSER_DATA`` when set; else ``/data`` on a Hugging Face Space with persistent storage
    (the only disk there that survives a restart); else ``.composer-data`` beside the code."""
    explicit = os.environ.get("COMPOSER_DATA")
    if explicit:
        return Path(explicit)
    if os.environ.get("SPACE_ID") and SPACE_DATA.is_dir() and os.access(SPACE_DATA, os.W_OK):
        return SPACE_DATA
    return LOCAL_DATA


@dataclass(frozen=True)
class Entry:
    id: str
    recipe: Recipe
    pngs: tuple[bytes, ...]
    created: float
    listed: bool


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.shares = self.root / "shares"
        self.staging = self.root / "staging"
        self.index = self.root / "shares.sqlite"
        self.shares.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS shares (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                "recipe TEXT NOT NULL, images TEXT NOT NULL, listed INTEGER NOT NULL)"
            )
        if self.root.resolve() not in _SWEPT:  # once per process and folder: on start
            _SWEPT.add(self.root.resolve())
            self.sweep()

    def sweep(self, orphan_age_s: float = 60.0) -> list[Path]:
        """Remove what interrupted saves left (a process killed mid-save): staging folders of
        processes that no longer run (each is named ``<pid>-<random>``), and entry folders with
        no index row that are older than ``orphan_age_s`` (a live save holds one only for the
        moment between its rename and its insert). Returns what it removed."""
        removed = []
        for staged in self.staging.iterdir():
            pid = staged.name.partition("-")[0]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(staged, ignore_errors=True)
                removed.append(staged)
        with self._connect() as db:
            known = {row[0] for row in db.execute("SELECT id FROM shares")}
        now = time.time()
        for folder in self.shares.iterdir():
            if folder.name not in known and now - folder.stat().st_mtime > orphan_age_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def save(self, recipe_json: str, pngs: Sequence[bytes], listed: bool = False) -> str:
        """Store a recipe (JSON, parsed here like every recipe) and its PNGs; returns the new id.
        ``listed`` puts the entry in ``latest`` (the page's public list of shared results)."""
        size = len(recipe_json.encode("utf-8"))
        if size > MAX_RECIPE_BYTES:
            raise StoreError(
                f"share: the recipe has {size} bytes; at most {MAX_RECIPE_BYTES} are accepted"
            )
        recipe = parse(recipe_json)
        _check_images(pngs)
        images = [{"bytes": len(p), "sha256": hashlib.sha256(p).hexdigest()} for p in pngs]
        staged = self.staging / f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            staged.mkdir()
            for i, png in enumerate(pngs):
                _write_synced(staged / f"{i:05d}.png", png)
            share_id = self._publish(staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        try:
            self._index(share_id, recipe.to_json(indent=None), images, listed)
        except BaseException:
            shutil.rmtree(self.shares / share_id, ignore_errors=True)
            raise
        return share_id

    def _publish(self, staged: Path) -> str:
        """Rename the staged folder to a fresh id's folder; a taken id (never seen in practice
        with 72 random bits) draws another."""
        for _ in range(5):
            share_id = secrets.token_urlsafe(9)
            try:
                staged.rename(self.shares / share_id)
            except OSError:
                if (self.shares / share_id).exists():
                    continue
                raise
            _sync_dir(self.shares)
            return share_id
        raise StoreError("share: could not draw a free id; try again")

    def _index(self, share_id: str, recipe: str, images: list[dict], listed: bool) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO shares (id, created, recipe, images, listed) VALUES (?, ?, ?, ?, ?)",
                (share_id, time.time(), recipe, json.dumps(images), int(listed)),
            )

    def open(self, share_id: str) -> Entry:
        """The entry ``share_id`` exactly as saved; ``StoreError`` when the id is malformed,
        unknown, or its files no longer match the index."""
        if not isinstance(share_id, str) or not ID_PATTERN.fullmatch(share_id):
            shown = repr(share_id if len(str(share_id)) <= 40 else str(share_id)[:37] + "...")
            raise StoreError(
                f"share id: {shown} is not accepted; expected 12 characters of A-Z, a-z, 0-9, "
                "'-' and '_', as in the links the Share button makes"
            )
        with self._connect() as db:
            row = db.execute(
                "SELECT recipe, images, created, listed FROM shares WHERE id = ?", (share_id,)
            ).fetchone()
        if row is None:
            raise StoreError(
                f"share id: no shared generation has the id {share_id!r}; it was never saved "
                "here, or this server's storage was reset (a Space without persistent storage "
                "loses it on restart)"
            )
        recipe_text, images_text, created, listed = row
        pngs = []
        for i, expected in enumerate(json.loads(images_text)):
            path = self.shares / share_id / f"{i:05d}.png"
            try:
                png = path.read_bytes()
            except OSError:
                png = None
            if png is None or hashlib.sha256(png).hexdigest() != expected["sha256"]:
                found = "missing" if png is None else f"{len(png)} bytes"
                raise StoreError(
                    f"share id {share_id!r}: the stored entry is damaged (image {i + 1} is "
                    f"{found}, expected {expected['bytes']} bytes with the recorded sha256)"
                )
            pngs.append(png)
        try:
            recipe = parse(recipe_text)
        except RecipeError as e:
            raise StoreError(f"share id {share_id!r}: the stored recipe is damaged ({e})") from None
        return Entry(share_id, recipe, tuple(pngs), created, bool(listed))

    def latest(self, limit: int = 12) -> list[str]:
        """Ids of the newest entries saved with ``listed=True``, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT id FROM shares WHERE listed = 1 ORDER BY created DESC LIMIT ?", (limit,)
            ).fetchall()
        return [share_id for (share_id,) in rows]

    @contextlib.contextmanager
    def _connect(self):
        """One connection per operation (SQLite connections are not shared between threads);
        ``with`` commits or rolls back the transaction, then the connection is closed."""
        db = sqlite3.connect(self.index, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()


def _check_images(pngs: Sequence[bytes]) -> None:
    if not 1 <= len(pngs) <= MAX_IMAGES:
        raise StoreError(f"share: {len(pngs)} images; 1 to {MAX_IMAGES} are accepted")
    for i, png in enumerate(pngs):
        if not isinstance(png, bytes) or not png.startswith(PNG_SIGNATURE):
            raise StoreError(f"share: image {i + 1} is not a PNG file; only PNGs are stored")
        if len(png) > MAX_IMAGE_BYTES:
            raise StoreError(
                f"share: image {i + 1} has {len(png)} bytes; at most {MAX_IMAGE_BYTES} per image"
            )
    total = sum(len(p) for p in pngs)
    if total > MAX_ENTRY_BYTES:
        raise StoreError(
            f"share: the images have {total} bytes together; at most {MAX_ENTRY_BYTES} are accepted"
        )


def _write_synced(path: Path, data: bytes) -> None:
    """Write and fsync, so that the rename that publishes the folder never outruns its data."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (signal 0 checks without sending one)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True
