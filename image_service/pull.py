"""PullImage as a story: name → URL → (one shared) download → digest check → validation → store.

Concurrent pulls of one URL (and pinned digest) share a single download: the first caller downloads, the
others wait for its result, then each records its own name. A failed download fails all of them alike, and
whatever failed leaves nothing behind: the temporary file is deleted unless the store adopted it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from image_service import names
from image_service.errors import DigestMismatch, DownloadError, ImageError
from image_service.fetch import Fetcher
from image_service.names import ImageName
from image_service.store import Image, Store
from image_service.translation import Endpoint, Translator
from image_service.validate import Validator

log = logging.getLogger("vmlet.image")


class Puller:
    def __init__(self, store: Store, translator: Translator, fetcher: Fetcher, validator: Validator):
        self.store, self.translator, self.fetcher, self.validator = store, translator, fetcher, validator
        self._inflight: dict[tuple[str, str | None], Future] = {}
        self._lock = threading.Lock()

    def pull(self, image: str) -> Image:
        name = names.parse(image)
        # A pinned digest already in the store is that image: nothing to download.
        if name.digest and (stored := self.store.add_refs(name.digest, name)) is not None:
            return stored
        endpoint = self.translator.translate(name)
        key = (endpoint.url, name.digest)
        with self._lock:
            future = self._inflight.get(key)
            leader = future is None
            if leader:
                future = self._inflight[key] = Future()
        if not leader:
            log.info("pull %s: joining the download of %s already in progress", name, endpoint.url)
            image_id = future.result()
            stored = self.store.add_refs(image_id, name)
            if stored is None:  # removed between the shared download and now
                raise DownloadError(f"{name}: image sha256:{image_id} was removed while being pulled; pull again")
            return stored
        try:
            stored = self._download(name, endpoint)
            future.set_result(stored.id)
            return stored
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._inflight[key]

    def _download(self, name: ImageName, endpoint: Endpoint) -> Image:
        log.info("pull %s: downloading %s (%s)", name, endpoint.url, endpoint.rule)
        start = time.monotonic()
        try:
            with self.store.new_temp() as temp:
                fetched = self.fetcher.fetch(endpoint.url, endpoint.transport, temp.file, label=str(name))
                temp.sync()
                if name.digest and fetched.sha256 != name.digest:
                    raise DigestMismatch(f"pinned digest sha256:{name.digest} does not match the downloaded "
                                         f"content (sha256:{fetched.sha256}); nothing was stored")
                info = self.validator.validate(temp.path)
                stored = self.store.add(temp, fetched.sha256, fetched.size, info.format, info.virtual_size,
                                        endpoint.url, name)
        except ImageError as e:
            log.warning("pull %s from %s failed: %s", name, endpoint.url, e)
            # Same class (same gRPC code), with the image and URL in the message (once).
            reason = str(e).removeprefix(f"{endpoint.url}: ")
            raise type(e)(f"pull {name} from {endpoint.url}: {reason}") from None
        log.info("pull %s: stored as sha256:%s (%s, %d bytes) in %.1fs", name, stored.id, info.format,
                 stored.size, time.monotonic() - start)
        return stored
