"""The worker's cache of SAM2 image features: the second and later prompts on an image run
only the prompt encoder and mask decoder.

Entries are keyed by (image content sha256, base checkpoint sha256): the features depend only
on the image and on the released trunk and neck of the base, not on the model version (whose
adapters and decoder the promptable head bypasses). The cache is bounded in bytes (the
tensors' sizes) and evicts the least recently used entries first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from sam2unet.prompt_head import ImageFeatures

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    """LRU of :class:`ImageFeatures` within ``max_bytes`` (0: nothing is kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[tuple[str, str], ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, image_sha: str, base_sha: str) -> ImageFeatures | None:
        key = (image_sha, base_sha)
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return found

    def put(self, image_sha: str, base_sha: str, features: ImageFeatures) -> bool:
        """Keep ``features``, evicting the least recently used entries to stay within the
        bound; False when one entry alone exceeds it (then nothing is kept)."""
        size = features.nbytes
        key = (image_sha, base_sha)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if size > self.max_bytes:
                return False
            while self._entries and self.bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.stats.evictions += 1
            self._entries[key] = features
            self.bytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
