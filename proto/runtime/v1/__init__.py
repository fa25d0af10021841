"""CRI runtime.v1: api.proto and the modules generated from it (api_pb2, api_pb2_grpc)."""
