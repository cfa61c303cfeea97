"""The content store: a site compiled into prebuilt, pre-segmented HTTP responses.

Theory of operation: `compiler.compile_site` turns a directory into one
immutable store file (`store.StoreWriter`); `store.Store.open` maps it
read-only and exposes the blob, the per-segment RFC 1071 sums and the
lookup tables (`site.Site`) without copying response bytes. `checksum`
holds the ones'-complement helpers the stack uses to fix checksums
incrementally. The compiler runs on the build host (it uses jinja2); the
loader and checksum modules use only the standard library.
"""
from .checksum import ones_sum, fold, field_delta
from .site import Resource, Site
from .store import Response, Store, StoreError

__all__ = ["Store", "StoreError", "Response", "Site", "Resource", "ones_sum", "fold", "field_delta"]
