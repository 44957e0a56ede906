"""The quantization job, run in the job's child process (``inferd.engines.jobs.child``).

GGUF -> GGUF through ``llama_model_quantize`` (llama-cpp-python's binding of llama.cpp's
quantizer; its ``llama_model_quantize_params`` ctypes layout matches the vendored
``include/llama.h`` of 0.3.36 field for field, and a test reads the defaults back through it).
Progress comes from the quantizer itself: it logs one ``[  i/  n] tensor-name`` line per
tensor, which a llama.cpp log callback parses. A Hugging Face directory is first converted
to an f16 GGUF with llama.cpp's ``convert_hf_to_gguf.py`` (see ``scripts``).

The result is written to a hidden ``.part`` file and renamed at the end, so a stopped,
killed or failed job never leaves a file that looks finished (the runner removes the part).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp  # at import time: a pre-started spare child (engines.jobs.process) has it loaded

from inferd.engines.gguf import GGUF_MAGIC, file_magic
from inferd.engines.jobs.child import JobChannel, JobFailed
from inferd.engines.quantize.scripts import run_script

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
MiB = 1024 * 1024


def check_gguf(path: Path) -> None:
    try:
        magic = file_magic(path)
    except OSError as exc:
        raise JobFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise JobFailed(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf "
                        f"file or a Hugging Face model directory (config.json + safetensors)")


def convert_hf(source: Path, out: Path, channel: JobChannel) -> Path:
    """A Hugging Face model directory -> an f16 GGUF (llama.cpp's converter, offline)."""
    if not (source / "config.json").is_file():
        raise JobFailed(f"{source} is a directory without config.json: not a Hugging Face model directory")
    channel.emit(status="converting", message=f"converting {source.name} to GGUF (f16)", progress_percent=0.0)
    run_script("convert_hf_to_gguf.py", [str(source), "--outfile", str(out), "--outtype", "f16"], channel.stop)
    return out


class _QuantizerLog:
    """llama.cpp log callback: copies every line to the job log and turns tensor lines into progress."""

    def __init__(self, channel: JobChannel, start: float, span: float) -> None:
        self.channel, self.start, self.span = channel, start, span
        self.errors: list[str] = []
        self.total = 0
        self._last_emit = 0.0
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # keep a reference: C holds it
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, user_data: Any) -> None:
        piece = text.decode("utf-8", "replace")
        sys.stderr.write(piece)
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            self.errors.append(piece.strip())
        match = _TENSOR_LINE.match(piece)
        if match:
            done, total, name = int(match.group(1)), int(match.group(2)), match.group(3)
            self.total = total
            now = time.monotonic()
            if done == total or now - self._last_emit >= 0.05:
                self._last_emit = now
                self.channel.emit(status="quantizing", message=f"tensor {done}/{total}: {name}",
                                  progress_percent=self.start + self.span * (done - 1) / max(total, 1),
                                  extra_metrics={"tensors_done": float(done - 1), "tensors_total": float(total)})


def run(params: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    source, output, partial = Path(params["source"]), Path(params["output"]), Path(params["partial"])
    started = time.monotonic()
    gguf_in, span_start = source, 0.0
    converted = Path(params["converted"])
    try:
        if source.is_dir():
            gguf_in, span_start = convert_hf(source, converted, channel), 50.0
        check_gguf(gguf_in)
        channel.emit(status="quantizing", message=f"quantizing {gguf_in.name} to {params['type_name']}",
                     progress_percent=span_start)
        qlog = _QuantizerLog(channel, span_start, 100.0 - span_start)
        qparams = llama_cpp.llama_model_quantize_default_params()
        qparams.nthread = int(params.get("threads") or 0)
        qparams.ftype = int(params["ftype"])
        qparams.allow_requantize = bool(params.get("allow_requantize", True))
        qparams.quantize_output_tensor = not params.get("leave_output_tensor", False)
        qparams.pure = bool(params.get("pure", False))
        if "output_tensor_type" in params:
            qparams.output_tensor_type = int(params["output_tensor_type"])
        if "token_embedding_type" in params:
            qparams.token_embedding_type = int(params["token_embedding_type"])
        channel.exit_on_stop = True  # one long native call: a stop kills the process
        channel.check_stop()
        quantized_bytes = gguf_in.stat().st_size
        t0 = time.monotonic()
        rc = llama_cpp.llama_model_quantize(str(gguf_in).encode(), str(partial).encode(), ctypes.byref(qparams))
        seconds = time.monotonic() - t0
        channel.exit_on_stop = False
        if rc != 0:
            reason = " | ".join(e for e in qlog.errors if e)[-800:] or "see the job log"
            raise JobFailed(f"llama_model_quantize failed (status {rc}): {reason}")
        os.replace(partial, output)
    finally:
        for leftover in (partial, converted):
            if leftover.exists():
                leftover.unlink()
    in_size, out_size = source_size(source), output.stat().st_size
    return {
        "message": f"quantized to {params['type_name']}: {output}",
        "output_file": str(output),
        "extra_metrics": {
            "file_size_mb": out_size / MiB,
            "input_size_mb": in_size / MiB,
            "compression_ratio": in_size / out_size if out_size else 0.0,
            "quantize_seconds": seconds,
            "total_seconds": time.monotonic() - started,
            "mb_per_second": quantized_bytes / MiB / max(seconds, 1e-9),
            "tensors_done": float(qlog.total), "tensors_total": float(qlog.total),
        },
    }


def source_size(source: Path) -> int:
    """Bytes of a model file, or of a directory's weight files."""
    if source.is_file():
        return source.stat().st_size
    return sum(p.stat().st_size for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
