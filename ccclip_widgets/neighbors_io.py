"""Saving and loading a :class:`~ccclip_widgets.neighbors.NeighborIndex`.

Split out of :mod:`ccclip_widgets.neighbors` (issue 12): staged saves under the folder's lock, the sealed manifest
with BLAKE2b checksums of every file, :meth:`load` with its integrity checks, and :meth:`load_or_build`.
:class:`NeighborIndex` inherits these methods from :class:`_PersistenceMethods`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ccclip_widgets._io import (
    CacheCorruptionWarning,
    atomic_write_json,
    blake2b_file,
    check_seal,
    clean_stale_temps,
    raise_if_disk_full,
    seal,
)
from ccclip_widgets._lock import file_lock

from ._neighbors_common import _KINDS, _faiss, _flat_view
from .errors import IndexIntegrityError

if TYPE_CHECKING:
    from .neighbors import NeighborIndex

_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_LOCK = ".lock"


class _PersistenceMethods:
    """Save / load methods of :class:`~ccclip_widgets.neighbors.NeighborIndex` (mixed in)."""

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        lock_timeout: float | None = None,
    ) -> Path:
        """Save the indexes, post ids, image keys and a manifest to ``directory``.

        The manifest (``manifest.json``: ``n``, ``dims``, ``kinds``, ``mode``, parameters, the fingerprint, and
        BLAKE2b checksums of the files) is what makes a saved index complete. Saving writes every new file under
        a temporary name first; then withdraws the old manifest, renames the new files into place and writes the
        new manifest last. A save interrupted at any point (even by ``SIGKILL``) therefore leaves either the
        previous index, complete, or a folder without a manifest, which :meth:`load` reports as an unfinished
        save; never a mixture. The folder's lock file (``.lock``) is held meanwhile, so a concurrent
        :meth:`load` waits for the save to finish. Other files in ``directory`` are left alone.

        Parameters
        ----------
        directory
            Target folder (created if missing).
        fingerprint
            Embedding fingerprint to record; defaults to the one given at build time.
        lock_timeout
            Seconds to wait when another process is reading or writing the folder (``None``: no limit).

        Returns
        -------
        Path
            The folder.

        Raises
        ------
        ccclip_widgets.DiskFullError
            The disk filled up; the files already in ``directory`` are unchanged.
        """
        faiss = _faiss()
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        staged: dict[str, str] = {}
        names = [f"{kind}.faiss" for kind in self._indexes] + ["posts.parquet", _MANIFEST]

        def stage(name: str, writer: Any) -> None:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
            os.close(fd)
            try:
                writer(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                raise_if_disk_full(exc, root / name, f"The index in {root} is unchanged.")
                raise
            staged[name] = tmp
            files[name] = blake2b_file(tmp)

        with file_lock(root / _LOCK, timeout=lock_timeout, purpose="saving a NeighborIndex"):
            clean_stale_temps(root, only=names)
            try:
                for kind, index in self._indexes.items():
                    stage(f"{kind}.faiss", lambda p, index=index: faiss.write_index(index, p))
                meta = pl.DataFrame({"post_id": self._ids})
                if self._image_keys is not None:
                    meta = meta.with_columns(pl.Series("image_key", np.asarray(self._image_keys).astype(str)))
                stage("posts.parquet", meta.write_parquet)
                fp = fingerprint if fingerprint is not None else self.fingerprint
                manifest = {
                    "format_version": _FORMAT_VERSION,
                    "n": self.n,
                    "kinds": list(self.kinds),
                    "dims": self.dims,
                    "mode": self.mode,
                    "params": self.params,
                    "fingerprint": fp,
                    "has_image_keys": self._image_keys is not None,
                    "files": files,
                    "checksum": "blake2b-128",
                }
                # From here the folder holds no manifest until the new one is written: never a mixture of old
                # and new files that claims to be complete.
                (root / _MANIFEST).unlink(missing_ok=True)
                for name, tmp in staged.items():
                    os.replace(tmp, root / name)
                staged.clear()
                for kind in _KINDS:  # a modality the previous index had and this one lacks
                    if kind not in self._indexes:
                        (root / f"{kind}.faiss").unlink(missing_ok=True)
                atomic_write_json(root / _MANIFEST, seal(manifest))
            finally:
                for tmp in staged.values():
                    Path(tmp).unlink(missing_ok=True)
        self.fingerprint = fp
        return root

    @classmethod
    def load_or_build(
        cls,
        directory: str | os.PathLike[str],
        post_ids: Sequence[str],
        image_vectors: Any | None = None,
        text_vectors: Any | None = None,
        *,
        fingerprint: str,
        lock_timeout: float | None = None,
        **build_kwargs: Any,
    ) -> NeighborIndex:
        """The index saved in ``directory`` for ``fingerprint``, or a new one built, saved there and returned.

        The folder's lock is held from the check to the save, so two processes (two notebooks) asking for the
        same index build it once: the second waits with a message, then loads what the first saved. A saved
        index that fails its checks (a file truncated or altered, a manifest damaged) is reported with a
        :class:`~ccclip_widgets.CacheCorruptionWarning` naming the problem and rebuilt; an unfinished save
        (no manifest) or another fingerprint is a plain miss.

        Parameters
        ----------
        directory
            Cache folder of this index.
        post_ids, image_vectors, text_vectors
            As in :meth:`build` (used only when building).
        fingerprint
            Fingerprint of the embeddings (for example :attr:`Embeddings.fingerprint`); required, since it is
            what tells a valid cache from a stale one.
        lock_timeout
            Seconds to wait for another process using the folder (``None``: no limit).
        **build_kwargs
            Passed to :meth:`build`.

        Returns
        -------
        NeighborIndex
        """
        import warnings

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / _LOCK, timeout=lock_timeout, purpose="building a NeighborIndex"):
            if (root / _MANIFEST).is_file():
                try:
                    return cls.load(root, fingerprint=fingerprint)
                except IndexIntegrityError as exc:
                    if not exc.stale:
                        warnings.warn(
                            f"Saved NeighborIndex in {root} is damaged and is rebuilt: {exc}",
                            CacheCorruptionWarning,
                            stacklevel=2,
                        )
            index = cls.build(post_ids, image_vectors, text_vectors, fingerprint=fingerprint, **build_kwargs)
            index.save(root, fingerprint=fingerprint)
        return index

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        verify: bool = True,
        lock_timeout: float | None = None,
    ) -> NeighborIndex:
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        directory
            The folder.
        fingerprint
            When given, the saved fingerprint must equal it (the embeddings the caller has now must be the ones
            the index was built from).
        verify
            Check the BLAKE2b checksum of every file against the manifest (a few seconds per GB).
        lock_timeout
            Seconds to wait while another process saves into the folder (``None``: no limit).

        Returns
        -------
        NeighborIndex

        Raises
        ------
        IndexIntegrityError
            Missing manifest or file, checksum mismatch, inconsistent sizes, or fingerprint mismatch.
        """
        root = Path(directory)
        if not root.is_dir():
            raise IndexIntegrityError(
                f"{root} holds no {_MANIFEST}: not a saved NeighborIndex (the folder does not exist)",
                stale=True,
            )
        with file_lock(
            root / _LOCK,
            shared=True,
            timeout=lock_timeout,
            purpose="loading a NeighborIndex",
            best_effort=True,
        ):
            return cls._load_unlocked(root, fingerprint, verify)

    @classmethod
    def _load_unlocked(cls, root: Path, fingerprint: str | None, verify: bool) -> NeighborIndex:
        mpath = root / _MANIFEST
        if not mpath.is_file():
            raise IndexIntegrityError(
                f"{root} holds no {_MANIFEST}: not a saved NeighborIndex (or an unfinished save)", stale=True
            )
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexIntegrityError(f"{mpath} is not readable JSON: {exc}") from exc
        problem = check_seal(manifest, mpath)
        if problem is not None:
            raise IndexIntegrityError(
                f"{problem}. Rebuild the index (NeighborIndex.build) and save it again."
            )
        try:
            return cls._from_manifest(root, manifest, fingerprint, verify)
        except IndexIntegrityError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise IndexIntegrityError(
                f"The saved index in {root} is inconsistent ({type(exc).__name__}: {exc}). Rebuild the index "
                "(NeighborIndex.build) and save it again."
            ) from exc

    @classmethod
    def _from_manifest(
        cls, root: Path, manifest: dict[str, Any], fingerprint: str | None, verify: bool
    ) -> NeighborIndex:
        faiss = _faiss()
        mpath = root / _MANIFEST
        if manifest.get("format_version") != _FORMAT_VERSION:
            raise IndexIntegrityError(
                f"{mpath}: unsupported format_version {manifest.get('format_version')!r}"
            )
        if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
            raise IndexIntegrityError(
                f"{root} was built from embeddings with fingerprint {manifest.get('fingerprint')!r}, "
                f"not {fingerprint!r}: rebuild the index for these embeddings",
                stale=True,
            )
        for name, digest in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise IndexIntegrityError(f"{path} is missing; the saved index is incomplete")
            if verify:
                actual = blake2b_file(path)
                if actual != digest:
                    raise IndexIntegrityError(
                        f"{path} is corrupted or was changed after saving: BLAKE2b checksum {actual} does not match "
                        f"{digest} in {_MANIFEST}. Rebuild the index (NeighborIndex.build) and save it again."
                    )
        meta = pl.read_parquet(root / "posts.parquet")
        n = int(manifest["n"])
        if meta.height != n:
            raise IndexIntegrityError(f"posts.parquet has {meta.height} rows; the manifest says {n}")
        ids = meta["post_id"].alias("post_id")
        keys = meta["image_key"].to_numpy() if "image_key" in meta.columns else None
        mode = manifest["mode"]
        vectors: dict[str, np.ndarray] = {}
        indexes: dict[str, Any] = {}
        for kind in manifest["kinds"]:
            index = faiss.read_index(str(root / f"{kind}.faiss"))
            d = int(manifest["dims"][kind])
            if index.ntotal != n or index.d != d:
                raise IndexIntegrityError(
                    f"{kind}.faiss holds {index.ntotal} x {index.d}; expected {n} x {d}"
                )
            if mode == "exact":
                vectors[kind] = _flat_view(index, n, d)
            elif mode == "hnsw":  # read_index already returns the concrete class; never re-wrap (ownership)
                vectors[kind] = _flat_view(index.storage, n, d)
            else:
                vectors[kind] = index.reconstruct_n(0, n) if n else np.zeros((0, d), np.float32)
            indexes[kind] = index
        return cls(
            ids,
            vectors,
            indexes,
            image_keys=keys,
            mode=mode,
            params=manifest["params"],
            fingerprint=manifest.get("fingerprint"),
        )
