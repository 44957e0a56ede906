"""The committed stubs match proto/*.proto, and the contract matches LocalAI's numbering."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from inferd.proto import backend_pb2 as pb
from tests.helpers import ROOT


def test_committed_stubs_are_regenerated_identically(tmp_path: Path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed (dev extra)")
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path in gen.generate(tmp_path):
        committed = ROOT / "src" / "inferd" / "proto" / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} is stale: run scripts/gen_proto.py"


def test_wire_numbers_spot_check():
    # a few field numbers LocalAI relies on (proto 004 wins for the wire)
    f = pb.PredictOptions.DESCRIPTOR.fields_by_name
    assert f["Prompt"].number == 1 and f["UseTokenizerTemplate"].number == 43 and f["MinP"].number == 53
    assert pb.ModelOptions.DESCRIPTOR.fields_by_name["Overrides"].number == 72
    assert pb.Reply.DESCRIPTOR.fields_by_name["chat_deltas"].number == 8
    assert pb.TranscriptSegment.DESCRIPTOR.fields_by_name["speaker"].number == 6
    assert pb.StatusResponse.ERROR == -1
    assert pb.DESCRIPTOR.package == "backend"
    assert len(pb.DESCRIPTOR.services_by_name["Backend"].methods) == 34
