"""The checked-in CRI modules must be exactly what `python -m proto.generate` produces."""

from proto import generate


def test_generated_modules_are_up_to_date():
    stale = generate.stale_files()
    assert not stale, (
        "generated CRI modules differ from a fresh generation; "
        "run `python -m proto.generate` and commit: " + ", ".join(stale)
    )


def test_generated_modules_import_by_package_path():
    from proto.runtime.v1 import api_pb2, api_pb2_grpc

    assert api_pb2.DESCRIPTOR.name == "proto/runtime/v1/api.proto"
    # The gRPC module must reach the messages through the package path, not a top-level `api_pb2`.
    assert api_pb2_grpc.proto_dot_runtime_dot_v1_dot_api__pb2 is api_pb2
    assert hasattr(api_pb2_grpc, "RuntimeServiceServicer")
    assert hasattr(api_pb2_grpc, "ImageServiceStub")
