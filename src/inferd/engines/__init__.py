"""Engines: plain-Python model runtimes, one package per engine.

An engine knows nothing about gRPC or the protobuf messages: it takes plain Python
values (paths, keyword arguments, dataclasses) and returns plain Python values. The
matching backend in ``inferd.backends`` translates protocol messages to and from
these types, so the same engine can sit behind several fronts (the Backend service,
seed 003's LLMService, an embedded client, a benchmark script).
"""
