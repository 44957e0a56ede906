"""Incremental detokenization: token bytes -> safe text deltas, stop strings removed.

Two rules clients depend on (LocalAI drops a stream after an invalid UTF-8 sequence or
a U+FFFD): a delta never ends inside a UTF-8 character, and a stop string is never
emitted, even when it arrives split across several tokens. So text goes through two
holding stages: incomplete UTF-8 bytes wait for their continuation, and a tail that
could still become a stop string waits until it cannot.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts at a full match."""

    __slots__ = ("stops", "_pending", "_max_hold")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self._max_hold = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string matched)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self._pending = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            # longest suffix of buf that is a proper prefix of s
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if hold:
            self._pending = buf[-hold:]
            return buf[:-hold], False
        self._pending = ""
        return buf, False

    def flush(self) -> str:
        """At the end of generation the held tail is plain text after all."""
        out, self._pending = self._pending, ""
        return out


class IncrementalDetokenizer:
    """Token pieces (bytes) in, complete-character text out, stop strings removed."""

    __slots__ = ("_decoder", "stop", "stopped")

    def __init__(self, stops: list[str] | None = None) -> None:
        # errors="ignore": bytes that can never form a character (a model emitting a
        # stray continuation byte) are dropped rather than turned into U+FFFD;
        # incomplete sequences at the end of a chunk are held by the decoder.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.stop = StopMatcher(stops or [])
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Return the text that can be emitted after ``piece``; sets ``stopped``."""
        if self.stopped:
            return ""
        text = self._decoder.decode(piece)
        if not text:
            return ""
        out, hit = self.stop.feed(text)
        if hit:
            self.stopped = True
        return out

    def finish(self) -> str:
        """Flush at the end of generation (incomplete trailing bytes are dropped)."""
        if self.stopped:
            return ""
        text = self._decoder.decode(b"", final=True)
        out, hit = self.stop.feed(text) if text else ("", False)
        if hit:
            self.stopped = True
            return out
        return out + self.stop.flush()
