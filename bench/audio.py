"""Audio: real-time factor through inferd vs the same engine in this process; TTSStream latency.

For each backend (silero-vad, piper, whisper) one ``inferd serve --backend NAME``
subprocess is started and loaded with the packaged model; the same backend class is also
loaded in this process. The same input then runs both ways, rounds alternating so machine
noise hits both:

* VAD: the paragraph twice with silences (~25 s), float32 16 kHz: the VADRequest through
  inferd (serialization and the list -> array conversion included) vs the engine's
  ``segments`` on the numpy array in-process;
* TTS: a three-sentence paragraph written to a WAV file (audio seconds = the file's length);
* transcription: that paragraph's WAV (AudioTranscription).

Real-time factor = audio seconds / wall seconds (higher is faster); the ratio is inferd's
median RTF over the in-process median (target >= 0.9x). Then TTSStream: time to the first
audio chunk vs the whole stream, through inferd.

    python bench/audio.py [--rounds 3] [--threads 2]

Numbers on a shared machine are noisy: compare ratios within one run; the load average is
printed with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.registry import create_backend  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.proto import backend_pb2_grpc  # noqa: E402
from tests.helpers import spawned_server  # noqa: E402

PARAGRAPH = ("The committee met on a cold Tuesday morning to discuss the new library. "
             "Everyone agreed that the old building was far too small for the growing town. "
             "After a long debate they voted to build a larger one near the river.")
MiB = 1 << 20


@contextlib.contextmanager
def served(name: str, threads: int) -> Iterator[backend_pb2_grpc.BackendStub]:
    with spawned_server("--backend", name, "--load-on-start", "false", env={"INFERD_LOG_LEVEL": "warning"},
                        timeout=120) as (_, addr):
        channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 100 * MiB),
                                                       ("grpc.max_send_message_length", 100 * MiB)])
        stub = backend_pb2_grpc.BackendStub(channel)
        result = stub.LoadModel(pb.ModelOptions(Threads=threads), timeout=300)
        assert result.success, result.message
        try:
            yield stub
        finally:
            channel.close()


def local(name: str, threads: int):
    backend = create_backend(name)
    backend.load(pb.ModelOptions(Threads=threads), CallContext("LoadModel"))
    return backend


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def rtf_pair(label: str, audio_s: float, inferd_call: Callable[[], object], local_call: Callable[[], object],
             rounds: int) -> float:
    inferd_call()
    local_call()  # warm both
    remote, inproc = [], []
    for _ in range(rounds):
        for times, fn in ((remote, inferd_call), (inproc, local_call)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    r, i = audio_s / statistics.median(remote), audio_s / statistics.median(inproc)
    print(f"{label:<14} audio {audio_s:6.2f} s | in-process RTF {i:7.2f}x | through inferd RTF {r:7.2f}x | "
          f"ratio {r / i:5.2f}x")
    return r / i


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; cores {os.cpu_count()}")
    tmp = Path(tempfile.mkdtemp(prefix="inferd-audio-bench-"))
    ratios: dict[str, float] = {}

    # ---- TTS (and the inputs of the others) ------------------------------------------------
    piper = local("piper", args.threads)
    para = tmp / "paragraph.wav"
    piper.tts(pb.TTSRequest(text=PARAGRAPH, dst=str(para)), CallContext("TTS"))
    para_s = wav_seconds(para)
    with served("piper", args.threads) as stub:
        ratios["TTS"] = rtf_pair(
            "TTS", para_s,
            lambda: stub.TTS(pb.TTSRequest(text=PARAGRAPH, dst=str(tmp / "r.wav")), timeout=300),
            lambda: piper.tts(pb.TTSRequest(text=PARAGRAPH, dst=str(tmp / "l.wav")), CallContext("TTS")),
            args.rounds)
        firsts, totals = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            first = None
            for reply in stub.TTSStream(pb.TTSRequest(text=PARAGRAPH), timeout=300):
                if reply.audio and first is None:
                    first = time.perf_counter() - t0
            firsts.append(first or 0.0)
            totals.append(time.perf_counter() - t0)
        print(f"{'TTSStream':<14} first audio chunk {statistics.median(firsts) * 1000:6.0f} ms | whole stream "
              f"{statistics.median(totals) * 1000:6.0f} ms ({para_s:.2f} s of audio, 3 sentences)")
    piper._free()

    # ---- transcription -------------------------------------------------------------------------
    whisper = local("whisper", args.threads)
    with served("whisper", args.threads) as stub:
        ratios["transcription"] = rtf_pair(
            "transcription", para_s,
            lambda: stub.AudioTranscription(pb.TranscriptRequest(dst=str(para)), timeout=300),
            lambda: whisper.audio_transcription(pb.TranscriptRequest(dst=str(para)), CallContext("ASR")),
            args.rounds)
    whisper._free()

    # ---- VAD -------------------------------------------------------------------------------------
    from inferd.engines.audio.files import load_audio

    speech = load_audio(para, 16000)
    gap = np.zeros(16000, dtype=np.float32)
    samples = np.concatenate([gap, speech, gap, speech, gap])
    request = pb.VADRequest(audio=samples.tolist())
    vad = local("silero-vad", 1)
    with served("silero-vad", 1) as stub:
        # VAD calls are short (~0.4 s): more rounds for the same noise as the others
        ratios["VAD"] = rtf_pair("VAD", samples.size / 16000, lambda: stub.VAD(request, timeout=300),
                                 lambda: vad.audio_engine.segments(samples), 3 * args.rounds)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    worst = min(ratios.values())
    print(f"worst ratio {worst:.2f}x (target >= 0.9x): {'met' if worst >= 0.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
