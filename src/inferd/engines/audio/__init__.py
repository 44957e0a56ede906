"""Audio engines: voice activity detection, speech synthesis, transcription, the Opus codec.

Plain Python, no gRPC. One module per job, each importing its own heavy library only
when used, so a backend that needs the codec alone never loads onnxruntime or
CTranslate2:

* ``pcm``: sample conversions (float32 <-> s16le), validation of PCM from requests,
  WAV writing and the resampler every other module uses (libswresample via PyAV).
* ``files``: decode an audio file of any container/codec/rate to float32 mono.
* ``opus``: PCM s16le <-> raw Opus frames (libopus via PyAV), per-session decoders.
* ``vad``: Silero VAD (ONNX) with a streaming segmenter.
* ``tts``: Piper voices (ONNX + espeak-ng phonemes), sentence by sentence.
* ``asr``: Whisper through faster-whisper (CTranslate2), segment by segment.
* ``packaged``: where the models that ship in PyPI packages live (found without importing them).
"""
