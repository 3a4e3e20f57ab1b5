"""Machinery the benchmark scripts share: nvidia-smi sampling, the machine's description, photo-like posts.

Not a script: ``bench_embed.py``, ``bench_train.py`` and ``bench_fetch.py`` import it as a sibling module
(each puts this folder on ``sys.path`` first, so the import works from any working directory, and when a test
loads a script from its file). Nothing heavy is imported at module level: torch, numpy, PIL and
``ccclip_widgets`` are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------- GPU sampling
class GpuSampler:
    """Polls ``nvidia-smi`` in a thread: device utilization and memory, per-process memory of watched PIDs.

    One sampler, two views of its samples: :meth:`summary` (``smi_*`` keys, bench_train's results) and
    :meth:`utilisation` (``util_*`` keys, bench_embed's results). Every failed poll is counted and its message
    kept (``sampler_errors``, ``sampler_last_error``): a sampler that stopped reading says so in the results
    instead of leaving a short or empty series behind.

    Parameters
    ----------
    index
        The physical GPU index to query; ``None`` samples nothing (a CPU run, or a GPU that cannot be mapped
        to nvidia-smi's index).
    period_s
        Pause between polls.
    """

    def __init__(self, index: int | None = 0, period_s: float = 0.2) -> None:
        self.index = index
        self.period_s = period_s
        self.memory: list[float] = []
        self.util: list[float] = []
        self.times: list[float] = []  # time.perf_counter() of each utilisation sample
        self.proc_memory: dict[int, list[float]] = {}
        self.watch: set[int] = set()
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self, args: list[str]) -> str:
        out = subprocess.run(
            ["nvidia-smi", f"--id={self.index}", *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode != 0:
            raise RuntimeError(f"nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]}")
        return out.stdout.strip()

    def _poll_once(self) -> None:
        try:
            mem, util = (
                float(x) for x in self._query(["--query-gpu=memory.used,utilization.gpu"]).split(",")[:2]
            )
            self.memory.append(mem)
            self.util.append(util)
            self.times.append(time.perf_counter())
            if self.watch:
                for line in self._query(["--query-compute-apps=pid,used_memory"]).splitlines():
                    parts = [x.strip() for x in line.split(",")]
                    if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) in self.watch:
                        self.proc_memory.setdefault(int(parts[0]), []).append(float(parts[1]))
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"

    def _poll(self, first: threading.Event) -> None:
        while not self._stop.is_set():
            self._poll_once()
            first.set()
            self._stop.wait(self.period_s)

    @contextlib.contextmanager
    def active(self, watch: set[int] | None = None) -> Iterator[GpuSampler]:
        """Sample while the block runs; ``watch``: PIDs whose own GPU memory to record (more may be added).

        The block starts once the first poll has answered (at most 2 s), so a short block still gets a sample.
        """
        self.memory.clear()
        self.util.clear()
        self.times.clear()
        self.proc_memory.clear()
        self.watch = set(watch or ())
        self.errors, self.last_error = 0, None
        self._thread = None
        if self.index is not None and shutil.which("nvidia-smi") is None:
            self.errors, self.last_error = 1, "nvidia-smi not found"
        elif self.index is not None:
            first = threading.Event()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, args=(first,), daemon=True)
            self._thread.start()
            first.wait(2.0)
        try:
            yield self
        finally:
            if self._thread is not None:
                self._stop.set()
                self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        """Device peak memory (GiB, all processes), mean utilization (%), per-PID peaks, sample and error counts."""
        out: dict[str, Any] = {
            "smi_device_peak_memory_gib": round(max(self.memory) / 1024, 2) if self.memory else None,
            "smi_mean_util_pct": round(statistics.fmean(self.util), 1) if self.util else None,
            "smi_samples": len(self.util),
            "sampler_errors": self.errors,
        }
        if self.last_error:
            out["sampler_last_error"] = self.last_error
        for pid in sorted(self.watch):
            seen = self.proc_memory.get(pid)
            out[f"smi_process_peak_memory_gib[{pid}]"] = round(max(seen) / 1024, 2) if seen else None
        return out

    def window_util(self, start: float, end: float) -> dict[str, Any]:
        """Mean utilisation (%) of the samples taken between ``start`` and ``end`` (``time.perf_counter()``).

        A row's steady-state window, without its set-up (model load, worker start, warm-up steps). ``None`` with
        ``smi_window_samples`` 0 when no sample fell inside (a short window, or a sampler starved of the CPU).
        """
        inside = [u for t, u in zip(self.times, self.util) if start <= t <= end]
        return {
            "smi_window_mean_util_pct": round(statistics.fmean(inside), 1) if inside else None,
            "smi_window_samples": len(inside),
        }

    def utilisation(self) -> dict[str, Any] | None:
        """Mean and p90 utilisation (%), max memory used (MiB), sample and failure counts; None when not asked."""
        if not self.util:
            if self.errors:
                return {"samples": 0, "sampler_errors": self.errors, "sampler_last_error": self.last_error}
            return None
        import numpy as np

        util = np.array(self.util)
        mem = np.array(self.memory)
        return {
            "util_mean_pct": round(float(util.mean()), 1),
            "util_p90_pct": round(float(np.percentile(util, 90)), 1),
            "mem_used_max_mib": round(float(mem.max()), 0),
            "samples": len(self.util),
            "sampler_errors": self.errors,
            **({"sampler_last_error": self.last_error} if self.last_error else {}),
        }


def gpu_index(device: Any) -> int | None:
    """nvidia-smi's index of a torch device; None for a CPU, or a GPU named by UUID or MIG name."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if idx < len(ids) and ids[idx].isdigit():
            return int(ids[idx])
        return None  # UUIDs or MIG names: cannot map to nvidia-smi's index safely
    return idx


# --------------------------------------------------------------------------------------------- the machine
def system_info(device: Any) -> dict[str, Any]:
    """CPU, GPU, memory and library versions."""
    import numpy as np
    import PIL
    import polars as pl
    import torch
    import torchvision

    import ccclip_widgets

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "polars": pl.__version__,
        "ccclip_widgets": ccclip_widgets.__version__,
        "cpu_cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:  # missing or broken: the other figures still hold
        pass
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    dev = torch.device(device)
    info["device"] = str(dev)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu_name"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0]
        from ccclip_widgets.gpu_decode import gpu_decode_available

        info["nvjpeg_batched_decode"] = gpu_decode_available(dev)
    return info


def host_kind(info: dict[str, Any]) -> str:
    """Short machine label for the results file name (``h100``, ``cpu-2core``, ...)."""
    name = info.get("gpu_name")
    if name:
        m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
        return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{info.get('cpu_cores_usable', 0)}core"


# --------------------------------------------------------------------------------------------- photo-like posts
WORDS = (
    "lol this is so me when the coffee hits different on a monday again can't even tbh the vibes are immaculate "
    "not me crying over a sandwich at 3am who did this absolutely iconic honestly nobody asked but here we are "
    "my cat judging me again weekend mood finally home sunset was unreal today best day ever can we talk about "
    "this why is nobody talking about it literally obsessed low key high key bestie said what she said "
    "new haircut who dis rainy day vibes hot take pineapple belongs on pizza fight me deadline tomorrow send help "
    "grandma's recipe never fails road trip playlist is ready the view from up here okay but look at this"
).split()
EMOJI = ("😂", "🔥", "✨", "😭", "🙌", "💀", "❤️", "👀", "🤷", "🌅")
TAGS = (
    "#mood",
    "#tbt",
    "#foodie",
    "#nofilter",
    "#weekend",
    "#catsofinstagram",
    "#travel",
    "#ootd",
    "#relatable",
)


def _noise(rng: Any, cells: int, h: int, w: int, ch: int) -> Any:
    import numpy as np
    from PIL import Image

    grid = rng.normal(0, 1, (max(2, cells * h // w) + 2, cells + 2, ch)).astype(np.float32)
    out = np.empty((h, w, ch), np.float32)
    for c in range(ch):
        out[..., c] = np.asarray(
            Image.fromarray(grid[..., c], mode="F").resize((w, h), Image.Resampling.BICUBIC)
        )
    return out


def make_photo(seed: int, width: int = 400, height: int = 300, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth luminance and colour noise at several scales, a few shapes, blur, grain.

    Parameters
    ----------
    seed
        Random seed (same seed, same bytes).
    width, height
        Size in pixels.
    quality
        JPEG quality.

    Returns
    -------
    bytes
        The JPEG (about 30-60 KB at 400 x 300, quality 90).
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    h, w = height, width
    lum = sum(_noise(rng, c, h, w, 1) * a for c, a in ((3, 45.0), (12, 22.0), (48, 10.0)))
    chroma = sum(_noise(rng, c, h, w, 3) * a for c, a in ((2, 30.0), (8, 12.0)))
    base = rng.uniform(70, 190, 3).astype(np.float32)
    img = Image.fromarray((base + lum + chroma).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(-50, w)), int(rng.integers(-50, h))
        x1, y1 = x0 + int(rng.integers(20, 220)), y0 + int(rng.integers(20, 160))
        colour = tuple(int(c) for c in rng.integers(20, 236, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 8)))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
    grain = rng.normal(0, float(rng.uniform(4.5, 10.0)), (h, w, 1)).astype(np.float32)
    img = Image.fromarray((np.asarray(img, np.float32) + grain).clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_text(rng: Any) -> str:
    """A short social-media caption (about 3% are long enough to be truncated at 77 tokens)."""
    n = int(rng.integers(70, 110)) if rng.random() < 0.03 else int(rng.integers(3, 30))
    words = [str(w) for w in rng.choice(WORDS, n)]
    if rng.random() < 0.4:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(EMOJI)))
    if rng.random() < 0.3:
        words.append(str(rng.choice(TAGS)))
    if rng.random() < 0.15:
        words.insert(0, f"@user{int(rng.integers(1, 10_000))}")
    text = " ".join(words)
    return text[0].upper() + text[1:]
