"""Row (d) of bench_train.py: open_clip's own trainer, ``open_clip_train.main``, on the same JPEG files.

A csv of the files that ``fine_tune_jpeg`` reads, a command line matched to our settings (model, batch,
precision, workers, steps, loss read-back every ``--read-every`` steps), and the parsing of its log into
pairs/s over the same window of steps. It runs in a process of its own, so its GPU memory is that process's
own ``used_memory`` from nvidia-smi, filtered by its PID.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _bench_common import GpuSampler

_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.]+)/s"
)


def write_open_clip_csv(posts: Any, rows: int, path: Path) -> Path:
    """open_clip_train's csv data set over the same image files as ``posts`` (cycled to ``rows`` rows)."""
    table = posts.table
    files = table["image_path"].to_list()
    texts = [t.replace("\t", " ").replace("\n", " ") for t in table["text"].to_list()]
    with path.open("w") as fh:
        fh.write("filepath\ttitle\n")
        for i in range(rows):
            fh.write(f"{files[i % len(files)]}\t{texts[i % len(texts)]}\n")
    return path


def open_clip_train_command(
    logs: Path,
    csv: Path,
    batch: int,
    workers: int,
    log_every: int,
    precision: str = "amp_bf16",
    model: str = "ViT-B-32",
) -> list[str]:
    """open_clip's own trainer on a csv of our JPEG files, matched to our settings (one epoch over the csv).

    Parameters
    ----------
    logs
        Folder for its logs (a fresh one).
    csv
        Its data set (``filepath``, ``title``; one step per ``batch`` rows).
    batch, workers
        Batch size and DataLoader workers.
    log_every
        Its ``--log-every-n-steps``: it reads the loss back (a host sync) only on those steps, as we read ours
        every ``read_every_steps``; each log line holds the mean step time since the previous one.
    precision
        open_clip precision name (``amp_bf16`` matches our bf16 autocast).
    model
        Architecture.

    Returns
    -------
    list[str]
    """
    return [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        model,
        "--dataset-type",
        "csv",
        "--train-data",
        str(csv),
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--batch-size",
        str(batch),
        "--precision",
        precision,
        "--workers",
        str(workers),
        "--epochs",
        "1",
        "--lr",
        "1e-5",
        "--wd",
        "0.1",
        "--warmup",
        "0",
        "--grad-clip-norm",
        "1.0",
        "--log-every-n-steps",
        str(log_every),
        "--seed",
        "0",
        "--logs",
        str(logs),
        "--name",
        "bench",
        "--report-to",
        "",
        "--save-frequency",
        "0",
        "--log-local",
    ]


def parse_open_clip_log(log_text: str, batch: int, after_step: int) -> dict[str, Any]:
    """Throughput of open_clip_train over the steps after ``after_step``, from its ``Train Epoch`` lines.

    Each line gives the mean step time (``Batch (t)``, data wait included) since the previous line; the number
    of samples seen so far identifies the step. Steps ``after_step + 1 ...`` are summed interval by interval,
    starting at the first line at or after ``after_step``. Pass the text of one source (its log file, or its
    output when there is no file): the same line appears in both.

    Returns
    -------
    dict
        ``samples_per_s`` over the window, ``window_steps`` (first, last), ``data_wait_share`` (its
        ``Data (t)`` over ``Batch (t)`` in the window), ``n_log_lines``.
    """
    lines = [(int(n) // batch, float(d), float(b)) for n, d, b, _ in _LINE.findall(log_text)]
    out: dict[str, Any] = {"n_log_lines": len(lines), "samples_per_s": None}
    start = next((k for k, (step, _, _) in enumerate(lines) if step >= after_step), None)
    if start is None or start + 1 >= len(lines):
        return out
    seconds = data = 0.0
    n_steps = 0
    for (prev, _, _), (step, d, b) in zip(lines[start:], lines[start + 1 :]):
        seconds += b * (step - prev)
        data += d * (step - prev)
        n_steps += step - prev
    out.update(
        samples_per_s=round(batch * n_steps / seconds, 1) if seconds > 0 else None,
        window_steps=(lines[start][0] + 1, lines[-1][0]),
        data_wait_share=round(data / seconds, 3) if seconds > 0 else None,
    )
    return out


def bench_open_clip_train(
    jposts: Any, batch: int, warmup: int, steps: int, workers: int, read_every: int, sampler: GpuSampler
) -> dict:
    """Run open_clip's trainer on the same JPEG files (GPU machines only); its throughput and own GPU memory."""
    logs = Path(tempfile.mkdtemp(prefix="oc_train_"))
    csv = write_open_clip_csv(jposts, batch * (warmup + steps), logs / "train.csv")
    cmd = open_clip_train_command(logs, csv, batch, workers, read_every)
    t0 = time.perf_counter()
    with sampler.active() as smp:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        smp.watch.add(proc.pid)
        try:
            output, _ = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    log_file = logs / "bench" / "out.log"
    text = log_file.read_text(errors="replace") if log_file.is_file() else output  # one source, not both
    out: dict[str, Any] = {
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "command": " ".join(cmd),
        "log_source": str(log_file) if log_file.is_file() else "stdout",
        "data": f"csv of the same {len(jposts)} JPEG files, {batch * (warmup + steps)} rows",
    }
    out.update(parse_open_clip_log(text, batch, warmup))
    if proc.returncode != 0:
        out["error_tail"] = output[-2000:]
    summ = sampler.summary()
    own = summ.pop(f"smi_process_peak_memory_gib[{proc.pid}]", None)
    out.update(summ)
    out["process_peak_memory_gib"] = own
    if own is None:
        out["process_peak_memory_note"] = (
            "nvidia-smi --query-compute-apps listed no memory for its PID (a PID namespace hides it?)"
        )
    return out
