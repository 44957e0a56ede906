"""Scale-out on Ray Serve: each model of ``models.yaml`` as a replicated deployment.

``inferd ray deploy models.yaml`` (``inferd.scale.cli``) starts or joins a Ray cluster and
deploys one application per model (``inferd.scale.app``); each replica is one backend with
its own ``BackendRuntime`` (``inferd.scale.replica``), reached through Ray Serve's gRPC
proxy with the same ``backend.Backend`` / ``entity.grpc.LLMService`` protocols as
``inferd serve``. Needs the optional extra ``inferd[ray]``; nothing else imports this package.
"""
