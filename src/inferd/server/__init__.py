"""The gRPC front: settings, server assembly, servicers, interceptors and the error map."""
