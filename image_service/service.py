"""The CRI ImageService servicer: thin; each RPC validates, asks the store or the puller, answers.

CRI semantics kept (containerd's): ImageStatus of an unknown image is an empty response, a ListImages filter naming
no image lists none, RemoveImage of an unknown image succeeds. For ImageStatus and ListImages a name vmlet can
never hold (another registry's, or not a valid `virtlet.cloud/` name) is such an unknown image; PullImage refuses it
with the reason, and so does RemoveImage (a removal of what cannot be an image is the caller's mistake).
Images are found by repo tag, repo digest, `sha256:<hex>`, `<hex>` or a unique id prefix.
Errors carry the gRPC code of their class (see errors.py); anything unexpected is INTERNAL with its message,
and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from pathlib import Path

import grpc

from image_service import names
from image_service.errors import ImageError, InvalidName, status_message
from image_service.fetch import Fetcher
from image_service.pull import Puller
from image_service.store import Image, Store
from image_service.translation import Translator
from image_service.urlpolicy import AddressPolicy
from image_service.validate import Validator
from proto.runtime.v1 import api_pb2, api_pb2_grpc

log = logging.getLogger("vmlet.image")

# An image id as the store resolves it: `sha256:<hex>`, `<hex>` or a prefix of it.
_ID_RE = re.compile(r"(?:sha256:)?[0-9a-f]{1,64}", re.ASCII)


def _rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ImageError as e:
            context.abort(e.code, status_message(str(e)))
        except Exception as e:  # a bug: say so, keep serving
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, status_message(f"{method.__name__}: {type(e).__name__}: {e}"))
    return wrapper


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, state_dir: str | Path, translator: Translator | None = None,
                 policy: AddressPolicy | None = None, validator: Validator | None = None,
                 max_download_size: int = 64 << 30, progress_interval: float = 5.0):
        self.store = Store(Path(state_dir) / "images")
        self.fetcher = Fetcher(policy or AddressPolicy(), max_download_size, progress_interval)
        self.puller = Puller(self.store, translator or Translator(), self.fetcher, validator or Validator())

    def close(self) -> None:
        """Stop downloads in progress (their temp files go) and release the store."""
        self.fetcher.close()
        self.store.close()

    # ------------------------------------------------------------ for the shim (in-process)

    def acquire(self, image: str, holder: str) -> Path:
        """A VM (holder) uses the image: its file stays until release(). Returns the file's path."""
        return self.store.acquire(image, holder)

    def release(self, image_id: str, holder: str) -> None:
        self.store.release(image_id, holder)

    def _lookup(self, ref: str) -> Image | None:
        """The stored image `ref` names; None also when `ref` cannot name an image of vmlet's at all."""
        if names.is_name(ref):
            try:
                names.parse(ref)
            except InvalidName:
                return None
        elif not _ID_RE.fullmatch(ref):
            return None
        return self.store.get(ref)  # InvalidName only for an ambiguous id prefix

    # ------------------------------------------------------------ RPCs

    @_rpc
    def PullImage(self, request, context):
        image = _image_field(request.image)
        return api_pb2.PullImageResponse(image_ref=_id(self.puller.pull(image)))

    @_rpc
    def ImageStatus(self, request, context):
        image = self._lookup(_image_field(request.image))
        if image is None:
            return api_pb2.ImageStatusResponse()
        info = {"info": self.store.info(image)} if request.verbose else {}
        return api_pb2.ImageStatusResponse(image=_to_cri(image, request.image), info=info)

    @_rpc
    def ListImages(self, request, context):
        ref = request.filter.image.image if request.HasField("filter") else ""
        images = [self._lookup(ref)] if ref else self.store.list()
        return api_pb2.ListImagesResponse(images=[_to_cri(i) for i in images if i is not None])

    def StreamImages(self, request, context):
        # ListImages aborts the call itself on error; the listing is small, one message carries it.
        yield api_pb2.StreamImagesResponse(images=self.ListImages(request, context).images)

    @_rpc
    def RemoveImage(self, request, context):
        image = self.store.get(_image_field(request.image))
        if image is not None:
            self.store.remove(image.id)
            log.info("RemoveImage sha256:%s (%s)%s", image.id, ", ".join(image.tags) or "untagged",
                     f": file kept for {len(image.holders)} holder(s)" if image.holders else "")
        return api_pb2.RemoveImageResponse()

    @_rpc
    def ImageFsInfo(self, request, context):
        used, inodes = self.store.usage()
        usage = api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.store.root)),
            used_bytes=api_pb2.UInt64Value(value=used),
            inodes_used=api_pb2.UInt64Value(value=inodes))
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage])


def _image_field(spec: api_pb2.ImageSpec) -> str:
    if not spec.image:
        raise InvalidName("image: the image field is empty")
    return spec.image


def _id(image: Image) -> str:
    return f"sha256:{image.id}"


def _to_cri(image: Image, spec: api_pb2.ImageSpec | None = None) -> api_pb2.Image:
    spec_image = spec.image if spec is not None else (image.tags or image.digests or [_id(image)])[0]
    return api_pb2.Image(
        id=_id(image), repo_tags=image.tags, repo_digests=image.digests, size=image.size,
        spec=api_pb2.ImageSpec(image=spec_image, annotations=dict(spec.annotations) if spec else {}),
        pinned=False)
